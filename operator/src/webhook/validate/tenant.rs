//! Tenant rules: valid fields, and no namespace another Tenant already owns.

use std::collections::BTreeMap;

use portcullis_crds::{DataClassification, Tenant};

use super::{Change, Operation, Refusal, ValidatorSettings};

/// Which tenant owns which namespace, from every Tenant's `spec.namespaces` and
/// `status.namespaces` and the `portcullis.dev/tenant` namespace labels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantClaims {
    owners: BTreeMap<String, String>,
}

impl TenantClaims {
    /// Claims made by `tenants`.
    pub fn new(tenants: &[Tenant]) -> Self {
        let mut claims = Self::default();
        for tenant in tenants {
            let Some(name) = tenant.metadata.name.as_deref() else {
                continue;
            };
            let bound = tenant.status.iter().flat_map(|s| s.namespaces.iter());
            for namespace in tenant.spec.namespaces.iter().chain(bound) {
                claims.claim(namespace, name);
            }
        }
        claims
    }

    /// Records that `tenant` owns `namespace` (e.g. from the namespace's label).
    pub fn claim(&mut self, namespace: &str, tenant: &str) {
        self.owners
            .entry(namespace.to_owned())
            .or_insert_with(|| tenant.to_owned());
    }

    /// The tenant owning `namespace`, other than `except`.
    pub fn other_owner(&self, namespace: &str, except: &str) -> Option<&str> {
        self.owners
            .get(namespace)
            .map(String::as_str)
            .filter(|owner| *owner != except)
    }
}

/// Checks a Tenant change against the claims of every tenant, and a Tenant becoming
/// Restricted against where the KEK is kept when `settings` require hardware for it.
pub fn validate_tenant(
    change: &Change<'_, Tenant>,
    claims: &TenantClaims,
    settings: &ValidatorSettings,
) -> Result<(), Refusal> {
    let name = change.name;
    let Some(tenant) = change
        .object
        .filter(|_| change.operation != Operation::Delete)
    else {
        return Ok(());
    };
    if change.old_object.map(|o| &o.spec) == Some(&tenant.spec) {
        return Ok(());
    }
    tenant
        .spec
        .validate()
        .map_err(|errors| Refusal::invalid(format!("Tenant {name:?} is invalid: {errors}")))?;
    let restricted = |t: &Tenant| t.spec.data_classification == DataClassification::Restricted;
    let becomes_restricted = restricted(tenant) && !change.old_object.is_some_and(restricted);
    if becomes_restricted
        && settings.restricted_requires_hardware_kek
        && let Some(why) = settings
            .kek_custody
            .admission_warning(name, DataClassification::Restricted)
    {
        return Err(Refusal::forbidden(format!(
            "{why}. This operator refuses Restricted Tenants until its KEK is hardware-backed \
             (--restricted-requires-hardware-kek, chart value operator.restrictedRequiresHardwareKek): \
             move the KEK into an HSM (--kek-provider pkcs11, chart value kek.provider=pkcs11), \
             classify the Tenant Confidential, or turn the setting off to admit it with a warning"
        )));
    }
    for namespace in &tenant.spec.namespaces {
        if let Some(owner) = claims.other_owner(namespace, name) {
            return Err(Refusal::conflict(format!(
                "Tenant {name:?} claims namespace {namespace:?}, which Tenant {owner:?} already owns; remove it \
                 from spec.namespaces, or remove it from Tenant {owner:?} first"
            )));
        }
    }
    Ok(())
}
