//! Where tenant logs live, behind [`RecordStore`] so sealed days can later go to object
//! storage with object lock; [`FileStore`] is the embedded default (a directory on the
//! collector's volume).
//!
//! A tenant's log is its chain starts (which workload started which chain) and one file
//! of entries per day of arrival, so retention removes whole days. Each day is an
//! encrypted segment ([`portcullis_audit::segment`]) under the tenant's DEK active when
//! the day began, one frame per stored batch; the chain starts name workloads only and
//! stay readable. Appends return only once the bytes are on disk (fsync), which is when
//! the proxy may forget them.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jiff::civil::Date;
use portcullis_api::names::is_dns_subdomain;
use portcullis_audit::TenantKeys;
use portcullis_audit::segment::{
    self, FRAME_OVERHEAD, FrameError, FrameRead, HEADER_LEN, MAX_FRAME, SegmentCipher,
};
use serde::{Deserialize, Serialize};

use crate::arrival::Fresh;
use crate::keys::KeyCache;

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
    /// The tenant's data-encryption key is not at hand yet (it is being fetched from
    /// the operator); nothing was stored or read.
    #[error(
        "the data-encryption key of tenant {tenant:?} is not at hand yet (asked the operator); retry shortly"
    )]
    NoKey {
        /// The tenant.
        tenant: String,
    },
    /// A day was sealed under a DEK version the tenant's keys no longer hold.
    #[error("{path} is sealed under DEK version {version}, which tenant {tenant:?} no longer has")]
    UnknownKeyVersion {
        /// The tenant.
        tenant: String,
        /// The day's file.
        path: PathBuf,
        /// The version its header names.
        version: u32,
    },
    /// A stored frame that does not open: the file was damaged or altered.
    #[error("{path}: frame {frame} at byte {offset}: {problem}")]
    Damaged {
        /// The day's file.
        path: PathBuf,
        /// The frame, from 0.
        frame: u64,
        /// Where it starts.
        offset: u64,
        /// What is wrong.
        problem: FrameError,
    },
    /// Sealing a batch failed.
    #[error("sealing a batch for tenant {tenant:?}: {message}")]
    Seal {
        /// The tenant.
        tenant: String,
        /// Why.
        message: String,
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

    /// `tenant`'s entries of `day` from `from` on, whole batches only, about
    /// `max_bytes` of them (more when one batch is longer), so a reader holds a piece
    /// of a day at a time.
    fn read_day_piece(
        &self,
        tenant: &str,
        day: Date,
        from: DayOffset,
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

/// A place in a day's file: the bytes before it and the frames they hold (a frame
/// is opened knowing its number).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DayOffset {
    /// Bytes of the day already read (0: the start).
    pub offset: u64,
    /// Frames in them.
    #[serde(default)]
    pub frame: u64,
}

impl DayOffset {
    /// The start of a day.
    pub const START: Self = Self {
        offset: 0,
        frame: 0,
    };
}

/// A place in a tenant's log: a day and a place in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    /// The day of arrival.
    pub day: Date,
    /// Where in that day.
    #[serde(flatten)]
    pub at: DayOffset,
}

impl Position {
    /// The start of `day`.
    pub fn start_of(day: Date) -> Self {
        Self {
            day,
            at: DayOffset::START,
        }
    }
}

/// A piece of a day's entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DayPiece {
    /// Whole lines, in arrival order.
    pub lines: Vec<String>,
    /// Where the next piece starts.
    pub next: DayOffset,
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
const DAY_SUFFIX: &str = ".seg";
const CURSORS_DIR: &str = "cursors";

/// Tenant logs in a directory: `<root>/<tenant>/chains.jsonl`,
/// `<root>/<tenant>/<YYYY-MM-DD>.seg` and readers' places in
/// `<root>/<tenant>/cursors/<name>.json`.
#[derive(Debug)]
pub struct FileStore {
    root: PathBuf,
    keys: Arc<KeyCache>,
    /// The day each tenant appends to, with its cipher and the frames it holds.
    appending: HashMap<String, OpenDay>,
}

#[derive(Debug)]
struct OpenDay {
    day: Date,
    cipher: SegmentCipher,
    frames: u64,
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

/// Appends `bytes` to `path` and syncs it; a new file's directory entry is synced too.
fn append_durably(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let existed = path.exists();
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_error("opening", path))?;
    file.write_all(bytes).map_err(io_error("writing", path))?;
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
    cut_to(&file, path, keep as u64)
}

fn cut_to(file: &File, path: &Path, len: u64) -> Result<(), StoreError> {
    file.set_len(len).map_err(io_error("truncating", path))?;
    file.sync_data().map_err(io_error("syncing", path))
}

/// The header of the day file at `path`, `None` when the file is shorter (its first
/// write was torn: never acknowledged).
fn read_header(
    file: &mut impl io::Read,
    path: &Path,
) -> Result<Option<[u8; HEADER_LEN]>, StoreError> {
    let mut header = [0u8; HEADER_LEN];
    match file.read_exact(&mut header) {
        Ok(()) => Ok(Some(header)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(io_error("reading", path)(e)),
    }
}

/// The next whole frame of `file` (length prefix, nonce, ciphertext), `None` at the
/// end or at a frame torn by a crash.
fn next_frame(
    file: &mut impl io::Read,
    path: &Path,
    offset: u64,
    frame: u64,
) -> Result<Option<Vec<u8>>, StoreError> {
    let mut len = [0u8; 4];
    if !read_fully(file, &mut len, path)? {
        return Ok(None);
    }
    let body = u32::from_be_bytes(len) as usize;
    if body > MAX_FRAME {
        return Err(StoreError::Damaged {
            path: path.to_owned(),
            frame,
            offset,
            problem: FrameError::BadLength,
        });
    }
    let mut bytes = vec![0u8; FRAME_OVERHEAD + body];
    bytes[..4].copy_from_slice(&len);
    if !read_fully(file, &mut bytes[4..], path)? {
        return Ok(None);
    }
    Ok(Some(bytes))
}

/// Fills `buf`; false when the file ended first.
fn read_fully(file: &mut impl io::Read, buf: &mut [u8], path: &Path) -> Result<bool, StoreError> {
    match file.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(io_error("reading", path)(e)),
    }
}

impl FileStore {
    /// The store under `root` (created if missing), sealing and opening days with the
    /// keys in `keys`; a torn last chain start is cut.
    pub fn open(root: impl Into<PathBuf>, keys: Arc<KeyCache>) -> Result<Self, StoreError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io_error("creating", &root))?;
        let store = Self {
            root,
            keys,
            appending: HashMap::new(),
        };
        for tenant in store.tenants()? {
            let dir = store.tenant_dir(&tenant)?;
            let chains = dir.join(CHAINS_FILE);
            if chains.exists() {
                repair_torn_tail(&chains)?;
            }
            // Days an earlier version kept as plain JSON lines are not read back.
            let plain = fs::read_dir(&dir)
                .map_err(io_error("listing", &dir))?
                .filter_map(Result::ok)
                .filter(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name != CHAINS_FILE && name.ends_with(".jsonl")
                })
                .count();
            if plain > 0 {
                tracing::warn!(
                    %tenant,
                    days = plain,
                    dir = %dir.display(),
                    "plaintext day files from an earlier version are not read; export them with that version or remove them"
                );
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

    /// The day `tenant` appends to now: the open one, the file on disk (a torn end
    /// cut), or a new file under the active key.
    fn day_to_append(&mut self, tenant: &str, day: Date) -> Result<&mut OpenDay, StoreError> {
        let path = self.day_file(tenant, day)?;
        let keys = &self.keys;
        match self.appending.entry(tenant.to_owned()) {
            Entry::Occupied(open) if open.get().day == day => Ok(open.into_mut()),
            entry => {
                let (cipher, frames) = match resume(keys, tenant, &path)? {
                    Some(resumed) => resumed,
                    None => (fresh_cipher(keys, tenant)?, 0),
                };
                let open = OpenDay {
                    day,
                    cipher,
                    frames,
                };
                Ok(entry.insert_entry(open).into_mut())
            }
        }
    }
}

/// `tenant`'s keys, or why there are none yet.
fn tenant_keys(keys: &KeyCache, tenant: &str) -> Result<Arc<TenantKeys>, StoreError> {
    keys.get(tenant).ok_or_else(|| StoreError::NoKey {
        tenant: tenant.to_owned(),
    })
}

/// A failed seal of `tenant`'s data as a store error.
fn seal_error(tenant: &str) -> impl FnOnce(portcullis_audit::Error) -> StoreError + '_ {
    move |e| StoreError::Seal {
        tenant: tenant.to_owned(),
        message: e.to_string(),
    }
}

/// The cipher of `tenant`'s day whose file (at `path`) starts with `header`.
fn cipher_for(
    keys: &KeyCache,
    tenant: &str,
    path: &Path,
    header: [u8; HEADER_LEN],
) -> Result<SegmentCipher, StoreError> {
    let keys = tenant_keys(keys, tenant)?;
    let version = segment::header_version(&header).ok_or_else(|| StoreError::Damaged {
        path: path.to_owned(),
        frame: 0,
        offset: 0,
        problem: FrameError::Unauthentic,
    })?;
    let key = keys
        .ring
        .get(version)
        .ok_or_else(|| StoreError::UnknownKeyVersion {
            tenant: tenant.to_owned(),
            path: path.to_owned(),
            version,
        })?;
    SegmentCipher::new(key, header).map_err(seal_error(tenant))
}

/// A new day's cipher: the tenant's active key, a new segment header.
fn fresh_cipher(keys: &KeyCache, tenant: &str) -> Result<SegmentCipher, StoreError> {
    let keys = tenant_keys(keys, tenant)?;
    SegmentCipher::new(&keys.active, segment::new_header(&keys.active)).map_err(seal_error(tenant))
}

/// The cipher and frame count of the day file at `path`, `None` when there is no
/// whole frame to go on from (the file, if any, is removed: nothing in it was
/// acknowledged). Each frame is opened; what a crash left after the last good one
/// (a torn frame, or zeros the disk never filled) is cut, since the proxy resends
/// it. A bad frame with good data after it is damage, not a crash, and is refused.
fn resume(
    keys: &KeyCache,
    tenant: &str,
    path: &Path,
) -> Result<Option<(SegmentCipher, u64)>, StoreError> {
    let file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("opening", path)(e)),
    };
    let mut reader = BufReader::new(&file);
    let Some(header) = read_header(&mut reader, path)? else {
        drop(reader);
        tracing::warn!(path = %path.display(), "removing a day file torn before its first frame");
        fs::remove_file(path).map_err(io_error("removing", path))?;
        return Ok(None);
    };
    let cipher = cipher_for(keys, tenant, path, header)?;
    let mut at = DayOffset {
        offset: HEADER_LEN as u64,
        frame: 0,
    };
    while let FrameRead::Whole { len, .. } =
        next_whole_frame(&mut reader, &file, path, &cipher, at)?
    {
        at.offset += len as u64;
        at.frame += 1;
    }
    drop(reader);
    if at.frame == 0 {
        tracing::warn!(path = %path.display(), "removing a day file torn in its first frame");
        fs::remove_file(path).map_err(io_error("removing", path))?;
        return Ok(None);
    }
    let size = file.metadata().map_err(io_error("reading", path))?.len();
    if size > at.offset {
        tracing::warn!(path = %path.display(), cut = size - at.offset, "cutting a torn last frame");
        cut_to(&file, path, at.offset)?;
    }
    Ok(Some((cipher, at.frame)))
}

/// The frame at `at` of the day `reader` reads (from `file` at `path`), opened:
/// `Partial` at the end, and at what a crash leaves after the last good frame (a torn
/// frame, a frame of the right length that does not open and ends the file, or zeros
/// the disk never filled), which was never acknowledged. A bad frame with data after
/// it is damage, not a crash: an error.
fn next_whole_frame(
    reader: &mut BufReader<impl io::Read + io::Seek>,
    file: &File,
    path: &Path,
    cipher: &SegmentCipher,
    at: DayOffset,
) -> Result<FrameRead, StoreError> {
    let problem = match next_frame(reader, path, at.offset, at.frame) {
        Ok(None) => return Ok(FrameRead::Partial),
        Ok(Some(bytes)) => match cipher.open(at.frame, &bytes) {
            Ok(read) => return Ok(read),
            Err(problem) => {
                let ends_file = io::BufRead::fill_buf(reader)
                    .map_err(io_error("reading", path))?
                    .is_empty();
                if ends_file {
                    return Ok(FrameRead::Partial);
                }
                problem
            }
        },
        Err(StoreError::Damaged { problem, .. }) => problem,
        Err(e) => return Err(e),
    };
    if zeros_from(file, path, at.offset)? {
        return Ok(FrameRead::Partial);
    }
    Err(StoreError::Damaged {
        path: path.to_owned(),
        frame: at.frame,
        offset: at.offset,
        problem,
    })
}

/// Whether `file` holds only zero bytes from `offset` on.
fn zeros_from(file: &File, path: &Path, offset: u64) -> Result<bool, StoreError> {
    let mut file = file;
    file.seek(SeekFrom::Start(offset))
        .map_err(io_error("seeking", path))?;
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).map_err(io_error("reading", path))?;
        if n == 0 {
            return Ok(true);
        }
        if buf[..n].iter().any(|b| *b != 0) {
            return Ok(false);
        }
    }
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
        // The key first: a batch that cannot be sealed changes nothing.
        if !entries.is_empty() {
            self.day_to_append(tenant, day)?;
        }
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
            append_durably(&dir.join(CHAINS_FILE), text.as_bytes())?;
        }
        if entries.is_empty() {
            return Ok(());
        }
        let mut text = String::new();
        for entry in entries {
            text.push_str(&entry.line);
            text.push('\n');
        }
        let path = self.day_file(tenant, day)?;
        let open = self.day_to_append(tenant, day)?;
        let mut bytes = Vec::new();
        if open.frames == 0 {
            bytes.extend_from_slice(open.cipher.header());
        }
        let sealed = open
            .cipher
            .seal(open.frames, text.as_bytes())
            .map_err(seal_error(tenant))?;
        bytes.extend_from_slice(&sealed);
        match append_durably(&path, &bytes) {
            Ok(()) => {
                open.frames += 1;
                Ok(())
            }
            Err(e) => {
                // What reached the file is unknown: count its frames again next time.
                self.appending.remove(tenant);
                Err(e)
            }
        }
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
        self.read_day_piece(tenant, day, DayOffset::START, usize::MAX)
            .map(|piece| piece.lines)
    }

    fn read_day_piece(
        &self,
        tenant: &str,
        day: Date,
        from: DayOffset,
        max_bytes: usize,
    ) -> Result<DayPiece, StoreError> {
        let path = self.day_file(tenant, day)?;
        let day = File::open(&path).map_err(io_error("opening", &path))?;
        let mut file = BufReader::new(&day);
        let ended = |next| DayPiece {
            lines: Vec::new(),
            next,
            end: true,
        };
        let Some(header) = read_header(&mut file, &path)? else {
            return Ok(ended(from));
        };
        let cipher = cipher_for(&self.keys, tenant, &path, header)?;
        let mut at = if from.offset == 0 {
            DayOffset {
                offset: HEADER_LEN as u64,
                frame: 0,
            }
        } else {
            from
        };
        file.seek(SeekFrom::Start(at.offset))
            .map_err(io_error("seeking", &path))?;
        let mut lines = Vec::new();
        let mut read = 0usize;
        while read < max_bytes.max(1) {
            let FrameRead::Whole { plaintext, len } =
                next_whole_frame(&mut file, &day, &path, &cipher, at)?
            else {
                // The end so far, or a frame torn by a crash (never acknowledged).
                return Ok(DayPiece {
                    lines,
                    next: at,
                    end: true,
                });
            };
            let damaged = |problem| StoreError::Damaged {
                path: path.clone(),
                frame: at.frame,
                offset: at.offset,
                problem,
            };
            let text =
                String::from_utf8(plaintext).map_err(|_| damaged(FrameError::Unauthentic))?;
            read += text.len();
            lines.extend(
                text.lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(str::to_owned),
            );
            at = DayOffset {
                offset: at.offset + len as u64,
                frame: at.frame + 1,
            };
        }
        let end = io::BufRead::fill_buf(&mut file)
            .map_err(io_error("reading", &path))?
            .is_empty();
        Ok(DayPiece {
            lines,
            next: at,
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
            if self
                .appending
                .get(tenant)
                .is_some_and(|open| open.day == day)
            {
                self.appending.remove(tenant);
            }
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
