//! The HTTP endpoint for operators: Prometheus metrics and Kubernetes-style
//! probes.
//!
//! - `GET /metrics`: Prometheus text format.
//! - `GET /health`: 200 while the process runs (liveness).
//! - `GET /ready`: 200 when the pipeline is snapshotting or streaming and
//!   making progress; 503 with the reason when it is starting, stopped,
//!   failed, or stalled longer than `http.stall_timeout_secs` (readiness).

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde_json::json;

use crate::telemetry::{health, metrics};

/// The routes, for a server or a test.
pub fn router(stall_timeout: Duration) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|| async {
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    metrics().render(),
                )
            }),
        )
        .route(
            "/health",
            get(|| async { axum::Json(json!({"status": "alive"})) }),
        )
        .route(
            "/ready",
            get(move || async move {
                match health().ready(stall_timeout) {
                    Ok(phase) => (
                        StatusCode::OK,
                        axum::Json(json!({"ready": true, "phase": phase})),
                    )
                        .into_response(),
                    Err(reason) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        axum::Json(json!({"ready": false, "reason": reason})),
                    )
                        .into_response(),
                }
            }),
        )
}

/// Binds `listen` and serves until the process ends.
pub async fn serve(listen: SocketAddr, stall_timeout: Duration) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(address = %listen, "serving /metrics, /health and /ready");
    axum::serve(listener, router(stall_timeout)).await
}
