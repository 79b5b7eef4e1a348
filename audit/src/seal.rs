//! Tenant seals: the audit collector's signed statement of how far every pod chain of a
//! tenant's log had reached. A pod's own checkpoints are signed with the pod's key, so a
//! compromised workload could rewrite its chain and sign it again; a seal is signed by
//! the collector with its serving key from the operator's CA, which no workload holds,
//! and seals link to each other by digest, so the log cannot be cut or rewritten behind
//! them (the model is CloudTrail's digest files, signed by the service, not the writer).
//!
//! A seal is one JSON line in the tenant's log, after the records it names:
//!
//! ```json
//! {"type":"seal","tenant":"acme","number":7,"timestamp":"…","prev":"<digest of seal 6>",
//!  "heads":{"<chain id>":{"seq":41,"hash":"…"}},
//!  "signer":{"algorithm":"ecdsa-p256-sha256","public_key":"…","certificate":"…","chain":[…]},
//!  "signature":"…"}
//! ```
//!
//! `heads` names only the chains that advanced since seal `number - 1`, with their last
//! record; seal 0 has `prev` = [`GENESIS_HASH`]. The signature covers the RFC 8785 form
//! without `signature`; the digest ([`seal_digest`]) is SHA-256 over the RFC 8785 form of
//! the whole seal, signature included.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::canonical::{GENESIS_HASH, checkpoint_signing_bytes, sha256_hex};
use crate::checkpoint::{CheckpointFault, CheckpointSigner, SignerInfo, verify_signed_value};
use crate::error::Error;

/// The `type` member that marks a seal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SealTag {
    /// Always `"seal"`.
    #[serde(rename = "seal")]
    Seal,
}

/// How far one chain had reached when sealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedHead {
    /// Its last record's seq.
    pub seq: u64,
    /// That record's hash.
    pub hash: String,
}

/// A signed statement of a tenant log's chain heads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    /// Marks the object as a seal.
    #[serde(rename = "type")]
    pub kind: SealTag,
    /// The tenant whose log it seals.
    pub tenant: String,
    /// 0 for the tenant's first seal, then one more each time.
    pub number: u64,
    /// When it was made.
    pub timestamp: Timestamp,
    /// The digest of seal `number - 1` ([`GENESIS_HASH`] for seal 0).
    pub prev: String,
    /// The chains that advanced since the previous seal, by chain id.
    pub heads: BTreeMap<String, SealedHead>,
    /// The collector's key and certificate.
    pub signer: SignerInfo,
    /// Base64 ASN.1 DER ECDSA signature over the canonical seal without it.
    pub signature: String,
}

impl Seal {
    /// True when `value` is a seal object (`"type":"seal"`).
    pub fn is_seal_value(value: &Value) -> bool {
        value.get("type").and_then(Value::as_str) == Some("seal")
    }

    /// The seal after `previous` (or the first, with `None`), signed by `signer`.
    pub fn sign(
        signer: &CheckpointSigner,
        tenant: &str,
        previous: Option<(u64, &str)>,
        heads: BTreeMap<String, SealedHead>,
        timestamp: Timestamp,
    ) -> Result<Seal, Error> {
        let (number, prev) = match previous {
            Some((number, digest)) => (number + 1, digest.to_owned()),
            None => (0, GENESIS_HASH.to_owned()),
        };
        let mut seal = Seal {
            kind: SealTag::Seal,
            tenant: tenant.to_owned(),
            number,
            timestamp,
            prev,
            heads,
            signer: signer.info().clone(),
            signature: String::new(),
        };
        seal.signature = signer.sign_message(&checkpoint_signing_bytes(&seal)?)?;
        Ok(seal)
    }

    /// What the next seal's `prev` must be.
    pub fn digest(&self) -> Result<String, Error> {
        let value = serde_json::to_value(self).map_err(|e| Error::Serialize(e.to_string()))?;
        seal_digest(&value)
    }
}

/// The digest of a stored seal object: SHA-256 of its RFC 8785 form, signature included.
pub fn seal_digest(value: &Value) -> Result<String, Error> {
    let bytes = serde_jcs::to_vec(value).map_err(|e| Error::Serialize(e.to_string()))?;
    Ok(sha256_hex(&bytes))
}

/// Checks a stored seal's signature against its embedded key and that its embedded
/// certificate carries that key; whether the signer is trusted is the caller's call.
/// Returns the seal and its digest.
pub fn verify_seal_value(value: Value) -> Result<(Seal, String), CheckpointFault> {
    let seal: Seal = serde_json::from_value(value.clone())
        .map_err(|e| CheckpointFault::Malformed(e.to_string()))?;
    let digest = seal_digest(&value).map_err(|e| CheckpointFault::Malformed(e.to_string()))?;
    verify_signed_value(value, &seal.signer, &seal.signature)?;
    Ok((seal, digest))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::checkpoint::SignerIdentity;

    fn signer() -> CheckpointSigner {
        let pkcs8 = CheckpointSigner::generate_pkcs8().unwrap();
        CheckpointSigner::from_pkcs8(&pkcs8, SignerIdentity::default()).unwrap()
    }

    fn heads(seq: u64) -> BTreeMap<String, SealedHead> {
        BTreeMap::from([(
            "chain-a".to_owned(),
            SealedHead {
                seq,
                hash: format!("{seq:064}"),
            },
        )])
    }

    #[test]
    fn a_seal_verifies_and_links_to_the_one_before() {
        let signer = signer();
        let first = Seal::sign(&signer, "acme", None, heads(3), Timestamp::UNIX_EPOCH).unwrap();
        assert_eq!((first.number, first.prev.as_str()), (0, GENESIS_HASH));
        let digest = first.digest().unwrap();
        let second = Seal::sign(
            &signer,
            "acme",
            Some((first.number, &digest)),
            heads(9),
            Timestamp::UNIX_EPOCH,
        )
        .unwrap();
        assert_eq!((second.number, second.prev.as_str()), (1, digest.as_str()));
        let value = serde_json::to_value(&second).unwrap();
        assert!(Seal::is_seal_value(&value));
        let (read, read_digest) = verify_seal_value(value).unwrap();
        assert_eq!(read, second);
        assert_eq!(read_digest, second.digest().unwrap());
    }

    #[test]
    fn a_seal_with_a_changed_head_does_not_verify() {
        let seal = Seal::sign(&signer(), "acme", None, heads(3), Timestamp::UNIX_EPOCH).unwrap();
        let mut value = serde_json::to_value(&seal).unwrap();
        value["heads"]["chain-a"]["seq"] = 2.into();
        assert_eq!(
            verify_seal_value(value).unwrap_err(),
            CheckpointFault::BadSignature
        );
    }
}
