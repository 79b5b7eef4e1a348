//! KEK rotation without downtime, for the `secret`, `kms` and `pkcs11` providers.
//!
//! The KEK Secret moves through three phases, each written with the resourceVersion
//! read, so two replicas never both act on one phase:
//!
//! 1. **Staged**: a trigger (a new value of the annotation [`ROTATE_ANNOTATION`], or the
//!    current key older than `--kek-rotation-period`) puts a new key under
//!    [`KEK_NEXT_KEY`] (kms: a new intermediate key, encrypted by the plugin, under
//!    `kms-next-*`; pkcs11: a new key generated in the HSM, its label under
//!    `pkcs11-next-label`, see [`pkcs11`]). Every replica re-reads the Secret every
//!    reload interval and loads it as an unwrap-only key.
//! 2. **Promoted**, once every replica has had time to load it (the propagation delay):
//!    the staged key becomes `kek`, the old one moves to `kek-previous-<id>` (kms: `kms-previous-<id>-*`; pkcs11: the
//!    label moves to `pkcs11-previous-<id>`). A replica
//!    that has not reloaded yet still opens what the new key wraps (it has it as
//!    "next"), and what it wraps under the old key is re-wrapped later.
//! 3. **Re-wrapped**: the leader re-wraps every tenant DEK Secret and the webhook CA
//!    Secret still under an old key (the CA Secrets are re-wrapped by the CA's own
//!    store, which owns their resourceVersions), counts what is left, and when nothing
//!    refers to an old key removes the previous keys from the Secret (pkcs11: the labels;
//!    the keys stay in the HSM for its admin to destroy).
//!
//! Progress is published as Events on the KEK Secret and as metrics.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use kube::Api;
use kube::api::{ListParams, PostParams};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::ca::{INTERMEDIATE_SECRET, ROOT_SECRET};
use crate::context::Context;
use crate::dek::{self, DekRing};
use crate::envelope::kms::{self, KmsError, SealedKek};
use crate::envelope::pkcs11::labels as pkcs11_labels;
use crate::envelope::secret::previous_key;
use crate::envelope::{
    EnvelopeError, KEK_NEXT_KEY, KEK_PREVIOUS_PREFIX, KEK_SECRET_KEY, Kek, KekId, KekProvider,
    SecretKek,
};
use crate::envelope::{KmsClient, KmsKek};
use crate::envelope::{Pkcs11Config, Pkcs11Error};
use crate::webhook::tls::WebhookCa;

/// Set to any new value to ask for a KEK rotation (`kubectl portcullis kek rotate`).
pub const ROTATE_ANNOTATION: &str = "portcullis.dev/rotate-kek";
/// The value of [`ROTATE_ANNOTATION`] last acted on (written by the operator).
pub const ROTATE_HANDLED_ANNOTATION: &str = "portcullis.dev/rotate-kek-handled";
/// When the current KEK became current (RFC 3339); absent: the Secret's creation time.
pub const CREATED_ANNOTATION: &str = "portcullis.dev/kek-created";
/// When the key under [`KEK_NEXT_KEY`] was staged (RFC 3339).
pub const STAGED_ANNOTATION: &str = "portcullis.dev/kek-next-staged";
/// The current KEK's public id (hex), for `kubectl portcullis check`.
pub const ID_ANNOTATION: &str = "portcullis.dev/kek-id";

/// How rotation runs.
#[derive(Clone, Debug)]
pub struct KekRotationSettings {
    /// The Secret holding the KEK, in the operator's namespace.
    pub secret: String,
    /// Rotate when the current key is this old; `None`: only on demand.
    pub period: Option<Duration>,
    /// How often every replica re-reads the KEK Secret.
    pub reload_interval: Duration,
    /// How long a staged key waits before it becomes current, and a promoted key before
    /// previous keys may be removed: long enough for every replica to reload.
    pub propagation: Duration,
    /// The webhook CA Secret, re-wrapped with the rest; `None`: no webhooks.
    pub webhook_ca_secret: Option<String>,
    /// The running KEK's provider.
    pub provider: KekProvider,
    /// The KMS plugin (kms provider): it encrypts a new intermediate key and decrypts
    /// staged and previous ones.
    pub kms: Option<KmsClient>,
    /// The HSM (pkcs11 provider): where new keys are generated and every key is found
    /// by its label.
    pub pkcs11: Option<Pkcs11Config>,
}

impl KekRotationSettings {
    /// Annual rotation, a 10 s reload and a 30 s propagation delay.
    pub fn new(secret: impl Into<String>) -> Self {
        Self {
            secret: secret.into(),
            period: Some(Duration::from_secs(365 * 24 * 3600)),
            reload_interval: Duration::from_secs(10),
            propagation: Duration::from_secs(30),
            webhook_ca_secret: None,
            provider: KekProvider::Secret,
            kms: None,
            pkcs11: None,
        }
    }
}

/// Why a rotation step failed. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum KekRotationError {
    /// The Kubernetes API failed.
    #[error("Secret {secret}: {source}")]
    Kube {
        /// The Secret involved.
        secret: String,
        /// The API error.
        source: kube::Error,
    },
    /// The KEK Secret holds no usable keyring.
    #[error("KEK Secret {secret}: {source}")]
    Keyring {
        /// Secret name.
        secret: String,
        /// What is wrong.
        source: EnvelopeError,
    },
    /// The KMS plugin failed, or the kms KEK Secret is unusable.
    #[error(transparent)]
    Kms(#[from] KmsError),
    /// The HSM failed, or the pkcs11 KEK Secret is unusable.
    #[error(transparent)]
    Hsm(#[from] Pkcs11Error),
    /// A blocking HSM call did not finish.
    #[error("HSM task failed: {0}")]
    Task(String),
    /// A wrapped key could not be re-wrapped.
    #[error("re-wrapping Secret {secret}: {reason}")]
    Rewrap {
        /// The Secret holding it.
        secret: String,
        /// Why.
        reason: String,
    },
}

/// What triggered a rotation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// [`ROTATE_ANNOTATION`] took this new value.
    Annotation(String),
    /// The current key reached the rotation period.
    Schedule,
    /// The KMS plugin encrypts under another key id than the one recorded for the
    /// current kms KEK (the KMS key was rotated).
    KmsKeyRotated {
        /// The key id recorded in `kms-key-id`.
        from: String,
        /// The plugin's current key id.
        to: String,
    },
}

/// What the leader does next with the KEK Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing is due.
    Idle,
    /// Stage a new key.
    Stage(Trigger),
    /// A staged key waits for every replica to load it.
    WaitForReplicas,
    /// Make the staged key current.
    Promote,
    /// Re-wrap what is still under previous keys, then remove them.
    Rewrap,
}

fn annotation<'a>(secret: &'a Secret, name: &str) -> Option<&'a str> {
    secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(name))
        .map(String::as_str)
}

fn timestamp(secret: &Secret, name: &str) -> Option<Timestamp> {
    annotation(secret, name).and_then(|t| t.parse().ok())
}

/// When the current key became current.
pub fn current_since(secret: &Secret) -> Option<Timestamp> {
    timestamp(secret, CREATED_ANNOTATION)
        .or_else(|| secret.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

fn data(secret: &Secret) -> &BTreeMap<String, ByteString> {
    static EMPTY: BTreeMap<String, ByteString> = BTreeMap::new();
    secret.data.as_ref().unwrap_or(&EMPTY)
}

/// The ids of the previous keys the Secret still keeps (`kek-previous-<id>`,
/// `kms-previous-<id>-ciphertext` for a kms KEK, `pkcs11-previous-<id>` for a pkcs11 one).
pub fn previous_ids(secret: &Secret) -> Vec<String> {
    data(secret)
        .keys()
        .filter_map(|k| {
            k.strip_prefix(KEK_PREVIOUS_PREFIX)
                .or_else(|| k.strip_prefix(pkcs11_labels::PREVIOUS_PREFIX))
                .or_else(|| {
                    k.strip_prefix(kms::KMS_PREVIOUS_PREFIX)
                        .and_then(|rest| rest.strip_suffix("-ciphertext"))
                })
        })
        .map(str::to_owned)
        .collect()
}

/// Whether a key is staged (`kek-next`, `kms-next-ciphertext` or `pkcs11-next-label`).
fn has_next(secret: &Secret) -> bool {
    let data = data(secret);
    data.contains_key(KEK_NEXT_KEY)
        || data.contains_key(&format!("{}ciphertext", kms::KMS_NEXT_PREFIX))
        || data.contains_key(pkcs11_labels::NEXT_LABEL_KEY)
}

fn is_kms(secret: &Secret) -> bool {
    data(secret)
        .get(kms::KEK_PROVIDER_KEY)
        .map(|p| p.0.as_slice())
        == Some(kms::KMS_PROVIDER.as_bytes())
}

fn elapsed(since: Option<Timestamp>, now: Timestamp, wait: Duration) -> bool {
    since.is_none_or(|since| crate::clock::add(since, wait) <= now)
}

/// Decides the next step for the KEK Secret at `now`.
pub fn plan(secret: &Secret, now: Timestamp, settings: &KekRotationSettings) -> Step {
    if has_next(secret) {
        return if elapsed(
            timestamp(secret, STAGED_ANNOTATION),
            now,
            settings.propagation,
        ) {
            Step::Promote
        } else {
            Step::WaitForReplicas
        };
    }
    if !previous_ids(secret).is_empty() {
        return if elapsed(current_since(secret), now, settings.propagation) {
            Step::Rewrap
        } else {
            Step::WaitForReplicas
        };
    }
    if let Some(wanted) = annotation(secret, ROTATE_ANNOTATION)
        && annotation(secret, ROTATE_HANDLED_ANNOTATION) != Some(wanted)
    {
        return Step::Stage(Trigger::Annotation(wanted.to_owned()));
    }
    if let Some(period) = settings.period
        && elapsed(current_since(secret), now, period)
    {
        return Step::Stage(Trigger::Schedule);
    }
    Step::Idle
}

fn set_annotation(secret: &mut Secret, name: &str, value: String) {
    secret
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(name.to_owned(), value);
}

/// Phase 1: `next` staged under [`KEK_NEXT_KEY`], the trigger recorded as handled.
pub fn stage(secret: &mut Secret, next: &SecretKek, trigger: &Trigger, now: Timestamp) {
    let entries = BTreeMap::from([(
        KEK_NEXT_KEY.to_owned(),
        ByteString(next.to_bytes().to_vec()),
    )]);
    stage_entries(secret, entries, trigger, now);
}

/// Phase 1 for a kms KEK: the plugin's ciphertext of a new intermediate key staged
/// under [`kms::KMS_NEXT_PREFIX`].
pub fn stage_kms(secret: &mut Secret, next: &SealedKek, trigger: &Trigger, now: Timestamp) {
    stage_entries(
        secret,
        next.to_prefixed_data(kms::KMS_NEXT_PREFIX),
        trigger,
        now,
    );
}

fn stage_entries(
    secret: &mut Secret,
    entries: BTreeMap<String, ByteString>,
    trigger: &Trigger,
    now: Timestamp,
) {
    secret
        .data
        .get_or_insert_with(BTreeMap::new)
        .extend(entries);
    set_annotation(secret, STAGED_ANNOTATION, now.to_string());
    if let Trigger::Annotation(value) = trigger {
        set_annotation(secret, ROTATE_HANDLED_ANNOTATION, value.clone());
    }
}

/// Phase 2 for a kms KEK: the staged sealed key becomes current, the current one
/// previous. Returns the old and new key ids.
pub fn promote_kms(secret: &mut Secret, now: Timestamp) -> Result<(KekId, KekId), KmsError> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    let data = secret.data.get_or_insert_with(BTreeMap::new);
    let current = SealedKek::from_secret_data(data, &name)?;
    let next =
        SealedKek::from_prefixed_data(data, kms::KMS_NEXT_PREFIX, &name)?.ok_or_else(|| {
            KmsError::InvalidSecret {
                secret: name.clone(),
                why: "no staged key".into(),
            }
        })?;
    let (old, new) = (
        kms::key_id(&current.ciphertext),
        kms::key_id(&next.ciphertext),
    );
    data.retain(|k, _| !k.starts_with(kms::KMS_NEXT_PREFIX));
    data.extend(current.to_prefixed_data(&kms::previous_prefix(old)));
    data.extend(next.to_secret_data());
    finish_promotion(secret, new, now);
    Ok((old, new))
}

fn finish_promotion(secret: &mut Secret, new: KekId, now: Timestamp) {
    if let Some(annotations) = secret.metadata.annotations.as_mut() {
        annotations.remove(STAGED_ANNOTATION);
    }
    set_annotation(secret, CREATED_ANNOTATION, now.to_string());
    set_annotation(secret, ID_ANNOTATION, new.to_string());
}

/// Phase 2: the staged key becomes current, the current one previous. Returns the old
/// and new key ids.
pub fn promote(secret: &mut Secret, now: Timestamp) -> Result<(KekId, KekId), EnvelopeError> {
    let data = secret.data.get_or_insert_with(BTreeMap::new);
    let current = SecretKek::from_secret_data(data)?;
    let next = data
        .get(KEK_NEXT_KEY)
        .ok_or_else(|| EnvelopeError::InvalidSecret(KEK_NEXT_KEY.into()))
        .and_then(|b| SecretKek::from_bytes(&b.0))?;
    data.insert(
        previous_key(current.id()),
        ByteString(current.to_bytes().to_vec()),
    );
    data.insert(
        KEK_SECRET_KEY.to_owned(),
        ByteString(next.to_bytes().to_vec()),
    );
    data.remove(KEK_NEXT_KEY);
    finish_promotion(secret, next.id(), now);
    Ok((current.id(), next.id()))
}

/// Phase 3 done: the previous keys removed.
pub fn retire(secret: &mut Secret) {
    if let Some(data) = secret.data.as_mut() {
        data.retain(|k, _| {
            !k.starts_with(KEK_PREVIOUS_PREFIX)
                && !k.starts_with(kms::KMS_PREVIOUS_PREFIX)
                && !k.starts_with(pkcs11_labels::PREVIOUS_PREFIX)
        });
    }
}

/// How many wrapped values in `data` are under a key other than `kek`'s current one.
pub fn blobs_under_old_keys(data: &BTreeMap<String, ByteString>, kek: &Kek) -> usize {
    let current = kek.key_ref();
    data.iter()
        .filter(|(name, _)| is_wrapped_key(name))
        .filter(|(_, value)| Kek::wrapped_under(&value.0).is_ok_and(|key| key != current))
        .count()
}

/// The data keys holding wrapped keys: the CA and webhook CA `*.wrapped`, the DEK `v<n>`.
fn is_wrapped_key(name: &str) -> bool {
    name.ends_with(".wrapped")
        || name
            .strip_prefix('v')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// One re-wrap pass's count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RewrapCount {
    /// Secrets re-wrapped under the current key in this pass.
    pub rewrapped: usize,
    /// Secrets still holding a key wrapped under an old KEK.
    pub remaining: usize,
}

/// Re-wraps every DEK Secret and the webhook CA Secret in `namespace` still under an old
/// key; counts the CA Secrets, which their store re-wraps. A conflicting write counts as
/// remaining and is retried next pass.
pub async fn rewrap_pass(
    client: &kube::Client,
    namespace: &str,
    kek: &Kek,
    webhook_ca_secret: Option<&str>,
) -> Result<RewrapCount, KekRotationError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(|source| KekRotationError::Kube {
            secret: format!("{namespace}/*"),
            source,
        })?;
    let mut count = RewrapCount::default();
    for secret in list.items {
        let Some(name) = secret.metadata.name.clone() else {
            continue;
        };
        let is_dek = name.starts_with(dek::SECRET_PREFIX);
        let is_webhook_ca = webhook_ca_secret == Some(name.as_str());
        let is_ca = name == ROOT_SECRET || name == INTERMEDIATE_SECRET;
        if !(is_dek || is_webhook_ca || is_ca) || blobs_under_old_keys(data(&secret), kek) == 0 {
            continue;
        }
        if is_ca {
            count.remaining += 1;
            continue;
        }
        let rewritten = if is_dek {
            rewrap_dek(secret, &name, kek)?
        } else {
            rewrap_webhook_ca(secret, &name, kek)?
        };
        match api.replace(&name, &PostParams::default(), &rewritten).await {
            Ok(_) => {
                tracing::info!(secret = %name, kek = %kek.id(), "re-wrapped under the current KEK");
                count.rewrapped += 1;
            }
            Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => {
                count.remaining += usize::from(status.code == 409);
            }
            Err(source) => {
                return Err(KekRotationError::Kube {
                    secret: name,
                    source,
                });
            }
        }
    }
    Ok(count)
}

fn rewrap_dek(mut secret: Secret, name: &str, kek: &Kek) -> Result<Secret, KekRotationError> {
    let failed = |reason: String| KekRotationError::Rewrap {
        secret: name.to_owned(),
        reason,
    };
    let tenant = name.strip_prefix(dek::SECRET_PREFIX).unwrap_or(name);
    let annotations = secret.metadata.annotations.clone().unwrap_or_default();
    let mut ring =
        DekRing::from_secret_parts(tenant, data(&secret), &annotations).map_err(failed)?;
    ring.rewrap(kek).map_err(|e| failed(e.to_string()))?;
    let (data, _) = ring.to_secret_parts();
    secret.data = Some(data);
    secret.metadata.managed_fields = None;
    Ok(secret)
}

fn rewrap_webhook_ca(
    mut secret: Secret,
    name: &str,
    kek: &Kek,
) -> Result<Secret, KekRotationError> {
    let failed = |reason: String| KekRotationError::Rewrap {
        secret: name.to_owned(),
        reason,
    };
    let (ca, _) =
        WebhookCa::from_secret_data(data(&secret), name, kek).map_err(|e| failed(e.to_string()))?;
    let mut rewritten = data(&secret).clone();
    rewritten.extend(
        ca.to_secret_data(name, kek)
            .map_err(|e| failed(e.to_string()))?,
    );
    secret.data = Some(rewritten);
    secret.metadata.managed_fields = None;
    Ok(secret)
}

/// The KEK gauges, in the operator's registry (`portcullis_operator_kek_*`).
#[derive(Clone, Default)]
pub struct KekMetrics {
    current_since: Gauge,
    unwrap_only_keys: Gauge,
    secrets_under_previous: Gauge,
    rotation_completed: Gauge,
}

impl KekMetrics {
    /// Registers the gauges in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "kek_current_since_timestamp_seconds",
            "When the current key-encryption key became current (Unix time; age = time() - this)",
            metrics.current_since.clone(),
        );
        registry.register(
            "kek_unwrap_only_keys",
            "Key-encryption keys kept for unwrapping only: a staged next key or previous keys (non-zero while a rotation is in progress)",
            metrics.unwrap_only_keys.clone(),
        );
        registry.register(
            "kek_secrets_under_previous_key",
            "Secrets still holding a key wrapped under a previous key-encryption key, at the last re-wrap pass",
            metrics.secrets_under_previous.clone(),
        );
        registry.register(
            "kek_rotation_completed_timestamp_seconds",
            "When the last key-encryption key rotation completed (Unix time; 0: none since start)",
            metrics.rotation_completed.clone(),
        );
        metrics
    }

    fn record(&self, since: Option<Timestamp>, unwrap_only: usize) {
        if let Some(since) = since {
            self.current_since.set(since.as_second());
        }
        self.unwrap_only_keys
            .set(i64::try_from(unwrap_only).unwrap_or(i64::MAX));
        if unwrap_only == 0 {
            self.secrets_under_previous.set(0);
        }
    }

    fn record_remaining(&self, remaining: usize) {
        self.secrets_under_previous
            .set(i64::try_from(remaining).unwrap_or(i64::MAX));
    }

    fn record_rotation_completed(&self, at: Timestamp) {
        self.rotation_completed.set(at.as_second());
    }
}

/// Rotation at run time: every replica reloads the keyring; the leader steps the
/// rotation.
pub struct KekRotation {
    ctx: Arc<Context>,
    settings: KekRotationSettings,
}

impl std::fmt::Debug for KekRotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KekRotation")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl KekRotation {
    /// Rotation of `ctx.kek`, kept in `settings.secret`.
    pub fn new(ctx: Arc<Context>, settings: KekRotationSettings) -> Self {
        Self { ctx, settings }
    }

    fn api(&self) -> Api<Secret> {
        Api::namespaced(self.ctx.client.clone(), &self.ctx.settings.namespace)
    }

    fn kube_err(&self) -> impl Fn(kube::Error) -> KekRotationError + '_ {
        |source| KekRotationError::Kube {
            secret: self.settings.secret.clone(),
            source,
        }
    }

    fn reference(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Secret".into()),
            name: Some(self.settings.secret.clone()),
            namespace: Some(self.ctx.settings.namespace.clone()),
            ..ObjectReference::default()
        }
    }

    async fn event(&self, warning: bool, reason: &str, note: String) {
        self.ctx
            .event(&self.reference(), warning, reason, note)
            .await;
    }

    fn secret_ref(&self) -> String {
        format!("{}/{}", self.ctx.settings.namespace, self.settings.secret)
    }

    fn pkcs11(&self) -> Result<&Pkcs11Config, KekRotationError> {
        self.settings.pkcs11.as_ref().ok_or_else(|| {
            KekRotationError::Hsm(Pkcs11Error::LabelsInvalid {
                secret: self.secret_ref(),
                why: "the operator runs with the pkcs11 provider but without its HSM settings"
                    .into(),
            })
        })
    }

    fn kms(&self) -> Result<&KmsClient, KekRotationError> {
        self.settings.kms.as_ref().ok_or_else(|| {
            KekRotationError::Kms(KmsError::InvalidSecret {
                secret: self.secret_ref(),
                why: "the operator runs with the kms provider but without a KMS plugin".into(),
            })
        })
    }

    /// Loads the keyring in `secret` into the shared KEK when it differs (a kms key is
    /// decrypted by the plugin only when it is new).
    async fn adopt(&self, secret: &Secret) -> Result<(), KekRotationError> {
        let sorted = |mut ids: Vec<KekId>| {
            ids.sort_by_key(|id| *id.as_bytes());
            ids
        };
        let have = sorted(self.ctx.kek.unwrap_only().iter().map(|k| k.id).collect());
        let (current, want) = match self.settings.provider {
            KekProvider::Kms => {
                let ids = kms::keyring_ids(data(secret), &self.secret_ref())?;
                let current = ids.first().copied();
                (current, sorted(ids.into_iter().skip(1).collect()))
            }
            KekProvider::Pkcs11 => {
                // Ids come from labels: the HSM is asked only when the keyring changed.
                let labels = pkcs11::labels(secret, &self.secret_ref())?;
                let token = self.ctx.kek.pkcs11_token_label().unwrap_or_default();
                let (current, others) = labels.ids(&token);
                (Some(current), sorted(others))
            }
            KekProvider::Secret => {
                let loaded = self.load_secret_keyring(secret)?;
                let want = sorted(loaded.unwrap_only().iter().map(|k| k.id).collect());
                (Some(loaded.id()), want)
            }
        };
        if current != Some(self.ctx.kek.id()) || have != want {
            let loaded = match self.settings.provider {
                KekProvider::Kms => {
                    kms::open_keyring(
                        self.kms()?,
                        data(secret),
                        &self.secret_ref(),
                        Some(&self.ctx.kek),
                    )
                    .await?
                }
                KekProvider::Pkcs11 => {
                    pkcs11::open_keyring(self.pkcs11()?, secret, &self.secret_ref(), &self.ctx.kek)
                        .await?
                }
                KekProvider::Secret => self.load_secret_keyring(secret)?,
            };
            self.ctx.kek.replace_with(&loaded);
            tracing::info!(kek = %loaded.id(), unwrap_only = want.len(), "KEK keyring reloaded");
        }
        self.ctx
            .metrics
            .kek
            .record(current_since(secret), want.len());
        Ok(())
    }

    fn load_secret_keyring(&self, secret: &Secret) -> Result<Kek, KekRotationError> {
        Kek::from_secret_data(data(secret)).map_err(|source| KekRotationError::Keyring {
            secret: self.settings.secret.clone(),
            source,
        })
    }

    /// With a kms KEK: the plugin's current key id, when it is not the one the current
    /// KEK was encrypted under. A plugin that does not answer is the health monitor's
    /// to report; it triggers nothing here.
    async fn kms_key_rotated(&self, secret: &Secret) -> Option<Trigger> {
        if self.settings.provider != KekProvider::Kms {
            return None;
        }
        let recorded = SealedKek::from_secret_data(data(secret), &self.secret_ref())
            .ok()?
            .key_id;
        let current = self.settings.kms.as_ref()?.status().await.ok()?.key_id;
        (!current.is_empty() && current != recorded).then_some(Trigger::KmsKeyRotated {
            from: recorded,
            to: current,
        })
    }

    /// Re-reads the Secret and adopts its keyring; when `leading`, takes the next step.
    pub async fn tick(&self, leading: bool) -> Result<Step, KekRotationError> {
        let api = self.api();
        let secret = api
            .get(&self.settings.secret)
            .await
            .map_err(self.kube_err())?;
        self.adopt(&secret).await?;
        if !leading {
            return Ok(Step::Idle);
        }
        let now = self.ctx.clock.now();
        let mut step = plan(&secret, now, &self.settings);
        if step == Step::Idle
            && let Some(rotated) = self.kms_key_rotated(&secret).await
        {
            step = Step::Stage(rotated);
        }
        let mut updated = secret.clone();
        updated.metadata.managed_fields = None;
        match &step {
            Step::Idle
                if annotation(&secret, ID_ANNOTATION) != Some(&*self.ctx.kek.id().to_string()) =>
            {
                // Record what `check` shows: the current key's id and since when.
                set_annotation(&mut updated, ID_ANNOTATION, self.ctx.kek.id().to_string());
                if let Some(since) = current_since(&secret) {
                    set_annotation(&mut updated, CREATED_ANNOTATION, since.to_string());
                }
                self.write(&updated).await?;
            }
            Step::Idle | Step::WaitForReplicas => return Ok(step),
            Step::Stage(trigger) => {
                let mut unrecorded = None;
                let next = match self.settings.provider {
                    KekProvider::Kms => {
                        let (next, sealed) = KmsKek::create(self.kms()?).await?;
                        stage_kms(&mut updated, &sealed, trigger, now);
                        next.id()
                    }
                    KekProvider::Pkcs11 => {
                        let (label, id) =
                            pkcs11::stage(self.pkcs11()?, &mut updated, trigger, now).await?;
                        unrecorded = Some(label);
                        id
                    }
                    KekProvider::Secret => {
                        let next = SecretKek::generate();
                        stage(&mut updated, &next, trigger, now);
                        next.id()
                    }
                };
                let recorded = self.write(&updated).await;
                if let (Some(label), Ok(false)) = (unrecorded, &recorded) {
                    // Another writer won: the new HSM key was never recorded nor used, so
                    // it goes. (After any other failure the write may have landed: kept.)
                    pkcs11::discard_unrecorded(self.pkcs11()?, label).await?;
                }
                if recorded? {
                    let why = match trigger {
                        Trigger::Annotation(v) => format!("{ROTATE_ANNOTATION}={v:?}"),
                        Trigger::Schedule => "the rotation period passed".to_owned(),
                        Trigger::KmsKeyRotated { from, to } => {
                            format!("the KMS plugin's key id changed from {from:?} to {to:?}")
                        }
                    };
                    self.event(
                        false,
                        "KekRotationStarted",
                        format!(
                            "KEK {} staged to replace {} ({why}); it becomes current once every replica has loaded it",
                            next,
                            self.ctx.kek.id()
                        ),
                    )
                    .await;
                }
            }
            Step::Promote => {
                let (old, new) = if is_kms(&updated) {
                    promote_kms(&mut updated, now)?
                } else if self.settings.provider == KekProvider::Pkcs11 {
                    let token = self.ctx.kek.pkcs11_token_label().unwrap_or_default();
                    pkcs11::promote(&mut updated, &self.secret_ref(), &token, now)?
                } else {
                    promote(&mut updated, now).map_err(|source| KekRotationError::Keyring {
                        secret: self.settings.secret.clone(),
                        source,
                    })?
                };
                if self.write(&updated).await? {
                    self.adopt(&updated).await?;
                    self.event(
                        false,
                        "KekPromoted",
                        format!("KEK {new} now wraps; re-wrapping what is still under {old}"),
                    )
                    .await;
                }
            }
            Step::Rewrap => {
                let count = rewrap_pass(
                    &self.ctx.client,
                    &self.ctx.settings.namespace,
                    &self.ctx.kek,
                    self.settings.webhook_ca_secret.as_deref(),
                )
                .await?;
                self.ctx.metrics.kek.record_remaining(count.remaining);
                if count.rewrapped > 0 {
                    self.event(
                        false,
                        "KekRewrapped",
                        format!(
                            "re-wrapped {} Secret(s) under KEK {}; {} still under a previous KEK",
                            count.rewrapped,
                            self.ctx.kek.id(),
                            count.remaining
                        ),
                    )
                    .await;
                }
                if count.remaining == 0 {
                    let retired = previous_ids(&updated);
                    let kept_in_hsm = pkcs11::previous_labels(&updated);
                    retire(&mut updated);
                    if self.write(&updated).await? {
                        self.adopt(&updated).await?;
                        self.ctx.metrics.kek.record_rotation_completed(now);
                        let kept = if kept_in_hsm.is_empty() {
                            String::new()
                        } else {
                            format!(
                                "; the HSM still holds their key(s) {}, no longer used: destroy them when no backup needs them",
                                kept_in_hsm.join(", ")
                            )
                        };
                        self.event(
                            false,
                            "KekRotationComplete",
                            format!(
                                "every wrapped key is under KEK {}; removed previous KEK(s) {}{kept}",
                                self.ctx.kek.id(),
                                retired.join(", ")
                            ),
                        )
                        .await;
                    }
                }
            }
        }
        Ok(step)
    }

    /// Replaces the KEK Secret with the resourceVersion read; `false` on a conflict
    /// (another writer won; the next tick re-reads).
    async fn write(&self, secret: &Secret) -> Result<bool, KekRotationError> {
        match self
            .api()
            .replace(&self.settings.secret, &PostParams::default(), secret)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(source) => Err(self.kube_err()(source)),
        }
    }

    /// Ticks every reload interval until `shutdown`; failures are logged, published as
    /// Warning Events by the leader, and retried.
    pub async fn run(self, leading: Arc<AtomicBool>, shutdown: CancellationToken) {
        loop {
            let is_leader = leading.load(Ordering::Relaxed);
            if let Err(e) = self.tick(is_leader).await {
                tracing::warn!(error = %e, "KEK rotation step failed; retrying");
                if is_leader {
                    self.event(true, "KekRotationFailed", e.to_string()).await;
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.settings.reload_interval) => {}
            }
        }
    }
}

pub mod pkcs11;
#[cfg(test)]
mod tests;
