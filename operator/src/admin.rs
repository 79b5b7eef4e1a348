//! The admin endpoint (`--metrics-addr`, default 0.0.0.0:8080): `/metrics`,
//! `/healthz` (the process serves), `/readyz` (caches synced, so policy is being
//! served), `/debug/diagnostics` (leadership, last reconcile).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::RwLock;
use tokio_util::sync::CancellationToken;

use crate::context::Diagnostics;
use crate::metrics::Metrics;
use portcullis_server::{self as serve, Body};

/// What the admin endpoint reads.
#[derive(Clone)]
pub struct AdminState {
    /// Metrics to encode.
    pub metrics: Arc<Metrics>,
    /// Diagnostics to show.
    pub diagnostics: Arc<RwLock<Diagnostics>>,
    /// Set once the caches have synced.
    pub ready: Arc<AtomicBool>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

/// Serves the admin endpoint until `shutdown`.
pub async fn serve(listener: TcpListener, state: AdminState, shutdown: CancellationToken) {
    serve::serve(
        listener,
        None,
        move |req| {
            let state = state.clone();
            async move { route(&state, &req).await }
        },
        shutdown,
    )
    .await;
}

async fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Body> {
    match req.uri().path() {
        "/metrics" => serve::full(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics.encode(),
        ),
        "/healthz" => serve::full(StatusCode::OK, "text/plain", "ok"),
        "/readyz" if state.ready.load(Ordering::Relaxed) => {
            serve::full(StatusCode::OK, "text/plain", "ok")
        }
        "/readyz" => serve::full(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "caches not synced",
        ),
        "/debug/diagnostics" => {
            let diagnostics = state.diagnostics.read().await.clone();
            match serde_json::to_vec_pretty(&diagnostics) {
                Ok(body) => serve::full(StatusCode::OK, "application/json", body),
                Err(e) => serve::error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        }
        _ => serve::error(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}
