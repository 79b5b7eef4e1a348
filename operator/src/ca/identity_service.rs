//! The identity service: `POST /v1/certificate` over HTTPS (TLS 1.3 only).
//!
//! A request carries a CSR and a projected ServiceAccount token. The token decides the
//! identity ([`authenticate`]); the CSR only contributes its public key
//! ([`validate_csr`]); the CA signs ([`CertificateAuthority::issue`]).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use portcullis_api::identity::CERTIFICATE_PATH;
use portcullis_api::identity::{ErrorBody, IssueRequest, IssueResponse, RefusalReason};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::CaError;
use super::authenticator::{Refusal, WorkloadAuthenticator, authenticate};
use super::authority::CertificateAuthority;
use super::csr::validate_csr;
use super::issued::{IssuedLeaf, LeafLedger};
use super::metrics::IdentityMetrics;
use super::service_names::{self, DEFAULT_CLUSTER_DOMAIN};
use super::serving::{CaServingCertificate, service_names as operator_names};
use portcullis_server::{self as serve, ConnectionLimits};

/// The operator's Service (the chart's default release name).
pub const DEFAULT_SERVICE: &str = "portcullis-operator";
/// The operator's namespace when `POD_NAMESPACE` is not set.
pub const DEFAULT_NAMESPACE: &str = "portcullis-system";

/// Where and as whom the identity service listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityServiceConfig {
    /// Listen address (0.0.0.0:8443).
    pub listen: SocketAddr,
    /// DNS names (or IPs) in the service's certificate: the Service name(s) sidecars use
    /// (default `portcullis-operator.portcullis-system.svc[.cluster.local]`; see
    /// [`operator_names`]).
    pub server_names: Vec<String>,
    /// Largest accepted request body (64 KiB).
    pub max_body_bytes: usize,
    /// Handshake, header, idle and keep-alive time, connection caps, drain.
    pub limits: ConnectionLimits,
}

impl Default for IdentityServiceConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            server_names: operator_names(
                DEFAULT_SERVICE,
                DEFAULT_NAMESPACE,
                DEFAULT_CLUSTER_DOMAIN,
                &[],
            ),
            max_body_bytes: 64 * 1024,
            limits: ConnectionLimits::default(),
        }
    }
}

/// The serial of a PEM leaf, as the policy bundle lists revoked ones.
fn leaf_serial(pem: &str) -> Option<String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    portcullis_tls::leaf_facts(&der)
        .ok()
        .map(|facts| facts.serial)
}

/// The HTTP status for each refusal reason.
pub fn status_for(reason: RefusalReason) -> StatusCode {
    use RefusalReason::*;
    match reason {
        TokenInvalid | WrongAudience => StatusCode::UNAUTHORIZED,
        TokenNotBoundToPod | PodNotFound | PodMismatch | ServiceAccountMismatch | NoTenant => {
            StatusCode::FORBIDDEN
        }
        CsrInvalid | CsrHasCaFlag | CsrExtraSans | CsrWrongIdentity | UnsupportedKey
        | MalformedRequest => StatusCode::BAD_REQUEST,
        NotFound => StatusCode::NOT_FOUND,
        Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Issues workload certificates to authenticated pods.
pub struct IdentityService {
    ca: Arc<CertificateAuthority>,
    authenticator: Arc<dyn WorkloadAuthenticator>,
    metrics: IdentityMetrics,
    ledger: Option<Arc<dyn LeafLedger>>,
    cluster_domain: String,
}

impl std::fmt::Debug for IdentityService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityService")
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

impl IdentityService {
    /// A service signing with `ca`, authenticating through `authenticator`.
    pub fn new(
        ca: Arc<CertificateAuthority>,
        authenticator: Arc<dyn WorkloadAuthenticator>,
        metrics: IdentityMetrics,
    ) -> Self {
        metrics.set_ca_expiry(ca.expiry());
        Self {
            ca,
            authenticator,
            metrics,
            ledger: None,
            cluster_domain: DEFAULT_CLUSTER_DOMAIN.to_owned(),
        }
    }

    /// The cluster domain of the long Service names (`cluster.local` by default).
    pub fn with_cluster_domain(mut self, domain: impl Into<String>) -> Self {
        self.cluster_domain = domain.into();
        self
    }

    /// Records every issued leaf in `ledger` (and refuses to hand out one it could not
    /// record), so the leaf is revoked when its pod is deleted.
    pub fn with_ledger(mut self, ledger: Arc<dyn LeafLedger>) -> Self {
        self.ledger = Some(ledger);
        self
    }

    /// Decides one request (no transport): authenticate, validate, sign; counts the
    /// outcome in the metrics.
    pub async fn handle(&self, request: &IssueRequest) -> Result<IssueResponse, Refusal> {
        let result = self.decide(request).await;
        match &result {
            Ok(_) => self.metrics.issued(),
            Err(refusal) => {
                self.metrics.refused(refusal.reason);
                tracing::info!(reason = %refusal.reason, message = %refusal.message, "certificate request refused");
            }
        }
        result
    }

    async fn decide(&self, request: &IssueRequest) -> Result<IssueResponse, Refusal> {
        let who = authenticate(
            &*self.authenticator,
            &self.ca.settings().trust_domain,
            &request.token,
        )
        .await?;
        let csr = validate_csr(&request.csr, &who.workload)
            .map_err(|e| Refusal::new(e.reason(), e.to_string()))?;
        // The names come from the API, never from the CSR: the Services that select
        // the pod now.
        let namespace = who.workload.namespace();
        let services = self.authenticator.services(namespace).await?;
        let dns_names =
            service_names::dns_names(&who.pod_labels, namespace, &services, &self.cluster_domain);
        let mut issued = self
            .ca
            .issue_named(&csr, &who.workload, &who.tenant, &dns_names)
            .map_err(|e| {
                tracing::error!(error = %e, "signing a workload certificate failed");
                Refusal::new(RefusalReason::Internal, "signing failed")
            })?;
        if let Some(ledger) = &self.ledger {
            let serial = leaf_serial(&issued.certificate).ok_or_else(|| {
                Refusal::new(
                    RefusalReason::Internal,
                    "the issued certificate is unreadable",
                )
            })?;
            let leaf = IssuedLeaf {
                pod_uid: who.pod_uid.clone(),
                pod: format!("{}/{}", who.workload.namespace(), who.pod_name),
                spiffe_id: who.workload.to_string(),
                issued_at: jiff::Timestamp::now(),
                not_after: issued.expires_at,
            };
            ledger
                .record(who.tenant.tenant(), &serial, &leaf)
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "recording an issued certificate failed");
                    Refusal::new(
                        RefusalReason::Unavailable,
                        "the certificate could not be recorded for revocation; retry shortly",
                    )
                })?;
        }
        issued.names_revision = Some(service_names::revision(&services));
        tracing::info!(
            workload = %who.workload, tenant = %who.tenant.tenant(), pod = %who.pod_name,
            dns_names = ?issued.dns_names, expires_at = %issued.expires_at,
            "workload certificate issued"
        );
        Ok(issued)
    }

    async fn respond(&self, request: Request<Incoming>, max_body: usize) -> Response<Full<Bytes>> {
        if request.uri().path() != CERTIFICATE_PATH {
            return refusal_response(&Refusal::new(RefusalReason::NotFound, "no such endpoint"));
        }
        if request.method() != Method::POST {
            let mut response =
                refusal_response(&Refusal::new(RefusalReason::MalformedRequest, "use POST"));
            *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            return response;
        }
        let parsed = match Limited::new(request.into_body(), max_body).collect().await {
            Ok(body) => serde_json::from_slice::<IssueRequest>(&body.to_bytes()).map_err(|e| {
                Refusal::new(
                    RefusalReason::MalformedRequest,
                    format!("request body: {e}"),
                )
            }),
            Err(e) => Err(Refusal::new(
                RefusalReason::MalformedRequest,
                format!("request body: {e}"),
            )),
        };
        let result = match parsed {
            Ok(request) => self.handle(&request).await,
            Err(refusal) => {
                self.metrics.refused(refusal.reason);
                Err(refusal)
            }
        };
        match result {
            Ok(issued) => json_response(StatusCode::OK, &issued),
            Err(refusal) => refusal_response(&refusal),
        }
    }

    /// Binds the listener and prepares the TLS server certificate (signed by the
    /// intermediate, for `config.server_names`).
    pub async fn bind(
        self: Arc<Self>,
        config: IdentityServiceConfig,
    ) -> Result<BoundIdentityService, CaError> {
        let slot = Arc::new(CaServingCertificate::new(&self.ca, &config.server_names)?);
        let mut tls = ServerConfig::builder_with_provider(portcullis_tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| CaError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(slot.clone());
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(CaError::Io)?;
        let local_addr = listener.local_addr().map_err(CaError::Io)?;
        tracing::info!(%local_addr, "identity service listening");
        Ok(BoundIdentityService {
            service: self,
            listener,
            local_addr,
            tls: Arc::new(tls),
            slot,
            config,
        })
    }
}

fn json_response<T: serde::Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn refusal_response(refusal: &Refusal) -> Response<Full<Bytes>> {
    json_response(
        status_for(refusal.reason),
        &ErrorBody {
            error: refusal.message.clone(),
            reason: refusal.reason,
        },
    )
}

/// A bound, not yet serving, identity service.
pub struct BoundIdentityService {
    service: Arc<IdentityService>,
    listener: TcpListener,
    local_addr: SocketAddr,
    tls: Arc<ServerConfig>,
    slot: Arc<CaServingCertificate>,
    config: IdentityServiceConfig,
}

impl std::fmt::Debug for BoundIdentityService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundIdentityService")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl BoundIdentityService {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown`, then drains open connections (bounded).
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), CaError> {
        let Self {
            service,
            listener,
            tls,
            slot,
            config,
            ..
        } = self;
        let metrics = service.metrics.clone();
        let ca = service.ca.clone();
        tokio::spawn(slot.keep_fresh(
            service.ca.clone(),
            move || metrics.set_ca_expiry(ca.expiry()),
            shutdown.clone(),
        ));
        let max_body = config.max_body_bytes;
        let handler = move |request| {
            let service = service.clone();
            async move { service.respond(request, max_body).await.map(serve::boxed) }
        };
        serve::serve_with(listener, Some(tls.into()), handler, config.limits, shutdown).await;
        Ok(())
    }
}
