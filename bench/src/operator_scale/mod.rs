//! `portcullis-bench operator`: operator-scale figures against a real API server
//! (envtest: etcd + kube-apiserver 1.20 + kube-controller-manager on loopback) and the
//! real `portcullis-operator` binary as a child process, so its memory is read from
//! `/proc/<pid>/status` and its counters from `/metrics`.
//!
//! 1. N ApiKeys issued (bcrypt cost `--key-hash-cost`), then a fresh operator's cold
//!    start over them: time until every key was reconciled, peak and settled RSS.
//! 2. N Tenants (one namespace each) until all are Ready, and the operator's RSS.
//! 3. N workload certificates from the identity service (bound tokens, real TLS).
//! 4. Revocation: `spec.revoked` patched → the sidecar's verifier refuses the key.
//!
//! Figures 1, 3 and 4 share one control plane and operator; figure 2 gets its own.
//! Every count is a flag, every wait ends at the `--max-minutes` cap.

mod certs;
mod cluster;
mod kek;
mod keys;
mod report;
mod revoke;
mod scrape;
mod tenants;

use std::path::PathBuf;
use std::time::Duration;

use cluster::{Budget, Operator};

/// What to measure and how much of it (the `operator` subcommand's flags).
#[derive(Clone, Debug, clap::Args)]
pub struct Options {
    /// ApiKeys issued, then reconciled by a freshly started operator (0: skip, and
    /// skip the revocation figure).
    #[arg(long, default_value_t = 10_000)]
    pub keys: usize,
    /// Tenants (one namespace each) the keys and pods are spread over.
    #[arg(long, default_value_t = 10)]
    pub key_namespaces: usize,
    /// Tenants reconciled until Ready, on a control plane of their own (0: skip).
    #[arg(long, default_value_t = 1000)]
    pub tenants: usize,
    /// Pods that each get a workload certificate (0: skip).
    #[arg(long, default_value_t = 1000)]
    pub pods: usize,
    /// Keys revoked one after the other (0: skip).
    #[arg(long, default_value_t = 20)]
    pub revocations: usize,
    /// Concurrent API and identity requests of this client.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// The operator's --key-hash-cost (production: 10, ~60 ms per key).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(4..=31))]
    pub key_hash_cost: u32,
    /// Overall time cap in minutes: waits end there and the table shows what was
    /// measured.
    #[arg(long, default_value_t = 40)]
    pub max_minutes: u64,
    /// KEK providers to run the Tenants step under, each on a fresh control plane;
    /// the others are reported as ratios to `secret` (pkcs11 needs softhsm2, kms the
    /// `portcullis-kms-test-plugin` binary next to the operator's).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "secret")]
    pub kek_providers: Vec<kek::Provider>,
    /// The portcullis-operator binary (default: next to this binary).
    #[arg(long)]
    pub operator_bin: Option<PathBuf>,
    /// Also write the report to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The figures measured so far (a run cut short by the cap still reports them).
#[derive(Debug, Default)]
pub struct Figures {
    pub keys: Option<keys::KeysFigure>,
    /// Per KEK provider, in the order run.
    pub tenants: Vec<(kek::Provider, tenants::TenantsFigure)>,
    pub certs: Option<certs::CertsFigure>,
    pub revoke: Option<revoke::RevokeFigure>,
    pub notes: Vec<String>,
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let binary = cluster::operator_binary(options.operator_bin.clone())?;
    let budget = Budget::new(Duration::from_secs(options.max_minutes * 60));
    let load_before = crate::procfs::load_average();
    let mut figures = Figures::default();
    // The soft cap ends every wait; this one also stops a step that hangs.
    let hard_cap = Duration::from_secs(options.max_minutes * 60 + 120);
    let outcome =
        tokio::time::timeout(hard_cap, measure(&options, &binary, &budget, &mut figures)).await;
    let error = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("{e:#}")),
        Err(_) => Some(format!("stopped by the hard time cap ({hard_cap:?})")),
    };
    if let Some(e) = &error {
        figures.notes.push(format!("run ended early: {e}"));
    }
    if budget.expired() {
        figures.notes.push(format!(
            "the {}-minute time cap was reached",
            options.max_minutes
        ));
    }
    let text = report::render(&options, &figures, &load_before, budget.started.elapsed());
    println!("{text}");
    if let Some(out) = &options.out {
        std::fs::write(out, &text)?;
    }
    match error {
        Some(e) => anyhow::bail!(e),
        None => Ok(()),
    }
}

async fn measure(
    options: &Options,
    binary: &std::path::Path,
    budget: &Budget,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("portcullis-opbench-")
        .tempdir()?;
    let concurrency = options.concurrency.max(1);
    if options.keys > 0 || options.pods > 0 {
        eprintln!(
            "[setup] starting envtest and the operator (bcrypt cost {})",
            options.key_hash_cost
        );
        let env = cluster::start_envtest().await?;
        let client = env.client()?;
        let mut operator = Operator::start(
            &env,
            binary,
            &dir.path().join("operator-1"),
            options.key_hash_cost,
            None,
        )
        .await?;
        let (namespaces, _) = tenants::create_ready(
            &client,
            &operator,
            "keys",
            options.key_namespaces.max(1),
            concurrency,
            budget,
        )
        .await?;
        budget.check("the ApiKeys")?;
        if options.keys > 0 {
            let figure = keys::issue(
                &env,
                &operator,
                &namespaces,
                options.keys,
                options.key_hash_cost,
                concurrency,
                budget,
            )
            .await?;
            let issued = figure.issued.is_some();
            figures.keys = Some(figure);
            budget.check("the cold start")?;
            anyhow::ensure!(issued, "not every key was issued");
            let (cold, fresh) = keys::cold_start(
                &env,
                operator,
                binary,
                &dir.path().join("operator-2"),
                options.key_hash_cost,
                options.keys,
                budget,
            )
            .await?;
            operator = fresh;
            if let Some(figure) = figures.keys.as_mut() {
                figure.cold = Some(cold);
            }
        }
        let mut workload = None;
        if options.pods > 0 && !budget.expired() {
            let tokens = dir.path().join("tokens");
            std::fs::create_dir_all(&tokens)?;
            let (figure, first) = certs::run(
                &client,
                &operator,
                &namespaces,
                options.pods,
                concurrency,
                &tokens,
                budget,
            )
            .await?;
            figures.certs = Some(figure);
            workload = first;
        }
        if options.revocations > 0 && options.keys > 0 && !budget.expired() {
            match &workload {
                Some(w) => {
                    figures.revoke = Some(
                        revoke::run(
                            &client,
                            w,
                            &namespaces[0],
                            operator.policy_port(),
                            options.revocations,
                            budget,
                        )
                        .await?,
                    );
                }
                None => figures
                    .notes
                    .push("revocation not measured: no workload certificate (--pods 0?)".into()),
            }
        }
        operator.stop().await;
        stop_envtest(env).await;
    }
    for (i, &provider) in options.kek_providers.iter().enumerate() {
        if options.tenants == 0 || budget.expired() {
            break;
        }
        eprintln!(
            "[setup] a fresh envtest and operator (KEK {}) for {} Tenants",
            provider.name(),
            options.tenants
        );
        let kek = kek::prepare(provider, binary, &dir.path().join(format!("kek-{i}")))?;
        let env = cluster::start_envtest().await?;
        let operator = Operator::start(
            &env,
            binary,
            &dir.path().join(format!("operator-tenants-{i}")),
            options.key_hash_cost,
            Some(&kek),
        )
        .await?;
        let (_, figure) = tenants::create_ready(
            &env.client()?,
            &operator,
            "tenant",
            options.tenants,
            concurrency,
            budget,
        )
        .await?;
        figures.tenants.push((provider, figure));
        operator.stop().await;
        stop_envtest(env).await;
        drop(kek);
    }
    Ok(())
}

/// Dropping an EnvTest waits for its processes to exit: off the async threads.
async fn stop_envtest(env: portcullis_e2e::envtest::EnvTest) {
    let _ = tokio::task::spawn_blocking(move || drop(env)).await;
}
