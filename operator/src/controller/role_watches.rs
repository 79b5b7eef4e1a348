//! What wakes a Role reconcile, and the caches of the RBAC objects it keeps. Only
//! changes the reconciler reads wake it (see [`triggers`]): a Role's own status write,
//! a sibling's status write and the creation of its own RBAC objects do not. A Role
//! reconcile that finds its RBAC objects cached as it would apply them sends nothing.

use k8s_openapi::api::rbac::v1::{Role as RbacRole, RoleBinding};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Api, Client};
use portcullis_crds::Role;

use super::triggers::{self, New, Trigger, cached, content_and_ownership, spec_and_ownership};
use crate::rbac::ROLE_LABEL;

/// The Role controller's caches of the RBAC objects it keeps.
#[derive(Clone)]
pub struct RoleCaches {
    /// RBAC Roles labelled for a Role.
    pub rbac_roles: Store<RbacRole>,
    /// RoleBindings labelled for a Role.
    pub role_bindings: Store<RoleBinding>,
}

/// The triggers of the Role controller and the caches some of them fill.
pub struct RoleWatches {
    /// Roles whose spec, labels or owners changed, and the Roles' cache.
    pub roles: (Trigger<Role>, Store<Role>),
    /// The same changes, for the Roles inheriting from the changed one.
    pub parents: Trigger<Role>,
    /// RBAC Roles edited or deleted.
    pub rbac_roles: Trigger<RbacRole>,
    /// RoleBindings edited or deleted.
    pub role_bindings: Trigger<RoleBinding>,
    /// The caches the reconciles read.
    pub caches: RoleCaches,
}

impl RoleWatches {
    /// Watches (started when the controller polls them).
    pub fn new(client: &Client) -> Self {
        let all = watcher::Config::default();
        let owned = watcher::Config::default().labels(ROLE_LABEL);
        let roles = cached(
            Api::<Role>::all(client.clone()),
            all.clone(),
            spec_and_ownership,
            New::Wake,
        );
        let parents = Box::pin(triggers::changes(
            kube::runtime::WatchStreamExt::default_backoff(kube::runtime::watcher(
                Api::<Role>::all(client.clone()),
                all,
            )),
            spec_and_ownership,
            New::Wake,
        ));
        let (rbac_roles, rbac_role_store) = cached(
            Api::<RbacRole>::all(client.clone()),
            owned.clone(),
            content_and_ownership,
            New::Ignore,
        );
        let (role_bindings, binding_store) = cached(
            Api::<RoleBinding>::all(client.clone()),
            owned,
            content_and_ownership,
            New::Ignore,
        );
        Self {
            roles,
            parents,
            rbac_roles,
            role_bindings,
            caches: RoleCaches {
                rbac_roles: rbac_role_store,
                role_bindings: binding_store,
            },
        }
    }
}
