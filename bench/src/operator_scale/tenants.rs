//! Tenants, each owning one namespace: creating them and waiting for Ready=True; with
//! N = 1000, figure 2.

use std::time::{Duration, Instant};

use kube::api::{Api, ListParams};
use portcullis_crds::Tenant;
use serde_json::json;

use super::cluster::{Budget, Operator, create_all, create_namespaces, settle, wait_for};

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

/// Tenants whose Ready condition is True.
pub async fn ready_count(tenants: &Api<Tenant>) -> anyhow::Result<usize> {
    Ok(tenants
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|t| {
            t.status.as_ref().is_some_and(|s| {
                portcullis_crds::conditions::find_ready(&s.conditions)
                    .is_some_and(|c| c.status == "True")
            })
        })
        .count())
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
    let mut ready_seen = 0;
    // Each poll LISTs every Tenant: at 500 ms with 1000 Tenants that alone was ~1
    // LIST/s of the API server's load, so poll more rarely as n grows (5 s at 1000).
    let every = Duration::from_millis((n as u64 * 5).clamp(500, 5000));
    let ready = wait_for(budget, every, || {
        let api = api.clone();
        async move {
            let ready = ready_count(&api).await?;
            let done = (ready >= n).then(|| (started.elapsed(), ready));
            Ok((done, format!("[{prefix}] {ready} of {n} Tenants Ready")))
        }
    })
    .await?;
    let waited = started.elapsed();
    if let Some((t, count)) = ready {
        ready_seen = count;
        eprintln!(
            "[{prefix}] all {n} Ready {:.1} s after the first create",
            t.as_secs_f64()
        );
    } else if let Ok(count) = ready_count(&api).await {
        ready_seen = count;
    }
    let s = settle(
        operator,
        "Tenant",
        Duration::from_secs(5),
        Duration::from_secs(60),
        budget,
    )
    .await?;
    let (settled_rss, peak_rss) = operator.memory();
    Ok((
        names,
        TenantsFigure {
            tenants: n,
            namespaces_created,
            created,
            ready: ready.map(|(t, _)| t),
            ready_count: ready_seen,
            waited,
            reconciles: s.reconciles,
            failures: s.failures,
            peak_rss,
            settled_rss,
            cpu_seconds: operator.cpu_seconds(),
        },
    ))
}
