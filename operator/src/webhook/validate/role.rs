//! Role rules: valid fields, resolvable inheritance, and no granting what the requester
//! does not hold.

use portcullis_crds::Role;
use portcullis_crds::role::{InheritanceError, Permission};

use super::apikey::require_permission;
use super::{
    Catalogue, Change, NamespaceRoles, Operation, Refusal, Requester, ValidatorSettings,
    quoted_list,
};

/// Checks a Role change. `roles` are the namespace's Roles before the change.
pub fn validate_role(
    change: &Change<'_, Role>,
    requester: &Requester,
    roles: &NamespaceRoles,
    catalogue: &Catalogue,
    settings: &ValidatorSettings,
) -> Result<(), Refusal> {
    let name = change.name;
    let privileged = settings.is_privileged(requester);
    let Some(role) = change
        .object
        .filter(|_| change.operation != Operation::Delete)
    else {
        if !privileged {
            require_permission(
                requester,
                roles,
                Permission::RolesManage,
                &format!("delete Role {name:?}"),
            )?;
        }
        return Ok(());
    };
    let spec = &role.spec;
    if change.old_object.map(|o| &o.spec) == Some(spec) {
        return Ok(());
    }
    spec.validate()
        .map_err(|errors| Refusal::invalid(format!("Role {name:?} is invalid: {errors}")))?;

    let after = roles.with(name, spec.clone());
    let effective = after.resolve(name).map_err(|e| match e {
        InheritanceError::Cycle(path) => Refusal::invalid(format!(
            "Role {name:?} would create an inheritance cycle: {}; remove one of these from spec.inherits",
            path.join(" -> ")
        )),
        InheritanceError::MissingParent { role, parent } => Refusal::invalid(format!(
            "Role {role:?} inherits from {parent:?}, which does not exist in namespace {:?}; create Role \
             {parent:?} or remove it from spec.inherits",
            roles.namespace()
        )),
    })?;

    if privileged {
        return Ok(());
    }
    let verb = if change.operation == Operation::Create {
        "create"
    } else {
        "change"
    };
    require_permission(
        requester,
        roles,
        Permission::RolesManage,
        &format!("{verb} Role {name:?}"),
    )?;
    let holdings = roles.held_by(requester);
    let missing_permissions: Vec<&str> = effective
        .permissions
        .iter()
        .filter(|p| !holdings.effective.permissions.contains(p))
        .map(|p| p.as_str())
        .collect();
    let missing_scopes: Vec<&str> = if effective.all_scopes && !holdings.effective.all_scopes {
        vec!["every scope (allScopes)"]
    } else {
        effective
            .scopes
            .iter()
            .map(String::as_str)
            .filter(|s| !catalogue.held(&holdings, s))
            .collect()
    };
    let mut missing = Vec::new();
    if !missing_permissions.is_empty() {
        missing.push(format!("permissions {}", quoted_list(missing_permissions)));
    }
    if !missing_scopes.is_empty() {
        missing.push(format!("scopes {}", quoted_list(missing_scopes)));
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(Refusal::forbidden(format!(
        "user {:?} may not {verb} Role {name:?}: it would grant {}, which none of your Roles in namespace {:?} \
         grants (you hold: {}); a Role may only grant what its author holds — remove them from the Role or \
         ask a tenant owner to make this change",
        requester.username,
        missing.join(" and "),
        roles.namespace(),
        holdings.describe(),
    )))
}
