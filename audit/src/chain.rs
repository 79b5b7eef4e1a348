//! The hash chain: each appended record gets the next `seq`, the previous record's hash
//! as `prev_hash`, and its own `hash` (see [`crate::canonical`]).
//!
//! Timestamps play no part in the order: a wall clock that jumps backwards changes
//! nothing here.

use crate::canonical::{GENESIS_HASH, sha256_hex};
use crate::error::Error;
use crate::record::AuditRecord;
use jiff::Timestamp;

/// A chain being written. One per writer (per proxy process).
#[derive(Debug, Clone)]
pub struct Chain {
    chain_id: String,
    next_seq: u64,
    last_hash: String,
}

impl Chain {
    /// A new chain starting at seq 0 with the genesis `prev_hash`.
    pub fn new(chain_id: impl Into<String>) -> Self {
        Chain {
            chain_id: chain_id.into(),
            next_seq: 0,
            last_hash: GENESIS_HASH.to_string(),
        }
    }

    /// A chain id unique to this process start: `<pod>-<UTC start time>-<8 random hex>`.
    pub fn new_id(pod: &str, now: Timestamp) -> String {
        let stamp = now.strftime("%Y%m%dT%H%M%SZ");
        let random: [u8; 4] = rand::random();
        format!("{pod}-{stamp}-{}", hex::encode(random))
    }

    /// The chain's id, written into every record and checkpoint.
    pub fn id(&self) -> &str {
        &self.chain_id
    }

    /// `(seq, hash)` of the last appended record, if any.
    pub fn head(&self) -> Option<(u64, &str)> {
        self.next_seq
            .checked_sub(1)
            .map(|seq| (seq, self.last_hash.as_str()))
    }

    /// Links `record` into the chain: sets `chain_id`, `seq`, `prev_hash` and `hash`
    /// (overwriting whatever they held) and returns it.
    pub fn append(&mut self, record: AuditRecord) -> Result<AuditRecord, Error> {
        self.link(record, None)
    }

    /// [`Chain::append`], also appending the linked record's JSON line and a newline to
    /// `lines`. The line is made from the bytes just hashed, with `hash` put in its
    /// place, so a record is serialised once for the hash and every sink.
    pub fn append_rendered(
        &mut self,
        record: AuditRecord,
        lines: &mut Vec<u8>,
    ) -> Result<AuditRecord, Error> {
        self.link(record, Some(lines))
    }

    /// The chain moves on only once the record is hashed (and rendered): a record that
    /// fails is left out without a gap.
    fn link(
        &mut self,
        mut record: AuditRecord,
        lines: Option<&mut Vec<u8>>,
    ) -> Result<AuditRecord, Error> {
        record.chain_id.clone_from(&self.chain_id);
        record.seq = self.next_seq;
        record.prev_hash.clone_from(&self.last_hash);
        record.hash.clear();
        let (canonical, hash_at) = record.canonical_parts()?;
        record.hash = sha256_hex(&canonical);
        if let Some(lines) = lines {
            let start = lines.len();
            let rendered = match hash_at {
                Some(at) => {
                    lines.extend_from_slice(&canonical[..at]);
                    lines.extend_from_slice(b",\"hash\":\"");
                    lines.extend_from_slice(record.hash.as_bytes());
                    lines.push(b'"');
                    lines.extend_from_slice(&canonical[at..]);
                    Ok(())
                }
                // Numbers past 2^53: the canonical form holds them as doubles.
                None => record.write_json_line(lines),
            };
            if let Err(e) = rendered {
                lines.truncate(start);
                return Err(e);
            }
            lines.push(b'\n');
        }
        self.next_seq += 1;
        self.last_hash.clone_from(&record.hash);
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Entry;
    use crate::record::AuditRecord;

    fn rec(ts: Timestamp) -> AuditRecord {
        AuditRecord::new(ts, "acme", "api-0", "api.identify", "key:ak_***7f2")
    }

    #[test]
    fn append_links_records() -> Result<(), Error> {
        let mut chain = Chain::new("c1");
        assert!(chain.head().is_none());
        let a = chain.append(rec(Timestamp::UNIX_EPOCH))?;
        let b = chain.append(rec(Timestamp::UNIX_EPOCH))?;
        assert_eq!((a.seq, b.seq), (0, 1));
        assert_eq!(a.prev_hash, GENESIS_HASH);
        assert_eq!(b.prev_hash, a.hash);
        assert_ne!(a.hash, b.hash);
        assert_eq!(b.chain_id, "c1");
        assert_eq!(chain.head(), Some((1, b.hash.as_str())));
        Ok(())
    }

    #[test]
    fn rendered_lines_are_the_records_json_lines() -> Result<(), Error> {
        let mut chain = Chain::new("c1");
        let mut big = rec(Timestamp::UNIX_EPOCH);
        big.bytes.received = u64::MAX;
        big.client_ip = Some(std::net::IpAddr::from([10, 0, 0, 7]));
        let mut lines = Vec::new();
        let a = chain.append_rendered(rec(Timestamp::UNIX_EPOCH), &mut lines)?;
        let b = chain.append_rendered(big, &mut lines)?;
        let mut expected = Vec::new();
        for record in [&a, &b] {
            record.write_json_line(&mut expected)?;
            expected.push(b'\n');
        }
        assert_eq!(
            String::from_utf8_lossy(&lines),
            String::from_utf8_lossy(&expected)
        );
        let text = String::from_utf8_lossy(&lines);
        let back = crate::format::json::parse_lines(&text)?;
        assert_eq!(back, vec![Entry::Record(a), Entry::Record(b)]);
        Ok(())
    }

    #[test]
    fn new_id_names_pod() {
        let id = Chain::new_id("api-0", Timestamp::UNIX_EPOCH);
        assert!(id.starts_with("api-0-19700101T000000Z-"), "{id}");
    }
}
