//! What the collector's tests share: a proxy's hash chain, and batches of it.

use jiff::Timestamp;
use portcullis_audit::entry::Entry;
use portcullis_audit::{AuditRecord, Chain};

/// When the test records were made.
pub fn start() -> Timestamp {
    "2027-01-15T08:00:00Z"
        .parse()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A proxy's chain: records it made, as JSON lines, in order.
pub struct Proxy {
    chain: Chain,
    tenant: String,
    /// Every line made so far.
    pub lines: Vec<String>,
}

impl Proxy {
    /// A chain `chain_id` of `tenant`.
    pub fn new(chain_id: &str, tenant: &str) -> Self {
        Self {
            chain: Chain::new(chain_id),
            tenant: tenant.to_owned(),
            lines: Vec::new(),
        }
    }

    /// Makes `n` more records and returns their lines.
    pub fn requests(&mut self, n: usize) -> Vec<String> {
        let mut made = Vec::new();
        for i in 0..n {
            let mut record = AuditRecord::new(
                start(),
                self.tenant.as_str(),
                "web-7d9f",
                "api.identify",
                "key:ak_***7f2",
            );
            record.method = "POST".into();
            record.path = format!("/v1/identify/{i}");
            record.status = 200;
            let record = self.chain.append(record).unwrap_or_else(|e| panic!("{e}"));
            let line = Entry::Record(record)
                .to_json_line()
                .unwrap_or_else(|e| panic!("{e}"));
            made.push(line.clone());
            self.lines.push(line);
        }
        made
    }
}

/// `lines` as one NDJSON body.
pub fn batch(lines: &[String]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}
