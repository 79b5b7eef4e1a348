//! SIEM forwarding from the collector: each tenant's log, as stored, to the Splunk HEC
//! and Datadog sinks its Tenant names (`spec.audit.sinks`), so no SIEM token ever sits
//! in an application pod.
//!
//! The stored log is the spool. Every sink has its own cursor in it, saved durably after
//! each batch the SIEM accepted, so a SIEM outage loses nothing while retention keeps
//! the days, a collector restart resends at most the batch in flight (delivery is at
//! least once, like every log shipper's), and one slow sink never holds back another.
//! A sink seen for the first time starts at the start of the previous UTC day's log, so
//! a sink added with a new tenant misses nothing of its first records, whatever the hour
//! the collector first notices the log.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use portcullis_audit::entry::Entry;
use portcullis_audit::retry::{Backoff, RetryPolicy};
use portcullis_audit::seal::Seal;
use portcullis_audit::sink::{Deliver, DeliveryError};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::collector::{Collector, Found, blocking};
use crate::store::{Position, RecordStore, StoreError};

/// About this many bytes of a log go in one request (a few hundred records: under
/// Datadog's 1,000 entries and Splunk's default 1 MB per request).
pub const BATCH_BYTES: usize = 128 * 1024;

/// How often an idle forwarder looks at its log without being told of an append.
const IDLE_POLL: Duration = Duration::from_secs(5);

/// Per tenant, a counter bumped on every append, so forwarders wait instead of polling.
#[derive(Debug, Clone, Default)]
pub struct AppendSignal {
    tenants: Arc<Mutex<HashMap<String, watch::Sender<u64>>>>,
}

impl AppendSignal {
    /// Bumps `tenant`'s counter (when someone follows it).
    pub fn appended(&self, tenant: &str) {
        let tenants = self.tenants.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(sender) = tenants.get(tenant) {
            sender.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Follows `tenant`'s appends.
    pub fn follow(&self, tenant: &str) -> watch::Receiver<u64> {
        let mut tenants = self.tenants.lock().unwrap_or_else(PoisonError::into_inner);
        tenants
            .entry(tenant.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }
}

/// One SIEM sink of a tenant, as the cluster describes it now.
pub struct SinkTarget {
    /// Stable while the sink sends to the same place (a token rotation keeps it): names
    /// the sink's cursor. A DNS label: `splunk-hec-<digest>` or `datadog-<digest>`.
    pub id: String,
    /// Changes with anything about the sink, its token included: a changed sink's
    /// forwarder is restarted with the new settings, from its cursor.
    pub fingerprint: [u8; 32],
    /// The client, or why there is none (a Secret missing, a key absent): shown in the
    /// log; a forwarder already running keeps its last good settings.
    pub deliver: Result<Arc<dyn Deliver>, String>,
}

/// Where a tenant's sinks come from (its Tenant and the Secrets it names).
pub trait SinkDirectory: Send + Sync + 'static {
    /// `tenant`'s sinks; `Err` when that cannot be known now (running forwarders keep
    /// going), `Ok(empty)` when it has none (running forwarders stop).
    fn sinks(&self, tenant: &str) -> impl Future<Output = Result<Vec<SinkTarget>, String>> + Send;
}

/// Told when a sink cannot be used or refuses what it is sent (a Warning Event on the
/// Tenant in a cluster), so the fix is visible where the sink is configured.
pub trait SinkObserver: Send + Sync {
    /// `sink` of `tenant` is failing for `problem` (records wait in the log meanwhile).
    fn sink_failing(&self, tenant: &str, sink: &str, problem: &str);
}

/// No SIEM sinks: a collector running without the API server to ask.
#[derive(Debug, Clone, Copy)]
pub struct NoSinks;

impl SinkDirectory for NoSinks {
    async fn sinks(&self, _tenant: &str) -> Result<Vec<SinkTarget>, String> {
        Ok(Vec::new())
    }
}

/// `tenant` and `sink` labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabels {
    tenant: String,
    sink: String,
}

/// `tenant`, `sink` and `error` (`transient` or `permanent`) labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    tenant: String,
    sink: String,
    error: String,
}

/// Forwarding metrics; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct ForwardMetrics {
    forwarded: Family<SinkLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
}

impl ForwardMetrics {
    /// Creates the metrics and registers them in `registry`:
    /// `portcullis_audit_forwarded_entries_total{tenant,sink}` and
    /// `portcullis_audit_forward_failures_total{tenant,sink,error}`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "portcullis_audit_forwarded_entries",
            "Entries a SIEM sink accepted, by tenant and sink",
            metrics.forwarded.clone(),
        );
        registry.register(
            "portcullis_audit_forward_failures",
            "Batches a SIEM sink did not accept (kept and retried), by tenant, sink and error",
            metrics.failures.clone(),
        );
        metrics
    }
}

/// One running forwarder.
struct Running {
    fingerprint: [u8; 32],
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Keeps one forwarder per (tenant, sink) running as the cluster says.
pub struct Forwarding<S, D> {
    collector: Arc<Mutex<Collector<S>>>,
    directory: D,
    metrics: ForwardMetrics,
    retry: RetryPolicy,
    observer: Option<Arc<dyn SinkObserver>>,
    running: HashMap<(String, String), Running>,
}

impl<S: RecordStore + Send + 'static, D: SinkDirectory> Forwarding<S, D> {
    /// Forwarding of `collector`'s logs to the sinks `directory` names.
    pub fn new(
        collector: Arc<Mutex<Collector<S>>>,
        directory: D,
        metrics: ForwardMetrics,
        retry: RetryPolicy,
    ) -> Self {
        Self {
            collector,
            directory,
            metrics,
            retry,
            observer: None,
            running: HashMap::new(),
        }
    }

    /// Tells `observer` of failing sinks.
    pub fn observe(mut self, observer: Arc<dyn SinkObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Looks at every tenant's sinks now and every `every`, until `shutdown`; then
    /// stops every forwarder (each finishes the request in flight or abandons it: its
    /// cursor says what to resend).
    pub async fn run(mut self, every: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => break,
            }
            if let Err(e) = self.sync().await {
                tracing::warn!(error = %e, "audit forwarding: cannot list the tenant logs");
            }
        }
        self.stop().await;
    }

    /// Stops every forwarder.
    pub async fn stop(mut self) {
        for (_, running) in self.running.drain() {
            running.stop().await;
        }
    }

    /// Starts, restarts and stops forwarders to match what the cluster says now.
    pub async fn sync(&mut self) -> Result<(), StoreError> {
        let tenants = blocking(&self.collector, |c| c.tenants()).await?;
        for tenant in tenants {
            match self.directory.sinks(&tenant).await {
                Ok(targets) => self.sync_tenant(&tenant, targets).await,
                Err(e) => {
                    tracing::warn!(tenant, error = %e, "audit forwarding: cannot read the tenant's sinks; forwarders keep their settings");
                }
            }
        }
        Ok(())
    }

    async fn sync_tenant(&mut self, tenant: &str, targets: Vec<SinkTarget>) {
        let wanted: Vec<String> = targets.iter().map(|t| t.id.clone()).collect();
        let gone: Vec<(String, String)> = self
            .running
            .keys()
            .filter(|(t, id)| t == tenant && !wanted.contains(id))
            .cloned()
            .collect();
        for key in gone {
            if let Some(running) = self.running.remove(&key) {
                running.stop().await;
            }
            let (tenant, id) = key;
            tracing::info!(
                tenant,
                sink = id,
                "audit forwarding: sink removed from the Tenant; its cursor is dropped"
            );
            let forget = blocking(&self.collector, {
                let (tenant, id) = (tenant.clone(), id.clone());
                move |c| c.save_cursor(&tenant, &id, None)
            })
            .await;
            if let Err(e) = forget {
                tracing::warn!(tenant, sink = id, error = %e, "audit forwarding: cannot drop the cursor");
            }
        }
        for target in targets {
            let key = (tenant.to_owned(), target.id.clone());
            let current = self.running.get(&key).map(|r| r.fingerprint);
            if current == Some(target.fingerprint) {
                continue;
            }
            let deliver = match target.deliver {
                Ok(deliver) => deliver,
                Err(problem) => {
                    if let Some(observer) = &self.observer {
                        observer.sink_failing(tenant, &target.id, &problem);
                    }
                    tracing::warn!(
                        tenant,
                        sink = target.id,
                        problem,
                        running = current.is_some(),
                        "audit forwarding: sink not usable as configured; a running forwarder keeps its last good settings"
                    );
                    continue;
                }
            };
            if let Some(running) = self.running.remove(&key) {
                running.stop().await;
            }
            tracing::info!(
                tenant,
                sink = target.id,
                kind = deliver.name(),
                "audit forwarding: forwarder started"
            );
            let stop = CancellationToken::new();
            let forwarder = Forwarder {
                collector: self.collector.clone(),
                tenant: tenant.to_owned(),
                id: target.id.clone(),
                deliver,
                metrics: self.metrics.clone(),
                retry: self.retry,
                observer: self.observer.clone(),
            };
            let task = tokio::spawn(forwarder.run(stop.clone()));
            self.running.insert(
                key,
                Running {
                    fingerprint: target.fingerprint,
                    stop,
                    task,
                },
            );
        }
    }

    /// How many forwarders run.
    pub fn running(&self) -> usize {
        self.running.len()
    }
}

/// Delivers one tenant's log to one sink from its cursor on.
struct Forwarder<S> {
    collector: Arc<Mutex<Collector<S>>>,
    tenant: String,
    id: String,
    deliver: Arc<dyn Deliver>,
    metrics: ForwardMetrics,
    retry: RetryPolicy,
    observer: Option<Arc<dyn SinkObserver>>,
}

impl<S: RecordStore + Send + 'static> Forwarder<S> {
    fn labels(&self) -> SinkLabels {
        SinkLabels {
            tenant: self.tenant.clone(),
            sink: self.id.clone(),
        }
    }

    fn failed(&self, error: &str) {
        self.metrics
            .failures
            .get_or_create(&FailureLabels {
                tenant: self.tenant.clone(),
                sink: self.id.clone(),
                error: error.to_owned(),
            })
            .inc();
    }

    /// The saved cursor, or (first time) the start of yesterday, saved.
    async fn cursor(&self) -> Result<Position, StoreError> {
        let (tenant, id) = (self.tenant.clone(), self.id.clone());
        blocking(&self.collector, move |c| match c.cursor(&tenant, &id)? {
            Some(at) => Ok(at),
            None => {
                let at = c.start_of_yesterday();
                c.save_cursor(&tenant, &id, Some(at))?;
                Ok(at)
            }
        })
        .await
    }

    async fn run(self, stop: CancellationToken) {
        let mut backoff = Backoff::new(self.retry);
        let mut appended = {
            let collector = self
                .collector
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            collector.append_signal().follow(&self.tenant)
        };
        let mut at = loop {
            match self.cursor().await {
                Ok(at) => break at,
                Err(e) => {
                    tracing::error!(tenant = self.tenant, sink = self.id, error = %e, "audit forwarding: cannot read the cursor");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        () = stop.cancelled() => return,
                    }
                }
            }
        };
        backoff.reset();
        loop {
            if stop.is_cancelled() {
                return;
            }
            // Marked seen before reading, so an append during the read wakes the wait.
            appended.mark_unchanged();
            let found = {
                let tenant = self.tenant.clone();
                blocking(&self.collector, move |c| {
                    c.read_from(&tenant, at, BATCH_BYTES)
                })
                .await
            };
            let (lines, next) = match found {
                Ok(Found::Lines { lines, next }) => (lines, next),
                Ok(Found::Nothing) => {
                    tokio::select! {
                        _ = appended.changed() => {}
                        _ = tokio::time::sleep(IDLE_POLL) => {}
                        () = stop.cancelled() => return,
                    }
                    continue;
                }
                Err(e) => {
                    if matches!(e, StoreError::NoKey { .. }) {
                        tracing::info!(
                            tenant = self.tenant,
                            sink = self.id,
                            "audit forwarding: waits for the tenant's data-encryption key"
                        );
                    } else {
                        tracing::error!(tenant = self.tenant, sink = self.id, error = %e, "audit forwarding: cannot read the log");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        () = stop.cancelled() => return,
                    }
                    continue;
                }
            };
            let entries = self.entries(&lines);
            let delivered = if entries.is_empty() {
                Ok(())
            } else {
                tokio::select! {
                    delivered = self.deliver.deliver(&entries) => delivered,
                    () = stop.cancelled() => return,
                }
            };
            let delay = match delivered {
                Ok(()) => {
                    self.metrics
                        .forwarded
                        .get_or_create(&self.labels())
                        .inc_by(entries.len() as u64);
                    backoff.reset();
                    let saved = {
                        let (tenant, id) = (self.tenant.clone(), self.id.clone());
                        blocking(&self.collector, move |c| {
                            c.save_cursor(&tenant, &id, Some(next))
                        })
                        .await
                    };
                    if let Err(e) = saved {
                        // The batch goes again after a restart; the SIEM sees it twice.
                        tracing::warn!(tenant = self.tenant, sink = self.id, error = %e, "audit forwarding: cannot save the cursor");
                    }
                    at = next;
                    continue;
                }
                Err(DeliveryError::Transient(message)) => {
                    self.failed("transient");
                    let delay = backoff.next_delay();
                    tracing::warn!(tenant = self.tenant, sink = self.id, %message, retry_in = ?delay, "audit forwarding: delivery failed; retrying from the same place");
                    delay
                }
                Err(DeliveryError::Permanent { status, message }) => {
                    self.failed("permanent");
                    if let Some(observer) = &self.observer {
                        let problem = format!("the SIEM answered {status}: {message}");
                        observer.sink_failing(&self.tenant, &self.id, &problem);
                    }
                    tracing::error!(tenant = self.tenant, sink = self.id, status, %message, "audit forwarding: the SIEM refused the batch (check the sink's URL, token Secret and index in the Tenant); retrying from the same place");
                    backoff.max_delay()
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// The stored lines as entries; a line that does not parse (never stored by the
    /// collector, which checks every entry on arrival) is logged and left out.
    fn entries(&self, lines: &[String]) -> Vec<Entry> {
        lines
            .iter()
            .filter_map(|line| {
                match serde_json::from_str(line).map_err(|e| e.to_string()).and_then(|v| {
                    // The collector's seals stay with the log; a SIEM gets what pods wrote.
                    if Seal::is_seal_value(&v) {
                        return Ok(None);
                    }
                    Entry::from_value(v).map(Some).map_err(|e| e.to_string())
                }) {
                    Ok(entry) => entry,
                    Err(e) => {
                        tracing::error!(tenant = self.tenant, sink = self.id, error = %e, "audit forwarding: a stored line is not an entry; left out");
                        None
                    }
                }
            })
            .collect()
    }
}
