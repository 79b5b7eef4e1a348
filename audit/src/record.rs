//! The audit record: one per proxied request and one per admin action.
//!
//! JSON shape (field names are a contract; see [`crate::canonical`] for hashing):
//!
//! ```json
//! {"timestamp":"2026-03-16T14:22:01.123Z","chain_id":"api-7d9f-20260316T142200Z-1a2b3c4d",
//!  "seq":42,"tenant":"acme","pod":"api-7d9f","action":"api.identify",
//!  "principal":"key:ak_***7f2","client_ip":"10.0.0.7","method":"POST",
//!  "path":"/v1/identify","status":200,"latency_ms":12,"bytes":{"in":512,"out":90},
//!  "decision":"allow","reason":"","prev_hash":"…64 hex…","hash":"…64 hex…"}
//! ```
//!
//! `chain_id` names the hash chain the record belongs to (one per writer, i.e. per proxy
//! process), so records of several pods or restarts can sit in one directory and still
//! be verified chain by chain.

use crate::error::Error;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// Whether the request or admin action was let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Let through.
    Allow,
    /// Refused.
    Deny,
}

impl Decision {
    /// `"allow"` or `"deny"`, as serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
        }
    }
}

/// Bytes received from the client (`in`) and sent back to it (`out`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteCounts {
    /// Request bytes received.
    #[serde(rename = "in")]
    pub received: u64,
    /// Response bytes sent.
    #[serde(rename = "out")]
    pub sent: u64,
}

/// One audited request or admin action.
///
/// Build it with [`AuditRecord::new`] and the public fields; `chain_id`, `seq`,
/// `prev_hash` and `hash` are filled by [`crate::Chain::append`] (the writer does that),
/// whatever they held before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When the request arrived (UTC, RFC 3339). Data only: the order is `seq`.
    pub timestamp: Timestamp,
    /// The hash chain this record belongs to.
    pub chain_id: String,
    /// Position in the chain, from 0, without gaps.
    pub seq: u64,
    /// Tenant name.
    pub tenant: String,
    /// Pod (or operator instance) that produced the record.
    pub pod: String,
    /// `api.<scope>` or `admin.<object>.<verb>`; see [`action`].
    pub action: String,
    /// Who: `key:ak_***7f2`, `spiffe:...`, `user:...`; see [`principal`].
    pub principal: String,
    /// Client address, when there is one (admin actions have none).
    pub client_ip: Option<IpAddr>,
    /// HTTP method (or admission operation for admin actions).
    pub method: String,
    /// Request path (or object reference for admin actions).
    pub path: String,
    /// Response status code.
    pub status: u16,
    /// Time to answer, in milliseconds.
    pub latency_ms: u64,
    /// Bytes in and out.
    pub bytes: ByteCounts,
    /// Allow or deny.
    pub decision: Decision,
    /// Why (denial reason, or empty).
    pub reason: String,
    /// `hash` of the previous record in the chain; 64 zeros for the first.
    pub prev_hash: String,
    /// Hex SHA-256 of this record's canonical form (see [`crate::canonical`]).
    pub hash: String,
}

impl AuditRecord {
    /// A record with the given who/what and neutral defaults for the rest
    /// (no client IP, status 0, allow, chain fields empty until appended).
    pub fn new(
        timestamp: Timestamp,
        tenant: impl Into<String>,
        pod: impl Into<String>,
        action: impl Into<String>,
        principal: impl Into<String>,
    ) -> Self {
        AuditRecord {
            timestamp,
            chain_id: String::new(),
            seq: 0,
            tenant: tenant.into(),
            pod: pod.into(),
            action: action.into(),
            principal: principal.into(),
            client_ip: None,
            method: String::new(),
            path: String::new(),
            status: 0,
            latency_ms: 0,
            bytes: ByteCounts::default(),
            decision: Decision::Allow,
            reason: String::new(),
            prev_hash: String::new(),
            hash: String::new(),
        }
    }
}

/// The largest integer JCS writes digit for digit: it writes numbers as doubles.
const EXACT_IN_DOUBLE: u64 = 1 << 53;

impl AuditRecord {
    /// The RFC 8785 bytes the record hash covers: every member but `hash`, in sorted
    /// order (see [`crate::canonical`]). Written member by member, not through a
    /// `serde_json::Value`, because the writer hashes every record and building a map of
    /// seventeen owned members each time was most of that cost; the bytes are the same
    /// as [`crate::canonical::record_hash`]'s (a test holds them equal). Numbers past
    /// 2^53, which JCS writes as doubles, take that general path.
    pub fn canonical_without_hash(&self) -> Result<Vec<u8>, Error> {
        Ok(self.canonical_parts()?.0)
    }

    /// The canonical bytes of [`AuditRecord::canonical_without_hash`] and, when they were
    /// written directly, where the `hash` member goes in them: inserting it there gives
    /// the record's JSON line, so the writer serialises each record once.
    pub(crate) fn canonical_parts(&self) -> Result<(Vec<u8>, Option<usize>), Error> {
        let numbers = [
            self.seq,
            self.latency_ms,
            self.bytes.received,
            self.bytes.sent,
        ];
        if numbers.iter().any(|n| *n > EXACT_IN_DOUBLE) {
            let value = serde_json::to_value(self).map_err(|e| Error::Serialize(e.to_string()))?;
            return Ok((crate::canonical::canonical_without(value, "hash")?, None));
        }
        let mut out = Vec::with_capacity(512);
        let at = self.write_members(&mut out, false)?;
        Ok((out, Some(at)))
    }

    /// Appends the record as one line of JSON (without the newline) to `out`: the same
    /// object serde writes, members in sorted order, as the writer stores it. Written
    /// directly for the same reason as [`AuditRecord::canonical_without_hash`]: every
    /// sink of every record renders it.
    pub fn write_json_line(&self, out: &mut Vec<u8>) -> Result<(), Error> {
        self.write_members(out, true).map(|_| ())
    }

    /// Every member in RFC 8785 order (UTF-16 code units; every name here is ASCII),
    /// `hash` only `with_hash`. Numbers are written as integers: exact, and what JCS
    /// writes up to 2^53. Returns where in `out` the `hash` member starts (or would).
    fn write_members(&self, out: &mut Vec<u8>, with_hash: bool) -> Result<usize, Error> {
        use std::io::Write as _;
        let text = |out: &mut Vec<u8>, key: &str, value: &str| -> Result<(), Error> {
            out.extend_from_slice(key.as_bytes());
            serde_json::to_writer(&mut *out, value).map_err(|e| Error::Serialize(e.to_string()))
        };
        // Addresses, numbers and timestamps need no escaping, so they are written
        // through `Display` straight into `out`; writing into a Vec cannot fail.
        let plain = |out: &mut Vec<u8>, key: &str, value: &dyn std::fmt::Display| {
            out.extend_from_slice(key.as_bytes());
            let _ = write!(out, "{value}");
        };
        let quoted = |out: &mut Vec<u8>, key: &str, value: &dyn std::fmt::Display| {
            out.extend_from_slice(key.as_bytes());
            let _ = write!(out, "\"{value}\"");
        };
        text(out, "{\"action\":", &self.action)?;
        plain(out, ",\"bytes\":{\"in\":", &self.bytes.received);
        plain(out, ",\"out\":", &self.bytes.sent);
        text(out, "},\"chain_id\":", &self.chain_id)?;
        match &self.client_ip {
            Some(ip) => quoted(out, ",\"client_ip\":", ip),
            None => out.extend_from_slice(b",\"client_ip\":null"),
        }
        text(out, ",\"decision\":", self.decision.as_str())?;
        let hash_at = out.len();
        if with_hash {
            text(out, ",\"hash\":", &self.hash)?;
        }
        plain(out, ",\"latency_ms\":", &self.latency_ms);
        text(out, ",\"method\":", &self.method)?;
        text(out, ",\"path\":", &self.path)?;
        text(out, ",\"pod\":", &self.pod)?;
        text(out, ",\"prev_hash\":", &self.prev_hash)?;
        text(out, ",\"principal\":", &self.principal)?;
        text(out, ",\"reason\":", &self.reason)?;
        plain(out, ",\"seq\":", &self.seq);
        plain(out, ",\"status\":", &self.status);
        text(out, ",\"tenant\":", &self.tenant)?;
        quoted(out, ",\"timestamp\":", &self.timestamp);
        out.push(b'}');
        Ok(hash_at)
    }
}

/// Builders for the `action` field.
pub mod action {
    /// `api.<scope>`: a request authorised for `scope`.
    pub fn api(scope: &str) -> String {
        format!("api.{scope}")
    }

    /// `admin.<object>.<verb>`: e.g. `admin.key.create`.
    pub fn admin(object: &str, verb: &str) -> String {
        format!("admin.{object}.{verb}")
    }
}

/// Builders for the `principal` field. None of them ever includes secret material.
pub mod principal {
    /// `key:ak_***<last 3 chars of key_id>`; the key id is public, the secret never
    /// reaches this function.
    pub fn api_key(key_id: &str) -> String {
        let tail: String = {
            let chars: Vec<char> = key_id.chars().collect();
            let start = chars.len().saturating_sub(3);
            chars[start..].iter().collect()
        };
        format!("key:ak_***{tail}")
    }

    /// `spiffe:<id without scheme>` for a peer authenticated by mTLS; accepts the id with
    /// or without `spiffe://`.
    pub fn spiffe(id: &str) -> String {
        let rest = id.strip_prefix("spiffe://").unwrap_or(id);
        format!("spiffe://{rest}")
    }

    /// `user:<name>` for a Kubernetes user (admin actions).
    pub fn user(name: &str) -> String {
        format!("user:{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_serialises_lowercase() {
        assert_eq!(
            serde_json::to_string(&Decision::Deny).ok().as_deref(),
            Some("\"deny\"")
        );
        assert_eq!(Decision::Allow.as_str(), "allow");
    }

    #[test]
    fn principals_redact_and_prefix() {
        assert_eq!(principal::api_key("k4x9mq2r77f2"), "key:ak_***7f2");
        assert_eq!(principal::api_key("ab"), "key:ak_***ab");
        assert_eq!(principal::user("david@acme"), "user:david@acme");
        assert_eq!(
            principal::spiffe("spiffe://td/ns/a/sa/b"),
            "spiffe://td/ns/a/sa/b"
        );
        assert_eq!(action::admin("key", "create"), "admin.key.create");
        assert_eq!(action::api("identify"), "api.identify");
    }

    /// Records whose strings hold everything JSON escapes, non-ASCII text, empty
    /// members, every kind of client address and decision, and numbers up to 2^53
    /// (written directly) and past it (the general path).
    fn awkward_records() -> Vec<AuditRecord> {
        let texts = [
            "",
            "plain",
            "quote \" backslash \\ slash /",
            "controls \u{0}\u{1}\u{8}\u{9}\u{a}\u{c}\u{d}\u{1f}\u{7f}",
            "ünïcödé ✓ 😀 \u{2028}",
        ];
        let addresses = [
            None,
            Some(IpAddr::from([10, 0, 0, 7])),
            Some(IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1])),
        ];
        let numbers: [[u64; 4]; 2] = [
            [0, 429, 1_773_670, EXACT_IN_DOUBLE],
            [EXACT_IN_DOUBLE + 1, 7, u64::MAX, 1],
        ];
        let mut records = Vec::new();
        for (i, text) in texts.iter().enumerate() {
            for address in addresses {
                for decision in [Decision::Allow, Decision::Deny] {
                    for [seq, latency, received, sent] in numbers {
                        let mut r = AuditRecord::new(
                            Timestamp::from_millisecond(1_773_670_921_123 + i as i64 * 7919)
                                .unwrap_or(Timestamp::UNIX_EPOCH),
                            *text,
                            format!("pod-{text}"),
                            format!("api.{text}"),
                            principal::api_key(text),
                        );
                        r.chain_id = format!("chain-{i}");
                        r.seq = seq;
                        r.client_ip = address;
                        r.method = text.to_string();
                        r.path = format!("/v1/{text}");
                        r.status = [200, 403, 0, 503, u16::MAX][i];
                        r.latency_ms = latency;
                        r.bytes = ByteCounts { received, sent };
                        r.decision = decision;
                        r.reason = text.to_string();
                        r.prev_hash = crate::canonical::GENESIS_HASH.to_owned();
                        r.hash = "left out of the hash".to_owned();
                        records.push(r);
                    }
                }
            }
        }
        records
    }

    #[test]
    fn the_direct_canonical_form_is_the_general_one_byte_for_byte() {
        for record in awkward_records() {
            let general = crate::canonical::canonical_without(
                serde_json::to_value(&record).unwrap_or_default(),
                "hash",
            )
            .ok();
            assert_eq!(record.canonical_without_hash().ok(), general, "{record:?}");
            assert!(general.is_some());
        }
    }

    #[test]
    fn the_direct_json_line_is_the_serde_object_and_reads_back() {
        for record in awkward_records() {
            let mut line = Vec::new();
            assert!(record.write_json_line(&mut line).is_ok());
            let parsed: serde_json::Value = serde_json::from_slice(&line).unwrap_or_default();
            assert_eq!(
                parsed,
                serde_json::to_value(&record).unwrap_or_default(),
                "{}",
                String::from_utf8_lossy(&line)
            );
            let back: Option<AuditRecord> = serde_json::from_slice(&line).ok();
            assert_eq!(back.as_ref(), Some(&record));
        }
    }

    #[test]
    fn bytes_serialise_as_in_and_out() {
        let b = ByteCounts {
            received: 3,
            sent: 4,
        };
        assert_eq!(
            serde_json::to_string(&b).ok().as_deref(),
            Some(r#"{"in":3,"out":4}"#)
        );
    }
}
