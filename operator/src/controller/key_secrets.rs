//! What wakes the ApiKey controller when a key's Secret changes: a watch on labelled
//! key Secrets in each bound namespace, not across the cluster, since the operator may
//! read Secrets only in namespaces a Tenant holds (see [`super::tenant_secrets`]).
//! Watches start and stop as Tenants bind and release namespaces, followed from the
//! Tenant cache every [`FOLLOW_EVERY`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use portcullis_crds::ApiKey;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::key_lifecycle::SECRET_LABEL;
use crate::stores::Stores;

/// How often the set of watched namespaces is brought up to date. A namespace bound
/// in between has no Secret of its keys yet: the keys' own reconciles create them.
pub const FOLLOW_EVERY: Duration = Duration::from_secs(2);

/// Queued triggers before the watches wait for the controller.
const BUFFER: usize = 1_024;

/// The ApiKeys whose Secret was created, changed or deleted, until `shutdown`.
pub fn triggers(
    client: Client,
    stores: Stores,
    shutdown: CancellationToken,
) -> impl Stream<Item = ObjectRef<ApiKey>> + Send + 'static {
    let (tx, rx) = mpsc::channel(BUFFER);
    tokio::spawn(follow(client, stores, tx, shutdown));
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|k| (k, rx)) })
}

/// Namespaces bound by some Tenant, as the Tenant statuses list them.
fn bound_namespaces(stores: &Stores) -> BTreeSet<String> {
    stores
        .tenants
        .state()
        .iter()
        .flat_map(|t| Stores::namespaces_of(t))
        .collect()
}

async fn follow(
    client: Client,
    stores: Stores,
    tx: mpsc::Sender<ObjectRef<ApiKey>>,
    shutdown: CancellationToken,
) {
    let mut watches: BTreeMap<String, JoinHandle<()>> = BTreeMap::new();
    loop {
        let bound = bound_namespaces(&stores);
        watches.retain(|ns, task| {
            let keep = bound.contains(ns) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for ns in bound {
            if let std::collections::btree_map::Entry::Vacant(entry) = watches.entry(ns) {
                let ns = entry.key().clone();
                entry.insert(tokio::spawn(watch_namespace(
                    client.clone(),
                    ns,
                    tx.clone(),
                )));
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tx.closed() => break,
            () = tokio::time::sleep(FOLLOW_EVERY) => {}
        }
    }
    for task in watches.into_values() {
        task.abort();
    }
}

async fn watch_namespace(client: Client, namespace: String, tx: mpsc::Sender<ObjectRef<ApiKey>>) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let events = watcher(api, watcher::Config::default().labels(SECRET_LABEL))
        .default_backoff()
        .touched_objects();
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        match event {
            Ok(secret) => {
                if let Some(key) = owning_key(&secret)
                    && tx.send(key).await.is_err()
                {
                    return;
                }
            }
            // The watcher retries with backoff; the periodic resync still covers it.
            Err(e) => tracing::debug!(%namespace, error = %e, "key Secret watch"),
        }
    }
}

/// The ApiKey controlling `secret`, if any.
fn owning_key(secret: &Secret) -> Option<ObjectRef<ApiKey>> {
    let namespace = secret.namespace()?;
    secret
        .owner_references()
        .iter()
        .find(|o| o.kind == "ApiKey" && o.controller == Some(true))
        .map(|o| ObjectRef::new(&o.name).within(&namespace))
}
