//! Canonical forms and hashes, so any tool can recompute them.
//!
//! **Record hash.** Take the record's JSON object exactly as stored, remove the `hash`
//! member (keep everything else, `prev_hash` included, and any members this version does
//! not know), serialise the rest as RFC 8785 (JSON Canonicalization Scheme: members
//! sorted by UTF-16 code units, no whitespace, ECMAScript number and string forms), and
//! take the SHA-256 of those UTF-8 bytes. `hash` is that digest in lowercase hex.
//! The first record of a chain has `prev_hash` = 64 zeros ([`GENESIS_HASH`]); every
//! other record's `prev_hash` is the `hash` of the record with the previous `seq`.
//!
//! With `jq` and a JCS tool: `jq -c 'del(.hash)' | jcs | sha256sum`.
//!
//! **Checkpoint signature.** Same idea: the checkpoint's JSON object without the
//! `signature` member, RFC 8785, then ECDSA P-256 with SHA-256 over those bytes
//! (ASN.1 DER signature, base64 standard alphabet with padding).

use crate::error::Error;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// `prev_hash` of the first record in a chain.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// RFC 8785 bytes of a JSON object without the member `excluded`.
/// Takes the value by ownership so callers holding a parsed line need not copy it.
pub fn canonical_without(mut value: Value, excluded: &str) -> Result<Vec<u8>, Error> {
    match value.as_object_mut() {
        Some(object) => {
            object.remove(excluded);
        }
        None => return Err(Error::Malformed("expected a JSON object".into())),
    }
    serde_jcs::to_vec(&value).map_err(|e| Error::Serialize(e.to_string()))
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    // `hex::encode` goes char by char; the writer hashes every record.
    let mut text = [0u8; 64];
    match hex::encode_to_slice(Sha256::digest(bytes), &mut text) {
        Ok(()) => String::from_utf8_lossy(&text).into_owned(),
        Err(_) => hex::encode(Sha256::digest(bytes)),
    }
}

/// The record hash of a stored record object (see the module docs).
pub fn record_hash_of_value(value: Value) -> Result<String, Error> {
    Ok(sha256_hex(&canonical_without(value, "hash")?))
}

/// The record hash of anything that serialises as a record object.
pub fn record_hash<T: Serialize>(record: &T) -> Result<String, Error> {
    let value = serde_json::to_value(record).map_err(|e| Error::Serialize(e.to_string()))?;
    record_hash_of_value(value)
}

/// The bytes a checkpoint signature covers (see the module docs).
pub fn checkpoint_signing_bytes<T: Serialize>(checkpoint: &T) -> Result<Vec<u8>, Error> {
    let value = serde_json::to_value(checkpoint).map_err(|e| Error::Serialize(e.to_string()))?;
    canonical_without(value, "signature")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hash_ignores_hash_member_and_member_order() {
        let a = json!({"b": 1, "a": "x", "hash": "whatever"});
        let b = json!({"a": "x", "b": 1});
        assert_eq!(
            record_hash_of_value(a).ok(),
            record_hash_of_value(b.clone()).ok()
        );
        assert_eq!(
            canonical_without(b, "hash").ok(),
            Some(br#"{"a":"x","b":1}"#.to_vec())
        );
    }

    #[test]
    fn non_objects_are_malformed() {
        assert!(matches!(
            record_hash_of_value(json!([1, 2])),
            Err(Error::Malformed(_))
        ));
    }

    #[test]
    fn genesis_is_64_zeros() {
        assert_eq!(GENESIS_HASH.len(), 64);
        assert!(GENESIS_HASH.chars().all(|c| c == '0'));
    }
}
