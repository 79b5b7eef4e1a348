//! Role controller: resolves inheritance against the Roles of the namespace, writes
//! the effective scopes and permissions, and emits Kubernetes RBAC (an RBAC Role
//! `portcullis:<role>` and a RoleBinding to the subjects), owned by the Role. A Role
//! that cannot be resolved loses its RBAC objects: access never outlives validity.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::rbac::v1::{Role as RbacRole, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use portcullis_crds::{
    Role, RoleStatus,
    annotations::FIELD_MANAGER,
    conditions,
    role::{self, EffectiveRole, InheritanceError, RoleSpec},
};

use super::applied;
use super::frame;
use super::role_watches::RoleCaches;
use super::tenant::BUILTIN_LABEL;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::rbac;

/// Reconciles one Role, applying its RBAC objects every time.
pub async fn reconcile(role: Arc<Role>, ctx: Arc<Context>) -> Result<Action> {
    reconcile_with(role, ctx, None).await
}

/// Reconciles one Role; RBAC objects `caches` hold as they would be applied are not
/// applied again.
pub async fn reconcile_with(
    role: Arc<Role>,
    ctx: Arc<Context>,
    caches: Option<RoleCaches>,
) -> Result<Action> {
    frame::reconcile(role, ctx, |role, ctx| async move {
        RoleReconciler::new(&role, &ctx, caches.as_ref())?
            .reconcile()
            .await
    })
    .await
}

/// How long a built-in Role waits for its Tenant to list its namespace.
const BUILTIN_WAIT: Duration = Duration::from_secs(2);

/// An inheritance problem as the error (and condition reason) it becomes.
pub fn inheritance_error(e: &InheritanceError) -> Error {
    match e {
        InheritanceError::Cycle(_) => Error::InheritanceCycle(e.to_string()),
        InheritanceError::MissingParent { .. } => Error::MissingParent(e.to_string()),
    }
}

/// Fills in Roles the cache has not seen yet: while resolving `start` reports a missing
/// parent, the parent is read from the API server. A parent created a moment ago is
/// then found; a parent that really is missing stays missing.
pub async fn complete_from_api(
    client: &kube::Client,
    namespace: &str,
    roles: &mut BTreeMap<String, RoleSpec>,
    start: &str,
) -> Result<()> {
    let api: Api<Role> = Api::namespaced(client.clone(), namespace);
    for _ in 0..8 {
        let Err(InheritanceError::MissingParent { parent, .. }) = role::resolve(start, roles)
        else {
            return Ok(());
        };
        match api.get_opt(&parent).await? {
            Some(found) => {
                roles.insert(parent, found.spec);
            }
            None => return Ok(()),
        }
    }
    Ok(())
}

/// The scopes a resolved role grants, with `allScopes` expanded to the catalogue.
pub fn effective_scopes(
    effective: &EffectiveRole,
    catalogue: impl IntoIterator<Item = String>,
) -> Vec<String> {
    let mut scopes: BTreeSet<String> = effective.scopes.clone();
    if effective.all_scopes {
        scopes.extend(catalogue);
    }
    scopes.into_iter().collect()
}

struct RoleReconciler<'a> {
    role: &'a Role,
    ctx: &'a Context,
    /// `None`: RBAC objects are always applied.
    caches: Option<&'a RoleCaches>,
    name: String,
    namespace: String,
}

impl<'a> RoleReconciler<'a> {
    fn new(role: &'a Role, ctx: &'a Context, caches: Option<&'a RoleCaches>) -> Result<Self> {
        Ok(Self {
            name: role
                .metadata
                .name
                .clone()
                .ok_or(Error::MissingObjectKey("name"))?,
            namespace: role
                .metadata
                .namespace
                .clone()
                .ok_or(Error::MissingObjectKey("namespace"))?,
            role,
            ctx,
            caches,
        })
    }

    async fn reconcile(&self) -> Result<Action> {
        if self.role.metadata.deletion_timestamp.is_some() {
            return Ok(Action::await_change()); // RBAC objects are owned: GC removes them
        }
        let mut roles = self.ctx.stores.roles_in(&self.namespace);
        // The cache may lag behind the object we were handed, and behind new parents.
        roles.insert(self.name.clone(), self.role.spec.clone());
        complete_from_api(&self.ctx.client, &self.namespace, &mut roles, &self.name).await?;
        let resolved = match self.role.spec.validate() {
            Err(errors) => Err(Error::InvalidSpec(errors)),
            Ok(()) => role::resolve(&self.name, &roles).map_err(|e| inheritance_error(&e)),
        };
        let tenant = self.ctx.stores.tenant_of_namespace(&self.namespace);
        if tenant.is_none() && self.role.labels().contains_key(BUILTIN_LABEL) {
            // Its Tenant creates it just before its status lists the namespace, and that
            // status change wakes every Role of the namespace (`TenantChanges`): resolved
            // now, it would be resolved and applied twice. Looked at again soon anyway:
            // that wake finds only the Roles the controller's cache holds by then.
            return Ok(Action::requeue(BUILTIN_WAIT));
        }
        match resolved {
            Err(error) => {
                self.remove_rbac().await?;
                let status = self.status(None, Some(&error));
                self.apply_status(&status).await?;
                self.announce(&status).await;
                Err(error)
            }
            Ok(effective) => {
                let catalogue = tenant
                    .as_ref()
                    .map(|t| t.spec.scopes.keys().cloned().collect::<Vec<_>>());
                let scopes = effective_scopes(&effective, catalogue.unwrap_or_default());
                self.apply_rbac(&effective, tenant.as_ref().map(|t| t.name_any()))
                    .await?;
                let status = self.status(Some((scopes, &effective)), None);
                self.apply_status(&status).await?;
                self.announce(&status).await;
                Ok(Action::requeue(self.ctx.settings.resync))
            }
        }
    }

    async fn apply_rbac(&self, effective: &EffectiveRole, tenant: Option<String>) -> Result<()> {
        let owner = self
            .role
            .controller_owner_ref(&())
            .ok_or(Error::MissingObjectKey("uid"))?;
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let object = rbac::object_name(&self.name);
        let rbac_role = rbac::rbac_role(
            &self.name,
            &self.namespace,
            tenant.as_deref(),
            &owner,
            &effective.permissions,
        );
        let at = ObjectRef::new(&object).within(&self.namespace);
        let cached = self.caches.and_then(|c| c.rbac_roles.get(&at));
        if !cached.is_some_and(|c| applied::holds(&rbac_role, c.as_ref())) {
            Api::<RbacRole>::namespaced(self.ctx.client.clone(), &self.namespace)
                .patch(&object, &pp, &Patch::Apply(&rbac_role))
                .await?;
        }
        let cached = self.caches.and_then(|c| {
            c.role_bindings
                .get(&ObjectRef::new(&object).within(&self.namespace))
        });
        if self.role.spec.subjects.is_empty() {
            // A binding of nobody grants nothing: the built-in Roles start without
            // subjects, and five empty bindings per Tenant namespace were 5000 API
            // writes for 1000 Tenants. One left from earlier subjects goes.
            if cached.is_some() || self.caches.is_none() {
                self.remove_binding(&object).await?;
            }
            return Ok(());
        }
        let binding = rbac::role_binding(
            &self.name,
            &self.namespace,
            tenant.as_deref(),
            &owner,
            &self.role.spec.subjects,
        );
        if !cached.is_some_and(|c| applied::holds(&binding, c.as_ref())) {
            Api::<RoleBinding>::namespaced(self.ctx.client.clone(), &self.namespace)
                .patch(&object, &pp, &Patch::Apply(&binding))
                .await?;
        }
        Ok(())
    }

    async fn remove_rbac(&self) -> Result<()> {
        let object = rbac::object_name(&self.name);
        self.remove_binding(&object).await?;
        gone(
            Api::<RbacRole>::namespaced(self.ctx.client.clone(), &self.namespace)
                .delete(&object, &DeleteParams::default())
                .await
                .map(|_| ()),
        )
    }

    async fn remove_binding(&self, object: &str) -> Result<()> {
        gone(
            Api::<RoleBinding>::namespaced(self.ctx.client.clone(), &self.namespace)
                .delete(object, &DeleteParams::default())
                .await
                .map(|_| ()),
        )
    }

    fn status(
        &self,
        resolved: Option<(Vec<String>, &EffectiveRole)>,
        problem: Option<&Error>,
    ) -> RoleStatus {
        let prev = self.role.status.clone().unwrap_or_default();
        let generation = self.role.metadata.generation;
        let now = Time(self.ctx.clock.now());
        match (resolved, problem) {
            (Some((scopes, effective)), None) => {
                let message = format!(
                    "{} scope(s), {} permission(s); RBAC Role {} bound to {} subject(s)",
                    scopes.len(),
                    effective.permissions.len(),
                    rbac::object_name(&self.name),
                    self.role.spec.subjects.len()
                );
                RoleStatus {
                    conditions: vec![conditions::ready(
                        true,
                        "Resolved",
                        message,
                        generation,
                        &prev.conditions,
                        now,
                    )],
                    effective_scopes: scopes,
                    effective_permissions: effective.permissions.iter().copied().collect(),
                    observed_generation: generation,
                }
            }
            (_, error) => {
                let (reason, message) = error.map_or(("Unknown", String::new()), |e| {
                    (e.metric_label(), e.to_string())
                });
                RoleStatus {
                    conditions: vec![conditions::ready(
                        false,
                        reason,
                        message,
                        generation,
                        &prev.conditions,
                        now,
                    )],
                    effective_scopes: Vec::new(),
                    effective_permissions: Vec::new(),
                    observed_generation: generation,
                }
            }
        }
    }

    async fn apply_status(&self, status: &RoleStatus) -> Result<()> {
        let api = Api::<Role>::namespaced(self.ctx.client.clone(), &self.namespace);
        frame::apply_status(&api, &self.name, self.role.status.as_ref(), status).await
    }

    /// An Event when the Ready reason or message changes (see [`worth_an_event`]).
    async fn announce(&self, status: &RoleStatus) {
        let prev = self.role.status.clone().unwrap_or_default();
        let Some(now) = conditions::find_ready(&status.conditions) else {
            return;
        };
        let builtin = self.role.labels().contains_key(BUILTIN_LABEL);
        if !worth_an_event(conditions::find_ready(&prev.conditions), now, builtin) {
            return;
        }
        self.ctx
            .event(
                &self.role.object_ref(&()),
                now.status != "True",
                &now.reason,
                now.message.clone(),
            )
            .await;
    }
}

/// A delete's result, where "already gone" is success.
fn gone(result: std::result::Result<(), kube::Error>) -> Result<()> {
    match result {
        Err(e) if !crate::error::is_api_code(&e, 404) => Err(Error::Kube(e)),
        _ => Ok(()),
    }
}

/// Whether a Role's Ready condition going from `before` to `now` is news: a changed
/// reason or message is, except a built-in Role's first Ready. The operator makes five
/// per Tenant namespace and the Tenant's own Events already say the namespace is set
/// up; 1000 Tenants meant 5000 Events nobody reads, each an API request.
fn worth_an_event(before: Option<&Condition>, now: &Condition, builtin: bool) -> bool {
    match before {
        Some(before) => before.reason != now.reason || before.message != now.message,
        None => !(builtin && now.status == "True"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use portcullis_crds::{Permission, ScopeName};

    #[test]
    fn a_builtin_roles_first_ready_is_not_announced_but_its_problems_are() {
        let at = Time(jiff::Timestamp::UNIX_EPOCH);
        let ready = conditions::ready(true, "Ready", "", Some(1), &[], at.clone());
        let broken = conditions::ready(false, "MissingParent", "x", Some(1), &[], at);
        // A Role someone wrote is told it is Ready; one the operator made is not.
        assert!(worth_an_event(None, &ready, false));
        assert!(!worth_an_event(None, &ready, true));
        // Problems, and recoveries from them, are news for every Role.
        assert!(worth_an_event(None, &broken, true));
        assert!(worth_an_event(Some(&broken), &ready, true));
        assert!(!worth_an_event(Some(&ready), &ready, false));
    }

    fn custom(inherits: &[&str], scopes: &[&str]) -> RoleSpec {
        RoleSpec {
            inherits: inherits.iter().map(|s| (*s).to_owned()).collect(),
            scopes: scopes
                .iter()
                .filter_map(|s| ScopeName::new(*s).ok())
                .collect(),
            permissions: vec![Permission::AuditRead],
            ..RoleSpec::default()
        }
    }

    #[test]
    fn inheritance_errors_become_condition_reasons_naming_the_roles() {
        let mut roles = BTreeMap::new();
        roles.insert("a".to_owned(), custom(&["b"], &[]));
        roles.insert("b".to_owned(), custom(&["a"], &[]));
        roles.insert("c".to_owned(), custom(&["ghost"], &[]));
        let cycle = role::resolve("a", &roles)
            .err()
            .map(|e| inheritance_error(&e));
        let cycle = cycle.map(|e| (e.metric_label(), e.to_string()));
        assert_eq!(
            cycle,
            Some((
                "InheritanceCycle",
                "inheritance cycle: a -> b -> a".to_owned()
            ))
        );
        let missing = role::resolve("c", &roles)
            .err()
            .map(|e| inheritance_error(&e));
        let (reason, message) = missing
            .map(|e| (e.metric_label(), e.to_string()))
            .unwrap_or_default();
        assert_eq!(reason, "MissingParent");
        assert!(
            message.contains("\"c\"") && message.contains("\"ghost\""),
            "{message}"
        );
    }

    #[test]
    fn all_scopes_expands_to_the_catalogue() {
        let mut roles = BTreeMap::new();
        roles.insert("viewer".to_owned(), custom(&[], &["signals"]));
        let mut dev = custom(&["viewer"], &["identify"]);
        dev.all_scopes = true;
        roles.insert("dev".to_owned(), dev);
        let effective = role::resolve("dev", &roles).unwrap_or_default();
        assert_eq!(
            effective_scopes(&effective, ["events".to_owned(), "identify".to_owned()]),
            ["events", "identify", "signals"]
        );
        let viewer = role::resolve("viewer", &roles).unwrap_or_default();
        assert_eq!(
            effective_scopes(&viewer, ["events".to_owned()]),
            ["signals"]
        );
    }
}
