//! Portcullis benchmarks.
//!
//! - `quick`: direct vs the in-process demo proxy, closed loop, in seconds.
//! - `all [--quick]`: the upstream alone, Portcullis (API key, mTLS, audit log), nginx
//!   and HAProxy side by side in one run on pinned cores; one table (see RESULTS.md).
//! - `load`: the load generator on its own against any 127.0.0.1 target.
//! - `collector`: records per second one audit-collector core checks and makes durable.
//! - `operator`: operator-scale figures against envtest and the real operator binary
//!   (10k ApiKeys and a cold start, 1k Tenants, 1k workload certificates, revocation).
//!
//! Loopback only; every run is capped in requests and time.

mod all;
mod collector;
mod keys;
mod load;
mod operator_scale;
mod procfs;
mod quick;
mod servers;
mod shipping;
mod stats;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "portcullis-bench",
    about = "Portcullis load generator and side-by-side benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    /// Each connection sends again as soon as it has an answer (max throughput).
    Closed,
    /// Constant rate; latency from the intended send time.
    Open,
}

#[derive(Subcommand)]
enum Command {
    /// Direct vs through the proxy, side by side.
    Quick {
        /// Concurrent keep-alive connections per target.
        #[arg(long, default_value_t = 8)]
        connections: usize,
        /// Requests per target (after warm-up).
        #[arg(long, default_value_t = 20_000)]
        requests: u64,
        /// Time cap per target, seconds.
        #[arg(long, default_value_t = 20)]
        max_seconds: u64,
    },
    /// Everything side by side: direct, Portcullis, nginx, HAProxy; prints one table.
    All {
        /// Seconds per measurement instead of tens of seconds.
        #[arg(long)]
        quick: bool,
        /// The portcullis-proxy binary (default: next to this binary).
        #[arg(long)]
        proxy_bin: Option<PathBuf>,
        /// Another portcullis-proxy build measured side by side as "portcullis before"
        /// (same config), for before/after figures from one run.
        #[arg(long)]
        baseline_proxy_bin: Option<PathBuf>,
        /// Rounds of the closed and the open loops, the columns taking turns in each (the
        /// figures are the sums): evens out a shared machine's slow patches.
        #[arg(long, default_value_t = 1)]
        rounds: u32,
        /// Keys in the big policy bundle (generated once at bcrypt cost 4, then cached).
        #[arg(long, default_value_t = 100_000)]
        keys: usize,
        /// Keep-alive connections for the request loads.
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Open-loop rates (requests/s), comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [1000u32, 5000])]
        rates: Vec<u32>,
        /// Also write the report to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Niceness for the generator and the servers, e.g. -10 to keep concurrent
        /// builds from adding scheduling noise (negative needs root). 0: unchanged.
        #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
        nice: i32,
    },
    /// Records per second one audit-collector core checks on arrival and fsyncs.
    Collector(collector::Options),
    /// Operator-scale figures: a real API server (envtest, needs KUBEBUILDER_ASSETS) and
    /// the real operator binary; prints progress, then one table.
    Operator(operator_scale::Options),
    /// The load generator alone, against one target on 127.0.0.1.
    Load {
        /// Target address (loopback only).
        #[arg(long)]
        addr: SocketAddr,
        /// Use TLS 1.3, trusting this CA (PEM); plain HTTP when absent.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Client certificate and key (PEM) for mTLS.
        #[arg(long, num_args = 2, value_names = ["CERT", "KEY"])]
        client_cert: Vec<PathBuf>,
        /// Sent as X-API-Key.
        #[arg(long, env = "PORTCULLIS_BENCH_KEY")]
        api_key: Option<String>,
        /// Request path.
        #[arg(long, default_value = "/v1/events/1")]
        path: String,
        /// closed or open.
        #[arg(long, value_enum, default_value_t = Mode::Closed)]
        mode: Mode,
        /// Open loop: requests per second.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Connections.
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Requests at most.
        #[arg(long, default_value_t = 100_000)]
        requests: u64,
        /// Seconds at most.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Parses a policy bundle file and prints `<ms> <rss bytes> <peak rss bytes>` (used by
    /// `all` as a child process to split the 100k-key RSS into parser and policy).
    #[command(hide = true)]
    BundleMemory {
        #[arg(long)]
        file: PathBuf,
        /// `sidecar`: the proxy's reader, straight into the form it holds
        /// (`policy::file::read_policy`); `wire`: serde_json into a `PolicyBundle`.
        #[arg(long)]
        parser: String,
    },
    /// The echo upstream (used by `all` as a child process).
    #[command(hide = true)]
    Echo {
        #[arg(long)]
        listen: SocketAddr,
    },
}

fn loopback(addr: &SocketAddr) -> anyhow::Result<()> {
    anyhow::ensure!(
        addr.ip().is_loopback(),
        "{addr}: benchmarks target loopback addresses only"
    );
    Ok(())
}

async fn load(command: Command) -> anyhow::Result<()> {
    let Command::Load {
        addr,
        ca,
        client_cert,
        api_key,
        path,
        mode,
        rate,
        connections,
        requests,
        seconds,
    } = command
    else {
        return Ok(());
    };
    loopback(&addr)?;
    let tls = match &ca {
        None => None,
        Some(ca) => {
            let auth = match client_cert.as_slice() {
                [cert, key] => Some((cert.as_path(), key.as_path())),
                _ => None,
            };
            Some(load::client_config(ca, load::Verify::Roots, auth, false)?)
        }
    };
    let headers = match api_key {
        Some(key) => vec![(
            http::HeaderName::from_static("x-api-key"),
            http::HeaderValue::from_str(&key)?,
        )],
        None => vec![],
    };
    let target = load::Target {
        name: addr.to_string(),
        addr,
        tls,
        headers,
        path,
    };
    let bounds = load::Bounds {
        count: requests,
        time: Duration::from_secs(seconds),
    };
    let result = match mode {
        Mode::Closed => load::closed_loop(&target, connections, bounds, "closed").await?,
        Mode::Open => {
            load::open_loop(&target, connections, f64::from(rate), bounds, "open").await?
        }
    };
    let s = stats::summary(&result.latency);
    println!(
        "{} ok, {} errors, {} missed, {:.0} req/s; latency µs p50 {} p99 {} p99.9 {} max {}{}",
        result.ok,
        result.errors,
        result.missed,
        result.rps(),
        s.p50,
        s.p99,
        s.p999,
        s.max,
        if matches!(mode, Mode::Open) {
            " (from intended send time)"
        } else {
            ""
        }
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Quick {
            connections,
            requests,
            max_seconds,
        } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(quick::quick(connections, requests, max_seconds))
        }
        Command::Collector(options) => collector::run(&options),
        Command::All {
            quick,
            proxy_bin,
            baseline_proxy_bin,
            rounds,
            keys: n,
            connections,
            rates,
            out,
            nice,
        } => {
            // The big bundle first, on both cores, before this process is pinned.
            eprintln!(
                "preparing {n} keys (bcrypt cost {}; cached in {})",
                keys::BENCH_COST,
                keys::cache_dir().display()
            );
            let (prepared, generated_in) = keys::cached_keys(n, &keys::cache_dir())?;
            all::pin_self("0", nice)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let options = all::AllOptions {
                quick,
                proxy_bin,
                baseline_proxy_bin,
                rounds,
                connections,
                rates,
                out,
                nice,
            };
            runtime.block_on(all::run(
                options,
                keys::PreparedKeys {
                    keys: prepared,
                    generated_in,
                },
            ))
        }
        Command::Operator(options) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(operator_scale::run(options))
        }
        command @ Command::Load { .. } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(load(command))
        }
        Command::BundleMemory { file, parser } => {
            let started = std::time::Instant::now();
            let keys = match parser.as_str() {
                "sidecar" => portcullis_sidecar::policy::file::read_policy(&file)?.key_count(),
                _ => {
                    serde_json::from_slice::<portcullis_crds::PolicyBundle>(&std::fs::read(&file)?)?
                        .keys
                        .len()
                }
            };
            let took = started.elapsed();
            let status = std::fs::read_to_string("/proc/self/status")?;
            let field = |name: &str| {
                status
                    .lines()
                    .find(|l| l.starts_with(name))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
                    * 1024
            };
            println!(
                "{} {} {} {}",
                took.as_millis(),
                field("VmRSS:"),
                field("VmHWM:"),
                keys
            );
            Ok(())
        }
        Command::Echo { listen } => {
            loopback(&listen)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let shutdown = CancellationToken::new();
                portcullis_sidecar::run::echo::start(listen, shutdown.clone()).await?;
                // Runs until the runner stops it (SIGTERM by pid).
                std::future::pending::<()>().await;
                anyhow::Ok(())
            })
        }
    }
}
