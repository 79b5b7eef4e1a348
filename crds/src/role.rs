//! `Role`: what a tenant's people and keys may do, with inheritance.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{scope::ScopeName, validation::FieldErrors};

/// A tenant role: the API scopes it may grant to keys, the admin actions it allows, the
/// roles it inherits from and the people and service accounts that hold it.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "portcullis.dev",
    doc = "A tenant role: scopes it may grant to API keys, admin permissions, inherited roles and subjects.",
    version = "v1alpha1",
    kind = "Role",
    plural = "roles",
    shortname = "pcrole",
    category = "portcullis",
    namespaced,
    status = "RoleStatus",
    printcolumn = r#"{"name":"Inherits","type":"string","jsonPath":".spec.inherits"}"#,
    printcolumn = r#"{"name":"Scopes","type":"string","jsonPath":".status.effectiveScopes"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RoleSpec {
    /// Roles whose scopes and permissions this role also has (`Developer`, `data-reader`).
    #[serde(default)]
    pub inherits: Vec<String>,
    /// API scopes this role may grant to keys.
    #[serde(default)]
    pub scopes: Vec<ScopeName>,
    /// Admin actions this role allows.
    #[serde(default)]
    pub permissions: Vec<Permission>,
    /// Who holds this role.
    #[serde(default)]
    pub subjects: Vec<Subject>,
    /// Every scope of the tenant's catalogue, present and future (built-in Owner,
    /// Admin and Developer).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all_scopes: bool,
}

/// An admin action a role may allow.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
pub enum Permission {
    /// Read ApiKeys (never their secrets).
    #[serde(rename = "keys:read")]
    KeysRead,
    /// Create ApiKeys.
    #[serde(rename = "keys:create")]
    KeysCreate,
    /// Rotate ApiKeys.
    #[serde(rename = "keys:rotate")]
    KeysRotate,
    /// Revoke and delete ApiKeys.
    #[serde(rename = "keys:revoke")]
    KeysRevoke,
    /// Read Roles.
    #[serde(rename = "roles:read")]
    RolesRead,
    /// Create, change and delete Roles.
    #[serde(rename = "roles:manage")]
    RolesManage,
    /// Read audit records.
    #[serde(rename = "audit:read")]
    AuditRead,
}

impl Permission {
    /// Every permission, for the Owner role.
    pub const ALL: [Permission; 7] = [
        Self::KeysRead,
        Self::KeysCreate,
        Self::KeysRotate,
        Self::KeysRevoke,
        Self::RolesRead,
        Self::RolesManage,
        Self::AuditRead,
    ];

    /// The name used in specs and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::KeysRead => "keys:read",
            Self::KeysCreate => "keys:create",
            Self::KeysRotate => "keys:rotate",
            Self::KeysRevoke => "keys:revoke",
            Self::RolesRead => "roles:read",
            Self::RolesManage => "roles:manage",
            Self::AuditRead => "audit:read",
        }
    }
}

/// Who holds a role.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Subject {
    /// `User`, `Group` or `ServiceAccount`.
    pub kind: SubjectKind,
    /// User name, group name or service account name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Namespace of a ServiceAccount (default: the Role's namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// The kinds of subject Kubernetes RBAC knows.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
pub enum SubjectKind {
    /// A user, as the API server authenticates it.
    User,
    /// A group of users.
    Group,
    /// A Kubernetes ServiceAccount.
    ServiceAccount,
}

/// What the operator resolved for a role.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoleStatus {
    /// `Ready` and friends.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Scopes after inheritance.
    #[serde(default)]
    pub effective_scopes: Vec<String>,
    /// Permissions after inheritance.
    #[serde(default)]
    pub effective_permissions: Vec<Permission>,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The built-in roles every tenant namespace gets, strongest first.
pub const BUILTIN_ROLES: [&str; 5] = ["Owner", "Admin", "Developer", "Analyst", "Viewer"];

/// The object name of a role reference: references are case-insensitive so specs may
/// say `Developer` for the object `developer`.
pub fn role_object_name(reference: &str) -> String {
    reference.to_ascii_lowercase()
}

/// The spec of a built-in role. Owner > Admin > {Developer, Analyst} > Viewer.
pub fn builtin_role(name: &str) -> Option<RoleSpec> {
    use Permission::*;
    let spec = |inherits: &[&str], permissions: &[Permission], all_scopes| RoleSpec {
        inherits: inherits.iter().map(|s| (*s).to_owned()).collect(),
        permissions: permissions.to_vec(),
        all_scopes,
        ..RoleSpec::default()
    };
    Some(match role_object_name(name).as_str() {
        "viewer" => spec(&[], &[KeysRead, RolesRead], false),
        "analyst" => spec(&["viewer"], &[AuditRead], false),
        "developer" => spec(&["viewer"], &[KeysCreate, KeysRotate, KeysRevoke], true),
        "admin" => spec(&["developer", "analyst"], &[RolesManage], true),
        "owner" => spec(&["admin"], &Permission::ALL, true),
        _ => return None,
    })
}

/// A role with everything inherited folded in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EffectiveRole {
    /// Scopes granted directly or through a parent.
    pub scopes: BTreeSet<String>,
    /// Whether every catalogue scope is granted.
    pub all_scopes: bool,
    /// Permissions granted directly or through a parent.
    pub permissions: BTreeSet<Permission>,
}

impl EffectiveRole {
    /// Whether `scope` may be granted, given the tenant's catalogue.
    pub fn grants_scope(&self, scope: &str) -> bool {
        self.all_scopes || self.scopes.contains(scope)
    }
}

/// Why inheritance could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InheritanceError {
    /// A role names a parent that does not exist.
    #[error("role {role:?} inherits from {parent:?}, which does not exist in this namespace")]
    MissingParent {
        /// The role naming the parent.
        role: String,
        /// The missing parent.
        parent: String,
    },
    /// Following `inherits` comes back to where it started.
    #[error("inheritance cycle: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
}

/// Resolves `role` against the roles of its namespace (object name → spec).
pub fn resolve(
    role: &str,
    roles: &BTreeMap<String, RoleSpec>,
) -> Result<EffectiveRole, InheritanceError> {
    let mut effective = EffectiveRole::default();
    let mut path = Vec::new();
    visit(
        &role_object_name(role),
        roles,
        &mut path,
        &mut BTreeSet::new(),
        &mut effective,
    )?;
    Ok(effective)
}

fn visit(
    name: &str,
    roles: &BTreeMap<String, RoleSpec>,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
    into: &mut EffectiveRole,
) -> Result<(), InheritanceError> {
    if let Some(start) = path.iter().position(|p| p == name) {
        let mut cycle = path[start..].to_vec();
        cycle.push(name.to_owned());
        return Err(InheritanceError::Cycle(cycle));
    }
    if !done.insert(name.to_owned()) {
        return Ok(()); // a diamond: already folded in
    }
    let Some(spec) = roles.get(name) else {
        return Err(InheritanceError::MissingParent {
            role: path.last().cloned().unwrap_or_default(),
            parent: name.to_owned(),
        });
    };
    into.scopes
        .extend(spec.scopes.iter().map(|s| s.as_str().to_owned()));
    into.all_scopes |= spec.all_scopes;
    into.permissions.extend(spec.permissions.iter().copied());
    path.push(name.to_owned());
    for parent in &spec.inherits {
        visit(&role_object_name(parent), roles, path, done, into)?;
    }
    path.pop();
    Ok(())
}

impl RoleSpec {
    /// Checks what the schema cannot (scope names kept as text, empty subjects).
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errors = FieldErrors::default();
        for (i, scope) in self.scopes.iter().enumerate() {
            if let Err(e) = scope.validate() {
                errors.push(format!("spec.scopes[{i}]"), e.to_string());
            }
        }
        for (i, parent) in self.inherits.iter().enumerate() {
            if !portcullis_api::names::is_dns_label(&role_object_name(parent)) {
                errors.push(
                    format!("spec.inherits[{i}]"),
                    format!("{parent:?} is not a role name"),
                );
            }
        }
        for (i, subject) in self.subjects.iter().enumerate() {
            if subject.name.is_empty() {
                errors.push(format!("spec.subjects[{i}].name"), "must not be empty");
            }
        }
        errors.into_result()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builtins() -> BTreeMap<String, RoleSpec> {
        BUILTIN_ROLES
            .iter()
            .map(|n| (role_object_name(n), builtin_role(n).unwrap()))
            .collect()
    }

    fn custom(inherits: &[&str], scopes: &[&str]) -> RoleSpec {
        RoleSpec {
            inherits: inherits.iter().map(|s| (*s).to_owned()).collect(),
            scopes: scopes.iter().map(|s| ScopeName::new(*s).unwrap()).collect(),
            ..RoleSpec::default()
        }
    }

    #[test]
    fn builtin_hierarchy_accumulates_permissions() {
        let roles = builtins();
        let owner = resolve("Owner", &roles).unwrap();
        assert_eq!(owner.permissions.len(), Permission::ALL.len());
        let viewer = resolve("Viewer", &roles).unwrap();
        assert_eq!(
            viewer.permissions,
            BTreeSet::from([Permission::KeysRead, Permission::RolesRead])
        );
        assert!(!viewer.all_scopes);
        let admin = resolve("admin", &roles).unwrap();
        assert!(
            admin.permissions.contains(&Permission::AuditRead),
            "from Analyst"
        );
        assert!(
            admin.permissions.contains(&Permission::KeysCreate),
            "from Developer"
        );
        assert!(
            admin.permissions.contains(&Permission::RolesRead),
            "from Viewer, twice removed"
        );
        let analyst = resolve("Analyst", &roles).unwrap();
        assert!(!analyst.permissions.contains(&Permission::KeysCreate));
        assert!(!analyst.grants_scope("identify"));
        assert!(
            resolve("Developer", &roles)
                .unwrap()
                .grants_scope("identify")
        );
    }

    #[test]
    fn custom_role_inherits_scopes() {
        let mut roles = builtins();
        roles.insert("reader".into(), custom(&[], &["signals"]));
        roles.insert(
            "data-engineer".into(),
            custom(&["reader", "Analyst"], &["identify"]),
        );
        let role = resolve("data-engineer", &roles).unwrap();
        assert_eq!(
            role.scopes,
            BTreeSet::from(["identify".to_owned(), "signals".to_owned()])
        );
        assert!(role.permissions.contains(&Permission::AuditRead));
        assert!(!role.grants_scope("events"));
    }

    #[test]
    fn cycle_is_reported_with_its_path() {
        let mut roles = BTreeMap::new();
        roles.insert("a".into(), custom(&["b"], &[]));
        roles.insert("b".into(), custom(&["c"], &[]));
        roles.insert("c".into(), custom(&["A"], &[]));
        let err = resolve("a", &roles).unwrap_err();
        assert_eq!(
            err,
            InheritanceError::Cycle(vec!["a".into(), "b".into(), "c".into(), "a".into()])
        );
        assert_eq!(err.to_string(), "inheritance cycle: a -> b -> c -> a");
    }

    #[test]
    fn missing_parent_is_named() {
        let mut roles = BTreeMap::new();
        roles.insert("a".into(), custom(&["ghost"], &[]));
        let err = resolve("a", &roles).unwrap_err();
        assert_eq!(
            err,
            InheritanceError::MissingParent {
                role: "a".into(),
                parent: "ghost".into()
            }
        );
        assert!(
            matches!(resolve("nobody", &roles), Err(InheritanceError::MissingParent { parent, .. }) if parent == "nobody")
        );
    }

    #[test]
    fn diamonds_are_not_cycles() {
        let roles = builtins();
        // admin -> developer -> viewer and admin -> analyst -> viewer
        assert!(resolve("Admin", &roles).is_ok());
    }

    #[test]
    fn permissions_serialise_as_written_in_specs() {
        let json = serde_json::to_string(&Permission::KeysCreate).unwrap();
        assert_eq!(json, "\"keys:create\"");
        assert!(serde_json::from_str::<Permission>("\"keys:destroy\"").is_err());
    }
}
