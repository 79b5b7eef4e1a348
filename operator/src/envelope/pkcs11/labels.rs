//! Which HSM keys make up a pkcs11 KEK, as the Secret `portcullis-kek` records them. It
//! holds labels only, never key material, so reading it reveals nothing:
//!
//! | data key               | value                                                   |
//! |------------------------|---------------------------------------------------------|
//! | `provider`             | `pkcs11`                                                |
//! | `pkcs11-key-label`     | `CKA_LABEL` of the current key (it wraps)               |
//! | `pkcs11-next-label`    | a key staged by a rotation (unwraps only)               |
//! | `pkcs11-previous-<id>` | a key rotated away from, kept until nothing is under it |
//!
//! A rotation creates its new key under `<--pkcs11-key-label>-<UTC time>`, e.g.
//! `portcullis-kek-20270101T000000Z`: tied to the configured label, unique per rotation,
//! and telling an HSM admin when it was made. Every replica finds the keys by these
//! labels in its token.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use super::{Pkcs11Config, Pkcs11Error, Pkcs11Kek, key_id};
use crate::envelope::kms::KEK_PROVIDER_KEY;
use crate::envelope::secret::{KEK_SECRET_NAME, create_or_winner, new_kek_secret};
use crate::envelope::{Kek, KekId, KekProvider, KeyRef};

/// The value of [`KEK_PROVIDER_KEY`] in a pkcs11 KEK Secret.
pub const PKCS11_PROVIDER: &str = "pkcs11";
/// The data key holding the current key's label.
pub const KEY_LABEL_KEY: &str = "pkcs11-key-label";
/// The data key holding a staged key's label.
pub const NEXT_LABEL_KEY: &str = "pkcs11-next-label";
/// The prefix of the data keys holding previous keys' labels (`pkcs11-previous-<id>`).
pub const PREVIOUS_PREFIX: &str = "pkcs11-previous-";

/// What a key is to the keyring: named in errors so the fix fits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyRole {
    /// The key that wraps.
    Current,
    /// A key staged by a rotation.
    Next,
    /// A key rotated away from.
    Previous,
}

impl std::fmt::Display for KeyRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Current => "current",
            Self::Next => "staged next",
            Self::Previous => "previous",
        })
    }
}

impl KeyRole {
    fn data_key(self) -> &'static str {
        match self {
            Self::Current => KEY_LABEL_KEY,
            Self::Next => NEXT_LABEL_KEY,
            Self::Previous => "pkcs11-previous-<id>",
        }
    }
}

/// The labels of the current, staged and previous HSM keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyLabels {
    /// The key that wraps.
    pub current: String,
    /// A key staged by a rotation.
    pub next: Option<String>,
    /// Keys rotated away from, not yet retired.
    pub previous: Vec<String>,
}

impl KeyLabels {
    /// Only `current`: a new install, or no rotation in progress.
    pub fn new(current: impl Into<String>) -> Self {
        Self {
            current: current.into(),
            next: None,
            previous: Vec::new(),
        }
    }

    /// Reads the labels from a pkcs11 KEK Secret's `data`; `secret` names it in errors.
    pub fn from_secret_data(
        data: &BTreeMap<String, ByteString>,
        secret: &str,
    ) -> Result<Self, Pkcs11Error> {
        let invalid = |why: String| Pkcs11Error::LabelsInvalid {
            secret: secret.to_owned(),
            why,
        };
        let text = |key: &str, value: &ByteString| {
            String::from_utf8(value.0.clone())
                .ok()
                .filter(|label| !label.is_empty())
                .ok_or_else(|| invalid(format!("{key} is not a label")))
        };
        match data.get(KEK_PROVIDER_KEY).map(|p| p.0.as_slice()) {
            Some(p) if p == PKCS11_PROVIDER.as_bytes() => {}
            Some(other) => {
                return Err(invalid(format!(
                    "it holds a {:?}-provider KEK; run the operator with that provider, or move the Secret aside \
                     if this cluster's data is wrapped under the HSM key",
                    String::from_utf8_lossy(other)
                )));
            }
            None => {
                return Err(invalid(
                    "it holds a secret-provider KEK (raw key bytes), not HSM key labels; run the operator with \
                     --kek-provider secret, or move the Secret aside if this cluster's data is wrapped under the HSM key"
                        .to_owned(),
                ));
            }
        }
        let current = data
            .get(KEY_LABEL_KEY)
            .ok_or_else(|| invalid(format!("no {KEY_LABEL_KEY}")))
            .and_then(|v| text(KEY_LABEL_KEY, v))?;
        let next = data
            .get(NEXT_LABEL_KEY)
            .map(|v| text(NEXT_LABEL_KEY, v))
            .transpose()?;
        let previous = data
            .iter()
            .filter(|(k, _)| k.starts_with(PREVIOUS_PREFIX))
            .map(|(k, v)| text(k, v))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            current,
            next,
            previous,
        })
    }

    /// The Secret `data` recording these labels; previous keys are keyed by their id in
    /// the token labelled `token_label`.
    pub fn to_secret_data(&self, token_label: &str) -> BTreeMap<String, ByteString> {
        let entry = |k: String, v: &str| (k, ByteString(v.as_bytes().to_vec()));
        let mut data = BTreeMap::from([
            entry(KEK_PROVIDER_KEY.to_owned(), PKCS11_PROVIDER),
            entry(KEY_LABEL_KEY.to_owned(), &self.current),
        ]);
        if let Some(next) = &self.next {
            data.extend([entry(NEXT_LABEL_KEY.to_owned(), next)]);
        }
        for label in &self.previous {
            data.extend([entry(previous_key(key_id(token_label, label)), label)]);
        }
        data
    }

    /// The envelope ids of the current key and of the unwrap-only keys, in the token
    /// labelled `token_label`: computed from labels, without the HSM.
    pub fn ids(&self, token_label: &str) -> (KekId, Vec<KekId>) {
        let others = self
            .next
            .iter()
            .chain(self.previous.iter())
            .map(|label| key_id(token_label, label))
            .collect();
        (key_id(token_label, &self.current), others)
    }
}

/// The data key recording the previous key with id `id`.
pub fn previous_key(id: KekId) -> String {
    format!("{PREVIOUS_PREFIX}{id}")
}

/// The label a rotation at `now` gives its new key: `<base>-<UTC time>`.
pub fn rotated_label(base: &str, now: Timestamp) -> String {
    format!("{base}-{}", now.strftime("%Y%m%dT%H%M%SZ"))
}

/// Opens the keyring `labels` names (blocking on the HSM): the current key wraps, the
/// staged and previous keys only unwrap. Keys `loaded` already has open are reused, not
/// opened again. A key not in the token is named with its role and the fix.
pub fn open_keyring(
    config: &Pkcs11Config,
    labels: &KeyLabels,
    loaded: &Kek,
    secret: &str,
) -> Result<Kek, Pkcs11Error> {
    let token = loaded.pkcs11_token_label();
    let open = |label: &str, role: KeyRole| -> Result<Kek, Pkcs11Error> {
        let open_already = token.as_deref().and_then(|token| {
            loaded.member(KeyRef {
                provider: KekProvider::Pkcs11,
                id: key_id(token, label),
            })
        });
        if let Some(kek) = open_already {
            return Ok(kek);
        }
        let config = Pkcs11Config {
            key_label: label.to_owned(),
            ..config.clone()
        };
        Pkcs11Kek::open(&config)
            .map(Kek::from)
            .map_err(|e| match e {
                Pkcs11Error::KeyMissing { token, label } => Pkcs11Error::RotationKeyMissing {
                    token,
                    label,
                    role,
                    data_key: role.data_key(),
                    secret: secret.to_owned(),
                },
                other => other,
            })
    };
    let current = open(&labels.current, KeyRole::Current)?;
    let mut others = Vec::new();
    if let Some(next) = &labels.next {
        others.push(open(next, KeyRole::Next)?);
    }
    for previous in &labels.previous {
        others.push(open(previous, KeyRole::Previous)?);
    }
    Ok(Kek::keyring(&current, &others))
}

/// The labels recorded in Secret [`KEK_SECRET_NAME`] in `namespace`; on the first start
/// with a pkcs11 KEK, records `configured` (the `--pkcs11-key-label`) as the current key.
/// A lost create race reads the winner's.
pub async fn load_or_record_labels(
    client: kube::Client,
    namespace: &str,
    configured: &str,
) -> Result<KeyLabels, Pkcs11Error> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let secret = format!("{namespace}/{KEK_SECRET_NAME}");
    let kube_err = |e: kube::Error| Pkcs11Error::LabelsUnreadable {
        secret: secret.clone(),
        reason: e.to_string(),
    };
    let found = match api.get_opt(KEK_SECRET_NAME).await.map_err(kube_err)? {
        Some(found) => found,
        None => {
            let labels = KeyLabels::new(configured);
            // The token label only keys previous entries; a new record has none.
            let record = new_kek_secret(namespace, labels.to_secret_data(""));
            match create_or_winner(&api, &record).await.map_err(kube_err)? {
                None => return Ok(labels),
                Some(winner) => winner,
            }
        }
    };
    KeyLabels::from_secret_data(&found.data.unwrap_or_default(), &secret)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn labels_round_trip_through_the_secret_and_hold_no_key() {
        let labels = KeyLabels {
            current: "kek-20270101T000000Z".into(),
            next: Some("kek-20280101T000000Z".into()),
            previous: vec!["kek".into()],
        };
        let data = labels.to_secret_data("token");
        assert_eq!(
            data.keys().map(String::as_str).collect::<Vec<_>>(),
            vec![
                "pkcs11-key-label",
                "pkcs11-next-label",
                &*previous_key(key_id("token", "kek")),
                "provider",
            ]
        );
        assert_eq!(
            KeyLabels::from_secret_data(&data, "ns/kek").unwrap(),
            labels
        );
        let (current, others) = labels.ids("token");
        assert_eq!(current, key_id("token", "kek-20270101T000000Z"));
        assert_eq!(others.len(), 2);
    }

    #[test]
    fn another_providers_secret_is_refused_with_the_fix() {
        let raw = BTreeMap::from([("kek".to_owned(), ByteString(vec![0; 32]))]);
        let err = KeyLabels::from_secret_data(&raw, "ns/portcullis-kek").unwrap_err();
        assert!(err.to_string().contains("--kek-provider secret"), "{err}");
    }

    #[test]
    fn a_rotated_label_names_its_base_and_time() {
        let at = Timestamp::from_second(1_798_761_600).unwrap();
        assert_eq!(
            rotated_label("portcullis-kek", at),
            "portcullis-kek-20270101T000000Z"
        );
    }
}
