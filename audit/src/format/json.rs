//! JSON lines: one record or checkpoint object per line, `\n`-terminated.

use crate::entry::Entry;
use crate::error::Error;

/// Appends `entries` as JSON lines to `out`.
pub fn write_lines(entries: &[Entry], out: &mut Vec<u8>) -> Result<(), Error> {
    out.reserve(entries.len() * 512);
    for entry in entries {
        entry.write_json_line(out)?;
        out.push(b'\n');
    }
    Ok(())
}

/// Parses JSON lines, skipping blank ones.
pub fn parse_lines(text: &str) -> Result<Vec<Entry>, Error> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(Entry::from_json_line)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AuditRecord, Chain};

    #[test]
    fn round_trip() -> Result<(), Error> {
        let mut chain = Chain::new("c");
        let rec = chain.append(AuditRecord::new(
            jiff::Timestamp::UNIX_EPOCH,
            "acme",
            "p",
            "api.x",
            "user:u",
        ))?;
        let mut out = Vec::new();
        write_lines(&[Entry::Record(rec.clone())], &mut out)?;
        let text = String::from_utf8(out).map_err(|e| Error::Malformed(e.to_string()))?;
        assert!(text.ends_with('\n') && text.matches('\n').count() == 1);
        assert_eq!(parse_lines(&text)?, vec![Entry::Record(rec)]);
        Ok(())
    }
}
