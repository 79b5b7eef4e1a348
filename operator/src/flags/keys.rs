//! Keys: the key-encryption key, API-key hashing and rotation, and who may read the
//! ApiKey Secrets.

use clap::Args;
use portcullis_crds::DurationSpec;
use portcullis_operator::context::SecretsBinding;
use portcullis_operator::kek_custody::KekCustody;
use portcullis_operator::run::OperatorSettings;

use super::values::dns_subdomain;

/// Key material and API-key settings.
#[derive(Args, Debug)]
#[command(next_help_heading = "Keys")]
pub(super) struct KeyFlags {
    /// An existing Secret (in --namespace) holding the key-encryption key under `kek`;
    /// by default `portcullis-kek`, created on first start.
    #[arg(long, env = "PORTCULLIS_KEK_SECRET")]
    pub(super) kek_secret: Option<String>,
    /// Refuse a Tenant becoming Restricted while the key-encryption key is a Secret
    /// (not held in an HSM or KMS); off: it is admitted with a warning.
    #[arg(long, env = "PORTCULLIS_RESTRICTED_REQUIRES_HARDWARE_KEK")]
    pub(super) restricted_requires_hardware_kek: bool,
    /// How long a rotated key's previous token stays valid.
    #[arg(long, env = "PORTCULLIS_KEY_ROTATION_OVERLAP", default_value = "1h")]
    pub(super) key_rotation_overlap: DurationSpec,
    /// bcrypt cost of new API-key hashes (4-31).
    #[arg(long, env = "PORTCULLIS_KEY_HASH_COST", default_value_t = portcullis_crds::token::HASH_COST, value_parser = clap::value_parser!(u32).range(4..=31))]
    pub(super) key_hash_cost: u32,
    /// The ClusterRole granting ApiKey Secret access, which the operator binds to its
    /// ServiceAccount in each tenant namespace (the chart's `<release>-tenant-secrets`);
    /// unset: no binding is written (the operator's credentials must reach the Secrets).
    #[arg(long, env = "PORTCULLIS_TENANT_SECRETS_ROLE", value_parser = dns_subdomain)]
    pub(super) tenant_secrets_role: Option<String>,
}

impl KeyFlags {
    /// `service_account`: the account the tenant-secrets binding names.
    pub(super) fn apply(&self, settings: &mut OperatorSettings, service_account: String) {
        settings.kek_secret.clone_from(&self.kek_secret);
        settings.restricted_requires_hardware_kek = self.restricted_requires_hardware_kek;
        if let Some(name) = &self.kek_secret {
            settings.reconcile.kek_custody = KekCustody::Secret {
                namespace: settings.reconcile.namespace.clone(),
                name: name.clone(),
            };
        }
        settings.reconcile.key_rotation_overlap = self.key_rotation_overlap.get();
        settings.reconcile.hash_cost = self.key_hash_cost;
        settings.reconcile.secrets_binding =
            self.tenant_secrets_role
                .as_ref()
                .map(|cluster_role| SecretsBinding {
                    cluster_role: cluster_role.clone(),
                    service_account,
                });
    }
}
