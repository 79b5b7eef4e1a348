//! Reading audit files and directories: plain JSON-lines files (`.jsonl`, `.json`,
//! `.log`, `.ndjson`) and encrypted segments (`.pcseg`, `.pcseg.open`, recognised by their
//! header whatever the name). Directories are walked in name order.

use crate::entry::Entry;
use crate::error::Error;
use crate::keyring::KeyRing;
use crate::record::AuditRecord;
use crate::segment::{SegmentError, is_segment, open_segment};
use crate::verify::{Location, Problem, Verifier, VerifyOptions, VerifyReport};
use jiff::Timestamp;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const EXTENSIONS: [&str; 6] = [
    ".jsonl",
    ".json",
    ".log",
    ".ndjson",
    ".pcseg",
    ".pcseg.open",
];
const MAX_DEPTH: usize = 8;

/// The files to read for `path`: itself if a file, else the audit files below it in
/// name order.
pub fn list_inputs(path: &Path) -> Result<Vec<PathBuf>, Error> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    walk(path, 0, &mut out)?;
    out.sort();
    Ok(out)
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<(), Error> {
    if depth > MAX_DEPTH {
        return Ok(());
    }
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let kind = entry.file_type().map_err(|e| Error::io(&path, e))?;
        if kind.is_dir() {
            walk(&path, depth + 1, out)?;
        } else if kind.is_file() && EXTENSIONS.iter().any(|ext| name.ends_with(ext)) {
            out.push(path);
        }
    }
    Ok(())
}

/// Calls `line_fn` with every non-blank line of `path` and its location (decrypting when
/// the file is an encrypted segment). Returns the segment error that stopped reading
/// early, if any; lines before it have been delivered.
pub fn for_each_line(
    path: &Path,
    source_index: usize,
    keys: Option<&KeyRing>,
    mut line_fn: impl FnMut(&str, Location),
) -> Result<Option<(SegmentError, Location)>, Error> {
    let label: Arc<str> = Arc::from(path.display().to_string());
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut magic = [0u8; 8];
    let mut got = 0;
    while got < magic.len() {
        let n = file
            .read(&mut magic[got..])
            .map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        got += n;
    }
    if is_segment(&magic[..got]) {
        let keys = keys.ok_or_else(|| Error::KeysRequired {
            path: path.to_path_buf(),
        })?;
        let mut bytes = magic[..got].to_vec();
        file.read_to_end(&mut bytes)
            .map_err(|e| Error::io(path, e))?;
        let opened = open_segment(&bytes, keys);
        let mut line_no = 0u64;
        for line in opened.plaintext.lines() {
            line_no += 1;
            if !line.trim().is_empty() {
                line_fn(line, Location::new(label.clone(), source_index, line_no));
            }
        }
        return Ok(opened
            .error
            .map(|e| (e, Location::new(label, source_index, line_no + 1))));
    }
    let reader = BufReader::new(std::io::Cursor::new(magic[..got].to_vec()).chain(file));
    for (index, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        if !line.trim().is_empty() {
            line_fn(
                &line,
                Location::new(label.clone(), source_index, index as u64 + 1),
            );
        }
    }
    Ok(None)
}

/// Verifies everything under `path` (see [`crate::verify`]): a first pass collects the
/// checkpoints, a second checks records in order. `progress` is called with the number of
/// records checked every 100 000 records. Errors are about reading (missing file, keys
/// needed); findings are the inner `Err(Problem)`.
pub fn verify_path(
    path: &Path,
    keys: Option<&KeyRing>,
    options: VerifyOptions,
    mut progress: impl FnMut(u64),
) -> Result<Result<VerifyReport, Problem>, Error> {
    let inputs = list_inputs(path)?;
    let mut verifier = Verifier::new(options);
    for (index, input) in inputs.iter().enumerate() {
        for_each_line(input, index, keys, |line, location| {
            if line.contains("checkpoint")
                && let Ok(value) = serde_json::from_str::<Value>(line)
                && Entry::is_checkpoint_value(&value)
            {
                verifier.add_checkpoint(value, location);
            }
        })?;
    }
    for (index, input) in inputs.iter().enumerate() {
        let stopped = for_each_line(
            input,
            index,
            keys,
            |line, location| match serde_json::from_str::<Value>(line) {
                Ok(value) if Entry::is_checkpoint_value(&value) => {}
                Ok(value) => {
                    verifier.push_record(value, location);
                    if verifier.records_seen().is_multiple_of(100_000) {
                        progress(verifier.records_seen());
                    }
                }
                Err(e) => verifier.report(Problem::Malformed {
                    location,
                    message: e.to_string(),
                }),
            },
        )?;
        if let Some((error, location)) = stopped {
            verifier.report(Problem::Unreadable {
                location,
                message: error.to_string(),
            });
        }
    }
    Ok(verifier.finish())
}

/// Which records an export keeps.
#[derive(Debug, Clone, Default)]
pub struct ExportFilter {
    /// Only this tenant.
    pub tenant: Option<String>,
    /// Only records at or after this time.
    pub since: Option<Timestamp>,
    /// Only records before this time.
    pub until: Option<Timestamp>,
    /// Only this action, or with a trailing `*` the actions starting with what precedes it.
    pub action: Option<String>,
    /// Only this principal.
    pub principal: Option<String>,
}

impl ExportFilter {
    /// True when `record` passes.
    pub fn keeps(&self, record: &AuditRecord) -> bool {
        self.tenant.as_ref().is_none_or(|t| *t == record.tenant)
            && self.since.is_none_or(|s| record.timestamp >= s)
            && self.until.is_none_or(|u| record.timestamp < u)
            && self
                .action
                .as_deref()
                .is_none_or(|a| match a.strip_suffix('*') {
                    Some(prefix) => record.action.starts_with(prefix),
                    None => record.action == a,
                })
            && self
                .principal
                .as_ref()
                .is_none_or(|p| *p == record.principal)
    }
}

/// What an export did.
#[derive(Debug, Default)]
pub struct ExportSummary {
    /// Records passed to the callback.
    pub exported: u64,
    /// Records filtered out.
    pub filtered: u64,
    /// Lines that were not valid records or checkpoints, with their location.
    pub malformed: Vec<Location>,
    /// Sources that could not be read to the end.
    pub unreadable: Vec<(Location, SegmentError)>,
}

/// Calls `export` with every record under `path` that `filter` keeps, as its stored JSON
/// line and parsed. Checkpoints are skipped. Stops at the first error `export` returns.
pub fn export_path(
    path: &Path,
    keys: Option<&KeyRing>,
    filter: &ExportFilter,
    mut export: impl FnMut(&str, &AuditRecord) -> Result<(), Error>,
) -> Result<ExportSummary, Error> {
    let mut summary = ExportSummary::default();
    let mut failure = None;
    for (index, input) in list_inputs(path)?.iter().enumerate() {
        let stopped = for_each_line(input, index, keys, |line, location| {
            if failure.is_some() {
                return;
            }
            match Entry::from_json_line(line) {
                Ok(Entry::Record(record)) if filter.keeps(&record) => {
                    summary.exported += 1;
                    if let Err(e) = export(line, &record) {
                        failure = Some(e);
                    }
                }
                Ok(Entry::Record(_)) => summary.filtered += 1,
                Ok(Entry::Checkpoint(_)) => {}
                Err(_) => summary.malformed.push(location),
            }
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        if let Some((error, location)) = stopped {
            summary.unreadable.push((location, error));
        }
    }
    Ok(summary)
}
