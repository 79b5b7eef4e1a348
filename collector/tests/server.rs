//! The ingest listener over real mutual TLS 1.3 on loopback, with certificates from a
//! test CA shaped like the operator's: a workload ships its chain and a resend is
//! acknowledged without being stored twice; the tenant is the certificate's, so another
//! tenant's records are refused; a certificate without a workload identity, or none at
//! all, stores nothing; a gap is answered 409 with where to resend from, and counted.
//!
//! The export on the same listener, with an authoriser scripted like the tenant's RBAC
//! (an analyst token may read tenant shop, a developer token may not, no token is a 401):
//! what was shipped comes back exactly, as JSON lines or CSV, filtered.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use portcullis_api::audit_ship::{
    CONTENT_TYPE, RECORDS_PATH, ShipAck, ShipRefusal, ShipRefusalReason,
};
use portcullis_api::clock::ManualClock;
use portcullis_api::spiffe::TrustDomain;
use portcullis_collector::{
    Collector, Export, ExportAuthorizer, ExportDenial, ExportMetrics, FileStore, Ingest,
    IngestMetrics, Reader, RefusalObserver, route, server_config,
};
use prometheus_client::registry::Registry;
use rcgen::{ExtendedKeyUsagePurpose, SanType};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio_util::sync::CancellationToken;

mod support;
use support::{Proxy, batch, start};
#[path = "support/ca.rs"]
mod ca;
use ca::{Leaf, TestCa, ok};

const SERVER_NAME: &str = "portcullis-audit.portcullis-system.svc";

/// The operator's workload id: the admin writer.
const OPERATOR: &str = "spiffe://td/ns/portcullis-system/sa/portcullis-operator";

/// The tenant's RBAC, scripted: `analyst` may export tenant shop, `developer` may not,
/// any other token is not one the API server knows.
struct ScriptedRbac;

impl ExportAuthorizer for ScriptedRbac {
    async fn authorize(&self, token: &str, tenant: &str) -> Result<Reader, ExportDenial> {
        match (token, tenant) {
            ("analyst", "shop") => Ok(Reader {
                user: "system:serviceaccount:shop:analyst".into(),
            }),
            ("analyst" | "developer", _) => Err(ExportDenial::Forbidden(format!(
                "{token} may not export the records of tenant {tenant}"
            ))),
            _ => Err(ExportDenial::Unauthenticated(
                "the API server does not accept this token".into(),
            )),
        }
    }
}

/// What the collector told about refused batches: (tenant, workload, reason).
#[derive(Default)]
struct Told(Mutex<Vec<(String, String, ShipRefusalReason)>>);

impl RefusalObserver for Told {
    fn refused(&self, tenant: &str, workload: &str, refusal: &ShipRefusal) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((tenant.into(), workload.into(), refusal.reason));
    }
}

struct Running {
    addr: SocketAddr,
    roots: RootCertStore,
    collector: Arc<Mutex<Collector<FileStore>>>,
    told: Arc<Told>,
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
        ok(FileStore::open(dir.path(), support::keys())),
        clock,
    ))));
    let mut registry = Registry::default();
    let told = Arc::new(Told::default());
    let ingest = Ingest::new(
        collector.clone(),
        ok(TrustDomain::new("td")),
        IngestMetrics::register(&mut registry),
    )
    .observe_refusals(told.clone())
    .admin_writer(OPERATOR);
    let export = Export::new(
        collector.clone(),
        ScriptedRbac,
        ExportMetrics::register(&mut registry),
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
        move |request| route(ingest.clone(), export.clone(), request),
        shutdown.clone(),
    ));
    Running {
        addr,
        roots: ca.roots(),
        collector,
        told,
        registry,
        shutdown,
        _dir: dir,
    }
}

/// The answer to one POST: status and body.
struct Answer {
    status: u16,
    content_type: String,
    www_authenticate: bool,
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
        let request = ok(http::Request::post(RECORDS_PATH)
            .header(http::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body))));
        self.send(client, request).await
    }

    /// GETs `path_and_query` without a client certificate, with `token` as a bearer token.
    async fn export(&self, path_and_query: &str, token: Option<&str>) -> Answer {
        let mut request = http::Request::get(path_and_query);
        if let Some(token) = token {
            request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = ok(request.body(Full::new(Bytes::new())));
        ok(self.send(&self.client(None), request).await)
    }

    /// Sends one request on a new connection.
    async fn send(
        &self,
        client: &Arc<ClientConfig>,
        mut request: http::Request<Full<Bytes>>,
    ) -> Result<Answer, String> {
        request.headers_mut().insert(
            http::header::HOST,
            http::HeaderValue::from_static(SERVER_NAME),
        );
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
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let www_authenticate = response
            .headers()
            .contains_key(http::header::WWW_AUTHENTICATE);
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Answer {
            status,
            content_type,
            www_authenticate,
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

    // No certificate at all: the connection is allowed (exports authenticate with a
    // token instead), the batch is not.
    let shipped = ok(running.ship(&running.client(None), batch(&lines)).await);
    assert_eq!(shipped.status, 403, "{}", shipped.body);
    assert!(
        shipped.body.contains("workload certificate"),
        "{}",
        shipped.body
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
    // Told, so that it can be shown on the Tenant.
    assert_eq!(
        *running
            .told
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
        [(
            "shop".to_owned(),
            "spiffe://td/ns/shop/sa/web".to_owned(),
            ShipRefusalReason::MissingRecords
        )]
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

/// Ships `lines` as tenant shop's workload web.
async fn ship_as_shop(ca: &TestCa, running: &Running, lines: &[String]) {
    let web = running.client(Some(ca.workload("shop", "web", "shop")));
    let ack = ok(running.ship(&web, batch(lines)).await).ack();
    assert_eq!(ack.stored, lines.len() as u64);
}

#[tokio::test]
async fn an_analyst_exports_exactly_what_was_shipped() {
    let ca = TestCa::new();
    let running = start_collector(&ca).await;
    let mut proxy = Proxy::new("web-7d9f-1", "shop");
    let shipped = proxy.requests(5);
    ship_as_shop(&ca, &running, &shipped).await;

    let json = running
        .export("/v1/tenants/shop/records", Some("analyst"))
        .await;
    assert_eq!(json.status, 200, "{}", json.body);
    assert_eq!(json.content_type, "application/x-ndjson");
    // Byte for byte as the chain wrote them, so the export still verifies.
    assert_eq!(json.body, batch(&shipped));
    // The whole history, to verify: every entry, unfiltered (and no filter allowed).
    let chain = running
        .export("/v1/tenants/shop/records?format=chain", Some("analyst"))
        .await;
    assert_eq!(
        (chain.status, chain.body.as_str()),
        (200, batch(&shipped).as_str())
    );
    let filtered = running
        .export(
            "/v1/tenants/shop/records?format=chain&since=2027-01-01T00:00:00Z",
            Some("analyst"),
        )
        .await;
    assert_eq!(filtered.status, 400, "{}", filtered.body);

    let csv = running
        .export("/v1/tenants/shop/records?format=csv", Some("analyst"))
        .await;
    assert_eq!(csv.status, 200, "{}", csv.body);
    assert!(
        csv.content_type.starts_with("text/csv"),
        "{}",
        csv.content_type
    );
    let rows: Vec<&str> = csv.body.lines().collect();
    assert_eq!(rows.len(), 6, "{}", csv.body);
    assert!(
        rows[0].starts_with("timestamp,chain_id,seq,tenant"),
        "{}",
        rows[0]
    );
    assert!(
        rows[5].contains(",4,shop,") && rows[5].contains("/v1/identify/4"),
        "{}",
        rows[5]
    );
    let metrics = running.metrics();
    assert!(
        metrics.contains("portcullis_audit_exports_total{outcome=\"served\"} 3")
            && metrics.contains("portcullis_audit_exports_total{outcome=\"bad_request\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_export_filters_by_time_action_and_principal() {
    let ca = TestCa::new();
    let running = start_collector(&ca).await;
    let mut proxy = Proxy::new("web-7d9f-1", "shop");
    let at = |minutes: i64| start() + jiff::SignedDuration::from_mins(minutes);
    let lines = vec![
        proxy.request(at(0), "api.identify", "key:ak_***7f2", "/v1/identify"),
        proxy.request(at(10), "api.events", "key:ak_***7f2", "/v1/events/1"),
        proxy.request(
            at(20),
            "api.events",
            "spiffe://td/ns/shop/sa/cart",
            "/v1/events/2",
        ),
        proxy.request(at(30), "admin.key.create", "user:ana", "/"),
    ];
    ship_as_shop(&ca, &running, &lines).await;

    for (query, expected) in [
        ("since=2027-01-15T08:10:00Z", &lines[1..]),
        ("until=2027-01-15T08:10:00Z", &lines[..1]),
        (
            "since=2027-01-15T08:05:00Z&until=2027-01-15T08:25:00Z",
            &lines[1..3],
        ),
        ("action=api.events", &lines[1..3]),
        ("action=admin.*", &lines[3..]),
        (
            "principal=spiffe%3A%2F%2Ftd%2Fns%2Fshop%2Fsa%2Fcart",
            &lines[2..3],
        ),
        ("action=api.events&principal=key%3Aak_***7f2", &lines[1..2]),
        ("action=api.nothing", &[][..]),
    ] {
        let answer = running
            .export(
                &format!("/v1/tenants/shop/records?{query}"),
                Some("analyst"),
            )
            .await;
        assert_eq!(answer.status, 200, "{query}: {}", answer.body);
        assert_eq!(answer.body, batch(expected), "{query}");
    }
}

#[tokio::test]
async fn only_a_reader_the_api_server_allows_may_export() {
    let ca = TestCa::new();
    let running = start_collector(&ca).await;
    let mut shop = Proxy::new("web-7d9f-1", "shop");
    ship_as_shop(&ca, &running, &shop.requests(2)).await;

    let anonymous = running.export("/v1/tenants/shop/records", None).await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.body);
    assert!(anonymous.www_authenticate, "a 401 names the scheme to use");
    assert!(
        anonymous.body.contains("Authorization: Bearer"),
        "{}",
        anonymous.body
    );

    let stranger = running
        .export("/v1/tenants/shop/records", Some("made-up"))
        .await;
    assert_eq!(stranger.status, 401, "{}", stranger.body);

    let developer = running
        .export("/v1/tenants/shop/records", Some("developer"))
        .await;
    assert_eq!(developer.status, 403, "{}", developer.body);
    assert!(!developer.body.contains("identify"), "{}", developer.body);

    // The analyst of shop reads nothing of another tenant.
    let other = running
        .export("/v1/tenants/bank/records", Some("analyst"))
        .await;
    assert_eq!(other.status, 403, "{}", other.body);

    // Records are written only by shipping proxies: no other method on the export path.
    let post = ok(http::Request::post("/v1/tenants/shop/records")
        .header(http::header::AUTHORIZATION, "Bearer analyst")
        .body(Full::new(Bytes::from("{}"))));
    let post = ok(running.send(&running.client(None), post).await);
    assert_eq!(post.status, 405, "{}", post.body);
    assert!(post.body.contains("GET"), "{}", post.body);
    // A name no tenant can have.
    let odd = running
        .export("/v1/tenants/Shop_1/records", Some("analyst"))
        .await;
    assert_eq!(odd.status, 404, "{}", odd.body);
    assert!(odd.body.contains("is not a tenant name"), "{}", odd.body);

    let bad = running
        .export("/v1/tenants/shop/records?format=xml", Some("analyst"))
        .await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(bad.body.contains("format=csv"), "{}", bad.body);

    let metrics = running.metrics();
    assert!(
        metrics.contains("portcullis_audit_exports_total{outcome=\"unauthenticated\"} 2")
            && metrics.contains("portcullis_audit_exports_total{outcome=\"forbidden\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_newest_seal_is_served_to_readers_of_the_log_and_comes_with_the_chain() {
    let ca = TestCa::new();
    let running = start_collector(&ca).await;
    let none = running
        .export("/v1/tenants/shop/seal", Some("analyst"))
        .await;
    assert_eq!(none.status, 404, "nothing sealed yet: {}", none.body);
    assert!(none.body.contains("no sealed log yet"), "{}", none.body);

    let mut proxy = Proxy::new("web-7d9f-1", "shop");
    ship_as_shop(&ca, &running, &proxy.requests(3)).await;
    let leaf = ca.collector();
    let identity = portcullis_audit::checkpoint::SignerIdentity {
        spiffe_id: None,
        certificate_der: Some(leaf.chain[0].to_vec()),
        intermediates_der: Vec::new(),
    };
    let signer = ok(portcullis_audit::checkpoint::CheckpointSigner::from_pkcs8(
        leaf.key.secret_der(),
        identity,
    ));
    let sealed = ok(portcullis_collector::seal_all(&running.collector, signer).await);
    assert_eq!(sealed, [("shop".to_owned(), 0)]);

    let seal = running
        .export("/v1/tenants/shop/seal", Some("analyst"))
        .await;
    assert_eq!(seal.status, 200, "{}", seal.body);
    let value: serde_json::Value = ok(serde_json::from_str(&seal.body));
    assert_eq!(
        (value["type"].as_str(), value["number"].as_u64()),
        (Some("seal"), Some(0))
    );
    assert_eq!(value["heads"]["web-7d9f-1"]["seq"].as_u64(), Some(2));

    // The same readers as the export, and no one else.
    assert_eq!(
        running.export("/v1/tenants/shop/seal", None).await.status,
        401
    );
    assert_eq!(
        running
            .export("/v1/tenants/shop/seal", Some("developer"))
            .await
            .status,
        403
    );
    // The history to verify carries the seal; the records export does not.
    let chain = running
        .export("/v1/tenants/shop/records?format=chain", Some("analyst"))
        .await;
    assert_eq!(chain.body.lines().last(), Some(seal.body.as_str()));
    let records = running
        .export("/v1/tenants/shop/records", Some("analyst"))
        .await;
    assert_eq!(records.body, batch(&proxy.lines));
}

#[tokio::test]
async fn the_operators_admin_chains_are_filed_under_the_tenants_their_records_name() {
    let ca = TestCa::new();
    let running = start_collector(&ca).await;
    let operator = running.client(Some(ca.workload(
        "portcullis-system",
        "portcullis-operator",
        "portcullis-system",
    )));
    let mut shop_admin = Proxy::new("operator-0-admin-shop", "shop");
    let mut bank_admin = Proxy::new("operator-0-admin-bank", "bank");
    let shop_lines = shop_admin.requests(2);
    let bank_lines = bank_admin.requests(1);
    assert_eq!(
        ok(running.ship(&operator, batch(&shop_lines)).await)
            .ack()
            .stored,
        2
    );
    assert_eq!(
        ok(running.ship(&operator, batch(&bank_lines)).await)
            .ack()
            .stored,
        1
    );
    assert_eq!(running.entries("shop"), shop_lines);
    assert_eq!(running.entries("bank"), bank_lines);
    assert!(running.entries("portcullis-system").is_empty());

    // One batch, one tenant: a record naming another is refused, nothing stored.
    let mut mixed = shop_admin.requests(1);
    mixed.extend(Proxy::new("operator-0-admin-shop-2", "bank").requests(1));
    let refusal = ok(running.ship(&operator, batch(&mixed)).await).refusal(403);
    assert_eq!(
        refusal.reason,
        portcullis_api::audit_ship::ShipRefusalReason::WrongTenant
    );
    assert_eq!(running.entries("shop"), shop_lines);

    // Any other workload still writes only its own tenant's log.
    let web = running.client(Some(ca.workload("shop", "web", "shop")));
    let mut forger = Proxy::new("bank-2", "bank");
    ok(running.ship(&web, batch(&forger.requests(1))).await).refusal(403);
    assert_eq!(running.entries("bank"), bank_lines);
}
