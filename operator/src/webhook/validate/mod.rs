//! The validating webhook's rules for Tenant, Role and ApiKey, as pure functions over
//! the object, the requester and a snapshot of the namespace's Roles and the tenant's
//! scope catalogue. [`lookup`] reads that snapshot from the API server.
//!
//! What is checked (DESIGN.md §3):
//!
//! - ApiKey: field validation; the role exists in the namespace (built-in roles exist
//!   even before the operator has created their objects); the requested scopes are
//!   granted by the role; and no privilege escalation — the requester must hold, as a
//!   subject of some Role in the namespace (after inheritance), `keys:create` to create
//!   (or change grants), `keys:rotate` to bump `spec.rotate`, `keys:revoke` to revoke or
//!   delete, and every scope the key newly asks for.
//! - Role: field validation; inheritance resolves (no cycles, no missing parents); the
//!   requester holds `roles:manage` and every permission and scope the role would grant.
//! - Tenant: field validation; no namespace another Tenant owns.
//!
//! Cluster admins, the operator's own ServiceAccount and the control plane's
//! controllers (which delete everything in a namespace being deleted) are exempt from
//! the escalation checks, never from validation. `system:masters` is exempt by group;
//! any other user whom a SubjectAccessReview allows `*` on `*` in `portcullis.dev`
//! cluster-wide (e.g. kubeadm's `kubeadm:cluster-admins`, bound to `cluster-admin`) is
//! exempt too — asked only when the check would otherwise refuse ([`lookup`]).
//!
//! Each refusal's message is what `kubectl` prints after
//! `admission webhook "validate.portcullis.dev" denied the request: `.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::authentication::v1::UserInfo;
use portcullis_crds::role::{
    BUILTIN_ROLES, EffectiveRole, InheritanceError, Permission, Role, RoleSpec, SubjectKind,
    builtin_role, resolve, role_object_name,
};

mod apikey;
pub mod cached_lookup;
pub mod lookup;
mod role;
mod tenant;

use crate::kek_custody::KekCustody;

pub use apikey::validate_api_key;
pub use role::validate_role;
pub use tenant::{TenantClaims, validate_tenant};

/// The requesting user, from the AdmissionRequest's `userInfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requester {
    /// The authenticated user name.
    pub username: String,
    /// Its groups.
    pub groups: Vec<String>,
}

impl Requester {
    /// A user with groups.
    pub fn new(username: impl Into<String>, groups: &[&str]) -> Self {
        Self {
            username: username.into(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        }
    }

    /// From the admission request.
    pub fn from_user_info(info: &UserInfo) -> Self {
        Self {
            username: info.username.clone().unwrap_or_default(),
            groups: info.groups.clone().unwrap_or_default(),
        }
    }

    /// `user:<name>`, the audit principal.
    pub fn principal(&self) -> String {
        format!("user:{}", self.username)
    }
}

/// Who is exempt from the escalation checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidatorSettings {
    /// Groups whose members are exempt (`system:masters`).
    pub privileged_groups: Vec<String>,
    /// Users who are exempt: the operator's ServiceAccount, the controller manager.
    pub privileged_users: Vec<String>,
    /// User-name prefixes that are exempt: the kube-system controllers' ServiceAccounts.
    pub privileged_user_prefixes: Vec<String>,
    /// Where the KEK is kept: a Restricted Tenant is warned when it is not hardware.
    pub kek_custody: KekCustody,
    /// Refuse a Tenant becoming Restricted while the KEK is not hardware-backed, rather
    /// than only warn (`--restricted-requires-hardware-kek`).
    pub restricted_requires_hardware_kek: bool,
}

impl ValidatorSettings {
    /// The defaults for an operator running as ServiceAccount `service_account` in
    /// `operator_namespace`.
    pub fn new(operator_namespace: &str, service_account: &str) -> Self {
        Self {
            privileged_groups: vec!["system:masters".into()],
            privileged_users: vec![
                format!("system:serviceaccount:{operator_namespace}:{service_account}"),
                "system:kube-controller-manager".into(),
            ],
            privileged_user_prefixes: vec!["system:serviceaccount:kube-system:".into()],
            kek_custody: KekCustody::Secret {
                namespace: operator_namespace.to_owned(),
                name: crate::envelope::KEK_SECRET_NAME.to_owned(),
            },
            restricted_requires_hardware_kek: false,
        }
    }

    /// Whether `requester` skips the escalation checks.
    pub fn is_privileged(&self, requester: &Requester) -> bool {
        requester
            .groups
            .iter()
            .any(|g| self.privileged_groups.contains(g))
            || self.privileged_users.contains(&requester.username)
            || self
                .privileged_user_prefixes
                .iter()
                .any(|p| requester.username.starts_with(p.as_str()))
    }
}

/// A refused change: what the user sees and the HTTP status it maps to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The message.
    pub message: String,
    /// 403 (escalation), 409 (conflict) or 422 (invalid).
    pub code: u16,
}

impl Refusal {
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: 422,
        }
    }

    pub(crate) fn forbidden(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: 403,
        }
    }

    pub(crate) fn conflict(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: 409,
        }
    }

    /// The Kubernetes `Status.reason` for the code.
    pub fn reason(&self) -> &'static str {
        match self.code {
            403 => "Forbidden",
            409 => "Conflict",
            _ => "Invalid",
        }
    }
}

/// The admission operation, as far as validation cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// A new object.
    Create,
    /// A change to an existing object.
    Update,
    /// A deletion.
    Delete,
}

/// One change under review: the new object (create, update) and the old (update, delete).
#[derive(Clone, Copy, Debug)]
pub struct Change<'a, T> {
    /// What is happening.
    pub operation: Operation,
    /// The object's name.
    pub name: &'a str,
    /// The object's namespace (empty for cluster-scoped objects).
    pub namespace: &'a str,
    /// The object as it would be stored.
    pub object: Option<&'a T>,
    /// The object as it is stored.
    pub old_object: Option<&'a T>,
}

/// The Roles of one namespace as specs by object name, with the built-in roles present
/// even where the operator has not created their objects yet.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NamespaceRoles {
    namespace: String,
    specs: BTreeMap<String, RoleSpec>,
}

/// What a requester holds in a namespace, over every Role naming them as a subject.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Holdings {
    /// The roles held directly (object names).
    pub roles: Vec<String>,
    /// Their permissions and scopes, inheritance folded in.
    pub effective: EffectiveRole,
}

impl Holdings {
    /// Whether the holder may grant `scope`.
    pub fn grants_scope(&self, scope: &str) -> bool {
        self.effective.grants_scope(scope)
    }

    /// `developer, data-reader` or `none`, for messages.
    pub fn describe(&self) -> String {
        if self.roles.is_empty() {
            "none".to_owned()
        } else {
            self.roles.join(", ")
        }
    }
}

impl NamespaceRoles {
    /// The roles of `namespace`: built-ins, then the Role objects (which replace the
    /// built-in of the same name).
    pub fn new(namespace: impl Into<String>, roles: impl IntoIterator<Item = Role>) -> Self {
        let mut specs: BTreeMap<String, RoleSpec> = BUILTIN_ROLES
            .iter()
            .filter_map(|name| builtin_role(name).map(|spec| (role_object_name(name), spec)))
            .collect();
        for role in roles {
            if let Some(name) = role.metadata.name.clone() {
                specs.insert(role_object_name(&name), role.spec);
            }
        }
        Self {
            namespace: namespace.into(),
            specs,
        }
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Whether a role reference (`Developer`, `data-engineer`) names a role here.
    pub fn exists(&self, reference: &str) -> bool {
        self.specs.contains_key(&role_object_name(reference))
    }

    /// The spec a reference names.
    pub fn spec(&self, reference: &str) -> Option<&RoleSpec> {
        self.specs.get(&role_object_name(reference))
    }

    /// A role with inheritance folded in.
    pub fn resolve(&self, reference: &str) -> Result<EffectiveRole, InheritanceError> {
        resolve(reference, &self.specs)
    }

    /// These roles with `name` set to `spec` (the state a Role change would create).
    pub fn with(&self, name: &str, spec: RoleSpec) -> Self {
        let mut next = self.clone();
        next.specs.insert(role_object_name(name), spec);
        next
    }

    /// What `requester` holds: the union over every Role listing them (as User, one of
    /// their Groups, or their ServiceAccount). Roles that do not resolve grant nothing.
    pub fn held_by(&self, requester: &Requester) -> Holdings {
        let mut holdings = Holdings::default();
        for (name, spec) in &self.specs {
            let listed = spec.subjects.iter().any(|s| match s.kind {
                SubjectKind::User => s.name == requester.username,
                SubjectKind::Group => requester.groups.contains(&s.name),
                SubjectKind::ServiceAccount => {
                    let ns = s.namespace.as_deref().unwrap_or(&self.namespace);
                    requester.username == format!("system:serviceaccount:{ns}:{}", s.name)
                }
            });
            if !listed {
                continue;
            }
            if let Ok(effective) = self.resolve(name) {
                holdings.roles.push(name.clone());
                holdings.effective.scopes.extend(effective.scopes);
                holdings.effective.all_scopes |= effective.all_scopes;
                holdings.effective.permissions.extend(effective.permissions);
            }
        }
        holdings
    }

    /// The weakest built-in role granting `permission`, to suggest in messages.
    pub fn weakest_builtin_with(permission: Permission) -> Option<&'static str> {
        let builtins = builtin_specs();
        let mut order = BUILTIN_ROLES;
        order.reverse(); // weakest first: Viewer, Analyst, Developer, Admin, Owner
        order.into_iter().find(|name| {
            resolve(name, &builtins).is_ok_and(|r| r.permissions.contains(&permission))
        })
    }
}

fn builtin_specs() -> BTreeMap<String, RoleSpec> {
    BUILTIN_ROLES
        .iter()
        .filter_map(|name| builtin_role(name).map(|spec| (role_object_name(name), spec)))
        .collect()
}

/// The tenant's scope catalogue, which `allScopes` roles grant in full.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Catalogue {
    /// The owning tenant, when the namespace has one.
    pub tenant: Option<String>,
    /// Its scope names; `None` when unknown (no tenant), in which case `allScopes`
    /// roles grant any scope.
    pub scopes: Option<BTreeSet<String>>,
}

impl Catalogue {
    /// The catalogue of `tenant`.
    pub fn of(tenant: &portcullis_crds::Tenant) -> Self {
        Self {
            tenant: tenant.metadata.name.clone(),
            scopes: Some(tenant.spec.scopes.keys().cloned().collect()),
        }
    }

    /// Whether `role` grants `scope` here.
    pub fn role_grants(&self, role: &EffectiveRole, scope: &str) -> bool {
        role.scopes.contains(scope)
            || (role.all_scopes
                && self
                    .scopes
                    .as_ref()
                    .is_none_or(|known| known.contains(scope)))
    }

    /// Whether `holdings` let their holder grant `scope` here.
    pub fn held(&self, holdings: &Holdings, scope: &str) -> bool {
        self.role_grants(&holdings.effective, scope)
    }
}

/// `"a"` or `"a", "b"`, for messages.
pub(crate) fn quoted_list<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    items
        .into_iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}
