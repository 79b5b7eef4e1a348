//! `Tenant`: a cluster-scoped owner of namespaces, its scope catalogue and defaults.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use portcullis_api::names::is_dns_label;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    cidr::Cidr,
    duration::DurationSpec,
    peers::AllowedPeer,
    scope::{RouteRule, ScopeMap},
    validation::FieldErrors,
};

/// Label the operator puts on every namespace a tenant owns.
pub const TENANT_LABEL: &str = "portcullis.dev/tenant";
/// Default audit retention in days.
pub const DEFAULT_RETENTION_DAYS: u32 = 365;
/// Longest audit retention: seven years.
pub const MAX_RETENTION_DAYS: u32 = 2555;

/// A tenant: the namespaces it owns, the routes each scope grants, the defaults for its
/// keys, how sensitive its data is, where its audit goes and how its data is encrypted.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "portcullis.dev",
    doc = "A tenant: namespaces it owns, its scope catalogue, key defaults, data classification, audit sinks and encryption.",
    version = "v1alpha1",
    kind = "Tenant",
    plural = "tenants",
    shortname = "tn",
    category = "portcullis",
    status = "TenantStatus",
    printcolumn = r#"{"name":"Classification","type":"string","jsonPath":".spec.dataClassification"}"#,
    printcolumn = r#"{"name":"Namespaces","type":"string","jsonPath":".status.namespaces"}"#,
    printcolumn = r#"{"name":"DEK","type":"integer","jsonPath":".status.activeDekVersion"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TenantSpec {
    /// Namespaces this tenant owns, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Namespaces this tenant owns, by label (in addition to `namespaces`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// How sensitive this tenant's data is; sets what every request must present and
    /// whether audit fails closed.
    #[serde(default)]
    pub data_classification: DataClassification,
    /// Scope catalogue: scope name → routes (method + path pattern).
    #[serde(default)]
    pub scopes: ScopeMap,
    /// Defaults for the tenant's API keys.
    #[serde(default)]
    pub defaults: TenantDefaults,
    /// Where audit records go and how long they are kept.
    #[serde(default)]
    pub audit: AuditSpec,
    /// Data-encryption key settings.
    #[serde(default)]
    pub encryption: EncryptionSpec,
    /// The `portcullis-inbound` NetworkPolicy kept in each of the tenant's namespaces,
    /// selecting pods that run the proxy: `ProxiedTcp` admits TCP only (all of it reaches
    /// the proxy), `ProxyPortOnly` admits ports 4143 and 4191 only, `Unmanaged` keeps none.
    #[serde(default)]
    pub network_policy: NetworkPolicyMode,
    /// mTLS peers admitted besides this tenant's own workloads (by default a pod admits
    /// only peers of its own trust domain and tenant): a workload SPIFFE ID, a namespace
    /// or another tenant per entry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_peers: Vec<AllowedPeer>,
}

/// Which ingress the operator's NetworkPolicy (`portcullis-inbound`, one per tenant
/// namespace) admits to pods that run the proxy. Pods without the proxy (opted out,
/// host network) are never selected by it.
///
/// NetworkPolicy is enforced on the pod's original destination port, before the pod's
/// own iptables rules hand inbound TCP to the proxy; so "only through the proxy" means
/// "only TCP" for clients that dial the app's ports, and "only port 4143" only for
/// clients that dial the proxy itself (other Portcullis proxies, or Services whose
/// `targetPort` is 4143).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum NetworkPolicyMode {
    /// Admit TCP only: every TCP port is redirected to the proxy inside the pod (except
    /// the pod's `portcullis.dev/skip-inbound-ports`); UDP and SCTP, which the proxy
    /// cannot see, are refused.
    #[default]
    ProxiedTcp,
    /// Admit only the proxy's inbound port (4143) and its admin port (4191: probes,
    /// metrics). For tenants whose callers are all Portcullis proxies or reach the pods
    /// through Services that target port 4143. Node-local traffic (the kubelet's
    /// probes) is admitted by Kubernetes regardless.
    ProxyPortOnly,
    /// The operator keeps no NetworkPolicy (and deletes the one it kept).
    Unmanaged,
}

/// How sensitive a tenant's data is (DESIGN.md §6).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
pub enum DataClassification {
    /// TLS only.
    Public,
    /// TLS and authentication.
    #[default]
    Internal,
    /// mTLS or an API key; audit fails closed; seven-year retention by default.
    Confidential,
    /// mTLS and an API key; audit fails closed and is immutable; plaintext key Secrets
    /// are removed after delivery.
    Restricted,
}

impl DataClassification {
    /// Whether requests are refused when the audit record cannot be written.
    pub fn audit_fails_closed(self) -> bool {
        matches!(self, Self::Confidential | Self::Restricted)
    }

    /// Retention used when the tenant does not set one.
    pub fn default_retention_days(self) -> u32 {
        if self.audit_fails_closed() {
            MAX_RETENTION_DAYS
        } else {
            DEFAULT_RETENTION_DAYS
        }
    }
}

/// Defaults applied to keys that do not set their own values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantDefaults {
    /// Rate limit for keys without their own.
    #[serde(default)]
    pub rate_limit: RateLimit,
    /// Lifetime of keys that set neither `expiresAfter` nor `expiresAt`.
    #[serde(default = "default_key_expiry")]
    pub key_expiry: DurationSpec,
    /// Networks every request to this tenant must come from (empty: any). Applies on top
    /// of each key's own allowlist.
    #[serde(default)]
    pub ip_allowlist: Vec<Cidr>,
    /// A `kubernetes.io/tls` Secret, by name, in each pod's own namespace, whose
    /// certificate the proxy presents to clients outside the mesh (e.g. one cert-manager
    /// keeps renewed) instead of the workload certificate; a pod's
    /// `portcullis.dev/serving-certificate` annotation overrides it. Pods injected while it
    /// is set mount it; a Secret that is missing or unusable leaves them serving the
    /// workload certificate (condition `ServingCertificates`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_certificate_secret: Option<String>,
}

impl Default for TenantDefaults {
    fn default() -> Self {
        Self {
            rate_limit: RateLimit::default(),
            key_expiry: default_key_expiry(),
            ip_allowlist: Vec::new(),
            serving_certificate_secret: None,
        }
    }
}

fn default_key_expiry() -> DurationSpec {
    DurationSpec::days(90)
}

/// A per-key rate limit: `requests` per `per`, with up to `burst` extra at once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Requests allowed per window.
    #[schemars(range(min = 1))]
    pub requests: u32,
    /// The window.
    #[serde(default = "default_rate_window")]
    pub per: DurationSpec,
    /// Requests allowed at once beyond the steady rate (default: `requests / 10`, at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            requests: 1000,
            per: default_rate_window(),
            burst: Some(100),
        }
    }
}

impl RateLimit {
    /// The burst actually applied.
    pub fn effective_burst(&self) -> u32 {
        self.burst.unwrap_or((self.requests / 10).max(1))
    }
}

fn default_rate_window() -> DurationSpec {
    DurationSpec::minutes(1)
}

/// Audit settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditSpec {
    /// Days audit records are kept (default 365; 2555 for Confidential and Restricted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2555))]
    pub retention_days: Option<u32>,
    /// Where records go besides the audit collector's log: the collector forwards the
    /// tenant's log to each Splunk HEC and Datadog sink; `stdout` is the proxies' own.
    #[serde(default)]
    pub sinks: Vec<AuditSinkSpec>,
}

/// One audit destination: set exactly one field.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditSinkSpec {
    /// JSON lines on the sidecar's standard output, for cluster log collectors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<StdoutSink>,
    /// Splunk HTTP Event Collector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub splunk_hec: Option<SplunkHecSink>,
    /// Datadog logs intake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datadog: Option<DatadogSink>,
}

/// The stdout sink has no settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StdoutSink {}

/// A key of a Secret in the Portcullis namespace, where the audit collector that
/// forwards the tenant's log runs (list the Secret in the chart's
/// `audit.collector.sinkSecrets` so the collector may read it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    pub name: String,
    /// Key in the Secret's data (default `token`).
    #[serde(default = "default_secret_key")]
    pub key: String,
}

fn default_secret_key() -> String {
    "token".to_owned()
}

/// Splunk HTTP Event Collector settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SplunkHecSink {
    /// Base URL of the collector, e.g. `https://splunk.example.com:8088`.
    #[schemars(regex(pattern = r"^https?://[^\s]+$"))]
    pub url: String,
    /// Secret holding the HEC token.
    pub token_secret_ref: SecretKeyRef,
    /// Splunk index (the token's default when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<String>,
}

/// Datadog logs intake settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatadogSink {
    /// Intake base URL, e.g. `https://http-intake.logs.datadoghq.eu`.
    #[schemars(regex(pattern = r"^https?://[^\s]+$"))]
    pub url: String,
    /// Secret holding the Datadog API key.
    pub api_key_secret_ref: SecretKeyRef,
    /// Tags added to every record (`env:prod`).
    #[serde(default)]
    pub tags: Vec<String>,
}

/// Data-encryption key settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionSpec {
    /// How often the tenant's data-encryption key is replaced (old versions stay
    /// available for decryption until the audit retention ends).
    #[serde(default = "default_dek_rotation")]
    pub dek_rotation: DurationSpec,
}

impl Default for EncryptionSpec {
    fn default() -> Self {
        Self {
            dek_rotation: default_dek_rotation(),
        }
    }
}

fn default_dek_rotation() -> DurationSpec {
    DurationSpec::days(7)
}

/// What the operator observed and did for a tenant.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantStatus {
    /// `Ready` and friends.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Namespaces bound to this tenant.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Version of the data-encryption key used for new data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_dek_version: Option<u32>,
    /// Number of API keys in the tenant's namespaces.
    #[serde(default)]
    pub api_keys: u32,
    /// Number of Roles in the tenant's namespaces.
    #[serde(default)]
    pub roles: u32,
    /// Pods in the tenant's namespaces running without the proxy and not opted out
    /// (`namespace/name`, at most 20): created before the namespace was bound, while
    /// the webhook was away, or by someone who removed the container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unprotected_pods: Vec<String>,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Seals of the tenant's audit log that the operator saw the audit collector make,
    /// oldest first, thinned to at most 32 spread over the log's life: written only by
    /// the operator, so a collector that rewrites its log and seals it again cannot
    /// match them (`kubectl portcullis audit verify --tenant` checks each).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audit_anchors: Vec<SealAnchor>,
}

/// One seal of a tenant's audit log, as the operator witnessed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SealAnchor {
    /// The seal's number in the tenant's log.
    pub number: u64,
    /// SHA-256 (hex) of the seal as the collector served it.
    pub digest: String,
    /// When the collector made it (RFC 3339).
    pub sealed_at: String,
}

impl TenantSpec {
    /// Audit retention in force.
    pub fn retention_days(&self) -> u32 {
        self.audit
            .retention_days
            .unwrap_or_else(|| self.data_classification.default_retention_days())
    }

    /// Checks what the schema cannot: scope names as map keys, routes, CIDRs, sinks,
    /// namespace names. Every problem is reported with its field path.
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errors = FieldErrors::default();
        for (i, ns) in self.namespaces.iter().enumerate() {
            if !is_dns_label(ns) {
                errors.push(
                    format!("spec.namespaces[{i}]"),
                    format!("{ns:?} is not a valid namespace name"),
                );
            }
        }
        for (name, rules) in &self.scopes {
            if !is_dns_label(name) {
                errors.push(
                    format!("spec.scopes.{name}"),
                    "scope names use 1-63 lowercase letters, digits and '-'",
                );
            }
            if rules.is_empty() {
                errors.push(
                    format!("spec.scopes.{name}"),
                    "a scope needs at least one route",
                );
            }
            for (i, rule) in rules.iter().enumerate() {
                if let Err(message) = RouteRule::validate(rule) {
                    errors.push(format!("spec.scopes.{name}[{i}].path"), message);
                }
            }
        }
        for (i, cidr) in self.defaults.ip_allowlist.iter().enumerate() {
            if let Err(e) = cidr.parse() {
                errors.push(format!("spec.defaults.ipAllowlist[{i}]"), e.to_string());
            }
        }
        if let Some(secret) = &self.defaults.serving_certificate_secret
            && !portcullis_api::names::is_dns_subdomain(secret)
        {
            errors.push(
                "spec.defaults.servingCertificateSecret",
                format!("{secret:?} is not a Secret name (lowercase letters, digits, '-' and '.')"),
            );
        }
        if self.defaults.rate_limit.requests == 0 {
            errors.push("spec.defaults.rateLimit.requests", "must be at least 1");
        }
        if self.defaults.rate_limit.per.get().is_zero() {
            errors.push("spec.defaults.rateLimit.per", "must be longer than 0s");
        }
        if let Some(days) = self.audit.retention_days
            && !(1..=MAX_RETENTION_DAYS).contains(&days)
        {
            errors.push(
                "spec.audit.retentionDays",
                format!("must be between 1 and {MAX_RETENTION_DAYS} days (7 years), got {days}"),
            );
        }
        for (i, sink) in self.audit.sinks.iter().enumerate() {
            let set = usize::from(sink.stdout.is_some())
                + usize::from(sink.splunk_hec.is_some())
                + usize::from(sink.datadog.is_some());
            if set != 1 {
                errors.push(
                    format!("spec.audit.sinks[{i}]"),
                    "set exactly one of stdout, splunkHec, datadog",
                );
            }
        }
        for (i, peer) in self.allowed_peers.iter().enumerate() {
            if let Err(e) = peer.to_match() {
                errors.push(format!("spec.allowedPeers[{i}]"), e);
            }
        }
        if self.encryption.dek_rotation.get().as_secs() < 3_600 {
            errors.push("spec.encryption.dekRotation", "must be at least 1h");
        }
        errors.into_result()
    }
}
