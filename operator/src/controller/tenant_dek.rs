//! The Tenant controller's DEK step: keep `portcullis-dek-<tenant>` in the operator's
//! namespace holding a current, KEK-wrapped data-encryption key, rotated on schedule,
//! older versions pruned once retention has passed. Writes are create-or-replace with
//! the resourceVersion read, so a lost race retries instead of overwriting keys.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use portcullis_crds::{annotations::FIELD_MANAGER, tenant::TENANT_LABEL};

use crate::context::Context;
use crate::dek::{self, CREATED_ANNOTATION_PREFIX, DekRing};
use crate::error::{Error, Result};

/// What the DEK step did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DekOutcome {
    /// The active version.
    pub active: u32,
    /// Versions created this time (first key or rotation).
    pub created: Option<u32>,
    /// Versions dropped this time.
    pub pruned: Vec<u32>,
    /// When the ring next needs attention.
    pub next_event: Timestamp,
}

/// Ensures the tenant's DEK ring is current.
pub async fn ensure(
    ctx: &Context,
    tenant: &str,
    rotation: Duration,
    retention: Duration,
) -> Result<DekOutcome> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let name = dek::secret_name(tenant);
    let now = ctx.clock.now();
    let envelope_error = |version: u32| {
        let secret = name.clone();
        move |source| Error::Envelope {
            secret,
            version: dek::version_key(version),
            source,
        }
    };
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PostParams::default()
    };

    let existing = api.get_opt(&name).await?;
    let (ring, created, pruned, next_event) = match &existing {
        None => {
            let mut ring = DekRing::new(tenant);
            let version = ring.rotate(&ctx.kek, now).map_err(envelope_error(1))?;
            let plan = ring.plan(now, rotation, retention);
            let (data, annotations) = ring.to_secret_parts();
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(ctx.settings.namespace.clone()),
                    labels: Some(labels(tenant)),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                },
                type_: Some("Opaque".into()),
                data: Some(data),
                ..Secret::default()
            };
            // A create never overwrites: if another writer won, this fails and we retry.
            api.create(&pp, &secret).await?;
            (ring, Some(version), Vec::new(), plan.next_event)
        }
        Some(secret) => {
            let mut ring = DekRing::from_secret_parts(
                tenant,
                &secret.data.clone().unwrap_or_default(),
                &secret.metadata.annotations.clone().unwrap_or_default(),
            )
            .map_err(|reason| Error::DekSecretMalformed {
                secret: name.clone(),
                reason,
            })?;
            let plan = ring.plan(now, rotation, retention);
            let mut created = None;
            if plan.rotate {
                let next = ring.active().map_or(1, |v| v.version.saturating_add(1));
                created = Some(ring.rotate(&ctx.kek, now).map_err(envelope_error(next))?);
            }
            ring.prune(&plan.prune);
            let pruned: Vec<u32> = plan
                .prune
                .iter()
                .copied()
                .filter(|v| !ring.versions().contains(v))
                .collect();
            if created.is_some() || !pruned.is_empty() {
                let (data, ring_annotations) = ring.to_secret_parts();
                let mut annotations: BTreeMap<String, String> = secret
                    .metadata
                    .annotations
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|(k, _)| !k.starts_with(CREATED_ANNOTATION_PREFIX))
                    .collect();
                annotations.extend(ring_annotations);
                let mut updated = secret.clone();
                updated.metadata.annotations = Some(annotations);
                updated.metadata.managed_fields = None;
                updated.data = Some(data);
                // Carries the resourceVersion we read: a concurrent change makes this 409.
                api.replace(&name, &pp, &updated).await?;
            }
            let next_event = if created.is_some() {
                ring.plan(now, rotation, retention).next_event
            } else {
                plan.next_event
            };
            (ring, created, pruned, next_event)
        }
    };
    let active = ring
        .active()
        .map(|v| v.version)
        .ok_or_else(|| Error::DekSecretMalformed {
            secret: name.clone(),
            reason: "no version".into(),
        })?;
    // The KEK must still open the active key: a KEK swapped under us is an error, not a
    // reason to mint a new DEK (that would strand everything encrypted so far).
    ring.unwrap_version(&ctx.kek, active)
        .map_err(envelope_error(active))?;
    Ok(DekOutcome {
        active,
        created,
        pruned,
        next_event,
    })
}

fn labels(tenant: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (TENANT_LABEL.to_owned(), tenant.to_owned()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "portcullis-operator".to_owned(),
        ),
    ])
}
