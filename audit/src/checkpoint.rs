//! Signed checkpoints: every N records or T seconds the writer signs
//! `{chain_id, seq, hash}` of the last record with the workload's ECDSA P-256 key.
//!
//! A checkpoint is one JSON object with `"type":"checkpoint"`, so it can travel in the
//! same JSON-lines stream as records (records have no `type` member):
//!
//! ```json
//! {"type":"checkpoint","chain_id":"…","seq":999,"hash":"…","timestamp":"…",
//!  "signer":{"algorithm":"ecdsa-p256-sha256","public_key":"<base64 SEC1 point>",
//!            "spiffe_id":"spiffe://…","certificate":"<base64 DER>"},
//!  "signature":"<base64 ASN.1 DER ECDSA signature>"}
//! ```
//!
//! The signature covers the RFC 8785 form of the object without `signature`
//! (see [`crate::canonical`]).

use crate::canonical::{canonical_without, checkpoint_signing_bytes};
use crate::error::Error;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use jiff::Timestamp;
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;
use std::time::Duration;

/// The only signature algorithm, named in every checkpoint.
pub const ALGORITHM: &str = "ecdsa-p256-sha256";

/// The `type` member that marks a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckpointTag {
    /// Always `"checkpoint"`.
    #[serde(rename = "checkpoint")]
    Checkpoint,
}

/// Who signed a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignerInfo {
    /// Always [`ALGORITHM`].
    pub algorithm: String,
    /// The public key: base64 of the uncompressed SEC1 point (65 bytes).
    pub public_key: String,
    /// The workload's SPIFFE id, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    /// The workload certificate (base64 DER), when known. Its key must be `public_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// The intermediates that issued `certificate` (base64 DER, issuer of the leaf
    /// first), so a verifier holding only the roots can build the chain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<String>,
}

/// A signed statement that record `seq` of chain `chain_id` had hash `hash`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Marks the object as a checkpoint.
    #[serde(rename = "type")]
    pub kind: CheckpointTag,
    /// The chain.
    pub chain_id: String,
    /// The last record covered.
    pub seq: u64,
    /// That record's hash.
    pub hash: String,
    /// When the checkpoint was made.
    pub timestamp: Timestamp,
    /// The signer's key and identity.
    pub signer: SignerInfo,
    /// Base64 ASN.1 DER ECDSA signature over the canonical checkpoint.
    pub signature: String,
}

/// Identity attached to a signer, so a verifier can tell whose key it was.
#[derive(Debug, Clone, Default)]
pub struct SignerIdentity {
    /// The workload's SPIFFE id.
    pub spiffe_id: Option<String>,
    /// The workload certificate, DER.
    pub certificate_der: Option<Vec<u8>>,
    /// The intermediates that issued it, DER, issuer of the leaf first.
    pub intermediates_der: Vec<Vec<u8>>,
}

/// Signs checkpoints with an ECDSA P-256 key. `Debug` never shows the key.
pub struct CheckpointSigner {
    key_pair: EcdsaKeyPair,
    rng: SystemRandom,
    signer: SignerInfo,
}

impl fmt::Debug for CheckpointSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointSigner")
            .field("public_key", &self.signer.public_key)
            .field("spiffe_id", &self.signer.spiffe_id)
            .finish_non_exhaustive()
    }
}

impl CheckpointSigner {
    /// A signer from a PKCS#8 DER ECDSA P-256 private key (the workload key).
    pub fn from_pkcs8(pkcs8_der: &[u8], identity: SignerIdentity) -> Result<Self, Error> {
        let rng = SystemRandom::new();
        let key_pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8_der, &rng)
                .map_err(|e| Error::SigningKey(format!("not a PKCS#8 ECDSA P-256 key ({e})")))?;
        let signer = SignerInfo {
            algorithm: ALGORITHM.to_string(),
            public_key: B64.encode(key_pair.public_key().as_ref()),
            spiffe_id: identity.spiffe_id,
            certificate: identity.certificate_der.map(|der| B64.encode(der)),
            chain: identity
                .intermediates_der
                .iter()
                .map(|der| B64.encode(der))
                .collect(),
        };
        Ok(CheckpointSigner {
            key_pair,
            rng,
            signer,
        })
    }

    /// A fresh random key (PKCS#8 DER), for tests and demos.
    pub fn generate_pkcs8() -> Result<Vec<u8>, Error> {
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &SystemRandom::new())
            .map(|doc| doc.as_ref().to_vec())
            .map_err(|_| Error::Signing)
    }

    /// The public key (uncompressed SEC1 point), for pinning in verifiers.
    pub fn public_key(&self) -> &[u8] {
        self.key_pair.public_key().as_ref()
    }

    /// Who signs: the key and certificate every signed object carries.
    pub fn info(&self) -> &SignerInfo {
        &self.signer
    }

    /// Base64 of the signature over `message` (canonical bytes of a signed object).
    pub fn sign_message(&self, message: &[u8]) -> Result<String, Error> {
        let signature = self
            .key_pair
            .sign(&self.rng, message)
            .map_err(|_| Error::Signing)?;
        Ok(B64.encode(signature.as_ref()))
    }

    /// Signs a checkpoint for record `seq` with hash `hash` of `chain_id`.
    pub fn sign(
        &self,
        chain_id: &str,
        seq: u64,
        hash: &str,
        timestamp: Timestamp,
    ) -> Result<Checkpoint, Error> {
        let mut checkpoint = Checkpoint {
            kind: CheckpointTag::Checkpoint,
            chain_id: chain_id.to_string(),
            seq,
            hash: hash.to_string(),
            timestamp,
            signer: self.signer.clone(),
            signature: String::new(),
        };
        checkpoint.signature = self.sign_message(&checkpoint_signing_bytes(&checkpoint)?)?;
        Ok(checkpoint)
    }
}

/// Why a stored checkpoint was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointFault {
    /// Not a well-formed checkpoint object.
    #[error("malformed checkpoint: {0}")]
    Malformed(String),
    /// The signature does not match the content and public key.
    #[error("signature does not verify")]
    BadSignature,
    /// The embedded certificate does not carry the embedded public key.
    #[error("certificate does not match the signing key: {0}")]
    CertificateMismatch(String),
}

/// Checks a stored checkpoint object's signature (against its own embedded public key)
/// and, when a certificate is embedded, that the certificate carries that key.
/// Whether the key is *trusted* is the caller's decision ([`crate::VerifyOptions`]).
pub fn verify_checkpoint_value(value: Value) -> Result<Checkpoint, CheckpointFault> {
    let checkpoint: Checkpoint = serde_json::from_value(value.clone())
        .map_err(|e| CheckpointFault::Malformed(e.to_string()))?;
    verify_signed_value(value, &checkpoint.signer, &checkpoint.signature)?;
    Ok(checkpoint)
}

/// Checks `signature` over `value` (a stored signed object; the signature covers its
/// canonical form without `signature`) against `signer`'s embedded key, and that the
/// embedded certificate, when there is one, carries that key.
pub fn verify_signed_value(
    value: Value,
    signer: &SignerInfo,
    signature: &str,
) -> Result<(), CheckpointFault> {
    if signer.algorithm != ALGORITHM {
        return Err(CheckpointFault::Malformed(format!(
            "unsupported algorithm {:?}",
            signer.algorithm
        )));
    }
    let public_key = B64
        .decode(&signer.public_key)
        .map_err(|_| CheckpointFault::Malformed("public_key is not base64".into()))?;
    let signature = B64
        .decode(signature)
        .map_err(|_| CheckpointFault::BadSignature)?;
    let message = canonical_without(value, "signature")
        .map_err(|e| CheckpointFault::Malformed(e.to_string()))?;
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &public_key)
        .verify(&message, &signature)
        .map_err(|_| CheckpointFault::BadSignature)?;
    if let Some(cert_b64) = &signer.certificate {
        check_certificate(cert_b64, &public_key, signer.spiffe_id.as_deref())?;
    }
    Ok(())
}

fn check_certificate(
    cert_b64: &str,
    public_key: &[u8],
    spiffe_id: Option<&str>,
) -> Result<(), CheckpointFault> {
    use x509_parser::extensions::GeneralName;
    let der = B64
        .decode(cert_b64)
        .map_err(|_| CheckpointFault::CertificateMismatch("certificate is not base64".into()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| CheckpointFault::CertificateMismatch(format!("unparsable: {e}")))?;
    if cert.public_key().subject_public_key.data.as_ref() != public_key {
        return Err(CheckpointFault::CertificateMismatch(
            "certificate key differs from public_key".into(),
        ));
    }
    if let Some(id) = spiffe_id {
        let names = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| san.value.general_names.clone())
            .unwrap_or_default();
        let found = names
            .iter()
            .any(|n| matches!(n, GeneralName::URI(uri) if *uri == id));
        if !found {
            return Err(CheckpointFault::CertificateMismatch(format!(
                "certificate has no URI SAN {id}"
            )));
        }
    }
    Ok(())
}

/// When the writer makes a checkpoint: after every `every_records` records, and at least
/// every `every` while records keep coming (whichever comes first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointPolicy {
    /// Records between checkpoints (at least 1).
    pub every_records: u64,
    /// Longest time a record waits for a checkpoint.
    pub every: Duration,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        CheckpointPolicy {
            every_records: 1000,
            every: Duration::from_secs(60),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Result<CheckpointSigner, Error> {
        CheckpointSigner::from_pkcs8(
            &CheckpointSigner::generate_pkcs8()?,
            SignerIdentity {
                spiffe_id: Some("spiffe://td/ns/a/sa/b".into()),
                certificate_der: None,
                intermediates_der: Vec::new(),
            },
        )
    }

    #[test]
    fn signed_checkpoint_verifies() -> Result<(), Box<dyn std::error::Error>> {
        let cp = signer()?.sign("c1", 9, &"ab".repeat(32), Timestamp::UNIX_EPOCH)?;
        let value = serde_json::to_value(&cp)?;
        assert_eq!(value["type"], "checkpoint");
        assert_eq!(verify_checkpoint_value(value)?, cp);
        Ok(())
    }

    #[test]
    fn altered_checkpoint_fails() -> Result<(), Box<dyn std::error::Error>> {
        let cp = signer()?.sign("c1", 9, &"ab".repeat(32), Timestamp::UNIX_EPOCH)?;
        let mut value = serde_json::to_value(&cp)?;
        value["seq"] = 10.into();
        assert_eq!(
            verify_checkpoint_value(value),
            Err(CheckpointFault::BadSignature)
        );
        Ok(())
    }

    #[test]
    fn bad_key_is_rejected_without_echoing_it() {
        let err = CheckpointSigner::from_pkcs8(b"secret-bytes", SignerIdentity::default());
        let msg = err
            .map(|_| ())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("PKCS#8"), "{msg}");
        assert!(!msg.contains("secret-bytes"));
    }

    #[test]
    fn debug_hides_private_key() -> Result<(), Error> {
        let s = signer()?;
        let dbg = format!("{s:?}");
        assert!(dbg.contains("public_key") && !dbg.contains("key_pair"));
        Ok(())
    }
}
