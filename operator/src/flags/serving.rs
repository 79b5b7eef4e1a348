//! Where the operator listens and what its serving certificates are called.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use portcullis_crds::DurationSpec;
use portcullis_operator::audit_witness::WitnessSettings;
use portcullis_operator::run::{self, OperatorSettings};

use super::values::{dns_label, dns_subdomain, positive_duration, san};

/// The operator's Service, its listeners and their certificate names.
#[derive(Args, Debug)]
#[command(next_help_heading = "Listeners")]
pub(super) struct ServingFlags {
    /// The operator's Service: its serving certificates name <service>.<ns>.svc and
    /// <service>.<ns>.svc.cluster.local, and injected pods call it there.
    #[arg(long, env = "PORTCULLIS_SERVICE_NAME", default_value = run::SERVICE_NAME, value_parser = dns_label)]
    pub(super) service_name: String,
    /// The ServiceAccount the operator runs as (exempt from the webhook's escalation
    /// check); default: the Service name.
    #[arg(long, env = "PORTCULLIS_SERVICE_ACCOUNT", value_parser = dns_subdomain)]
    pub(super) service_account: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "PORTCULLIS_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub(super) metrics_addr: SocketAddr,
    /// Address of the policy server (mTLS).
    #[arg(long, env = "PORTCULLIS_POLICY_ADDR", default_value = "0.0.0.0:8090")]
    pub(super) policy_addr: SocketAddr,
    /// Address of the identity service.
    #[arg(long, env = "PORTCULLIS_IDENTITY_ADDR", default_value = "0.0.0.0:8443")]
    pub(super) identity_addr: SocketAddr,
    /// Address of the admission webhooks.
    #[arg(long, env = "PORTCULLIS_WEBHOOK_ADDR", default_value = "0.0.0.0:9443")]
    pub(super) webhook_addr: SocketAddr,
    /// Another name (DNS name or IP address) for the identity, policy and webhook
    /// serving certificates; repeatable (environment: comma-separated).
    #[arg(long = "extra-san", env = "PORTCULLIS_EXTRA_SANS", value_delimiter = ',', value_parser = san)]
    pub(super) extra_sans: Vec<String>,
    /// The audit service's Service (in --namespace): the operator keeps its serving
    /// certificate, from the workload CA, in the Secret <name>-tls (default: none).
    #[arg(long, env = "PORTCULLIS_AUDIT_SERVICE", value_parser = dns_label)]
    pub(super) audit_service: Option<String>,
    /// How often the audit collector's newest seal of each tenant log is witnessed into
    /// the Tenant's status.auditAnchors (with --audit-collector-url and --audit-service).
    #[arg(long, env = "PORTCULLIS_AUDIT_WITNESS_EVERY", default_value = "5m", value_parser = positive_duration)]
    pub(super) audit_witness_every: DurationSpec,
    /// The token the witness shows the audit collector: the operator's ServiceAccount
    /// token, which the collector checks with the API server.
    #[arg(
        long,
        env = "PORTCULLIS_AUDIT_TOKEN_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    pub(super) audit_token_file: PathBuf,
    /// Serve the policy server over plain HTTP, to anyone, without the tenant check
    /// (audit keys are then not served). For debugging only: never in a cluster.
    #[arg(long, env = "PORTCULLIS_POLICY_INSECURE_DEBUG")]
    pub(super) policy_insecure_debug: bool,
}

impl ServingFlags {
    pub(super) fn apply(&self, settings: &mut OperatorSettings) {
        settings.metrics_addr = self.metrics_addr;
        settings.policy_addr = self.policy_addr;
        settings.policy_insecure_debug = self.policy_insecure_debug;
        settings.identity_addr = self.identity_addr;
        settings.service_name.clone_from(&self.service_name);
        settings.extra_sans.clone_from(&self.extra_sans);
        settings.audit_service.clone_from(&self.audit_service);
    }

    /// The witness of the collector at `collector_url` (the one pods ship to), whose
    /// certificate names the audit Service in `namespace`; none without both.
    pub(super) fn audit_witness(
        &self,
        namespace: &str,
        collector_url: Option<&String>,
    ) -> Option<WitnessSettings> {
        let service = self.audit_service.as_ref()?;
        Some(WitnessSettings {
            collector_url: collector_url?.clone(),
            server_name: format!("{service}.{namespace}.svc"),
            token_file: self.audit_token_file.clone(),
            every: self.audit_witness_every.get(),
        })
    }

    /// The ServiceAccount the operator runs as.
    pub(super) fn service_account(&self) -> String {
        self.service_account
            .clone()
            .unwrap_or_else(|| self.service_name.clone())
    }
}
