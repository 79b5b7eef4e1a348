//! An in-process stand-in for the operator, speaking its wire formats (the operator
//! crate is not a dependency of the sidecar):
//!
//! - the identity service: `POST /v1/certificate` over TLS 1.3 (`portcullis_api::identity`),
//!   signing the CSR's workload ID plus the tenant URI SAN with a two-level test CA;
//! - the policy server over mTLS: `GET /v1/policy/<tenant>/watch` (newline-delimited
//!   `PolicyBundle`s) and `GET /v1/audit-key/<tenant>` (only for a client certificate of
//!   that tenant).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{body::Frame, service::service_fn};
use hyper_util::rt::TokioIo;
use jiff::Timestamp;
use portcullis_crds::PolicyBundle;
use portcullis_sidecar::{
    control::identity::{ErrorBody, IssueRequest, IssueResponse, RefusalReason},
    tls::peer::peer_identity,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::{net::TcpListener, sync::watch, task::JoinSet};

pub const TOKEN: &str = "projected-sa-token-for-tests";

fn set_validity(p: &mut CertificateParams, from: Timestamp, to: Timestamp) {
    let secs = |ts: Timestamp| Duration::from_secs(ts.as_second().max(0) as u64);
    p.not_before = rcgen::date_time_ymd(1970, 1, 1) + secs(from);
    p.not_after = rcgen::date_time_ymd(1970, 1, 1) + secs(to);
}

fn add(ts: Timestamp, d: Duration) -> Timestamp {
    ts.checked_add(jiff::SignedDuration::try_from(d).unwrap())
        .unwrap()
}

fn sub(ts: Timestamp, d: Duration) -> Timestamp {
    ts.checked_sub(jiff::SignedDuration::try_from(d).unwrap())
        .unwrap()
}

/// The operator's CA: a root (the trust bundle) and an issuing intermediate.
pub struct OperatorCa {
    pub root_pem: String,
    pub intermediate_pem: String,
    pub trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
}

impl OperatorCa {
    pub fn new(trust_domain: &str) -> Self {
        let now = Timestamp::now();
        let root_key = KeyPair::generate().unwrap();
        let mut root = CertificateParams::default();
        root.distinguished_name = DistinguishedName::new();
        root.distinguished_name
            .push(DnType::CommonName, "test operator root");
        root.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity(
            &mut root,
            sub(now, Duration::from_secs(3600)),
            add(now, Duration::from_secs(86_400)),
        );
        let root_cert = root.self_signed(&root_key).unwrap();
        let root_issuer = Issuer::new(root, root_key);

        let int_key = KeyPair::generate().unwrap();
        let mut int = CertificateParams::default();
        int.distinguished_name = DistinguishedName::new();
        int.distinguished_name
            .push(DnType::CommonName, "test operator intermediate");
        int.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        int.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        int.use_authority_key_identifier_extension = true;
        set_validity(
            &mut int,
            sub(now, Duration::from_secs(3600)),
            add(now, Duration::from_secs(86_400)),
        );
        let int_cert = int.signed_by(&int_key, &root_issuer).unwrap();
        Self {
            root_pem: root_cert.pem(),
            intermediate_pem: int_cert.pem(),
            trust_domain: trust_domain.to_owned(),
            issuer: Issuer::new(int, int_key),
        }
    }

    /// A serving certificate for localhost (the operator's endpoints), with its chain.
    pub fn server(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![
            SanType::DnsName("localhost".try_into().unwrap()),
            SanType::IpAddress("127.0.0.1".parse().unwrap()),
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let now = Timestamp::now();
        set_validity(
            &mut params,
            sub(now, Duration::from_secs(60)),
            add(now, Duration::from_secs(86_400)),
        );
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let chain = vec![
            cert.der().clone(),
            CertificateDer::from_pem_slice(self.intermediate_pem.as_bytes()).unwrap(),
        ];
        let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
        (chain, key)
    }

    /// Signs a workload CSR, adding the tenant URI SAN, valid for `lifetime`.
    pub fn sign(
        &self,
        csr_pem: &str,
        tenant: &str,
        lifetime: Duration,
        renew_after: Duration,
    ) -> IssueResponse {
        let now = Timestamp::now();
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).unwrap();
        let p = &mut csr.params;
        set_validity(p, sub(now, Duration::from_secs(60)), add(now, lifetime));
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.subject_alt_names.push(SanType::URI(
            format!("spiffe://{}/tenant/{tenant}", self.trust_domain)
                .try_into()
                .unwrap(),
        ));
        let cert = csr.signed_by(&self.issuer).unwrap();
        IssueResponse {
            certificate: cert.pem(),
            chain: self.intermediate_pem.clone(),
            trust_bundle: self.root_pem.clone(),
            expires_at: add(now, lifetime),
            renew_after: add(now, renew_after),
            dns_names: Vec::new(),
            names_revision: None,
        }
    }

    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.root_pem.as_bytes()).unwrap())
            .unwrap();
        roots
    }
}

/// What the fake operator does, changeable while it runs.
pub struct OperatorState {
    pub tenant: String,
    /// The identity service answers 503 Unavailable while true.
    pub identity_down: AtomicBool,
    pub issued: AtomicUsize,
    pub lifetime: Duration,
    pub renew_after: Mutex<Duration>,
    /// Version → key bytes; empty: the audit-key endpoint answers 404.
    pub audit_keys: Mutex<Vec<(u32, [u8; 32])>>,
    pub audit_key_requests: AtomicUsize,
    policy: watch::Sender<Option<PolicyBundle>>,
}

pub struct FakeOperator {
    pub ca: Arc<OperatorCa>,
    pub state: Arc<OperatorState>,
    pub identity_addr: SocketAddr,
    pub policy_addr: SocketAddr,
    tasks: JoinSet<()>,
}

impl FakeOperator {
    pub async fn start(trust_domain: &str, tenant: &str) -> Self {
        let ca = Arc::new(OperatorCa::new(trust_domain));
        let (policy, _) = watch::channel(None);
        let state = Arc::new(OperatorState {
            tenant: tenant.to_owned(),
            identity_down: AtomicBool::new(false),
            issued: AtomicUsize::new(0),
            lifetime: Duration::from_secs(3600),
            renew_after: Mutex::new(Duration::from_secs(1800)),
            audit_keys: Mutex::new(Vec::new()),
            audit_key_requests: AtomicUsize::new(0),
            policy,
        });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (chain, key) = ca.server();
        let identity_tls = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain.clone(), key.clone_key())
            .unwrap();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(ca.roots()), provider.clone())
                .build()
                .unwrap();
        let policy_tls = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        let mut tasks = JoinSet::new();
        let identity = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let policy_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let identity_addr = identity.local_addr().unwrap();
        let policy_addr = policy_listener.local_addr().unwrap();
        tasks.spawn(serve(
            identity,
            Arc::new(identity_tls),
            ca.clone(),
            state.clone(),
            false,
        ));
        tasks.spawn(serve(
            policy_listener,
            Arc::new(policy_tls),
            ca.clone(),
            state.clone(),
            true,
        ));
        Self {
            ca,
            state,
            identity_addr,
            policy_addr,
            tasks,
        }
    }

    pub fn identity_url(&self) -> String {
        format!("https://localhost:{}", self.identity_addr.port())
    }

    pub fn policy_url(&self) -> String {
        format!("https://localhost:{}", self.policy_addr.port())
    }

    pub fn publish(&self, bundle: PolicyBundle) {
        self.state.policy.send_replace(Some(bundle));
    }

    pub fn set_audit_key(&self, version: u32, key: [u8; 32]) {
        self.state.audit_keys.lock().unwrap().push((version, key));
    }

    pub fn issued(&self) -> usize {
        self.state.issued.load(Ordering::SeqCst)
    }

    pub async fn stop(mut self) {
        self.tasks.shutdown().await;
    }
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()).boxed_unsync());
    *response.status_mut() = status;
    response
}

async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    ca: Arc<OperatorCa>,
    state: Arc<OperatorState>,
    policy: bool,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut connections = JoinSet::new();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let ca = ca.clone();
        let state = state.clone();
        connections.spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let client_tenant = peer_identity(stream.get_ref().1.peer_certificates())
                .and_then(|p| p.tenant.map(|t| t.tenant().to_owned()));
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let ca = ca.clone();
                let state = state.clone();
                let client_tenant = client_tenant.clone();
                async move {
                    let response = if policy {
                        policy_route(&request, &state, client_tenant.as_deref())
                    } else {
                        identity_route(request, &ca, &state).await
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn identity_route(
    request: Request<hyper::body::Incoming>,
    ca: &OperatorCa,
    state: &OperatorState,
) -> Response<Body> {
    let refuse = |status: StatusCode, reason: RefusalReason| {
        let body = serde_json::to_vec(&ErrorBody {
            error: format!("refused: {reason}"),
            reason,
        })
        .unwrap();
        reply(status, body)
    };
    if request.method() != Method::POST || request.uri().path() != "/v1/certificate" {
        return refuse(StatusCode::NOT_FOUND, RefusalReason::NotFound);
    }
    if state.identity_down.load(Ordering::SeqCst) {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, RefusalReason::Unavailable);
    }
    let body = request.into_body().collect().await.unwrap().to_bytes();
    let Ok(issue) = serde_json::from_slice::<IssueRequest>(&body) else {
        return refuse(StatusCode::BAD_REQUEST, RefusalReason::MalformedRequest);
    };
    if issue.token != TOKEN {
        return refuse(StatusCode::UNAUTHORIZED, RefusalReason::TokenInvalid);
    }
    let renew_after = *state.renew_after.lock().unwrap();
    let issued = ca.sign(&issue.csr, &state.tenant, state.lifetime, renew_after);
    state.issued.fetch_add(1, Ordering::SeqCst);
    reply(StatusCode::OK, serde_json::to_vec(&issued).unwrap())
}

fn policy_route(
    request: &Request<hyper::body::Incoming>,
    state: &OperatorState,
    client_tenant: Option<&str>,
) -> Response<Body> {
    let path = request.uri().path();
    if let Some(tenant) = path.strip_prefix("/v1/audit-key/") {
        state.audit_key_requests.fetch_add(1, Ordering::SeqCst);
        if client_tenant != Some(tenant) {
            return reply(StatusCode::FORBIDDEN, "not your tenant\n");
        }
        let keys = state.audit_keys.lock().unwrap().clone();
        let Some(active) = keys.iter().map(|(v, _)| *v).max() else {
            return reply(StatusCode::NOT_FOUND, "no audit key\n");
        };
        let keys: serde_json::Map<String, serde_json::Value> = keys
            .iter()
            .map(|(v, k)| {
                (
                    v.to_string(),
                    base64::engine::general_purpose::STANDARD.encode(k).into(),
                )
            })
            .collect();
        let body = serde_json::json!({"tenant": tenant, "activeVersion": active, "keys": keys});
        return reply(StatusCode::OK, body.to_string());
    }
    if path != format!("/v1/policy/{}/watch", state.tenant) || client_tenant != Some(&state.tenant)
    {
        return reply(StatusCode::NOT_FOUND, "not found\n");
    }
    let mut rx = state.policy.subscribe();
    rx.mark_changed();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            if rx.changed().await.is_err() {
                return None;
            }
            let current = rx.borrow_and_update().clone();
            if let Some(bundle) = current {
                let mut line = serde_json::to_vec(&bundle).unwrap();
                line.push(b'\n');
                return Some((Ok::<_, Infallible>(Frame::data(Bytes::from(line))), rx));
            }
        }
    })
    .boxed();
    Response::new(StreamBody::new(stream).boxed_unsync())
}
