//! ApiKey controller: issue, rotate, expire (requeue at expiry), revoke. The decisions
//! are in [`key_lifecycle`](super::key_lifecycle); this module reads what they need and
//! carries them out: the token Secret, the status (server-side apply), Events.
//!
//! The plaintext token exists only in memory between generation and the Secret write;
//! the status, logs, Events and errors see the key id and bcrypt hash only.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use portcullis_crds::{
    ApiKey, ApiKeyStatus, ApiToken,
    annotations::FIELD_MANAGER,
    apikey::{SECRET_TOKEN_KEY, SECRET_TYPE, secret_name},
    tenant::TENANT_LABEL,
};

use super::frame;
use super::key_lifecycle::{
    DELIVERED_ANNOTATION, IssueReason, IssuedToken, Observed, PLAINTEXT_REMOVED_ANNOTATION,
    SECRET_KEY_ID_ANNOTATION, SECRET_LABEL, SecretObservation, Verdict, expiry, judge, next_status,
    next_wakeup,
};
use crate::clock;
use crate::context::Context;
use crate::error::{Error, Result};

/// Reconciles one ApiKey.
pub async fn reconcile(key: Arc<ApiKey>, ctx: Arc<Context>) -> Result<Action> {
    frame::reconcile(key, ctx, |key, ctx| async move {
        KeyReconciler::new(&key, &ctx)?.reconcile().await
    })
    .await
}

/// The business logic for one ApiKey, with what it needs at hand.
struct KeyReconciler<'a> {
    key: &'a ApiKey,
    ctx: &'a Context,
    name: String,
    namespace: String,
    keys: Api<ApiKey>,
    secrets: Api<Secret>,
}

impl<'a> KeyReconciler<'a> {
    fn new(key: &'a ApiKey, ctx: &'a Context) -> Result<Self> {
        let name = key
            .metadata
            .name
            .clone()
            .ok_or(Error::MissingObjectKey("name"))?;
        let namespace = key
            .metadata
            .namespace
            .clone()
            .ok_or(Error::MissingObjectKey("namespace"))?;
        Ok(Self {
            key,
            ctx,
            keys: Api::namespaced(ctx.client.clone(), &namespace),
            secrets: Api::namespaced(ctx.client.clone(), &namespace),
            name,
            namespace,
        })
    }

    async fn reconcile(&self) -> Result<Action> {
        if self.key.metadata.deletion_timestamp.is_some() {
            // The Secret is owned by the key: garbage collection removes it.
            return Ok(Action::await_change());
        }
        let now = self.ctx.clock.now();
        let tenant = self.ctx.stores.tenant_of_namespace(&self.namespace);
        let mut roles = self.ctx.stores.roles_in(&self.namespace);
        super::role::complete_from_api(
            &self.ctx.client,
            &self.namespace,
            &mut roles,
            &self.key.spec.role,
        )
        .await?;
        // Outside a bound namespace the key is rejected whatever its Secret holds, and
        // the operator may not read Secrets there.
        let secret = match tenant {
            Some(_) => self.secrets.get_opt(&secret_name(&self.name)).await?,
            None => None,
        };
        let observation = self.observe(secret.as_ref());
        let verdict = judge(&Observed {
            key: self.key,
            tenant: tenant.as_deref(),
            roles: &roles,
            secret: observation,
            now,
        });

        let issued = match &verdict {
            Verdict::Issue(_) => {
                let tenant = tenant.as_deref().ok_or_else(|| Error::TenantNotFound {
                    namespace: self.namespace.clone(),
                })?;
                Some(
                    self.issue(secret.as_ref(), expiry(self.key, tenant, now))
                        .await?,
                )
            }
            Verdict::RemovePlaintext => {
                self.remove_plaintext(secret.as_ref()).await?;
                None
            }
            _ => None,
        };
        let status = next_status(
            self.key,
            &verdict,
            issued.as_ref(),
            self.ctx.settings.key_rotation_overlap,
            now,
        );
        self.apply_status(&status).await?;
        self.announce(&verdict, &status).await;

        match verdict {
            Verdict::Rejected(error) => Err(error),
            _ => {
                let resync = self.ctx.settings.resync;
                let wait =
                    next_wakeup(&status).map_or(resync, |at| clock::until(now, at).min(resync));
                // A moment past the deadline, so the next reconcile sees it passed.
                Ok(Action::requeue(wait + std::time::Duration::from_millis(50)))
            }
        }
    }

    fn observe(&self, secret: Option<&Secret>) -> SecretObservation {
        let Some(secret) = secret else {
            return SecretObservation::Missing;
        };
        let annotations = secret.metadata.annotations.clone().unwrap_or_default();
        let uid = self.key.metadata.uid.as_deref();
        SecretObservation::Present {
            key_id: annotations.get(SECRET_KEY_ID_ANNOTATION).cloned(),
            owned: secret
                .metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| Some(o.uid.as_str()) == uid && o.kind == "ApiKey"),
            delivered: annotations
                .get(DELIVERED_ANNOTATION)
                .is_some_and(|v| v == "true"),
        }
    }

    /// Generates a token, writes its plaintext into the Secret (replacing whatever the
    /// Secret held, including a delivery mark), and returns its public part.
    async fn issue(
        &self,
        existing: Option<&Secret>,
        expires_at: jiff::Timestamp,
    ) -> Result<IssuedToken> {
        let token = ApiToken::generate();
        let cost = self.ctx.settings.hash_cost;
        let hashing = token.clone();
        let hash = tokio::task::spawn_blocking(move || hashing.hash(cost))
            .await
            .map_err(|e| Error::Task(e.to_string()))?
            .map_err(Error::Hash)?;
        let key_id = token.key_id().as_str().to_owned();
        let mut labels = BTreeMap::from([(SECRET_LABEL.to_owned(), self.name.clone())]);
        if let Some(tenant) = self.ctx.stores.tenant_of_namespace(&self.namespace) {
            labels.insert(TENANT_LABEL.to_owned(), tenant.name_any());
        }
        let owner = self
            .key
            .controller_owner_ref(&())
            .ok_or(Error::MissingObjectKey("uid"))?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(secret_name(&self.name)),
                namespace: Some(self.namespace.clone()),
                labels: Some(labels),
                annotations: Some(BTreeMap::from([(
                    SECRET_KEY_ID_ANNOTATION.to_owned(),
                    key_id.clone(),
                )])),
                owner_references: Some(vec![owner]),
                // Replacing what we read: a concurrent writer makes this a conflict.
                resource_version: existing.and_then(|s| s.metadata.resource_version.clone()),
                ..ObjectMeta::default()
            },
            type_: Some(SECRET_TYPE.to_owned()),
            data: Some(BTreeMap::from([(
                SECRET_TOKEN_KEY.to_owned(),
                ByteString(token.expose_secret().as_bytes().to_vec()),
            )])),
            ..Secret::default()
        };
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PostParams::default()
        };
        if existing.is_some() {
            self.secrets
                .replace(&secret_name(&self.name), &pp, &secret)
                .await?;
        } else {
            self.secrets.create(&pp, &secret).await?;
        }
        Ok(IssuedToken {
            key_id,
            hash,
            expires_at,
        })
    }

    /// Restricted tenants: marks the key, then deletes the delivered plaintext Secret.
    async fn remove_plaintext(&self, secret: Option<&Secret>) -> Result<()> {
        let key_id = self
            .key
            .status
            .as_ref()
            .and_then(|s| s.key_id.clone())
            .unwrap_or_default();
        let mark = serde_json::json!({
            "metadata": {"annotations": {PLAINTEXT_REMOVED_ANNOTATION: key_id}}
        });
        self.keys
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(&mark))
            .await?;
        let dp = DeleteParams {
            preconditions: secret.map(|s| Preconditions {
                uid: s.metadata.uid.clone(),
                resource_version: s.metadata.resource_version.clone(),
            }),
            ..DeleteParams::default()
        };
        match self.secrets.delete(&secret_name(&self.name), &dp).await {
            Ok(_) => Ok(()),
            Err(e) if crate::error::is_api_code(&e, 404) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes the full status with server-side apply, unless nothing changed.
    async fn apply_status(&self, status: &ApiKeyStatus) -> Result<()> {
        frame::apply_status(&self.keys, &self.name, self.key.status.as_ref(), status).await
    }

    /// One Event per state change (issue, rotation, expiry, revocation, rejection).
    async fn announce(&self, verdict: &Verdict, status: &ApiKeyStatus) {
        let prev = self.key.status.clone().unwrap_or_default();
        let reference = self.key.object_ref(&());
        let message = portcullis_crds::conditions::find_ready(&status.conditions)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        let (warning, reason) = match verdict {
            Verdict::Issue(IssueReason::First | IssueReason::Unrevoked) => (false, "Issued"),
            Verdict::Issue(IssueReason::Rotation) => (false, "Rotated"),
            Verdict::Issue(IssueReason::SecretDeleted | IssueReason::SecretMismatch) => {
                (true, "SecretReplaced")
            }
            Verdict::RemovePlaintext => (false, "PlaintextRemoved"),
            Verdict::Revoked if prev.state != status.state => (false, "Revoked"),
            Verdict::Expired { .. } if prev.state != status.state => (true, "Expired"),
            Verdict::Rejected(e) => {
                let before = portcullis_crds::conditions::find_ready(&prev.conditions)
                    .map(|c| c.reason.as_str());
                if before == Some(e.metric_label()) {
                    return;
                }
                (true, e.metric_label())
            }
            _ => return,
        };
        self.ctx.event(&reference, warning, reason, message).await;
    }
}
