//! The audit seam: one record per request (allowed and denied), masked principals, and
//! fail-closed tenants refusing requests when the audit cannot be written.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use portcullis_crds::DataClassification;
use portcullis_sidecar::audit::{AuditHook, AuditRefused, Decision, RequestOutcome};
use support::{Harness, Identity, Options};

#[derive(Default)]
struct Recorder {
    records: Mutex<Vec<RequestOutcome>>,
    refuse: AtomicBool,
    unavailable: AtomicBool,
}

impl AuditHook for Recorder {
    fn record(&self, event: RequestOutcome) -> Result<(), AuditRefused> {
        if self.refuse.load(Ordering::SeqCst) {
            return Err(AuditRefused("disk full".into()));
        }
        self.records.lock().unwrap().push(event);
        Ok(())
    }

    fn available(&self) -> bool {
        !self.unavailable.load(Ordering::SeqCst)
    }
}

async fn harness(classification: DataClassification) -> (Harness, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::default());
    let h = Harness::start(Options {
        classification,
        audit: recorder.clone(),
        ..Options::default()
    })
    .await;
    (h, recorder)
}

#[tokio::test]
async fn every_request_gets_one_record_without_secrets() {
    let (h, recorder) = harness(DataClassification::Internal).await;
    let client = h.client(Identity::Anonymous);
    let key = h.token("events");
    assert_eq!(
        client
            .get("/v1/events/7?token=abc", &[("x-api-key", key)])
            .await
            .status,
        200
    );
    assert_eq!(
        client
            .get("/v1/identify", &[("x-api-key", key)])
            .await
            .status,
        403
    );
    let records = recorder.records.lock().unwrap().clone();
    assert_eq!(records.len(), 2);
    let allowed = &records[0];
    assert_eq!(allowed.action, "api.events");
    assert_eq!(
        allowed.principal,
        format!("key:{}", h.tokens["events"].masked())
    );
    assert_eq!(
        (allowed.status, allowed.decision, allowed.reason),
        (200, Decision::Allow, "allowed")
    );
    assert_eq!(allowed.path, "/v1/events/7", "no query string in audit");
    assert_eq!(allowed.tenant, "acme");
    assert_eq!(allowed.client_ip.to_string(), "127.0.0.1");
    let denied = &records[1];
    assert_eq!(
        (denied.status, denied.decision, denied.reason),
        (403, Decision::Deny, "no_scope_for_route")
    );
    for record in &records {
        assert!(!format!("{record:?}").contains(key));
    }
}

#[tokio::test]
async fn fail_closed_tenants_refuse_when_audit_fails() {
    let (h, recorder) = harness(DataClassification::Confidential).await;
    let client = h.client(Identity::Anonymous);
    let key = h.token("events");
    assert_eq!(
        client
            .get("/v1/events/1", &[("x-api-key", key)])
            .await
            .status,
        200
    );
    recorder.refuse.store(true, Ordering::SeqCst);
    let refused = client.get("/v1/events/1", &[("x-api-key", key)]).await;
    assert_eq!(
        (refused.status, refused.reason().as_str()),
        (503, "audit_unavailable")
    );
    recorder.refuse.store(false, Ordering::SeqCst);
    recorder.unavailable.store(true, Ordering::SeqCst);
    let refused = client.get("/v1/events/1", &[("x-api-key", key)]).await;
    assert_eq!(
        (refused.status, refused.reason().as_str()),
        (503, "audit_unavailable")
    );
    assert_eq!(h.denials("audit_unavailable", 503), 2.0);
}

#[tokio::test]
async fn fail_open_tenants_keep_serving_when_audit_fails() {
    let (h, recorder) = harness(DataClassification::Internal).await;
    recorder.refuse.store(true, Ordering::SeqCst);
    recorder.unavailable.store(true, Ordering::SeqCst);
    let client = h.client(Identity::Anonymous);
    assert_eq!(
        client
            .get("/v1/events/1", &[("x-api-key", h.token("events"))])
            .await
            .status,
        200
    );
}

/// A sink that takes nothing until `open`: the audit pipeline backs up, as when the
/// disk or the log shipper stalls.
struct StalledSink {
    inner: portcullis_audit::sink::memory::MemorySink,
    gate: tokio::sync::Semaphore,
}

impl portcullis_audit::sink::Sink for StalledSink {
    fn name(&self) -> &str {
        "stalled"
    }

    fn write<'a>(
        &'a self,
        entries: &'a [portcullis_audit::Entry],
    ) -> portcullis_audit::sink::SinkFuture<'a, Result<(), portcullis_audit::Error>> {
        Box::pin(async move {
            let _pass = self.gate.acquire().await;
            self.inner.write(entries).await
        })
    }

    fn close(
        &self,
        deadline: std::time::Instant,
    ) -> portcullis_audit::sink::SinkFuture<'_, Result<(), portcullis_audit::Error>> {
        self.inner.close(deadline)
    }

    fn stats(&self) -> portcullis_audit::sink::SinkStats {
        self.inner.stats()
    }
}

/// The app: counts the requests that reach it.
async fn counting_app(hits: Arc<std::sync::atomic::AtomicUsize>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let hits = hits.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_request| {
                    hits.fetch_add(1, Ordering::SeqCst);
                    async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from_static(b"{}")),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_stalled_audit_log_lets_no_unaudited_request_reach_the_app() {
    use portcullis_audit::{
        AuditWriter, CheckpointSigner, Entry, SignerIdentity, WriterConfig,
        sink::memory::MemorySink,
    };
    use portcullis_sidecar::audit::trail::AuditTrail;

    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = counting_app(hits.clone()).await;
    let memory = MemorySink::new();
    let sink = Arc::new(StalledSink {
        inner: memory.clone(),
        gate: tokio::sync::Semaphore::new(0),
    });
    let trail = AuditTrail::new("api-0");
    let signer = CheckpointSigner::from_pkcs8(
        &CheckpointSigner::generate_pkcs8().unwrap(),
        SignerIdentity::default(),
    )
    .unwrap();
    // Room for two records in memory, one per batch: the third waits on the sink.
    let mut config = WriterConfig::new("api-0-chain");
    config.channel_capacity = 2;
    config.batch_max = 1;
    config.batch_linger = std::time::Duration::from_millis(1);
    trail.start(AuditWriter::start(
        config,
        signer,
        vec![trail.watch(sink.clone())],
    ));
    let h = Harness::start(Options {
        classification: DataClassification::Confidential,
        audit: trail.clone(),
        app_port: Some(app.port()),
        ..Options::default()
    })
    .await;
    let client = h.client(Identity::Anonymous);
    let key = h.token("events");
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let reply = client.get("/v1/events/1", &[("x-api-key", key)]).await;
        if reply.status != 200 {
            assert_eq!(
                (reply.status, reply.reason().as_str()),
                (503, "audit_unavailable")
            );
        }
        statuses.push(reply.status);
    }
    assert!(
        statuses.contains(&503),
        "the stalled log must refuse some: {statuses:?}"
    );

    // The log recovers and writes everything it took.
    sink.gate.add_permits(1_000);
    let allowed_records = || {
        memory
            .entries()
            .iter()
            .filter(|e| matches!(e, Entry::Record(r) if r.decision == portcullis_audit::Decision::Allow))
            .count()
    };
    let served = statuses.iter().filter(|s| **s == 200).count();
    support::wait_until(|| allowed_records() >= served).await;
    assert_eq!(
        hits.load(Ordering::SeqCst),
        allowed_records(),
        "every request the app saw has its record ({statuses:?})"
    );
    trail.shutdown(std::time::Duration::from_secs(2)).await;
}
