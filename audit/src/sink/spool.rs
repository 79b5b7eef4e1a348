//! Bounded on-disk spool in front of a network sink.
//!
//! One file per batch (`batch-<id>.jsonl`, JSON lines), written to a temporary name,
//! synced and renamed, so a crash never leaves half a batch. A batch file is removed only
//! when [`Spool::ack`] is called after the sink answered 2xx. The directory is the state:
//! a new process opening it resumes delivery where the old one stopped.

use crate::entry::Entry;
use crate::error::Error;
use crate::format::json::{parse_lines, write_lines};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

struct SpoolState {
    batches: BTreeMap<u64, u64>,
    used: u64,
    next_id: u64,
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
        self.push_lines(&bytes)
    }

    /// [`Spool::push`] of a batch already rendered as JSON lines, one entry each.
    pub fn push_lines(&self, bytes: &[u8]) -> Result<(), Error> {
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
            .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .and_then(|()| File::open(&self.dir).and_then(|d| d.sync_all()));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(&path, e));
        }
        state.next_id += 1;
        state.used += needed;
        state.batches.insert(id, needed);
        Ok(())
    }

    /// The oldest batch, with its id for [`Spool::ack`]. A batch file that no longer
    /// parses is renamed `*.corrupt` (kept for inspection, no longer counted) and skipped.
    pub fn oldest(&self) -> Result<Option<(u64, Vec<Entry>)>, Error> {
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
        while let Some((&id, &size)) = state.batches.iter().next() {
            let path = batch_path(&self.dir, id);
            match read(&path) {
                Ok(batch) => return Ok(Some((id, batch))),
                Err(error) => {
                    tracing::error!(batch = %path.display(), %error, "unreadable spooled audit batch set aside");
                    let _ = std::fs::rename(&path, path.with_extension("corrupt"));
                    state.batches.remove(&id);
                    state.used = state.used.saturating_sub(size);
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
        if let Some(size) = state.batches.remove(&id) {
            state.used = state.used.saturating_sub(size);
        }
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
}
