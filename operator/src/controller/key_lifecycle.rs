//! The life of an ApiKey as pure functions: from what the reconciler observed (the key,
//! its tenant and roles, its Secret, the time) to a [`Verdict`], and from a verdict to
//! the full status to apply. No I/O here, so every transition is unit-tested.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use portcullis_crds::{
    ApiKey, ApiKeyStatus, DataClassification, KeyState, Tenant,
    apikey::{RetiredKey, secret_name},
    conditions,
    role::{self, RoleSpec, role_object_name},
};

use crate::clock;
use crate::error::Error;

/// Annotation on a key's Secret: the key id of the token it holds.
pub const SECRET_KEY_ID_ANNOTATION: &str = "portcullis.dev/key-id";
/// Annotation the CLI puts on a key's Secret once it has shown the token to its owner.
pub const DELIVERED_ANNOTATION: &str = "portcullis.dev/delivered";
/// Annotation the operator puts on an ApiKey after removing a delivered plaintext
/// Secret (Restricted tenants): the key id whose Secret is gone on purpose.
pub const PLAINTEXT_REMOVED_ANNOTATION: &str = "portcullis.dev/plaintext-removed";
/// Label on a key's Secret: the ApiKey name (the Secret watch selects on it).
pub const SECRET_LABEL: &str = "portcullis.dev/api-key";

/// What the reconciler found of the key's Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretObservation {
    /// No Secret `<name>-key`.
    Missing,
    /// The Secret exists.
    Present {
        /// Its `portcullis.dev/key-id` annotation.
        key_id: Option<String>,
        /// Whether this ApiKey owns it.
        owned: bool,
        /// Whether the CLI acknowledged delivery.
        delivered: bool,
    },
}

/// Why a new token is issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IssueReason {
    /// The key never had one.
    First,
    /// `spec.rotate` moved.
    Rotation,
    /// The Secret holding the plaintext was deleted.
    SecretDeleted,
    /// The Secret holds a token the status does not know (an interrupted issue).
    SecretMismatch,
    /// `spec.revoked` went back to false: a revoked token never comes back.
    Unrevoked,
}

/// What the key needs.
#[derive(Debug)]
pub enum Verdict {
    /// Its content is invalid; the error names why (and is the condition reason).
    Rejected(Error),
    /// Revoked by its spec.
    Revoked,
    /// Past `expiresAt`.
    Expired {
        /// When it expired.
        at: Timestamp,
    },
    /// A new token must be issued.
    Issue(IssueReason),
    /// Restricted tenant, delivery acknowledged: remove the plaintext Secret.
    RemovePlaintext,
    /// Active and in order.
    Keep {
        /// Its expiry.
        expires_at: Timestamp,
    },
}

/// Everything [`judge`] looks at.
#[derive(Debug)]
pub struct Observed<'a> {
    /// The ApiKey.
    pub key: &'a ApiKey,
    /// The Tenant that bound its namespace.
    pub tenant: Option<&'a Tenant>,
    /// The Roles of its namespace, by object name.
    pub roles: &'a BTreeMap<String, RoleSpec>,
    /// Its Secret.
    pub secret: SecretObservation,
    /// Now.
    pub now: Timestamp,
}

/// The key's expiry for a token issued at `issued_at` (spec, else the tenant default).
pub fn expiry(key: &ApiKey, tenant: &Tenant, issued_at: Timestamp) -> Timestamp {
    key.spec.expiry(issued_at, tenant.spec.defaults.key_expiry)
}

/// Checks the key against its tenant and role (DESIGN.md §2: scopes ⊆ role's, and in
/// the catalogue), then decides what its token needs.
pub fn judge(o: &Observed<'_>) -> Verdict {
    let key = o.key;
    let namespace = key.metadata.namespace.clone().unwrap_or_default();
    let Some(tenant) = o.tenant else {
        return Verdict::Rejected(Error::TenantNotFound { namespace });
    };
    if let Err(errors) = key.spec.validate() {
        return Verdict::Rejected(Error::InvalidSpec(errors));
    }
    let role_ref = &key.spec.role;
    if !o.roles.contains_key(&role_object_name(role_ref)) {
        return Verdict::Rejected(Error::UnknownRole {
            role: role_ref.clone(),
            namespace,
        });
    }
    let effective = match role::resolve(role_ref, o.roles) {
        Ok(effective) => effective,
        Err(e) => {
            return Verdict::Rejected(Error::RoleNotResolved {
                role: role_ref.clone(),
                reason: e.to_string(),
            });
        }
    };
    for scope in &key.spec.scopes {
        if !effective.grants_scope(scope.as_str()) {
            return Verdict::Rejected(Error::ScopeNotInRole {
                scope: scope.to_string(),
                role: role_ref.clone(),
            });
        }
        if !tenant.spec.scopes.contains_key(scope.as_str()) {
            return Verdict::Rejected(Error::UnknownScope {
                scope: scope.to_string(),
                tenant: tenant.metadata.name.clone().unwrap_or_default(),
            });
        }
    }
    if let SecretObservation::Present { owned: false, .. } = o.secret {
        return Verdict::Rejected(Error::SecretNotOwned {
            secret: secret_name(key.metadata.name.as_deref().unwrap_or_default()),
        });
    }
    if key.spec.revoked {
        return Verdict::Revoked;
    }
    let status = key.status.clone().unwrap_or_default();
    let (Some(key_id), Some(_), Some(issued_at)) =
        (&status.key_id, &status.hash, &status.issued_at)
    else {
        return Verdict::Issue(IssueReason::First);
    };
    if status.state == KeyState::Revoked {
        return Verdict::Issue(IssueReason::Unrevoked);
    }
    if key.spec.rotate != status.rotation {
        return Verdict::Issue(IssueReason::Rotation);
    }
    let expires_at = expiry(key, tenant, issued_at.0);
    if expires_at <= o.now {
        return Verdict::Expired { at: expires_at };
    }
    match &o.secret {
        SecretObservation::Missing => {
            let removed_on_purpose = key
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(PLAINTEXT_REMOVED_ANNOTATION))
                .is_some_and(|id| id == key_id);
            if removed_on_purpose {
                Verdict::Keep { expires_at }
            } else {
                Verdict::Issue(IssueReason::SecretDeleted)
            }
        }
        SecretObservation::Present { key_id: held, .. }
            if held.as_deref() != Some(key_id.as_str()) =>
        {
            Verdict::Issue(IssueReason::SecretMismatch)
        }
        SecretObservation::Present {
            delivered: true, ..
        } if tenant.spec.data_classification == DataClassification::Restricted => {
            Verdict::RemovePlaintext
        }
        SecretObservation::Present { .. } => Verdict::Keep { expires_at },
    }
}

/// The public part of a freshly issued token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedToken {
    /// Key id.
    pub key_id: String,
    /// bcrypt hash.
    pub hash: String,
    /// When it expires.
    pub expires_at: Timestamp,
}

/// The full status after acting on `verdict` (`issued` is set for [`Verdict::Issue`]).
pub fn next_status(
    key: &ApiKey,
    verdict: &Verdict,
    issued: Option<&IssuedToken>,
    overlap: Duration,
    now: Timestamp,
) -> ApiKeyStatus {
    let prev = key.status.clone().unwrap_or_default();
    let generation = key.metadata.generation;
    let name = key.metadata.name.clone().unwrap_or_default();
    let mut status = ApiKeyStatus {
        observed_generation: generation,
        secret_name: Some(secret_name(&name)),
        ..prev.clone()
    };
    status.previous_keys.retain(|k| k.valid_until.0 > now);
    let prefix = |id: &str| format!("ak_{id}");
    let ready = |ok: bool, reason: &str, message: String| -> Vec<Condition> {
        vec![conditions::ready(
            ok,
            reason,
            message,
            generation,
            &prev.conditions,
            Time(now),
        )]
    };
    match verdict {
        Verdict::Rejected(error) => {
            status.state = KeyState::Invalid;
            status.conditions = ready(false, error.metric_label(), error.to_string());
        }
        Verdict::Revoked => {
            status.state = KeyState::Revoked;
            status.previous_keys.clear();
            status.conditions = ready(
                false,
                "Revoked",
                "the key is revoked; every sidecar refuses it".into(),
            );
        }
        Verdict::Expired { at } => {
            status.state = KeyState::Expired;
            status.expires_at = Some(Time(*at));
            status.previous_keys.clear();
            status.conditions = ready(
                false,
                "Expired",
                format!("the key expired at {at}; bump spec.rotate to issue a new token"),
            );
        }
        Verdict::Issue(reason) => {
            if let Some(token) = issued {
                // The token being replaced stays valid for the overlap, unless it was revoked.
                let retire = !matches!(reason, IssueReason::First | IssueReason::Unrevoked)
                    && prev.state == KeyState::Active;
                if let (true, Some(id), Some(hash)) =
                    (retire, prev.key_id.clone(), prev.hash.clone())
                {
                    let old_expiry = prev.expires_at.as_ref().map_or(Timestamp::MAX, |t| t.0);
                    let valid_until = clock::add(now, overlap).min(old_expiry);
                    if valid_until > now {
                        status.previous_keys.push(RetiredKey {
                            key_id: id,
                            hash,
                            valid_until: Time(valid_until),
                        });
                    }
                }
                status.state = KeyState::Active;
                status.key_id = Some(token.key_id.clone());
                status.prefix = Some(prefix(&token.key_id));
                status.hash = Some(token.hash.clone());
                status.issued_at = Some(Time(now));
                status.expires_at = Some(Time(token.expires_at));
                status.rotation = key.spec.rotate;
                let p = prefix(&token.key_id);
                let (reason_text, message) = match reason {
                    IssueReason::First => (
                        "Issued",
                        format!("token {p} issued into Secret {}", secret_name(&name)),
                    ),
                    IssueReason::Rotation => ("Rotated", format!("rotated to token {p}")),
                    IssueReason::SecretDeleted => (
                        "Rotated",
                        format!(
                            "Secret {} was deleted, so the key was rotated: new token {p}",
                            secret_name(&name)
                        ),
                    ),
                    IssueReason::SecretMismatch => (
                        "Rotated",
                        format!(
                            "Secret {} did not match the status; new token {p}",
                            secret_name(&name)
                        ),
                    ),
                    IssueReason::Unrevoked => (
                        "Issued",
                        format!(
                            "revocation lifted: new token {p} (the revoked token stays refused)"
                        ),
                    ),
                };
                status.conditions = ready(true, reason_text, message);
            }
        }
        Verdict::RemovePlaintext => {
            status.state = KeyState::Active;
            status.conditions = ready(
                true,
                "Delivered",
                format!(
                    "token {} was delivered; its plaintext Secret is removed (Restricted tenant)",
                    prefix(prev.key_id.as_deref().unwrap_or_default())
                ),
            );
        }
        Verdict::Keep { expires_at } => {
            status.state = KeyState::Active;
            status.expires_at = Some(Time(*expires_at));
            // Keep the message of the last issue (it may say why the key was rotated).
            let keep_previous = conditions::find_ready(&prev.conditions)
                .is_some_and(|c| c.status == "True" && prev.state == KeyState::Active);
            if keep_previous {
                status.conditions = prev
                    .conditions
                    .iter()
                    .filter(|c| c.type_ == conditions::READY)
                    .map(|c| Condition {
                        observed_generation: generation,
                        ..c.clone()
                    })
                    .collect();
            } else {
                let p = prefix(prev.key_id.as_deref().unwrap_or_default());
                status.conditions = ready(
                    true,
                    "Active",
                    format!("token {p} is active until {expires_at}"),
                );
            }
        }
    }
    status
}

/// When the key next needs attention by itself: its expiry or the end of an overlap.
pub fn next_wakeup(status: &ApiKeyStatus) -> Option<Timestamp> {
    if status.state != KeyState::Active {
        return None;
    }
    let overlaps = status.previous_keys.iter().map(|k| k.valid_until.0);
    status
        .expires_at
        .as_ref()
        .map(|t| t.0)
        .into_iter()
        .chain(overlaps)
        .min()
}

#[cfg(test)]
#[path = "key_lifecycle_tests.rs"]
mod tests;
