//! The `kms` KEK provider: a Kubernetes KMS v2 plugin on a Unix socket, used the way
//! kube-apiserver uses it. The plugin is remote and slow while [`super::Kek::wrap`] and
//! [`super::Kek::unwrap`] are synchronous and frequent, so the KEK the operator wraps
//! with is a local random AES-256 key (the *intermediate key*), of which only the KMS
//! ciphertext is stored: Secret `portcullis-kek` holds
//!
//! | data key          | value                                                    |
//! |-------------------|----------------------------------------------------------|
//! | `provider`        | `kms`                                                    |
//! | `kms-ciphertext`  | the intermediate key encrypted by the plugin             |
//! | `kms-key-id`      | the plugin's key id of that encryption                   |
//! | `kms-annotations` | the plugin's annotations, JSON `{name: base64}`          |
//!
//! First start: generate, `Encrypt`, check with `Decrypt`, create the Secret (a lost
//! create race re-reads the winner's). Later starts: `Decrypt`. Without the plugin's key
//! the Secret reveals nothing. Once loaded the key is in memory, so a plugin outage does
//! not fail a wrap or unwrap; [`health`] polls `Status` and reports the plugin's health
//! and whether its current key id still matches the one recorded.
//!
//! The envelope key id of a kms KEK is the first 8 bytes of a domain-separated SHA-256
//! of the intermediate key's KMS ciphertext ([`key_id`]): a new intermediate key has a
//! new id, and the id reveals nothing about the key.

mod client;
mod error;
pub mod health;
pub mod proto;
#[cfg(feature = "kms-test-plugin")]
pub mod test_plugin;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq as _;

pub use client::{API_VERSION, KmsClient, KmsConfig};
pub use error::KmsError;

use super::secret::{KEK_SECRET_KEY, KEK_SECRET_NAME, create_or_winner, new_kek_secret};
use super::{EnvelopeError, KEK_ID_LEN, KEY_LEN, KekId, SecretKek};

/// The Secret data key naming the provider that wrote a non-`secret` KEK Secret.
pub const KEK_PROVIDER_KEY: &str = "provider";
/// The value of [`KEK_PROVIDER_KEY`] in a kms KEK Secret.
pub const KMS_PROVIDER: &str = "kms";
/// The intermediate key encrypted by the KMS plugin.
pub const KMS_CIPHERTEXT_KEY: &str = "kms-ciphertext";
/// The plugin's key id of that encryption (public: `kubectl portcullis check` shows it).
pub const KMS_KEY_ID_KEY: &str = "kms-key-id";
/// The plugin's annotations, JSON `{name: base64 value}`.
pub const KMS_ANNOTATIONS_KEY: &str = "kms-annotations";
/// The prefix of the current sealed key's data keys (`kms-ciphertext`, ...).
pub const KMS_CURRENT_PREFIX: &str = "kms-";
/// The prefix of a sealed key staged for a rotation (`kms-next-ciphertext`, ...).
pub const KMS_NEXT_PREFIX: &str = "kms-next-";
/// The prefix of a previous sealed key (`kms-previous-<id>-ciphertext`, ...), kept until
/// nothing is wrapped under it.
pub const KMS_PREVIOUS_PREFIX: &str = "kms-previous-";
const CIPHERTEXT_SUFFIX: &str = "ciphertext";
const KEY_ID_SUFFIX: &str = "key-id";
const ANNOTATIONS_SUFFIX: &str = "annotations";

/// The data-key prefix of the previous sealed key with envelope id `id`.
pub fn previous_prefix(id: KekId) -> String {
    format!("{KMS_PREVIOUS_PREFIX}{id}-")
}

/// The envelope id of the kms KEK whose intermediate key the plugin encrypted to
/// `ciphertext`.
pub fn key_id(ciphertext: &[u8]) -> KekId {
    let digest = Sha256::new()
        .chain_update(b"portcullis-kms-kek-id\0")
        .chain_update(ciphertext)
        .finalize();
    let mut id = [0u8; KEK_ID_LEN];
    id.copy_from_slice(&digest[..KEK_ID_LEN]);
    KekId(id)
}

/// What the KEK Secret keeps of a kms KEK: the KMS ciphertext of the intermediate key
/// and what the plugin needs to decrypt it. `Debug` shows the key id only.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedKek {
    /// The intermediate key encrypted by the plugin.
    pub ciphertext: Vec<u8>,
    /// The plugin's key id.
    pub key_id: String,
    /// The plugin's annotations.
    pub annotations: HashMap<String, Vec<u8>>,
}

impl fmt::Debug for SealedKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedKek")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl SealedKek {
    /// The KEK Secret's `data`.
    pub fn to_secret_data(&self) -> BTreeMap<String, ByteString> {
        let annotations: BTreeMap<&str, String> = self
            .annotations
            .iter()
            .map(|(name, value)| (name.as_str(), BASE64.encode(value)))
            .collect();
        let annotations = serde_json::to_vec(&annotations).unwrap_or_else(|_| b"{}".to_vec());
        BTreeMap::from([
            (KEK_PROVIDER_KEY.into(), ByteString(KMS_PROVIDER.into())),
            (
                KMS_CIPHERTEXT_KEY.into(),
                ByteString(self.ciphertext.clone()),
            ),
            (
                KMS_KEY_ID_KEY.into(),
                ByteString(self.key_id.clone().into()),
            ),
            (KMS_ANNOTATIONS_KEY.into(), ByteString(annotations)),
        ])
    }

    /// The entries of this sealed key under `prefix` (no provider entry): how a staged
    /// ([`KMS_NEXT_PREFIX`]) or previous ([`previous_prefix`]) key is kept.
    pub fn to_prefixed_data(&self, prefix: &str) -> BTreeMap<String, ByteString> {
        self.to_secret_data()
            .into_iter()
            .filter_map(|(name, value)| {
                name.strip_prefix(KMS_CURRENT_PREFIX)
                    .map(|suffix| (format!("{prefix}{suffix}"), value))
            })
            .collect()
    }

    /// The sealed key under `prefix`, if its ciphertext is there.
    pub fn from_prefixed_data(
        data: &BTreeMap<String, ByteString>,
        prefix: &str,
        secret: &str,
    ) -> Result<Option<Self>, KmsError> {
        if !data.contains_key(&format!("{prefix}{CIPHERTEXT_SUFFIX}")) {
            return Ok(None);
        }
        let current: BTreeMap<String, ByteString> = data
            .iter()
            .filter_map(|(name, value)| {
                let suffix = name.strip_prefix(prefix)?;
                [CIPHERTEXT_SUFFIX, KEY_ID_SUFFIX, ANNOTATIONS_SUFFIX]
                    .contains(&suffix)
                    .then(|| (format!("{KMS_CURRENT_PREFIX}{suffix}"), value.clone()))
            })
            .chain([(KEK_PROVIDER_KEY.to_owned(), ByteString(KMS_PROVIDER.into()))])
            .collect();
        Self::from_secret_data(&current, secret).map(Some)
    }

    /// The staged and previous sealed keys in a kms KEK Secret's `data`.
    pub fn unwrap_only(
        data: &BTreeMap<String, ByteString>,
        secret: &str,
    ) -> Result<Vec<Self>, KmsError> {
        let mut prefixes = vec![KMS_NEXT_PREFIX.to_owned()];
        prefixes.extend(data.keys().filter_map(|name| {
            name.starts_with(KMS_PREVIOUS_PREFIX)
                .then(|| name.strip_suffix(CIPHERTEXT_SUFFIX))
                .flatten()
                .map(str::to_owned)
        }));
        let mut sealed = Vec::new();
        for prefix in prefixes {
            if let Some(key) = Self::from_prefixed_data(data, &prefix, secret)? {
                sealed.push(key);
            }
        }
        Ok(sealed)
    }

    /// Reads what [`SealedKek::to_secret_data`] wrote; `secret` (`namespace/name`)
    /// names the Secret in errors.
    pub fn from_secret_data(
        data: &BTreeMap<String, ByteString>,
        secret: &str,
    ) -> Result<Self, KmsError> {
        let invalid = |why: String| KmsError::InvalidSecret {
            secret: secret.to_owned(),
            why,
        };
        let provider = data.get(KEK_PROVIDER_KEY).map(|v| v.0.as_slice());
        if provider != Some(KMS_PROVIDER.as_bytes()) {
            if data.contains_key(KEK_SECRET_KEY) {
                return Err(invalid(format!(
                    "it holds a `secret`-provider KEK (raw key bytes under {KEK_SECRET_KEY:?}), but the operator runs with \
                     --kek-provider kms. Moving an install from secret to kms would need every wrapped key re-wrapped, \
                     which is not built: keep --kek-provider secret, or start the kms provider on a new install"
                )));
            }
            let found = provider.map_or_else(
                || "none".to_owned(),
                |p| format!("{:?}", String::from_utf8_lossy(p)),
            );
            return Err(invalid(format!(
                "no kms KEK in it ({KEK_PROVIDER_KEY:?} is {found}, expected {KMS_PROVIDER:?})"
            )));
        }
        let ciphertext = data
            .get(KMS_CIPHERTEXT_KEY)
            .filter(|v| !v.0.is_empty())
            .ok_or_else(|| invalid(format!("{KMS_CIPHERTEXT_KEY:?} is missing or empty")))?
            .0
            .clone();
        let key_id = data
            .get(KMS_KEY_ID_KEY)
            .map(|v| String::from_utf8(v.0.clone()))
            .transpose()
            .map_err(|_| invalid(format!("{KMS_KEY_ID_KEY:?} is not UTF-8")))?
            .unwrap_or_default();
        let annotations = match data.get(KMS_ANNOTATIONS_KEY) {
            None => HashMap::new(),
            Some(json) => {
                let encoded: BTreeMap<String, String> =
                    serde_json::from_slice(&json.0).map_err(|e| {
                        invalid(format!("{KMS_ANNOTATIONS_KEY:?} is not a JSON map: {e}"))
                    })?;
                encoded
                    .into_iter()
                    .map(|(name, value)| {
                        BASE64
                            .decode(value)
                            .map(|v| (name.clone(), v))
                            .map_err(|_| invalid(format!("annotation {name:?} is not base64")))
                    })
                    .collect::<Result<_, _>>()?
            }
        };
        Ok(Self {
            ciphertext,
            key_id,
            annotations,
        })
    }
}

/// A KEK whose intermediate key a KMS plugin encrypted. `Debug` never shows the key.
#[derive(Clone)]
pub struct KmsKek {
    key: SecretKek,
    id: KekId,
    plugin_key_id: String,
}

impl KmsKek {
    /// The envelope id ([`key_id`] of the KMS ciphertext).
    pub fn id(&self) -> KekId {
        self.id
    }

    /// The KMS plugin's key id that encrypted the intermediate key.
    pub fn plugin_key_id(&self) -> &str {
        &self.plugin_key_id
    }

    /// A new intermediate key, encrypted by the plugin (and decrypted once, so a plugin
    /// that cannot read back what it wrote is caught before anything is stored).
    pub async fn create(kms: &KmsClient) -> Result<(Self, SealedKek), KmsError> {
        let key = SecretKek::generate();
        let encrypted = kms.encrypt(key.to_bytes().to_vec()).await?;
        let sealed = SealedKek {
            ciphertext: encrypted.ciphertext,
            key_id: encrypted.key_id,
            annotations: encrypted.annotations,
        };
        let opened = Self::open(kms, &sealed, "(new, not yet stored)").await?;
        if !bool::from(opened.key.to_bytes().ct_eq(&key.to_bytes())) {
            return Err(KmsError::Refused {
                socket: kms.socket().to_owned(),
                operation: "Decrypt",
                code: "DataLoss".into(),
                message: "decrypting what Encrypt returned gave other bytes".into(),
            });
        }
        Ok((opened, sealed))
    }

    /// The KEK `sealed` holds, decrypted by the plugin; `secret` names where it is
    /// stored, for errors.
    pub async fn open(kms: &KmsClient, sealed: &SealedKek, secret: &str) -> Result<Self, KmsError> {
        let refused = |why: String| KmsError::DecryptRefused {
            socket: kms.socket().to_owned(),
            secret: secret.to_owned(),
            key_id: sealed.key_id.clone(),
            why,
        };
        let plaintext = match kms
            .decrypt(
                sealed.ciphertext.clone(),
                sealed.key_id.clone(),
                sealed.annotations.clone(),
            )
            .await
        {
            Ok(response) => response.plaintext,
            Err(KmsError::Refused { code, message, .. }) => {
                return Err(refused(format!("{code}: {message}")));
            }
            Err(other) => return Err(other),
        };
        let key = SecretKek::from_bytes(&plaintext).map_err(|_| {
            refused(format!(
                "it returned {} bytes, not a {KEY_LEN}-byte key",
                plaintext.len()
            ))
        })?;
        Ok(Self {
            key,
            id: key_id(&sealed.ciphertext),
            plugin_key_id: sealed.key_id.clone(),
        })
    }

    /// AES-256-GCM in process memory: ciphertext + tag.
    pub(super) fn seal(
        &self,
        nonce: &[u8],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, EnvelopeError> {
        self.key.seal(nonce, aad, plaintext)
    }

    /// Opens what [`KmsKek::seal`] sealed.
    pub(super) fn unseal(
        &self,
        nonce: &[u8],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Vec<u8>, EnvelopeError> {
        self.key.unseal(nonce, aad, sealed)
    }
}

impl fmt::Debug for KmsKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kek")
            .field("provider", &"kms")
            .field("id", &self.id)
            .field("kms_key_id", &self.plugin_key_id)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Loads the kms KEK from Secret `portcullis-kek` in `namespace` through the plugin,
/// creating both on first start. An existing Secret is never overwritten: a lost create
/// race decrypts the winner's key.
pub async fn load_or_create_kms_kek(
    client: kube::Client,
    namespace: &str,
    kms: &KmsClient,
) -> Result<KmsKek, KmsError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let secret_ref = format!("{namespace}/{KEK_SECRET_NAME}");
    let kube_err = |source| KmsError::Kube {
        secret: secret_ref.clone(),
        source,
    };
    if let Some(secret) = api.get_opt(KEK_SECRET_NAME).await.map_err(kube_err)? {
        let sealed = SealedKek::from_secret_data(&secret.data.unwrap_or_default(), &secret_ref)?;
        return KmsKek::open(kms, &sealed, &secret_ref).await;
    }
    let (kek, sealed) = KmsKek::create(kms).await?;
    let secret = new_kek_secret(namespace, sealed.to_secret_data());
    match create_or_winner(&api, &secret).await.map_err(kube_err)? {
        None => Ok(kek),
        Some(winner) => {
            let sealed =
                SealedKek::from_secret_data(&winner.data.unwrap_or_default(), &secret_ref)?;
            KmsKek::open(kms, &sealed, &secret_ref).await
        }
    }
}

/// The whole kms keyring in a KEK Secret's `data`: the current key and the staged and
/// previous ones (unwrap only). A key `have` already holds (same envelope id) is reused,
/// so only new keys are sent to the plugin to decrypt.
pub async fn open_keyring(
    kms: &KmsClient,
    data: &BTreeMap<String, ByteString>,
    secret: &str,
    have: Option<&super::Kek>,
) -> Result<super::Kek, KmsError> {
    let current = SealedKek::from_secret_data(data, secret)?;
    let mut keys = Vec::new();
    for sealed in std::iter::once(current).chain(SealedKek::unwrap_only(data, secret)?) {
        let wanted = super::KeyRef {
            provider: super::KekProvider::Kms,
            id: key_id(&sealed.ciphertext),
        };
        match have.and_then(|kek| kek.member(wanted)) {
            Some(kek) => keys.push(kek),
            None => keys.push(super::Kek::from(KmsKek::open(kms, &sealed, secret).await?)),
        }
    }
    let (current, others) = keys.split_first().ok_or_else(|| KmsError::InvalidSecret {
        secret: secret.to_owned(),
        why: "no key".into(),
    })?;
    Ok(super::Kek::keyring(current, others))
}

/// The ids of the keys in a kms KEK Secret's `data` (current first), read without the
/// plugin.
pub fn keyring_ids(
    data: &BTreeMap<String, ByteString>,
    secret: &str,
) -> Result<Vec<KekId>, KmsError> {
    let current = SealedKek::from_secret_data(data, secret)?;
    Ok(std::iter::once(current)
        .chain(SealedKek::unwrap_only(data, secret)?)
        .map(|sealed| key_id(&sealed.ciphertext))
        .collect())
}

/// How long to wait between attempts while the plugin is down at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The first wait.
    pub initial: Duration,
    /// The longest wait; each doubles up to it.
    pub max: Duration,
}

impl Default for Backoff {
    /// 1 s doubling to 30 s.
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
        }
    }
}

/// Runs `attempt` until it succeeds or fails for good, waiting `backoff` after each
/// transient failure (plugin down, starting or slow) and logging each.
pub async fn retry_while_transient<T, F, Fut>(
    backoff: Backoff,
    mut attempt: F,
) -> Result<T, KmsError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, KmsError>>,
{
    let mut wait = backoff.initial;
    let mut tries = 1u32;
    loop {
        match attempt().await {
            Err(e) if e.is_transient() => {
                tracing::warn!(
                    attempt = tries,
                    retry_in = %humantime::format_duration(wait),
                    error = %e,
                    "KMS plugin not ready: the operator waits for it before it starts"
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(backoff.max);
                tries = tries.saturating_add(1);
            }
            other => return other,
        }
    }
}

/// Waits for a healthy plugin, then loads (or creates) the KEK through it. Transient
/// failures are retried with `backoff`; a plugin that refuses, or a Secret that is
/// wrong, fails at once.
pub async fn open_kms_kek(
    client: &kube::Client,
    namespace: &str,
    kms: &KmsClient,
    backoff: Backoff,
) -> Result<KmsKek, KmsError> {
    retry_while_transient(backoff, || async {
        let status = kms.status().await?;
        tracing::info!(socket = %kms.socket().display(), version = %status.version, kms_key_id = %status.key_id, "KMS plugin healthy");
        load_or_create_kms_kek(client.clone(), namespace, kms).await
    })
    .await
}
