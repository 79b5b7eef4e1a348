//! The pieces every figure uses: the time budget, the operator binary as a child
//! process (RSS from /proc, counters from /metrics), and creating many objects with
//! bounded concurrency.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ObjectMeta, PostParams};
use portcullis_e2e::envtest::EnvTest;
use portcullis_e2e::localcluster::{OperatorOptions, OperatorProcess};

use super::kek::KekSetup;
use super::scrape::{self, Sample};

/// The operator's own namespace (CA, KEK, Lease).
pub const OPERATOR_NS: &str = "portcullis-system";
const CREATE_ATTEMPTS: u32 = 5;
const MIB: f64 = 1024.0 * 1024.0;

/// The overall time cap: every wait ends at `deadline`.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub started: Instant,
    pub deadline: Instant,
}

impl Budget {
    pub fn new(cap: Duration) -> Self {
        let started = Instant::now();
        Self {
            started,
            deadline: started + cap,
        }
    }

    pub fn expired(&self) -> bool {
        Instant::now() >= self.deadline
    }

    pub fn check(&self, what: &str) -> anyhow::Result<()> {
        anyhow::ensure!(!self.expired(), "time cap reached before {what}");
        Ok(())
    }
}

/// Bytes as MiB with one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / MIB)
}

/// The real `portcullis-operator run` as a child process (see
/// `portcullis_e2e::localcluster::OperatorProcess`), on loopback.
pub struct Operator {
    process: OperatorProcess,
    pub pid: u32,
    pub metrics: SocketAddr,
    /// When `start` began: cold-start times count from here.
    pub spawned: Instant,
}

impl Operator {
    /// Starts the binary and waits until it serves webhooks and the identity service.
    pub async fn start(
        env: &EnvTest,
        binary: &Path,
        dir: &Path,
        key_hash_cost: u32,
        kek: Option<&KekSetup>,
    ) -> anyhow::Result<Self> {
        let spawned = Instant::now();
        let options = OperatorOptions {
            key_hash_cost,
            // What a deployment logs: no per-reconcile debug lines.
            log_filter: "info".to_owned(),
            extra_args: kek.map(|k| k.args.clone()).unwrap_or_default(),
            extra_env: kek.map(|k| k.env.clone()).unwrap_or_default(),
        };
        let process = OperatorProcess::start_with(
            env,
            binary,
            OPERATOR_NS,
            Ipv4Addr::LOCALHOST,
            dir,
            &options,
        )
        .await?;
        let pid = process
            .pid()
            .ok_or_else(|| anyhow::anyhow!("no pid recorded in {}", dir.display()))?;
        let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, process.metrics_port));
        Ok(Self {
            process,
            pid,
            metrics,
            spawned,
        })
    }

    pub fn identity_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.process.identity_port)
    }

    pub fn policy_port(&self) -> u16 {
        self.process.policy_port
    }

    /// (VmRSS, VmHWM) in bytes.
    pub fn memory(&self) -> (u64, u64) {
        crate::procfs::memory(self.pid).unwrap_or((0, 0))
    }

    /// CPU seconds (user + system) used so far.
    pub fn cpu_seconds(&self) -> f64 {
        crate::procfs::cpu_seconds(self.pid, crate::procfs::clock_ticks())
    }

    /// One /metrics scrape, read for `kind`.
    pub async fn sample(&self, kind: &str) -> anyhow::Result<Sample> {
        Ok(Sample::parse(&scrape::fetch(self.metrics).await?, kind))
    }

    pub fn log_tail(&self) -> String {
        self.process.logs(30)
    }

    /// SIGTERM (SIGKILL after 5 s) and wait; the operator releases its Lease on the way.
    pub async fn stop(self) -> Duration {
        let started = Instant::now();
        let process = self.process;
        let _ = tokio::task::spawn_blocking(move || drop(process)).await;
        started.elapsed()
    }
}

/// `portcullis-operator` next to this binary unless given.
pub fn operator_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("portcullis-operator"),
    };
    anyhow::ensure!(
        path.exists(),
        "{} not found: cargo build --release -p portcullis-operator",
        path.display()
    );
    Ok(path)
}

/// A control plane with the CRDs and the operator's namespace.
pub async fn start_envtest() -> anyhow::Result<EnvTest> {
    let env = EnvTest::start().await?.ok_or_else(|| {
        anyhow::anyhow!("KUBEBUILDER_ASSETS is not set: eval \"$(/work/shared/setup-tools.sh)\"")
    })?;
    env.install_crds().await?;
    create_namespaces(&env.client()?, &[OPERATOR_NS.to_owned()], 1).await?;
    Ok(env)
}

pub async fn create_namespaces(
    client: &kube::Client,
    names: &[String],
    concurrency: usize,
) -> anyhow::Result<Duration> {
    let api: Api<Namespace> = Api::all(client.clone());
    let objects = names.iter().map(|name| {
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        (api.clone(), ns)
    });
    create_all(objects, concurrency, "namespaces").await
}

/// Creates every object, `concurrency` at a time, retrying transient refusals (an
/// overloaded API server or webhook); an object that exists already counts as created.
/// Prints progress every 5 s and returns the wall time.
pub async fn create_all<K>(
    objects: impl IntoIterator<Item = (Api<K>, K)>,
    concurrency: usize,
    what: &str,
) -> anyhow::Result<Duration>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let started = Instant::now();
    let mut last_print = started;
    let mut done = 0usize;
    let mut results = stream::iter(objects)
        .map(|(api, object)| async move { create_one(&api, &object).await })
        .buffer_unordered(concurrency.max(1));
    while let Some(result) = results.next().await {
        let _ = result.map_err(|e| anyhow::anyhow!("creating {what}: {e:#}"))?;
        done += 1;
        if last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            eprintln!(
                "  {what}: {done} created in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(started.elapsed())
}

/// Creates one object (retrying transient refusals) and returns it as stored.
pub async fn create_one<K>(api: &Api<K>, object: &K) -> anyhow::Result<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let mut attempt = 1;
    loop {
        match api.create(&PostParams::default(), object).await {
            Ok(created) => return Ok(created),
            // An earlier attempt went through after all.
            Err(kube::Error::Api(status)) if status.code == 409 && attempt > 1 => {
                let name = object.meta().name.clone().unwrap_or_default();
                return Ok(api.get(&name).await?);
            }
            Err(e) if attempt < CREATE_ATTEMPTS && transient(&e) => {
                tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt))).await;
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// 429, 5xx (a webhook that timed out answers 500) and connection errors.
fn transient(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => status.code == 429 || status.code >= 500,
        _ => true,
    }
}

/// Polls `check` every `every` until it says done, printing its progress line every
/// 5 s; `Ok(None)` when the budget ran out first.
pub async fn wait_for<T, F, Fut>(
    budget: &Budget,
    every: Duration,
    mut check: F,
) -> anyhow::Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(Option<T>, String)>>,
{
    let started = Instant::now();
    let mut last_print = started;
    loop {
        let (done, progress) = check().await?;
        if let Some(value) = done {
            return Ok(Some(value));
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            eprintln!("  {progress} ({:.0} s)", started.elapsed().as_secs_f64());
        }
        if budget.expired() {
            eprintln!("  time cap reached: {progress}");
            return Ok(None);
        }
        tokio::time::sleep(every).await;
    }
}

/// Waits until the reconcile counter of `kind` stood still for `quiet` (at most `limit`),
/// so memory is read after the work, not during it.
pub async fn settle(
    operator: &Operator,
    kind: &str,
    quiet: Duration,
    limit: Duration,
    budget: &Budget,
) -> anyhow::Result<Sample> {
    let started = Instant::now();
    let mut last = operator.sample(kind).await?;
    let mut still_since = Instant::now();
    while still_since.elapsed() < quiet && started.elapsed() < limit && !budget.expired() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = operator.sample(kind).await?;
        if now.reconciles != last.reconciles {
            still_since = Instant::now();
        }
        last = now;
    }
    Ok(last)
}
