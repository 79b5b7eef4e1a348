//! What the collector's tests share: a proxy's hash chain, and batches of it.

use std::sync::Arc;

use jiff::Timestamp;
use portcullis_audit::entry::Entry;
use portcullis_audit::{AuditRecord, Chain, DataKey, TenantKeys};
use portcullis_collector::KeyCache;

/// Keys of the tenants the tests use, the same at every call: a store opened again
/// reads what the one before wrote.
pub fn keys() -> Arc<KeyCache> {
    let cache = KeyCache::new();
    for (i, tenant) in ["shop", "bank"].into_iter().enumerate() {
        cache.insert(TenantKeys::single(
            tenant,
            DataKey::new(1, [i as u8 + 1; 32]),
        ));
    }
    Arc::new(cache)
}

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
        (0..n)
            .map(|i| {
                self.request(
                    start(),
                    "api.identify",
                    "key:ak_***7f2",
                    &format!("/v1/identify/{i}"),
                )
            })
            .collect()
    }

    /// Makes one more record and returns its line.
    pub fn request(&mut self, at: Timestamp, action: &str, principal: &str, path: &str) -> String {
        let mut record = AuditRecord::new(at, self.tenant.as_str(), "web-7d9f", action, principal);
        record.method = "POST".into();
        record.path = path.into();
        record.status = 200;
        let record = self.chain.append(record).unwrap_or_else(|e| panic!("{e}"));
        let line = Entry::Record(record)
            .to_json_line()
            .unwrap_or_else(|e| panic!("{e}"));
        self.lines.push(line.clone());
        line
    }
}

/// `lines` as one NDJSON body.
pub fn batch(lines: &[String]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}
