//! Tenant controller: binds namespaces (labels them `portcullis.dev/tenant=<name>`,
//! never taking one from another tenant), keeps the built-in Roles in each, keeps the
//! tenant's DEK current, keeps the `portcullis-inbound` NetworkPolicy in each namespace
//! (see [`tenant_network`]) and the RoleBinding through which the operator reaches the
//! namespace's ApiKey Secrets (see [`tenant_secrets`]), and reports it all in the status,
//! with the pods running without the proxy (`Protected`) and the usability of the
//! serving certificate Secrets its pods name (`ServingCertificates`, see
//! [`serving_certificates`]).
//!
//! A finalizer removes the namespace labels when the Tenant is deleted (labels on
//! objects the Tenant does not own are cleanup that owner references cannot do). The
//! built-in Roles and NetworkPolicies are owned by the Tenant and garbage-collected. The DEK Secret is
//! deliberately kept: deleting a Tenant must not shred its audit archive.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::core::Selector;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use portcullis_crds::{
    Role, Tenant, TenantStatus,
    annotations::FIELD_MANAGER,
    conditions,
    role::{BUILTIN_ROLES, builtin_role, role_object_name},
    tenant::TENANT_LABEL,
};

use super::applied;
use super::frame;
use super::serving_certificates::{self, SERVING_CERTIFICATES};
use super::tenant_watches::TenantCaches;
use super::unprotected::{self, ExposedPod, Exposure};
use super::{tenant_dek, tenant_network, tenant_secrets};
use crate::clock;
use crate::context::Context;
use crate::error::{Error, Result};

/// Finalizer that removes namespace labels on deletion.
pub const FINALIZER: &str = "portcullis.dev/tenant-cleanup";
/// Label on built-in Roles.
pub const BUILTIN_LABEL: &str = "portcullis.dev/builtin";
/// Namespaces a selector never binds.
const PROTECTED_NAMESPACES: [&str; 4] =
    ["kube-system", "kube-public", "kube-node-lease", "default"];

/// Reconciles one Tenant (its finalizer releases the namespaces it labelled), reading
/// every object it keeps from the API server.
pub async fn reconcile(tenant: Arc<Tenant>, ctx: Arc<Context>) -> Result<Action> {
    reconcile_with(tenant, ctx, None).await
}

/// Reconciles one Tenant; what `caches` hold as it would apply it is not applied again.
pub async fn reconcile_with(
    tenant: Arc<Tenant>,
    ctx: Arc<Context>,
    caches: Option<TenantCaches>,
) -> Result<Action> {
    frame::reconcile(tenant, ctx, |tenant, ctx| async move {
        let api: Api<Tenant> = Api::all(ctx.client.clone());
        let caches = caches.as_ref();
        finalizer(&api, FINALIZER, tenant, |event| async {
            match event {
                Finalizer::Apply(t) => TenantReconciler::new(&t, &ctx, caches)?.apply().await,
                Finalizer::Cleanup(t) => TenantReconciler::new(&t, &ctx, caches)?.cleanup().await,
            }
        })
        .await
        .map_err(|e| Error::Finalizer(Box::new(e)))
    })
    .await
}

/// How many times a reconcile plans again after a namespace changed under it.
const BIND_CONFLICTS: u32 = 3;

/// Which namespaces to label, keep, release, and which cannot be had.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespacePlan {
    /// Unlabelled: label them.
    pub bind: Vec<String>,
    /// Already ours.
    pub keep: Vec<String>,
    /// Labelled for another tenant: (namespace, that tenant).
    pub claimed: Vec<(String, String)>,
    /// Listed but not existing.
    pub missing: Vec<String>,
    /// Ours but no longer wanted: remove the label.
    pub release: Vec<String>,
}

impl NamespacePlan {
    /// Decides from the wanted names, the current tenant label of each existing wanted
    /// namespace, and the namespaces currently labelled for this tenant.
    pub fn new(
        tenant: &str,
        wanted: &BTreeSet<String>,
        labels: &BTreeMap<String, Option<String>>,
        currently_ours: &BTreeSet<String>,
    ) -> Self {
        let mut plan = Self::default();
        for ns in wanted {
            match labels.get(ns) {
                None => plan.missing.push(ns.clone()),
                Some(None) => plan.bind.push(ns.clone()),
                Some(Some(owner)) if owner.is_empty() => plan.bind.push(ns.clone()),
                Some(Some(owner)) if owner == tenant => plan.keep.push(ns.clone()),
                Some(Some(owner)) => plan.claimed.push((ns.clone(), owner.clone())),
            }
        }
        plan.release = currently_ours.difference(wanted).cloned().collect();
        plan
    }

    /// The namespaces bound once the plan is carried out.
    pub fn bound(&self) -> Vec<String> {
        let mut all: Vec<String> = self.bind.iter().chain(&self.keep).cloned().collect();
        all.sort();
        all
    }

    /// The problem to report, if any: a claimed namespace first, then missing ones.
    pub fn problem(&self, tenant: &str) -> Option<Error> {
        if !self.claimed.is_empty() {
            let each: Vec<String> = self
                .claimed
                .iter()
                .map(|(ns, other)| {
                    format!("namespace {ns} is already bound to tenant {other}; tenant {tenant} does not take it over")
                })
                .collect();
            return Some(Error::NamespaceClaimed(each.join("; ")));
        }
        if !self.missing.is_empty() {
            return Some(Error::NamespaceNotFound(format!(
                "namespaces not found: {}",
                self.missing.join(", ")
            )));
        }
        None
    }
}

/// The spec of a built-in Role as the operator applies it: only the fields it owns, so
/// subjects people add to built-in Roles survive.
pub fn builtin_role_manifest(
    name: &str,
    namespace: &str,
    tenant: &str,
    owner: &OwnerReference,
) -> Option<serde_json::Value> {
    let spec = builtin_role(name)?;
    Some(serde_json::json!({
        "apiVersion": Role::api_version(&()),
        "kind": Role::kind(&()),
        "metadata": {
            "name": role_object_name(name),
            "namespace": namespace,
            "labels": {TENANT_LABEL: tenant, BUILTIN_LABEL: "true"},
            "ownerReferences": [owner],
        },
        "spec": {
            "inherits": spec.inherits,
            "permissions": spec.permissions,
            "allScopes": spec.all_scopes,
        },
    }))
}

struct TenantReconciler<'a> {
    tenant: &'a Tenant,
    ctx: &'a Context,
    /// `None`: every object is read from the API server and always applied.
    caches: Option<&'a TenantCaches>,
    name: String,
    namespaces: Api<Namespace>,
}

impl<'a> TenantReconciler<'a> {
    fn new(tenant: &'a Tenant, ctx: &'a Context, caches: Option<&'a TenantCaches>) -> Result<Self> {
        Ok(Self {
            name: tenant
                .metadata
                .name
                .clone()
                .ok_or(Error::MissingObjectKey("name"))?,
            namespaces: Api::all(ctx.client.clone()),
            tenant,
            ctx,
            caches,
        })
    }

    async fn apply(&self) -> Result<Action> {
        let now = self.ctx.clock.now();
        if let Err(errors) = self.tenant.spec.validate() {
            let error = Error::InvalidSpec(errors);
            let previous = self.previous();
            let serving = previous
                .conditions
                .iter()
                .find(|c| c.type_ == SERVING_CERTIFICATES)
                .cloned();
            let status = self.status(
                previous.namespaces,
                previous.active_dek_version,
                None,
                serving,
                Some(&error),
            );
            self.apply_status(&status).await?;
            self.announce_problem(&error).await;
            return Err(error);
        }

        let plan = self.plan_and_bind().await?;
        let owner = self.owner()?;
        for ns in &plan.release {
            self.vacate(ns, &owner).await?;
            self.ctx
                .event(
                    &self.reference(),
                    false,
                    "NamespaceReleased",
                    format!("namespace {ns} released"),
                )
                .await;
        }
        let bound = plan.bound();
        let listed = self.previous().namespaces;
        for ns in &bound {
            // Before the status names the namespace: the ApiKey controller writes
            // Secrets only in namespaces the status lists.
            tenant_secrets::ensure(self.ctx, ns, &self.name, &owner).await?;
            if !listed.contains(ns) {
                tenant_secrets::await_effect(self.ctx, ns).await?;
            }
            self.ensure_builtin_roles(ns).await?;
            tenant_network::ensure(
                self.ctx,
                self.tenant.spec.network_policy,
                ns,
                &self.name,
                &owner,
                self.caches.map(|c| &c.network_policies),
            )
            .await?;
        }

        let spec = &self.tenant.spec;
        let retention = Duration::from_secs(u64::from(spec.retention_days()) * 86_400);
        let dek = tenant_dek::ensure(
            self.ctx,
            &self.name,
            spec.encryption.dek_rotation.get(),
            retention,
        )
        .await?;
        if let Some(version) = dek.created {
            let (reason, note) = if version == 1 {
                ("DekCreated", "data-encryption key v1 created".to_owned())
            } else {
                (
                    "DekRotated",
                    format!("data-encryption key rotated to v{version}"),
                )
            };
            self.ctx.event(&self.reference(), false, reason, note).await;
        }
        if !dek.pruned.is_empty() {
            let versions: Vec<String> = dek.pruned.iter().map(|v| format!("v{v}")).collect();
            let note = format!(
                "DEK versions {} dropped: past the audit retention",
                versions.join(", ")
            );
            self.ctx
                .event(&self.reference(), false, "DekPruned", note)
                .await;
        }

        let pods = self.pods(&bound).await?;
        let unprotected = self.unprotected_pods(&pods);
        self.announce_unprotected(&unprotected).await;
        let serving = self.serving_certificates(&pods, &bound).await?;
        self.announce_serving_certificates(serving.as_ref()).await;
        let problem = plan.problem(&self.name);
        let status = self.status(
            bound.clone(),
            Some(dek.active),
            Some(unprotected),
            serving,
            problem.as_ref(),
        );
        self.apply_status(&status).await?;
        // After the status stops listing them: until then the ApiKey controller may
        // still read Secrets there.
        // (Also those a failed reconcile released without updating the status.)
        let unlisted = plan.release.iter().chain(&listed);
        for ns in unlisted.filter(|ns| !bound.contains(ns)) {
            tenant_secrets::remove(self.ctx, ns, &owner.uid).await?;
        }
        if let Some(error) = problem {
            self.announce_problem(&error).await;
            return Err(error);
        }
        let wait = clock::until(now, dek.next_event).min(self.ctx.settings.resync);
        Ok(Action::requeue(wait + Duration::from_millis(50)))
    }

    async fn cleanup(&self) -> Result<Action> {
        // The Secret access goes with the Tenant at once, not when the garbage
        // collector gets to it.
        let owner = self.owner()?;
        for ns in self.labelled_ours().await? {
            self.vacate(&ns, &owner).await?;
            tenant_secrets::remove(self.ctx, &ns, &owner.uid).await?;
        }
        self.ctx
            .event(
                &self.reference(),
                false,
                "NamespacesReleased",
                "tenant deleted: namespace labels removed".into(),
            )
            .await;
        Ok(Action::await_change())
    }

    /// The owner reference of the objects the Tenant keeps in its namespaces.
    fn owner(&self) -> Result<OwnerReference> {
        self.tenant
            .controller_owner_ref(&())
            .ok_or(Error::MissingObjectKey("uid"))
    }

    fn reference(&self) -> k8s_openapi::api::core::v1::ObjectReference {
        self.tenant.object_ref(&())
    }

    fn previous(&self) -> TenantStatus {
        self.tenant.status.clone().unwrap_or_default()
    }

    async fn labelled_ours(&self) -> Result<BTreeSet<String>> {
        let lp = ListParams::default().labels(&format!("{TENANT_LABEL}={}", self.name));
        Ok(self
            .namespaces
            .list_metadata(&lp)
            .await?
            .items
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect())
    }

    /// A namespace as the cache holds it (when `cached` and it holds one), else as the
    /// API server has it now.
    async fn namespace(&self, name: &str, cached: bool) -> Result<Option<Namespace>> {
        let cache = self.caches.filter(|_| cached);
        if let Some(found) = cache.and_then(|c| c.namespaces.get(&ObjectRef::new(name))) {
            return Ok(Some(found.as_ref().clone()));
        }
        Ok(self.namespaces.get_opt(name).await?)
    }

    /// The namespaces labelled for this Tenant: from the cache when `cached` (one the
    /// cache has not seen labelled yet wakes a reconcile when it does), else listed.
    async fn labelled_for_us(&self, cached: bool) -> Result<BTreeSet<String>> {
        match self.caches.filter(|_| cached) {
            Some(caches) => Ok(caches
                .namespaces
                .state()
                .iter()
                .filter(|n| {
                    n.labels().get(TENANT_LABEL).map(String::as_str) == Some(self.name.as_str())
                })
                .filter_map(|n| n.metadata.name.clone())
                .collect()),
            None => self.labelled_ours().await,
        }
    }

    /// The plan, and the resourceVersion each existing wanted namespace had when read:
    /// from the caches when `cached` (a stale one makes the binding fail with a conflict,
    /// and the next plan reads the API server).
    async fn plan_namespaces(
        &self,
        cached: bool,
    ) -> Result<(NamespacePlan, BTreeMap<String, String>)> {
        let spec = &self.tenant.spec;
        let mut labels: BTreeMap<String, Option<String>> = BTreeMap::new();
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        let mut note = |ns: &Namespace, name: &str| {
            if let Some(version) = &ns.metadata.resource_version {
                seen.insert(name.to_owned(), version.clone());
            }
        };
        let mut wanted: BTreeSet<String> = BTreeSet::new();
        let tenant_label = |n: &Namespace| {
            n.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(TENANT_LABEL).cloned())
        };
        for name in &spec.namespaces {
            wanted.insert(name.clone());
            if let Some(ns) = self.namespace(name, cached).await? {
                note(&ns, name);
                labels.insert(name.clone(), tenant_label(&ns));
            }
        }
        if let Some(selector) = &spec.namespace_selector {
            let empty = selector
                .match_labels
                .as_ref()
                .is_none_or(BTreeMap::is_empty)
                && selector
                    .match_expressions
                    .as_ref()
                    .is_none_or(Vec::is_empty);
            // An empty selector would bind every namespace of the cluster: it binds none.
            if !empty {
                let selector = Selector::try_from(selector.clone()).map_err(|e| {
                    Error::InvalidSpec(portcullis_crds::FieldErrors(vec![
                        portcullis_crds::FieldError::new("spec.namespaceSelector", e.to_string()),
                    ]))
                })?;
                let found = self
                    .namespaces
                    .list(&ListParams::default().labels_from(&selector))
                    .await?;
                for ns in found.items {
                    let Some(name) = ns.metadata.name.clone() else {
                        continue;
                    };
                    if PROTECTED_NAMESPACES.contains(&name.as_str())
                        || name == self.ctx.settings.namespace
                    {
                        continue;
                    }
                    wanted.insert(name.clone());
                    note(&ns, &name);
                    labels.insert(name, tenant_label(&ns));
                }
            }
        }
        let mut plan = NamespacePlan::new(
            &self.name,
            &wanted,
            &labels,
            &self.labelled_for_us(cached).await?,
        );
        if cached && !plan.release.is_empty() {
            // Releasing is rare and must not act on a stale label: confirm it.
            plan = NamespacePlan::new(&self.name, &wanted, &labels, &self.labelled_ours().await?);
        }
        Ok((plan, seen))
    }

    /// Plans the namespaces and binds the free ones. A namespace is bound only if it is
    /// still as planned: of two Tenants reconciled at once for one namespace, the second
    /// gets 409, plans again and finds it claimed (client-go's retry on conflict).
    async fn plan_and_bind(&self) -> Result<NamespacePlan> {
        let mut conflicts = 0;
        'plan: loop {
            let (plan, seen) = self.plan_namespaces(conflicts == 0).await?;
            for ns in &plan.bind {
                match self.bind(ns, seen.get(ns).map(String::as_str)).await {
                    Err(Error::Kube(e))
                        if crate::error::is_api_code(&e, 409) && conflicts < BIND_CONFLICTS =>
                    {
                        conflicts += 1;
                        tracing::debug!(namespace = %ns, "namespace changed while binding it; planning again");
                        continue 'plan;
                    }
                    bound => bound?,
                }
                self.ctx
                    .event(
                        &self.reference(),
                        false,
                        "NamespaceBound",
                        format!("namespace {ns} bound to tenant {}", self.name),
                    )
                    .await;
            }
            return Ok(plan);
        }
    }

    /// Labels `namespace` for this Tenant if it is still at `version` (compare and swap:
    /// the API server answers 409 when anything changed it since it was read).
    async fn bind(&self, namespace: &str, version: Option<&str>) -> Result<()> {
        let patch = serde_json::json!({"metadata": {
            "labels": {TENANT_LABEL: self.name},
            "resourceVersion": version,
        }});
        self.namespaces
            .patch(namespace, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }

    /// Gives a namespace up: its built-in Roles and NetworkPolicy go first, then its
    /// label, so the next Tenant to bind it (at once: Tenants are reconciled
    /// concurrently) finds nothing another Tenant controls, without waiting for the
    /// garbage collector.
    async fn vacate(&self, namespace: &str, owner: &OwnerReference) -> Result<()> {
        self.remove_builtin_roles(namespace).await?;
        tenant_network::remove(self.ctx, namespace, &owner.uid).await?;
        self.unlabel(namespace).await
    }

    /// Removes the tenant label of a namespace (gone already is fine).
    async fn unlabel(&self, namespace: &str) -> Result<()> {
        let patch = serde_json::json!({"metadata": {"labels": {TENANT_LABEL: null}}});
        match self
            .namespaces
            .patch(namespace, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if crate::error::is_api_code(&e, 404) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Applies the built-in Roles of a namespace, except those the cache holds as they
    /// would be applied (the cache is filled by the watch that wakes this reconcile, so
    /// it has seen a deletion before the reconcile it causes).
    async fn ensure_builtin_roles(&self, namespace: &str) -> Result<()> {
        let owner = self.owner()?;
        let roles: Api<Role> = Api::namespaced(self.ctx.client.clone(), namespace);
        // Parents first (Viewer ... Owner), so each Role finds what it inherits.
        for name in BUILTIN_ROLES.iter().rev() {
            let Some(manifest) = builtin_role_manifest(name, namespace, &self.name, &owner) else {
                continue;
            };
            let object = ObjectRef::new(&role_object_name(name)).within(namespace);
            let cached = self.caches.and_then(|c| c.builtin_roles.get(&object));
            if cached.is_some_and(|current| applied::holds(&manifest, current.as_ref())) {
                continue;
            }
            roles
                .patch(
                    &role_object_name(name),
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&manifest),
                )
                .await?;
        }
        Ok(())
    }

    async fn remove_builtin_roles(&self, namespace: &str) -> Result<()> {
        let roles: Api<Role> = Api::namespaced(self.ctx.client.clone(), namespace);
        let uid = self.tenant.metadata.uid.clone().unwrap_or_default();
        for name in BUILTIN_ROLES {
            let object = role_object_name(name);
            let Some(role) = roles.get_opt(&object).await? else {
                continue;
            };
            if role.owner_references().iter().any(|o| o.uid == uid) {
                match roles.delete(&object, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(e) if crate::error::is_api_code(&e, 404) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// Pods of the bound namespaces.
    async fn pods(&self, namespaces: &[String]) -> Result<Vec<Pod>> {
        let mut pods = Vec::new();
        for ns in namespaces {
            let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), ns);
            // From the API server's watch cache: the pod watch that wakes this reconcile
            // is served from it too, and etcd is spared a read per reconcile.
            pods.extend(api.list(&ListParams::default().match_any()).await?.items);
        }
        Ok(pods)
    }

    /// Pods of the bound namespaces running without a genuine proxy.
    fn unprotected_pods(&self, pods: &[Pod]) -> Vec<ExposedPod> {
        let exposed = unprotected::unprotected(pods, &self.ctx.settings.inject);
        self.ctx
            .metrics
            .set_unprotected_pods(&self.name, exposed.len());
        exposed
    }

    /// The `ServingCertificates` condition: the Secrets `pods` mount and the Tenant's
    /// default, each read and judged as the proxy would (`None`: none named).
    async fn serving_certificates(
        &self,
        pods: &[Pod],
        namespaces: &[String],
    ) -> Result<Option<Condition>> {
        let default = self
            .tenant
            .spec
            .defaults
            .serving_certificate_secret
            .as_deref();
        let named = serving_certificates::referenced(pods, default, namespaces);
        let now = self.ctx.clock.now();
        let mut findings = Vec::new();
        for secret in &named {
            let api: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &secret.namespace);
            let found = api.get_opt(&secret.name).await?;
            if let Err((problem, detail)) =
                serving_certificates::verdict(found.as_ref(), now.as_second())
            {
                findings.push(serving_certificates::Finding {
                    secret: secret.clone(),
                    problem,
                    detail,
                });
            }
        }
        Ok(serving_certificates::condition(
            named.len(),
            &findings,
            self.tenant.metadata.generation,
            &self.previous().conditions,
            Time(now),
        ))
    }

    /// A Warning Event when the serving certificate problems change to new ones.
    async fn announce_serving_certificates(&self, condition: Option<&Condition>) {
        let Some(condition) = condition.filter(|c| c.status == "False") else {
            return;
        };
        let before = self
            .previous()
            .conditions
            .into_iter()
            .find(|c| c.type_ == SERVING_CERTIFICATES);
        if before.is_some_and(|b| b.reason == condition.reason && b.message == condition.message) {
            return;
        }
        self.ctx
            .event(
                &self.reference(),
                true,
                &condition.reason,
                condition.message.clone(),
            )
            .await;
    }

    /// A Warning Event when the set of unprotected pods changes to a non-empty one.
    async fn announce_unprotected(&self, exposed: &[ExposedPod]) {
        let names: Vec<&str> = exposed.iter().map(|e| e.name.as_str()).collect();
        if names.is_empty() || self.previous().unprotected_pods == names {
            return;
        }
        let note = format!(
            "{} pod(s) run without the Portcullis proxy: {}; delete them so they are re-created with it (opted-out pods: remove the annotation portcullis.dev/inject: disabled first)",
            exposed.len(),
            listing(exposed)
        );
        self.ctx
            .event(&self.reference(), true, "PodsWithoutProxy", note)
            .await;
    }

    fn status(
        &self,
        namespaces: Vec<String>,
        active_dek_version: Option<u32>,
        exposed: Option<Vec<ExposedPod>>,
        serving: Option<Condition>,
        problem: Option<&Error>,
    ) -> TenantStatus {
        let prev = self.previous();
        let generation = self.tenant.metadata.generation;
        let keys = self.ctx.stores.keys_in_any(&namespaces).len();
        let roles = role_count(&self.ctx.stores.roles_in_any(&namespaces), &namespaces);
        let now = Time(self.ctx.clock.now());
        let ready = match problem {
            Some(e) => conditions::ready(
                false,
                e.metric_label(),
                e.to_string(),
                generation,
                &prev.conditions,
                now.clone(),
            ),
            None => conditions::ready(
                true,
                "Bound",
                format!(
                    "{} namespace(s) bound; data-encryption key v{} active",
                    namespaces.len(),
                    active_dek_version.unwrap_or_default()
                ),
                generation,
                &prev.conditions,
                now.clone(),
            ),
        };
        // Restricted data and a KEK that is not held in hardware.
        let custody = self.ctx.settings.kek_custody.condition(
            self.tenant.spec.data_classification,
            generation,
            &prev.conditions,
            now.clone(),
        );
        // A separate condition: the tenant works, but some of its pods are exposed.
        // Opt-outs alone get their own reason: allowed, but still not behind the proxy.
        // `None`: not looked at this time, the previous report stands.
        let previous_protected = prev.conditions.iter().find(|c| c.type_ == PROTECTED);
        let (exposed, previous_protected) = match (exposed, previous_protected) {
            (Some(exposed), _) => (exposed, None),
            (None, found) => (Vec::new(), found.cloned()),
        };
        let unprotected_pods = if previous_protected.is_some() {
            prev.unprotected_pods.clone()
        } else {
            exposed.iter().map(|e| e.name.clone()).collect()
        };
        let only_opt_outs = exposed.iter().all(|e| e.exposure == Exposure::OptedOut);
        let protected = if let Some(kept) = previous_protected {
            kept
        } else if exposed.is_empty() {
            protected_condition(
                true,
                "AllPodsProxied",
                "every pod runs the proxy".into(),
                generation,
                &prev.conditions,
                now,
            )
        } else {
            protected_condition(
                false,
                if only_opt_outs {
                    "PodsOptedOut"
                } else {
                    "PodsWithoutProxy"
                },
                format!(
                    "{} pod(s) without the proxy: {}",
                    exposed.len(),
                    listing(&exposed)
                ),
                generation,
                &prev.conditions,
                now,
            )
        };
        TenantStatus {
            conditions: [ready, protected]
                .into_iter()
                .chain(serving)
                .chain(custody)
                .collect(),
            namespaces,
            active_dek_version,
            api_keys: u32::try_from(keys).unwrap_or(u32::MAX),
            roles: u32::try_from(roles).unwrap_or(u32::MAX),
            unprotected_pods,
            observed_generation: generation,
            audit_anchors: Vec::new(),
        }
    }

    async fn apply_status(&self, status: &TenantStatus) -> Result<()> {
        let api: Api<Tenant> = Api::all(self.ctx.client.clone());
        // The audit anchors are the witness's (its own field manager): never applied
        // here, so they are not part of what decides whether anything changed.
        let current = self.tenant.status.clone().map(|mut current| {
            current.audit_anchors.clear();
            current
        });
        frame::apply_status(&api, &self.name, current.as_ref(), status).await
    }

    /// A Warning Event when the problem is new (not on every retry).
    async fn announce_problem(&self, error: &Error) {
        let before = conditions::find_ready(&self.previous().conditions)
            .map(|c| (c.reason.clone(), c.message.clone()));
        if before == Some((error.metric_label().to_owned(), error.to_string())) {
            return;
        }
        self.ctx
            .event(
                &self.reference(),
                true,
                error.metric_label(),
                error.to_string(),
            )
            .await;
    }
}

/// The Roles of `namespaces`: those cached and the built-in ones, just applied, which
/// the cache may not hold yet (no other event would correct the count).
fn role_count(cached: &[Arc<Role>], namespaces: &[String]) -> usize {
    let builtin = namespaces.iter().flat_map(|ns| {
        BUILTIN_ROLES
            .iter()
            .map(move |name| (Some(ns.clone()), Some(role_object_name(name))))
    });
    cached
        .iter()
        .map(|r| (r.metadata.namespace.clone(), r.metadata.name.clone()))
        .chain(builtin)
        .collect::<BTreeSet<_>>()
        .len()
}

/// `ns/a (no proxy), ns/b (opted out)`.
fn listing(exposed: &[ExposedPod]) -> String {
    let each: Vec<String> = exposed
        .iter()
        .map(|e| format!("{} ({})", e.name, e.exposure.describe()))
        .collect();
    each.join(", ")
}

/// The `Protected` condition: `lastTransitionTime` kept while its status holds.
fn protected_condition(
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    previous: &[Condition],
    now: Time,
) -> Condition {
    conditions::condition(PROTECTED, ok, reason, message, generation, previous, now)
}

/// Condition type reporting pods that run without the proxy.
pub const PROTECTED: &str = "Protected";

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn plan_binds_free_keeps_ours_and_never_takes_over() {
        let labels = BTreeMap::from([
            ("free".to_owned(), None),
            ("ours".to_owned(), Some("acme".to_owned())),
            ("theirs".to_owned(), Some("globex".to_owned())),
        ]);
        let plan = NamespacePlan::new(
            "acme",
            &set(&["free", "ours", "theirs", "ghost"]),
            &labels,
            &set(&["ours", "old"]),
        );
        assert_eq!(plan.bind, ["free"]);
        assert_eq!(plan.keep, ["ours"]);
        assert_eq!(plan.claimed, [("theirs".to_owned(), "globex".to_owned())]);
        assert_eq!(plan.missing, ["ghost"]);
        assert_eq!(plan.release, ["old"]);
        assert_eq!(plan.bound(), ["free", "ours"]);
        let problem = plan
            .problem("acme")
            .map(|e| (e.metric_label(), e.to_string()));
        let (reason, message) = problem.unwrap_or_default();
        assert_eq!(reason, "NamespaceClaimed");
        assert!(
            message.contains("theirs") && message.contains("globex") && message.contains("acme"),
            "{message}"
        );
    }

    #[test]
    fn missing_namespaces_are_reported_after_claims() {
        let plan = NamespacePlan::new("acme", &set(&["ghost"]), &BTreeMap::new(), &BTreeSet::new());
        assert_eq!(
            plan.problem("acme").map(|e| e.metric_label()),
            Some("NamespaceNotFound")
        );
        let fine = NamespacePlan::new(
            "acme",
            &set(&["a"]),
            &BTreeMap::from([("a".to_owned(), None)]),
            &BTreeSet::new(),
        );
        assert!(fine.problem("acme").is_none());
    }

    #[test]
    fn builtin_manifests_leave_subjects_to_people() {
        let owner = OwnerReference {
            api_version: "portcullis.dev/v1alpha1".into(),
            kind: "Tenant".into(),
            name: "acme".into(),
            uid: "uid".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
        let manifest =
            builtin_role_manifest("Developer", "acme-prod", "acme", &owner).unwrap_or_default();
        assert_eq!(manifest["metadata"]["name"], "developer");
        assert_eq!(manifest["spec"]["inherits"], serde_json::json!(["viewer"]));
        assert_eq!(manifest["spec"]["allScopes"], true);
        assert!(manifest["spec"].get("subjects").is_none());
        assert!(manifest["spec"].get("scopes").is_none());
        assert!(builtin_role_manifest("Janitor", "acme-prod", "acme", &owner).is_none());
    }
}
