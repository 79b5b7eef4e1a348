//! ApiKey rules: valid fields, an existing role that grants every scope, and no
//! privilege escalation by the requester.

use std::collections::BTreeSet;

use portcullis_crds::role::{Permission, role_object_name};
use portcullis_crds::{ApiKey, ApiKeySpec};

use super::{
    Catalogue, Change, NamespaceRoles, Operation, Refusal, Requester, ValidatorSettings,
    quoted_list,
};

/// Checks an ApiKey change. `roles` and `catalogue` describe the key's namespace now.
pub fn validate_api_key(
    change: &Change<'_, ApiKey>,
    requester: &Requester,
    roles: &NamespaceRoles,
    catalogue: &Catalogue,
    settings: &ValidatorSettings,
) -> Result<(), Refusal> {
    let name = change.name;
    let privileged = settings.is_privileged(requester);
    let Some(key) = change
        .object
        .filter(|_| change.operation != Operation::Delete)
    else {
        // Deleting a key ends its use: the same permission as revoking it.
        if !privileged {
            require_permission(
                requester,
                roles,
                Permission::KeysRevoke,
                &format!("delete ApiKey {name:?}"),
            )?;
        }
        return Ok(());
    };
    let spec = &key.spec;
    let old = change.old_object.map(|o| &o.spec);
    if old == Some(spec) {
        return Ok(()); // metadata only (labels, finalizers): RBAC's business
    }

    spec.validate()
        .map_err(|errors| Refusal::invalid(format!("ApiKey {name:?} is invalid: {errors}")))?;

    if !roles.exists(&spec.role) {
        let object = role_object_name(&spec.role);
        return Err(Refusal::invalid(format!(
            "ApiKey {name:?} names role {:?}, which does not exist in namespace {:?}; use a built-in role \
             (Owner, Admin, Developer, Analyst, Viewer) or create Role {object:?}",
            spec.role,
            roles.namespace()
        )));
    }
    let role = roles.resolve(&spec.role).map_err(|e| {
        Refusal::invalid(format!(
            "ApiKey {name:?} names role {:?}, which cannot be resolved: {e}",
            spec.role
        ))
    })?;
    let mut problems = Vec::new();
    for scope in &spec.scopes {
        let scope = scope.as_str();
        if catalogue.role_grants(&role, scope) {
            continue;
        }
        let object = role_object_name(&spec.role);
        problems.push(match (&catalogue.tenant, role.all_scopes) {
            (Some(tenant), true) => format!(
                "ApiKey {name:?} asks for scope {scope:?} which role {:?} does not grant: tenant {tenant:?} \
                 has no such scope; add it to Tenant {tenant:?} spec.scopes or remove it from spec.scopes",
                spec.role
            ),
            _ => format!(
                "ApiKey {name:?} asks for scope {scope:?} which role {:?} does not grant; grant it in Role \
                 {object:?} or remove it from spec.scopes",
                spec.role
            ),
        });
    }
    if !problems.is_empty() {
        return Err(Refusal::invalid(problems.join("; ")));
    }

    if privileged {
        return Ok(());
    }
    for (permission, action) in needed_permissions(name, spec, old) {
        require_permission(requester, roles, permission, &action)?;
    }
    let old_scopes: BTreeSet<&str> = old
        .iter()
        .flat_map(|o| o.scopes.iter().map(|s| s.as_str()))
        .collect();
    let holdings = roles.held_by(requester);
    let missing: Vec<&str> = spec
        .scopes
        .iter()
        .map(|s| s.as_str())
        .filter(|s| !old_scopes.contains(s) && !catalogue.held(&holdings, s))
        .collect();
    if !missing.is_empty() {
        let (noun, pronoun) = if missing.len() == 1 {
            ("scope", "it")
        } else {
            ("scopes", "them")
        };
        return Err(Refusal::forbidden(format!(
            "user {:?} may not grant {noun} {} to ApiKey {name:?}: none of your Roles in namespace {:?} \
             grants {pronoun} (you hold: {}); ask a tenant admin for a Role with {pronoun}, or remove {pronoun} \
             from spec.scopes",
            requester.username,
            quoted_list(missing.iter().copied()),
            roles.namespace(),
            holdings.describe(),
        )));
    }
    Ok(())
}

/// The permissions a create or update needs, each with the action for the message.
fn needed_permissions(
    name: &str,
    spec: &ApiKeySpec,
    old: Option<&ApiKeySpec>,
) -> Vec<(Permission, String)> {
    let Some(old) = old else {
        return vec![(Permission::KeysCreate, format!("create ApiKey {name:?}"))];
    };
    let mut needed = Vec::new();
    if spec.rotate != old.rotate {
        needed.push((Permission::KeysRotate, format!("rotate ApiKey {name:?}")));
    }
    if spec.revoked && !old.revoked {
        needed.push((Permission::KeysRevoke, format!("revoke ApiKey {name:?}")));
    }
    // Anything else (role, scopes, limits, expiry, un-revoking) re-issues grants.
    let mut rest = spec.clone();
    rest.rotate = old.rotate;
    if spec.revoked && !old.revoked {
        rest.revoked = old.revoked;
    }
    if &rest != old {
        needed.push((Permission::KeysCreate, format!("change ApiKey {name:?}")));
    }
    needed
}

/// Refuses unless `requester` holds `permission` in the namespace.
pub(super) fn require_permission(
    requester: &Requester,
    roles: &NamespaceRoles,
    permission: Permission,
    action: &str,
) -> Result<(), Refusal> {
    let holdings = roles.held_by(requester);
    if holdings.effective.permissions.contains(&permission) {
        return Ok(());
    }
    let example = NamespaceRoles::weakest_builtin_with(permission)
        .map(|r| format!(", such as {r}"))
        .unwrap_or_default();
    Err(Refusal::forbidden(format!(
        "user {user:?} may not {action}: that needs permission {perm}, which none of your Roles in namespace \
         {ns:?} grants (you hold: {held}); ask a tenant admin to add you (User {user:?}) to the subjects of a \
         Role with {perm}{example}",
        user = requester.username,
        perm = permission.as_str(),
        ns = roles.namespace(),
        held = holdings.describe(),
    )))
}
