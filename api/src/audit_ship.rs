//! Shipping audit records from a proxy to the audit collector.
//!
//! The proxy `POST`s a batch to [`RECORDS_PATH`] over mutual TLS with its workload
//! certificate: newline-delimited JSON ([`CONTENT_TYPE`]), each line one entry of its
//! hash chain exactly as the chain wrote it (a record, or a signed checkpoint). The
//! collector checks the whole batch against what it already holds and either makes every
//! new entry durable and answers [`ShipAck`] (200), or stores nothing and answers
//! [`ShipRefusal`] (409 for a batch that does not continue the chain, 403 for a record of
//! another tenant or a chain another workload writes, 400 for a malformed line).
//!
//! Resending is always safe: entries the collector already holds are acknowledged again
//! and not stored twice (the proxy deletes from its spool only what was acknowledged, so
//! a lost answer means a resend).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The collector's ingest path.
pub const RECORDS_PATH: &str = "/v1/audit/records";

/// The batch's content type.
pub const CONTENT_TYPE: &str = "application/x-ndjson";

/// A batch made durable.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShipAck {
    /// Per chain in the batch, the highest `seq` the collector holds: everything up to it
    /// may leave the proxy's spool.
    pub durable_through: BTreeMap<String, u64>,
    /// Entries stored by this batch.
    pub stored: u64,
    /// Entries of this batch the collector already held.
    pub duplicates: u64,
}

/// Why a batch was refused; nothing of it was stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ShipRefusalReason {
    /// A line is not a record or checkpoint.
    Malformed,
    /// A record's `hash` is not the hash of its content.
    AlteredRecord,
    /// The batch skips records: resend from `expectedSeq`.
    MissingRecords,
    /// A record's `prev_hash` is not the hash of the record before it.
    BrokenLink,
    /// A record the collector holds was sent again with different content.
    Fork,
    /// A checkpoint's signature does not verify, or it names a record it does not match.
    BadCheckpoint,
    /// A record names another tenant than the sender's certificate.
    WrongTenant,
    /// The chain was started by another workload.
    ForeignChain,
}

/// The body of a refusal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShipRefusal {
    /// What is wrong and what to do, for people.
    pub error: String,
    /// What is wrong, for programs.
    pub reason: ShipRefusalReason,
    /// The chain concerned, when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_id: Option<String>,
    /// The `seq` the collector expects next on that chain (resend from there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_seq: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answers_keep_their_wire_names() {
        let ack = ShipAck {
            durable_through: BTreeMap::from([("web-1".to_owned(), 41)]),
            stored: 2,
            duplicates: 1,
        };
        assert_eq!(
            serde_json::to_value(&ack).unwrap_or_default(),
            serde_json::json!({"durableThrough": {"web-1": 41}, "stored": 2, "duplicates": 1})
        );
        let refusal = ShipRefusal {
            error: "resend from 7".into(),
            reason: ShipRefusalReason::MissingRecords,
            chain_id: Some("web-1".into()),
            expected_seq: Some(7),
        };
        assert_eq!(
            serde_json::to_value(&refusal).unwrap_or_default(),
            serde_json::json!({"error": "resend from 7", "reason": "MissingRecords",
                               "chainId": "web-1", "expectedSeq": 7})
        );
    }
}
