//! The policy server (`--policy-addr`, port 8090):
//!
//! - `GET /v1/policy/<tenant>`: the current bundle as JSON (404 until there is one).
//! - `GET /v1/policy/<tenant>/watch`: newline-delimited JSON, the current bundle first
//!   (as soon as there is one), then one line per new version; long-lived.
//! - `GET /v1/audit-key/<tenant>`: the tenant's audit DEKs ([`server_audit_key`]).
//! - `GET /v1/app-exit/<tenant>/<namespace>/<pod>`: held until the app of a
//!   run-to-completion pod has exited ([`super::app_exit`]); only for workloads of that
//!   namespace.
//! - `GET /debug/policy`: version, key count and left-out keys per tenant (over mTLS,
//!   only the caller's tenant).
//!
//! In the operator it runs over mTLS ([`server_tls`]): a client certificate from the
//! CA is required, and a workload may read only the tenant its certificate names
//! (`spiffe://<td>/tenant/<t>`); anything else is 403 with a JSON body. One exception,
//! on the audit-key endpoint only: the audit collector ([`PolicyApi::audit_collector`])
//! reads every tenant's keys, to encrypt the records it stores. Plain HTTP with no
//! tenant check ([`Access::Open`]) exists for debugging and tests only.
//!
//! [`server_audit_key`]: super::server_audit_key
//! [`server_tls`]: super::server_tls

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::StreamBody;
use hyper::body::{Frame, Incoming};
use portcullis_api::names::is_dns_subdomain;
use portcullis_api::policy::PolicyPath;
use portcullis_api::spiffe::TrustDomain;
use portcullis_crds::PolicyBundle;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::PolicyHub;
use super::app_exit::AppExits;
use super::server_audit_key::{AuditKeys, denial};
use super::server_tls::{client_namespace, client_tenant, is_audit_collector};
use portcullis_server::{self as serve, Body, ConnectionLimits, PeerCertificates};

/// Content type of the watch stream.
pub const NDJSON: &str = "application/x-ndjson";

/// Who may read which tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone may read any tenant (plain-HTTP debugging, `--policy-insecure-debug`).
    Open,
    /// A client certificate is required and may read only the tenant its
    /// `spiffe://<trust domain>/tenant/<t>` URI SAN names.
    TenantCertificate(TrustDomain),
}

/// What the policy server serves, and to whom.
#[derive(Clone, Debug)]
pub struct PolicyApi {
    /// The bundles.
    pub hub: Arc<PolicyHub>,
    /// The tenant check.
    pub access: Access,
    /// The audit-key endpoint; `None`: 404.
    pub audit_keys: Option<AuditKeys>,
    /// The DNS name (`<audit service>.<operator namespace>.svc`) of the audit
    /// collector, which may read every tenant's audit keys (and nothing else) with a
    /// CA certificate naming it and no SPIFFE id; `None`: no one is the collector.
    pub audit_collector: Option<String>,
    /// The app-exit endpoint for run-to-completion pods; `None`: 404.
    pub app_exits: Option<AppExits>,
}

impl PolicyApi {
    /// Bundles from `hub` for anyone, no audit keys (debugging and tests).
    pub fn open(hub: Arc<PolicyHub>) -> Self {
        Self {
            hub,
            access: Access::Open,
            audit_keys: None,
            audit_collector: None,
            app_exits: None,
        }
    }
}

/// Serves the policy API of `hub` on `listener` to anyone until `shutdown` (see
/// [`serve_api`] for the tenant check the operator uses).
pub async fn serve(
    listener: TcpListener,
    hub: Arc<PolicyHub>,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) {
    serve_api(listener, PolicyApi::open(hub), tls, shutdown).await;
}

/// Serves `api` on `listener` until `shutdown`; TLS when `tls` is given (with
/// [`Access::TenantCertificate`] it must require client certificates).
pub async fn serve_api(
    listener: TcpListener,
    api: PolicyApi,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) {
    serve_api_with(listener, api, tls, ConnectionLimits::default(), shutdown).await;
}

/// [`serve_api`] within `limits`.
pub async fn serve_api_with(
    listener: TcpListener,
    api: PolicyApi,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) {
    let api = Arc::new(api);
    let streams_end = shutdown.clone();
    serve::serve_with(
        listener,
        tls.map(Into::into),
        move |req| {
            let api = api.clone();
            let streams_end = streams_end.clone();
            async move { route(&api, &req, streams_end).await }
        },
        limits,
        shutdown,
    )
    .await;
}

/// The caller's verdict for `tenant`: `Ok` or the denial to send.
fn authorize(
    api: &PolicyApi,
    req: &Request<Incoming>,
    tenant: &str,
) -> Result<(), Box<Response<Body>>> {
    let Access::TenantCertificate(trust_domain) = &api.access else {
        return Ok(());
    };
    let Some(PeerCertificates(chain)) = req.extensions().get::<PeerCertificates>() else {
        return Err(Box::new(denial(
            StatusCode::UNAUTHORIZED,
            "a client certificate from the Portcullis CA is required",
            "NoClientCertificate",
        )));
    };
    match client_tenant(chain, trust_domain) {
        Some(own) if own == tenant => Ok(()),
        Some(own) => {
            tracing::info!(client_tenant = %own, asked = %tenant, path = %req.uri().path(), "policy server refused a workload of another tenant");
            Err(Box::new(denial(
                StatusCode::FORBIDDEN,
                &format!("a workload of tenant {own:?} may not read tenant {tenant:?}"),
                "WrongTenant",
            )))
        }
        None => {
            tracing::info!(asked = %tenant, path = %req.uri().path(), "policy server refused a client certificate that names no tenant");
            Err(Box::new(denial(
                StatusCode::FORBIDDEN,
                &format!("the client certificate names no tenant of trust domain {trust_domain}"),
                "NoTenant",
            )))
        }
    }
}

/// [`authorize`] for the audit keys of `tenant`, which the audit collector may also
/// read: a CA certificate (verified in the handshake) with no SPIFFE id whose DNS SANs
/// name the collector. Workload leaves carry the DNS names of the Services selecting
/// their pod, so a DNS name alone never makes a workload the collector.
fn authorize_audit_key(
    api: &PolicyApi,
    req: &Request<Incoming>,
    tenant: &str,
) -> Result<(), Box<Response<Body>>> {
    if let (Access::TenantCertificate(_), Some(collector)) = (&api.access, &api.audit_collector)
        && let Some(PeerCertificates(chain)) = req.extensions().get::<PeerCertificates>()
        && is_audit_collector(chain, collector)
    {
        tracing::debug!(%tenant, %collector, "audit collector reads a tenant's audit keys");
        return Ok(());
    }
    authorize(api, req, tenant)
}

async fn route(
    api: &PolicyApi,
    req: &Request<Incoming>,
    shutdown: CancellationToken,
) -> Response<Body> {
    if req.method() != Method::GET {
        return serve::error(StatusCode::METHOD_NOT_ALLOWED, "only GET is served");
    }
    let path = req.uri().path();
    if path == "/debug/policy" {
        let mut summary = api.hub.summary();
        if let Access::TenantCertificate(trust_domain) = &api.access {
            let own = req
                .extensions()
                .get::<PeerCertificates>()
                .and_then(|PeerCertificates(chain)| client_tenant(chain, trust_domain));
            summary.retain(|tenant, _| own.as_deref() == Some(tenant.as_str()));
        }
        return match serde_json::to_vec_pretty(&summary) {
            Ok(body) => serve::full(StatusCode::OK, "application/json", body),
            Err(e) => serve::error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        };
    }
    if path.starts_with(portcullis_api::app_exit::APP_EXIT_PREFIX) {
        return app_exit(api, req, shutdown).await;
    }
    if let Some(tenant) = portcullis_api::audit_key::parse_path(path) {
        if !is_dns_subdomain(tenant) {
            return serve::error(StatusCode::NOT_FOUND, "no such endpoint");
        }
        if let Err(denied) = authorize_audit_key(api, req, tenant) {
            return *denied;
        }
        return match &api.audit_keys {
            Some(keys) => keys.answer(tenant).await,
            None => denial(
                StatusCode::NOT_FOUND,
                "audit keys are not served here",
                "NotServed",
            ),
        };
    }
    let Some(PolicyPath { tenant, watch }) = portcullis_api::policy::parse_path(path) else {
        return serve::error(StatusCode::NOT_FOUND, "no such endpoint");
    };
    if !is_dns_subdomain(tenant) {
        return serve::error(StatusCode::NOT_FOUND, "no such endpoint");
    }
    if let Err(denied) = authorize(api, req, tenant) {
        return *denied;
    }
    let hub = &api.hub;
    if watch {
        let lines = watch_lines(hub.subscribe(tenant), shutdown);
        let body = StreamBody::new(lines.map(|line| Ok::<_, Infallible>(Frame::data(line))));
        let mut response = Response::new(serve::boxed(body));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(NDJSON),
        );
        return response;
    }
    match hub.current(tenant) {
        Some(bundle) => match serde_json::to_vec(&*bundle) {
            Ok(body) => serve::full(StatusCode::OK, "application/json", body),
            Err(e) => serve::error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        },
        None => serve::error(
            StatusCode::NOT_FOUND,
            &format!("no policy for tenant {tenant:?}"),
        ),
    }
}

/// `GET /v1/app-exit/<tenant>/<namespace>/<pod>`: the tenant check, then the caller's
/// own namespace only, then the held answer.
async fn app_exit(
    api: &PolicyApi,
    req: &Request<Incoming>,
    shutdown: CancellationToken,
) -> Response<Body> {
    let Some((tenant, namespace, pod)) = portcullis_api::app_exit::parse_path(req.uri().path())
    else {
        return serve::error(StatusCode::NOT_FOUND, "no such endpoint");
    };
    if let Err(denied) = authorize(api, req, tenant) {
        return *denied;
    }
    if let Access::TenantCertificate(trust_domain) = &api.access {
        let own = req
            .extensions()
            .get::<PeerCertificates>()
            .and_then(|PeerCertificates(chain)| client_namespace(chain, trust_domain));
        if own.as_deref() != Some(namespace) {
            return denial(
                StatusCode::FORBIDDEN,
                &format!(
                    "a workload may ask only about pods of its own namespace, not {namespace:?}"
                ),
                "WrongNamespace",
            );
        }
    }
    let Some(exits) = &api.app_exits else {
        return denial(
            StatusCode::NOT_FOUND,
            "app exits are not served here",
            "NotServed",
        );
    };
    let hold = std::time::Duration::from_secs(portcullis_api::app_exit::HOLD_SECONDS);
    let answer = exits.answer(namespace, pod, hold, &shutdown).await;
    if answer.apps_exited {
        tracing::info!(%namespace, %pod, "the app of a run-to-completion pod exited; its proxy may go");
    }
    match serde_json::to_vec(&answer) {
        Ok(body) => serve::full(StatusCode::OK, "application/json", body),
        Err(e) => serve::error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// One JSON line per bundle version: the current one first, then each change, until
/// the hub or the server goes away.
pub fn watch_lines(
    rx: watch::Receiver<Option<Arc<PolicyBundle>>>,
    shutdown: CancellationToken,
) -> impl futures::Stream<Item = Bytes> + Send + 'static {
    futures::stream::unfold(
        (rx, shutdown, true),
        |(mut rx, shutdown, first)| async move {
            let mut first = first;
            loop {
                if !first {
                    tokio::select! {
                        changed = rx.changed() => if changed.is_err() { return None },
                        _ = shutdown.cancelled() => return None,
                    }
                }
                first = false;
                let current = rx.borrow_and_update().clone();
                if let Some(bundle) = current {
                    let mut line = serde_json::to_vec(&*bundle).ok()?;
                    line.push(b'\n');
                    return Some((Bytes::from(line), (rx, shutdown, false)));
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::Timestamp;

    #[tokio::test]
    async fn watch_sends_current_bundle_then_each_change() {
        let hub = PolicyHub::default();
        let shutdown = CancellationToken::new();
        let lines = watch_lines(hub.subscribe("acme"), shutdown.clone());
        futures::pin_mut!(lines);
        let bundle = |classification| PolicyBundle {
            tenant: "acme".into(),
            classification,
            ..PolicyBundle::default()
        };
        hub.publish(
            bundle(portcullis_crds::DataClassification::Internal),
            Vec::new(),
            Timestamp::now(),
        );
        let first = lines.next().await.unwrap_or_default();
        let parsed: PolicyBundle = serde_json::from_slice(&first).unwrap_or_default();
        assert_eq!(parsed.tenant, "acme");
        assert!(first.ends_with(b"\n"));
        hub.publish(
            bundle(portcullis_crds::DataClassification::Restricted),
            Vec::new(),
            Timestamp::now(),
        );
        let second: PolicyBundle =
            serde_json::from_slice(&lines.next().await.unwrap_or_default()).unwrap_or_default();
        assert!(second.version > parsed.version);
        assert_eq!(
            second.classification,
            portcullis_crds::DataClassification::Restricted
        );
        shutdown.cancel();
        assert!(lines.next().await.is_none(), "the stream ends on shutdown");
    }
}
