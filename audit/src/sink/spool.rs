//! Bounded on-disk spool in front of a network sink.
//!
//! One file per batch (`batch-<id>.jsonl`, JSON lines), written to a temporary name,
//! synced and renamed, so a crash never leaves half a batch. A batch file is removed only
//! when [`Spool::ack`] is called after the sink answered 2xx. The directory is the state:
//! a new process opening it resumes delivery where the old one stopped.
//!
//! Batches this process pushed are also held in memory, up to [`HELD_MAX_BYTES`], until
//! acknowledged: at full load each batch is delivered within milliseconds of being
//! written, so reading it back from disk (and checking it) cost the proxy a blocking-pool
//! hand-off, a read and a page-faulted buffer per batch for bytes it still had.

use crate::entry::Entry;
use crate::error::Error;
use crate::format::json::{parse_lines, write_lines};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The most bytes of pushed batches also held in memory (the rest is read back from
/// disk); while a destination is down the oldest batches stay held, so this bounds
/// what an outage adds to the process's memory.
pub const HELD_MAX_BYTES: u64 = 2 * 1024 * 1024;

struct SpoolState {
    batches: BTreeMap<u64, u64>,
    used: u64,
    next_id: u64,
    /// Batches pushed by this process and not yet acknowledged, as pushed.
    held: BTreeMap<u64, SpooledLines>,
    held_bytes: u64,
}

impl SpoolState {
    /// The oldest batch, if it is held in memory.
    fn oldest_held(&self) -> Option<(u64, SpooledLines)> {
        let (&id, _) = self.batches.first_key_value()?;
        self.held.get(&id).map(|lines| (id, lines.clone()))
    }

    fn forget(&mut self, id: u64) {
        if let Some(size) = self.batches.remove(&id) {
            self.used = self.used.saturating_sub(size);
        }
        if let Some((lines, _)) = self.held.remove(&id) {
            self.held_bytes = self.held_bytes.saturating_sub(lines.len() as u64);
        }
    }
}

/// A directory of batches waiting for delivery, bounded in bytes.
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<SpoolState>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.dir)
            .field("max_bytes", &self.max_bytes)
            .field("used_bytes", &self.used_bytes())
            .finish()
    }
}

/// A spooled batch's JSON lines, one entry each, and how many there are.
pub type SpooledLines = (bytes::Bytes, usize);

fn batch_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("batch-{id:020}.jsonl"))
}

impl Spool {
    /// Opens (creating) a spool directory holding at most `max_bytes` of batches.
    /// Leftover temporary files from a crash are removed; complete batches are kept.
    pub fn open(dir: impl Into<PathBuf>, max_bytes: u64) -> Result<Self, Error> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut batches = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            let id = name
                .strip_prefix("batch-")
                .and_then(|n| n.strip_suffix(".jsonl"))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(id) = id {
                let size = entry
                    .metadata()
                    .map_err(|e| Error::io(entry.path(), e))?
                    .len();
                batches.insert(id, size);
            }
        }
        let used = batches.values().sum();
        let next_id = batches.keys().next_back().map_or(0, |id| id + 1);
        Ok(Spool {
            dir,
            max_bytes,
            state: Mutex::new(SpoolState {
                batches,
                used,
                next_id,
                held: BTreeMap::new(),
                held_bytes: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SpoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes held.
    pub fn used_bytes(&self) -> u64 {
        self.lock().used
    }

    /// Batches held.
    pub fn batches(&self) -> u64 {
        self.lock().batches.len() as u64
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stores a batch durably, or fails with [`Error::SpoolFull`] when it would exceed
    /// the bound.
    pub fn push(&self, entries: &[Entry]) -> Result<(), Error> {
        let mut bytes = Vec::new();
        write_lines(entries, &mut bytes)?;
        self.push_lines(bytes::Bytes::from(bytes), entries.len())
    }

    /// [`Spool::push`] of a batch already rendered as JSON lines, `count` of them (one
    /// entry each).
    pub fn push_lines(&self, bytes: bytes::Bytes, count: usize) -> Result<(), Error> {
        let mut state = self.lock();
        let needed = bytes.len() as u64;
        if state.used.saturating_add(needed) > self.max_bytes {
            return Err(Error::SpoolFull {
                used: state.used,
                max: self.max_bytes,
                needed,
            });
        }
        let id = state.next_id;
        let tmp = self.dir.join(format!("batch-{id:020}.tmp"));
        let path = batch_path(&self.dir, id);
        let written = File::create(&tmp)
            .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .and_then(|()| File::open(&self.dir).and_then(|d| d.sync_all()));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(&path, e));
        }
        state.next_id += 1;
        state.used += needed;
        state.batches.insert(id, needed);
        if state.held_bytes + needed <= HELD_MAX_BYTES {
            state.held_bytes += needed;
            state.held.insert(id, (bytes, count));
        }
        Ok(())
    }

    /// The oldest batch's lines when this process still holds them in memory: no I/O,
    /// so a caller on an async task need not go to the blocking pool. `None`: the spool
    /// is empty, or its oldest batch must be read with [`Spool::oldest_lines`].
    pub fn oldest_held_lines(&self) -> Option<(u64, SpooledLines)> {
        self.lock().oldest_held()
    }

    /// The oldest batch, with its id for [`Spool::ack`]. A batch file that no longer
    /// parses is renamed `*.corrupt` (kept for inspection, no longer counted) and skipped.
    pub fn oldest(&self) -> Result<Option<(u64, Vec<Entry>)>, Error> {
        if let Some((id, (lines, _))) = self.lock().oldest_held() {
            // Rendered by this process from entries: UTF-8 JSON lines.
            let text = std::str::from_utf8(&lines).map_err(|e| Error::Malformed(e.to_string()))?;
            return Ok(Some((id, parse_lines(text)?)));
        }
        self.oldest_read(|path| {
            std::fs::read_to_string(path)
                .map_err(|e| Error::io(path, e))
                .and_then(|text| parse_lines(&text))
                .map_err(|e| e.to_string())
        })
    }

    /// The oldest batch as its JSON lines (one entry each) and their count, with its id
    /// for [`Spool::ack`], for a destination that takes the lines as they are. A batch
    /// file that cannot be read, or is not UTF-8 lines, is set aside as in
    /// [`Spool::oldest`].
    pub fn oldest_lines(&self) -> Result<Option<(u64, SpooledLines)>, Error> {
        if let Some(held) = self.oldest_held_lines() {
            return Ok(Some(held));
        }
        self.oldest_read(|path| {
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e).to_string())?;
            if std::str::from_utf8(&bytes).is_err() || !bytes.ends_with(b"\n") {
                return Err("not JSON lines (not UTF-8, or cut short)".to_owned());
            }
            let count = bytes.iter().filter(|b| **b == b'\n').count();
            Ok((bytes::Bytes::from(bytes), count))
        })
    }

    /// The oldest batch as `read` makes it; a batch `read` refuses is renamed
    /// `*.corrupt`, no longer counted, and the next one tried.
    fn oldest_read<T>(
        &self,
        read: impl Fn(&Path) -> Result<T, String>,
    ) -> Result<Option<(u64, T)>, Error> {
        let mut state = self.lock();
        while let Some((&id, _)) = state.batches.iter().next() {
            let path = batch_path(&self.dir, id);
            match read(&path) {
                Ok(batch) => return Ok(Some((id, batch))),
                Err(error) => {
                    tracing::error!(batch = %path.display(), %error, "unreadable spooled audit batch set aside");
                    let _ = std::fs::rename(&path, path.with_extension("corrupt"));
                    state.forget(id);
                }
            }
        }
        Ok(None)
    }

    /// Removes a delivered batch.
    pub fn ack(&self, id: u64) -> Result<(), Error> {
        let mut state = self.lock();
        let path = batch_path(&self.dir, id);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&path, e)),
        }
        state.forget(id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AuditRecord, Chain};

    fn entries(n: usize) -> Result<Vec<Entry>, Error> {
        let mut chain = Chain::new("c");
        (0..n)
            .map(|_| {
                chain
                    .append(AuditRecord::new(
                        jiff::Timestamp::UNIX_EPOCH,
                        "t",
                        "p",
                        "api.x",
                        "user:u",
                    ))
                    .map(Entry::Record)
            })
            .collect()
    }

    #[test]
    fn bounded_fifo_that_survives_reopen() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let batch = entries(2)?;
        let mut one = Vec::new();
        write_lines(&batch, &mut one)?;
        let spool = Spool::open(dir.path(), 2 * one.len() as u64)?;
        spool.push(&batch)?;
        spool.push(&batch[..1])?;
        assert!(matches!(spool.push(&batch), Err(Error::SpoolFull { .. })));
        drop(spool);
        let spool = Spool::open(dir.path(), 2 * one.len() as u64)?;
        assert_eq!(spool.batches(), 2);
        let (id, got) = spool.oldest()?.ok_or("empty")?;
        assert_eq!(got, batch);
        spool.ack(id)?;
        let (_, got) = spool.oldest()?.ok_or("empty")?;
        assert_eq!(got, batch[..1].to_vec());
        spool.push(&batch)?;
        assert_eq!(spool.batches(), 2);
        Ok(())
    }

    #[test]
    fn corrupt_batch_is_set_aside() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        std::fs::write(
            dir.path().join("batch-00000000000000000000.jsonl"),
            "not json\n",
        )?;
        std::fs::write(dir.path().join("batch-00000000000000000001.tmp"), "partial")?;
        let spool = Spool::open(dir.path(), 1 << 20)?;
        assert_eq!(spool.batches(), 1);
        assert!(spool.oldest()?.is_none());
        assert_eq!(spool.used_bytes(), 0);
        assert!(!dir.path().join("batch-00000000000000000001.tmp").exists());
        Ok(())
    }

    #[test]
    fn lines_come_back_as_spooled_and_unreadable_ones_are_set_aside()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let spool = Spool::open(dir.path(), 1 << 20)?;
        let batch = entries(3)?;
        spool.push(&batch)?;
        let mut expected = Vec::new();
        write_lines(&batch, &mut expected)?;
        let (id, (lines, count)) = spool.oldest_lines()?.ok_or("no batch")?;
        assert_eq!((&lines[..], count), (&expected[..], 3));
        spool.ack(id)?;

        // Not UTF-8, and cut short of its last newline: both set aside.
        std::fs::write(
            dir.path().join("batch-00000000000000000007.jsonl"),
            [0xff, b'\n'],
        )?;
        std::fs::write(
            dir.path().join("batch-00000000000000000008.jsonl"),
            b"{\"seq\":1",
        )?;
        let spool = Spool::open(dir.path(), 1 << 20)?;
        assert_eq!(spool.batches(), 2);
        assert!(spool.oldest_lines()?.is_none());
        assert_eq!(spool.used_bytes(), 0);
        Ok(())
    }

    #[test]
    fn pushed_batches_are_delivered_from_memory_within_the_bound()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let spool = Spool::open(dir.path(), 64 << 20)?;
        let big = |fill: u8| {
            let mut lines = vec![fill; (HELD_MAX_BYTES as usize) * 3 / 4];
            if let Some(last) = lines.last_mut() {
                *last = b'\n';
            }
            bytes::Bytes::from(lines)
        };
        spool.push_lines(big(b'a'), 1)?;
        // Over the bound: durable on disk, not held.
        spool.push_lines(big(b'b'), 1)?;
        std::fs::remove_file(batch_path(dir.path(), 0))?;
        std::fs::remove_file(batch_path(dir.path(), 1))?;

        let (id, (lines, count)) = spool.oldest_lines()?.ok_or("no batch")?;
        assert_eq!((id, count, lines[0]), (0, 1, b'a'));
        spool.ack(id)?;
        // Batch 1 was never held, so it is read from disk, where it no longer is.
        assert!(spool.oldest_held_lines().is_none());
        assert!(spool.oldest_lines()?.is_none());

        // The acknowledged batch's room is free again.
        spool.push_lines(big(b'c'), 1)?;
        let (_, (lines, _)) = spool.oldest_held_lines().ok_or("not held")?;
        assert_eq!(lines[0], b'c');

        // A new process holds nothing: it reads what the old one left on disk.
        drop(spool);
        let spool = Spool::open(dir.path(), 64 << 20)?;
        assert!(spool.oldest_held_lines().is_none());
        let (_, (lines, _)) = spool.oldest_lines()?.ok_or("no batch")?;
        assert_eq!(lines[0], b'c');
        Ok(())
    }
}
