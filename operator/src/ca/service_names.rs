//! The DNS names a workload certificate carries: those of the Services that select the
//! pod, decided from the API (never from what the pod asks for), so an API-key client
//! can verify the server it hands its key to with the tenant's trust bundle.
//!
//! The sidecar learns when to ask again through the policy bundle: it lists, per bound
//! namespace, a [`revision`] of the namespace's Service selectors; the identity service
//! returns the revision it decided from, and a proxy whose certificate was decided from
//! another one renews (the proxy's renewal loop).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use sha2::{Digest, Sha256};

/// Most Services whose names one certificate carries (two names each); more are left
/// out (by name order) with a warning.
pub const MAX_SERVICES: usize = 32;

/// The Kubernetes cluster domain when none is configured.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// A Service as far as naming goes: its name and its pod selector.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceSelector {
    /// `metadata.name`.
    pub name: String,
    /// `spec.selector` (empty: selects no pod; such Services have manual endpoints).
    pub selector: BTreeMap<String, String>,
}

impl ServiceSelector {
    /// The naming view of `service`; `None` for a Service that selects no pods.
    pub fn of(service: &Service) -> Option<Self> {
        let selector = service.spec.as_ref()?.selector.clone().unwrap_or_default();
        if selector.is_empty() {
            return None;
        }
        Some(Self {
            name: service.metadata.name.clone()?,
            selector,
        })
    }

    /// Whether this Service selects a pod with `labels`.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
    }
}

/// The names for a pod with `labels` in `namespace`: `<service>.<namespace>.svc` and
/// `<service>.<namespace>.svc.<cluster domain>` for each selecting Service, sorted.
pub fn dns_names(
    labels: &BTreeMap<String, String>,
    namespace: &str,
    services: &[ServiceSelector],
    cluster_domain: &str,
) -> Vec<String> {
    let mut selecting: Vec<&str> = services
        .iter()
        .filter(|s| s.selects(labels))
        .map(|s| s.name.as_str())
        .collect();
    selecting.sort_unstable();
    selecting.dedup();
    if selecting.len() > MAX_SERVICES {
        tracing::warn!(
            namespace,
            services = selecting.len(),
            kept = MAX_SERVICES,
            "more Services select this pod than a certificate carries; the rest are left out"
        );
        selecting.truncate(MAX_SERVICES);
    }
    selecting
        .into_iter()
        .flat_map(|service| {
            [
                format!("{service}.{namespace}.svc"),
                format!("{service}.{namespace}.svc.{cluster_domain}"),
            ]
        })
        .collect()
}

/// A short digest of a namespace's Service selectors: equal on both sides (the
/// identity service's list and the policy compiler's cache) exactly when they agree.
pub fn revision(services: &[ServiceSelector]) -> String {
    let mut sorted: Vec<&ServiceSelector> = services.iter().collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut hash = Sha256::new();
    for service in sorted {
        hash.update(service.name.as_bytes());
        hash.update([0]);
        for (key, value) in &service.selector {
            hash.update(key.as_bytes());
            hash.update([1]);
            hash.update(value.as_bytes());
            hash.update([2]);
        }
        hash.update([3]);
    }
    hex::encode(&hash.finalize()[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn service(name: &str, selector: &[(&str, &str)]) -> ServiceSelector {
        ServiceSelector {
            name: name.into(),
            selector: labels(selector),
        }
    }

    #[test]
    fn every_selecting_service_and_no_other_names_the_pod() {
        let pod = labels(&[("app", "web"), ("tier", "front")]);
        let services = [
            service("web", &[("app", "web")]),
            service("front", &[("tier", "front"), ("app", "web")]),
            service("api", &[("app", "api")]),
            service("partial", &[("app", "web"), ("tier", "back")]),
        ];
        assert_eq!(
            dns_names(&pod, "shop", &services, "cluster.local"),
            [
                "front.shop.svc",
                "front.shop.svc.cluster.local",
                "web.shop.svc",
                "web.shop.svc.cluster.local"
            ]
        );
        assert!(dns_names(&labels(&[]), "shop", &services, "cluster.local").is_empty());
        assert_eq!(
            dns_names(&pod, "shop", &services[..1], "corp.example"),
            ["web.shop.svc", "web.shop.svc.corp.example"]
        );
    }

    #[test]
    fn services_without_a_selector_select_nothing() {
        let bare: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "external"}, "spec": {"type": "ExternalName"}
        }))
        .unwrap_or_default();
        assert_eq!(ServiceSelector::of(&bare), None);
    }

    #[test]
    fn the_revision_follows_names_and_selectors_not_order() {
        let a = service("web", &[("app", "web")]);
        let b = service("api", &[("app", "api")]);
        assert_eq!(
            revision(&[a.clone(), b.clone()]),
            revision(&[b.clone(), a.clone()])
        );
        assert_ne!(
            revision(std::slice::from_ref(&a)),
            revision(&[a.clone(), b])
        );
        assert_ne!(
            revision(&[a]),
            revision(&[service("web", &[("app", "web2")])])
        );
        assert_eq!(revision(&[]).len(), 16);
    }
}
