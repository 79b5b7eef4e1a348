//! Revoked workload certificates: leaves in a tenant's ledger ([`crate::ca::issued`])
//! whose pod no longer exists, listed in the tenant's bundle until they expire. The
//! sidecars refuse their holders (403 `peer_certificate_revoked`).
//!
//! A tenant that admits other tenants' workloads (`spec.allowedPeers`) also lists their
//! revoked leaves. (Peers a pod admits by annotation are not known here: their
//! revocations reach that pod only when the Tenant admits them too.)
//!
//! A pod that is absent from the pod cache is taken as gone only once its leaf is
//! [`SETTLE`] old: the identity service saw the pod before signing, so by then the cache
//! has had ample time to list it; a younger leaf is looked at again when it comes of age.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Api, Client};
use portcullis_crds::{AllowedPeer, RevokedCertificate, peers::PeerMatch};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::ca::issued::{IssuedLeaf, LEDGER_LABEL, LEDGER_PREFIX, leaves_of};
use crate::stores::reflect_events;

/// How long after signing a leaf whose pod is not in the cache is trusted to be orphaned.
pub const SETTLE: SignedDuration = SignedDuration::from_secs(10);

/// The leaves of `ledger` to revoke, given the UIDs of the pods that exist, and when the
/// answer next changes by itself (a leaf expires or comes of age).
pub fn revoked_leaves(
    ledger: &BTreeMap<String, IssuedLeaf>,
    live_pods: &HashSet<String>,
    now: Timestamp,
) -> (Vec<RevokedCertificate>, Option<Timestamp>) {
    let mut revoked = Vec::new();
    let mut next: Option<Timestamp> = None;
    let mut note = |at: Timestamp| next = Some(next.map_or(at, |n| n.min(at)));
    for (serial, leaf) in ledger {
        if leaf.not_after <= now || live_pods.contains(&leaf.pod_uid) {
            continue;
        }
        let of_age = leaf
            .issued_at
            .saturating_add(SETTLE)
            .unwrap_or(leaf.issued_at);
        if of_age > now {
            note(of_age);
            continue;
        }
        note(leaf.not_after);
        revoked.push(RevokedCertificate {
            serial: serial.clone(),
            spiffe_id: leaf.spiffe_id.clone(),
            not_after: leaf.not_after,
        });
    }
    (revoked, next)
}

/// Whether workload ID `spiffe_id` lives in `namespace`.
fn in_namespace(spiffe_id: &str, namespace: &str) -> bool {
    spiffe_id
        .split('/')
        .skip_while(|segment| *segment != "ns")
        .nth(1)
        .is_some_and(|ns| ns == namespace)
}

/// What the bundle of `tenant` (admitting `allowed`) lists: the tenant's own revoked
/// leaves and those of every peer it admits, sorted, once each.
pub fn for_bundle(
    by_tenant: &HashMap<String, Vec<RevokedCertificate>>,
    tenant: &str,
    allowed: &[AllowedPeer],
) -> Vec<RevokedCertificate> {
    let everyone = || by_tenant.values().flatten();
    let mut listed: Vec<RevokedCertificate> = by_tenant
        .get(tenant)
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    for entry in allowed {
        match entry.to_match() {
            Ok(PeerMatch::Tenant(other)) => {
                listed.extend(by_tenant.get(other).into_iter().flatten().cloned());
            }
            Ok(PeerMatch::Namespace(ns)) => listed.extend(
                everyone()
                    .filter(|r| in_namespace(&r.spiffe_id, ns))
                    .cloned(),
            ),
            Ok(PeerMatch::SpiffeId(id)) => {
                listed.extend(everyone().filter(|r| r.spiffe_id == id).cloned());
            }
            Err(_) => {}
        }
    }
    listed.sort();
    listed.dedup();
    listed
}

/// Caches of the ledger ConfigMaps and of pod metadata, kept on every replica.
#[derive(Clone)]
pub struct RevocationCaches {
    ledgers: Store<ConfigMap>,
    pods: Store<PartialObjectMeta<Pod>>,
}

impl std::fmt::Debug for RevocationCaches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationCaches")
            .field("ledgers", &self.ledgers.len())
            .field("pods", &self.pods.len())
            .finish()
    }
}

impl RevocationCaches {
    /// Starts watching the ledgers in `namespace` (the operator's) and every pod's
    /// metadata; `changed` is notified on every event.
    pub fn start(
        client: &Client,
        namespace: &str,
        changed: Arc<Notify>,
        shutdown: &CancellationToken,
    ) -> (Self, Vec<JoinHandle<()>>) {
        let (ledgers, ledger_writer) = reflector::store();
        let (pods, pod_writer) = reflector::store();
        let tasks = vec![
            reflect_events(
                watcher::watcher(
                    Api::<ConfigMap>::namespaced(client.clone(), namespace),
                    watcher::Config::default().labels(&format!("{LEDGER_LABEL}=true")),
                ),
                ledger_writer,
                changed.clone(),
                shutdown.clone(),
            ),
            reflect_events(
                // Metadata only: the UIDs are all that is needed.
                watcher::watcher(
                    Api::<PartialObjectMeta<Pod>>::all(client.clone()),
                    watcher::Config::default(),
                ),
                pod_writer,
                changed,
                shutdown.clone(),
            ),
        ];
        (Self { ledgers, pods }, tasks)
    }

    /// Resolves once both caches have had their first list: before that every pod
    /// would look deleted. Call from one task only (see `Stores::wait_until_ready`).
    pub async fn wait_until_ready(&self) -> bool {
        self.ledgers.wait_until_ready().await.is_ok() && self.pods.wait_until_ready().await.is_ok()
    }

    /// The UIDs of every pod in the cache.
    pub fn live_pods(&self) -> HashSet<String> {
        self.pods
            .state()
            .iter()
            .filter_map(|pod| pod.metadata.uid.clone())
            .collect()
    }

    /// Every tenant's revoked leaves (see [`revoked_leaves`]), and when that next
    /// changes by itself.
    pub fn revoked_by_tenant(
        &self,
        now: Timestamp,
    ) -> (HashMap<String, Vec<RevokedCertificate>>, Option<Timestamp>) {
        let live = self.live_pods();
        let mut next: Option<Timestamp> = None;
        let mut by_tenant = HashMap::new();
        for ledger in self.ledgers.state() {
            let Some(tenant) = ledger
                .metadata
                .name
                .as_deref()
                .and_then(|name| name.strip_prefix(LEDGER_PREFIX))
            else {
                continue;
            };
            let (revoked, at) = revoked_leaves(&leaves_of(&ledger), &live, now);
            if let Some(at) = at {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
            if !revoked.is_empty() {
                by_tenant.insert(tenant.to_owned(), revoked);
            }
        }
        (by_tenant, next)
    }

    /// The ledger of `tenant`.
    pub fn ledger(&self, tenant: &str) -> BTreeMap<String, IssuedLeaf> {
        let name = format!("{LEDGER_PREFIX}{tenant}");
        self.ledgers
            .find(|cm| cm.metadata.name.as_deref() == Some(name.as_str()))
            .map(|cm| leaves_of(&cm))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + second).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn leaf(uid: &str, issued: i64, expires: i64) -> IssuedLeaf {
        IssuedLeaf {
            pod_uid: uid.into(),
            pod: format!("acme-prod/{uid}"),
            spiffe_id: "spiffe://cluster.local/ns/acme-prod/sa/api".into(),
            issued_at: at(issued),
            not_after: at(expires),
        }
    }

    fn revoked(serial: &str, ns: &str) -> RevokedCertificate {
        RevokedCertificate {
            serial: serial.into(),
            spiffe_id: format!("spiffe://cluster.local/ns/{ns}/sa/api"),
            not_after: at(1000),
        }
    }

    #[test]
    fn a_bundle_lists_the_revocations_of_the_peers_it_admits() {
        let by_tenant = HashMap::from([
            ("acme".to_owned(), vec![revoked("0a", "acme-prod")]),
            (
                "globex".to_owned(),
                vec![revoked("0b", "globex-web"), revoked("0c", "globex-batch")],
            ),
        ]);
        let serials = |allowed: &[AllowedPeer]| {
            for_bundle(&by_tenant, "acme", allowed)
                .into_iter()
                .map(|r| r.serial)
                .collect::<Vec<_>>()
        };
        assert_eq!(serials(&[]), ["0a"]);
        assert_eq!(
            serials(&[AllowedPeer::tenant("globex")]),
            ["0a", "0b", "0c"]
        );
        assert_eq!(
            serials(&[AllowedPeer::namespace("globex-web")]),
            ["0a", "0b"]
        );
        assert_eq!(
            serials(&[
                AllowedPeer::spiffe_id("spiffe://cluster.local/ns/globex-batch/sa/api"),
                AllowedPeer::tenant("globex"),
            ]),
            ["0a", "0b", "0c"]
        );
        assert!(for_bundle(&by_tenant, "initech", &[]).is_empty());
    }

    #[test]
    fn leaves_of_deleted_pods_are_revoked_until_they_expire() {
        let ledger = BTreeMap::from([
            ("0a".to_owned(), leaf("live", 0, 1000)),
            ("0b".to_owned(), leaf("deleted", 0, 1000)),
            ("0c".to_owned(), leaf("deleted-long-ago", 0, 50)),
            ("0d".to_owned(), leaf("just-issued", 95, 1000)),
        ]);
        let live = HashSet::from(["live".to_owned()]);
        let (revoked, next) = revoked_leaves(&ledger, &live, at(100));
        let serials: Vec<_> = revoked.iter().map(|r| r.serial.as_str()).collect();
        assert_eq!(serials, ["0b"]);
        assert_eq!(revoked[0].not_after, at(1000));
        // The young leaf comes of age at 105: compile again then.
        assert_eq!(next, Some(at(105)));
        let (revoked, next) = revoked_leaves(&ledger, &live, at(105));
        assert_eq!(revoked.len(), 2);
        assert_eq!(next, Some(at(1000)));
        assert!(revoked_leaves(&ledger, &live, at(1000)).0.is_empty());
    }
}
