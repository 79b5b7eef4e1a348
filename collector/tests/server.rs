//! The ingest listener over real mutual TLS 1.3 on loopback, with certificates from a
//! test CA shaped like the operator's: a workload ships its chain and a resend is
//! acknowledged without being stored twice; the tenant is the certificate's, so another
//! tenant's records are refused; a certificate without a workload identity, or none at
//! all, stores nothing; a gap is answered 409 with where to resend from, and counted.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use portcullis_api::audit_ship::{CONTENT_TYPE, RECORDS_PATH, ShipAck, ShipRefusal};
use portcullis_api::clock::ManualClock;
use portcullis_api::spiffe::TrustDomain;
use portcullis_collector::{Collector, FileStore, Ingest, IngestMetrics, server_config};
use prometheus_client::registry::Registry;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio_util::sync::CancellationToken;

mod support;
use support::{Proxy, batch, start};

const SERVER_NAME: &str = "portcullis-audit.portcullis-system.svc";

fn ok<T, E: std::fmt::Display>(result: Result<T, E>) -> T {
    result.unwrap_or_else(|e| panic!("{e}"))
}

/// A CA like the operator's, issuing leaves on demand.
struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
}

/// A leaf and its key.
struct Leaf {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl TestCa {
    fn new() -> Self {
        let key = ok(KeyPair::generate());
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "portcullis test root");
        let root = ok(params.self_signed(&key)).der().clone();
        Self {
            issuer: Issuer::new(params, key),
            root,
        }
    }

    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        ok(roots.add(self.root.clone()));
        roots
    }

    fn leaf(&self, sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose) -> Leaf {
        let key = ok(KeyPair::generate());
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![usage];
        let cert = ok(params.signed_by(&key, &self.issuer));
        Leaf {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }

    /// A workload certificate as the identity service issues it: the workload and its
    /// tenant as URI SANs.
    fn workload(&self, namespace: &str, account: &str, tenant: &str) -> Leaf {
        let uri = |s: String| SanType::URI(ok(s.as_str().try_into()));
        self.leaf(
            vec![
                uri(format!("spiffe://td/ns/{namespace}/sa/{account}")),
                uri(format!("spiffe://td/tenant/{tenant}")),
            ],
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }
}

struct Running {
    addr: SocketAddr,
    roots: RootCertStore,
    collector: Arc<Mutex<Collector<FileStore>>>,
    registry: Registry,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start_collector(ca: &TestCa) -> Running {
    let dir = ok(tempfile::tempdir());
    let clock = Arc::new(ManualClock::new(start()));
    let collector = Arc::new(Mutex::new(ok(Collector::open(
        ok(FileStore::open(dir.path())),
        clock,
    ))));
    let mut registry = Registry::default();
    let ingest = Ingest::new(
        collector.clone(),
        ok(TrustDomain::new("td")),
        IngestMetrics::register(&mut registry),
    );
    let server = ca.leaf(
        vec![SanType::DnsName(ok(SERVER_NAME.try_into()))],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let tls = ok(server_config(server.chain, server.key, ca.roots()));
    let listener = ok(tokio::net::TcpListener::bind("127.0.0.1:0").await);
    let addr = ok(listener.local_addr());
    let shutdown = CancellationToken::new();
    tokio::spawn(portcullis_server::serve(
        listener,
        Some(Arc::new(tls).into()),
        move |request| ingest.clone().handle(request),
        shutdown.clone(),
    ));
    Running {
        addr,
        roots: ca.roots(),
        collector,
        registry,
        shutdown,
        _dir: dir,
    }
}

/// The answer to one POST: status and body.
struct Answer {
    status: u16,
    body: String,
}

impl Answer {
    fn ack(&self) -> ShipAck {
        assert_eq!(self.status, 200, "{}", self.body);
        ok(serde_json::from_str(&self.body))
    }

    fn refusal(&self, status: u16) -> ShipRefusal {
        assert_eq!(self.status, status, "{}", self.body);
        ok(serde_json::from_str(&self.body))
    }
}

impl Running {
    fn client(&self, leaf: Option<Leaf>) -> Arc<ClientConfig> {
        let builder = ok(
            ClientConfig::builder_with_provider(portcullis_tls::provider())
                .with_protocol_versions(&[&rustls::version::TLS13]),
        )
        .with_root_certificates(self.roots.clone());
        Arc::new(match leaf {
            Some(leaf) => ok(builder.with_client_auth_cert(leaf.chain, leaf.key)),
            None => builder.with_no_client_auth(),
        })
    }

    /// POSTs `body` to the ingest path; `Err` when the connection fails.
    async fn ship(&self, client: &Arc<ClientConfig>, body: String) -> Result<Answer, String> {
        self.post(client, CONTENT_TYPE, body).await
    }

    /// POSTs `body` as `content_type` to the ingest path.
    async fn post(
        &self,
        client: &Arc<ClientConfig>,
        content_type: &str,
        body: String,
    ) -> Result<Answer, String> {
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| e.to_string())?;
        let name = ok(ServerName::try_from(SERVER_NAME));
        let tls = tokio_rustls::TlsConnector::from(client.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let request = ok(http::Request::post(RECORDS_PATH)
            .header(http::header::HOST, SERVER_NAME)
            .header(http::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body))));
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Answer {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    fn entries(&self, tenant: &str) -> Vec<String> {
        ok(self
            .collector
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entries(tenant))
    }

    fn metrics(&self) -> String {
        let mut text = String::new();
        ok(prometheus_client::encoding::text::encode(
            &mut text,
            &self.registry,
        ));
        text
    }
}

#[tokio::test]
async fn a_workload_ships_its_chain_and_a_resend_is_stored_once() {
    let ca = TestCa::new();
    let running = start_collector(&ca).await;
    let web = running.client(Some(ca.workload("shop", "web", "shop")));
    let mut proxy = Proxy::new("web-7d9f-1", "shop");

    let first = proxy.requests(3);
    let ack = ok(running.ship(&web, batch(&first)).await).ack();
    assert_eq!((ack.stored, ack.duplicates), (3, 0));
    assert_eq!(ack.durable_through.get("web-7d9f-1"), Some(&2));

    // The acknowledgement was lost: the proxy resends from its spool, with more.
    let mut again = first.clone();
    again.extend(proxy.requests(2));
    let ack = ok(running.ship(&web, batch(&again)).await).ack();
    assert_eq!((ack.stored, ack.duplicates), (2, 3));
    assert_eq!(running.entries("shop"), proxy.lines);
    let metrics = running.metrics();
    assert!(
        metrics.contains("portcullis_audit_entries_stored_total 5")
            && metrics.contains("portcullis_audit_records_total{tenant=\"shop\"} 5"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_tenant_is_the_certificates_not_the_records() {
    let ca = TestCa::new();
    let running = start_collector(&ca).await;
    // A workload of tenant shop writes records that claim tenant bank.
    let web = running.client(Some(ca.workload("shop", "web", "shop")));
    let mut forger = Proxy::new("bank-1", "bank");

    let refusal = ok(running.ship(&web, batch(&forger.requests(2))).await).refusal(403);
    assert_eq!(
        refusal.reason,
        portcullis_api::audit_ship::ShipRefusalReason::WrongTenant
    );
    assert!(running.entries("bank").is_empty());
    assert!(running.entries("shop").is_empty());
}

#[tokio::test]
async fn without_a_workload_certificate_nothing_is_stored() {
    let ca = TestCa::new();
    let running = start_collector(&ca).await;
    let mut proxy = Proxy::new("web-7d9f-1", "shop");
    let lines = proxy.requests(1);

    // A certificate of the trust bundle that names no workload.
    let anonymous = ca.leaf(
        vec![SanType::DnsName(ok("web.shop.svc".try_into()))],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let answer = ok(running
        .ship(&running.client(Some(anonymous)), batch(&lines))
        .await);
    assert_eq!(answer.status, 403, "{}", answer.body);
    assert!(
        answer.body.contains("trust domain td") && answer.body.contains("workload certificate"),
        "{}",
        answer.body
    );

    // No certificate at all: the handshake, or the first request, fails.
    let shipped = running.ship(&running.client(None), batch(&lines)).await;
    assert!(
        shipped.is_err(),
        "a client without a certificate got an answer"
    );

    // A workload certificate of another CA.
    let stranger = TestCa::new().workload("shop", "web", "shop");
    let shipped = running
        .ship(&running.client(Some(stranger)), batch(&lines))
        .await;
    assert!(shipped.is_err(), "a foreign certificate got an answer");
    assert!(running.entries("shop").is_empty());
}

#[tokio::test]
async fn a_gap_is_answered_with_where_to_resend_from() {
    let ca = TestCa::new();
    let running = start_collector(&ca).await;
    let web = running.client(Some(ca.workload("shop", "web", "shop")));
    let mut proxy = Proxy::new("web-7d9f-1", "shop");
    ok(running.ship(&web, batch(&proxy.requests(2))).await).ack();

    let later = proxy.requests(3);
    let refusal = ok(running.ship(&web, batch(&later[1..])).await).refusal(409);
    assert_eq!(refusal.expected_seq, Some(2), "{}", refusal.error);
    assert_eq!(refusal.chain_id.as_deref(), Some("web-7d9f-1"));
    assert!(
        running
            .metrics()
            .contains("portcullis_audit_refusals_total{reason=\"MissingRecords\"} 1"),
        "{}",
        running.metrics()
    );

    // Resending from where the collector asked closes the gap.
    let ack = ok(running.ship(&web, batch(&later)).await).ack();
    assert_eq!(ack.stored, 3);
    assert_eq!(running.entries("shop"), proxy.lines);
}

#[tokio::test]
async fn a_batch_of_the_wrong_type_or_size_is_refused_with_what_to_do() {
    let ca = TestCa::new();
    let running = start_collector(&ca).await;
    let web = running.client(Some(ca.workload("shop", "web", "shop")));
    let mut proxy = Proxy::new("web-7d9f-1", "shop");

    let json = ok(running
        .post(&web, "application/json", batch(&proxy.requests(1)))
        .await);
    assert_eq!(json.status, 415, "{}", json.body);
    assert!(json.body.contains(CONTENT_TYPE), "{}", json.body);

    let huge = "x".repeat(portcullis_collector::MAX_BATCH_BYTES + 1);
    let big = ok(running.ship(&web, huge).await);
    assert_eq!(big.status, 413, "{}", big.body);
    assert!(
        big.body.contains("ship fewer records per request"),
        "{}",
        big.body
    );

    let garbage = ok(running.ship(&web, "not json\n".into()).await).refusal(400);
    assert_eq!(
        garbage.reason,
        portcullis_api::audit_ship::ShipRefusalReason::Malformed
    );
    assert!(
        running.entries("shop").is_empty(),
        "nothing of a refused batch is kept"
    );
}
