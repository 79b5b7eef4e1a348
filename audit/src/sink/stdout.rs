//! Stdout sink: JSON lines, one entry per line.

use super::{Sink, SinkFuture};
use crate::entry::Entry;
use crate::error::Error;
use crate::format::json::write_lines;
use bytes::Bytes;
use std::io::Write;
use std::sync::Mutex;

/// Writes JSON lines to stdout (or to any writer, for tests).
pub struct StdoutSink {
    out: Mutex<Box<dyn Write + Send>>,
}

impl Default for StdoutSink {
    fn default() -> Self {
        StdoutSink::new()
    }
}

impl StdoutSink {
    /// A sink writing to the process's stdout.
    pub fn new() -> Self {
        StdoutSink::to_writer(Box::new(std::io::stdout()))
    }

    /// A sink writing to `out`.
    pub fn to_writer(out: Box<dyn Write + Send>) -> Self {
        StdoutSink {
            out: Mutex::new(out),
        }
    }

    fn write_bytes(&self, bytes: &[u8]) -> Result<(), Error> {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        out.write_all(bytes)
            .and_then(|()| out.flush())
            .map_err(|e| Error::io("<stdout>", e))
    }
}

impl Sink for StdoutSink {
    fn name(&self) -> &str {
        "stdout"
    }

    fn write<'a>(&'a self, entries: &'a [Entry]) -> SinkFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let mut bytes = Vec::new();
            write_lines(entries, &mut bytes)?;
            self.write_bytes(&bytes)
        })
    }

    fn write_rendered<'a>(
        &'a self,
        _entries: &'a [Entry],
        lines: &'a Bytes,
    ) -> SinkFuture<'a, Result<(), Error>> {
        Box::pin(async move { self.write_bytes(lines) })
    }
}
