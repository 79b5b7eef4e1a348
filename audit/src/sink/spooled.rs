//! A network sink behind a [`Spool`]: writes go to disk, a background task delivers
//! the oldest batch, removes it on 2xx, and retries with exponential backoff otherwise.
//! Permanent errors (4xx other than 408/429) are counted and logged, and the batch stays
//! spooled (retried at the longest backoff) rather than dropped.
//!
//! Once closing, the backoff no longer applies: the spool may live on a pod's scratch
//! space that dies with the process, so a destination that comes back (a restarted
//! collector whose Service endpoint is not programmed yet) is retried every
//! [`CLOSING_RETRY`] until the deadline instead of once.

use super::spool::Spool;
use super::{Deliver, DeliveryError, Sink, SinkFuture, SinkStats};
use crate::entry::Entry;
use crate::error::Error;
use crate::format::json::write_lines;
use crate::retry::{Backoff, RetryPolicy};
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

/// The delay between attempts once the sink is closing.
pub const CLOSING_RETRY: Duration = Duration::from_millis(250);

#[derive(Default)]
struct Counters {
    delivered_batches: AtomicU64,
    delivered_entries: AtomicU64,
    transient_errors: AtomicU64,
    permanent_errors: AtomicU64,
}

/// A [`Deliver`] wrapped in a spool and a delivery task.
pub struct SpooledSink {
    name: String,
    spool: Arc<Spool>,
    wake: Arc<Notify>,
    stop: watch::Sender<Option<Instant>>,
    counters: Arc<Counters>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl SpooledSink {
    /// Starts delivering from `spool` (including batches left by a previous process) to
    /// `deliver`. Must be called inside a tokio runtime.
    pub fn start<D: Deliver>(spool: Spool, deliver: D, retry: RetryPolicy) -> Self {
        let name = deliver.name().to_string();
        let spool = Arc::new(spool);
        let wake = Arc::new(Notify::new());
        let (stop, stop_rx) = watch::channel(None);
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(deliver_loop(
            spool.clone(),
            deliver,
            retry,
            wake.clone(),
            stop_rx,
            counters.clone(),
        ));
        SpooledSink {
            name,
            spool,
            wake,
            stop,
            counters,
            task: Mutex::new(Some(task)),
        }
    }

    /// Spools a rendered batch of `count` lines on the blocking pool and wakes the
    /// delivery task.
    async fn push_blocking(&self, lines: Bytes, count: usize) -> Result<(), Error> {
        let spool = self.spool.clone();
        super::on_blocking_pool(&self.name, "spool", move || spool.push_lines(lines, count))
            .await?;
        self.wake.notify_one();
        Ok(())
    }
}

/// A spooled batch as read back for its destination.
enum Batch {
    Entries(Vec<Entry>),
    /// JSON lines as spooled, and how many.
    Lines(bytes::Bytes, usize),
}

impl Batch {
    fn len(&self) -> usize {
        match self {
            Batch::Entries(entries) => entries.len(),
            Batch::Lines(_, count) => *count,
        }
    }
}

/// Waits `delay` or until a stop is requested; false when the sink is gone.
async fn pause(stop: &mut watch::Receiver<Option<Instant>>, delay: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        changed = stop.changed() => changed.is_ok(),
    }
}

/// The oldest spooled batch in the form the destination takes. A batch this process
/// spooled is usually still held in memory and comes without a blocking-pool trip.
async fn next_batch(spool: &Arc<Spool>, takes_lines: bool) -> Result<Option<(u64, Batch)>, String> {
    if takes_lines && let Some((id, (lines, count))) = spool.oldest_held_lines() {
        return Ok(Some((id, Batch::Lines(lines, count))));
    }
    let spool = spool.clone();
    let read = tokio::task::spawn_blocking(move || {
        if takes_lines {
            spool
                .oldest_lines()
                .map(|b| b.map(|(id, (lines, count))| (id, Batch::Lines(lines, count))))
        } else {
            spool
                .oldest()
                .map(|b| b.map(|(id, entries)| (id, Batch::Entries(entries))))
        }
    })
    .await;
    match read {
        Ok(batch) => batch.map_err(|e| e.to_string()),
        Err(e) => Err(format!("spool read task failed: {e}")),
    }
}

async fn deliver_loop<D: Deliver>(
    spool: Arc<Spool>,
    deliver: D,
    retry: RetryPolicy,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<Option<Instant>>,
    counters: Arc<Counters>,
) {
    let mut backoff = Backoff::new(retry);
    loop {
        let deadline = *stop.borrow_and_update();
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let (id, batch) = match next_batch(&spool, deliver.takes_lines()).await {
            Ok(Some(batch)) => batch,
            Ok(None) => {
                if deadline.is_some() {
                    break;
                }
                let alive = tokio::select! {
                    _ = wake.notified() => true,
                    changed = stop.changed() => changed.is_ok(),
                };
                if !alive {
                    break;
                }
                continue;
            }
            Err(error) => {
                tracing::error!(sink = deliver.name(), %error, "cannot read audit spool");
                if !pause(&mut stop, backoff.next_delay()).await {
                    break;
                }
                continue;
            }
        };
        let delivered = match &batch {
            Batch::Entries(entries) => deliver.deliver(entries).await,
            Batch::Lines(lines, _) => deliver.deliver_lines(lines.clone()).await,
        };
        match delivered {
            Ok(()) => {
                if let Err(e) = spool.ack(id) {
                    tracing::error!(sink = deliver.name(), error = %e, "cannot remove delivered audit batch; it will be sent again");
                }
                counters.delivered_batches.fetch_add(1, Ordering::Relaxed);
                counters
                    .delivered_entries
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                backoff.reset();
            }
            Err(DeliveryError::Transient(message)) => {
                counters.transient_errors.fetch_add(1, Ordering::Relaxed);
                let delay = match deadline {
                    Some(_) => CLOSING_RETRY,
                    None => backoff.next_delay(),
                };
                tracing::warn!(sink = deliver.name(), %message, retry_in = ?delay, "audit delivery failed; batch kept in spool");
                if !pause(&mut stop, delay).await {
                    break;
                }
            }
            Err(DeliveryError::Permanent { status, message }) => {
                counters.permanent_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(sink = deliver.name(), status, %message, "audit sink refused the batch (check its URL, token and index); batch kept in spool");
                // A refusal does not change in the seconds a close has left.
                if deadline.is_some() {
                    break;
                }
                if !pause(&mut stop, backoff.max_delay()).await {
                    break;
                }
            }
        }
    }
}

impl Drop for SpooledSink {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
    }
}

impl Sink for SpooledSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn write<'a>(&'a self, entries: &'a [Entry]) -> SinkFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let mut lines = Vec::new();
            write_lines(entries, &mut lines)?;
            self.push_blocking(Bytes::from(lines), entries.len()).await
        })
    }

    fn write_rendered<'a>(
        &'a self,
        entries: &'a [Entry],
        lines: &'a Bytes,
    ) -> SinkFuture<'a, Result<(), Error>> {
        Box::pin(self.push_blocking(lines.clone(), entries.len()))
    }

    fn close(&self, deadline: Instant) -> SinkFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let _ = self.stop.send(Some(deadline));
            let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(mut task) = task {
                let grace = tokio::time::Instant::from_std(deadline) + Duration::from_secs(1);
                if tokio::time::timeout_at(grace, &mut task).await.is_err() {
                    task.abort();
                }
            }
            let left = self.spool.batches();
            if left > 0 {
                tracing::warn!(sink = %self.name, batches = left, "audit batches undelivered at exit: the next process to open this spool sends them (they are lost if the spool's directory goes with the pod)");
            }
            Ok(())
        })
    }

    fn stats(&self) -> SinkStats {
        SinkStats {
            delivered_batches: self.counters.delivered_batches.load(Ordering::Relaxed),
            delivered_entries: self.counters.delivered_entries.load(Ordering::Relaxed),
            transient_errors: self.counters.transient_errors.load(Ordering::Relaxed),
            permanent_errors: self.counters.permanent_errors.load(Ordering::Relaxed),
            spool_bytes: self.spool.used_bytes(),
            spool_batches: self.spool.batches(),
        }
    }
}
