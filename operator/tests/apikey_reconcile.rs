//! The ApiKey reconciler against a scripted fake API server: every request it makes is
//! checked (method, path, field manager, body) and nothing else may be sent.

mod fixtures;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use fixtures::{ApiServerVerifier, NS, Seen, api_key, testing_context, with_status};
use http::StatusCode;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use portcullis_crds::{ApiKey, ApiKeyStatus, ApiToken, KeyState};
use portcullis_operator::controller::{apikey, frame};
use portcullis_operator::error::Error;
use serde_json::{Value, json};

const SECRET_PATH: &str = "/api/v1/namespaces/acme-prod/secrets/ingest-key";
const SECRETS_PATH: &str = "/api/v1/namespaces/acme-prod/secrets";
const STATUS_PATH: &str =
    "/apis/portcullis.dev/v1alpha1/namespaces/acme-prod/apikeys/ingest/status";

/// The scripted conversations.
enum Scenario {
    /// A new key: no Secret yet → Secret created → status applied → Event `Issued`.
    IssueFirstToken,
    /// Scope outside the role: status `Invalid` / `ScopeNotInRole` → Warning Event.
    RejectScopeNotInRole,
    /// `spec.revoked`: status `Revoked` → Event `Revoked`; the Secret is left alone.
    Revoke,
    /// The Secret of an issued key was deleted: new token, old one retired → Event.
    RotateAfterSecretDeleted,
}

/// What the scenario saw, for assertions after the reconcile.
#[derive(Default)]
struct Transcript {
    secret: Option<Seen>,
    status: Option<Seen>,
    event: Option<Seen>,
}

fn decode_token(secret: &Value) -> ApiToken {
    let encoded = secret["data"]["token"].as_str().unwrap_or_default();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap_or_else(|e| panic!("token is not base64: {e}"));
    ApiToken::parse(std::str::from_utf8(&bytes).unwrap_or_default())
        .unwrap_or_else(|e| panic!("bad token: {e}"))
}

fn assert_applied_with_field_manager(seen: &Seen) {
    assert_eq!(seen.method, "PATCH");
    assert_eq!(
        seen.content_type, "application/apply-patch+yaml",
        "server-side apply"
    );
    assert!(
        seen.query.contains("fieldManager=portcullis-operator"),
        "{}",
        seen.query
    );
    assert!(seen.query.contains("force=true"), "{}", seen.query);
    assert_eq!(seen.body["apiVersion"], "portcullis.dev/v1alpha1");
    assert_eq!(seen.body["kind"], "ApiKey");
}

impl ApiServerVerifier {
    fn run(mut self, scenario: Scenario, key: ApiKey) -> tokio::task::JoinHandle<Transcript> {
        tokio::spawn(async move {
            let mut t = Transcript::default();
            match scenario {
                Scenario::IssueFirstToken => {
                    self.expect_not_found("GET", SECRET_PATH).await;
                    t.secret = Some(
                        self.expect_echo("POST", SECRETS_PATH, StatusCode::CREATED)
                            .await,
                    );
                    t.status = Some(
                        self.expect("PATCH", STATUS_PATH, StatusCode::OK, |s| {
                            with_status(&key, s)
                        })
                        .await,
                    );
                    t.event = Some(self.expect_event(NS).await);
                }
                Scenario::RejectScopeNotInRole => {
                    self.expect_not_found("GET", SECRET_PATH).await;
                    t.status = Some(
                        self.expect("PATCH", STATUS_PATH, StatusCode::OK, |s| {
                            with_status(&key, s)
                        })
                        .await,
                    );
                    t.event = Some(self.expect_event(NS).await);
                }
                Scenario::Revoke => {
                    self.expect("GET", SECRET_PATH, StatusCode::OK, |_| {
                        existing_secret(&key)
                    })
                    .await;
                    t.status = Some(
                        self.expect("PATCH", STATUS_PATH, StatusCode::OK, |s| {
                            with_status(&key, s)
                        })
                        .await,
                    );
                    t.event = Some(self.expect_event(NS).await);
                }
                Scenario::RotateAfterSecretDeleted => {
                    self.expect_not_found("GET", SECRET_PATH).await;
                    t.secret = Some(
                        self.expect_echo("POST", SECRETS_PATH, StatusCode::CREATED)
                            .await,
                    );
                    t.status = Some(
                        self.expect("PATCH", STATUS_PATH, StatusCode::OK, |s| {
                            with_status(&key, s)
                        })
                        .await,
                    );
                    t.event = Some(self.expect_event(NS).await);
                }
            }
            self.expect_nothing_more().await;
            t
        })
    }
}

fn existing_secret(key: &ApiKey) -> Value {
    let status = key.status.clone().unwrap_or_default();
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {
            "name": "ingest-key", "namespace": NS, "resourceVersion": "7",
            "annotations": {"portcullis.dev/key-id": status.key_id},
            "ownerReferences": [{
                "apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiKey", "name": "ingest",
                "uid": key.metadata.uid, "controller": true, "blockOwnerDeletion": true
            }]
        },
        "type": "portcullis.dev/api-key",
        "data": {"token": "c2VjcmV0"}
    })
}

fn issued_key(key_id: &str, hash: &str) -> ApiKey {
    let mut key = api_key("ingest", "Developer", &["identify"]);
    key.status = Some(ApiKeyStatus {
        state: KeyState::Active,
        key_id: Some(key_id.into()),
        prefix: Some(format!("ak_{key_id}")),
        hash: Some(hash.into()),
        issued_at: Some(Time(fixtures::now())),
        expires_at: Some(Time(
            fixtures::now() + jiff::SignedDuration::from_hours(24 * 90),
        )),
        secret_name: Some("ingest-key".into()),
        ..ApiKeyStatus::default()
    });
    key
}

async fn reconcile_with(
    scenario: Scenario,
    key: ApiKey,
) -> (Result<kube::runtime::controller::Action, Error>, Transcript) {
    let (ctx, verifier, _writers) = testing_context();
    let script = verifier.run(scenario, key.clone());
    let result = tokio::time::timeout(
        Duration::from_secs(20),
        apikey::reconcile(Arc::new(key), ctx),
    )
    .await
    .unwrap_or_else(|_| panic!("reconcile hung: it sent a request the script does not answer"));
    let transcript = script
        .await
        .unwrap_or_else(|e| panic!("script failed: {e}"));
    (result, transcript)
}

#[tokio::test]
async fn issue_writes_the_token_once_and_only_its_hash_in_status() {
    let key = api_key("ingest", "Developer", &["identify", "events"]);
    let (result, t) = reconcile_with(Scenario::IssueFirstToken, key).await;
    let action = result.unwrap_or_else(|e| panic!("reconcile failed: {e}"));
    // Requeued for the expiry (90 days) capped at the hourly resync.
    assert!(format!("{action:?}").contains("3600"), "{action:?}");

    let secret = t.secret.map(|s| s.body).unwrap_or_default();
    assert_eq!(secret["type"], "portcullis.dev/api-key");
    assert_eq!(secret["metadata"]["name"], "ingest-key");
    let owner = &secret["metadata"]["ownerReferences"][0];
    assert_eq!(
        (owner["kind"].as_str(), owner["uid"].as_str()),
        (Some("ApiKey"), Some("ingest-uid"))
    );
    assert_eq!(owner["controller"], true);
    let token = decode_token(&secret);
    assert_eq!(
        secret["metadata"]["annotations"]["portcullis.dev/key-id"],
        token.key_id().as_str()
    );

    let status_seen = t.status.unwrap_or_else(|| panic!("no status"));
    assert_applied_with_field_manager(&status_seen);
    let status: ApiKeyStatus =
        serde_json::from_value(status_seen.body["status"].clone()).unwrap_or_default();
    assert_eq!(status.state, KeyState::Active);
    assert_eq!(status.key_id.as_deref(), Some(token.key_id().as_str()));
    assert_eq!(status.prefix, Some(format!("ak_{}", token.key_id())));
    assert!(
        token.verify(status.hash.as_deref().unwrap_or_default()),
        "status hash verifies the Secret's token"
    );
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.issued_at, Some(Time(fixtures::now())));
    let ready = &status.conditions[0];
    assert_eq!(
        (
            ready.type_.as_str(),
            ready.status.as_str(),
            ready.reason.as_str()
        ),
        ("Ready", "True", "Issued")
    );
    assert!(
        !status_seen.body.to_string().contains(token.expose_secret()),
        "the plaintext never reaches the status"
    );

    let event = t.event.map(|s| s.body).unwrap_or_default();
    assert_eq!(event["reason"], "Issued");
    assert_eq!(event["type"], "Normal");
    assert!(
        !event.to_string().contains(token.expose_secret()),
        "nor an Event"
    );
}

#[tokio::test]
async fn scope_not_in_role_is_reported_and_counted() {
    let key = api_key("ingest", "Viewer", &["identify"]);
    let (ctx, verifier, _writers) = testing_context();
    let script = verifier.run(Scenario::RejectScopeNotInRole, key.clone());
    let result = apikey::reconcile(Arc::new(key.clone()), ctx.clone()).await;
    let t = script.await.unwrap_or_else(|e| panic!("{e}"));
    let error = result
        .err()
        .unwrap_or_else(|| panic!("an invalid key reconciled Ok"));
    assert_eq!(error.metric_label(), "ScopeNotInRole");

    let status: ApiKeyStatus = serde_json::from_value(
        t.status
            .map(|s| s.body["status"].clone())
            .unwrap_or_default(),
    )
    .unwrap_or_default();
    assert_eq!(status.state, KeyState::Invalid);
    assert!(status.hash.is_none(), "no token for an invalid key");
    let ready = &status.conditions[0];
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "ScopeNotInRole")
    );
    assert!(
        ready.message.contains("identify") && ready.message.contains("Viewer"),
        "{}",
        ready.message
    );
    let event = t.event.map(|s| s.body).unwrap_or_default();
    assert_eq!(
        (event["type"].as_str(), event["reason"].as_str()),
        (Some("Warning"), Some("ScopeNotInRole"))
    );

    // The error policy counts it under the variant name and backs off.
    let action = frame::error_policy(Arc::new(key), &error, ctx.clone());
    assert!(format!("{action:?}").contains("1s"), "{action:?}");
    let metrics = ctx.metrics.encode();
    assert!(
        metrics.contains(r#"portcullis_operator_reconcile_failures_total{kind="ApiKey",error="ScopeNotInRole"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn revocation_sets_state_and_keeps_only_public_data() {
    let mut key = issued_key(
        "aaaaaaaaaaaa",
        "$2b$04$abcdefghijklmnopqrstuu1234567890123456789012345678901",
    );
    key.spec.revoked = true;
    let (result, t) = reconcile_with(Scenario::Revoke, key).await;
    assert!(result.is_ok(), "{result:?}");
    let status: ApiKeyStatus = serde_json::from_value(
        t.status
            .map(|s| s.body["status"].clone())
            .unwrap_or_default(),
    )
    .unwrap_or_default();
    assert_eq!(status.state, KeyState::Revoked);
    assert_eq!(status.key_id.as_deref(), Some("aaaaaaaaaaaa"));
    assert_eq!(status.conditions[0].reason, "Revoked");
    assert_eq!(
        t.event.map(|s| s.body["reason"].clone()),
        Some(json!("Revoked"))
    );
}

#[tokio::test]
async fn deleted_secret_means_a_new_token_and_the_old_one_retired() {
    let old = ApiToken::generate();
    let old_hash = old.hash(4).unwrap_or_default();
    let key = issued_key(old.key_id().as_str(), &old_hash);
    let (result, t) = reconcile_with(Scenario::RotateAfterSecretDeleted, key).await;
    assert!(result.is_ok(), "{result:?}");
    let token = decode_token(&t.secret.map(|s| s.body).unwrap_or_default());
    assert_ne!(token.key_id(), old.key_id());
    let status: ApiKeyStatus = serde_json::from_value(
        t.status
            .map(|s| s.body["status"].clone())
            .unwrap_or_default(),
    )
    .unwrap_or_default();
    assert_eq!(status.key_id.as_deref(), Some(token.key_id().as_str()));
    assert_eq!(status.previous_keys.len(), 1);
    assert_eq!(status.previous_keys[0].key_id, old.key_id().as_str());
    assert_eq!(
        status.previous_keys[0].valid_until,
        Time(fixtures::now() + jiff::SignedDuration::from_hours(1)),
        "default overlap 1h"
    );
    let ready = &status.conditions[0];
    assert!(
        ready.message.contains("ingest-key was deleted"),
        "{}",
        ready.message
    );
    let event = t.event.map(|s| s.body).unwrap_or_default();
    assert_eq!(
        (event["type"].as_str(), event["reason"].as_str()),
        (Some("Warning"), Some("SecretReplaced"))
    );
    assert!(
        event["note"]
            .as_str()
            .unwrap_or_default()
            .contains("was deleted")
    );
}
