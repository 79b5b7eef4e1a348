//! Where tenant logs live, behind [`RecordStore`] so sealed days can later go to object
//! storage with object lock; [`FileStore`] is the embedded default (a directory on the
//! collector's volume).
//!
//! A tenant's log is its chain starts (which workload started which chain) and one file
//! of entries per day of arrival, so retention removes whole days. Appends return only
//! once the bytes are on disk (fsync), which is when the proxy may forget them.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use jiff::civil::Date;
use portcullis_api::names::is_dns_subdomain;
use serde::{Deserialize, Serialize};

use crate::arrival::Fresh;

/// Why the store failed; the batch was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A tenant name that cannot name a log.
    #[error("{0:?} is not a tenant name")]
    BadTenant(String),
    /// The disk said no.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A stored chain start that does not parse.
    #[error("{path}: line {line} is not a chain start: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The line, from 1.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// Tenant logs.
pub trait RecordStore {
    /// Appends to `tenant`'s log for `day` the chains the batch starts, then its
    /// entries; returns once both are durable.
    fn append(
        &mut self,
        tenant: &str,
        day: Date,
        new_chains: &[(String, String)],
        entries: &[Fresh],
    ) -> Result<(), StoreError>;

    /// Tenants with a log.
    fn tenants(&self) -> Result<Vec<String>, StoreError>;

    /// The chains of `tenant` as (chain id, the workload that started it).
    fn chains(&self, tenant: &str) -> Result<Vec<(String, String)>, StoreError>;

    /// The days `tenant`'s log holds, oldest first.
    fn days(&self, tenant: &str) -> Result<Vec<Date>, StoreError>;

    /// `tenant`'s entries that arrived on `day`, one JSON line each, in arrival order.
    fn read_day(&self, tenant: &str, day: Date) -> Result<Vec<String>, StoreError>;

    /// `tenant`'s entries of `day` from byte `offset` on, whole lines only, about
    /// `max_bytes` of them (more when one line is longer), so a reader holds a piece of
    /// a day at a time.
    fn read_day_piece(
        &self,
        tenant: &str,
        day: Date,
        offset: u64,
        max_bytes: usize,
    ) -> Result<DayPiece, StoreError>;

    /// Removes `tenant`'s days before `before`; returns how many went.
    fn prune(&mut self, tenant: &str, before: Date) -> Result<usize, StoreError>;

    /// Where a reader named `name` (a SIEM sink's forwarder) stands in `tenant`'s log.
    fn cursor(&self, tenant: &str, name: &str) -> Result<Option<Position>, StoreError>;

    /// Saves (or, with `None`, forgets) where `name` stands in `tenant`'s log; returns
    /// once it is durable.
    fn save_cursor(
        &self,
        tenant: &str,
        name: &str,
        position: Option<Position>,
    ) -> Result<(), StoreError>;
}

/// A place in a tenant's log: a day and a byte offset into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    /// The day of arrival.
    pub day: Date,
    /// Bytes of that day already read.
    pub offset: u64,
}

impl Position {
    /// The start of `day`.
    pub fn start_of(day: Date) -> Self {
        Self { day, offset: 0 }
    }
}

/// A piece of a day's entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DayPiece {
    /// Whole lines, in arrival order.
    pub lines: Vec<String>,
    /// Where the next piece starts.
    pub next: u64,
    /// Whether the day has no more (as of this read).
    pub end: bool,
}

/// One stored chain start.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ChainStart {
    chain_id: String,
    owner: String,
}

const CHAINS_FILE: &str = "chains.jsonl";
const DAY_SUFFIX: &str = ".jsonl";
const CURSORS_DIR: &str = "cursors";

/// Tenant logs in a directory: `<root>/<tenant>/chains.jsonl`,
/// `<root>/<tenant>/<YYYY-MM-DD>.jsonl` and readers' places in
/// `<root>/<tenant>/cursors/<name>.json`.
#[derive(Debug)]
pub struct FileStore {
    root: PathBuf,
}

fn io_error<'p>(action: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> StoreError + 'p {
    move |source| StoreError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// Makes a new directory entry durable (the file's own fsync does not).
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("syncing", dir))
}

/// Appends `text` to `path` and syncs it; a new file's directory entry is synced too.
fn append_durably(path: &Path, text: &str) -> Result<(), StoreError> {
    let existed = path.exists();
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_error("opening", path))?;
    file.write_all(text.as_bytes())
        .map_err(io_error("writing", path))?;
    file.sync_data().map_err(io_error("syncing", path))?;
    if !existed && let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Cuts a line torn by a crash mid-append (never acknowledged, so the proxy resends
/// it), so the next append starts on a fresh line.
fn repair_torn_tail(path: &Path) -> Result<(), StoreError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_error("opening", path))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(io_error("reading", path))?;
    if bytes.is_empty() || bytes.ends_with(b"\n") {
        return Ok(());
    }
    let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    tracing::warn!(path = %path.display(), cut = bytes.len() - keep, "cutting a torn last line");
    file.set_len(keep as u64)
        .map_err(io_error("truncating", path))?;
    file.seek(SeekFrom::End(0))
        .map_err(io_error("seeking", path))?;
    file.sync_data().map_err(io_error("syncing", path))
}

impl FileStore {
    /// The store under `root` (created if missing), with torn last lines cut.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io_error("creating", &root))?;
        let store = Self { root };
        for tenant in store.tenants()? {
            let dir = store.tenant_dir(&tenant)?;
            repair_torn_tail_if_present(&dir.join(CHAINS_FILE))?;
            for day in store.days(&tenant)? {
                repair_torn_tail(&store.day_file(&tenant, day)?)?;
            }
        }
        Ok(store)
    }

    fn tenant_dir(&self, tenant: &str) -> Result<PathBuf, StoreError> {
        if !is_dns_subdomain(tenant) {
            return Err(StoreError::BadTenant(tenant.to_owned()));
        }
        Ok(self.root.join(tenant))
    }

    fn day_file(&self, tenant: &str, day: Date) -> Result<PathBuf, StoreError> {
        Ok(self.tenant_dir(tenant)?.join(format!("{day}{DAY_SUFFIX}")))
    }

    fn cursor_file(&self, tenant: &str, name: &str) -> Result<PathBuf, StoreError> {
        // Cursor names are ours (a sink kind and a digest), never a path.
        if !is_dns_subdomain(name) {
            return Err(StoreError::BadTenant(name.to_owned()));
        }
        Ok(self
            .tenant_dir(tenant)?
            .join(CURSORS_DIR)
            .join(format!("{name}.json")))
    }
}

fn repair_torn_tail_if_present(path: &Path) -> Result<(), StoreError> {
    if path.exists() {
        repair_torn_tail(path)?;
    }
    Ok(())
}

impl RecordStore for FileStore {
    fn append(
        &mut self,
        tenant: &str,
        day: Date,
        new_chains: &[(String, String)],
        entries: &[Fresh],
    ) -> Result<(), StoreError> {
        let dir = self.tenant_dir(tenant)?;
        if !dir.exists() {
            fs::create_dir_all(&dir).map_err(io_error("creating", &dir))?;
            sync_dir(&self.root)?;
        }
        // Chain starts first: an entry never lands without its chain's owner.
        if !new_chains.is_empty() {
            let mut text = String::new();
            for (chain_id, owner) in new_chains {
                let start = ChainStart {
                    chain_id: chain_id.clone(),
                    owner: owner.clone(),
                };
                let line = serde_json::to_string(&start).map_err(|e| StoreError::Corrupt {
                    path: dir.join(CHAINS_FILE),
                    line: 0,
                    message: e.to_string(),
                })?;
                text.push_str(&line);
                text.push('\n');
            }
            append_durably(&dir.join(CHAINS_FILE), &text)?;
        }
        if !entries.is_empty() {
            let mut text = String::new();
            for entry in entries {
                text.push_str(&entry.line);
                text.push('\n');
            }
            append_durably(&self.day_file(tenant, day)?, &text)?;
        }
        Ok(())
    }

    fn tenants(&self) -> Result<Vec<String>, StoreError> {
        let mut tenants = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(io_error("listing", &self.root))? {
            let entry = entry.map_err(io_error("listing", &self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().is_dir() && is_dns_subdomain(&name) {
                tenants.push(name);
            }
        }
        tenants.sort();
        Ok(tenants)
    }

    fn chains(&self, tenant: &str) -> Result<Vec<(String, String)>, StoreError> {
        let path = self.tenant_dir(tenant)?.join(CHAINS_FILE);
        if !path.exists() {
            return Ok(Vec::new());
        }
        let text = fs::read_to_string(&path).map_err(io_error("reading", &path))?;
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, line)| {
                serde_json::from_str::<ChainStart>(line)
                    .map(|s| (s.chain_id, s.owner))
                    .map_err(|e| StoreError::Corrupt {
                        path: path.clone(),
                        line: i + 1,
                        message: e.to_string(),
                    })
            })
            .collect()
    }

    fn days(&self, tenant: &str) -> Result<Vec<Date>, StoreError> {
        let dir = self.tenant_dir(tenant)?;
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut days = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_error("listing", &dir))? {
            let entry = entry.map_err(io_error("listing", &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(day) = name
                .strip_suffix(DAY_SUFFIX)
                .and_then(|d| d.parse::<Date>().ok())
            {
                days.push(day);
            }
        }
        days.sort();
        Ok(days)
    }

    fn read_day(&self, tenant: &str, day: Date) -> Result<Vec<String>, StoreError> {
        let path = self.day_file(tenant, day)?;
        let text = fs::read_to_string(&path).map_err(io_error("reading", &path))?;
        Ok(text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect())
    }

    fn read_day_piece(
        &self,
        tenant: &str,
        day: Date,
        offset: u64,
        max_bytes: usize,
    ) -> Result<DayPiece, StoreError> {
        let path = self.day_file(tenant, day)?;
        let mut file = File::open(&path).map_err(io_error("opening", &path))?;
        file.seek(SeekFrom::Start(offset))
            .map_err(io_error("seeking", &path))?;
        let limit = max_bytes.max(1);
        let mut bytes = Vec::with_capacity(limit.min(1 << 20));
        let mut buf = vec![0u8; 64 * 1024];
        // The piece ends at the first line end at or past `limit`.
        let cut = |bytes: &[u8]| {
            bytes
                .get(limit - 1..)
                .and_then(|rest| rest.iter().position(|b| *b == b'\n'))
                .map(|i| limit + i)
        };
        let mut eof = false;
        while cut(&bytes).is_none() {
            let n = file.read(&mut buf).map_err(io_error("reading", &path))?;
            if n == 0 {
                eof = true;
                break;
            }
            bytes.extend_from_slice(&buf[..n]);
        }
        // Only whole lines: a torn last line (never acknowledged) is left alone.
        let whole = cut(&bytes)
            .unwrap_or_else(|| bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1));
        let end = eof && whole == bytes.len();
        let text = String::from_utf8_lossy(&bytes[..whole]);
        Ok(DayPiece {
            lines: text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_owned)
                .collect(),
            next: offset + whole as u64,
            end,
        })
    }

    fn prune(&mut self, tenant: &str, before: Date) -> Result<usize, StoreError> {
        let mut removed = 0;
        for day in self.days(tenant)? {
            if day >= before {
                break;
            }
            let path = self.day_file(tenant, day)?;
            fs::remove_file(&path).map_err(io_error("removing", &path))?;
            removed += 1;
        }
        if removed > 0 {
            sync_dir(&self.tenant_dir(tenant)?)?;
        }
        Ok(removed)
    }

    fn cursor(&self, tenant: &str, name: &str) -> Result<Option<Position>, StoreError> {
        let path = self.cursor_file(tenant, name)?;
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("reading", &path)(e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                path,
                line: 1,
                message: e.to_string(),
            })
    }

    fn save_cursor(
        &self,
        tenant: &str,
        name: &str,
        position: Option<Position>,
    ) -> Result<(), StoreError> {
        let path = self.cursor_file(tenant, name)?;
        let Some(position) = position else {
            return match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    Err(io_error("removing", &path)(e))
                }
                _ => Ok(()),
            };
        };
        let dir = path.parent().unwrap_or(&self.root).to_owned();
        fs::create_dir_all(&dir).map_err(io_error("creating", &dir))?;
        let text = serde_json::to_string(&position).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            line: 1,
            message: e.to_string(),
        })?;
        // Written aside, then renamed over: a crash leaves the old place or the new one.
        let staged = path.with_extension("json.new");
        {
            let mut file = File::create(&staged).map_err(io_error("creating", &staged))?;
            file.write_all(text.as_bytes())
                .map_err(io_error("writing", &staged))?;
            file.sync_data().map_err(io_error("syncing", &staged))?;
        }
        fs::rename(&staged, &path).map_err(io_error("renaming", &staged))?;
        sync_dir(&dir)
    }
}
