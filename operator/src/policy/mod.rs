//! Policy bundles: compiled from the caches on every change (and when a key expires or
//! an overlap ends), published per tenant through the [`PolicyHub`], served by the
//! policy server. Runs on every replica, leader or not, so sidecars can use any.

pub mod app_exit;
pub mod compiler;
pub mod hub;
pub mod revocations;
pub mod server;
pub mod server_audit_key;
pub mod server_tls;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use jiff::Timestamp;
use portcullis_crds::{KeyState, PolicyBundle};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use compiler::{CompiledPolicy, Exclusion, PolicyCompiler};
pub use hub::PolicyHub;
pub use revocations::RevocationCaches;

use crate::clock::{self, Clock};
use crate::metrics::Metrics;
use crate::stores::Stores;

/// Longest sleep between compilations when nothing happens.
const IDLE: Duration = Duration::from_secs(300);

/// Compiles every tenant's bundle and publishes the changed ones. Returns when the
/// result next changes by itself. Tenants that disappeared get an empty bundle, so
/// their sidecars refuse every key instead of keeping stale ones. With
/// `stores.revocations`, each bundle lists the certificates of the tenant's deleted pods.
pub fn compile_all(
    stores: &Stores,
    hub: &PolicyHub,
    metrics: &Metrics,
    now: Timestamp,
) -> Option<Timestamp> {
    let mut next: Option<Timestamp> = None;
    let mut note = |at: Option<Timestamp>| {
        if let Some(at) = at {
            next = Some(next.map_or(at, |n| n.min(at)));
        }
    };
    let mut live = Vec::new();
    let grouped = stores.by_namespace();
    let revoked = stores.revocations.as_ref().map(|caches| {
        let (by_tenant, at) = caches.revoked_by_tenant(now);
        note(at);
        by_tenant
    });
    for tenant in stores.tenants.state() {
        let namespaces = Stores::namespaces_of(&tenant);
        let keys = grouped.keys_in_any(&namespaces);
        let roles = grouped.roles_in_any(&namespaces);
        let mut compiled = PolicyCompiler.compile(&tenant, &keys, &roles, now);
        note(compiled.next_change);
        compiled.bundle.service_revisions = stores.service_revisions(&namespaces);
        if let Some(by_tenant) = &revoked {
            let bundle = &mut compiled.bundle;
            bundle.revoked_certificates =
                revocations::for_bundle(by_tenant, &bundle.tenant, &bundle.allowed_peers);
        }
        live.push(compiled.bundle.tenant.clone());
        for e in &compiled.excluded {
            tracing::debug!(key = %e.key, reason = %e.reason, "key left out of policy");
        }
        if let Some(version) = hub.publish(compiled.bundle, compiled.excluded, now) {
            metrics.policy_published();
            tracing::info!(tenant = %tenant.metadata.name.as_deref().unwrap_or_default(), version, "policy published");
        }
    }
    for gone in hub.tenants().into_iter().filter(|t| !live.contains(t)) {
        let empty = PolicyBundle {
            tenant: gone,
            ..PolicyBundle::default()
        };
        if hub.publish(empty, Vec::new(), now).is_some() {
            metrics.policy_published();
        }
    }
    let mut counts = std::collections::HashMap::<KeyState, i64>::new();
    for key in stores.keys.state() {
        let state = key.status.as_ref().map(|s| s.state).unwrap_or_default();
        *counts.entry(state).or_default() += 1;
    }
    metrics.set_api_keys(counts);
    next
}

/// Keeps the hub current until `shutdown`: recompiles on every cache event (`changed`)
/// and at the next self-timed change. Sets `ready` once the caches have synced and the
/// first bundles are published.
///
/// This is the only task that waits for the caches: kube-runtime's
/// `Store::wait_until_ready` wakes a single waiter, so a second one would hang.
pub async fn run(
    stores: Stores,
    hub: Arc<PolicyHub>,
    changed: Arc<Notify>,
    metrics: Arc<Metrics>,
    clock: Clock,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    tokio::select! {
        synced = stores.wait_until_ready() => if !synced { return },
        _ = shutdown.cancelled() => return,
    }
    let mut first = true;
    loop {
        let now = clock.now();
        let started = tokio::time::Instant::now();
        let next = compile_all(&stores, &hub, &metrics, now);
        let took = started.elapsed();
        if first {
            ready.store(true, Ordering::Relaxed);
            first = false;
        }
        // A moment past the deadline, so the compile sees it passed.
        let wait =
            next.map_or(IDLE, |at| clock::until(now, at).min(IDLE)) + Duration::from_millis(5);
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
        // Every cache event recompiles every tenant: under a stream of events (a
        // thousand Tenants reconciling) that alone kept a core busy. Compiling takes at
        // most a quarter of the time; with few tenants a compile takes well under a
        // millisecond, so a revocation still goes out at once.
        let earliest = started + took * COMPILE_SHARE;
        tokio::select! {
            () = tokio::time::sleep_until(earliest) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// A compile is followed by at least (this - 1) times its duration before the next.
const COMPILE_SHARE: u32 = 4;

/// `portcullis-operator policy dump`: compiles one tenant's bundle straight from the
/// API server (no running operator needed), with the keys left out and why.
pub async fn dump(client: kube::Client, tenant: &str) -> crate::error::Result<CompiledPolicy> {
    use kube::Api;
    use kube::api::ListParams;
    use portcullis_crds::{ApiKey, Role, Tenant};

    let tenant = Api::<Tenant>::all(client.clone()).get(tenant).await?;
    let namespaces = Stores::namespaces_of(&tenant);
    let mut keys = Vec::new();
    let mut roles = Vec::new();
    for ns in &namespaces {
        let lp = ListParams::default();
        keys.extend(
            Api::<ApiKey>::namespaced(client.clone(), ns)
                .list(&lp)
                .await?
                .items
                .into_iter()
                .map(Arc::new),
        );
        roles.extend(
            Api::<Role>::namespaced(client.clone(), ns)
                .list(&lp)
                .await?
                .items
                .into_iter()
                .map(Arc::new),
        );
    }
    Ok(PolicyCompiler.compile(&tenant, &keys, &roles, Timestamp::now()))
}
