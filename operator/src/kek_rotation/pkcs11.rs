//! The pkcs11 steps of a KEK rotation. The KEK Secret records HSM key labels only
//! ([`labels`]); the keys are made and used inside the token:
//!
//! - **stage**: a new non-extractable AES-256 key is generated in the token under
//!   [`labels::rotated_label`], then recorded under `pkcs11-next-label`. When the
//!   record loses to another writer the new key is destroyed again: nothing was ever
//!   wrapped under it.
//! - **promote**: the next label becomes `pkcs11-key-label`, the old one
//!   `pkcs11-previous-<id>`.
//! - **retire**: the previous labels leave the Secret; the keys stay in the HSM. Like
//!   Kubernetes KMS plugins and cloud KMSes, the operator never destroys a key that
//!   wrapped data: backups taken before the re-wrap still need it, and destroying it is
//!   the HSM admin's decision.

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;

use super::{KekRotationError, Trigger, data, finish_promotion, stage_entries};
use crate::envelope::pkcs11::labels::{self, KeyLabels};
use crate::envelope::pkcs11::{self, Pkcs11Config, Pkcs11Error};
use crate::envelope::{Kek, KekId};

/// Runs a blocking HSM call off the async runtime.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    call: impl FnOnce() -> Result<T, Pkcs11Error> + Send + 'static,
) -> Result<T, KekRotationError> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|e| KekRotationError::Task(format!("{what}: {e}")))?
        .map_err(KekRotationError::from)
}

/// The labels the KEK Secret records.
pub fn labels(secret: &Secret, name: &str) -> Result<KeyLabels, KekRotationError> {
    Ok(KeyLabels::from_secret_data(data(secret), name)?)
}

/// Opens the keyring `secret` records, reusing the keys `loaded` has open.
pub async fn open_keyring(
    config: &Pkcs11Config,
    secret: &Secret,
    name: &str,
    loaded: &Kek,
) -> Result<Kek, KekRotationError> {
    let labels = labels(secret, name)?;
    let (config, loaded, name) = (config.clone(), loaded.clone(), name.to_owned());
    blocking("opening the HSM keys", move || {
        labels::open_keyring(&config, &labels, &loaded, &name)
    })
    .await
}

/// Phase 1: generates the next key in the HSM and records its label in `secret`.
/// Returns the label and the key's id.
pub async fn stage(
    config: &Pkcs11Config,
    secret: &mut Secret,
    trigger: &Trigger,
    now: Timestamp,
) -> Result<(String, KekId), KekRotationError> {
    let label = labels::rotated_label(&config.key_label, now);
    let new = Pkcs11Config {
        key_label: label.clone(),
        ..config.clone()
    };
    let id = blocking("creating the next HSM key", move || {
        pkcs11::create_key(&new)
    })
    .await?;
    let entries = [(
        labels::NEXT_LABEL_KEY.to_owned(),
        k8s_openapi::ByteString(label.clone().into_bytes()),
    )];
    stage_entries(secret, entries.into_iter().collect(), trigger, now);
    Ok((label, id))
}

/// Undoes [`stage`]'s key when its record lost to another writer.
pub async fn discard_unrecorded(
    config: &Pkcs11Config,
    label: String,
) -> Result<(), KekRotationError> {
    let config = Pkcs11Config {
        key_label: label,
        ..config.clone()
    };
    blocking("destroying an unrecorded HSM key", move || {
        pkcs11::destroy_unrecorded_key(&config)
    })
    .await
}

/// Phase 2: the staged label becomes current, the current one previous. Returns the
/// old and new key ids in the token labelled `token_label`.
pub fn promote(
    secret: &mut Secret,
    name: &str,
    token_label: &str,
    now: Timestamp,
) -> Result<(KekId, KekId), KekRotationError> {
    let mut labels = labels(secret, name)?;
    let Some(next) = labels.next.take() else {
        return Err(Pkcs11Error::LabelsInvalid {
            secret: name.to_owned(),
            why: format!("no {} to promote", labels::NEXT_LABEL_KEY),
        }
        .into());
    };
    let old = std::mem::replace(&mut labels.current, next);
    let (old_id, new_id) = (
        pkcs11::key_id(token_label, &old),
        pkcs11::key_id(token_label, &labels.current),
    );
    labels.previous.push(old);
    let data = secret.data.get_or_insert_with(Default::default);
    data.retain(|k, _| !k.starts_with("pkcs11-"));
    data.extend(labels.to_secret_data(token_label));
    finish_promotion(secret, new_id, now);
    Ok((old_id, new_id))
}

/// The labels of the previous keys `secret` records, for the completion Event.
pub fn previous_labels(secret: &Secret) -> Vec<String> {
    data(secret)
        .iter()
        .filter(|(k, _)| k.starts_with(labels::PREVIOUS_PREFIX))
        .map(|(_, v)| String::from_utf8_lossy(&v.0).into_owned())
        .collect()
}
