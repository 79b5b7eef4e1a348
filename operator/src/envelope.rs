//! Envelope encryption under the key-encryption key (KEK).
//!
//! The KEK wraps the CA's private keys and each tenant's data-encryption keys before
//! they are written to Secrets, so a leaked Secret backup without the KEK reveals
//! nothing. Wrapped format (version 1):
//!
//! ```text
//! [version: 1 byte = 0x01][kek id: 8 bytes][nonce: 12 bytes][AES-256-GCM ciphertext + 16-byte tag]
//! ```
//!
//! The KEK id (a hash prefix of the key) tells "wrapped under another KEK" apart from
//! "tampered with"; the header is authenticated together with the caller's AAD, which
//! binds a ciphertext to the slot it was written to.

use std::collections::BTreeMap;
use std::fmt;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use sha2::{Digest, Sha256};

/// The wrapped-format version this code writes and reads.
pub const ENVELOPE_VERSION: u8 = 1;
/// The Secret holding the KEK in the operator's namespace.
pub const KEK_SECRET_NAME: &str = "portcullis-kek";
/// The Secret data key holding the base64-free raw 32 KEK bytes.
pub const KEK_SECRET_KEY: &str = "kek";

const KEY_LEN: usize = 32;
const KEK_ID_LEN: usize = 8;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + KEK_ID_LEN + NONCE_LEN;

/// Why wrapping, unwrapping or loading a KEK failed. Never carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The ciphertext is shorter than header + tag.
    #[error("wrapped data truncated: {len} bytes, at least {min} needed")]
    Truncated {
        /// Length received.
        len: usize,
        /// Minimum valid length.
        min: usize,
    },
    /// The version byte is not one this code understands.
    #[error("unsupported envelope version {0}, expected {ENVELOPE_VERSION}")]
    UnsupportedVersion(u8),
    /// The data was wrapped under a different KEK.
    #[error("wrapped under KEK {found}, but the loaded KEK is {expected}")]
    WrongKey {
        /// The id of the KEK in use.
        expected: KekId,
        /// The id recorded in the ciphertext.
        found: KekId,
    },
    /// Authentication failed: the ciphertext, header or AAD was altered.
    #[error("wrapped data failed authentication (tampered, or wrong associated data)")]
    Tampered,
    /// Key material of the wrong length.
    #[error("a KEK is {KEY_LEN} bytes, got {0}")]
    InvalidKeyLength(usize),
    /// The KEK Secret exists but holds no usable key.
    #[error("KEK Secret {0} has no valid {KEK_SECRET_KEY:?} entry")]
    InvalidSecret(String),
    /// Encryption itself failed (not expected with valid inputs).
    #[error("encryption failed")]
    Encrypt,
}

/// A short public identifier of a KEK (first 8 bytes of a domain-separated SHA-256).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KekId([u8; KEK_ID_LEN]);

impl KekId {
    /// The raw id bytes.
    pub fn as_bytes(&self) -> &[u8; KEK_ID_LEN] {
        &self.0
    }
}

impl fmt::Display for KekId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KekId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KekId({self})")
    }
}

/// A 256-bit key-encryption key. `Debug` never shows the key.
#[derive(Clone)]
pub struct Kek {
    key: [u8; KEY_LEN],
    id: KekId,
}

impl Kek {
    /// A new random KEK from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let key = Aes256Gcm::generate_key(OsRng);
        let mut bytes = [0u8; KEY_LEN];
        bytes.copy_from_slice(&key);
        Self::from_array(bytes)
    }

    /// A KEK from exactly 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let key: [u8; KEY_LEN] = bytes
            .try_into()
            .map_err(|_| EnvelopeError::InvalidKeyLength(bytes.len()))?;
        Ok(Self::from_array(key))
    }

    fn from_array(key: [u8; KEY_LEN]) -> Self {
        let digest = Sha256::new()
            .chain_update(b"portcullis-kek-id\0")
            .chain_update(key)
            .finalize();
        let mut id = [0u8; KEK_ID_LEN];
        id.copy_from_slice(&digest[..KEK_ID_LEN]);
        Self { key, id: KekId(id) }
    }

    /// The KEK's public identifier.
    pub fn id(&self) -> KekId {
        self.id
    }

    /// The raw key, for writing to the KEK Secret. Handle with care.
    pub fn to_bytes(&self) -> [u8; KEY_LEN] {
        self.key
    }

    /// The key as standard base64, for environment variables or files.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.key)
    }

    /// A KEK from standard base64 (surrounding whitespace ignored).
    pub fn from_base64(text: &str) -> Result<Self, EnvelopeError> {
        let bytes = BASE64
            .decode(text.trim())
            .map_err(|_| EnvelopeError::InvalidKeyLength(0))?;
        Self::from_bytes(&bytes)
    }

    /// The Secret `data` map holding this KEK.
    pub fn to_secret_data(&self) -> BTreeMap<String, ByteString> {
        BTreeMap::from([(KEK_SECRET_KEY.to_string(), ByteString(self.key.to_vec()))])
    }

    /// Reads a KEK from a Secret `data` map written by [`Kek::to_secret_data`].
    pub fn from_secret_data(data: &BTreeMap<String, ByteString>) -> Result<Self, EnvelopeError> {
        let bytes = data
            .get(KEK_SECRET_KEY)
            .ok_or_else(|| EnvelopeError::InvalidSecret(KEK_SECRET_NAME.into()))?;
        Self::from_bytes(&bytes.0)
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&self.key))
    }

    /// Encrypts `plaintext` bound to `aad` under a fresh random nonce.
    pub fn wrap(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
        out.push(ENVELOPE_VERSION);
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&nonce);
        let full_aad = [&out[..1 + KEK_ID_LEN], aad].concat();
        let ciphertext = self
            .cipher()
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: &full_aad,
                },
            )
            .map_err(|_| EnvelopeError::Encrypt)?;
        out.extend_from_slice(&ciphertext);
        Ok(out)
    }

    /// Decrypts data written by [`Kek::wrap`] with the same `aad`.
    pub fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        let min = HEADER_LEN + TAG_LEN;
        let Some(&version) = wrapped.first() else {
            return Err(EnvelopeError::Truncated { len: 0, min });
        };
        if version != ENVELOPE_VERSION {
            return Err(EnvelopeError::UnsupportedVersion(version));
        }
        if wrapped.len() < min {
            return Err(EnvelopeError::Truncated {
                len: wrapped.len(),
                min,
            });
        }
        let mut found = [0u8; KEK_ID_LEN];
        found.copy_from_slice(&wrapped[1..1 + KEK_ID_LEN]);
        if found != self.id.0 {
            return Err(EnvelopeError::WrongKey {
                expected: self.id,
                found: KekId(found),
            });
        }
        let nonce = Nonce::from_slice(&wrapped[1 + KEK_ID_LEN..HEADER_LEN]);
        let full_aad = [&wrapped[..1 + KEK_ID_LEN], aad].concat();
        self.cipher()
            .decrypt(
                nonce,
                Payload {
                    msg: &wrapped[HEADER_LEN..],
                    aad: &full_aad,
                },
            )
            .map_err(|_| EnvelopeError::Tampered)
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kek")
            .field("id", &self.id)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Why the KEK could not be loaded from or stored in its Secret.
#[derive(Debug, thiserror::Error)]
pub enum KekStoreError {
    /// The Kubernetes API failed.
    #[error("KEK Secret {name}: {source}")]
    Kube {
        /// Secret name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// The Secret holds no usable KEK.
    #[error(transparent)]
    Invalid(#[from] EnvelopeError),
}

/// Loads the KEK from Secret [`KEK_SECRET_NAME`] in `namespace`, creating it with a new
/// random key when absent. An existing Secret is never overwritten: a lost create race
/// re-reads the winner's key.
pub async fn load_or_create_kek(
    client: kube::Client,
    namespace: &str,
) -> Result<Kek, KekStoreError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let kube_err = |source| KekStoreError::Kube {
        name: KEK_SECRET_NAME.into(),
        source,
    };
    if let Some(secret) = api.get_opt(KEK_SECRET_NAME).await.map_err(kube_err)? {
        return Ok(Kek::from_secret_data(&secret.data.unwrap_or_default())?);
    }
    let kek = Kek::generate();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(KEK_SECRET_NAME.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".into(),
                "portcullis-operator".into(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(kek.to_secret_data()),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(kek),
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let secret = api.get(KEK_SECRET_NAME).await.map_err(kube_err)?;
            Ok(Kek::from_secret_data(&secret.data.unwrap_or_default())?)
        }
        Err(source) => Err(kube_err(source)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_aad() {
        let kek = Kek::generate();
        let wrapped = kek.wrap(b"secret key bytes", b"slot-a").unwrap();
        assert_eq!(wrapped[0], ENVELOPE_VERSION);
        assert_eq!(wrapped.len(), HEADER_LEN + 16 + TAG_LEN);
        assert_eq!(
            kek.unwrap(&wrapped, b"slot-a").unwrap(),
            b"secret key bytes"
        );
        // A fresh nonce each time.
        assert_ne!(kek.wrap(b"secret key bytes", b"slot-a").unwrap(), wrapped);
        assert_eq!(kek.unwrap(&kek.wrap(b"", b"").unwrap(), b"").unwrap(), b"");
    }

    #[test]
    fn wrong_key_is_named_as_such() {
        let (a, b) = (Kek::generate(), Kek::generate());
        let wrapped = a.wrap(b"x", b"").unwrap();
        assert_eq!(
            b.unwrap(&wrapped, b""),
            Err(EnvelopeError::WrongKey {
                expected: b.id(),
                found: a.id()
            })
        );
    }

    #[test]
    fn tampering_is_detected_anywhere() {
        let kek = Kek::generate();
        let wrapped = kek.wrap(b"plaintext", b"aad").unwrap();
        for i in (1 + KEK_ID_LEN)..wrapped.len() {
            let mut t = wrapped.clone();
            t[i] ^= 0x01;
            assert_eq!(
                kek.unwrap(&t, b"aad"),
                Err(EnvelopeError::Tampered),
                "byte {i}"
            );
        }
        assert_eq!(
            kek.unwrap(&wrapped, b"other slot"),
            Err(EnvelopeError::Tampered)
        );
        let mut t = wrapped.clone();
        t[1] ^= 0x01;
        assert!(matches!(
            kek.unwrap(&t, b"aad"),
            Err(EnvelopeError::WrongKey { .. })
        ));
    }

    #[test]
    fn truncation_and_versions() {
        let kek = Kek::generate();
        let wrapped = kek.wrap(b"plaintext", b"").unwrap();
        assert_eq!(
            kek.unwrap(&[], b""),
            Err(EnvelopeError::Truncated {
                len: 0,
                min: HEADER_LEN + TAG_LEN
            })
        );
        assert!(matches!(
            kek.unwrap(&wrapped[..HEADER_LEN + 3], b""),
            Err(EnvelopeError::Truncated { .. })
        ));
        // Cut inside the ciphertext: long enough for a header + tag, fails authentication.
        assert_eq!(
            kek.unwrap(&wrapped[..wrapped.len() - 1], b""),
            Err(EnvelopeError::Tampered)
        );
        let mut v2 = wrapped.clone();
        v2[0] = 2;
        assert_eq!(
            kek.unwrap(&v2, b""),
            Err(EnvelopeError::UnsupportedVersion(2))
        );
    }

    #[test]
    fn serialisation_round_trips_and_debug_is_redacted() {
        let kek = Kek::generate();
        let again = Kek::from_secret_data(&kek.to_secret_data()).unwrap();
        assert_eq!(again.id(), kek.id());
        assert_eq!(
            Kek::from_base64(&kek.to_base64()).unwrap().to_bytes(),
            kek.to_bytes()
        );
        assert_eq!(
            Kek::from_bytes(&[0u8; 31]).unwrap_err(),
            EnvelopeError::InvalidKeyLength(31)
        );
        assert!(Kek::from_secret_data(&BTreeMap::new()).is_err());
        let printed = format!("{kek:?}");
        assert!(printed.contains("redacted"));
        assert!(!printed.contains(&kek.to_base64()));
        assert!(!printed.contains(&hex::encode(kek.to_bytes())));
        let data = kek.wrap(b"x", b"").unwrap();
        let wrong = Kek::generate().unwrap(&data, b"").unwrap_err().to_string();
        assert!(!wrong.contains(&hex::encode(kek.to_bytes())));
    }
}
