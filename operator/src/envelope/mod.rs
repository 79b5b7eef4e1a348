//! Envelope encryption under the key-encryption key (KEK).
//!
//! The KEK wraps the CA's private keys and each tenant's data-encryption keys before
//! they are written to Secrets, so a leaked Secret backup without the KEK reveals
//! nothing. A KEK comes from a provider: `secret` (32 raw bytes in the Secret
//! `portcullis-kek`, [`secret`]), `pkcs11` (an AES-256 key inside an HSM that never
//! leaves it, [`pkcs11`]) or `kms` (a local AES-256 key of which only a Kubernetes KMS v2
//! plugin's ciphertext is stored, [`kms`]). Callers see one type, [`Kek`], with the same synchronous
//! [`Kek::wrap`] and [`Kek::unwrap`] whichever provider holds the key.
//!
//! Wrapped formats (AES-256-GCM, 12-byte random nonce, 16-byte tag):
//!
//! ```text
//! v1: [0x01][kek id: 8][nonce: 12][ciphertext + tag]                 secret provider only
//! v2: [0x02][provider: 1][key id: 8][nonce: 12][ciphertext + tag]    1 = secret, 2 = pkcs11, 3 = kms
//! ```
//!
//! The header up to the nonce (`[0x01][kek id]`, or `[0x02][provider][key id]`) is
//! authenticated together with the caller's AAD, which binds a ciphertext to the slot it
//! was written to. The key id tells "wrapped under another KEK" apart from "tampered
//! with": for a secret KEK the first 8 bytes of a domain-separated SHA-256 of the key;
//! for a PKCS#11 KEK the first 8 bytes of a domain-separated SHA-256 of the token label
//! and the key label (the key itself is never seen, see [`pkcs11::key_id`]); for a kms
//! KEK the first 8 bytes of a domain-separated SHA-256 of the KMS plugin's ciphertext of
//! the intermediate key ([`kms::key_id`]).
//!
//! The secret provider keeps writing v1 (a v1 blob says all there is: a secret KEK and
//! its id), so a rolled-back or not yet upgraded replica still reads what a new one
//! writes; the pkcs11 and kms providers write v2. All read v1 and v2. A blob under another
//! provider or key is refused with [`EnvelopeError::WrongKey`] naming both.
//!
//! Rotation: a [`Kek`] is a keyring, one current key that wraps plus unwrap-only keys (a
//! key staged for promotion, and previous keys until nothing is wrapped under them any
//! more), chosen by the blob header's provider and key id; the formats above are
//! unchanged. [`crate::kek_rotation`] drives rotations.

pub mod kms;
pub mod pkcs11;
pub mod secret;

use std::fmt;
use std::sync::Arc;

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{AeadCore, OsRng};
use arc_swap::ArcSwap;

pub use kms::{KmsClient, KmsConfig, KmsError, KmsKek};
pub use pkcs11::{Pkcs11Config, Pkcs11Error, Pkcs11Kek, TokenSelector};
pub use secret::{
    KEK_NEXT_KEY, KEK_PREVIOUS_PREFIX, KEK_SECRET_KEY, KEK_SECRET_NAME, KekStoreError, SecretKek,
    load_or_create_kek,
};

/// The newest wrapped-format version this code reads (and the pkcs11 and kms providers
/// write).
pub const ENVELOPE_VERSION: u8 = 2;
/// The first format: secret KEKs only, still written by the secret provider.
pub const ENVELOPE_VERSION_1: u8 = 1;

const KEY_LEN: usize = 32;
const KEK_ID_LEN: usize = 8;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// `[version][kek id]`: the authenticated part of a v1 header.
const V1_AUTHENTICATED: usize = 1 + KEK_ID_LEN;
const V1_HEADER_LEN: usize = V1_AUTHENTICATED + NONCE_LEN;
/// `[version][provider][key id]`: the authenticated part of a v2 header.
const V2_AUTHENTICATED: usize = 2 + KEK_ID_LEN;
const V2_HEADER_LEN: usize = V2_AUTHENTICATED + NONCE_LEN;

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
    #[error(
        "unsupported envelope version {0}, expected {ENVELOPE_VERSION_1} or {ENVELOPE_VERSION}"
    )]
    UnsupportedVersion(u8),
    /// A v2 header names a provider this code does not know.
    #[error("wrapped by unknown KEK provider {0} (known: 1 = secret, 2 = pkcs11, 3 = kms)")]
    UnknownProvider(u8),
    /// The data was wrapped under a different KEK (another key, or another provider).
    #[error("wrapped under {found}, but the loaded KEK is {expected}")]
    WrongKey {
        /// The KEK in use.
        expected: KeyRef,
        /// The KEK recorded in the ciphertext.
        found: KeyRef,
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
    /// The KEK Secret was written by another provider (it names one under `provider`).
    #[error(
        "KEK Secret {secret} holds a {provider:?}-provider KEK, not raw key bytes: run the operator with --kek-provider {provider}"
    )]
    OtherProviderSecret {
        /// Secret name.
        secret: String,
        /// The provider the Secret names.
        provider: String,
    },
    /// Encryption itself failed (not expected with valid inputs).
    #[error("encryption failed")]
    Encrypt,
    /// The HSM failed the operation (unreachable, session lost, mechanism refused).
    #[error("the HSM failed to {operation}: {reason}")]
    Hsm {
        /// `wrap` or `unwrap`.
        operation: &'static str,
        /// The PKCS#11 function and return value.
        reason: String,
    },
}

/// Where a KEK is kept; its number is the provider byte of a v2 envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KekProvider {
    /// Raw key bytes in a Kubernetes Secret.
    Secret,
    /// A non-extractable key in a PKCS#11 token (an HSM).
    Pkcs11,
    /// A local key stored encrypted by a Kubernetes KMS v2 plugin.
    Kms,
}

impl KekProvider {
    /// The provider byte of a v2 envelope.
    pub fn byte(self) -> u8 {
        match self {
            Self::Secret => 1,
            Self::Pkcs11 => 2,
            Self::Kms => 3,
        }
    }

    fn from_byte(byte: u8) -> Result<Self, EnvelopeError> {
        match byte {
            1 => Ok(Self::Secret),
            2 => Ok(Self::Pkcs11),
            3 => Ok(Self::Kms),
            other => Err(EnvelopeError::UnknownProvider(other)),
        }
    }
}

impl fmt::Display for KekProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Secret => "secret",
            Self::Pkcs11 => "pkcs11",
            Self::Kms => "kms",
        })
    }
}

/// A short public identifier of a KEK within its provider (see the module doc).
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

/// Which KEK: its provider and its id there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeyRef {
    /// The provider holding the key.
    pub provider: KekProvider,
    /// The key's id within the provider.
    pub id: KekId,
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} KEK {}", self.provider, self.id)
    }
}

/// The parsed header of a wrapped blob.
struct Header<'a> {
    key: KeyRef,
    nonce: &'a [u8],
    /// The bytes authenticated with the caller's AAD.
    authenticated: &'a [u8],
    body: &'a [u8],
}

impl<'a> Header<'a> {
    fn parse(wrapped: &'a [u8]) -> Result<Self, EnvelopeError> {
        let Some(&version) = wrapped.first() else {
            return Err(EnvelopeError::Truncated {
                len: 0,
                min: V1_HEADER_LEN + TAG_LEN,
            });
        };
        let header_len = match version {
            ENVELOPE_VERSION_1 => V1_HEADER_LEN,
            ENVELOPE_VERSION => V2_HEADER_LEN,
            other => return Err(EnvelopeError::UnsupportedVersion(other)),
        };
        let min = header_len + TAG_LEN;
        if wrapped.len() < min {
            return Err(EnvelopeError::Truncated {
                len: wrapped.len(),
                min,
            });
        }
        let (provider, id_at) = if version == ENVELOPE_VERSION_1 {
            (KekProvider::Secret, 1)
        } else {
            (KekProvider::from_byte(wrapped[1])?, 2)
        };
        let mut id = [0u8; KEK_ID_LEN];
        id.copy_from_slice(&wrapped[id_at..id_at + KEK_ID_LEN]);
        let authenticated_len = id_at + KEK_ID_LEN;
        Ok(Self {
            key: KeyRef {
                provider,
                id: KekId(id),
            },
            nonce: &wrapped[authenticated_len..header_len],
            authenticated: &wrapped[..authenticated_len],
            body: &wrapped[header_len..],
        })
    }
}

/// The key-encryption keys in use: the current one, which wraps, and others (a key
/// staged for a rotation, or previous keys not yet re-wrapped away), which only unwrap.
/// `Debug` never shows key material.
#[derive(Clone)]
struct Keyring {
    current: Provider,
    others: Vec<Provider>,
}

/// A 256-bit key-encryption key, wherever it is kept, with the keys it rotated from.
///
/// A cheap shared handle: clones see the same keyring, which [`Kek::replace_with`]
/// swaps at run time (a KEK rotation) without blocking readers. [`Kek::wrap`] always
/// uses the current key; [`Kek::unwrap`] picks the key the blob's header names among
/// the current and the unwrap-only keys. `Debug` never shows key material.
#[derive(Clone)]
pub struct Kek(Arc<ArcSwap<Keyring>>);

#[derive(Clone)]
enum Provider {
    Secret(SecretKek),
    Pkcs11(Arc<Pkcs11Kek>),
    Kms(Arc<KmsKek>),
}

impl Provider {
    fn key_ref(&self) -> KeyRef {
        match self {
            Self::Secret(key) => KeyRef {
                provider: KekProvider::Secret,
                id: key.id(),
            },
            Self::Pkcs11(key) => KeyRef {
                provider: KekProvider::Pkcs11,
                id: key.id(),
            },
            Self::Kms(key) => KeyRef {
                provider: KekProvider::Kms,
                id: key.id(),
            },
        }
    }
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Secret(key) => key.fmt(f),
            Self::Pkcs11(key) => key.fmt(f),
            Self::Kms(key) => key.fmt(f),
        }
    }
}

impl Kek {
    fn single(current: Provider) -> Self {
        Self(Arc::new(ArcSwap::from_pointee(Keyring {
            current,
            others: Vec::new(),
        })))
    }

    /// A keyring wrapping under `current`'s current key that also unwraps under the
    /// current keys of `others` (duplicates and `current` itself are skipped).
    pub fn keyring(current: &Kek, others: &[Kek]) -> Self {
        let current = current.0.load().current.clone();
        let mut seen = vec![current.key_ref()];
        let mut unwrap_only = Vec::new();
        for other in others {
            let key = other.0.load().current.clone();
            if !seen.contains(&key.key_ref()) {
                seen.push(key.key_ref());
                unwrap_only.push(key);
            }
        }
        Self(Arc::new(ArcSwap::from_pointee(Keyring {
            current,
            others: unwrap_only,
        })))
    }

    /// Makes every clone of this handle use `other`'s keyring from now on: what a KEK
    /// rotation does to the running operator. Wraps and unwraps in flight finish with
    /// the keyring they started with.
    pub fn replace_with(&self, other: &Kek) {
        self.0.store(other.0.load_full());
    }

    /// A new random secret KEK from the operating system's CSPRNG.
    pub fn generate() -> Self {
        Self::single(Provider::Secret(SecretKek::generate()))
    }

    /// A secret KEK from exactly 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        SecretKek::from_bytes(bytes).map(Self::from)
    }

    /// A secret KEK from standard base64 (surrounding whitespace ignored).
    pub fn from_base64(text: &str) -> Result<Self, EnvelopeError> {
        SecretKek::from_base64(text).map(Self::from)
    }

    /// Reads a secret keyring from a Secret `data` map written by
    /// [`SecretKek::to_secret_data`]: the current key under [`KEK_SECRET_KEY`], and a
    /// staged or previous key under [`secret::KEK_NEXT_KEY`] or
    /// [`secret::KEK_PREVIOUS_PREFIX`]`<id>`, which only unwrap.
    pub fn from_secret_data(
        data: &std::collections::BTreeMap<String, k8s_openapi::ByteString>,
    ) -> Result<Self, EnvelopeError> {
        let current = SecretKek::from_secret_data(data)?;
        let others: Vec<Kek> = secret::unwrap_only_keys(data)?
            .into_iter()
            .map(Kek::from)
            .collect();
        Ok(Self::keyring(&current.into(), &others))
    }

    /// The current KEK's public identifier within its provider.
    pub fn id(&self) -> KekId {
        self.key_ref().id
    }

    /// Where the current key is kept.
    pub fn provider(&self) -> KekProvider {
        self.key_ref().provider
    }

    /// The KMS plugin's key id that encrypted a kms KEK; `None` for other providers.
    pub fn kms_key_id(&self) -> Option<String> {
        match &self.0.load().current {
            Provider::Kms(key) => Some(key.plugin_key_id().to_owned()),
            _ => None,
        }
    }

    /// The label of the PKCS#11 token holding a pkcs11 KEK; `None` for other providers.
    pub fn pkcs11_token_label(&self) -> Option<String> {
        match &self.0.load().current {
            Provider::Pkcs11(key) => Some(key.token_label().to_owned()),
            _ => None,
        }
    }

    /// The current KEK's provider and id, as wrapped blobs record them.
    pub fn key_ref(&self) -> KeyRef {
        self.0.load().current.key_ref()
    }

    /// The key `key` of this keyring (current or unwrap-only) as a keyring of its own.
    pub fn member(&self, key: KeyRef) -> Option<Kek> {
        let ring = self.0.load();
        std::iter::once(&ring.current)
            .chain(ring.others.iter())
            .find(|member| member.key_ref() == key)
            .map(|member| Self::single(member.clone()))
    }

    /// The keys that only unwrap (staged next, or previous), in no particular order.
    pub fn unwrap_only(&self) -> Vec<KeyRef> {
        self.0.load().others.iter().map(Provider::key_ref).collect()
    }

    /// Which KEK `wrapped` (a blob from [`Kek::wrap`]) is under, read from its header
    /// alone (nothing is decrypted).
    pub fn wrapped_under(wrapped: &[u8]) -> Result<KeyRef, EnvelopeError> {
        Header::parse(wrapped).map(|header| header.key)
    }

    /// Encrypts `plaintext` bound to `aad` under a fresh random nonce, with the current
    /// key.
    pub fn wrap(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        let ring = self.0.load();
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let key = ring.current.key_ref();
        let mut out = Vec::with_capacity(V2_HEADER_LEN + plaintext.len() + TAG_LEN);
        match &ring.current {
            Provider::Secret(_) => out.push(ENVELOPE_VERSION_1),
            Provider::Pkcs11(_) | Provider::Kms(_) => {
                out.extend_from_slice(&[ENVELOPE_VERSION, key.provider.byte()]);
            }
        }
        out.extend_from_slice(key.id.as_bytes());
        let full_aad = [&out[..], aad].concat();
        out.extend_from_slice(&nonce);
        let sealed = match &ring.current {
            Provider::Secret(key) => key.seal(&nonce, &full_aad, plaintext)?,
            Provider::Pkcs11(key) => key.seal(&nonce, &full_aad, plaintext)?,
            Provider::Kms(key) => key.seal(&nonce, &full_aad, plaintext)?,
        };
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Decrypts data written by [`Kek::wrap`] (v1 or v2) with the same `aad`, under
    /// whichever key of the keyring its header names.
    pub fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        let header = Header::parse(wrapped)?;
        let ring = self.0.load();
        let Some(key) = std::iter::once(&ring.current)
            .chain(ring.others.iter())
            .find(|key| key.key_ref() == header.key)
        else {
            return Err(EnvelopeError::WrongKey {
                expected: ring.current.key_ref(),
                found: header.key,
            });
        };
        let full_aad = [header.authenticated, aad].concat();
        match key {
            Provider::Secret(key) => key.unseal(header.nonce, &full_aad, header.body),
            Provider::Pkcs11(key) => key.unseal(header.nonce, &full_aad, header.body),
            Provider::Kms(key) => key.unseal(header.nonce, &full_aad, header.body),
        }
    }
}

impl From<SecretKek> for Kek {
    fn from(key: SecretKek) -> Self {
        Self::single(Provider::Secret(key))
    }
}

impl From<Pkcs11Kek> for Kek {
    fn from(key: Pkcs11Kek) -> Self {
        Self::single(Provider::Pkcs11(Arc::new(key)))
    }
}

impl From<KmsKek> for Kek {
    fn from(key: KmsKek) -> Self {
        Self::single(Provider::Kms(Arc::new(key)))
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ring = self.0.load();
        if ring.others.is_empty() {
            return ring.current.fmt(f);
        }
        f.debug_struct("Keyring")
            .field("current", &ring.current)
            .field("unwrap_only", &ring.others)
            .finish()
    }
}

#[cfg(test)]
mod tests;
