//! In-memory sink for tests of the pipeline (here and in the proxy): keeps every entry,
//! and can be told to fail.

use super::{Sink, SinkFuture, SinkStats};
use crate::entry::Entry;
use crate::error::Error;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Collects entries; [`MemorySink::set_failing`] makes writes fail.
#[derive(Clone, Default)]
pub struct MemorySink {
    entries: Arc<Mutex<Vec<Entry>>>,
    failing: Arc<AtomicBool>,
}

impl MemorySink {
    /// An empty, working sink.
    pub fn new() -> Self {
        MemorySink::default()
    }

    /// Makes subsequent writes fail (`true`) or succeed (`false`).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Everything written so far.
    pub fn entries(&self) -> Vec<Entry> {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Sink for MemorySink {
    fn name(&self) -> &str {
        "memory"
    }

    fn write<'a>(&'a self, entries: &'a [Entry]) -> SinkFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            if self.failing.load(Ordering::SeqCst) {
                return Err(Error::Sink {
                    sink: "memory".into(),
                    message: "told to fail".into(),
                });
            }
            self.entries
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(entries);
            Ok(())
        })
    }

    fn stats(&self) -> SinkStats {
        let n = self.entries.lock().unwrap_or_else(|p| p.into_inner()).len() as u64;
        SinkStats {
            delivered_entries: n,
            ..SinkStats::default()
        }
    }
}
