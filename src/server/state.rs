//! What every handler shares: configuration, the model thread's handle, the validator, the
//! concept store, admission control and the server's lifecycle flags.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;
use super::model::{ModelHandle, ModelInfo};
use super::store::ConceptStore;
use super::ServerConfig;
use crate::request::Validator;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<ServerConfig>,
    pub model: ModelHandle,
    pub validator: Arc<Validator>,
    /// Whether the bundle's UNet gives attention maps.
    pub attention_maps: bool,
    pub store: Arc<ConceptStore>,
    /// The bearer token, when one is required.
    pub token: Option<Arc<[u8]>>,
    pub prometheus: metrics_exporter_prometheus::PrometheusHandle,
    /// Sessions loaded and warmed up, and not draining.
    pub ready: Arc<AtomicBool>,
    pub is_draining: Arc<AtomicBool>,
    pub draining: Arc<Notify>,
    /// One permit per job that may be admitted (queued or running).
    admission: Arc<Semaphore>,
}

impl AppState {
    pub fn new(
        config: ServerConfig,
        model: ModelHandle,
        info: ModelInfo,
        store: ConceptStore,
        token: Option<Vec<u8>>,
        prometheus: metrics_exporter_prometheus::PrometheusHandle,
    ) -> AppState {
        let queue = config.queue.max(1);
        AppState {
            config: Arc::new(config),
            model,
            validator: Arc::new(info.validator),
            attention_maps: info.attention_maps,
            store: Arc::new(store),
            token: token.map(Arc::from),
            prometheus,
            ready: Arc::new(AtomicBool::new(false)),
            is_draining: Arc::new(AtomicBool::new(false)),
            draining: Arc::new(Notify::new()),
            admission: Arc::new(Semaphore::new(queue)),
        }
    }

    /// A place in the queue, or 429 when it is full.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::queue_full(self.config.queue))
    }

    /// Jobs admitted and not yet answered.
    pub fn queued(&self) -> usize {
        self.config.queue.max(1) - self.admission.available_permits()
    }
}

/// New requests get 503 once the server drains (health and metrics still answer).
pub async fn refuse_while_draining(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    let exempt = path.starts_with("/v2/health") || path == "/metrics";
    if state.is_draining.load(Ordering::SeqCst) && !exempt {
        return ApiError::unavailable("the server is shutting down").into_response();
    }
    next.run(request).await
}

/// Request ids for the logs and the `x-request-id` header: a counter, unique per process.
#[derive(Clone, Default)]
pub struct RequestIds(Arc<AtomicU64>);

impl tower_http::request_id::MakeRequestId for RequestIds {
    fn make_request_id<B>(
        &mut self,
        _request: &axum::http::Request<B>,
    ) -> Option<tower_http::request_id::RequestId> {
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        axum::http::HeaderValue::from_str(&format!("req-{n}"))
            .ok()
            .map(tower_http::request_id::RequestId::new)
    }
}
