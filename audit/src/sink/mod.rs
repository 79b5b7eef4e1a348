//! Where audit entries go. Every sink takes whole batches ([`Sink::write`]); network
//! sinks ([`Deliver`] implementations) are wrapped in a [`spooled::SpooledSink`] so a
//! sink outage loses nothing.

pub mod collector;
pub mod datadog;
pub mod file;
pub mod http;
pub mod memory;
pub mod splunk_hec;
pub mod spool;
pub mod spooled;
pub mod stdout;

use crate::entry::Entry;
use crate::error::Error;
use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

/// A boxed future returned by sink methods (keeps [`Sink`] usable as `dyn Sink`).
pub type SinkFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Counters a sink exposes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkStats {
    /// Batches the destination acknowledged.
    pub delivered_batches: u64,
    /// Entries the destination acknowledged.
    pub delivered_entries: u64,
    /// Failed attempts that will be retried (5xx, 408, 429, network).
    pub transient_errors: u64,
    /// Attempts refused for good (other 4xx); the batch stays spooled.
    pub permanent_errors: u64,
    /// Bytes waiting in the spool.
    pub spool_bytes: u64,
    /// Batches waiting in the spool.
    pub spool_batches: u64,
}

/// A destination for batches of entries.
pub trait Sink: Send + Sync {
    /// Short name for logs and metrics (`stdout`, `file`, `splunk_hec`, `datadog`).
    fn name(&self) -> &str;

    /// Takes a batch. `Ok` means the batch is durably the sink's responsibility (written,
    /// or spooled to disk); an error means the caller still holds it and must retry.
    fn write<'a>(&'a self, entries: &'a [Entry]) -> SinkFuture<'a, Result<(), Error>>;

    /// [`Sink::write`] of a batch the writer has already rendered: `lines` holds the
    /// entries' JSON lines, one per entry, in order. Sinks that store JSON lines (file,
    /// spool, stdout) take them as they are instead of rendering every entry again;
    /// the default ignores them.
    fn write_rendered<'a>(
        &'a self,
        entries: &'a [Entry],
        lines: &'a Bytes,
    ) -> SinkFuture<'a, Result<(), Error>> {
        let _ = lines;
        self.write(entries)
    }

    /// Flushes and stops, giving background delivery until `deadline` to drain.
    fn close(&self, deadline: Instant) -> SinkFuture<'_, Result<(), Error>> {
        let _ = deadline;
        Box::pin(async { Ok(()) })
    }

    /// Current counters.
    fn stats(&self) -> SinkStats {
        SinkStats::default()
    }
}

/// Runs a sink's blocking disk work on tokio's blocking pool; `name` and `task` (what
/// the work is) name it in the error if it dies.
async fn on_blocking_pool<T: Send + 'static>(
    name: &str,
    task: &str,
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Sink {
            sink: name.to_owned(),
            message: format!("{task} task failed: {e}"),
        })?
}

/// Why a network delivery failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// Worth retrying: network error, timeout, 5xx, 408, 429.
    #[error("transient delivery failure: {0}")]
    Transient(String),
    /// Not worth retrying as is: other 4xx (bad token, bad index...). The batch is kept.
    #[error("permanent delivery failure (HTTP {status}): {message}")]
    Permanent {
        /// HTTP status.
        status: u16,
        /// Short description (never contains credentials).
        message: String,
    },
}

impl DeliveryError {
    /// Classifies a non-2xx HTTP status.
    pub fn from_status(status: u16, body_excerpt: &str) -> Self {
        if status == 408 || status == 429 || !(400..500).contains(&status) {
            DeliveryError::Transient(format!("HTTP {status}: {body_excerpt}"))
        } else {
            DeliveryError::Permanent {
                status,
                message: body_excerpt.to_string(),
            }
        }
    }
}

/// Sends one batch to a remote service; `Ok` only on a 2xx answer.
pub trait Deliver: Send + Sync + 'static {
    /// Short name for logs and metrics.
    fn name(&self) -> &str;

    /// Sends `entries` as one request.
    fn deliver<'a>(&'a self, entries: &'a [Entry]) -> SinkFuture<'a, Result<(), DeliveryError>>;

    /// Whether the service takes the spooled JSON lines as they are (see
    /// [`Deliver::deliver_lines`]), so the spool need not parse them back into entries.
    fn takes_lines(&self) -> bool {
        false
    }

    /// Sends a spooled batch's JSON lines, one entry each, as one request; called only
    /// when [`Deliver::takes_lines`].
    fn deliver_lines(&self, lines: bytes::Bytes) -> SinkFuture<'_, Result<(), DeliveryError>> {
        let _ = lines;
        Box::pin(async {
            Err(DeliveryError::Transient(
                "this sink takes parsed entries, not lines".into(),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::DeliveryError;

    #[test]
    fn status_classification() {
        for s in [500, 502, 503, 408, 429, 302] {
            assert!(
                matches!(
                    DeliveryError::from_status(s, ""),
                    DeliveryError::Transient(_)
                ),
                "{s}"
            );
        }
        for s in [400, 401, 403, 404, 413] {
            assert!(
                matches!(
                    DeliveryError::from_status(s, ""),
                    DeliveryError::Permanent { .. }
                ),
                "{s}"
            );
        }
    }
}
