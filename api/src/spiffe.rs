//! SPIFFE IDs as Portcullis issues them.
//!
//! Two shapes exist: the workload ID `spiffe://<td>/ns/<namespace>/sa/<service-account>`
//! and the tenant ID `spiffe://<td>/tenant/<tenant>`. Both are validated on parse so code
//! holding a [`SpiffeId`] never re-checks the string.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::names::{is_dns_label, is_dns_subdomain};

const SCHEME: &str = "spiffe://";
/// SPIFFE caps a trust domain at 255 characters.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// SPIFFE caps a whole ID at 2048 bytes.
const MAX_ID_LEN: usize = 2048;

/// Why a string is not a valid Portcullis SPIFFE ID (or part of one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The string does not start with `spiffe://`.
    #[error("a SPIFFE ID must start with spiffe://")]
    MissingScheme,
    /// The trust domain is empty, too long or has characters outside `[a-z0-9._-]`.
    #[error(
        "invalid trust domain {0:?}: lowercase letters, digits, '.', '-' and '_' only, 1-255 characters"
    )]
    InvalidTrustDomain(String),
    /// The namespace is not a Kubernetes DNS label.
    #[error("invalid namespace {0:?}: must be a DNS label")]
    InvalidNamespace(String),
    /// The ServiceAccount name is not a Kubernetes DNS subdomain.
    #[error("invalid service account name {0:?}: must be a DNS subdomain")]
    InvalidServiceAccount(String),
    /// The tenant name is not a Kubernetes DNS subdomain.
    #[error("invalid tenant name {0:?}: must be a DNS subdomain")]
    InvalidTenant(String),
    /// The path is neither `/ns/<ns>/sa/<sa>` nor `/tenant/<tenant>`.
    #[error(
        "unsupported SPIFFE path {0:?}: expected /ns/<namespace>/sa/<service-account> or /tenant/<tenant>"
    )]
    UnsupportedPath(String),
    /// The ID exceeds 2048 bytes.
    #[error("SPIFFE ID longer than 2048 bytes")]
    TooLong,
}

/// A validated SPIFFE trust domain such as `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Validates `name` as a trust domain.
    pub fn new(name: impl Into<String>) -> Result<Self, SpiffeIdError> {
        let name = name.into();
        let valid = !name.is_empty()
            && name.len() <= MAX_TRUST_DOMAIN_LEN
            && name.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            });
        if valid {
            Ok(Self(name))
        } else {
            Err(SpiffeIdError::InvalidTrustDomain(name))
        }
    }

    /// The trust domain name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// The identity of a workload: `spiffe://<td>/ns/<namespace>/sa/<service-account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadId {
    trust_domain: TrustDomain,
    namespace: String,
    service_account: String,
}

impl WorkloadId {
    /// Builds a workload ID, validating namespace and ServiceAccount names.
    pub fn new(
        trust_domain: TrustDomain,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, SpiffeIdError> {
        let namespace = namespace.into();
        let service_account = service_account.into();
        if !is_dns_label(&namespace) {
            return Err(SpiffeIdError::InvalidNamespace(namespace));
        }
        if !is_dns_subdomain(&service_account) {
            return Err(SpiffeIdError::InvalidServiceAccount(service_account));
        }
        Ok(Self {
            trust_domain,
            namespace,
            service_account,
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The ServiceAccount name.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// The identity of a tenant: `spiffe://<td>/tenant/<tenant>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId {
    trust_domain: TrustDomain,
    tenant: String,
}

impl TenantId {
    /// Builds a tenant ID, validating the tenant name.
    pub fn new(
        trust_domain: TrustDomain,
        tenant: impl Into<String>,
    ) -> Result<Self, SpiffeIdError> {
        let tenant = tenant.into();
        if !is_dns_subdomain(&tenant) {
            return Err(SpiffeIdError::InvalidTenant(tenant));
        }
        Ok(Self {
            trust_domain,
            tenant,
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The tenant name.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/tenant/{}", self.trust_domain, self.tenant)
    }
}

/// A Portcullis SPIFFE ID: a workload or a tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SpiffeId {
    /// `spiffe://<td>/ns/<namespace>/sa/<service-account>`
    Workload(WorkloadId),
    /// `spiffe://<td>/tenant/<tenant>`
    Tenant(TenantId),
}

impl SpiffeId {
    /// The trust domain of either shape.
    pub fn trust_domain(&self) -> &TrustDomain {
        match self {
            Self::Workload(id) => id.trust_domain(),
            Self::Tenant(id) => id.trust_domain(),
        }
    }

    /// The workload ID, when this is one.
    pub fn as_workload(&self) -> Option<&WorkloadId> {
        match self {
            Self::Workload(id) => Some(id),
            Self::Tenant(_) => None,
        }
    }

    /// The tenant ID, when this is one.
    pub fn as_tenant(&self) -> Option<&TenantId> {
        match self {
            Self::Tenant(id) => Some(id),
            Self::Workload(_) => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Workload(id) => id.fmt(f),
            Self::Tenant(id) => id.fmt(f),
        }
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::MissingScheme)?;
        let (td, path) = rest.split_once('/').unwrap_or((rest, ""));
        let trust_domain = TrustDomain::new(td)?;
        let segments: Vec<&str> = path.split('/').collect();
        match segments.as_slice() {
            ["ns", ns, "sa", sa] => Ok(Self::Workload(WorkloadId::new(trust_domain, *ns, *sa)?)),
            ["tenant", tenant] => Ok(Self::Tenant(TenantId::new(trust_domain, *tenant)?)),
            _ => Err(SpiffeIdError::UnsupportedPath(format!("/{path}"))),
        }
    }
}

impl FromStr for WorkloadId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<SpiffeId>()? {
            SpiffeId::Workload(id) => Ok(id),
            SpiffeId::Tenant(id) => Err(SpiffeIdError::UnsupportedPath(format!(
                "/tenant/{}",
                id.tenant
            ))),
        }
    }
}

impl From<WorkloadId> for SpiffeId {
    fn from(id: WorkloadId) -> Self {
        Self::Workload(id)
    }
}

impl From<TenantId> for SpiffeId {
    fn from(id: TenantId) -> Self {
        Self::Tenant(id)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    #[test]
    fn workload_round_trips() {
        let id = WorkloadId::new(td(), "acme-prod", "api.v1").unwrap();
        let s = id.to_string();
        assert_eq!(s, "spiffe://cluster.local/ns/acme-prod/sa/api.v1");
        assert_eq!(s.parse::<SpiffeId>().unwrap(), SpiffeId::Workload(id));
    }

    #[test]
    fn tenant_round_trips() {
        let id = TenantId::new(td(), "acme").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/tenant/acme");
        assert_eq!(
            id.to_string().parse::<SpiffeId>().unwrap(),
            SpiffeId::Tenant(id)
        );
    }

    #[test]
    fn rejects_malformed_ids() {
        let cases = [
            (
                "https://cluster.local/ns/a/sa/b",
                SpiffeIdError::MissingScheme,
            ),
            (
                "spiffe://Cluster.Local/ns/a/sa/b",
                SpiffeIdError::InvalidTrustDomain("Cluster.Local".into()),
            ),
            (
                "spiffe:///ns/a/sa/b",
                SpiffeIdError::InvalidTrustDomain(String::new()),
            ),
            (
                "spiffe://td/ns/A/sa/b",
                SpiffeIdError::InvalidNamespace("A".into()),
            ),
            (
                "spiffe://td/ns/-a/sa/b",
                SpiffeIdError::InvalidNamespace("-a".into()),
            ),
            (
                "spiffe://td/ns/a.b/sa/b",
                SpiffeIdError::InvalidNamespace("a.b".into()),
            ),
            (
                "spiffe://td/ns/a/sa/b..c",
                SpiffeIdError::InvalidServiceAccount("b..c".into()),
            ),
            (
                "spiffe://td/ns/a/sa/",
                SpiffeIdError::InvalidServiceAccount(String::new()),
            ),
            (
                "spiffe://td/ns/a/sa/b/extra",
                SpiffeIdError::UnsupportedPath("/ns/a/sa/b/extra".into()),
            ),
            ("spiffe://td", SpiffeIdError::UnsupportedPath("/".into())),
            (
                "spiffe://td/tenant/Acme",
                SpiffeIdError::InvalidTenant("Acme".into()),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<SpiffeId>(), Err(want), "{input}");
        }
        let long_ns = "a".repeat(64);
        assert!(matches!(
            format!("spiffe://td/ns/{long_ns}/sa/b").parse::<SpiffeId>(),
            Err(SpiffeIdError::InvalidNamespace(_))
        ));
    }

    #[test]
    fn workload_parse_refuses_tenant_ids() {
        assert!("spiffe://td/tenant/acme".parse::<WorkloadId>().is_err());
    }

    #[test]
    fn serde_uses_the_string_form() {
        let id: SpiffeId = "spiffe://td/ns/a/sa/b".parse().unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://td/ns/a/sa/b\"");
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://td/x\"").is_err());
    }
}
