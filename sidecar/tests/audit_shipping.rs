//! An injected proxy ships its audit chain to a real audit collector
//! (`portcullis-collector` over mutual TLS with the workload certificate), in process:
//! a collector outage refuses nothing while the spool has room and loses nothing once
//! the collector is back (every record exactly once, in order, the chain intact); a
//! Confidential tenant's requests are refused only when the spool is full, and served
//! again once the collector drains it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use portcullis_api::spiffe::TrustDomain;
use portcullis_audit::{Entry, VerifyOptions, retry::RetryPolicy, verify::verify_jsonl};
use portcullis_collector::{Collector, FileStore, Ingest, IngestMetrics, KeyCache, server_config};
use portcullis_crds::DataClassification;
use portcullis_sidecar::audit::AuditHook;
use support::{
    cluster::{
        self, TENANT, TRUST_DOMAIN, bundle, echo_app, environment, inbound_request,
        mesh_client_config, stop, wait_ready,
    },
    operator::FakeOperator,
    wait_until,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Retries bounded well inside `wait_until`'s 10 s.
const RETRY: RetryPolicy = RetryPolicy {
    initial: Duration::from_millis(50),
    max: Duration::from_millis(500),
};

/// The tenant's key as the collector holds it.
fn tenant_keys() -> Arc<KeyCache> {
    let keys = KeyCache::new();
    keys.insert(portcullis_audit::TenantKeys::generate(TENANT));
    Arc::new(keys)
}

/// A collector that is not running yet: the proxy is configured with its URL and
/// meets an outage first (each connection closed unanswered). The port stays bound
/// meanwhile: a released loopback port can be taken by another socket, even by the
/// proxy's own reconnect connecting to itself, and the start would then fail.
struct Collector0 {
    /// Closes connections until cancelled, then hands the listener back.
    refusing: tokio::task::JoinHandle<TcpListener>,
    stop_refusing: CancellationToken,
    dir: tempfile::TempDir,
}

/// A running collector.
struct RunningCollector {
    collector: Arc<Mutex<Collector<FileStore>>>,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for RunningCollector {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Collector0 {
    async fn reserve() -> (Self, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop_refusing = CancellationToken::new();
        let stop = stop_refusing.clone();
        let refusing = tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return listener,
                    // Dropping the accepted socket closes it unanswered.
                    _ = listener.accept() => {}
                }
            }
        });
        let dir = tempfile::tempdir().unwrap();
        (
            Self {
                refusing,
                stop_refusing,
                dir,
            },
            addr,
        )
    }

    /// The URL the proxy ships to (the operator CA's server certificate names localhost).
    fn url(addr: SocketAddr) -> String {
        format!("https://localhost:{}", addr.port())
    }

    async fn start(self, op: &FakeOperator) -> RunningCollector {
        self.stop_refusing.cancel();
        let listener = self.refusing.await.unwrap();
        let collector = Arc::new(Mutex::new(
            Collector::open(
                FileStore::open(self.dir.path(), tenant_keys()).unwrap(),
                Arc::new(portcullis_api::clock::SystemClock),
            )
            .unwrap(),
        ));
        let ingest = Ingest::new(
            collector.clone(),
            TrustDomain::new(TRUST_DOMAIN).unwrap(),
            IngestMetrics::default(),
        );
        let (chain, key) = op.ca.server();
        let tls = server_config(chain, key, op.ca.roots()).unwrap();
        let shutdown = CancellationToken::new();
        tokio::spawn(portcullis_server::serve(
            listener,
            Some(Arc::new(tls).into()),
            move |request| ingest.clone().handle(request),
            shutdown.clone(),
        ));
        RunningCollector {
            collector,
            shutdown,
            _dir: self.dir,
        }
    }
}

impl RunningCollector {
    fn lines(&self) -> Vec<String> {
        self.collector
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entries(TENANT)
            .unwrap()
    }

    /// The request records the collector holds, as (seq, path).
    fn records(&self) -> Vec<(u64, String)> {
        self.lines()
            .iter()
            .filter_map(|line| match Entry::from_json_line(line).unwrap() {
                Entry::Record(record) => Some((record.seq, record.path)),
                Entry::Checkpoint(_) => None,
            })
            .collect()
    }
}

/// A Confidential tenant's injected proxy configured to ship to a collector that is not
/// running yet.
struct ShippingPod {
    op: FakeOperator,
    proxy: portcullis_sidecar::run::proxy::RunningProxy,
    tokens: std::collections::BTreeMap<&'static str, portcullis_crds::ApiToken>,
    collector: Collector0,
    _app: (SocketAddr, CancellationToken),
    _dir: tempfile::TempDir,
}

impl ShippingPod {
    /// With `spool_max_bytes`, or the default room.
    async fn start(spool_max_bytes: Option<u64>) -> Self {
        let op = FakeOperator::start(TRUST_DOMAIN, TENANT).await;
        op.set_audit_key(1, [7u8; 32]);
        let (policy, tokens) = bundle(1, DataClassification::Confidential);
        op.publish(policy);
        let app = echo_app().await;
        let dir = tempfile::tempdir().unwrap();
        let (collector, addr) = Collector0::reserve().await;
        let mut vars = environment(
            &op,
            dir.path(),
            "api-0",
            "acme-prod",
            "api",
            Some(app.0.port()),
        );
        vars.insert(
            "PORTCULLIS_AUDIT_COLLECTOR_URL".into(),
            Collector0::url(addr),
        );
        let mut config = cluster::config(&vars);
        config.audit.ship_retry = RETRY;
        if let Some(bytes) = spool_max_bytes {
            config.audit.spool_max_bytes = bytes;
        }
        let (proxy, _stdout) = cluster::start(config).await;
        wait_ready(&proxy).await;
        Self {
            op,
            proxy,
            tokens,
            collector,
            _app: app,
            _dir: dir,
        }
    }
}

#[tokio::test]
async fn a_collector_outage_refuses_nothing_and_loses_nothing() {
    let ShippingPod {
        op,
        proxy,
        tokens,
        collector: pending,
        _app,
        _dir,
    } = ShippingPod::start(None).await;
    let client = mesh_client_config(&op);
    let headers = [("x-api-key", tokens["events"].expose_secret())];

    // The collector is down (its port closes every connection): a Confidential tenant
    // is still served, because each record is durable in the proxy's spool.
    for i in 0..3 {
        let path = format!("/v1/events/{i}");
        let reply = inbound_request(&client, proxy.inbound_addr, "GET", &path, &headers)
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "request {i} during the outage");
    }

    let collector = pending.start(&op).await;
    wait_until(|| collector.records().len() == 3).await;
    for i in 3..5 {
        let path = format!("/v1/events/{i}");
        let reply = inbound_request(&client, proxy.inbound_addr, "GET", &path, &headers)
            .await
            .unwrap();
        assert_eq!(reply.status, 200);
    }
    wait_until(|| collector.records().len() == 5).await;
    stop(proxy).await;

    let expected: Vec<(u64, String)> = (0..5).map(|i| (i, format!("/v1/events/{i}"))).collect();
    assert_eq!(
        collector.records(),
        expected,
        "exactly one record per request, in order"
    );
    let report = verify_jsonl(
        &collector.lines().join("\n"),
        "collector",
        VerifyOptions::default(),
    )
    .unwrap_or_else(|p| panic!("{p}"));
    assert_eq!(report.records, 5);
}

#[tokio::test]
async fn a_confidential_tenant_is_refused_only_when_the_spool_is_full() {
    // Room for a few records only.
    let ShippingPod {
        op,
        proxy,
        tokens,
        collector: pending,
        _app,
        _dir,
    } = ShippingPod::start(Some(4 * 1024)).await;
    let trail = proxy.audit.clone().unwrap();
    let client = mesh_client_config(&op);
    let headers = [("x-api-key", tokens["events"].expose_secret())];

    let mut served = 0;
    let mut refused = None;
    for i in 0..200 {
        let path = format!("/v1/events/{i}");
        let reply = inbound_request(&client, proxy.inbound_addr, "GET", &path, &headers)
            .await
            .unwrap();
        if reply.status == 200 {
            served += 1;
        } else {
            refused = Some((reply.status, reply.reason()));
            break;
        }
        // Give the writer time to hand the record to the spool.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served >= 1, "the spool had room for at least one record");
    assert_eq!(
        refused,
        Some((503, "audit_unavailable".to_owned())),
        "a full spool refuses a Confidential tenant's requests"
    );

    // The collector comes back and drains the spool: the tenant is served again and
    // every record of a served request arrived.
    let collector = pending.start(&op).await;
    wait_until(|| trail.available()).await;
    let reply = inbound_request(
        &client,
        proxy.inbound_addr,
        "GET",
        "/v1/events/last",
        &headers,
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200);
    let want = served + 1;
    wait_until(|| collector.records().len() >= want).await;
    stop(proxy).await;
    let paths: Vec<String> = collector.records().into_iter().map(|(_, p)| p).collect();
    assert!(
        paths.len() >= want && paths.last().map(String::as_str) == Some("/v1/events/last"),
        "{paths:?}"
    );
}
