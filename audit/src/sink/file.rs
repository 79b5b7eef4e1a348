//! Rotating file sink: segments encrypted with the tenant DEK (see [`crate::segment`]).
//!
//! Names: `seg-<index>-<start ms>.pcseg.open` while written, renamed to
//! `seg-<index>-<start ms>-<end ms>.pcseg` when closed (end = the latest clock reading
//! while open, so a clock that stepped back cannot make a segment look older). A segment
//! is closed when it reaches `max_segment_bytes`, when it is `max_segment_age` old at the
//! next write, when the DEK rotates, and at shutdown. A closed segment is deleted once
//! `end + retention_days` has passed, never earlier; segments left open by a crash are
//! closed at the next start with end = that start time.

use super::{Sink, SinkFuture};
use crate::clock::Clock;
use crate::entry::Entry;
use crate::error::Error;
use crate::format::json::write_lines;
use crate::keyring::DataKey;
use crate::segment::{HEADER_LEN, SegmentCipher, new_header};
use bytes::Bytes;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DAY_MS: i64 = 86_400_000;

/// File sink settings.
#[derive(Debug, Clone)]
pub struct FileSinkConfig {
    /// Directory holding the segments.
    pub dir: PathBuf,
    /// Close a segment once it holds this many bytes.
    pub max_segment_bytes: u64,
    /// Close a segment once it is this old.
    pub max_segment_age: Duration,
    /// Delete closed segments this many days after their last write (365 by default,
    /// up to 2555).
    pub retention_days: u32,
}

impl FileSinkConfig {
    /// Defaults: 64 MiB or 1 hour per segment, 365 days retention.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileSinkConfig {
            dir: dir.into(),
            max_segment_bytes: 64 * 1024 * 1024,
            max_segment_age: Duration::from_secs(3600),
            retention_days: 365,
        }
    }
}

struct OpenSegment {
    path: PathBuf,
    file: File,
    index: u64,
    start_ms: i64,
    last_ms: i64,
    bytes: u64,
    frames: u64,
    /// The segment's key and header, set up once for all its frames.
    cipher: SegmentCipher,
}

struct FileState {
    config: FileSinkConfig,
    key: DataKey,
    clock: Arc<dyn Clock>,
    current: Option<OpenSegment>,
    next_index: u64,
}

/// A segment file on disk, parsed from its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentFile {
    /// Full path.
    pub path: PathBuf,
    /// Rotation index (orders segments).
    pub index: u64,
    /// Creation time, ms since the epoch.
    pub start_ms: i64,
    /// Close time, ms since the epoch; `None` while open.
    pub end_ms: Option<i64>,
}

/// Encrypted, rotating, retention-pruned segment files.
#[derive(Clone)]
pub struct FileSink {
    state: Arc<Mutex<FileState>>,
}

impl FileSink {
    /// Opens (creating) the directory, closes segments a crash left open, applies
    /// retention, and writes new segments with `key`.
    pub fn open(
        config: FileSinkConfig,
        key: DataKey,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, Error> {
        if config.max_segment_bytes == 0 || !(1..=2555).contains(&config.retention_days) {
            return Err(Error::Config(
                "file sink needs max_segment_bytes > 0 and retention_days in 1..=2555".into(),
            ));
        }
        std::fs::create_dir_all(&config.dir).map_err(|e| Error::io(&config.dir, e))?;
        let now = clock.now().as_millisecond();
        let existing = list_segments(&config.dir)?;
        let next_index = existing.iter().map(|s| s.index + 1).max().unwrap_or(0);
        for seg in existing.iter().filter(|s| s.end_ms.is_none()) {
            let closed = closed_name(&config.dir, seg.index, seg.start_ms, now.max(seg.start_ms));
            std::fs::rename(&seg.path, &closed).map_err(|e| Error::io(&seg.path, e))?;
        }
        let mut state = FileState {
            config,
            key,
            clock,
            current: None,
            next_index,
        };
        state.enforce_retention()?;
        Ok(FileSink {
            state: Arc::new(Mutex::new(state)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FileState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes JSON-lines plaintext as one encrypted frame (blocking I/O).
    pub fn write_plaintext(&self, plaintext: &[u8]) -> Result<(), Error> {
        self.lock().write_frame(plaintext)
    }

    /// [`FileSink::write_plaintext`] on the blocking pool.
    async fn write_frame_blocking(&self, plaintext: Bytes) -> Result<(), Error> {
        let sink = self.clone();
        super::on_blocking_pool("file", "write", move || sink.write_plaintext(&plaintext)).await
    }

    /// Switches to a new DEK: the open segment is closed, the next one uses `key`.
    /// Old segments stay readable with the old version in a [`crate::KeyRing`].
    pub fn rotate_key(&self, key: DataKey) -> Result<(), Error> {
        let mut state = self.lock();
        state.close_current()?;
        state.key = key;
        Ok(())
    }

    /// Closes the open segment, if any.
    pub fn close_segment(&self) -> Result<(), Error> {
        self.lock().close_current()
    }

    /// Deletes closed segments past retention; returns what was deleted.
    pub fn enforce_retention(&self) -> Result<Vec<PathBuf>, Error> {
        self.lock().enforce_retention()
    }

    /// The segments on disk, in index order.
    pub fn segments(&self) -> Result<Vec<SegmentFile>, Error> {
        list_segments(&self.lock().config.dir)
    }
}

impl FileState {
    fn write_frame(&mut self, plaintext: &[u8]) -> Result<(), Error> {
        let now = self.clock.now().as_millisecond();
        let age_limit = i64::try_from(self.config.max_segment_age.as_millis()).unwrap_or(i64::MAX);
        if self
            .current
            .as_ref()
            .is_some_and(|seg| now.saturating_sub(seg.start_ms) >= age_limit)
        {
            self.close_current()?;
        }
        if self.current.is_none() {
            self.current = Some(self.open_new(now)?);
        }
        let Some(seg) = self.current.as_mut() else {
            return Err(Error::Config("no open segment".into()));
        };
        let frame = seg.cipher.seal(seg.frames, plaintext)?;
        let written = seg
            .file
            .write_all(&frame)
            .and_then(|()| seg.file.sync_data())
            .map_err(|e| Error::io(&seg.path, e));
        if let Err(e) = written {
            // A torn frame ends this segment; the retried batch goes to a fresh one.
            let _ = self.close_current();
            return Err(e);
        }
        seg.frames += 1;
        seg.bytes += frame.len() as u64;
        seg.last_ms = seg.last_ms.max(now);
        if seg.bytes >= self.config.max_segment_bytes {
            self.close_current()?;
        }
        Ok(())
    }

    fn open_new(&mut self, now: i64) -> Result<OpenSegment, Error> {
        let index = self.next_index;
        let start_ms = now.max(0);
        let cipher = SegmentCipher::new(&self.key, new_header(&self.key))?;
        let path = self
            .config
            .dir
            .join(format!("seg-{index:016}-{start_ms:013}.pcseg.open"));
        let mut file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        file.write_all(cipher.header())
            .and_then(|()| file.sync_data())
            .map_err(|e| Error::io(&path, e))?;
        self.next_index += 1;
        Ok(OpenSegment {
            path,
            file,
            index,
            start_ms,
            last_ms: start_ms,
            bytes: HEADER_LEN as u64,
            frames: 0,
            cipher,
        })
    }

    fn close_current(&mut self) -> Result<(), Error> {
        let Some(seg) = self.current.take() else {
            return Ok(());
        };
        let end_ms = seg.last_ms.max(self.clock.now().as_millisecond());
        drop(seg.file);
        let closed = closed_name(&self.config.dir, seg.index, seg.start_ms, end_ms);
        std::fs::rename(&seg.path, &closed).map_err(|e| Error::io(&seg.path, e))?;
        self.enforce_retention()?;
        Ok(())
    }

    fn enforce_retention(&mut self) -> Result<Vec<PathBuf>, Error> {
        let now = self.clock.now().as_millisecond();
        let keep_ms = i64::from(self.config.retention_days) * DAY_MS;
        let mut deleted = Vec::new();
        for seg in list_segments(&self.config.dir)? {
            if let Some(end) = seg.end_ms
                && end.saturating_add(keep_ms) <= now
            {
                std::fs::remove_file(&seg.path).map_err(|e| Error::io(&seg.path, e))?;
                tracing::info!(segment = %seg.path.display(), "audit segment past retention deleted");
                deleted.push(seg.path);
            }
        }
        Ok(deleted)
    }
}

fn closed_name(dir: &Path, index: u64, start_ms: i64, end_ms: i64) -> PathBuf {
    dir.join(format!("seg-{index:016}-{start_ms:013}-{end_ms:013}.pcseg"))
}

fn parse_segment_name(dir: &Path, name: &str) -> Option<SegmentFile> {
    let (stem, open) = if let Some(stem) = name.strip_suffix(".pcseg.open") {
        (stem, true)
    } else {
        (name.strip_suffix(".pcseg")?, false)
    };
    let mut parts = stem.strip_prefix("seg-")?.split('-');
    let index = parts.next()?.parse().ok()?;
    let start_ms = parts.next()?.parse().ok()?;
    let end_ms = if open {
        None
    } else {
        Some(parts.next()?.parse().ok()?)
    };
    Some(SegmentFile {
        path: dir.join(name),
        index,
        start_ms,
        end_ms,
    })
}

/// Segment files in `dir`, in index order (other files are ignored).
pub fn list_segments(dir: &Path) -> Result<Vec<SegmentFile>, Error> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if let Some(seg) = parse_segment_name(dir, &entry.file_name().to_string_lossy()) {
            out.push(seg);
        }
    }
    out.sort_by_key(|s| s.index);
    Ok(out)
}

impl Sink for FileSink {
    fn name(&self) -> &str {
        "file"
    }

    fn write<'a>(&'a self, entries: &'a [Entry]) -> SinkFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let mut plaintext = Vec::new();
            write_lines(entries, &mut plaintext)?;
            self.write_frame_blocking(Bytes::from(plaintext)).await
        })
    }

    fn write_rendered<'a>(
        &'a self,
        _entries: &'a [Entry],
        lines: &'a Bytes,
    ) -> SinkFuture<'a, Result<(), Error>> {
        Box::pin(self.write_frame_blocking(lines.clone()))
    }

    fn close(&self, _deadline: Instant) -> SinkFuture<'_, Result<(), Error>> {
        Box::pin(async move { self.close_segment() })
    }
}
