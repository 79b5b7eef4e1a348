//! CSV export with a header row; one row per record (checkpoints are not exported).

use crate::error::Error;
use crate::record::AuditRecord;
use std::io::Write;

/// Column names, in order.
pub const HEADER: [&str; 18] = [
    "timestamp",
    "chain_id",
    "seq",
    "tenant",
    "pod",
    "action",
    "principal",
    "client_ip",
    "method",
    "path",
    "status",
    "latency_ms",
    "bytes_in",
    "bytes_out",
    "decision",
    "reason",
    "prev_hash",
    "hash",
];

/// Writes records as CSV; the header is written on creation.
pub struct CsvExport<W: Write> {
    writer: csv::Writer<W>,
}

impl<W: Write> CsvExport<W> {
    /// Starts an export, writing the header row.
    pub fn new(out: W) -> Result<Self, Error> {
        let mut writer = csv::Writer::from_writer(out);
        writer.write_record(HEADER).map_err(csv_error)?;
        Ok(CsvExport { writer })
    }

    /// Writes one record.
    pub fn write(&mut self, r: &AuditRecord) -> Result<(), Error> {
        self.writer.write_record(row(r)).map_err(csv_error)
    }

    /// Flushes and returns the output.
    pub fn finish(self) -> Result<W, Error> {
        self.writer
            .into_inner()
            .map_err(|e| Error::Serialize(format!("csv flush: {}", e.error())))
    }
}

/// For output sent in pieces (a streamed export): appends the header row to `out`.
pub fn append_header(out: &mut Vec<u8>) -> Result<(), Error> {
    append_row(HEADER, out)
}

/// For output sent in pieces: appends `r`'s row to `out`, quoted exactly as
/// [`CsvExport`] quotes it.
pub fn append_record(r: &AuditRecord, out: &mut Vec<u8>) -> Result<(), Error> {
    append_row(row(r), out)
}

fn append_row<T: AsRef<[u8]>>(
    row: impl IntoIterator<Item = T>,
    out: &mut Vec<u8>,
) -> Result<(), Error> {
    let mut writer = csv::WriterBuilder::new()
        .buffer_capacity(512)
        .from_writer(out);
    writer.write_record(row).map_err(csv_error)?;
    writer
        .flush()
        .map_err(|e| Error::Serialize(format!("csv flush: {e}")))
}

fn row(r: &AuditRecord) -> [String; 18] {
    [
        r.timestamp.to_string(),
        r.chain_id.clone(),
        r.seq.to_string(),
        r.tenant.clone(),
        r.pod.clone(),
        r.action.clone(),
        r.principal.clone(),
        r.client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        r.method.clone(),
        r.path.clone(),
        r.status.to_string(),
        r.latency_ms.to_string(),
        r.bytes.received.to_string(),
        r.bytes.sent.to_string(),
        r.decision.as_str().to_string(),
        r.reason.clone(),
        r.prev_hash.clone(),
        r.hash.clone(),
    ]
}

fn csv_error(e: csv::Error) -> Error {
    Error::Serialize(format!("csv: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_then_rows_with_quoting() -> Result<(), Error> {
        let mut rec = AuditRecord::new(
            jiff::Timestamp::UNIX_EPOCH,
            "acme",
            "p",
            "api.x",
            "user:a,b",
        );
        rec.status = 403;
        rec.decision = crate::Decision::Deny;
        let mut export = CsvExport::new(Vec::new())?;
        export.write(&rec)?;
        let text =
            String::from_utf8(export.finish()?).map_err(|e| Error::Malformed(e.to_string()))?;
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some(HEADER.join(",").as_str()));
        let row = lines.next().unwrap_or_default();
        assert!(
            row.contains("\"user:a,b\"") && row.contains(",403,") && row.contains(",deny,"),
            "{row}"
        );
        Ok(())
    }

    #[test]
    fn pieces_match_the_whole_export() -> Result<(), Error> {
        let mut first = AuditRecord::new(
            jiff::Timestamp::UNIX_EPOCH,
            "acme",
            "p",
            "api.x",
            "user:\"q\"",
        );
        first.reason = "line\nbreak".into();
        let second = AuditRecord::new(
            jiff::Timestamp::UNIX_EPOCH,
            "acme",
            "p",
            "api.y",
            "key:ak_***abc",
        );
        let mut export = CsvExport::new(Vec::new())?;
        export.write(&first)?;
        export.write(&second)?;
        let whole = export.finish()?;
        let mut pieces = Vec::new();
        append_header(&mut pieces)?;
        append_record(&first, &mut pieces)?;
        append_record(&second, &mut pieces)?;
        assert_eq!(
            String::from_utf8_lossy(&pieces),
            String::from_utf8_lossy(&whole)
        );
        Ok(())
    }
}
