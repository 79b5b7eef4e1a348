//! The collector's listener, TLS 1.3: `POST /v1/audit/records` (ingest, mutual TLS) and
//! `GET /v1/tenants/{tenant}/records` (export, a bearer token; see [`crate::export`]).
//!
//! A batch is accepted only from a client certificate that chains to the trust bundle
//! and names one workload and one tenant of the collector's trust domain (the workload
//! certificate the operator issues); the tenant the batch is filed under is the
//! certificate's, never one the body names. The batch is checked and made durable on a
//! blocking thread (it ends in fsync), and only then acknowledged.

use std::fmt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use portcullis_api::audit_export::{tenant_of_path, tenant_of_seal_path};
use portcullis_api::audit_ship::{CONTENT_TYPE, RECORDS_PATH, ShipRefusal, ShipRefusalReason};
use portcullis_api::names::is_dns_subdomain;
use portcullis_api::spiffe::TrustDomain;
use portcullis_server::{self as serve, Body, PeerCertificates};
use portcullis_tls::leaf_facts;
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::arrival::Sender;
use crate::collector::{Collector, IngestError, blocking};
use crate::export::{Export, ExportAuthorizer};
use crate::metrics::IngestMetrics;
use crate::store::{RecordStore, StoreError};

/// Largest batch accepted. A proxy ships at most this much per request; more is a 413
/// that tells it to split.
pub const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ServerTlsError {
    /// rustls refused the certificate, key or protocol set.
    #[error("collector TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The trust bundle cannot verify client certificates.
    #[error("collector trust bundle cannot verify client certificates: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The listener's TLS: TLS 1.3 only, HTTP/2 or HTTP/1.1. A client certificate, when
/// sent, must chain to `roots`; it may be left out because exports authenticate with a
/// bearer token instead (ingest refuses a batch sent without one).
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: rustls::RootCertStore,
) -> Result<ServerConfig, ServerTlsError> {
    let provider = portcullis_tls::provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// What every ingest request shares.
pub struct Ingest<S> {
    collector: Arc<Mutex<Collector<S>>>,
    trust_domain: TrustDomain,
    metrics: IngestMetrics,
    observer: Option<Arc<dyn RefusalObserver>>,
    admin_writer: Option<Arc<str>>,
}

/// Told of every refused batch, to tell people (in a cluster: an Event on the Tenant).
pub trait RefusalObserver: Send + Sync {
    /// `workload` of `tenant` sent a batch that was refused, stored nothing.
    fn refused(&self, tenant: &str, workload: &str, refusal: &ShipRefusal);
}

impl<S> Clone for Ingest<S> {
    fn clone(&self) -> Self {
        Self {
            collector: self.collector.clone(),
            trust_domain: self.trust_domain.clone(),
            metrics: self.metrics.clone(),
            observer: self.observer.clone(),
            admin_writer: self.admin_writer.clone(),
        }
    }
}

impl<S> fmt::Debug for Ingest<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ingest")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// The shipping workload, from its verified client certificate.
struct Shipper {
    tenant: String,
    workload: String,
}

impl<S: RecordStore + Send + 'static> Ingest<S> {
    /// Ingest into `collector` from workloads of `trust_domain`.
    pub fn new(
        collector: Arc<Mutex<Collector<S>>>,
        trust_domain: TrustDomain,
        metrics: IngestMetrics,
    ) -> Self {
        Self {
            collector,
            trust_domain,
            metrics,
            observer: None,
            admin_writer: None,
        }
    }

    /// Accepts chains from `workload` (the operator's SPIFFE id) for any tenant: each
    /// batch is filed under the tenant its records name, and all of them must name the
    /// same one. The operator's admin records land in the logs of the tenants they
    /// concern.
    #[must_use]
    pub fn admin_writer(mut self, workload: &str) -> Self {
        self.admin_writer = Some(Arc::from(workload));
        self
    }

    /// Tells `observer` of every refused batch.
    #[must_use]
    pub fn observe_refusals(mut self, observer: Arc<dyn RefusalObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Answers a request to [`RECORDS_PATH`].
    pub async fn handle(self, request: Request<Incoming>) -> Response<Body> {
        if request.method() != Method::POST {
            return serve::error(
                StatusCode::METHOD_NOT_ALLOWED,
                "ship records with POST, one JSON entry per line",
            );
        }
        let shipper = match self.shipper(request.extensions().get::<PeerCertificates>()) {
            Ok(shipper) => shipper,
            Err(message) => {
                self.metrics.batch("unauthenticated");
                return serve::error(StatusCode::FORBIDDEN, &message);
            }
        };
        if let Some(kind) = request.headers().get(header::CONTENT_TYPE)
            && kind.as_bytes() != CONTENT_TYPE.as_bytes()
        {
            return serve::error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                &format!("send the batch as {CONTENT_TYPE}"),
            );
        }
        let body = match Limited::new(request.into_body(), MAX_BATCH_BYTES)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return serve::error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!(
                        "a batch may hold at most {MAX_BATCH_BYTES} bytes; ship fewer records per request"
                    ),
                );
            }
            Err(e) => {
                return serve::error(StatusCode::BAD_REQUEST, &format!("reading the batch: {e}"));
            }
        };
        let shipper = match self.admin_filing(shipper, &body) {
            Ok(shipper) => shipper,
            Err(refusal) => {
                self.metrics.refused(refusal.reason);
                return refusal_response(&refusal);
            }
        };
        self.ingest(shipper, body).await
    }

    /// The admin writer's batch goes to the tenant its first record names (every other
    /// record is then checked against it like any batch); everyone else's to their own.
    fn admin_filing(&self, shipper: Shipper, body: &[u8]) -> Result<Shipper, ShipRefusal> {
        if self.admin_writer.as_deref() != Some(shipper.workload.as_str()) {
            return Ok(shipper);
        }
        // Parsed only as far as needed (the batch is parsed whole on ingest): the first
        // record names the tenant.
        let entries = || {
            body.split(|b| *b == b'\n')
                .filter_map(|line| serde_json::from_slice::<serde_json::Value>(line).ok())
        };
        let named = entries().find_map(|value| value.get("tenant")?.as_str().map(str::to_owned));
        // A batch of checkpoints alone belongs where its chain already is.
        let tenant = named.or_else(|| {
            let chain =
                entries().find_map(|value| value.get("chain_id")?.as_str().map(str::to_owned))?;
            let collector = self
                .collector
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            collector
                .arrivals()
                .head(&chain)
                .map(|head| head.tenant.clone())
        });
        match tenant {
            Some(tenant) if is_dns_subdomain(&tenant) => Ok(Shipper {
                tenant,
                workload: shipper.workload,
            }),
            _ => Err(ShipRefusal {
                error: "an admin batch must hold records naming the tenant they concern".into(),
                reason: ShipRefusalReason::WrongTenant,
                chain_id: None,
                expected_seq: None,
            }),
        }
    }

    fn shipper(&self, peer: Option<&PeerCertificates>) -> Result<Shipper, String> {
        let no_identity = || {
            format!(
                "the client certificate names no workload and tenant of trust domain {}; ship with the workload certificate the operator issued",
                self.trust_domain
            )
        };
        let leaf = peer.and_then(|p| p.0.first()).ok_or_else(no_identity)?;
        let facts = leaf_facts(leaf).map_err(|_| no_identity())?;
        match (facts.workload, facts.tenant) {
            (Some(workload), Some(tenant))
                if workload.trust_domain() == &self.trust_domain
                    && tenant.trust_domain() == &self.trust_domain =>
            {
                Ok(Shipper {
                    tenant: tenant.tenant().to_owned(),
                    workload: workload.to_string(),
                })
            }
            _ => Err(no_identity()),
        }
    }

    async fn ingest(&self, shipper: Shipper, body: Bytes) -> Response<Body> {
        let Ok(text) = String::from_utf8(body.to_vec()) else {
            self.metrics.refused(ShipRefusalReason::Malformed);
            return refusal_response(&ShipRefusal {
                error: "the batch is not UTF-8 text; send one JSON entry per line".into(),
                reason: ShipRefusalReason::Malformed,
                chain_id: None,
                expected_seq: None,
            });
        };
        let tenant = shipper.tenant.clone();
        let workload = shipper.workload.clone();
        let outcome = blocking(&self.collector, move |collector| {
            let sender = Sender {
                tenant: &shipper.tenant,
                workload: &shipper.workload,
            };
            collector.ingest_counted(sender, &text)
        })
        .await;
        match outcome {
            Ok(ingested) => {
                self.metrics.stored(&tenant, &ingested);
                match serde_json::to_vec(&ingested.ack) {
                    Ok(body) => serve::full(StatusCode::OK, "application/json", body),
                    Err(e) => serve::error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
                }
            }
            Err(IngestError::Refused(refusal)) => {
                self.metrics.refused(refusal.reason);
                tracing::warn!(
                    reason = ?refusal.reason,
                    chain = refusal.chain_id.as_deref().unwrap_or("-"),
                    "batch refused"
                );
                if let Some(observer) = &self.observer {
                    observer.refused(&tenant, &workload, &refusal);
                }
                refusal_response(&refusal)
            }
            Err(IngestError::Store(StoreError::NoKey { tenant })) => {
                self.metrics.batch("key_pending");
                tracing::warn!(%tenant, "batch waits for the tenant's data-encryption key");
                serve::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the collector does not hold this tenant's data-encryption key yet; nothing was stored, resend it",
                )
            }
            Err(IngestError::Store(e)) => {
                self.metrics.batch("store_failed");
                tracing::error!(error = %e, "batch not made durable");
                serve::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the collector could not make the batch durable; nothing was stored, resend it",
                )
            }
        }
    }
}

/// Answers one request on the collector's listener: ingest or export.
pub async fn route<S, A>(
    ingest: Ingest<S>,
    export: Export<S, A>,
    request: Request<Incoming>,
) -> Response<Body>
where
    S: RecordStore + Send + 'static,
    A: ExportAuthorizer,
{
    if request.uri().path() == RECORDS_PATH {
        return ingest.handle(request).await;
    }
    if let Some(tenant) = tenant_of_path(request.uri().path()) {
        let tenant = tenant.to_owned();
        return export.handle(request, &tenant).await;
    }
    if let Some(tenant) = tenant_of_seal_path(request.uri().path()) {
        let tenant = tenant.to_owned();
        return export.handle_seal(request, &tenant).await;
    }
    serve::error(StatusCode::NOT_FOUND, "no such endpoint")
}

/// The status a refusal is answered with: 400 for a line that is not an entry, 403 for
/// a record the sender may not write, 409 for a batch that does not continue the chain.
pub fn refusal_status(reason: ShipRefusalReason) -> StatusCode {
    match reason {
        ShipRefusalReason::Malformed => StatusCode::BAD_REQUEST,
        ShipRefusalReason::WrongTenant | ShipRefusalReason::ForeignChain => StatusCode::FORBIDDEN,
        ShipRefusalReason::AlteredRecord
        | ShipRefusalReason::MissingRecords
        | ShipRefusalReason::BrokenLink
        | ShipRefusalReason::Fork
        | ShipRefusalReason::BadCheckpoint => StatusCode::CONFLICT,
    }
}

fn refusal_response(refusal: &ShipRefusal) -> Response<Body> {
    match serde_json::to_vec(refusal) {
        Ok(body) => serve::full(refusal_status(refusal.reason), "application/json", body),
        Err(e) => serve::error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}
