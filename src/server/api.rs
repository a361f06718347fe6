//! The native JSON API: concepts (`/v1/concepts`) and generation (`/v1/generate`, with
//! Server-Sent Events for progress).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use image::RgbImage;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::error::ApiError;
use super::model::{GenerateJob, Update};
use super::state::AppState;
use super::validation::{self, Options};
use crate::attention_maps::{AttentionMaps, StepWindow};
use crate::concept::Concept;
use crate::heatmap::{self, TokenLabel};
use crate::job::{CancelToken, JobTimings, Stage};
use crate::map_output::prompt_tokens;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/concepts", post(upload_concept))
        .route(
            "/v1/concepts/{id}",
            get(concept_metadata).delete(delete_concept),
        )
        .route("/v1/generate", post(generate))
}

// ----- concepts -----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConceptBody {
    /// base64 image file.
    image: Option<String>,
    /// base64 mask file.
    mask: Option<String>,
    /// base64 of a concept file written by `elite-ort encode`.
    concept_file: Option<String>,
}

/// What an upload carries, whichever encoding it came in.
#[derive(Default)]
struct Upload {
    image: Option<Vec<u8>>,
    mask: Option<Vec<u8>>,
    concept_file: Option<Vec<u8>>,
}

async fn read_upload(request: Request, limit: usize) -> Result<Upload, ApiError> {
    let is_multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    if is_multipart {
        let mut multipart = Multipart::from_request(request, &())
            .await
            .map_err(|e| ApiError::bad_request("body", e.body_text()))?;
        let mut upload = Upload::default();
        while let Some(field) = multipart
            .next_field()
            .await
            .map_err(|e| ApiError::new(e.status(), e.body_text()).with_field("body"))?
        {
            let name = field.name().unwrap_or_default().to_string();
            let bytes = field
                .bytes()
                .await
                .map_err(|e| ApiError::new(e.status(), e.body_text()).with_field(&name))?
                .to_vec();
            match name.as_str() {
                "image" => upload.image = Some(bytes),
                "mask" => upload.mask = Some(bytes),
                "concept" | "concept_file" => upload.concept_file = Some(bytes),
                other => {
                    return Err(ApiError::bad_request(
                        other,
                        "unknown form field; expected image, mask or concept",
                    ))
                }
            }
        }
        return Ok(upload);
    }
    let body = validation::read_body(request.into_body(), limit).await?;
    let body: ConceptBody = validation::parse_json(&body)?;
    let decode =
        |field: &str, v: Option<String>| v.map(|t| validation::base64_field(field, &t)).transpose();
    Ok(Upload {
        image: decode("image", body.image)?,
        mask: decode("mask", body.mask)?,
        concept_file: decode("concept_file", body.concept_file)?,
    })
}

async fn upload_concept(State(state): State<AppState>, request: Request) -> Response {
    match upload(&state, request).await {
        Ok((id, created)) => {
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (status, Json(json!({ "id": id, "created": created }))).into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn upload(state: &AppState, request: Request) -> Result<(String, bool), ApiError> {
    let upload = read_upload(request, state.config.max_body_bytes).await?;
    match (upload.image, upload.concept_file) {
        (Some(image), None) => {
            let (id, _, created) = validation::encode_upload(state, image, upload.mask).await?;
            Ok((id.as_str().to_string(), created))
        }
        (None, Some(file)) => {
            if upload.mask.is_some() {
                return Err(ApiError::bad_request(
                    "mask",
                    "a concept file already holds its mask",
                ));
            }
            let store = state.store.clone();
            let existed_before = {
                let id = store.file_id(&file);
                store.contains(&id)
            };
            let (id, _) = tokio::task::spawn_blocking(move || store.put_file(&file))
                .await
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
                .map_err(|e| validation::store_error("concept", e))?;
            Ok((id.as_str().to_string(), !existed_before))
        }
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "concept",
            "give an image (with an optional mask) or a concept file, not both",
        )),
        (None, None) => Err(ApiError::bad_request(
            "image",
            "missing: give an image (with an optional mask) or a concept file",
        )),
    }
}

async fn concept_metadata(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = validation::concept_id("id", &id)?;
    let concept = validation::stored_concept(&state, id.clone()).await?;
    let s = &concept.source;
    Ok(Json(json!({
        "id": id.as_str(),
        "bundle": s.bundle,
        "image": s.image_name,
        "image_sha256": s.image_sha256,
        "mask_sha256": s.mask_sha256,
        "preprocessing": s.preprocessing,
        "text_hidden": concept.text_hidden(),
        "bytes": state.store.bytes(&id),
    })))
}

async fn delete_concept(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = validation::concept_id("id", &id)?;
    let store = state.store.clone();
    let removed = tokio::task::spawn_blocking(move || store.delete(&id))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| validation::store_error("id", e))?;
    if removed {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("id", "no such concept"))
    }
}

// ----- generation -----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateBody {
    prompt: String,
    /// A stored concept's id.
    concept: Option<String>,
    /// Or an inline image (base64), with an optional mask (base64).
    image: Option<String>,
    mask: Option<String>,
    #[serde(default)]
    stream: bool,
    /// Return the attention maps of every image (pictures, as `run --attention-maps` writes).
    #[serde(default)]
    attention_maps: bool,
    /// The steps whose maps are averaged (`a..b`, 1-based); default every step.
    attention_steps: Option<String>,
}

/// The body's own keys; every other key is a generation option ([`Options`]).
const GENERATE_KEYS: &[&str] = &[
    "prompt",
    "concept",
    "image",
    "mask",
    "stream",
    "attention_maps",
    "attention_steps",
];

impl GenerateBody {
    /// The attention-map window the body asks for, checked against what the bundle can do.
    fn attention_window(&self, state: &AppState) -> Result<Option<StepWindow>, ApiError> {
        if !self.attention_maps {
            return match self.attention_steps {
                Some(_) => Err(ApiError::bad_request(
                    "attention_steps",
                    "a step window needs \"attention_maps\": true",
                )),
                None => Ok(None),
            };
        }
        if !state.attention_maps {
            return Err(ApiError::unprocessable(
                "attention_maps",
                "this server's bundle cannot give attention maps: its unet.onnx was exported \
                 before them (or with --no-attention-maps); re-export it with `python -m export`",
            ));
        }
        let window = match &self.attention_steps {
            Some(text) => text
                .parse()
                .map_err(|e: crate::attention_maps::WindowError| {
                    ApiError::bad_request("attention_steps", e.to_string())
                })?,
            None => StepWindow::default(),
        };
        Ok(Some(window))
    }
}

/// What the pictures of a job's maps are labelled with: its prompt's tokens and placeholder.
pub struct MapLabels {
    pub tokens: Vec<TokenLabel>,
    pub placeholder: String,
}

/// A finished job's images, with its attention maps when it asked.
pub struct Finished {
    pub images: Vec<RgbImage>,
    pub attention_maps: Option<AttentionMaps>,
    pub timings: JobTimings,
}

/// Cancels a job when the request that owns it goes away (client gone, deadline, error).
pub struct CancelOnDrop(pub CancelToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// A job on its way: its updates, the queue place it holds, and its cancellation.
pub struct Submitted {
    pub updates: mpsc::UnboundedReceiver<Update>,
    pub seed: u64,
    pub images: usize,
    pub deadline: Instant,
    _permit: OwnedSemaphorePermit,
    _cancel: CancelOnDrop,
}

/// Admits and queues a validated job.
pub fn submit(
    state: &AppState,
    request: crate::request::ValidRequest,
    concept: Arc<Concept>,
) -> Result<Submitted, ApiError> {
    let permit = state.admit()?;
    let (tx, rx) = mpsc::unbounded_channel();
    let cancel = CancelToken::new();
    let (seed, images) = (request.seed(), request.num_images());
    let job = GenerateJob {
        request,
        concept,
        updates: tx,
        cancel: cancel.clone(),
    };
    if !state.model.generate(job) {
        return Err(ApiError::unavailable("the model thread has stopped"));
    }
    Ok(Submitted {
        updates: rx,
        seed,
        images,
        deadline: Instant::now() + state.config.request_timeout,
        _permit: permit,
        _cancel: CancelOnDrop(cancel),
    })
}

impl Submitted {
    /// The next update, or 504 once the deadline passed (the job is then cancelled by drop).
    pub async fn next(&mut self, timeout: Duration) -> Result<Option<Update>, ApiError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.updates.recv()).await {
            Ok(update) => Ok(update),
            Err(_) => Err(ApiError::timeout(timeout.as_secs_f64())),
        }
    }

    /// Waits for the images.
    pub async fn finish(mut self, timeout: Duration) -> Result<Finished, ApiError> {
        loop {
            match self.next(timeout).await? {
                Some(Update::Done {
                    images,
                    attention_maps,
                    timings,
                }) => {
                    return Ok(Finished {
                        images,
                        attention_maps,
                        timings,
                    })
                }
                Some(Update::Failed(e)) => return Err(ApiError::from_engine(&e)),
                Some(Update::Cancelled) | None => {
                    return Err(ApiError::unavailable("the job was cancelled"))
                }
                Some(_) => {}
            }
        }
    }
}

/// The concept a generation names: a stored id, or an inline image encoded (and stored) now.
async fn request_concept(state: &AppState, body: &GenerateBody) -> Result<Arc<Concept>, ApiError> {
    match (&body.concept, &body.image) {
        (Some(id), None) => {
            if body.mask.is_some() {
                return Err(ApiError::bad_request(
                    "mask",
                    "a stored concept already holds its mask",
                ));
            }
            let id = validation::concept_id("concept", id)?;
            validation::stored_concept(state, id).await
        }
        (None, Some(image)) => {
            let image = validation::base64_field("image", image)?;
            let mask = body
                .mask
                .as_deref()
                .map(|m| validation::base64_field("mask", m))
                .transpose()?;
            Ok(validation::encode_upload(state, image, mask).await?.1)
        }
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "concept",
            "give a concept id or an image, not both",
        )),
        (None, None) => Err(ApiError::bad_request(
            "concept",
            "missing: give a concept id or an image",
        )),
    }
}

async fn generate(State(state): State<AppState>, request: Request) -> Response {
    let headers = request.headers().clone();
    let body = match validation::read_body(request.into_body(), state.config.max_body_bytes).await {
        Ok(body) => body,
        Err(e) => return e.into_response(),
    };
    match generate_inner(state, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn generate_inner(
    state: AppState,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let value: Value = validation::parse_json(&body)?;
    let (own, options) = validation::split_object(value, GENERATE_KEYS)?;
    let body: GenerateBody = validation::from_value(own, "")?;
    let options: Options = validation::from_value(options, "")?;
    let window = body.attention_window(&state)?;
    let wants_png = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("image/png"));
    if wants_png && window.is_some() && !body.stream {
        return Err(ApiError::bad_request(
            "attention_maps",
            "the maps come back in the JSON response: ask without `Accept: image/png`",
        ));
    }
    let request = options.validate(&state, body.prompt.clone(), window)?;
    let labels = window.map(|_| MapLabels {
        tokens: prompt_tokens(state.validator.tokenizer(), request.input_ids()),
        placeholder: request.request().placeholder.clone(),
    });
    let concept = request_concept(&state, &body).await?;
    let submitted = submit(&state, request, concept)?;
    let timeout = state.config.request_timeout;
    if body.stream {
        return Ok(stream(submitted, labels, timeout).into_response());
    }
    let (seed, count) = (submitted.seed, submitted.images);
    let finished = submitted.finish(timeout).await?;
    let timings = finished.timings;
    let encoded = encode_result(finished.images, finished.attention_maps, labels).await?;
    if wants_png && count == 1 {
        let png = encoded.pngs.into_iter().next().unwrap_or_default();
        return Ok((
            [
                (header::CONTENT_TYPE, "image/png".to_string()),
                (header::HeaderName::from_static("x-seed"), seed.to_string()),
            ],
            png,
        )
            .into_response());
    }
    Ok(Json(result_json(&encoded, seed, &timings)).into_response())
}

/// A job's result as PNG files: its images and, when it asked, its maps' pictures.
pub struct Encoded {
    pub pngs: Vec<Vec<u8>>,
    /// Per image, as JSON: `{"steps", "tokens": [{"index", "token", "png"}], "placeholder",
    /// "sheet"}` (PNGs in base64).
    pub attention_maps: Option<Vec<Value>>,
}

/// PNG-encodes a job's images (and renders its maps) off the async threads.
pub async fn encode_result(
    images: Vec<RgbImage>,
    maps: Option<AttentionMaps>,
    labels: Option<MapLabels>,
) -> Result<Encoded, ApiError> {
    let internal = |e: String| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e);
    tokio::task::spawn_blocking(move || {
        let pngs = images
            .iter()
            .map(png_bytes)
            .collect::<Result<Vec<_>, _>>()?;
        let attention_maps = match (&maps, &labels) {
            (Some(maps), Some(labels)) => Some(
                (0..images.len())
                    .map(|i| maps_json(&images[i], maps, i, labels))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            _ => None,
        };
        Ok::<_, String>(Encoded {
            pngs,
            attention_maps,
        })
    })
    .await
    .map_err(|e| internal(e.to_string()))?
    .map_err(internal)
}

fn png_bytes(image: &RgbImage) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// Image `i`'s map pictures as JSON (the same pictures `run --attention-maps` writes).
fn maps_json(
    picture: &RgbImage,
    maps: &AttentionMaps,
    i: usize,
    labels: &MapLabels,
) -> Result<Value, String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let pictures = heatmap::render(picture, maps, i, &labels.tokens, &labels.placeholder)
        .map_err(|e| e.to_string())?;
    let tokens = labels
        .tokens
        .iter()
        .zip(&pictures.tokens)
        .map(|(token, png)| {
            Ok(json!({
                "index": token.index,
                "token": token.text,
                "png": b64.encode(png_bytes(png)?),
            }))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(json!({
        "steps": [maps.first_step, maps.last_step],
        "tokens": tokens,
        "placeholder": b64.encode(png_bytes(&pictures.placeholder)?),
        "sheet": b64.encode(png_bytes(&pictures.sheet)?),
    }))
}

fn timings_json(t: &JobTimings) -> Value {
    let mut map = serde_json::Map::new();
    for stage in Stage::ALL {
        map.insert(stage.name().into(), json!(t.get(stage).as_secs_f64()));
    }
    map.insert("unet".into(), json!(t.batch.as_secs_f64()));
    map.insert("unet calls".into(), json!(t.unet_calls));
    Value::Object(map)
}

fn result_json(encoded: &Encoded, seed: u64, timings: &JobTimings) -> Value {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut result = json!({
        "images": encoded.pngs.iter().map(|p| b64.encode(p)).collect::<Vec<_>>(),
        "seed": seed,
        "timings": timings_json(timings),
    });
    if let Some(maps) = &encoded.attention_maps {
        result["attention_maps"] = Value::Array(maps.clone());
    }
    result
}

/// Server-Sent Events: `queued` (position), `started`, one `step` per denoising step, then
/// `done` (the images, base64 PNG) or `error`.
fn stream(
    submitted: Submitted,
    labels: Option<MapLabels>,
    timeout: Duration,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let start = Some((submitted, labels));
    let events = futures_util::stream::unfold(start, move |state| async move {
        let (mut submitted, mut labels) = state?;
        let (event, done) = match submitted.next(timeout).await {
            Ok(Some(Update::Queued { position })) => (
                Event::default()
                    .event("queued")
                    .json_data(json!({ "position": position })),
                false,
            ),
            Ok(Some(Update::Started { steps })) => (
                Event::default()
                    .event("started")
                    .json_data(json!({ "steps": steps })),
                false,
            ),
            Ok(Some(Update::Step { step, steps })) => (
                Event::default()
                    .event("step")
                    .json_data(json!({ "step": step, "steps": steps })),
                false,
            ),
            Ok(Some(Update::Done {
                images,
                attention_maps,
                timings,
            })) => {
                let seed = submitted.seed;
                let event = match encode_result(images, attention_maps, labels.take()).await {
                    Ok(encoded) => Event::default()
                        .event("done")
                        .json_data(result_json(&encoded, seed, &timings)),
                    Err(e) => error_event(&e),
                };
                (event, true)
            }
            Ok(Some(Update::Failed(e))) => (error_event(&ApiError::from_engine(&e)), true),
            Ok(Some(Update::Cancelled)) | Ok(None) => (
                error_event(&ApiError::unavailable("the job was cancelled")),
                true,
            ),
            Err(e) => (error_event(&e), true),
        };
        let event = event.unwrap_or_else(|e| Event::default().event("error").data(e.to_string()));
        Some((
            Ok(event),
            if done {
                None
            } else {
                Some((submitted, labels))
            },
        ))
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

fn error_event(e: &ApiError) -> Result<Event, axum::Error> {
    Event::default().event("error").json_data(json!({
        "error": e.message,
        "field": e.field,
        "status": e.status.as_u16(),
    }))
}
