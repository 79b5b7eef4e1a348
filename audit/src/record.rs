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
