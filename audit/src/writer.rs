//! The writer pipeline the proxy (and the operator) submit records to.
//!
//! `try_submit` puts a record on a bounded channel without waiting. One task takes
//! records off in batches, links them into the [`Chain`] (so `seq` is the channel order,
//! whatever the timestamps say), adds a signed [`crate::Checkpoint`] every N records and
//! every T seconds, and hands each batch to every sink, retrying a failing sink with
//! backoff until it takes the batch. While a sink cannot take batches (network sinks:
//! when their spool is full) the channel fills up; then, per [`FailureMode`],
//! `try_submit` either refuses (the proxy answers 503) or drops the record and counts it.
//! Records are dropped only before they are chained, so a chain never has gaps.

use crate::chain::Chain;
use crate::checkpoint::{CheckpointPolicy, CheckpointSigner};
use crate::clock::{Clock, SystemClock};
use crate::entry::Entry;
use crate::error::Error;
use crate::record::AuditRecord;
use crate::retry::{Backoff, RetryPolicy};
use crate::sink::{Sink, SinkStats};
use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// What to do with a request whose audit record cannot be accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    /// Refuse the request (Confidential and Restricted tenants).
    FailClosed,
    /// Let the request through, drop the record, count and log it.
    FailOpen,
}

/// Writer settings.
pub struct WriterConfig {
    /// Chain id for every record of this writer ([`Chain::new_id`]).
    pub chain_id: String,
    /// Records that may wait in memory.
    pub channel_capacity: usize,
    /// Most records per batch.
    pub batch_max: usize,
    /// How long to wait for more records before writing a partial batch.
    pub batch_linger: Duration,
    /// When to make checkpoints.
    pub checkpoint: CheckpointPolicy,
    /// Refuse or drop when full.
    pub failure_mode: FailureMode,
    /// Backoff when a sink fails to take a batch.
    pub sink_retry: RetryPolicy,
    /// Time source for checkpoint timestamps.
    pub clock: Arc<dyn Clock>,
}

impl WriterConfig {
    /// Defaults: 10 000 records of queue, batches of up to 512 records, 50 ms linger,
    /// a checkpoint every 1000 records or 60 s, fail-closed. Every batch costs each
    /// file and spool sink an fsync (about 200 µs of CPU here, whatever its size), so
    /// batches are made large: 512 records stay under Datadog's 1000 entries per
    /// request and the collector's 8 MiB, and 50 ms bounds what a crash can lose.
    pub fn new(chain_id: impl Into<String>) -> Self {
        WriterConfig {
            chain_id: chain_id.into(),
            channel_capacity: 10_000,
            batch_max: 512,
            batch_linger: Duration::from_millis(50),
            checkpoint: CheckpointPolicy::default(),
            failure_mode: FailureMode::FailClosed,
            sink_retry: RetryPolicy::default(),
            clock: Arc::new(SystemClock),
        }
    }
}

/// How `try_submit` handled a record it did not refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Queued for writing.
    Queued,
    /// Dropped (fail-open) and counted in [`WriterStats::dropped`].
    Dropped,
}

/// Why a record was refused (fail-closed). The proxy answers 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The queue is full because sinks are not keeping up or failing.
    #[error("audit trail cannot accept records (queue full, sinks failing or spool full)")]
    Unavailable,
    /// The writer has shut down.
    #[error("audit writer is shut down")]
    Closed,
}

/// Room for one record in the writer's queue, from [`AuditWriter::try_reserve`]. Filling
/// it cannot fail; dropping it unfilled gives the room back.
pub struct RecordSlot {
    permit: mpsc::OwnedPermit<AuditRecord>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RecordSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordSlot").finish_non_exhaustive()
    }
}

impl RecordSlot {
    /// Queues `record` in the reserved room.
    pub fn fill(self, record: AuditRecord) {
        self.shared
            .counters
            .submitted
            .fetch_add(1, Ordering::Relaxed);
        self.permit.send(record);
    }
}

#[derive(Default)]
struct Counters {
    submitted: AtomicU64,
    dropped: AtomicU64,
    refused: AtomicU64,
    records_written: AtomicU64,
    checkpoints_written: AtomicU64,
    sink_write_errors: AtomicU64,
    lost_at_shutdown: AtomicU64,
    sinks_blocked: AtomicBool,
}

/// Counters for the proxy's metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Records offered.
    pub submitted: u64,
    /// Records dropped (fail-open).
    pub dropped: u64,
    /// Records refused (fail-closed).
    pub refused: u64,
    /// Records every sink has taken.
    pub records_written: u64,
    /// Checkpoints made.
    pub checkpoints_written: u64,
    /// Failed sink writes (each retried).
    pub sink_write_errors: u64,
    /// Chained records given up at shutdown because a sink would not take them.
    pub lost_at_shutdown: u64,
    /// True while some sink is refusing batches.
    pub sinks_blocked: bool,
    /// Records waiting in the queue.
    pub queued: usize,
    /// Per sink: name and its own counters.
    pub sinks: Vec<(String, SinkStats)>,
}

struct Shared {
    counters: Counters,
    signer: Mutex<CheckpointSigner>,
    sinks: Vec<Arc<dyn Sink>>,
}

/// The running pipeline. Share it behind an `Arc`; call [`AuditWriter::shutdown`] once.
pub struct AuditWriter {
    tx: mpsc::Sender<AuditRecord>,
    shared: Arc<Shared>,
    failure_mode: FailureMode,
    stop: watch::Sender<Option<Instant>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl AuditWriter {
    /// Starts the writer task. Must be called inside a tokio runtime.
    pub fn start(
        config: WriterConfig,
        signer: CheckpointSigner,
        sinks: Vec<Arc<dyn Sink>>,
    ) -> AuditWriter {
        let (tx, rx) = mpsc::channel(config.channel_capacity.max(1));
        let (stop, stop_rx) = watch::channel(None);
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            signer: Mutex::new(signer),
            sinks,
        });
        let failure_mode = config.failure_mode;
        let task = tokio::spawn(run(config, rx, stop_rx, shared.clone()));
        AuditWriter {
            tx,
            shared,
            failure_mode,
            stop,
            task: Mutex::new(Some(task)),
        }
    }

    /// Offers a record without waiting. `Err` only in fail-closed mode: refuse the request.
    pub fn try_submit(&self, record: AuditRecord) -> Result<Accepted, SubmitError> {
        let c = &self.shared.counters;
        c.submitted.fetch_add(1, Ordering::Relaxed);
        let closed = match self.tx.try_send(record) {
            Ok(()) => return Ok(Accepted::Queued),
            Err(mpsc::error::TrySendError::Full(_)) => false,
            Err(mpsc::error::TrySendError::Closed(_)) => true,
        };
        match self.failure_mode {
            FailureMode::FailClosed => {
                let n = c.refused.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() || n.is_multiple_of(1000) {
                    tracing::error!(
                        refused_total = n,
                        "AUDIT UNAVAILABLE: refusing requests (fail-closed)"
                    );
                }
                Err(if closed {
                    SubmitError::Closed
                } else {
                    SubmitError::Unavailable
                })
            }
            FailureMode::FailOpen => {
                let n = c.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() || n.is_multiple_of(1000) {
                    tracing::error!(
                        dropped_total = n,
                        "AUDIT RECORDS DROPPED: sinks cannot keep up (fail-open)"
                    );
                }
                Ok(Accepted::Dropped)
            }
        }
    }

    /// Holds room in the queue for one record before the action it records happens, so
    /// a fail-closed caller can refuse up front instead of acting and then failing to
    /// record. Refused when the queue is full, a sink is refusing batches (the write
    /// path is not known to work) or the writer has shut down.
    pub fn try_reserve(&self) -> Result<RecordSlot, SubmitError> {
        let c = &self.shared.counters;
        let refuse = |error| {
            c.refused.fetch_add(1, Ordering::Relaxed);
            error
        };
        if c.sinks_blocked.load(Ordering::Relaxed) {
            return Err(refuse(SubmitError::Unavailable));
        }
        match self.tx.clone().try_reserve_owned() {
            Ok(permit) => Ok(RecordSlot {
                permit,
                shared: self.shared.clone(),
            }),
            Err(mpsc::error::TrySendError::Full(_)) => Err(refuse(SubmitError::Unavailable)),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(refuse(SubmitError::Closed)),
        }
    }

    /// Offers a record, waiting for room (for callers that may wait, e.g. admin actions).
    pub async fn submit(&self, record: AuditRecord) -> Result<(), SubmitError> {
        self.shared
            .counters
            .submitted
            .fetch_add(1, Ordering::Relaxed);
        self.tx.send(record).await.map_err(|_| SubmitError::Closed)
    }

    /// Uses `signer` for the next checkpoints (after a workload certificate rotation).
    pub fn replace_signer(&self, signer: CheckpointSigner) {
        *self.shared.signer.lock().unwrap_or_else(|p| p.into_inner()) = signer;
    }

    /// Current counters.
    pub fn stats(&self) -> WriterStats {
        let c = &self.shared.counters;
        WriterStats {
            submitted: c.submitted.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            records_written: c.records_written.load(Ordering::Relaxed),
            checkpoints_written: c.checkpoints_written.load(Ordering::Relaxed),
            sink_write_errors: c.sink_write_errors.load(Ordering::Relaxed),
            lost_at_shutdown: c.lost_at_shutdown.load(Ordering::Relaxed),
            sinks_blocked: c.sinks_blocked.load(Ordering::Relaxed),
            queued: self.tx.max_capacity() - self.tx.capacity(),
            sinks: self
                .shared
                .sinks
                .iter()
                .map(|s| (s.name().to_string(), s.stats()))
                .collect(),
        }
    }

    /// Stops taking records, writes what is queued plus a final checkpoint, and closes the
    /// sinks, giving them up to `drain` (network sinks keep undelivered batches spooled).
    pub async fn shutdown(&self, drain: Duration) {
        let deadline = Instant::now() + drain;
        let _ = self.stop.send(Some(deadline));
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut task) = task {
            let grace = tokio::time::Instant::from_std(deadline) + Duration::from_secs(2);
            if tokio::time::timeout_at(grace, &mut task).await.is_err() {
                tracing::error!("audit writer did not finish in time; queued records lost");
                task.abort();
            }
        }
    }
}

impl Drop for AuditWriter {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
    }
}

struct Pipeline {
    config: WriterConfig,
    shared: Arc<Shared>,
    chain: Chain,
    since_checkpoint: u64,
    stop: watch::Receiver<Option<Instant>>,
}

async fn run(
    config: WriterConfig,
    mut rx: mpsc::Receiver<AuditRecord>,
    stop: watch::Receiver<Option<Instant>>,
    shared: Arc<Shared>,
) {
    let mut ticker = tokio::time::interval(config.checkpoint.every.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut pipeline = Pipeline {
        chain: Chain::new(config.chain_id.clone()),
        config,
        shared,
        since_checkpoint: 0,
        stop,
    };
    let mut stopping = false;
    loop {
        let first = tokio::select! {
            record = rx.recv() => match record {
                Some(record) => record,
                None => break,
            },
            _ = ticker.tick() => {
                pipeline.checkpoint_if_pending().await;
                continue;
            }
            _ = pipeline.stop.changed(), if !stopping => {
                stopping = true;
                rx.close();
                continue;
            }
        };
        let records = collect_batch(first, &mut rx, &pipeline.config, stopping).await;
        pipeline.write_records(records).await;
    }
    pipeline.checkpoint_if_pending().await;
    let deadline = pipeline.deadline().unwrap_or_else(Instant::now);
    for sink in &pipeline.shared.sinks {
        if let Err(e) = sink.close(deadline).await {
            tracing::error!(sink = sink.name(), error = %e, "closing audit sink failed");
        }
    }
}

/// A batch's entries and their JSON lines, rendered once for every sink.
struct RenderedBatch {
    entries: Vec<Entry>,
    lines: Vec<u8>,
}

impl RenderedBatch {
    fn with_capacity(entries: usize) -> Self {
        RenderedBatch {
            entries: Vec::with_capacity(entries),
            lines: Vec::with_capacity(entries * 512),
        }
    }

    /// Adds a checkpoint (records come through [`Chain::append_rendered`]). One whose
    /// line cannot be written is left out; the next checkpoint covers its records.
    fn push(&mut self, entry: Entry) {
        let start = self.lines.len();
        match entry.write_json_line(&mut self.lines) {
            Ok(()) => {
                self.lines.push(b'\n');
                self.entries.push(entry);
            }
            Err(e) => {
                self.lines.truncate(start);
                tracing::error!(error = %e, "audit checkpoint could not be serialised; left out");
            }
        }
    }
}

/// How often a lingering batch looks for more records: a tenth of the linger, within
/// these bounds. Each look is a timer wake-up of the writer, so fewer looks cost less at
/// low rates; a batch that fills up is noticed at most one tick late.
const COLLECT_TICK_MIN: Duration = Duration::from_millis(1);
const COLLECT_TICK_MAX: Duration = Duration::from_millis(5);

/// A batch starting with `first`: what is queued, then what arrives until the batch is
/// full or `batch_linger` has passed. It looks at the queue every tick
/// instead of waiting on it, because waiting woke the writer (and armed a timer) for
/// every single record, which cost more than hashing the record.
async fn collect_batch(
    first: AuditRecord,
    rx: &mut mpsc::Receiver<AuditRecord>,
    config: &WriterConfig,
    stopping: bool,
) -> Vec<AuditRecord> {
    let batch_max = config.batch_max.max(1);
    let mut records = Vec::with_capacity(batch_max.min(rx.len() + 1));
    records.push(first);
    let linger_until = tokio::time::Instant::now() + config.batch_linger;
    let tick = (config.batch_linger / 10).clamp(COLLECT_TICK_MIN, COLLECT_TICK_MAX);
    loop {
        let mut disconnected = false;
        while records.len() < batch_max {
            match rx.try_recv() {
                Ok(record) => records.push(record),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    disconnected = true;
                    break;
                }
            }
        }
        let now = tokio::time::Instant::now();
        if records.len() >= batch_max || disconnected || stopping || now >= linger_until {
            return records;
        }
        tokio::time::sleep_until(linger_until.min(now + tick)).await;
    }
}

impl Pipeline {
    fn deadline(&self) -> Option<Instant> {
        *self.stop.borrow()
    }

    async fn write_records(&mut self, records: Vec<AuditRecord>) {
        let every = self.config.checkpoint.every_records.max(1);
        let mut batch = RenderedBatch::with_capacity(records.len() + 1);
        let mut linked = 0u64;
        for record in records {
            match self.chain.append_rendered(record, &mut batch.lines) {
                Ok(record) => {
                    batch.entries.push(Entry::Record(record));
                    linked += 1;
                    self.since_checkpoint += 1;
                    if self.since_checkpoint >= every
                        && let Some(checkpoint) = self.make_checkpoint()
                    {
                        batch.push(checkpoint);
                    }
                }
                Err(e) => {
                    self.shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, "audit record could not be serialised; dropped");
                }
            }
        }
        if self.deliver(batch).await {
            self.shared
                .counters
                .records_written
                .fetch_add(linked, Ordering::Relaxed);
        }
    }

    fn make_checkpoint(&mut self) -> Option<Entry> {
        let (seq, hash) = self.chain.head()?;
        let now = self.config.clock.now();
        let signed = self
            .shared
            .signer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sign(self.chain.id(), seq, hash, now);
        match signed {
            Ok(checkpoint) => {
                self.since_checkpoint = 0;
                self.shared
                    .counters
                    .checkpoints_written
                    .fetch_add(1, Ordering::Relaxed);
                Some(Entry::Checkpoint(checkpoint))
            }
            Err(e) => {
                tracing::error!(error = %e, "audit checkpoint signing failed");
                None
            }
        }
    }

    async fn checkpoint_if_pending(&mut self) {
        if self.since_checkpoint > 0
            && let Some(checkpoint) = self.make_checkpoint()
        {
            let mut batch = RenderedBatch::with_capacity(1);
            batch.push(checkpoint);
            self.deliver(batch).await;
        }
    }

    /// Hands `batch` to every sink, retrying each until it takes it; gives up only
    /// past the shutdown deadline. True when every sink took it.
    async fn deliver(&mut self, batch: RenderedBatch) -> bool {
        let entries = batch.entries.as_slice();
        let lines = Bytes::from(batch.lines);
        let mut all = true;
        for sink in &self.shared.sinks {
            all &= self.write_to(sink.as_ref(), entries, Some(&lines)).await;
        }
        if all {
            self.shared
                .counters
                .sinks_blocked
                .store(false, Ordering::Relaxed);
        }
        all
    }

    /// Writes `entries` to one sink, retrying until it takes them or the shutdown
    /// deadline passes. A batch larger than the sink's whole spool goes in halves
    /// (which the sink renders itself): waiting for room it can never have would stop
    /// the trail for good (a batch grows while the sink is down).
    fn write_to<'a>(
        &'a self,
        sink: &'a dyn Sink,
        entries: &'a [Entry],
        lines: Option<&'a Bytes>,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'a>> {
        Box::pin(async move {
            let counters = &self.shared.counters;
            let mut backoff = Backoff::new(self.config.sink_retry);
            let mut failures = 0u64;
            loop {
                let written = match lines {
                    Some(lines) => sink.write_rendered(entries, lines).await,
                    None => sink.write(entries).await,
                };
                let error = match written {
                    Ok(()) => return true,
                    Err(e) => e,
                };
                if let Error::SpoolFull { max, needed, .. } = error
                    && needed > max
                    && entries.len() > 1
                {
                    let (first, rest) = entries.split_at(entries.len() / 2);
                    return self.write_to(sink, first, None).await
                        && self.write_to(sink, rest, None).await;
                }
                failures += 1;
                counters.sink_write_errors.fetch_add(1, Ordering::Relaxed);
                counters.sinks_blocked.store(true, Ordering::Relaxed);
                if failures.is_power_of_two() {
                    tracing::error!(sink = sink.name(), error = %error, attempts = failures, "audit sink cannot take records; retrying");
                }
                if self.deadline().is_some_and(|d| Instant::now() >= d) {
                    counters
                        .lost_at_shutdown
                        .fetch_add(entries.len() as u64, Ordering::Relaxed);
                    tracing::error!(
                        sink = sink.name(),
                        entries = entries.len(),
                        "audit entries not written before shutdown deadline"
                    );
                    return false;
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        })
    }
}
