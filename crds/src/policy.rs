//! The compiled policy a sidecar enforces: one bundle per tenant, streamed by the
//! operator's policy server as newline-delimited JSON, each with a rising version.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    peers::{AllowedPeer, RevokedCertificate},
    scope::{ScopeMap, scope_for},
    tenant::DataClassification,
    token::KeyId,
};

/// Everything a sidecar needs to decide on a request, for one tenant.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyBundle {
    /// Rises with every change; sidecars ignore a bundle older than the one they hold.
    pub version: u64,
    /// The tenant's name.
    pub tenant: String,
    /// The tenant's data classification.
    pub classification: DataClassification,
    /// Scope name → routes.
    #[serde(default)]
    pub scopes: ScopeMap,
    /// Networks every request must come from (empty: any).
    #[serde(default)]
    pub tenant_ip_allowlist: Vec<IpNet>,
    /// Keys by key id.
    #[serde(default)]
    pub keys: BTreeMap<KeyId, KeyPolicy>,
    /// mTLS peers admitted besides the tenant's own workloads (Tenant `spec.allowedPeers`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_peers: Vec<AllowedPeer>,
    /// Workload certificates refused although valid: their pods are gone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_certificates: Vec<RevokedCertificate>,
    /// Per bound namespace, a digest of its Services' pod selectors: a proxy whose
    /// certificate names were decided under another one renews, so its DNS SANs follow
    /// the Services that select it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub service_revisions: BTreeMap<String, String>,
}

/// One key as a sidecar sees it: a hash, never a token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyPolicy {
    /// `<namespace>/<name>` of the ApiKey, for audit and metrics.
    pub name: String,
    /// bcrypt hash of the token.
    pub hash: String,
    /// Scopes granted.
    pub scopes: BTreeSet<String>,
    /// The rate limit in force.
    pub rate_limit: RateLimitPolicy,
    /// Networks the key may be used from (empty: any).
    #[serde(default)]
    pub ip_allowlist: Vec<IpNet>,
    /// After this the key is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<jiff::Timestamp>,
    /// A revoked key is refused.
    #[serde(default)]
    pub revoked: bool,
}

/// A GCRA rate limit: `requests` per `per_ms` milliseconds, `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitPolicy {
    /// Requests per window.
    pub requests: u32,
    /// Window length in milliseconds.
    pub per_ms: u64,
    /// Requests allowed at once.
    pub burst: u32,
}

impl Default for RateLimitPolicy {
    fn default() -> Self {
        Self {
            requests: 1000,
            per_ms: 60_000,
            burst: 100,
        }
    }
}

impl From<&crate::tenant::RateLimit> for RateLimitPolicy {
    fn from(limit: &crate::tenant::RateLimit) -> Self {
        Self {
            requests: limit.requests,
            per_ms: u64::try_from(limit.per.get().as_millis()).unwrap_or(u64::MAX),
            burst: limit.effective_burst(),
        }
    }
}

impl PolicyBundle {
    /// The scope a request needs, from this tenant's catalogue.
    pub fn scope_for(&self, method: &str, path: &str) -> Option<&str> {
        scope_for(&self.scopes, method, path)
    }
}

/// How a pod's inbound traffic must authenticate (`portcullis.dev/inbound-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InboundMode {
    /// A client certificate from the mesh.
    Mtls,
    /// An API key.
    Apikey,
    /// Either a client certificate or an API key.
    #[default]
    MtlsOrApikey,
    /// Both a client certificate and an API key.
    MtlsAndApikey,
}

impl InboundMode {
    /// The annotation value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mtls => "mtls",
            Self::Apikey => "apikey",
            Self::MtlsOrApikey => "mtls-or-apikey",
            Self::MtlsAndApikey => "mtls-and-apikey",
        }
    }
}

impl std::str::FromStr for InboundMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "mtls" => Ok(Self::Mtls),
            "apikey" => Ok(Self::Apikey),
            "mtls-or-apikey" => Ok(Self::MtlsOrApikey),
            "mtls-and-apikey" => Ok(Self::MtlsAndApikey),
            other => Err(format!(
                "unknown inbound mode {other:?}: use mtls, apikey, mtls-or-apikey or mtls-and-apikey"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scope::{HttpMethod, RouteRule};

    #[test]
    fn bundle_round_trips_as_json_without_secrets() {
        let key_id = KeyId::parse("abcdefgh2345").unwrap();
        let bundle = PolicyBundle {
            version: 7,
            tenant: "acme".into(),
            classification: DataClassification::Confidential,
            scopes: ScopeMap::from([(
                "identify".into(),
                vec![RouteRule::new(&[HttpMethod::POST], "/v1/identify")],
            )]),
            tenant_ip_allowlist: vec!["10.0.0.0/8".parse().unwrap()],
            keys: BTreeMap::from([(
                key_id.clone(),
                KeyPolicy {
                    name: "acme-prod/ingest".into(),
                    hash: "$2b$10$abc".into(),
                    scopes: BTreeSet::from(["identify".into()]),
                    rate_limit: RateLimitPolicy::default(),
                    ip_allowlist: vec!["2001:db8::/32".parse().unwrap()],
                    expires_at: Some(jiff::Timestamp::from_second(2_000_000_000).unwrap()),
                    revoked: false,
                },
            )]),
            allowed_peers: vec![crate::AllowedPeer::tenant("globex")],
            revoked_certificates: vec![RevokedCertificate {
                serial: "8a01".into(),
                spiffe_id: "spiffe://cluster.local/ns/acme-prod/sa/api".into(),
                not_after: jiff::Timestamp::from_second(2_000_000_000).unwrap(),
            }],
            service_revisions: BTreeMap::from([("acme-prod".into(), "0123456789abcdef".into())]),
        };
        let json = serde_json::to_string(&bundle).unwrap();
        assert!(json.contains("\"serviceRevisions\":{\"acme-prod\":\"0123456789abcdef\"}"));
        assert!(json.contains("\"abcdefgh2345\""));
        assert!(json.contains("\"tenantIpAllowlist\":[\"10.0.0.0/8\"]"));
        assert!(json.contains("\"allowedPeers\":[{\"tenant\":\"globex\"}]"));
        let back: PolicyBundle = serde_json::from_str(&json).unwrap();
        assert_eq!(back, bundle);
        assert_eq!(back.scope_for("POST", "/v1/identify"), Some("identify"));
    }

    #[test]
    fn inbound_modes_parse_from_annotations() {
        for mode in [
            InboundMode::Mtls,
            InboundMode::Apikey,
            InboundMode::MtlsOrApikey,
            InboundMode::MtlsAndApikey,
        ] {
            assert_eq!(mode.as_str().parse::<InboundMode>().unwrap(), mode);
        }
        assert!(
            "tls"
                .parse::<InboundMode>()
                .unwrap_err()
                .contains("mtls-or-apikey")
        );
    }
}
