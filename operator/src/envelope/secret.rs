//! The `secret` KEK provider: 32 raw key bytes kept in a Kubernetes Secret in the
//! operator's namespace, AES-256-GCM in process memory.

use std::collections::BTreeMap;
use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use sha2::{Digest, Sha256};

use super::{EnvelopeError, KEK_ID_LEN, KEY_LEN, Kek, KekId, NONCE_LEN};

/// The Secret holding the KEK in the operator's namespace.
pub const KEK_SECRET_NAME: &str = "portcullis-kek";
/// The Secret data key holding the base64-free raw 32 KEK bytes.
pub const KEK_SECRET_KEY: &str = "kek";
/// The Secret data key holding a KEK staged for a rotation: every replica loads it as an
/// unwrap-only key before it becomes current, so none meets a blob it cannot open.
pub const KEK_NEXT_KEY: &str = "kek-next";
/// Prefix of the Secret data keys holding previous KEKs (`kek-previous-<id hex>`), kept
/// (unwrap only) until nothing is wrapped under them any more.
pub const KEK_PREVIOUS_PREFIX: &str = "kek-previous-";

/// The data key of a previous KEK with id `id`.
pub fn previous_key(id: KekId) -> String {
    format!("{KEK_PREVIOUS_PREFIX}{id}")
}

/// The unwrap-only keys in a KEK Secret's `data`: the staged next key and the previous
/// keys (the id in a previous key's name is informative; the key's own id counts).
pub fn unwrap_only_keys(
    data: &BTreeMap<String, ByteString>,
) -> Result<Vec<SecretKek>, EnvelopeError> {
    data.iter()
        .filter(|(name, _)| *name == KEK_NEXT_KEY || name.starts_with(KEK_PREVIOUS_PREFIX))
        .map(|(_, bytes)| SecretKek::from_bytes(&bytes.0))
        .collect()
}

/// A 256-bit KEK held in process memory. `Debug` never shows the key.
#[derive(Clone)]
pub struct SecretKek {
    key: [u8; KEY_LEN],
    id: KekId,
}

impl SecretKek {
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

    /// Reads a KEK from a Secret `data` map written by [`SecretKek::to_secret_data`].
    pub fn from_secret_data(data: &BTreeMap<String, ByteString>) -> Result<Self, EnvelopeError> {
        // Another provider's Secret (kms keeps a KMS ciphertext there) is not a key.
        if let Some(provider) = data.get(super::kms::KEK_PROVIDER_KEY) {
            return Err(EnvelopeError::OtherProviderSecret {
                secret: KEK_SECRET_NAME.into(),
                provider: String::from_utf8_lossy(&provider.0).into_owned(),
            });
        }
        let bytes = data
            .get(KEK_SECRET_KEY)
            .ok_or_else(|| EnvelopeError::InvalidSecret(KEK_SECRET_NAME.into()))?;
        Self::from_bytes(&bytes.0)
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&self.key))
    }

    /// AES-256-GCM of `plaintext` under `nonce` and `aad`: ciphertext + tag.
    pub(super) fn seal(
        &self,
        nonce: &[u8],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, EnvelopeError> {
        if nonce.len() != NONCE_LEN {
            return Err(EnvelopeError::Encrypt);
        }
        self.cipher()
            .encrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| EnvelopeError::Encrypt)
    }

    /// Opens what [`SecretKek::seal`] sealed.
    pub(super) fn unseal(
        &self,
        nonce: &[u8],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Vec<u8>, EnvelopeError> {
        if nonce.len() != NONCE_LEN {
            return Err(EnvelopeError::Tampered);
        }
        self.cipher()
            .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad })
            .map_err(|_| EnvelopeError::Tampered)
    }
}

impl fmt::Debug for SecretKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kek")
            .field("provider", &"secret")
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
    let kek = SecretKek::generate();
    let secret = new_kek_secret(namespace, kek.to_secret_data());
    match create_or_winner(&api, &secret).await.map_err(kube_err)? {
        None => Ok(kek.into()),
        Some(winner) => Ok(Kek::from_secret_data(&winner.data.unwrap_or_default())?),
    }
}

/// The KEK Secret [`KEK_SECRET_NAME`] in `namespace` holding `data`, labelled as the
/// operator's.
pub(super) fn new_kek_secret(namespace: &str, data: BTreeMap<String, ByteString>) -> Secret {
    Secret {
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
        data: Some(data),
        ..Secret::default()
    }
}

/// Creates the KEK Secret `secret`, never overwriting one: `None` when it was created,
/// the winner's Secret when another replica created it first (the caller reads that
/// one's key instead of its own).
pub(super) async fn create_or_winner(
    api: &Api<Secret>,
    secret: &Secret,
) -> Result<Option<Secret>, kube::Error> {
    match api.create(&PostParams::default(), secret).await {
        Ok(_) => Ok(None),
        Err(kube::Error::Api(status)) if status.code == 409 => {
            api.get(KEK_SECRET_NAME).await.map(Some)
        }
        Err(source) => Err(source),
    }
}
