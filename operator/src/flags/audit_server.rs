//! The flags of `portcullis-operator audit-server`. Every flag also reads a
//! `PORTCULLIS_AUDIT_*` variable, which is how the chart sets them.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use portcullis_api::spiffe::TrustDomain;
use portcullis_collector::MAX_RETENTION_DAYS;
use portcullis_operator::audit_server::{
    AuditServerSettings, KeySupply, RELOAD_EVERY, SINKS_EVERY,
};

use portcullis_crds::DurationSpec;

use super::values::{positive_duration, trust_domain};

/// Everything `audit-server` takes.
#[derive(Args, Debug)]
pub struct AuditServerArgs {
    /// Where proxies ship their records (mutual TLS).
    #[arg(long, env = "PORTCULLIS_AUDIT_LISTEN", default_value = "0.0.0.0:8091")]
    listen: SocketAddr,
    /// `/metrics` and `/healthz`.
    #[arg(
        long,
        env = "PORTCULLIS_AUDIT_METRICS_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    metrics_addr: SocketAddr,
    /// Where the tenant logs live (the PersistentVolume).
    #[arg(
        long,
        env = "PORTCULLIS_AUDIT_DATA_DIR",
        default_value = "/var/lib/portcullis-audit"
    )]
    data_dir: PathBuf,
    /// The serving certificate chain, PEM.
    #[arg(long, env = "PORTCULLIS_AUDIT_TLS_CERT")]
    tls_cert: PathBuf,
    /// The serving certificate's key, PEM.
    #[arg(long, env = "PORTCULLIS_AUDIT_TLS_KEY")]
    tls_key: PathBuf,
    /// The trust bundle shipping workloads' certificates chain to, PEM.
    #[arg(long, env = "PORTCULLIS_AUDIT_TRUST_BUNDLE")]
    trust_bundle: PathBuf,
    /// Workloads of this trust domain may ship.
    #[arg(long, env = "PORTCULLIS_TRUST_DOMAIN", default_value = "cluster.local", value_parser = trust_domain)]
    trust_domain: TrustDomain,
    /// Days of records kept for a tenant whose Tenant is gone, or for every tenant when
    /// the API server cannot be reached (at most 2555, seven years); a live tenant keeps
    /// its Tenant's retention.
    #[arg(long, env = "PORTCULLIS_AUDIT_RETENTION_DAYS", default_value_t = 365,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_RETENTION_DAYS)))]
    retention_days: u32,
    /// How often each tenant log that grew is sealed: signed with the serving key, so
    /// `audit verify` notices records rewritten or removed after the seal.
    #[arg(long, env = "PORTCULLIS_AUDIT_SEAL_EVERY", default_value = "1m", value_parser = positive_duration)]
    seal_every: DurationSpec,
    /// The operator's SPIFFE id (spiffe://<trust domain>/ns/<namespace>/sa/<account>):
    /// the admin changes it ships are filed under the tenants they concern.
    #[arg(long, env = "PORTCULLIS_AUDIT_ADMIN_WRITER")]
    admin_writer: Option<String>,
    /// The operator's policy server, which hands each tenant's data-encryption keys to
    /// the audit service's certificate: https://<operator service>.<namespace>.svc:8090.
    #[arg(long, env = "PORTCULLIS_AUDIT_KEY_URL")]
    key_url: String,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "PORTCULLIS_LOG_JSON")]
    pub log_json: bool,
}

impl AuditServerArgs {
    /// The settings these flags give.
    pub fn settings(&self) -> AuditServerSettings {
        AuditServerSettings {
            listen: self.listen,
            metrics_addr: self.metrics_addr,
            data_dir: self.data_dir.clone(),
            cert_file: self.tls_cert.clone(),
            key_file: self.tls_key.clone(),
            trust_bundle_file: self.trust_bundle.clone(),
            trust_domain: self.trust_domain.clone(),
            retention_days: self.retention_days,
            reload_every: RELOAD_EVERY,
            sinks_every: SINKS_EVERY,
            seal_every: self.seal_every.get(),
            admin_writer: self.admin_writer.clone(),
            keys: KeySupply::Operator(self.key_url.clone()),
        }
    }
}
