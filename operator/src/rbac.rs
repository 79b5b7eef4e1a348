//! Kubernetes RBAC for a Portcullis Role: an RBAC `Role` named `portcullis:<role>` with
//! the kubectl verbs its permissions imply, and a `RoleBinding` of the same name to its
//! subjects. Both are owned by the Portcullis Role, so they go when it goes.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::rbac::v1::{
    PolicyRule, Role as RbacRole, RoleBinding, RoleRef, Subject as RbacSubject,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::ObjectMeta;
use portcullis_crds::{Permission, Subject, SubjectKind, tenant::TENANT_LABEL};

/// Label put on every RBAC object the operator writes (value: the Portcullis Role name).
pub const ROLE_LABEL: &str = "portcullis.dev/role";

/// Name of the RBAC Role and RoleBinding for a Portcullis Role.
pub fn object_name(role: &str) -> String {
    format!("portcullis:{role}")
}

const GROUP: &str = portcullis_crds::GROUP;
const READ: [&str; 3] = ["get", "list", "watch"];

/// The (API group, resource) → verbs a permission grants.
fn grants(permission: Permission) -> Vec<(&'static str, &'static str, Vec<&'static str>)> {
    match permission {
        Permission::KeysRead => vec![(GROUP, "apikeys", READ.to_vec())],
        Permission::KeysCreate => vec![(GROUP, "apikeys", vec!["create"])],
        Permission::KeysRotate => vec![(GROUP, "apikeys", vec!["patch", "update"])],
        Permission::KeysRevoke => vec![(GROUP, "apikeys", vec!["patch", "delete"])],
        Permission::RolesRead => vec![(GROUP, "roles", READ.to_vec())],
        Permission::RolesManage => vec![(
            GROUP,
            "roles",
            vec![
                "get", "list", "watch", "create", "update", "patch", "delete",
            ],
        )],
        // Audit records reach people through the collector's export (which asks the
        // API server for exactly this verb and resource), the sidecars' stdout sink
        // (pod logs) and the checkpoint/trust ConfigMaps.
        Permission::AuditRead => vec![
            (
                portcullis_api::audit_export::GROUP,
                portcullis_api::audit_export::RESOURCE,
                vec![portcullis_api::audit_export::VERB],
            ),
            ("", "pods", vec!["get", "list"]),
            ("", "pods/log", vec!["get"]),
            ("", "configmaps", READ.to_vec()),
        ],
    }
}

/// The RBAC rules for a set of permissions: one rule per (group, resource), verbs
/// merged and sorted, so the output is stable and minimal.
pub fn rules_for(permissions: &BTreeSet<Permission>) -> Vec<PolicyRule> {
    let mut merged: BTreeMap<(&str, &str), BTreeSet<&str>> = BTreeMap::new();
    for permission in permissions {
        for (group, resource, verbs) in grants(*permission) {
            merged.entry((group, resource)).or_default().extend(verbs);
        }
    }
    merged
        .into_iter()
        .map(|((group, resource), verbs)| PolicyRule {
            api_groups: Some(vec![group.to_owned()]),
            resources: Some(vec![resource.to_owned()]),
            verbs: verbs.into_iter().map(str::to_owned).collect(),
            ..PolicyRule::default()
        })
        .collect()
}

/// RBAC subjects for a Role's subjects; ServiceAccounts default to the Role's namespace.
pub fn subjects_for(subjects: &[Subject], namespace: &str) -> Vec<RbacSubject> {
    subjects
        .iter()
        .map(|s| match s.kind {
            SubjectKind::User | SubjectKind::Group => RbacSubject {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: if s.kind == SubjectKind::User {
                    "User"
                } else {
                    "Group"
                }
                .into(),
                name: s.name.clone(),
                namespace: None,
            },
            SubjectKind::ServiceAccount => RbacSubject {
                api_group: Some(String::new()),
                kind: "ServiceAccount".into(),
                name: s.name.clone(),
                namespace: Some(s.namespace.clone().unwrap_or_else(|| namespace.to_owned())),
            },
        })
        .collect()
}

fn meta(role: &str, namespace: &str, tenant: Option<&str>, owner: &OwnerReference) -> ObjectMeta {
    let mut labels = BTreeMap::from([
        (ROLE_LABEL.to_owned(), role.to_owned()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "portcullis-operator".to_owned(),
        ),
    ]);
    if let Some(tenant) = tenant {
        labels.insert(TENANT_LABEL.to_owned(), tenant.to_owned());
    }
    ObjectMeta {
        name: Some(object_name(role)),
        namespace: Some(namespace.to_owned()),
        labels: Some(labels),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    }
}

/// The RBAC Role for a Portcullis Role with these effective permissions.
pub fn rbac_role(
    role: &str,
    namespace: &str,
    tenant: Option<&str>,
    owner: &OwnerReference,
    permissions: &BTreeSet<Permission>,
) -> RbacRole {
    RbacRole {
        metadata: meta(role, namespace, tenant, owner),
        rules: Some(rules_for(permissions)),
    }
}

/// The RoleBinding of a Portcullis Role's subjects to its RBAC Role.
pub fn role_binding(
    role: &str,
    namespace: &str,
    tenant: Option<&str>,
    owner: &OwnerReference,
    subjects: &[Subject],
) -> RoleBinding {
    RoleBinding {
        metadata: meta(role, namespace, tenant, owner),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: object_name(role),
        },
        subjects: Some(subjects_for(subjects, namespace)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verbs(rules: &[PolicyRule], resource: &str) -> Vec<String> {
        rules
            .iter()
            .find(|r| r.resources.as_deref() == Some(&[resource.to_owned()]))
            .map(|r| r.verbs.clone())
            .unwrap_or_default()
    }

    #[test]
    fn key_permissions_map_to_apikey_verbs() {
        let rules = rules_for(&BTreeSet::from([Permission::KeysRead]));
        assert_eq!(verbs(&rules, "apikeys"), ["get", "list", "watch"]);
        assert_eq!(
            rules[0].api_groups.as_deref(),
            Some(&["portcullis.dev".to_owned()][..])
        );

        let rules = rules_for(&BTreeSet::from([Permission::KeysCreate]));
        assert_eq!(verbs(&rules, "apikeys"), ["create"]);
        let rules = rules_for(&BTreeSet::from([Permission::KeysRotate]));
        assert_eq!(verbs(&rules, "apikeys"), ["patch", "update"]);
        let rules = rules_for(&BTreeSet::from([Permission::KeysRevoke]));
        assert_eq!(verbs(&rules, "apikeys"), ["delete", "patch"]);
    }

    #[test]
    fn audit_read_grants_the_export_the_collector_asks_about() {
        let rules = rules_for(&BTreeSet::from([Permission::AuditRead]));
        assert_eq!(verbs(&rules, "auditrecords"), ["export"]);
        let export = rules
            .iter()
            .find(|r| r.resources.as_deref() == Some(&["auditrecords".to_owned()][..]));
        assert_eq!(
            export.and_then(|r| r.api_groups.clone()),
            Some(vec!["portcullis.dev".to_owned()])
        );
        // Keys alone do not read the audit log.
        let keys = rules_for(&BTreeSet::from([
            Permission::KeysCreate,
            Permission::KeysRead,
        ]));
        assert!(verbs(&keys, "auditrecords").is_empty());
    }

    #[test]
    fn verbs_merge_into_one_rule_per_resource() {
        let all: BTreeSet<_> = Permission::ALL.into_iter().collect();
        let rules = rules_for(&all);
        assert_eq!(
            verbs(&rules, "apikeys"),
            [
                "create", "delete", "get", "list", "patch", "update", "watch"
            ]
        );
        assert_eq!(
            verbs(&rules, "roles"),
            [
                "create", "delete", "get", "list", "patch", "update", "watch"
            ]
        );
        assert_eq!(verbs(&rules, "pods/log"), ["get"]);
        assert_eq!(
            rules
                .iter()
                .filter(|r| r.resources.as_deref() == Some(&["apikeys".to_owned()][..]))
                .count(),
            1
        );
        assert!(rules_for(&BTreeSet::new()).is_empty());
        // Nothing grants Secrets: plaintext keys are not readable through a tenant role.
        assert!(
            rules
                .iter()
                .all(|r| r.resources.as_deref() != Some(&["secrets".to_owned()][..]))
        );
    }

    #[test]
    fn subjects_and_objects_are_named_and_owned() {
        let owner = OwnerReference {
            api_version: "portcullis.dev/v1alpha1".into(),
            kind: "Role".into(),
            name: "data-engineer".into(),
            uid: "uid-1".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
        let subjects = [
            Subject {
                kind: SubjectKind::User,
                name: "david@acme.com".into(),
                namespace: None,
            },
            Subject {
                kind: SubjectKind::ServiceAccount,
                name: "ci".into(),
                namespace: None,
            },
        ];
        let binding = role_binding(
            "data-engineer",
            "acme-prod",
            Some("acme"),
            &owner,
            &subjects,
        );
        assert_eq!(
            binding.metadata.name.as_deref(),
            Some("portcullis:data-engineer")
        );
        assert_eq!(binding.role_ref.name, "portcullis:data-engineer");
        let s = binding.subjects.unwrap_or_default();
        assert_eq!(s[0].kind, "User");
        assert_eq!(s[1].namespace.as_deref(), Some("acme-prod"));
        let role = rbac_role(
            "data-engineer",
            "acme-prod",
            Some("acme"),
            &owner,
            &BTreeSet::new(),
        );
        assert_eq!(role.metadata.owner_references, Some(vec![owner]));
        assert_eq!(
            role.metadata
                .labels
                .unwrap_or_default()
                .get(TENANT_LABEL)
                .map(String::as_str),
            Some("acme")
        );
    }
}
