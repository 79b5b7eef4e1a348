//! Tenants, each owning one namespace: creating them and waiting for Ready=True; with
//! N = 1000, figure 2.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use portcullis_crds::Tenant;
use serde_json::json;

use super::cluster::{Budget, Operator, create_all, create_namespaces, settle};
use super::scrape::ApiRequests;

#[derive(Debug)]
pub struct TenantsFigure {
    pub tenants: usize,
    pub namespaces_created: Duration,
    pub created: Duration,
    /// First Tenant create → every Tenant Ready=True.
    pub ready: Option<Duration>,
    pub ready_count: usize,
    /// First create → the end of the wait (all Ready or the cap).
    pub waited: Duration,
    pub reconciles: u64,
    pub failures: u64,
    /// Role reconciles (the built-in Roles each Tenant creates).
    pub role_reconciles: u64,
    /// Requests the API server answered from the first create until the operator settled.
    pub api_requests: ApiRequests,
    pub peak_rss: u64,
    pub settled_rss: u64,
    pub cpu_seconds: f64,
}

pub fn tenant(name: &str, namespace: &str) -> anyhow::Result<Tenant> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
        "metadata": {"name": name},
        "spec": {"namespaces": [namespace], "scopes": {
            "identify": [{"methods": ["POST"], "path": "/v1/identify"}],
            "events": [{"methods": ["GET", "POST"], "path": "/v1/events/*"}]}}
    }))?)
}

fn is_ready(tenant: &Tenant) -> bool {
    tenant.status.as_ref().is_some_and(|s| {
        portcullis_crds::conditions::find_ready(&s.conditions).is_some_and(|c| c.status == "True")
    })
}

/// Follows the Tenants with a watch (no polling: the moment is exact and the API server
/// is not LISTed while it works) until `n` are Ready or the budget ends; the time and
/// the count seen.
async fn watch_until_ready(
    api: &Api<Tenant>,
    n: usize,
    started: Instant,
    budget: &Budget,
    prefix: &str,
) -> anyhow::Result<(Option<Duration>, usize)> {
    let mut ready: BTreeSet<String> = BTreeSet::new();
    let mut events = std::pin::pin!(
        watcher(api.clone(), watcher::Config::default())
            .default_backoff()
            .applied_objects()
    );
    let mut last_print = Instant::now();
    let deadline = tokio::time::Instant::from_std(budget.deadline);
    loop {
        let next = tokio::time::timeout_at(deadline, events.try_next()).await;
        let Ok(next) = next else {
            eprintln!("  time cap reached: {} of {n} Tenants Ready", ready.len());
            return Ok((None, ready.len()));
        };
        let Some(tenant) = next? else {
            anyhow::bail!("the Tenant watch ended");
        };
        let name = tenant.metadata.name.clone().unwrap_or_default();
        if is_ready(&tenant) {
            ready.insert(name);
        } else {
            ready.remove(&name);
        }
        if ready.len() >= n {
            return Ok((Some(started.elapsed()), ready.len()));
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            eprintln!(
                "  [{prefix}] {} of {n} Tenants Ready ({:.0} s)",
                ready.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
}

/// Creates tenant `<prefix>-<i>` owning namespace `<prefix>-<i>` for each i < n, and
/// waits until all are Ready (the operator's own count of reconciles and its memory
/// are read at the end).
pub async fn create_ready(
    client: &kube::Client,
    operator: &Operator,
    prefix: &str,
    n: usize,
    concurrency: usize,
    budget: &Budget,
) -> anyhow::Result<(Vec<String>, TenantsFigure)> {
    let names: Vec<String> = (0..n).map(|i| format!("{prefix}-{i:04}")).collect();
    eprintln!("[{prefix}] creating {n} namespaces and {n} Tenants");
    let namespaces_created = create_namespaces(client, &names, concurrency).await?;
    let api: Api<Tenant> = Api::all(client.clone());
    let requests_before = ApiRequests::read(client).await?;
    let started = Instant::now();
    let mut objects = Vec::with_capacity(n);
    for name in &names {
        objects.push((api.clone(), tenant(name, name)?));
    }
    let created = create_all(objects, concurrency, "Tenants").await?;
    eprintln!(
        "[{prefix}] created {n} Tenants in {:.1} s; waiting for Ready=True",
        created.as_secs_f64()
    );
    let (ready, ready_seen) = watch_until_ready(&api, n, started, budget, prefix).await?;
    let waited = started.elapsed();
    if let Some(t) = ready {
        eprintln!(
            "[{prefix}] all {n} Ready {:.1} s after the first create",
            t.as_secs_f64()
        );
    }
    let s = settle(
        operator,
        "Tenant",
        Duration::from_secs(5),
        Duration::from_secs(60),
        budget,
    )
    .await?;
    let roles = settle(
        operator,
        "Role",
        Duration::from_secs(5),
        Duration::from_secs(60),
        budget,
    )
    .await?;
    let api_requests = ApiRequests::read(client).await?.since(&requests_before);
    eprintln!("[{prefix}] API requests: {}", api_requests.summary(12));
    let (settled_rss, peak_rss) = operator.memory();
    Ok((
        names,
        TenantsFigure {
            tenants: n,
            namespaces_created,
            created,
            ready,
            ready_count: ready_seen,
            waited,
            reconciles: s.reconciles,
            failures: s.failures,
            role_reconciles: roles.reconciles,
            api_requests,
            peak_rss,
            settled_rss,
            cpu_seconds: operator.cpu_seconds(),
        },
    ))
}
