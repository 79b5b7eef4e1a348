//! Workload identity: the trust domain, the names in certificates, and how often each
//! level of the CA rotates.

use clap::Args;
use portcullis_api::spiffe::TrustDomain;
use portcullis_crds::DurationSpec;
use portcullis_operator::ca::CaSettings;

use super::values::{dns_subdomain, positive_duration, trust_domain};

/// The CA's settings.
#[derive(Args, Debug)]
#[command(next_help_heading = "Identity")]
pub(super) struct IdentityFlags {
    /// The cluster's DNS domain: workload certificates name their Services
    /// <service>.<ns>.svc and <service>.<ns>.svc.<cluster-domain>.
    #[arg(long, env = "PORTCULLIS_CLUSTER_DOMAIN", default_value = "cluster.local", value_parser = dns_subdomain)]
    pub(super) cluster_domain: String,
    /// SPIFFE trust domain: workloads get spiffe://<trust-domain>/ns/<ns>/sa/<sa>.
    #[arg(long, env = "PORTCULLIS_TRUST_DOMAIN", default_value = "cluster.local", value_parser = trust_domain)]
    pub(super) trust_domain: TrustDomain,
    /// Workload certificates are renewed this often.
    #[arg(long, env = "PORTCULLIS_ROTATION_PERIOD", default_value = "72h", value_parser = positive_duration)]
    pub(super) rotation_period: DurationSpec,
    /// A workload certificate stays valid this long past its rotation period.
    #[arg(long, env = "PORTCULLIS_ROTATION_GRACE", default_value = "24h")]
    pub(super) rotation_grace: DurationSpec,
    /// The issuing intermediate CA rotates this often.
    #[arg(long, env = "PORTCULLIS_INTERMEDIATE_ROTATION_PERIOD", default_value = "720h", value_parser = positive_duration)]
    pub(super) intermediate_rotation_period: DurationSpec,
    /// The root CA rotates this often (overlapping trust bundle).
    #[arg(long, env = "PORTCULLIS_ROOT_ROTATION_PERIOD", default_value = "8760h", value_parser = positive_duration)]
    pub(super) root_rotation_period: DurationSpec,
}

impl IdentityFlags {
    /// The CA settings, checked together (a leaf must rotate well within its issuer).
    pub(super) fn ca(&self) -> anyhow::Result<CaSettings> {
        let mut ca = CaSettings::new(self.trust_domain.clone());
        ca.leaf_rotation_period = self.rotation_period.get();
        ca.leaf_grace = self.rotation_grace.get();
        ca.intermediate_rotation_period = self.intermediate_rotation_period.get();
        ca.root_rotation_period = self.root_rotation_period.get();
        ca.validate().map_err(|e| {
            anyhow::anyhow!(
                "--rotation-period/--rotation-grace/--intermediate-rotation-period/--root-rotation-period \
                 (PORTCULLIS_ROTATION_PERIOD, ...): {e}"
            )
        })?;
        Ok(ca)
    }
}
