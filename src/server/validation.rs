//! Requests from the network, checked before anything is queued: JSON parsed strictly (unknown
//! fields refused, the offending field named), base64 decoded, options turned into a
//! [`GenerateRequest`] and validated by the same code as the CLI's, concepts resolved.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use super::state::AppState;
use super::store::{ConceptId, StoreError};
use crate::attention_maps::StepWindow;
use crate::concept::Concept;
use crate::request::{GenerateRequest, ValidRequest};

/// The generation options of both APIs (native JSON body, OIP request parameters). Absent
/// fields take the bundle's defaults; `seed` a fresh random seed, returned with the result.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// A scheduler name (`lms`, `dpmpp-2m-karras`, …).
    pub scheduler: Option<String>,
    pub steps: Option<usize>,
    pub guidance: Option<f32>,
    pub lambda: Option<f32>,
    pub seed: Option<u64>,
    pub height: Option<usize>,
    pub width: Option<usize>,
    /// Images (`num_images`).
    pub n: Option<usize>,
    pub placeholder: Option<String>,
    pub truncate: Option<bool>,
}

impl Options {
    /// Validates into a job for the model thread (the CLI's validation: field names in errors);
    /// `attention_maps`: the steps whose maps the job returns (None: no maps).
    pub fn validate(
        &self,
        state: &AppState,
        prompt: String,
        attention_maps: Option<StepWindow>,
    ) -> Result<ValidRequest, ApiError> {
        let v = &state.validator;
        let mut r: GenerateRequest = v.request(prompt);
        r.attention_maps = attention_maps;
        if let Some(name) = &self.scheduler {
            r.scheduler = name
                .parse()
                .map_err(|e: crate::scheduler::SchedulerError| {
                    ApiError::unprocessable("scheduler", e.to_string())
                })?;
        }
        r.steps = self.steps.unwrap_or_else(|| v.default_steps(r.scheduler));
        if let Some(x) = self.guidance {
            r.guidance = x;
        }
        if let Some(x) = self.lambda {
            r.lambda = x;
        }
        r.seed = self.seed.unwrap_or_else(random_seed);
        if let Some(x) = self.height {
            r.height = x;
        }
        if let Some(x) = self.width {
            r.width = x;
        }
        if let Some(x) = self.n {
            r.num_images = x;
        }
        if let Some(x) = &self.placeholder {
            r.placeholder = x.clone();
        }
        if let Some(x) = self.truncate {
            r.truncate = x;
        }
        v.validate(r)
            .map_err(|e| ApiError::from_engine(&e).renamed())
    }
}

impl ApiError {
    /// The library names `num_images`; the APIs call it `n`.
    fn renamed(mut self) -> ApiError {
        if self.field.as_deref() == Some("num_images") {
            self.field = Some("n".into());
        }
        self
    }
}

/// A seed for requests that give none: time-based, distinct per request.
fn random_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // SplitMix64 of time + counter: well spread, never two equal in one process.
    let mut z = now.wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) >> 11 // below 2^53: exact in JSON numbers
}

/// Parses a JSON body strictly; a type error, a missing or an unknown field names the field.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| path_error(e, ""))
}

/// [`parse_json`] for a value already parsed; `prefix` names where it sits (`parameters.`).
pub fn from_value<T: DeserializeOwned>(value: Value, prefix: &str) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| path_error(e, prefix))
}

fn path_error<E: std::fmt::Display>(e: serde_path_to_error::Error<E>, prefix: &str) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner().to_string();
    // "." is the whole document, "?" a syntax error before any field.
    let at_top = path == "." || path == "?";
    // serde reports missing and unknown fields at the enclosing object: name the field.
    let named = ["missing field `", "unknown field `"]
        .iter()
        .find_map(|p| inner.strip_prefix(p))
        .and_then(|rest| rest.split('`').next())
        .map(|f| {
            if at_top {
                f.to_string()
            } else if path == f || path.ends_with(&format!(".{f}")) {
                path.clone() // an unknown field's path already ends with it
            } else {
                format!("{path}.{f}")
            }
        });
    let field = match (named, at_top) {
        (Some(f), _) => format!("{prefix}{f}"),
        (None, true) if prefix.is_empty() => "body".to_string(),
        (None, true) => prefix.trim_end_matches('.').to_string(),
        (None, false) => format!("{prefix}{path}"),
    };
    ApiError::bad_request(&field, format!("invalid JSON: {inner}"))
}

/// Splits a JSON object into the keys in `own` and the rest (the generation options).
pub fn split_object(value: Value, own: &[&str]) -> Result<(Value, Value), ApiError> {
    let Value::Object(map) = value else {
        return Err(ApiError::bad_request(
            "body",
            "the body must be a JSON object",
        ));
    };
    let (mine, rest): (serde_json::Map<_, _>, serde_json::Map<_, _>) = map
        .into_iter()
        .partition(|(k, _)| own.contains(&k.as_str()));
    Ok((Value::Object(mine), Value::Object(rest)))
}

/// The whole body, at most `limit` bytes (413 as JSON otherwise, before more is read).
pub async fn read_body(
    body: axum::body::Body,
    limit: usize,
) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is over the limit of {limit} bytes"),
        )
        .with_field("body")
    })
}

/// Standard base64 (padding optional), naming `field` when it is not.
pub fn base64_field(field: &str, text: &str) -> Result<Vec<u8>, ApiError> {
    let text = text.trim();
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(text))
        .map_err(|e| ApiError::bad_request(field, format!("not valid base64: {e}")))
}

/// A concept id from a request, or 400 naming the field.
pub fn concept_id(field: &str, text: &str) -> Result<ConceptId, ApiError> {
    ConceptId::parse(text).map_err(|e| ApiError::bad_request(field, e.to_string()))
}

/// A stored concept: 404 for an unknown id.
pub async fn stored_concept(state: &AppState, id: ConceptId) -> Result<Arc<Concept>, ApiError> {
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || store.get(&id))
        .await
        .map_err(|e| ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| store_error("concept", e))
}

/// A store error as an API error.
pub fn store_error(field: &str, e: StoreError) -> ApiError {
    match e {
        StoreError::BadId(_) => ApiError::bad_request(field, e.to_string()),
        StoreError::Unknown(_) => ApiError::not_found(field, e.to_string()),
        StoreError::Concept(c) => ApiError::unprocessable(field, c.to_string()),
        StoreError::Write(_) | StoreError::Io(_) => {
            ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
}

/// Encodes an uploaded image (and mask) into a stored concept, unless the store already holds
/// it: the id is computed from the bytes first, so a repeated upload costs no CLIP pass.
pub async fn encode_upload(
    state: &AppState,
    image: Vec<u8>,
    mask: Option<Vec<u8>>,
) -> Result<(ConceptId, Arc<Concept>, bool), ApiError> {
    let id = state.store.image_id(
        &image,
        mask.as_deref(),
        &state.store.preprocessing(mask.is_some()),
    );
    if state.store.contains(&id) {
        let concept = stored_concept(state, id.clone()).await?;
        return Ok((id, concept, false));
    }
    let concept = state
        .model
        .encode(image, "image".into(), mask, "mask".into())
        .await
        .map_err(|e| ApiError::from_engine(&e))?;
    let store = state.store.clone();
    let stored_id = id.clone();
    let concept = tokio::task::spawn_blocking(move || store.put(&stored_id, concept))
        .await
        .map_err(|e| ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| store_error("image", e))?;
    Ok((id, concept, true))
}
