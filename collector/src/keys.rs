//! The tenants' data-encryption keys as the collector holds them: the store seals each
//! day of a tenant's log with the tenant's active DEK and opens it with any version the
//! ring still holds. The keys come from the operator (the audit server fetches them for
//! the tenants [`KeyCache::wanted`] names); the store never waits for them: a tenant
//! whose keys are not at hand yet is refused for now, and its proxies resend.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use portcullis_audit::TenantKeys;
use tokio::sync::Notify;

/// Tenant keys by tenant, and the tenants someone asked for that are not held yet.
#[derive(Debug, Default)]
pub struct KeyCache {
    held: Mutex<HashMap<String, Arc<TenantKeys>>>,
    wanted: Mutex<BTreeSet<String>>,
    asked: Notify,
}

impl KeyCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// `tenant`'s keys, when held; otherwise `tenant` is marked wanted and whoever
    /// fetches keys is woken.
    pub fn get(&self, tenant: &str) -> Option<Arc<TenantKeys>> {
        if let Some(keys) = self
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(tenant)
        {
            return Some(keys.clone());
        }
        let added = self
            .wanted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(tenant.to_owned());
        if added {
            self.asked.notify_one();
        }
        None
    }

    /// Holds `keys` for their tenant (replacing older ones: a rotation adds a version).
    pub fn insert(&self, keys: TenantKeys) {
        let tenant = keys.tenant.clone();
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(tenant.clone(), Arc::new(keys));
        self.wanted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&tenant);
    }

    /// Tenants asked for and not held.
    pub fn wanted(&self) -> Vec<String> {
        self.wanted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// Tenants held (to refresh them: a rotation makes a new active version).
    pub fn held(&self) -> Vec<String> {
        let mut held: Vec<String> = self
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        held.sort();
        held
    }

    /// Returns when a tenant was newly asked for since the last call.
    pub async fn asked(&self) {
        self.asked.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_miss_is_wanted_until_the_keys_arrive() {
        let cache = KeyCache::new();
        assert!(cache.get("shop").is_none());
        assert_eq!(cache.wanted(), vec!["shop".to_owned()]);
        cache.insert(TenantKeys::generate("shop"));
        assert!(cache.wanted().is_empty());
        assert_eq!(cache.get("shop").map(|k| k.active.version()), Some(1));
        assert_eq!(cache.held(), vec!["shop".to_owned()]);
    }
}
