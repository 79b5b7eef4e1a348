//! The human line: `2026-03-16 14:22:01 | api.identify | key:ak_***7f2 | 200 | 12ms`
//! (UTC, second precision).

use crate::record::AuditRecord;

/// Formats a record as one human-readable line (no newline).
pub fn human_line(record: &AuditRecord) -> String {
    format!(
        "{} | {} | {} | {} | {}ms",
        record.timestamp.strftime("%Y-%m-%d %H:%M:%S"),
        record.action,
        record.principal,
        record.status,
        record.latency_ms
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_documented_shape() -> Result<(), jiff::Error> {
        let mut rec = AuditRecord::new(
            "2026-03-16T14:22:01.734Z".parse()?,
            "acme",
            "api-0",
            "api.identify",
            "key:ak_***7f2",
        );
        rec.status = 200;
        rec.latency_ms = 12;
        assert_eq!(
            human_line(&rec),
            "2026-03-16 14:22:01 | api.identify | key:ak_***7f2 | 200 | 12ms"
        );
        Ok(())
    }
}
