//! The collector's seals over each tenant's log ([`portcullis_audit::seal`]): what the
//! last seal of every tenant was, and which chains advanced since, so each seal names
//! only what is new.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use portcullis_audit::checkpoint::CheckpointSigner;
use portcullis_audit::seal::{Seal, SealedHead};
use serde_json::Value;

use crate::arrival::Arrivals;
use crate::collector::{Collector, SealError, blocking};
use crate::store::RecordStore;

/// Seals every tenant log that grew since its last seal ([`Collector::seal`]) on a
/// blocking thread; returns the tenants sealed with their new seal's number.
pub async fn seal_all<S: RecordStore + Send + 'static>(
    collector: &Arc<Mutex<Collector<S>>>,
    signer: CheckpointSigner,
) -> Result<Vec<(String, u64)>, SealError> {
    seal_grown(collector, signer, 0).await
}

/// [`Collector::seal_grown`] on a blocking thread.
pub async fn seal_grown<S: RecordStore + Send + 'static>(
    collector: &Arc<Mutex<Collector<S>>>,
    signer: CheckpointSigner,
    records: u64,
) -> Result<Vec<(String, u64)>, SealError> {
    blocking(collector, move |collector| {
        collector.seal_grown(&signer, records)
    })
    .await
}

/// The newest seal of every tenant and how far it (and the seals before it) reached.
#[derive(Debug, Default)]
pub struct Sealing {
    tenants: HashMap<String, TenantSeals>,
}

#[derive(Debug, Default)]
struct TenantSeals {
    /// The newest seal's number and digest.
    last: Option<(u64, String)>,
    /// The newest seal as stored.
    last_line: Option<String>,
    /// Request records stored since the newest seal (since start, after a restart).
    unsealed: u64,
    /// Per chain, the last seq some seal named.
    sealed: HashMap<String, u64>,
}

impl Sealing {
    /// Adopts a stored seal (recovery after a restart, in stored order); a line that
    /// is not a seal the collector could have written is ignored.
    pub fn restore(&mut self, line: &str, value: Value) {
        let Ok(digest) = portcullis_audit::seal::seal_digest(&value) else {
            return;
        };
        if let Ok(seal) = serde_json::from_value::<Seal>(value) {
            self.adopt(&seal, digest, line.to_owned());
        }
    }

    /// Forgets `tenant`'s seals (a recovery that failed half-way).
    pub fn forget(&mut self, tenant: &str) {
        self.tenants.remove(tenant);
    }

    /// Records `seal` (with its `digest`, stored as `line`) as its tenant's newest.
    pub fn adopt(&mut self, seal: &Seal, digest: String, line: String) {
        let tenant = self.tenants.entry(seal.tenant.clone()).or_default();
        tenant.last = Some((seal.number, digest));
        tenant.last_line = Some(line);
        tenant.unsealed = 0;
        for (chain, head) in &seal.heads {
            tenant.sealed.insert(chain.clone(), head.seq);
        }
    }

    /// The tenant's newest seal, as (number, digest).
    pub fn last(&self, tenant: &str) -> Option<(u64, &str)> {
        self.tenants
            .get(tenant)?
            .last
            .as_ref()
            .map(|(number, digest)| (*number, digest.as_str()))
    }

    /// Counts `records` stored for `tenant` since its newest seal.
    pub fn grew(&mut self, tenant: &str, records: u64) {
        let tenant = self.tenants.entry(tenant.to_owned()).or_default();
        tenant.unsealed = tenant.unsealed.saturating_add(records);
    }

    /// Request records stored for `tenant` since its newest seal.
    pub fn unsealed(&self, tenant: &str) -> u64 {
        self.tenants.get(tenant).map_or(0, |t| t.unsealed)
    }

    /// The tenant's newest seal as stored (one JSON line).
    pub fn last_line(&self, tenant: &str) -> Option<&str> {
        self.tenants.get(tenant)?.last_line.as_deref()
    }

    /// Per tenant, the chains that advanced since its newest seal, with their heads.
    pub fn due(&self, arrivals: &Arrivals) -> BTreeMap<String, BTreeMap<String, SealedHead>> {
        let mut due: BTreeMap<String, BTreeMap<String, SealedHead>> = BTreeMap::new();
        for (chain, head) in arrivals.chains() {
            let Some(last) = head.next_seq.checked_sub(1) else {
                continue;
            };
            let sealed = self
                .tenants
                .get(&head.tenant)
                .and_then(|tenant| tenant.sealed.get(chain));
            if sealed.is_some_and(|seq| *seq >= last) {
                continue;
            }
            due.entry(head.tenant.clone()).or_default().insert(
                chain.to_owned(),
                SealedHead {
                    seq: last,
                    hash: head.last_hash.clone(),
                },
            );
        }
        due
    }
}
