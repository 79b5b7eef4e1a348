//! ApiKeys that are not Active: a pure verdict over the keys of every namespace.
//!
//! Expired and Revoked are states a key reaches by design, not faults of the product:
//! a revoked key is counted, an expired one is a warning (a client may still hold it);
//! a key the operator refused (Invalid) or has not issued within [`ISSUE_GRACE`] is a
//! failure.

use jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use portcullis_crds::{ApiKey, KeyState};

use super::report::{CheckResult, bounded};
use crate::output::short_duration;

/// How long the operator may take to issue a new key before `check` fails.
pub const ISSUE_GRACE: SignedDuration = SignedDuration::from_mins(2);

/// `reason: message` of the key's Ready condition, if it has one.
fn ready_condition(key: &ApiKey) -> Option<String> {
    let condition = key
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")?;
    Some(
        [condition.reason.as_str(), condition.message.as_str()]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(": "),
    )
}

/// The ApiKeys of the cluster: failures for Invalid keys and keys left unissued,
/// warnings for expired ones, one line each with the fix.
pub fn judge(keys: &[ApiKey], now: Timestamp, operator_logs: &str) -> CheckResult {
    const CHECK: &str = "ApiKeys";
    let (mut failures, mut warnings) = (Vec::new(), Vec::new());
    let (mut active, mut issuing, mut revoked) = (0usize, 0usize, 0usize);
    for key in keys {
        let (ns, name) = (key.namespace().unwrap_or_default(), key.name_any());
        let state = key.status.as_ref().map_or(KeyState::Pending, |s| s.state);
        let condition = ready_condition(key)
            .map(|c| format!(" ({c})"))
            .unwrap_or_default();
        let describe = format!("kubectl -n {ns} describe apikey {name}");
        match state {
            KeyState::Active => active += 1,
            KeyState::Revoked => revoked += 1,
            KeyState::Pending => {
                let age = key
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| now.duration_since(t.0));
                match age {
                    Some(age) if age < ISSUE_GRACE => issuing += 1,
                    _ => failures.push(format!(
                        "{ns}/{name}: Pending{}{condition} → the operator issues keys: check it runs, {operator_logs}",
                        age.map(|a| format!(" for {}", short_duration(a)))
                            .unwrap_or_default()
                    )),
                }
            }
            KeyState::Invalid => failures.push(format!(
                "{ns}/{name}: Invalid{condition} → fix spec.role or spec.scopes (or the Role, or the namespace's Tenant) as the reason says: {describe}"
            )),
            KeyState::Expired => warnings.push(format!(
                "{ns}/{name}: Expired{condition} → issue a new token with kubectl portcullis key rotate {name} -n {ns}, or delete the key"
            )),
        }
    }
    let mut notes = Vec::new();
    if issuing > 0 {
        notes.push(format!("{issuing} being issued"));
    }
    if revoked > 0 {
        notes.push(format!("{revoked} revoked"));
    }
    let notes = if notes.is_empty() {
        String::new()
    } else {
        format!("; {}", notes.join(", "))
    };
    let summary = format!("{active} of {} ApiKey(s) Active{notes}", keys.len());
    let problems = failures.len();
    let expired = warnings.len();
    let lines = bounded(failures.into_iter().chain(warnings).collect());
    if problems > 0 {
        CheckResult::fail(
            CHECK,
            format!("{summary}; {problems} invalid or unissued, {expired} expired"),
        )
        .details(lines)
    } else if expired > 0 {
        CheckResult::warn(CHECK, format!("{summary}; {expired} expired")).details(lines)
    } else {
        CheckResult::pass(CHECK, summary)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::check::report::Status;
    use serde_json::json;

    const LOGS: &str = "kubectl -n ps logs deploy/portcullis-operator";

    fn now() -> Timestamp {
        "2026-03-01T12:00:00Z".parse().unwrap()
    }

    fn key(name: &str, created_minutes_ago: i64, status: serde_json::Value) -> ApiKey {
        let created = now() - SignedDuration::from_mins(created_minutes_ago);
        serde_json::from_value(json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiKey",
            "metadata": {"name": name, "namespace": "acme", "creationTimestamp": created.to_string()},
            "spec": {"role": "Developer", "scopes": ["identify"]},
            "status": status
        }))
        .unwrap()
    }

    fn state(state: &str, reason: &str, message: &str) -> serde_json::Value {
        json!({"state": state, "conditions": [{"type": "Ready", "status": "False", "reason": reason,
            "message": message, "lastTransitionTime": "2026-03-01T11:00:00Z"}]})
    }

    #[test]
    fn active_revoked_and_new_keys_pass() {
        let keys = [
            key("ingest", 60, json!({"state": "Active"})),
            key("old", 60, state("Revoked", "Revoked", "the key is revoked")),
            key("fresh", 1, json!(null)),
        ];
        let result = judge(&keys, now(), LOGS);
        assert_eq!(
            (result.status, result.message.as_str()),
            (
                Status::Pass,
                "1 of 3 ApiKey(s) Active; 1 being issued, 1 revoked"
            )
        );
        assert!(result.details.is_empty());
    }

    #[test]
    fn invalid_and_unissued_keys_fail_expired_ones_warn() {
        let expired = key(
            "legacy",
            60,
            state(
                "Expired",
                "Expired",
                "the key expired at 2026-02-01T00:00:00Z; bump spec.rotate to issue a new token",
            ),
        );
        let warned = judge(std::slice::from_ref(&expired), now(), LOGS);
        assert_eq!(warned.status, Status::Warn, "{warned:?}");
        assert_eq!(
            warned.details,
            [
                "acme/legacy: Expired (Expired: the key expired at 2026-02-01T00:00:00Z; bump spec.rotate to issue a new token) \
              → issue a new token with kubectl portcullis key rotate legacy -n acme, or delete the key"
            ]
        );

        let keys = [
            key(
                "wide",
                60,
                state(
                    "Invalid",
                    "ScopeNotInRole",
                    "scope admin is not granted by role Developer",
                ),
            ),
            key("stuck", 7, json!(null)),
            expired,
        ];
        let result = judge(&keys, now(), LOGS);
        assert_eq!(result.status, Status::Fail);
        assert_eq!(
            result.message,
            "0 of 3 ApiKey(s) Active; 2 invalid or unissued, 1 expired"
        );
        assert!(
            result.details[0].starts_with(
                "acme/wide: Invalid (ScopeNotInRole: scope admin is not granted by role Developer) → fix spec.role or spec.scopes"
            ),
            "{result:?}"
        );
        assert_eq!(
            result.details[1],
            "acme/stuck: Pending for 7m → the operator issues keys: check it runs, kubectl -n ps logs deploy/portcullis-operator"
        );
        assert!(result.details[2].starts_with("acme/legacy: Expired"));
    }
}
