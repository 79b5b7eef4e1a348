//! `kek rotate`: asks the operator to rotate the key-encryption key (any provider: secret,
//! kms, or pkcs11, whose Secret records HSM key labels), and what `check` shows of it. Only the Secret's annotations and data key
//! *names* are read or shown, never a key.

use std::io::Write;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams};

use crate::Outcome;
use crate::check::report::CheckResult;
use crate::cluster::Cluster;
use crate::error::CliError;

/// The Secret holding the KEK in the operator's namespace.
pub const KEK_SECRET: &str = "portcullis-kek";
/// Set to a new value to ask the operator for a rotation.
pub const ROTATE_ANNOTATION: &str = "portcullis.dev/rotate-kek";
/// The value the operator last acted on.
pub const ROTATE_HANDLED_ANNOTATION: &str = "portcullis.dev/rotate-kek-handled";
/// The current KEK's public id.
pub const ID_ANNOTATION: &str = "portcullis.dev/kek-id";
/// When the current KEK became current.
pub const CREATED_ANNOTATION: &str = "portcullis.dev/kek-created";
const NEXT_KEY: &str = "kek-next";
const PREVIOUS_PREFIX: &str = "kek-previous-";
const KMS_NEXT_KEY: &str = "kms-next-ciphertext";
const KMS_PREVIOUS_PREFIX: &str = "kms-previous-";
const PKCS11_NEXT_KEY: &str = "pkcs11-next-label";
const PKCS11_PREVIOUS_PREFIX: &str = "pkcs11-previous-";
const PROVIDER_KEY: &str = "provider";

/// What the KEK Secret says about rotation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KekRotationSeen {
    /// The current key's id, once the operator recorded it.
    pub id: Option<String>,
    /// Since when it is current.
    pub since: Option<Timestamp>,
    /// A staged next key waits to become current.
    pub staged: bool,
    /// Previous keys still kept (something may still be wrapped under them).
    pub previous: Vec<String>,
    /// A requested rotation the operator has not acted on yet.
    pub requested: bool,
    /// The provider a non-`secret` KEK Secret names (`kms`, `pkcs11`).
    pub provider: Option<String>,
}

/// Reads [`KekRotationSeen`] from the KEK Secret.
pub fn seen(secret: &Secret) -> KekRotationSeen {
    let annotations = secret.metadata.annotations.clone().unwrap_or_default();
    let data = secret.data.clone().unwrap_or_default();
    KekRotationSeen {
        id: annotations.get(ID_ANNOTATION).cloned(),
        since: annotations
            .get(CREATED_ANNOTATION)
            .and_then(|t| t.parse().ok())
            .or_else(|| secret.metadata.creation_timestamp.as_ref().map(|t| t.0)),
        staged: [NEXT_KEY, KMS_NEXT_KEY, PKCS11_NEXT_KEY]
            .iter()
            .any(|k| data.contains_key(*k)),
        previous: data
            .keys()
            .filter_map(|k| {
                k.strip_prefix(PREVIOUS_PREFIX)
                    .or_else(|| k.strip_prefix(PKCS11_PREVIOUS_PREFIX))
                    .or_else(|| {
                        k.strip_prefix(KMS_PREVIOUS_PREFIX)?
                            .strip_suffix("-ciphertext")
                    })
            })
            .map(str::to_owned)
            .collect(),
        requested: annotations.contains_key(ROTATE_ANNOTATION)
            && annotations.get(ROTATE_ANNOTATION) != annotations.get(ROTATE_HANDLED_ANNOTATION),
        provider: data
            .get(PROVIDER_KEY)
            .map(|p| String::from_utf8_lossy(&p.0).into_owned()),
    }
}

/// The `check` line: the current KEK id, its age, and whether a rotation is running.
pub fn judge(seen: Option<&KekRotationSeen>, now: Timestamp) -> CheckResult {
    const NAME: &str = "KEK rotation";
    let Some(seen) = seen else {
        return CheckResult::pass(
            NAME,
            format!(
                "no Secret {KEK_SECRET}: the operator has not started yet (or runs a release that kept no Secret for an HSM KEK)"
            ),
        );
    };
    let provider = seen.provider.as_deref().unwrap_or("secret");
    let id = seen.id.as_deref().unwrap_or("(not recorded yet)");
    let age = seen.since.map_or_else(
        || "age unknown".to_owned(),
        |since| {
            let days = (now.as_second() - since.as_second()).max(0) / 86_400;
            format!("current for {days} day(s)")
        },
    );
    if seen.staged || !seen.previous.is_empty() || seen.requested {
        let phase = if seen.requested && !seen.staged && seen.previous.is_empty() {
            "requested, not started yet".to_owned()
        } else if seen.staged {
            "a new KEK is staged, waiting for every replica to load it".to_owned()
        } else {
            format!(
                "re-wrapping; previous KEK(s) {} still kept",
                seen.previous.join(", ")
            )
        };
        return CheckResult::warn(NAME, format!("{provider} KEK {id}, {age}; rotation in progress: {phase}"))
            .hint(format!(
                "progress: kubectl get events -n <operator namespace> --field-selector involvedObject.name={KEK_SECRET}"
            ));
    }
    CheckResult::pass(
        NAME,
        format!("{provider} KEK {id}, {age}; no rotation in progress"),
    )
}

/// `check`'s KEK rotation line for `cluster`.
pub async fn check(cluster: &Cluster, now: Timestamp) -> CheckResult {
    let api = Api::<Secret>::namespaced(cluster.client.clone(), &cluster.operator_namespace);
    match api.get_opt(KEK_SECRET).await {
        Ok(secret) => judge(secret.as_ref().map(seen).as_ref(), now),
        Err(e) => CheckResult::warn(
            "KEK rotation",
            format!("cannot read Secret {KEK_SECRET}: {}", CliError::from(e)),
        ),
    }
}

/// `kek rotate`: sets [`ROTATE_ANNOTATION`] to a new value; the operator stages a new
/// KEK, makes it current once every replica has it, and re-wraps every wrapped key.
pub async fn rotate(
    cluster: &Cluster,
    out: &mut dyn Write,
    _err: &mut dyn Write,
) -> Result<Outcome, CliError> {
    let ns = &cluster.operator_namespace;
    let api = Api::<Secret>::namespaced(cluster.client.clone(), ns);
    let Some(secret) = api.get_opt(KEK_SECRET).await? else {
        return Err(CliError::Operator(format!(
            "no Secret {ns}/{KEK_SECRET}: the operator has not started yet; every provider (pkcs11 too, \
             with HSM key labels) keeps its rotation state there once it has"
        )));
    };
    let seen = seen(&secret);
    if seen.staged || !seen.previous.is_empty() {
        return Err(CliError::Operator("a KEK rotation is already in progress (see kubectl portcullis check); run this again when it has completed".to_owned(),
        ));
    }
    let value = Timestamp::now().to_string();
    let patch = serde_json::json!({
        "metadata": {"annotations": {ROTATE_ANNOTATION: value}},
    });
    api.patch(KEK_SECRET, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    writeln!(
        out,
        "KEK rotation requested ({ROTATE_ANNOTATION}={value}); follow it with kubectl portcullis check \
         or kubectl get events -n {ns} --field-selector involvedObject.name={KEK_SECRET}"
    )
    .map_err(|e| CliError::Operator(format!("writing output: {e}")))?;
    Ok(Outcome::Clean)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::check::report::Status;
    use k8s_openapi::ByteString;

    fn secret(annotations: &[(&str, &str)], keys: &[&str]) -> Secret {
        let mut s = Secret::default();
        s.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        );
        s.data = Some(
            keys.iter()
                .map(|k| ((*k).to_owned(), ByteString(vec![0; 32])))
                .collect(),
        );
        s
    }

    #[test]
    fn check_shows_the_id_the_age_and_a_rotation_in_progress() {
        let now: Timestamp = "2027-01-11T00:00:00Z".parse().unwrap();
        let idle = secret(
            &[
                (ID_ANNOTATION, "0123456789abcdef"),
                (CREATED_ANNOTATION, "2027-01-01T00:00:00Z"),
            ],
            &["kek"],
        );
        let result = judge(Some(&seen(&idle)), now);
        assert_eq!(result.status, Status::Pass);
        assert!(
            result.message.contains("0123456789abcdef"),
            "{}",
            result.message
        );
        assert!(result.message.contains("10 day(s)"), "{}", result.message);

        let rewrapping = secret(&[(ID_ANNOTATION, "aa")], &["kek", "kek-previous-bb"]);
        let result = judge(Some(&seen(&rewrapping)), now);
        assert_eq!(result.status, Status::Warn);
        assert!(
            result.message.contains("previous KEK(s) bb"),
            "{}",
            result.message
        );

        let staged = secret(&[], &["kek", "kek-next"]);
        assert!(judge(Some(&seen(&staged)), now).message.contains("staged"));
        let requested = secret(&[(ROTATE_ANNOTATION, "x")], &["kek"]);
        assert!(
            judge(Some(&seen(&requested)), now)
                .message
                .contains("requested")
        );
        let handled = secret(
            &[(ROTATE_ANNOTATION, "x"), (ROTATE_HANDLED_ANNOTATION, "x")],
            &["kek"],
        );
        assert_eq!(judge(Some(&seen(&handled)), now).status, Status::Pass);
        assert!(judge(None, now).message.contains("not started"));
        let pkcs11 = secret(
            &[(ID_ANNOTATION, "ee")],
            &["provider", "pkcs11-key-label", "pkcs11-previous-ff"],
        );
        let result = judge(Some(&seen(&pkcs11)), now);
        assert_eq!(result.status, Status::Warn);
        assert!(
            result.message.contains("previous KEK(s) ff"),
            "{}",
            result.message
        );
        let pkcs11_staged = secret(&[], &["provider", "pkcs11-key-label", "pkcs11-next-label"]);
        assert!(
            judge(Some(&seen(&pkcs11_staged)), now)
                .message
                .contains("staged")
        );
        let kms = secret(
            &[(ID_ANNOTATION, "cc")],
            &[
                "provider",
                "kms-ciphertext",
                "kms-previous-dd-ciphertext",
                "kms-previous-dd-key-id",
            ],
        );
        let result = judge(Some(&seen(&kms)), now);
        assert_eq!(result.status, Status::Warn);
        assert!(
            result.message.contains("previous KEK(s) dd"),
            "{}",
            result.message
        );
        let kms_staged = secret(&[], &["provider", "kms-ciphertext", "kms-next-ciphertext"]);
        assert!(
            judge(Some(&seen(&kms_staged)), now)
                .message
                .contains("staged")
        );
    }
}
