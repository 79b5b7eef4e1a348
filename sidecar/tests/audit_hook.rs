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
