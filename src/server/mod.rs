//! `elite-ort serve`: an HTTP inference server on top of the engine.
//!
//! Shaped like text-generation-inference's router: requests are validated into typed jobs on
//! the HTTP side ([`validation`]) before anything is queued; admission is bounded (a full queue
//! answers 429); one model thread owns the [`Engine`](crate::engine::Engine) and nobody else
//! touches it ([`model`]): between ticks it admits new jobs, each tick runs one batched step, and
//! every job gets its own progress and result back over its channel; a job whose client went
//! away is dropped at its next step. Routes only map HTTP to these calls: the native JSON API
//! ([`api`]) and KServe's Open Inference Protocol v2 ([`kserve`]). Concepts live in a
//! content-addressed store on disk ([`store`]); metrics are recorded where events happen
//! ([`metrics`]).

pub mod api;
pub mod auth;
pub mod error;
pub mod kserve;
pub mod metrics;
pub mod model;
pub mod state;
pub mod store;
pub mod validation;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;

use crate::engine::EngineConfig;
pub use state::AppState;

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub bundle: PathBuf,
    pub engine: EngineConfig,
    /// Address to bind; the default is loopback only.
    pub listen: SocketAddr,
    /// Most jobs admitted (queued or running) at once; more are answered 429.
    pub queue: usize,
    /// Concept store directory.
    pub concept_dir: PathBuf,
    /// A file holding the bearer token every route but `/v2/health/*` requires.
    pub auth_token_file: Option<PathBuf>,
    /// Per-request deadline (504 and the job cancelled after it).
    pub request_timeout: Duration,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    pub drain_timeout: Duration,
    /// Largest request body, checked before it is read into memory.
    pub max_body_bytes: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Engine(#[from] crate::error::Error),
    #[error("{path}: cannot read the auth token file: {message}")]
    AuthToken { path: PathBuf, message: String },
    #[error("concept store {path}: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("server failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Startup(String),
}

/// Runs the server until SIGTERM/SIGINT, then drains: readiness goes false, new requests get
/// 503, in-flight requests finish (for at most `drain_timeout`), and it returns Ok.
pub async fn serve(config: ServerConfig) -> Result<(), ServerError> {
    let start = Instant::now();
    let token = auth::read_token(config.auth_token_file.as_deref())?;
    let prometheus = metrics::install();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr()?;
    // The first line on stdout: tests and scripts read the bound port (for `--listen :0`).
    println!("listening on http://{addr}");
    tracing::info!(%addr, "listening; loading the model");

    let (model, info) = model::spawn(&config).await?;
    let store = store::ConceptStore::open(&config.concept_dir, info.validator.bundle()).map_err(
        |source| ServerError::Store {
            path: config.concept_dir.clone(),
            source,
        },
    )?;
    let state = AppState::new(config.clone(), model, info, store, token, prometheus);
    state.ready.store(true, Ordering::SeqCst);
    tracing::info!(
        seconds = start.elapsed().as_secs_f64(),
        "ready: sessions loaded and warmed up"
    );
    println!("ready after {:.2} s", start.elapsed().as_secs_f64());

    let app = router(state.clone());
    let shutdown = shutdown_signal(state.clone());
    let server = axum::serve(listener, app.into_make_service()).with_graceful_shutdown(shutdown);
    let drain = state.config.drain_timeout;
    let draining = state.draining.clone();
    tokio::select! {
        result = server => result?,
        () = async move {
            draining.notified().await;
            tokio::time::sleep(drain).await;
        } => tracing::warn!("drain timeout: closing the remaining connections"),
    }
    state.model.shutdown();
    tracing::info!("stopped");
    Ok(())
}

/// Every route, with the layers in the order they apply.
pub fn router(state: AppState) -> Router {
    let limit = state.config.max_body_bytes;
    Router::new()
        .merge(api::routes())
        .merge(kserve::routes())
        .route("/metrics", axum::routing::get(metrics::render))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            state::refuse_while_draining,
        ))
        .layer(axum::middleware::from_fn(metrics::track_requests))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .layer(tower_http::trace::TraceLayer::new_for_http().make_span_with(
            |req: &axum::http::Request<_>| {
                let id = req
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::info_span!("request", id, method = %req.method(), path = req.uri().path())
            },
        ))
        .layer(tower_http::request_id::PropagateRequestIdLayer::x_request_id())
        .layer(tower_http::request_id::SetRequestIdLayer::x_request_id(
            state::RequestIds::default(),
        ))
        .with_state(state)
}

/// Resolves on the first SIGTERM or SIGINT, after marking the server as draining.
async fn shutdown_signal(state: AppState) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal: draining in-flight requests");
    state.ready.store(false, Ordering::SeqCst);
    state.is_draining.store(true, Ordering::SeqCst);
    state.draining.notify_waiters();
    Arc::clone(&state.draining).notify_one();
}
