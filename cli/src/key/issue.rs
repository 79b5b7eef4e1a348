//! Waiting for the operator: the key's status and its Secret, polled until they agree.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams};
use portcullis_crds::apikey::{SECRET_TOKEN_KEY, secret_name};
use portcullis_crds::conditions::find_ready;
use portcullis_crds::{ApiKey, ApiToken, KeyState};
use tokio::time::Instant;

use crate::error::CliError;

/// Annotation the CLI puts on a key's Secret once it has shown the token: Restricted
/// tenants then delete the plaintext (the operator's contract).
pub const DELIVERED_ANNOTATION: &str = "portcullis.dev/delivered";

const POLL: Duration = Duration::from_millis(250);

/// A key as the operator issued it, with its token from the Secret.
pub struct Issued {
    /// The ApiKey after issue.
    pub key: ApiKey,
    /// The plaintext token. Its `Debug` and `Display` are masked.
    pub token: ApiToken,
}

/// A wait that ends at a deadline.
pub struct Deadline(Instant);

impl Deadline {
    /// `wait` from now.
    pub fn after(wait: Duration) -> Self {
        Self(Instant::now() + wait)
    }

    /// Sleeps one poll interval; false once the deadline has passed.
    pub async fn tick(&self) -> bool {
        let now = Instant::now();
        if now >= self.0 {
            return false;
        }
        tokio::time::sleep(POLL.min(self.0 - now)).await;
        true
    }
}

/// Where to look and who to tell.
pub struct KeyRef<'a> {
    /// ApiKeys of the namespace.
    pub keys: &'a Api<ApiKey>,
    /// Secrets of the namespace.
    pub secrets: &'a Api<Secret>,
    /// Namespace (for messages).
    pub namespace: &'a str,
    /// ApiKey name.
    pub name: &'a str,
    /// The operator's namespace (for hints).
    pub operator_namespace: &'a str,
}

impl KeyRef<'_> {
    /// The ApiKey, or a not-found error naming how to list keys.
    pub async fn get(&self) -> Result<ApiKey, CliError> {
        self.keys.get(self.name).await.map_err(|e| {
            CliError::from_kube(e, || {
                (
                    format!("ApiKey {}/{}", self.namespace, self.name),
                    format!(
                        "list keys with kubectl portcullis key list -n {}",
                        self.namespace
                    ),
                )
            })
        })
    }

    /// The token the key's Secret holds, if the Secret exists.
    pub async fn read_token(&self) -> Result<Option<ApiToken>, CliError> {
        let secret_name = secret_name(self.name);
        let secret = self
            .secrets
            .get_opt(&secret_name)
            .await
            .map_err(CliError::from)?;
        let Some(data) = secret.and_then(|s| s.data) else {
            return Ok(None);
        };
        let Some(bytes) = data.get(SECRET_TOKEN_KEY) else {
            return Ok(None);
        };
        let malformed = |why: String| {
            CliError::Secret(format!(
                "Secret {}/{secret_name} holds a malformed token ({why}); delete the Secret and the operator issues a new one",
                self.namespace
            ))
        };
        let text = std::str::from_utf8(&bytes.0).map_err(|_| malformed("not UTF-8".into()))?;
        ApiToken::parse(text.trim())
            .map(Some)
            .map_err(|e| malformed(e.to_string()))
    }

    /// Polls until the key is Active for `rotation` (a `spec.rotate` value) and its
    /// Secret holds the token the status names.
    pub async fn wait_for_token(&self, rotation: u32, wait: Duration) -> Result<Issued, CliError> {
        let deadline = Deadline::after(wait);
        loop {
            let key = self.get().await?;
            let status = key.status.clone().unwrap_or_default();
            match status.state {
                KeyState::Invalid => {
                    return Err(CliError::Operator(format!(
                        "the operator refused ApiKey {ns}/{name}: {why}\n  fix it with kubectl edit ak {name} -n {ns}, or delete it with kubectl delete ak {name} -n {ns}",
                        ns = self.namespace,
                        name = self.name,
                        why = ready_text(&key),
                    )));
                }
                KeyState::Revoked | KeyState::Expired => {
                    return Err(CliError::Operator(format!(
                        "ApiKey {}/{} is {}, so no token will be issued: {}",
                        self.namespace,
                        self.name,
                        status.state.as_str(),
                        ready_text(&key),
                    )));
                }
                KeyState::Active if status.rotation >= rotation => {
                    if let (Some(key_id), Some(token)) =
                        (status.key_id.as_deref(), self.read_token().await?)
                        && token.key_id().as_str() == key_id
                    {
                        return Ok(Issued { key, token });
                    }
                }
                KeyState::Active | KeyState::Pending => {}
            }
            if !deadline.tick().await {
                return Err(self.not_issued(&key, wait));
            }
        }
    }

    /// Polls until the key reports `state`.
    pub async fn wait_for_state(
        &self,
        state: KeyState,
        wait: Duration,
    ) -> Result<ApiKey, CliError> {
        let deadline = Deadline::after(wait);
        loop {
            let key = self.get().await?;
            if key.status.as_ref().is_some_and(|s| s.state == state) {
                return Ok(key);
            }
            if !deadline.tick().await {
                return Err(CliError::Operator(format!(
                    "the operator did not confirm ApiKey {ns}/{name} as {want} within {wait}: {seen}\n  check with kubectl describe ak {name} -n {ns}\n  and the operator logs: kubectl logs -n {op} deploy/portcullis-operator",
                    ns = self.namespace,
                    name = self.name,
                    want = state.as_str(),
                    wait = humanize(wait),
                    seen = last_seen(&key),
                    op = self.operator_namespace,
                )));
            }
        }
    }

    fn not_issued(&self, key: &ApiKey, wait: Duration) -> CliError {
        CliError::Operator(format!(
            "the operator did not issue ApiKey {ns}/{name} within {wait} ({seen}).\n  The ApiKey exists; find out why with:\n    kubectl describe ak {name} -n {ns}\n    kubectl logs -n {op} deploy/portcullis-operator\n  Once it is issued, read the token with kubectl portcullis key show {name} -n {ns} --reveal",
            ns = self.namespace,
            name = self.name,
            wait = humanize(wait),
            seen = last_seen(key),
            op = self.operator_namespace,
        ))
    }

    /// Tells the operator the token was shown (Restricted tenants then delete it).
    /// Best effort: the token has been printed already, so a failure is only reported.
    pub async fn mark_delivered(&self) -> Result<(), CliError> {
        let patch = serde_json::json!({
            "metadata": {"annotations": {DELIVERED_ANNOTATION: "true"}}
        });
        self.secrets
            .patch(
                &secret_name(self.name),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map(|_| ())
            .map_err(CliError::from)
    }
}

/// `Ready False Pending: waiting for the operator` or `no Ready condition yet`.
pub fn ready_text(key: &ApiKey) -> String {
    key.status
        .as_ref()
        .and_then(|s| find_ready(&s.conditions))
        .map_or_else(
            || "no Ready condition yet".to_owned(),
            |c| format!("Ready={} {}: {}", c.status, c.reason, c.message),
        )
}

fn last_seen(key: &ApiKey) -> String {
    match &key.status {
        None => {
            "it has no status yet: the operator has not processed it; is it running?".to_owned()
        }
        Some(status) => format!(
            "last seen: state {}, {}",
            status.state.as_str(),
            ready_text(key)
        ),
    }
}

fn humanize(d: Duration) -> String {
    portcullis_crds::DurationSpec::new(d).to_string()
}
