//! The tamper-evident audit trail behind the [`AuditHook`]: each [`RequestOutcome`]
//! becomes one portcullis-audit [`AuditRecord`] submitted to an [`AuditWriter`] (hash
//! chain, signed checkpoints, sinks).
//!
//! The writer starts once the proxy knows enough to run it (the tenant's classification
//! from the first policy, and in a pod the workload key and the tenant's data key);
//! records of the requests before that wait in a bounded buffer and are chained first.
//! Until the writer runs, and while any sink refuses batches, the trail says it is
//! unavailable, so fail-closed tenants refuse requests (503 `audit_unavailable`)
//! instead of serving them unaudited. For those tenants the inbound path reserves the
//! record's room in the writer's queue before forwarding and fills it after, so a
//! request whose record could not be queued never reaches the app. A record the writer
//! does not queue is refused; fail-open tenants are let through.

use std::{
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use portcullis_audit::{
    Accepted, AuditRecord, AuditWriter, ByteCounts, Entry, FailureMode,
    record::principal,
    sink::{Sink, SinkFuture, SinkStats},
};
use portcullis_crds::DataClassification;

use super::{AuditHook, AuditReadiness, AuditRefused, Decision, RequestOutcome, Reservation};

/// Records kept while the writer is not running yet.
pub const MAX_PENDING: usize = 10_000;

/// The writer's failure mode for a tenant classification (DESIGN.md §6).
pub fn failure_mode(classification: DataClassification) -> FailureMode {
    if classification.audit_fails_closed() {
        FailureMode::FailClosed
    } else {
        FailureMode::FailOpen
    }
}

/// The audit `principal` for the proxy's principal string: keys through
/// [`principal::api_key`] (only the last 3 characters survive), peers through
/// [`principal::spiffe`]. The proxy's own forms (`key:ak_***7f2`, `spiffe://…`) are
/// already those, and are passed on without a copy.
pub fn audit_principal(proxy_principal: String) -> String {
    let masked_as_recorded = |masked: &str| {
        masked
            .strip_prefix("ak_***")
            .is_some_and(|tail| tail.chars().count() == 3)
    };
    match proxy_principal.strip_prefix("key:") {
        Some(masked) if !masked_as_recorded(masked) => principal::api_key(masked),
        // `spiffe://…` is what `principal::spiffe` makes of it, and `anonymous` stays.
        _ => proxy_principal,
    }
}

/// One outcome as an audit record of `pod`.
pub fn to_record(pod: &str, event: RequestOutcome) -> AuditRecord {
    let mut record = AuditRecord::new(
        event.timestamp,
        event.tenant,
        pod,
        event.action,
        audit_principal(event.principal),
    );
    record.client_ip = Some(event.client_ip);
    record.method = event.method;
    record.path = event.path;
    record.status = event.status;
    record.latency_ms = u64::try_from(event.latency.as_millis()).unwrap_or(u64::MAX);
    record.bytes = ByteCounts {
        received: event.bytes_in,
        sent: event.bytes_out,
    };
    record.decision = match event.decision {
        Decision::Allow => portcullis_audit::Decision::Allow,
        Decision::Deny => portcullis_audit::Decision::Deny,
    };
    // The record contract: the denial reason, empty when allowed.
    record.reason = match event.decision {
        Decision::Allow => String::new(),
        Decision::Deny => event.reason.to_owned(),
    };
    record
}

/// Wraps a sink to remember whether its last write failed.
struct WatchedSink {
    inner: Arc<dyn Sink>,
    failing: Arc<AtomicBool>,
}

impl Sink for WatchedSink {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn write<'a>(
        &'a self,
        entries: &'a [Entry],
    ) -> SinkFuture<'a, Result<(), portcullis_audit::Error>> {
        Box::pin(async move {
            let result = self.inner.write(entries).await;
            self.failing.store(result.is_err(), Ordering::SeqCst);
            result
        })
    }

    fn write_rendered<'a>(
        &'a self,
        entries: &'a [Entry],
        lines: &'a bytes::Bytes,
    ) -> SinkFuture<'a, Result<(), portcullis_audit::Error>> {
        Box::pin(async move {
            let result = self.inner.write_rendered(entries, lines).await;
            self.failing.store(result.is_err(), Ordering::SeqCst);
            result
        })
    }

    fn close(
        &self,
        deadline: std::time::Instant,
    ) -> SinkFuture<'_, Result<(), portcullis_audit::Error>> {
        self.inner.close(deadline)
    }

    fn stats(&self) -> SinkStats {
        self.inner.stats()
    }
}

/// The audit hook of a proxy with a tamper-evident trail. Share it behind an `Arc`.
pub struct AuditTrail {
    pod: String,
    writer: OnceLock<AuditWriter>,
    pending: Mutex<Vec<AuditRecord>>,
    failing_sinks: Mutex<Vec<Arc<AtomicBool>>>,
    shut_down: AtomicBool,
    waiting_for_data_key: AtomicBool,
}

impl std::fmt::Debug for AuditTrail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditTrail")
            .field("pod", &self.pod)
            .field("running", &self.is_running())
            .finish_non_exhaustive()
    }
}

impl AuditTrail {
    /// A trail for records of `pod`; not running until [`AuditTrail::start`].
    pub fn new(pod: impl Into<String>) -> Arc<Self> {
        Arc::new(Self {
            pod: pod.into(),
            writer: OnceLock::new(),
            pending: Mutex::new(Vec::new()),
            failing_sinks: Mutex::new(Vec::new()),
            shut_down: AtomicBool::new(false),
            waiting_for_data_key: AtomicBool::new(false),
        })
    }

    /// The `pod` of the records.
    pub fn pod(&self) -> &str {
        &self.pod
    }

    /// Wraps `sink` so the trail knows when it refuses batches. Pass every sink of the
    /// writer through this before [`AuditWriter::start`].
    pub fn watch(&self, sink: Arc<dyn Sink>) -> Arc<dyn Sink> {
        let failing = Arc::new(AtomicBool::new(false));
        self.failing_sinks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(failing.clone());
        Arc::new(WatchedSink {
            inner: sink,
            failing,
        })
    }

    /// Makes `writer` the trail's writer and chains the records that waited for it.
    /// A second call is ignored (the first writer stays).
    pub fn start(&self, writer: AuditWriter) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if self.writer.set(writer).is_err() {
            tracing::warn!("audit writer already running; ignoring a second one");
            return;
        }
        let waiting = std::mem::take(&mut *pending);
        drop(pending);
        if let Some(writer) = self.writer.get() {
            for record in waiting {
                if let Err(e) = writer.try_submit(record) {
                    tracing::error!(error = %e, "audit record of an early request lost");
                }
            }
        }
        tracing::info!(pod = %self.pod, "audit trail running");
    }

    /// Marks the trail as held back for the tenant's data key (fail-closed tenants), so
    /// `/ready` says why it is not ready.
    pub fn set_waiting_for_data_key(&self, waiting: bool) {
        self.waiting_for_data_key.store(waiting, Ordering::SeqCst);
    }

    /// For `/ready`.
    pub fn readiness(&self) -> AuditReadiness {
        if self.shut_down.load(Ordering::SeqCst) {
            AuditReadiness::ShutDown
        } else if self.is_running() {
            AuditReadiness::Ready
        } else if self.waiting_for_data_key.load(Ordering::SeqCst) {
            AuditReadiness::WaitingForDataKey
        } else {
            AuditReadiness::Starting
        }
    }

    /// Whether the writer runs.
    pub fn is_running(&self) -> bool {
        self.writer.get().is_some()
    }

    /// The writer, once running (stats, signer replacement).
    pub fn writer(&self) -> Option<&AuditWriter> {
        self.writer.get()
    }

    /// Writes what is queued and a final checkpoint, giving sinks up to `drain`.
    pub async fn shutdown(&self, drain: Duration) {
        if self.shut_down.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(writer) = self.writer.get() {
            writer.shutdown(drain).await;
        }
    }

    fn submit(writer: &AuditWriter, record: AuditRecord) -> Result<(), AuditRefused> {
        match writer.try_submit(record) {
            Ok(Accepted::Queued) => Ok(()),
            Ok(Accepted::Dropped) => Err(AuditRefused(
                "audit queue full; record dropped (fail-open)".into(),
            )),
            Err(e) => Err(AuditRefused(e.to_string())),
        }
    }
}

impl AuditHook for AuditTrail {
    fn record(&self, event: RequestOutcome) -> Result<(), AuditRefused> {
        let record = to_record(&self.pod, event);
        if let Some(writer) = self.writer.get() {
            return Self::submit(writer, record);
        }
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        // The writer may have started while we waited for the lock.
        if let Some(writer) = self.writer.get() {
            drop(pending);
            return Self::submit(writer, record);
        }
        if pending.len() >= MAX_PENDING {
            return Err(AuditRefused(
                "audit trail not running yet and its buffer is full".into(),
            ));
        }
        pending.push(record);
        Ok(())
    }

    fn reserve(&self) -> Result<Reservation, AuditRefused> {
        let writer = self
            .writer
            .get()
            .filter(|_| self.available())
            .ok_or_else(|| AuditRefused("audit trail not running or a sink is failing".into()))?;
        writer
            .try_reserve()
            .map(Reservation::in_writer)
            .map_err(|e| AuditRefused(e.to_string()))
    }

    fn record_reserved(
        &self,
        reserved: Reservation,
        event: RequestOutcome,
    ) -> Result<(), AuditRefused> {
        match reserved.into_slot() {
            Some(slot) => {
                slot.fill(to_record(&self.pod, event));
                Ok(())
            }
            None => self.record(event),
        }
    }

    fn available(&self) -> bool {
        self.is_running()
            && !self.shut_down.load(Ordering::SeqCst)
            && !self
                .failing_sinks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .any(|failing| failing.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::net::IpAddr;

    use portcullis_audit::{
        CheckpointSigner, SignerIdentity, WriterConfig, sink::memory::MemorySink,
    };

    use super::*;

    fn outcome(principal: &str, decision: Decision, reason: &'static str) -> RequestOutcome {
        RequestOutcome {
            timestamp: jiff::Timestamp::now(),
            tenant: "acme".into(),
            principal: principal.into(),
            action: "api.events".into(),
            client_ip: IpAddr::from([10, 0, 0, 7]),
            method: "GET".into(),
            path: "/v1/events/1".into(),
            status: 200,
            latency: Duration::from_millis(12),
            bytes_in: 5,
            bytes_out: 90,
            decision,
            reason,
        }
    }

    #[test]
    fn records_carry_masked_principals_and_the_record_contract() {
        let record = to_record(
            "api-1",
            outcome("key:ak_***7f2", Decision::Allow, "allowed"),
        );
        assert_eq!(record.principal, "key:ak_***7f2");
        assert_eq!(record.reason, "");
        assert_eq!(record.latency_ms, 12);
        assert_eq!((record.bytes.received, record.bytes.sent), (5, 90));
        let record = to_record(
            "api-1",
            outcome("spiffe://td/ns/a/sa/b", Decision::Deny, "missing_scope"),
        );
        assert_eq!(record.principal, "spiffe://td/ns/a/sa/b");
        assert_eq!(record.reason, "missing_scope");
        assert_eq!(record.decision, portcullis_audit::Decision::Deny);
        // Even a full token would only leave its last 3 characters.
        assert_eq!(
            audit_principal("key:ak_abcdefghijkl_secretsecret".into()),
            "key:ak_***ret"
        );
        assert_eq!(audit_principal("key:ak_***7f2".into()), "key:ak_***7f2");
        assert_eq!(audit_principal("key:ak_***".into()), "key:ak_******");
        assert_eq!(audit_principal("anonymous".into()), "anonymous");
    }

    #[tokio::test]
    async fn early_records_wait_then_a_failing_sink_makes_the_trail_unavailable() {
        let trail = AuditTrail::new("api-1");
        trail
            .record(outcome("anonymous", Decision::Deny, "policy_unavailable"))
            .unwrap();
        assert!(!trail.available(), "not running yet");
        let memory = MemorySink::new();
        let sink = trail.watch(Arc::new(memory.clone()));
        let signer = CheckpointSigner::from_pkcs8(
            &CheckpointSigner::generate_pkcs8().unwrap(),
            SignerIdentity::default(),
        )
        .unwrap();
        let mut config = WriterConfig::new("chain-1");
        config.batch_linger = Duration::from_millis(1);
        config.sink_retry.initial = Duration::from_millis(10);
        trail.start(AuditWriter::start(config, signer, vec![sink]));
        assert!(trail.available());
        trail
            .record(outcome("key:ak_***7f2", Decision::Allow, "allowed"))
            .unwrap();
        for _ in 0..200 {
            if memory.entries().len() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            memory.entries().len(),
            2,
            "the early record is chained first"
        );

        memory.set_failing(true);
        trail
            .record(outcome("key:ak_***7f2", Decision::Allow, "allowed"))
            .unwrap();
        for _ in 0..200 {
            if !trail.available() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            !trail.available(),
            "a failing sink makes the trail unavailable"
        );
        memory.set_failing(false);
        for _ in 0..300 {
            if trail.available() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(trail.available(), "and a recovered one available again");
        trail.shutdown(Duration::from_secs(2)).await;
        assert!(!trail.available());
    }
}
