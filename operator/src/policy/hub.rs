//! `PolicyHub`: the current bundle of every tenant, one `watch` channel per tenant.
//!
//! Publishing a bundle whose content did not change is a no-op; a changed bundle gets a
//! version strictly greater than the previous one. Versions come from the wall clock
//! (microseconds since the epoch, bumped when needed), so a replica taking over after a
//! fail-over keeps numbering upwards and sidecars never mistake a new bundle for an old.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use jiff::Timestamp;
use portcullis_crds::PolicyBundle;
use tokio::sync::watch;

use super::compiler::Exclusion;

type Slot = watch::Sender<Option<Arc<PolicyBundle>>>;

/// What `/debug/policy` shows about one tenant.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TenantSummary {
    /// The current version.
    pub version: u64,
    /// Keys in the bundle.
    pub keys: usize,
    /// Keys left out, and why.
    pub excluded: Vec<Exclusion>,
}

/// Per-tenant channels of the current bundle.
#[derive(Default)]
pub struct PolicyHub {
    tenants: Mutex<BTreeMap<String, Slot>>,
    excluded: Mutex<BTreeMap<String, Vec<Exclusion>>>,
    last_version: Mutex<u64>,
}

impl std::fmt::Debug for PolicyHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyHub").finish_non_exhaustive()
    }
}

fn same_content(a: &PolicyBundle, b: &PolicyBundle) -> bool {
    PolicyBundle {
        version: 0,
        ..a.clone()
    } == PolicyBundle {
        version: 0,
        ..b.clone()
    }
}

impl PolicyHub {
    fn slot(&self, tenant: &str) -> Slot {
        let mut tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        tenants
            .entry(tenant.to_owned())
            .or_insert_with(|| watch::channel(None).0)
            .clone()
    }

    fn next_version(&self, now: Timestamp) -> u64 {
        let mut last = self.last_version.lock().unwrap_or_else(|p| p.into_inner());
        let clock = u64::try_from(now.as_microsecond()).unwrap_or(0);
        *last = clock.max(last.saturating_add(1));
        *last
    }

    /// Publishes `bundle` for its tenant unless its content is unchanged. Returns the
    /// version published, if any.
    pub fn publish(
        &self,
        mut bundle: PolicyBundle,
        excluded: Vec<Exclusion>,
        now: Timestamp,
    ) -> Option<u64> {
        let tenant = bundle.tenant.clone();
        self.excluded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.clone(), excluded);
        let slot = self.slot(&tenant);
        if slot
            .borrow()
            .as_deref()
            .is_some_and(|current| same_content(current, &bundle))
        {
            return None;
        }
        bundle.version = self.next_version(now);
        let version = bundle.version;
        slot.send_replace(Some(Arc::new(bundle)));
        Some(version)
    }

    /// The current bundle of a tenant, if one was ever published.
    pub fn current(&self, tenant: &str) -> Option<Arc<PolicyBundle>> {
        let tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        tenants.get(tenant).and_then(|s| s.borrow().clone())
    }

    /// A receiver that sees the current bundle (once there is one) and every change.
    pub fn subscribe(&self, tenant: &str) -> watch::Receiver<Option<Arc<PolicyBundle>>> {
        self.slot(tenant).subscribe()
    }

    /// Tenants with a published bundle.
    pub fn tenants(&self) -> Vec<String> {
        let tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        tenants
            .iter()
            .filter(|(_, s)| s.borrow().is_some())
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// Version, key count and exclusions per tenant.
    pub fn summary(&self) -> BTreeMap<String, TenantSummary> {
        let excluded = self
            .excluded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.tenants()
            .into_iter()
            .filter_map(|t| {
                let bundle = self.current(&t)?;
                Some((
                    t.clone(),
                    TenantSummary {
                        version: bundle.version,
                        keys: bundle.keys.len(),
                        excluded: excluded.get(&t).cloned().unwrap_or_default(),
                    },
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(tenant: &str) -> PolicyBundle {
        PolicyBundle {
            tenant: tenant.into(),
            ..PolicyBundle::default()
        }
    }

    #[test]
    fn versions_rise_and_unchanged_content_is_not_republished() {
        let hub = PolicyHub::default();
        let t0 = Timestamp::from_second(1_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let v1 = hub.publish(bundle("acme"), Vec::new(), t0);
        assert_eq!(v1, Some(1_000_000_000));
        assert_eq!(
            hub.publish(bundle("acme"), Vec::new(), t0),
            None,
            "same content"
        );
        let mut changed = bundle("acme");
        changed.classification = portcullis_crds::DataClassification::Restricted;
        // The clock went backwards (another replica, skew): the version still rises.
        let earlier = Timestamp::from_second(10).unwrap_or(Timestamp::UNIX_EPOCH);
        let v2 = hub.publish(changed, Vec::new(), earlier);
        assert_eq!(v2, Some(1_000_000_001));
        assert_eq!(hub.current("acme").map(|b| b.version), v2);
        assert!(hub.current("globex").is_none());
        assert_eq!(hub.tenants(), ["acme"]);
    }

    #[tokio::test]
    async fn subscribers_see_the_current_bundle_then_changes() {
        let hub = PolicyHub::default();
        let mut rx = hub.subscribe("acme");
        assert!(rx.borrow_and_update().is_none(), "nothing published yet");
        hub.publish(bundle("acme"), Vec::new(), Timestamp::now());
        assert!(rx.changed().await.is_ok());
        assert!(rx.borrow_and_update().is_some());
        let mut late = hub.subscribe("acme");
        assert!(
            late.borrow_and_update().is_some(),
            "late subscriber gets the current bundle"
        );
    }
}
