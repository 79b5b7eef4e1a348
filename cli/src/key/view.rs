//! How keys are shown: the `key show` report, the `key list` table and the receipt
//! printed with a new token.

use jiff::Timestamp;
use kube::ResourceExt;
use portcullis_crds::ApiKey;
use portcullis_crds::conditions::find_ready;
use serde::Serialize;

use crate::output::{Table, age, relative, render_fields, timestamp_relative};

/// The Ready condition, flattened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReadyView {
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// CamelCase reason.
    pub reason: String,
    /// What a person should know.
    pub message: String,
}

/// A token still accepted during a rotation overlap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PreviousKeyView {
    /// `ak_<keyid>`.
    pub key_prefix: String,
    /// When it stops being accepted.
    pub valid_until: Timestamp,
}

/// Everything `key show` tells about a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyReport {
    /// ApiKey name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Role.
    pub role: String,
    /// Scopes granted.
    pub scopes: Vec<String>,
    /// Lifecycle state.
    pub state: String,
    /// `ak_<keyid>` once issued.
    pub key_prefix: Option<String>,
    /// When the current token was issued.
    pub issued_at: Option<Timestamp>,
    /// When it expires.
    pub expires_at: Option<Timestamp>,
    /// `1000/1m burst 100`, or None for the tenant's default.
    pub rate_limit: Option<String>,
    /// CIDRs (empty: any the tenant allows).
    pub ip_allowlist: Vec<String>,
    /// Whether `spec.revoked` is set.
    pub revoked: bool,
    /// `spec.rotate`.
    pub rotation: u32,
    /// The Ready condition.
    pub ready: Option<ReadyView>,
    /// Previous tokens inside their overlap.
    pub previous_keys: Vec<PreviousKeyView>,
    /// The plaintext token: only with `--reveal`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// `ak_<keyid>` from the status.
pub fn key_prefix(key: &ApiKey) -> Option<String> {
    let status = key.status.as_ref()?;
    status
        .prefix
        .clone()
        .or_else(|| status.key_id.as_ref().map(|id| format!("ak_{id}")))
}

impl KeyReport {
    /// The report of `key` (without token).
    pub fn of(key: &ApiKey) -> Self {
        let status = key.status.clone().unwrap_or_default();
        Self {
            name: key.name_any(),
            namespace: key.namespace().unwrap_or_default(),
            role: key.spec.role.clone(),
            scopes: key
                .spec
                .scopes
                .iter()
                .map(|s| s.as_str().to_owned())
                .collect(),
            state: status.state.as_str().to_owned(),
            key_prefix: key_prefix(key),
            issued_at: status.issued_at.as_ref().map(|t| t.0),
            expires_at: status.expires_at.as_ref().map(|t| t.0),
            rate_limit: key
                .spec
                .rate_limit
                .as_ref()
                .map(|r| format!("{}/{} burst {}", r.requests, r.per, r.effective_burst())),
            ip_allowlist: key
                .spec
                .ip_allowlist
                .iter()
                .map(|c| c.as_str().to_owned())
                .collect(),
            revoked: key.spec.revoked,
            rotation: key.spec.rotate,
            ready: find_ready(&status.conditions).map(|c| ReadyView {
                status: c.status.clone(),
                reason: c.reason.clone(),
                message: c.message.clone(),
            }),
            previous_keys: status
                .previous_keys
                .iter()
                .map(|p| PreviousKeyView {
                    key_prefix: format!("ak_{}", p.key_id),
                    valid_until: p.valid_until.0,
                })
                .collect(),
            token: None,
        }
    }

    /// The `kubectl describe`-style block.
    pub fn render(&self, now: Timestamp) -> String {
        let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
        let mut fields = vec![
            ("Name", self.name.clone()),
            ("Namespace", self.namespace.clone()),
            ("Role", self.role.clone()),
            ("Scopes", self.scopes.join(", ")),
            ("State", self.state.clone()),
            ("Key", or_dash(self.key_prefix.clone())),
            (
                "Issued",
                or_dash(self.issued_at.map(|t| timestamp_relative(t, now))),
            ),
            (
                "Expires",
                or_dash(self.expires_at.map(|t| timestamp_relative(t, now))),
            ),
            (
                "Rate limit",
                self.rate_limit
                    .clone()
                    .unwrap_or_else(|| "tenant default".to_owned()),
            ),
            (
                "IP allowlist",
                if self.ip_allowlist.is_empty() {
                    "any the tenant allows".to_owned()
                } else {
                    self.ip_allowlist.join(", ")
                },
            ),
            (
                "Ready",
                self.ready.as_ref().map_or_else(
                    || "no condition yet".to_owned(),
                    |r| format!("{} {}: {}", r.status, r.reason, r.message),
                ),
            ),
        ];
        for previous in &self.previous_keys {
            fields.push((
                "Previous key",
                format!(
                    "{} accepted until {}",
                    previous.key_prefix,
                    timestamp_relative(previous.valid_until, now)
                ),
            ));
        }
        fields.push((
            "Token",
            self.token
                .clone()
                .unwrap_or_else(|| "(hidden; --reveal prints it)".to_owned()),
        ));
        render_fields(&fields)
    }
}

/// The `key list` table (`kubectl get ak` columns with the state).
pub fn list_table(keys: &[ApiKey], all_namespaces: bool, now: Timestamp) -> Table {
    let mut header = vec!["NAME", "ROLE", "SCOPES", "KEY", "STATE", "EXPIRES", "AGE"];
    if all_namespaces {
        header.insert(0, "NAMESPACE");
    }
    let mut table = Table::new(header);
    for key in keys {
        let status = key.status.clone().unwrap_or_default();
        let mut row = vec![
            key.name_any(),
            key.spec.role.clone(),
            key.spec
                .scopes
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(","),
            key_prefix(key).unwrap_or_else(|| "-".to_owned()),
            status.state.as_str().to_owned(),
            status
                .expires_at
                .as_ref()
                .map_or_else(|| "-".to_owned(), |t| relative(t.0, now)),
            age(key.metadata.creation_timestamp.as_ref(), now),
        ];
        if all_namespaces {
            row.insert(0, key.namespace().unwrap_or_default());
        }
        table.push(row);
    }
    table
}

/// What `key create` and `key rotate` print as structured output.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedReport {
    /// ApiKey name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// `ak_<keyid>`.
    pub key_prefix: Option<String>,
    /// Role.
    pub role: String,
    /// Scopes.
    pub scopes: Vec<String>,
    /// Issue time.
    pub issued_at: Option<Timestamp>,
    /// Expiry.
    pub expires_at: Option<Timestamp>,
    /// After a rotation: the previous token and when it stops working.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_key: Option<PreviousKeyView>,
    /// The plaintext token, shown this once.
    pub token: String,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use portcullis_crds::apikey::RetiredKey;
    use portcullis_crds::{ApiKeySpec, ApiKeyStatus, Cidr, KeyState, ScopeName};

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn key() -> ApiKey {
        let mut key = ApiKey::new(
            "ingest",
            ApiKeySpec {
                role: "Developer".into(),
                scopes: vec![
                    ScopeName::new("identify").unwrap(),
                    ScopeName::new("events").unwrap(),
                ],
                ip_allowlist: vec![Cidr::new("10.0.0.0/8")],
                ..ApiKeySpec::default()
            },
        );
        key.metadata.namespace = Some("acme".into());
        key.metadata.creation_timestamp = Some(Time(at(1_000_000)));
        key.status = Some(ApiKeyStatus {
            state: KeyState::Active,
            key_id: Some("abcdefghijkl".into()),
            issued_at: Some(Time(at(1_000_000))),
            expires_at: Some(Time(at(1_000_000 + 90 * 86_400))),
            previous_keys: vec![RetiredKey {
                key_id: "mnopqrstuvwx".into(),
                hash: "$2b$".into(),
                valid_until: Time(at(1_000_000 + 86_400)),
            }],
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: "Issued".into(),
                message: "token issued".into(),
                observed_generation: None,
                last_transition_time: Time(at(1_000_000)),
            }],
            ..ApiKeyStatus::default()
        });
        key
    }

    #[test]
    fn show_hides_the_token_unless_revealed() {
        let report = KeyReport::of(&key());
        let text = report.render(at(1_000_000 + 3600));
        assert!(text.contains("Key:           ak_abcdefghijkl\n"), "{text}");
        assert!(text.contains("Scopes:        identify, events\n"), "{text}");
        assert!(
            text.contains("Expires:       1970-04-12T13:46:40Z (in 89d)\n"),
            "{text}"
        );
        assert!(text.contains("Rate limit:    tenant default\n"), "{text}");
        assert!(
            text.contains("Ready:         True Issued: token issued\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "Previous key:  ak_mnopqrstuvwx accepted until 1970-01-13T13:46:40Z (in 23h)\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("Token:         (hidden; --reveal prints it)\n"),
            "{text}"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert!(json.get("token").is_none());
        assert_eq!(json["keyPrefix"], "ak_abcdefghijkl");
    }

    #[test]
    fn list_shows_state_and_relative_expiry() {
        let mut pending = ApiKey::new(
            "new",
            ApiKeySpec {
                role: "Viewer".into(),
                ..ApiKeySpec::default()
            },
        );
        pending.metadata.namespace = Some("other".into());
        let table = list_table(&[key(), pending], true, at(1_000_000 + 86_400));
        assert_eq!(
            table.render(),
            "NAMESPACE   NAME     ROLE        SCOPES            KEY               STATE     EXPIRES   AGE\n\
             acme        ingest   Developer   identify,events   ak_abcdefghijkl   Active    in 89d    24h\n\
             other       new      Viewer                        -                 Pending   -         <unknown>\n"
        );
    }
}
