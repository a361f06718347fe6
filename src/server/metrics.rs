//! Prometheus metrics, recorded where each event happens (`metrics` facade, rendered by
//! `metrics-exporter-prometheus` at `GET /metrics`).
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `elite_requests_total` | counter | `route`, `status` |
//! | `elite_request_duration_seconds` | histogram | `route` |
//! | `elite_queue_depth` | gauge (jobs admitted, not yet answered) | |
//! | `elite_active_jobs`, `elite_active_rows` | gauge (in the engine; rows per step) | |
//! | `elite_unet_batch_rows` | histogram (rows per UNet call) | |
//! | `elite_unet_call_seconds` | histogram | |
//! | `elite_job_stage_seconds` | histogram | `stage` (queue, encode text, denoise, decode) |
//! | `elite_job_seconds` | histogram (end to end, submission to result) | |
//! | `elite_jobs_total` | counter | `outcome` (done, failed, cancelled) |
//! | `elite_concepts`, `elite_concept_store_bytes` | gauge | |

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::state::AppState;

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 600.0,
];
const ROW_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 128.0,
];

/// Installs the process's metrics recorder (once; later calls reuse it).
pub fn install() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full("elite_unet_batch_rows".into()), ROW_BUCKETS)
                .and_then(|b| b.set_buckets(LATENCY_BUCKETS));
            match builder.and_then(|b| b.install_recorder()) {
                Ok(handle) => handle,
                // Another recorder is installed (only possible in tests): render nothing.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

pub async fn render(State(state): State<AppState>) -> impl IntoResponse {
    metrics::gauge!("elite_queue_depth").set(state.queued() as f64);
    let (count, bytes) = state.store.usage();
    metrics::gauge!("elite_concepts").set(count as f64);
    metrics::gauge!("elite_concept_store_bytes").set(bytes as f64);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.prometheus.render(),
    )
}

/// Counts every request by route (the matched pattern, never the raw path: ids would make the
/// label set unbounded) and status, and times it.
pub async fn track_requests(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let start = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("elite_requests_total", "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("elite_request_duration_seconds", "route" => route)
        .record(start.elapsed().as_secs_f64());
    response
}
