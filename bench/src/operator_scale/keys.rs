//! Figure 1: N ApiKeys issued by one operator, then a fresh operator's cold start over
//! them — until every key was reconciled, with its peak and settled RSS.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use kube::api::{Api, ListParams};
use portcullis_crds::ApiKey;
use portcullis_e2e::envtest::EnvTest;
use serde_json::json;

use super::cluster::{Budget, Operator, create_all, wait_for};

/// The reconcile counter must stay still this long before the cold start counts as done.
const QUIET: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub struct KeysFigure {
    pub keys: usize,
    pub namespaces: usize,
    pub hash_cost: u32,
    /// Creating the N objects (the API server calls the validating webhook for each).
    pub created: Duration,
    /// First create → N keys Active in the operator's cache.
    pub issued: Option<Duration>,
    pub issue_reconciles: u64,
    pub issue_failures: u64,
    /// The issuing operator's peak RSS.
    pub issuer_peak: u64,
    pub cold: Option<ColdStart>,
}

/// A fresh operator over N issued keys; times from its spawn.
#[derive(Debug, Default)]
pub struct ColdStart {
    /// Stopping the previous operator (SIGTERM, Lease released).
    pub stop: Duration,
    /// Webhook and identity ports accept.
    pub serving: Duration,
    pub leader: Option<Duration>,
    /// `api_keys{state="Active"}` = N: every key in the cache and compiled into policy.
    pub all_in_policy: Option<Duration>,
    /// The ApiKey reconcile counter reached N.
    pub reached_n: Option<Duration>,
    /// The last increase of that counter before it stood still for [`QUIET`].
    pub settled: Option<Duration>,
    pub reconciles: u64,
    pub failures: u64,
    pub reconcile_seconds: f64,
    pub peak_rss: u64,
    pub settled_rss: u64,
    pub cpu_seconds: f64,
    /// Keys whose resourceVersion changed during the cold start (status writes).
    pub rewritten: usize,
}

pub fn api_key(name: &str, namespace: &str) -> anyhow::Result<ApiKey> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiKey",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"role": "Developer", "scopes": ["identify"]}
    }))?)
}

/// Creates `n` keys spread over `namespaces` and waits until the operator has issued
/// them all; `Ok(figure)` with `issued: None` when the budget ran out.
pub async fn issue(
    env: &EnvTest,
    operator: &Operator,
    namespaces: &[String],
    n: usize,
    hash_cost: u32,
    concurrency: usize,
    budget: &Budget,
) -> anyhow::Result<KeysFigure> {
    let client = env.client()?;
    eprintln!(
        "[keys] creating {n} ApiKeys in {} namespaces",
        namespaces.len()
    );
    let started = Instant::now();
    let mut objects = Vec::with_capacity(n);
    for i in 0..n {
        let ns = &namespaces[i % namespaces.len()];
        objects.push((
            Api::namespaced(client.clone(), ns),
            api_key(&format!("key-{i:05}"), ns)?,
        ));
    }
    let created = create_all(objects, concurrency, "ApiKeys").await?;
    eprintln!(
        "[keys] created {n} in {:.1} s ({:.0}/s); waiting for the operator to issue them",
        created.as_secs_f64(),
        n as f64 / created.as_secs_f64()
    );
    let issued = wait_for(budget, Duration::from_millis(250), || async {
        let s = operator.sample("ApiKey").await?;
        let done = (s.active_keys >= n as u64).then(|| started.elapsed());
        Ok((done, format!("[keys] {} of {n} Active", s.active_keys)))
    })
    .await?;
    let last = operator.sample("ApiKey").await?;
    if issued.is_none() {
        eprintln!("[keys] operator log tail:\n{}", operator.log_tail());
    }
    if let Some(t) = issued {
        eprintln!(
            "[keys] all {n} Active {:.1} s after the first create ({:.0} keys/s at bcrypt cost {hash_cost})",
            t.as_secs_f64(),
            n as f64 / t.as_secs_f64()
        );
    }
    Ok(KeysFigure {
        keys: n,
        namespaces: namespaces.len(),
        hash_cost,
        created,
        issued,
        issue_reconciles: last.reconciles,
        issue_failures: last.failures,
        issuer_peak: operator.memory().1,
        cold: None,
    })
}

/// Stops `previous`, starts a fresh operator and follows it until every key was
/// reconciled. Returns the figure and the new operator (for the next figures).
pub async fn cold_start(
    env: &EnvTest,
    previous: Operator,
    binary: &Path,
    dir: &Path,
    hash_cost: u32,
    n: usize,
    budget: &Budget,
) -> anyhow::Result<(ColdStart, Operator)> {
    let keys: Api<ApiKey> = Api::all(env.client()?);
    let before = versions(&keys).await?;
    eprintln!("[cold start] stopping the issuing operator");
    let stop = previous.stop().await;
    eprintln!("[cold start] starting a fresh operator over {n} keys");
    let operator = Operator::start(env, binary, dir, hash_cost, None).await?;
    let since = |at: Instant| at.duration_since(operator.spawned);
    let mut cold = ColdStart {
        stop,
        serving: operator.spawned.elapsed(),
        ..ColdStart::default()
    };
    let mut last_count = 0u64;
    let mut last_increase = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let now = Instant::now();
        let s = match operator.sample("ApiKey").await {
            Ok(s) => s,
            Err(e) if !budget.expired() => {
                eprintln!("  [cold start] /metrics: {e:#}");
                tokio::time::sleep(POLL).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        if s.leader && cold.leader.is_none() {
            cold.leader = Some(since(now));
        }
        if s.active_keys >= n as u64 && cold.all_in_policy.is_none() {
            cold.all_in_policy = Some(since(now));
        }
        if s.reconciles >= n as u64 && cold.reached_n.is_none() {
            cold.reached_n = Some(since(now));
        }
        if s.reconciles > last_count {
            last_count = s.reconciles;
            last_increase = now;
        }
        (cold.reconciles, cold.failures, cold.reconcile_seconds) =
            (s.reconciles, s.failures, s.reconcile_seconds);
        if cold.reached_n.is_some() && now.duration_since(last_increase) >= QUIET {
            cold.settled = Some(since(last_increase));
            break;
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            let (rss, peak) = operator.memory();
            eprintln!(
                "  [cold start] {:.0} s: leader {}, {} of {n} keys in policy, {} reconciles ({} failed), RSS {} MiB (peak {})",
                operator.spawned.elapsed().as_secs_f64(),
                s.leader,
                s.active_keys,
                s.reconciles,
                s.failures,
                super::cluster::mib(rss),
                super::cluster::mib(peak),
            );
        }
        if budget.expired() {
            eprintln!("  [cold start] time cap reached");
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    if cold.settled.is_none() {
        eprintln!("[cold start] operator log tail:\n{}", operator.log_tail());
    }
    (cold.settled_rss, cold.peak_rss) = operator.memory();
    cold.cpu_seconds = operator.cpu_seconds();
    let after = versions(&keys).await?;
    cold.rewritten = after
        .iter()
        .filter(|(name, rv)| before.get(*name) != Some(*rv))
        .count();
    Ok((cold, operator))
}

/// `namespace/name` → resourceVersion of every ApiKey (metadata only).
async fn versions(keys: &Api<ApiKey>) -> anyhow::Result<HashMap<String, String>> {
    let list = keys.list_metadata(&ListParams::default()).await?;
    Ok(list
        .items
        .into_iter()
        .map(|k| {
            let m = k.metadata;
            (
                format!(
                    "{}/{}",
                    m.namespace.unwrap_or_default(),
                    m.name.unwrap_or_default()
                ),
                m.resource_version.unwrap_or_default(),
            )
        })
        .collect())
}
