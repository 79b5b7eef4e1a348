//! mTLS peers a tenant admits besides its own workloads (Tenant `spec.allowedPeers`, pod
//! annotation `portcullis.dev/allowed-peers`), and certificates revoked because the pod
//! they were issued to is gone.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use portcullis_api::WorkloadId;
use portcullis_api::names::{is_dns_label, is_dns_subdomain};

/// One peer admitted besides the tenant's own workloads: set exactly one field.
/// Namespace and tenant entries match workloads of the callee's own trust domain only.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct AllowedPeer {
    /// One workload: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^spiffe://[a-z0-9._-]+/ns/[a-z0-9-]+/sa/[a-z0-9.-]+$"))]
    pub spiffe_id: Option<String>,
    /// Every workload of this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Every workload of this tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// The three shapes of an [`AllowedPeer`], once checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerMatch<'a> {
    /// Exactly this workload SPIFFE ID.
    SpiffeId(&'a str),
    /// Any workload of this namespace.
    Namespace(&'a str),
    /// Any workload of this tenant.
    Tenant(&'a str),
}

/// Whether `id` is a workload SPIFFE ID `spiffe://<td>/ns/<ns>/sa/<sa>` (a tenant URI
/// `spiffe://<td>/tenant/<t>` is not: it names no workload).
pub fn is_workload_spiffe_id(id: &str) -> bool {
    id.parse::<WorkloadId>().is_ok()
}

impl AllowedPeer {
    /// Admits the workload with this SPIFFE ID.
    pub fn spiffe_id(id: impl Into<String>) -> Self {
        Self {
            spiffe_id: Some(id.into()),
            ..Self::default()
        }
    }

    /// Admits every workload of `namespace`.
    pub fn namespace(namespace: impl Into<String>) -> Self {
        Self {
            namespace: Some(namespace.into()),
            ..Self::default()
        }
    }

    /// Admits every workload of `tenant`.
    pub fn tenant(tenant: impl Into<String>) -> Self {
        Self {
            tenant: Some(tenant.into()),
            ..Self::default()
        }
    }

    /// What the entry matches, or why it matches nothing.
    pub fn to_match(&self) -> Result<PeerMatch<'_>, String> {
        match (&self.spiffe_id, &self.namespace, &self.tenant) {
            (Some(id), None, None) if is_workload_spiffe_id(id) => Ok(PeerMatch::SpiffeId(id)),
            (Some(id), None, None) => Err(format!(
                "spiffeId {id:?} is not a workload ID; write spiffe://<trust-domain>/ns/<namespace>/sa/<service-account> (a tenant URI names no workload)"
            )),
            (None, Some(ns), None) if is_dns_label(ns) => Ok(PeerMatch::Namespace(ns)),
            (None, Some(ns), None) => Err(format!("namespace {ns:?} is not a namespace name")),
            (None, None, Some(t)) if is_dns_subdomain(t) => Ok(PeerMatch::Tenant(t)),
            (None, None, Some(t)) => Err(format!("tenant {t:?} is not a tenant name")),
            _ => Err("set exactly one of spiffeId, namespace, tenant".to_owned()),
        }
    }

    /// Parses the pod annotation: comma-separated `spiffe://...` IDs, `namespace:<ns>`
    /// and `tenant:<name>` entries.
    pub fn parse_list(text: &str) -> Result<Vec<Self>, String> {
        let mut peers = Vec::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let peer = if let Some(ns) = entry.strip_prefix("namespace:") {
                Self::namespace(ns.trim())
            } else if let Some(tenant) = entry.strip_prefix("tenant:") {
                Self::tenant(tenant.trim())
            } else if entry.starts_with("spiffe://") {
                Self::spiffe_id(entry)
            } else {
                return Err(format!(
                    "{entry:?} is not a peer; write spiffe://<trust-domain>/ns/<ns>/sa/<sa>, namespace:<ns> or tenant:<name>"
                ));
            };
            peer.to_match().map_err(|e| format!("{entry:?}: {e}"))?;
            peers.push(peer);
        }
        Ok(peers)
    }
}

/// A workload certificate the proxies must refuse: the pod it was issued to is gone,
/// and the certificate is still within its validity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevokedCertificate {
    /// The certificate's serial number, lowercase hex without leading zero bytes
    /// (`portcullis_tls::serial_hex`).
    pub serial: String,
    /// The certificate's workload SPIFFE ID (for the refusal message and audit).
    pub spiffe_id: String,
    /// When the certificate expires; after this it is dropped from the list.
    pub not_after: jiff::Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_match_one_thing_each() {
        let peers = AllowedPeer::parse_list(
            "spiffe://cluster.local/ns/web/sa/front, namespace:batch,tenant:globex",
        )
        .unwrap_or_default();
        assert_eq!(
            peers,
            vec![
                AllowedPeer::spiffe_id("spiffe://cluster.local/ns/web/sa/front"),
                AllowedPeer::namespace("batch"),
                AllowedPeer::tenant("globex"),
            ]
        );
        assert_eq!(peers[1].to_match(), Ok(PeerMatch::Namespace("batch")));
        let tenant_uri = AllowedPeer::parse_list("spiffe://cluster.local/tenant/globex");
        assert!(tenant_uri.is_err_and(|e| e.contains("not a workload ID")));
        assert!(AllowedPeer::parse_list("web").is_err());
        let both = AllowedPeer {
            namespace: Some("a".into()),
            tenant: Some("b".into()),
            ..AllowedPeer::default()
        };
        assert!(both.to_match().is_err());
        assert_eq!(AllowedPeer::parse_list(" ").unwrap_or_default(), vec![]);
    }

    #[test]
    fn a_tenant_naming_a_tenant_uri_as_peer_is_invalid() {
        let spec: crate::TenantSpec = serde_json::from_value(serde_json::json!({
            "allowedPeers": [{"tenant": "globex"}, {"spiffeId": "spiffe://td/tenant/globex"}]
        }))
        .unwrap();
        let errors = spec.validate().unwrap_err();
        assert!(errors.mentions("spec.allowedPeers[1]"), "{errors}");
        assert!(!errors.mentions("spec.allowedPeers[0]"), "{errors}");
    }
}
