//! The admin server (port 4191, plain HTTP/1.1, bounded like every listener: a
//! connection cap, a per-source cap, a header read timeout and an idle timeout):
//! `/live` (the process answers),
//! `/ready` (a certificate, a policy and the audit trail are in place; the state of a
//! bring-your-own serving certificate is detail only), `/metrics`
//! (Prometheus), `/identity` (the certificate chain the proxy presents, PEM, public
//! material only; `kubectl portcullis identity inspect --admin-url`), and the app's
//! own probes run on the kubelet's behalf ([`app_health`]).

use portcullis_api::injection::{ADMIN_IDENTITY_PATH, ADMIN_LIVE_PATH, ADMIN_READY_PATH};
use std::{convert::Infallible, sync::Arc, time::Duration};

use http::{Method, Request, Response, StatusCode, header};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub mod app_health;

use app_health::AppHealth;

use crate::{
    audit::AuditReadiness,
    listener::{
        accept::{Bounds, PerSource, accept_loop},
        body::{ProxyBody, full},
        idle::{self, Activity},
    },
    metrics::Metrics,
    policy::PolicyStore,
    tls::serving_certificate::ServingCertificate,
};

/// What `/ready` checks.
#[derive(Clone)]
pub struct Readiness {
    /// The policy store.
    pub policy: PolicyStore,
    /// Whether a serving certificate is loaded.
    pub certificate: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Whether the audit trail takes records, and if not why.
    pub audit: Arc<dyn Fn() -> AuditReadiness + Send + Sync>,
    /// The certificate chain presented, as PEM (`None` before the first one).
    pub identity: Arc<dyn Fn() -> Option<String> + Send + Sync>,
    /// The app's own probes, answered at `/app-health/...` (empty outside a cluster).
    pub app_health: Arc<AppHealth>,
    /// The bring-your-own serving certificate, when the pod names one: reported in
    /// `/ready`'s detail, never a reason to be unready.
    pub serving_certificate: Option<ServingCertificate>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<ProxyBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

fn route(
    request: &Request<Incoming>,
    readiness: &Readiness,
    metrics: &Metrics,
) -> Response<ProxyBody> {
    if request.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".into(),
        );
    }
    match request.uri().path() {
        ADMIN_LIVE_PATH => text(StatusCode::OK, "text/plain", "live\n".into()),
        ADMIN_READY_PATH => {
            let policy = readiness.policy.load().map(|b| b.version);
            let certificate = (readiness.certificate)();
            let audit_state = (readiness.audit)();
            let audit = audit_state == AuditReadiness::Ready;
            let ready = policy.is_some() && certificate && audit;
            let mut body = serde_json::json!({"ready": ready, "policyVersion": policy, "certificate": certificate, "audit": audit});
            if !audit {
                body["auditReason"] = audit_state.as_str().into();
            }
            if let Some(serving) = &readiness.serving_certificate {
                body["servingCertificate"] = serving.status_json();
            }
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, "application/json", format!("{body}\n"))
        }
        "/metrics" => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        ADMIN_IDENTITY_PATH => match (readiness.identity)() {
            Some(pem) => text(StatusCode::OK, "application/x-pem-file", pem),
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "no workload certificate yet; see the proxy's logs (identity renewal)\n".into(),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /live, /ready, /metrics or /identity\n".into(),
        ),
    }
}

/// Runs one of the app's probes (`/app-health/<container>/<kind>`).
async fn app_probe_response(health: &AppHealth, path: &str) -> Response<ProxyBody> {
    match health.check(path).await {
        Some(outcome) => text(
            outcome.status,
            "text/plain",
            format!("{}\n", outcome.detail),
        ),
        None => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "no such probe\n".into(),
        ),
    }
}

/// Open admin connections at most (probes and scrapes need a handful).
pub const MAX_CONNECTIONS: usize = 128;
/// Open admin connections from one source at most, so a flood from one address
/// cannot crowd out the kubelet's probes.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 16;
/// Time to send a request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection with no request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves the admin endpoints until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    readiness: Readiness,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let bounds = Bounds {
        name: "admin",
        max_connections: MAX_CONNECTIONS,
        per_source: Some(PerSource {
            cap: MAX_CONNECTIONS_PER_SOURCE,
            exempt: Vec::new(),
            refusal: "admin_per_source_limit",
        }),
        // Probes and scrapes are not drained: the process is going away.
        drain_timeout: Duration::ZERO,
    };
    let serve = {
        let (metrics, shutdown) = (metrics.clone(), shutdown.clone());
        move |tcp, _peer| {
            serve_connection(tcp, readiness.clone(), metrics.clone(), shutdown.clone())
        }
    };
    accept_loop(listener, bounds, metrics, shutdown, serve).await;
}

async fn serve_connection(
    tcp: TcpStream,
    readiness: Readiness,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let activity = Activity::new();
    let service = service_fn({
        let activity = activity.clone();
        move |request: Request<Incoming>| {
            let in_flight = activity.request_started();
            let path = request.uri().path().to_owned();
            // The app's probes are answered after a check of the app; everything else now.
            let answered = (request.method() != Method::GET || !readiness.app_health.knows(&path))
                .then(|| route(&request, &readiness, &metrics));
            let health = readiness.app_health.clone();
            async move {
                let _in_flight = in_flight;
                let response = match answered {
                    Some(response) => response,
                    None => app_probe_response(&health, &path).await,
                };
                Ok::<_, Infallible>(response)
            }
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(tcp), service);
    let closing = idle::close_signal(&activity, IDLE_TIMEOUT, &shutdown, idle::GOODBYE);
    let _ = idle::serve_until_closed!(connection, closing);
}
