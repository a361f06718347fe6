//! KServe's Open Inference Protocol v2 (REST), so the server drops into KServe / Seldon
//! deployments and works with the Triton client libraries.
//!
//! - `GET /v2`, `/v2/health/live`, `/v2/health/ready`, `/v2/models/{name}`,
//!   `/v2/models/{name}/ready`; the model's name is the bundle's.
//! - `POST /v2/models/{name}/infer`: inputs `prompt` (BYTES, one element), and `concept` (BYTES:
//!   a stored concept's id) or `image` (BYTES: an encoded image file) with an optional `mask`
//!   (BYTES); the options of the native API as request `parameters` (`steps`, `guidance`,
//!   `lambda`, `seed`, `height`, `width`, `n`, `placeholder`, `truncate`). Output `image`:
//!   UINT8 `[n, H, W, 3]`.
//! - Tensors in JSON (`data`; BYTES elements are strings — images as base64 there) or with the
//!   binary-data extension (`Inference-Header-Content-Length`: the JSON header, then each
//!   binary tensor in order; a BYTES tensor is each element as a 4-byte little-endian length
//!   and its bytes). The output is binary when the request asks (`binary_data` on the output,
//!   or `binary_data_output` in the parameters).

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::api::submit;
use super::error::ApiError;
use super::state::AppState;
use super::validation::{self, Options};

const HEADER_LENGTH: &str = "inference-header-content-length";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/infer", post(infer))
}

async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "elite-ort",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
}

async fn live() -> StatusCode {
    StatusCode::OK
}

async fn ready(State(state): State<AppState>) -> StatusCode {
    if state.ready.load(Ordering::SeqCst) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

fn check_model(state: &AppState, name: &str) -> Result<(), ApiError> {
    let ours = state.validator.bundle().name();
    if name == ours {
        Ok(())
    } else {
        Err(ApiError::not_found(
            "model",
            format!("unknown model {name:?}; this server serves {ours:?}"),
        ))
    }
}

async fn model_metadata(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_model(&state, &name)?;
    let bytes = |name: &str| json!({ "name": name, "datatype": "BYTES", "shape": [1] });
    Ok(Json(json!({
        "name": name,
        "versions": ["1"],
        "platform": "elite-ort",
        "inputs": [bytes("prompt"), bytes("image"), bytes("mask"), bytes("concept")],
        "outputs": [{ "name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, 3] }],
    })))
}

async fn model_ready(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    check_model(&state, &name)?;
    Ok(ready(State(state)).await)
}

#[derive(Deserialize)]
struct InferRequest {
    id: Option<String>,
    #[serde(default)]
    parameters: HashMap<String, Value>,
    inputs: Vec<InputTensor>,
    #[serde(default)]
    outputs: Vec<RequestedOutput>,
}

#[derive(Deserialize)]
struct InputTensor {
    name: String,
    datatype: String,
    shape: Vec<i64>,
    #[serde(default)]
    parameters: HashMap<String, Value>,
    data: Option<Value>,
}

#[derive(Deserialize)]
struct RequestedOutput {
    name: String,
    #[serde(default)]
    parameters: HashMap<String, Value>,
}

/// The request's JSON header and the binary tail (empty without the extension).
fn split_body<'a>(headers: &HeaderMap, body: &'a [u8]) -> Result<(&'a [u8], &'a [u8]), ApiError> {
    let Some(value) = headers.get(HEADER_LENGTH) else {
        return Ok((body, &[]));
    };
    let length: usize = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| {
            ApiError::bad_request("Inference-Header-Content-Length", "not a byte count")
        })?;
    if length > body.len() {
        return Err(ApiError::bad_request(
            "Inference-Header-Content-Length",
            format!("{length} is more than the body's {} bytes", body.len()),
        ));
    }
    Ok(body.split_at(length))
}

/// Each input's elements as bytes (exactly one element per input here).
fn input_bytes(
    request: &InferRequest,
    mut binary: &[u8],
) -> Result<HashMap<String, Vec<u8>>, ApiError> {
    let mut out = HashMap::new();
    for input in &request.inputs {
        let field = format!("inputs.{}", input.name);
        if input.datatype != "BYTES" {
            return Err(ApiError::bad_request(
                &field,
                format!("datatype must be BYTES, got {}", input.datatype),
            ));
        }
        if input.shape.iter().product::<i64>() != 1 {
            return Err(ApiError::bad_request(
                &field,
                format!("shape must hold one element, got {:?}", input.shape),
            ));
        }
        let bytes = match input.parameters.get("binary_data_size") {
            Some(size) => {
                let size = size
                    .as_u64()
                    .and_then(|s| usize::try_from(s).ok())
                    .filter(|&s| s <= binary.len())
                    .ok_or_else(|| {
                        ApiError::bad_request(&field, "binary_data_size exceeds the binary data")
                    })?;
                let (tensor, rest) = binary.split_at(size);
                binary = rest;
                bytes_element(&field, tensor)?
            }
            None => json_element(&field, &input.name, input.data.as_ref())?,
        };
        if out.insert(input.name.clone(), bytes).is_some() {
            return Err(ApiError::bad_request(&field, "given twice"));
        }
    }
    Ok(out)
}

/// A one-element BYTES tensor in binary form: a 4-byte little-endian length, then the bytes.
fn bytes_element(field: &str, tensor: &[u8]) -> Result<Vec<u8>, ApiError> {
    let bad = || ApiError::bad_request(field, "BYTES tensor must be one length-prefixed element");
    let (len, rest) = tensor.split_first_chunk::<4>().ok_or_else(bad)?;
    let len = u32::from_le_bytes(*len) as usize;
    if len != rest.len() {
        return Err(bad());
    }
    Ok(rest.to_vec())
}

/// A one-element BYTES tensor in JSON: a string (base64 for image files).
fn json_element(field: &str, name: &str, data: Option<&Value>) -> Result<Vec<u8>, ApiError> {
    let text = match data {
        Some(Value::Array(items)) if items.len() == 1 => items[0].as_str(),
        Some(Value::String(s)) => Some(s.as_str()),
        _ => None,
    }
    .ok_or_else(|| ApiError::bad_request(field, "data must be one string"))?;
    match name {
        "image" | "mask" => validation::base64_field(field, text),
        _ => Ok(text.as_bytes().to_vec()),
    }
}

fn utf8(field: &str, bytes: Vec<u8>) -> Result<String, ApiError> {
    String::from_utf8(bytes).map_err(|_| ApiError::bad_request(field, "not UTF-8 text"))
}

/// Request parameters into [`Options`] (strictly: unknown names refused).
fn options(parameters: &HashMap<String, Value>) -> Result<(Options, bool), ApiError> {
    let mut params = parameters.clone();
    let binary = params
        .remove("binary_data_output")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let object = Value::Object(params.into_iter().collect());
    let options: Options = validation::from_value(object, "parameters.")?;
    Ok((options, binary))
}

async fn infer(
    State(state): State<AppState>,
    Path(name): Path<String>,
    request: axum::extract::Request,
) -> Response {
    let headers = request.headers().clone();
    let body = match validation::read_body(request.into_body(), state.config.max_body_bytes).await {
        Ok(body) => body,
        Err(e) => return e.into_response(),
    };
    match infer_inner(state, name, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn infer_inner(
    state: AppState,
    name: String,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_model(&state, &name)?;
    let (header_json, binary) = split_body(&headers, &body)?;
    let request: InferRequest = validation::parse_json(header_json)?;
    let mut inputs = input_bytes(&request, binary)?;
    for name in inputs.keys() {
        if !["prompt", "image", "mask", "concept"].contains(&name.as_str()) {
            return Err(ApiError::bad_request(
                &format!("inputs.{name}"),
                "unknown input; expected prompt, image, mask or concept",
            ));
        }
    }
    let (options, binary_all) = options(&request.parameters)?;
    let binary_out = binary_all
        || request.outputs.iter().any(|o| {
            o.name == "image"
                && o.parameters
                    .get("binary_data")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false)
        });
    let prompt = inputs
        .remove("prompt")
        .ok_or_else(|| ApiError::bad_request("inputs.prompt", "missing"))?;
    let prompt = utf8("inputs.prompt", prompt)?;
    let valid = options.validate(&state, prompt, None)?;
    let concept = match (inputs.remove("concept"), inputs.remove("image")) {
        (Some(id), None) => {
            let id = utf8("inputs.concept", id)?;
            let id = validation::concept_id("inputs.concept", &id)?;
            validation::stored_concept(&state, id).await?
        }
        (None, Some(image)) => {
            validation::encode_upload(&state, image, inputs.remove("mask"))
                .await?
                .1
        }
        _ => {
            return Err(ApiError::bad_request(
                "inputs",
                "give exactly one of the inputs `concept` and `image`",
            ))
        }
    };
    let timeout = state.config.request_timeout;
    let images = submit(&state, valid, concept)?
        .finish(timeout)
        .await?
        .images;
    let (h, w) = images.first().map_or((0, 0), |i| (i.height(), i.width()));
    let shape = json!([images.len(), h, w, 3]);
    let raw: Vec<u8> = images
        .iter()
        .flat_map(|i| i.as_raw().iter().copied())
        .collect();
    let mut output = json!({ "name": "image", "datatype": "UINT8", "shape": shape });
    if binary_out {
        output["parameters"] = json!({ "binary_data_size": raw.len() });
    } else {
        output["data"] = json!(raw);
    }
    let response = json!({
        "model_name": name,
        "model_version": "1",
        "id": request.id.unwrap_or_default(),
        "outputs": [output],
    });
    let header_bytes = serde_json::to_vec(&response)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if !binary_out {
        return Ok((
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            header_bytes,
        )
            .into_response());
    }
    let length = header_bytes.len();
    let mut body = header_bytes;
    body.extend_from_slice(&raw);
    let mut response = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        )],
        body,
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&length.to_string()) {
        response.headers_mut().insert(HEADER_LENGTH, v);
    }
    Ok(response)
}
