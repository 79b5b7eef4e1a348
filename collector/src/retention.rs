//! How long each tenant's log is kept: the Tenant's `spec.audit.retentionDays` in a
//! cluster (through a [`RetentionPolicy`]), whole days pruned by
//! [`Collector::prune`](crate::Collector::prune).
//!
//! When a tenant's retention cannot be learnt (the API server is away), nothing of its
//! log is pruned that round: a log kept too long is pruned later, one pruned too early
//! is gone.

use std::future::Future;
use std::sync::{Arc, Mutex};

use crate::collector::{Collector, blocking};
use crate::store::{RecordStore, StoreError};

/// Where each tenant's retention comes from.
pub trait RetentionPolicy: Send + Sync + 'static {
    /// Days to keep `tenant`'s log, or `None` when that cannot be known now.
    fn days(&self, tenant: &str) -> impl Future<Output = Option<u32>> + Send;
}

/// The same retention for every tenant.
#[derive(Debug, Clone, Copy)]
pub struct FixedRetention(pub u32);

impl RetentionPolicy for FixedRetention {
    async fn days(&self, _tenant: &str) -> Option<u32> {
        Some(self.0)
    }
}

/// What one pruning round did for one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pruned {
    /// Days removed under this retention.
    Days {
        /// The retention applied.
        retention_days: u32,
        /// How many days went.
        removed: usize,
    },
    /// The retention was not known; nothing was removed.
    Skipped,
}

/// Prunes every tenant's log under `policy`; returns what happened per tenant.
pub async fn prune_all<S, R>(
    collector: &Arc<Mutex<Collector<S>>>,
    policy: &R,
) -> Result<Vec<(String, Pruned)>, StoreError>
where
    S: RecordStore + Send + 'static,
    R: RetentionPolicy,
{
    let tenants = blocking(collector, |c| c.tenants()).await?;
    let mut done = Vec::with_capacity(tenants.len());
    for tenant in tenants {
        let outcome = match policy.days(&tenant).await {
            Some(retention_days) => {
                let name = tenant.clone();
                let removed = blocking(collector, move |c| c.prune(&name, retention_days)).await?;
                Pruned::Days {
                    retention_days,
                    removed,
                }
            }
            None => Pruned::Skipped,
        };
        done.push((tenant, outcome));
    }
    Ok(done)
}
