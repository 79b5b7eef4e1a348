//! `portcullis-bench all`: every target side by side in one run, one table.
//!
//! Layout on the 2-core machine: the servers under test (Portcullis as the
//! `portcullis-proxy` binary, nginx with one worker, HAProxy with one thread) are
//! pinned to core 1; this process (the load generator) and the echo upstream they all
//! forward to are pinned to core 0. Per-core figures divide by the CPU time the server
//! process actually used (/proc/<pid>/stat), so they hold even when the generator,
//! not the server, is what limits the raw rate.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use http::{HeaderName, HeaderValue};
use portcullis_crds::ApiToken;

use crate::{
    keys::{self, KeyCheckCosts},
    load::{self, Bounds, Target, Verify},
    procfs,
    servers::{self, Server},
    shipping,
    stats::{self, Summary},
};

/// Options of `all`.
#[derive(Clone, Debug)]
pub struct AllOptions {
    /// Short runs (seconds instead of tens of seconds).
    pub quick: bool,
    /// The `portcullis-proxy` binary (default: next to this one).
    pub proxy_bin: Option<PathBuf>,
    /// Another build measured side by side as [`BASELINE`].
    pub baseline_proxy_bin: Option<PathBuf>,
    /// Closed- and open-loop rounds, every column taking its turn in each.
    pub rounds: u32,
    /// Connections for the request loads.
    pub connections: usize,
    /// Open-loop rates, requests per second.
    pub rates: Vec<u32>,
    /// Also write the report here.
    pub out: Option<PathBuf>,
    /// Niceness of the generator and the servers (0: unchanged).
    pub nice: i32,
}

/// The column of `--baseline-proxy-bin`.
pub const BASELINE: &str = "portcullis before";

/// The column of `--baseline-proxy-bin` with the audit file sink on.
pub const BASELINE_AUDITED: &str = "portcullis before +audit file";

/// The column of this build with the audit file sink on.
pub const AUDITED: &str = "portcullis +audit file";

/// The column of this build shipping its audit chain to a collector.
pub const SHIPPING: &str = "portcullis +collector";

/// The column of `--baseline-proxy-bin` shipping to the same collector.
pub const BASELINE_SHIPPING: &str = "portcullis before +collector";

/// Idle TLS connections held for the memory-per-connection figure: as many as HAProxy
/// can hold under a 20 000 descriptor limit (it reserves two per connection).
const HOLD_MANY: usize = 9_000;

/// One column's open-loop rounds at one rate, summed.
#[derive(Default)]
struct OpenSum {
    ok: u64,
    errors: u64,
    missed: u64,
    cpu: f64,
    latency: Option<hdrhistogram::Histogram<u64>>,
}

impl OpenSum {
    fn add(&mut self, cpu: f64, result: &load::RunResult) -> anyhow::Result<()> {
        self.ok += result.ok;
        self.errors += result.errors;
        self.missed += result.missed;
        self.cpu += cpu;
        match &mut self.latency {
            Some(sum) => sum
                .add(&result.latency)
                .context("merging open-loop latency histograms")?,
            None => self.latency = Some(result.latency.clone()),
        }
        Ok(())
    }
}

/// Durations and counts of one run.
#[derive(Clone, Copy, Debug)]
struct Plan {
    closed: Duration,
    open: Duration,
    handshakes: Duration,
    hold: usize,
    /// Idle TLS connections held for the memory-per-connection figure (0: skipped).
    hold_many: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                closed: Duration::from_secs(3),
                open: Duration::from_secs(3),
                handshakes: Duration::from_secs(2),
                hold: 1000,
                hold_many: 0,
            }
        } else {
            Self {
                closed: Duration::from_secs(10),
                open: Duration::from_secs(10),
                handshakes: Duration::from_secs(5),
                hold: 1000,
                hold_many: HOLD_MANY,
            }
        }
    }
}

/// Pins this process (all its threads) to `cpus` with `taskset`, and sets its
/// niceness (and that of the servers it starts) to `nice`. Call before any thread is
/// started so new ones inherit both.
pub fn pin_self(cpus: &str, nice: i32) -> anyhow::Result<()> {
    servers::set_niceness(nice);
    if nice != 0 {
        let status = std::process::Command::new("renice")
            .args([
                "-n",
                &nice.to_string(),
                "-p",
                &std::process::id().to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .status()
            .context("running renice")?;
        anyhow::ensure!(
            status.success(),
            "renice -n {nice} failed (negative needs root)"
        );
    }
    let status = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &std::process::id().to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .context("running taskset (util-linux)")?;
    anyhow::ensure!(status.success(), "taskset -p -c {cpus} failed");
    Ok(())
}

/// Everything measured for one column of the table.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    /// Closed loop: answers per second of wall time.
    pub max_rps: Option<f64>,
    /// Closed loop: server CPU seconds per wall second.
    pub cpu_cores: Option<f64>,
    /// Closed loop: answers per server CPU second.
    pub per_core: Option<f64>,
    /// Closed loop: server CPU seconds per 1000 answers.
    pub cpu_per_1k: Option<f64>,
    /// Errors over all runs.
    pub errors: u64,
    /// Open-loop latency by rate.
    pub open: BTreeMap<u32, Summary>,
    /// Open-loop requests missed by rate (the server fell behind the bound).
    pub missed: BTreeMap<u32, u64>,
    /// Open loop: server CPU µs per answered request, by rate (equal load for every
    /// column, whatever the generator's core can drive in a closed loop).
    pub open_cpu_us: BTreeMap<u32, f64>,
    /// RSS right after start, bytes.
    pub rss_idle: Option<u64>,
    /// RSS with 1000 TLS connections open.
    pub rss_1k: Option<u64>,
    /// RSS with [`HOLD_MANY`] idle TLS connections open.
    pub rss_many: Option<u64>,
    /// Full handshakes: per wall second, per server CPU second.
    pub full_hs: Option<(f64, Option<f64>)>,
    /// Resumption offered: per wall second, per server CPU second, fraction resumed.
    pub resumed_hs: Option<(f64, Option<f64>, f64)>,
}

/// The 100k-key proxy.
#[derive(Clone, Debug, Default)]
pub struct BigPolicy {
    /// Keys in the bundle.
    pub keys: usize,
    /// Bundle file size.
    pub bytes: u64,
    /// Key generation time when not cached.
    pub generated_in: Option<Duration>,
    /// Start to `/ready`.
    pub ready_in: Duration,
    /// RSS once ready.
    pub rss_idle: u64,
    /// RSS with 1000 TLS connections open.
    pub rss_1k: u64,
    /// The bundle parsed alone in a fresh process: parser, ms, RSS after, peak RSS.
    pub parsers: Vec<(&'static str, u64, u64, u64)>,
}

/// The run's context for the report header.
#[derive(Clone, Debug, Default)]
pub struct Meta {
    /// The command line.
    pub command: String,
    /// CPU model.
    pub cpu: String,
    /// nproc.
    pub cores: usize,
    /// Tool versions.
    pub versions: Vec<String>,
    /// Load average before and after.
    pub load_before: String,
    /// After.
    pub load_after: String,
    /// Connections used.
    pub connections: usize,
    /// Plan, as text.
    pub plan: String,
    /// Niceness used.
    pub nice: i32,
}

const MIB: f64 = 1024.0 * 1024.0;

/// Concurrent handshake loops: enough that a server's own latency (e.g. a delayed
/// session-ticket write) does not cap its rate below what its core can do.
const HANDSHAKE_LOOPS: usize = 32;

fn tool_version(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("{program}: not found"))
}

struct Column {
    name: &'static str,
    target: Target,
    pid: u32,
    /// Included in the handshake, latency and RSS phases.
    tls_server: bool,
    open_loop: bool,
}

/// Runs everything and prints the report on stdout.
pub async fn run(options: AllOptions, big_keys: keys::PreparedKeys) -> anyhow::Result<()> {
    let plan = Plan::new(options.quick);
    let ticks = procfs::clock_ticks();
    let proxy_bin = match &options.proxy_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("portcullis-proxy"),
    };
    anyhow::ensure!(
        proxy_bin.exists(),
        "{} not found: build it first with `cargo build --release -p portcullis-sidecar` (or pass --proxy-bin)",
        proxy_bin.display()
    );
    let self_exe = std::env::current_exe()?;
    let mut meta = Meta {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        cpu: procfs::cpu_model(),
        cores: procfs::processors(),
        versions: vec![
            tool_version("rustc", &["--version"]),
            tool_version("nginx", &["-v"]),
            tool_version("haproxy", &["-v"]),
            tool_version(&proxy_bin.display().to_string(), &["--version"]),
        ],
        load_before: procfs::load_average(),
        connections: options.connections,
        plan: format!("{plan:?}"),
        nice: options.nice,
        ..Meta::default()
    };
    let dir = tempfile::Builder::new()
        .prefix("portcullis-bench-")
        .tempdir()?;
    let d = dir.path();
    eprintln!("portcullis-bench all: working in {}", d.display());
    let pki = servers::write_pki(d)?;

    // The upstream: the sidecar's echo app in a child process on core 0.
    let echo_port = servers::free_port()?;
    let echo_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, echo_port));
    let echo = Server::spawn(
        "echo",
        "0",
        &self_exe,
        &["echo", "--listen", &echo_addr.to_string()],
        &[],
        &d.join("echo.log"),
    )?;
    servers::wait_listening(echo_addr, Duration::from_secs(10)).await?;

    // The small policy: the bench key (scope events) and one key per other scope.
    let token = ApiToken::generate();
    let mut small_keys = BTreeMap::new();
    small_keys.insert(
        token.key_id().clone(),
        keys::key_policy("bench/events", token.hash(keys::BENCH_COST)?, &["events"]),
    );
    for scope in ["identify", "signals"] {
        let other = ApiToken::generate();
        small_keys.insert(
            other.key_id().clone(),
            keys::key_policy(
                &format!("bench/{scope}"),
                other.hash(keys::BENCH_COST)?,
                &[scope],
            ),
        );
    }
    let small_policy = d.join("policy.json");
    keys::write_bundle(&small_policy, &keys::bundle(1, small_keys.clone()))?;

    // Servers under test, all on core 1.
    let start_build =
        |bin: &Path, name: &str, policy: &Path, rust_log: &str, log: &Path, extra: &str| {
            let (inbound, admin) = (servers::free_port()?, servers::free_port()?);
            let config = d.join(format!("{name}.yaml"));
            std::fs::write(
                &config,
                servers::proxy_yaml(inbound, admin, echo_port, &pki, policy) + extra,
            )?;
            let server = Server::spawn(
                name,
                "1",
                bin,
                &["run", "--config", &config.display().to_string()],
                &[("RUST_LOG", rust_log)],
                log,
            )?;
            anyhow::Ok((
                server,
                SocketAddr::from((Ipv4Addr::LOCALHOST, inbound)),
                SocketAddr::from((Ipv4Addr::LOCALHOST, admin)),
            ))
        };
    let start_proxy = |name: &str, policy: &Path, rust_log: &str, log: &Path, extra: &str| {
        start_build(&proxy_bin, name, policy, rust_log, log, extra)
    };
    let (portcullis, pc_addr, pc_admin) = start_proxy(
        "portcullis",
        &small_policy,
        "warn",
        &d.join("portcullis.log"),
        "",
    )?;
    // Audit on: the encrypted file sink when this proxy build has an `audit:` section,
    // otherwise the default audit hook's tracing line per request, written to a file.
    let audit_dir = d.join("audit");
    std::fs::create_dir_all(&audit_dir)?;
    let audit_key = d.join("audit.key");
    std::fs::write(&audit_key, "42".repeat(32))?;
    let audit_yaml = servers::audit_section(&audit_dir, &audit_key);
    let probe = servers::proxy_yaml(1, 2, 3, &pki, &small_policy) + &audit_yaml;
    let audit_file_sink = servers::proxy_accepts(&probe);
    if let Err(e) = &audit_file_sink {
        eprintln!(
            "proxy config has no usable audit file sink ({e}); measuring the tracing audit line instead"
        );
    }
    let audit_label: &'static str = if audit_file_sink.is_ok() {
        AUDITED
    } else {
        "portcullis +audit log line"
    };
    let (audited, au_addr, au_admin) = start_proxy(
        "portcullis-audit",
        &small_policy,
        if audit_file_sink.is_ok() {
            "warn"
        } else {
            "warn,portcullis::audit=info"
        },
        &d.join("portcullis-audit.log"),
        if audit_file_sink.is_ok() {
            audit_yaml.as_str()
        } else {
            ""
        },
    )?;
    // Shipping on: the chain to an audit collector in this process (core 0), under the
    // tenant the demo client certificate names.
    let collector = shipping::start_collector(&pki, &d.join("collector")).await?;
    let ship_yaml =
        shipping::collector_section(collector.addr, &pki, &d.join("ship-spool"), "bench");
    let ship_policy = d.join("policy-demo.json");
    let mut demo_bundle = keys::bundle(1, small_keys);
    portcullis_sidecar::run::demo::TENANT.clone_into(&mut demo_bundle.tenant);
    keys::write_bundle(&ship_policy, &demo_bundle)?;
    let shipped = match servers::proxy_accepts(
        &(servers::proxy_yaml(1, 2, 3, &pki, &ship_policy) + &ship_yaml),
    ) {
        Ok(()) => Some(start_proxy(
            "portcullis-ship",
            &ship_policy,
            "warn",
            &d.join("portcullis-ship.log"),
            &ship_yaml,
        )?),
        Err(e) => {
            eprintln!("proxy config has no collector sink ({e}); no shipping column");
            None
        }
    };
    // The baseline build, with and (when this build has the file sink) without audit,
    // and shipping when it has a collector sink.
    let mut baseline = None;
    let mut baseline_audited = None;
    let mut baseline_shipped = None;
    if let Some(bin) = &options.baseline_proxy_bin {
        anyhow::ensure!(bin.exists(), "{} not found", bin.display());
        baseline = Some(start_build(
            bin,
            "portcullis-before",
            &small_policy,
            "warn",
            &d.join("portcullis-before.log"),
            "",
        )?);
        if audit_file_sink.is_ok() {
            let dir = d.join("audit-before");
            std::fs::create_dir_all(&dir)?;
            baseline_audited = Some(start_build(
                bin,
                "portcullis-before-audit",
                &small_policy,
                "warn",
                &d.join("portcullis-before-audit.log"),
                &servers::audit_section(&dir, &audit_key),
            )?);
        }
        if shipped.is_some() {
            let yaml = shipping::collector_section(
                collector.addr,
                &pki,
                &d.join("ship-spool-before"),
                "bench-before",
            );
            let mut started = start_build(
                bin,
                "portcullis-before-ship",
                &ship_policy,
                "warn",
                &d.join("portcullis-before-ship.log"),
                &yaml,
            )?;
            // An older build without the collector sink refuses the config and exits.
            tokio::time::sleep(Duration::from_secs(1)).await;
            if started.0.running() {
                baseline_shipped = Some(started);
            } else {
                eprintln!(
                    "the baseline build has no collector sink (see {}); no {BASELINE_SHIPPING} column",
                    d.join("portcullis-before-ship.log").display()
                );
            }
        }
    }
    let nginx_port = servers::free_port()?;
    std::fs::write(
        d.join("nginx.conf"),
        servers::nginx_conf(d, nginx_port, echo_port, &pki),
    )?;
    let nginx = Server::spawn(
        "nginx",
        "1",
        Path::new("nginx"),
        &[
            "-p",
            &format!("{}/", d.display()),
            "-c",
            &d.join("nginx.conf").display().to_string(),
            "-e",
            &d.join("nginx-error.log").display().to_string(),
        ],
        &[],
        &d.join("nginx-stderr.log"),
    )?;
    let haproxy_port = servers::free_port()?;
    std::fs::write(
        d.join("haproxy.cfg"),
        servers::haproxy_cfg(haproxy_port, echo_port, &pki),
    )?;
    let haproxy = Server::spawn(
        "haproxy",
        "1",
        Path::new("haproxy"),
        &["-db", "-f", &d.join("haproxy.cfg").display().to_string()],
        &[],
        &d.join("haproxy.log"),
    )?;
    let nginx_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, nginx_port));
    let haproxy_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, haproxy_port));
    servers::wait_ready(pc_admin, Duration::from_secs(20)).await?;
    for (_, _, admin) in baseline
        .iter()
        .chain(&baseline_audited)
        .chain(&baseline_shipped)
    {
        servers::wait_ready(*admin, Duration::from_secs(20)).await?;
    }
    servers::wait_ready(au_admin, Duration::from_secs(20)).await?;
    if let Some((_, _, admin)) = &shipped {
        servers::wait_ready(*admin, Duration::from_secs(20)).await?;
    }
    servers::wait_listening(nginx_addr, Duration::from_secs(10))
        .await
        .with_context(|| {
            format!(
                "nginx did not start; see {}",
                d.join("nginx-error.log").display()
            )
        })?;
    servers::wait_listening(haproxy_addr, Duration::from_secs(10))
        .await
        .with_context(|| {
            format!(
                "haproxy did not start; see {}",
                d.join("haproxy.log").display()
            )
        })?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let verified = load::client_config(&pki.ca, Verify::Roots, None, false)?;
    let verified_mtls = load::client_config(
        &pki.ca,
        Verify::Roots,
        Some((&pki.client_cert, &pki.client_key)),
        false,
    )?;
    let key_header = vec![(
        HeaderName::from_static("x-api-key"),
        HeaderValue::from_str(token.expose_secret())?,
    )];
    let target = |name: &str, addr, tls: Option<Arc<rustls::ClientConfig>>, key: bool| Target {
        name: name.to_owned(),
        addr,
        tls,
        // nginx and HAProxy get the same header (ignored) so requests are the same size.
        headers: if key { key_header.clone() } else { vec![] },
        path: "/v1/events/1".to_owned(),
    };
    let mut columns = vec![
        Column {
            name: "direct",
            target: target("direct", echo_addr, None, true),
            pid: echo.pid,
            tls_server: false,
            open_loop: true,
        },
        Column {
            name: "portcullis",
            target: target("portcullis", pc_addr, Some(verified.clone()), true),
            pid: portcullis.pid,
            tls_server: true,
            open_loop: true,
        },
        Column {
            name: "portcullis mTLS",
            target: target("portcullis mTLS", pc_addr, Some(verified_mtls), false),
            pid: portcullis.pid,
            tls_server: true,
            open_loop: true,
        },
        Column {
            name: audit_label,
            target: target(audit_label, au_addr, Some(verified.clone()), true),
            pid: audited.pid,
            tls_server: false,
            open_loop: true,
        },
        Column {
            name: "nginx",
            target: target("nginx", nginx_addr, Some(verified.clone()), true),
            pid: nginx.pid,
            tls_server: true,
            open_loop: true,
        },
        Column {
            name: "haproxy",
            target: target("haproxy", haproxy_addr, Some(verified.clone()), true),
            pid: haproxy.pid,
            tls_server: true,
            open_loop: true,
        },
    ];
    if let Some((server, addr, _)) = &baseline {
        columns.insert(
            2,
            Column {
                name: BASELINE,
                target: target(BASELINE, *addr, Some(verified.clone()), true),
                pid: server.pid,
                tls_server: true,
                open_loop: true,
            },
        );
    }
    // An audited column (closed and open loop, no handshakes) after `anchor`'s.
    let audited_after = |columns: &mut Vec<Column>,
                         anchor: &str,
                         name: &'static str,
                         server: &Server,
                         addr: SocketAddr| {
        let at = columns
            .iter()
            .position(|c| c.name == anchor)
            .map_or(columns.len(), |i| i + 1);
        columns.insert(
            at,
            Column {
                name,
                target: target(name, addr, Some(verified.clone()), true),
                pid: server.pid,
                tls_server: false,
                open_loop: true,
            },
        );
    };
    if let Some((server, addr, _)) = &shipped {
        audited_after(&mut columns, audit_label, SHIPPING, server, *addr);
    }
    if let Some((server, addr, _)) = &baseline_shipped {
        audited_after(&mut columns, SHIPPING, BASELINE_SHIPPING, server, *addr);
    }
    if let Some((server, addr, _)) = &baseline_audited {
        audited_after(&mut columns, audit_label, BASELINE_AUDITED, server, *addr);
    }
    let mut figures: BTreeMap<&str, Figures> = BTreeMap::new();

    // Idle RSS before any request.
    for c in &columns {
        if c.name != "portcullis mTLS" {
            figures.entry(c.name).or_default().rss_idle = Some(procfs::rss_bytes(c.pid));
        }
    }
    // Every target answers 200 through to the echo app.
    for c in &columns {
        let mut sender = load::connect(&c.target).await?;
        load::request(&mut sender, &c.target)
            .await
            .with_context(|| format!("sanity request to {}", c.name))?;
    }

    eprintln!(
        "== closed loop, {} connections, {:?} each, {} round(s) taking turns",
        options.connections, plan.closed, options.rounds
    );
    // (requests ok, CPU seconds, wall seconds) per column, summed over the rounds, so
    // a slow patch of a shared machine falls on every column alike.
    let mut closed: BTreeMap<&str, (u64, f64, f64)> = BTreeMap::new();
    for round in 1..=options.rounds.max(1) {
        for c in &columns {
            let before = procfs::cpu_seconds(c.pid, ticks);
            let result = load::closed_loop(
                &c.target,
                options.connections,
                Bounds {
                    count: 5_000_000,
                    time: plan.closed,
                },
                &format!("closed {} (round {round})", c.name),
            )
            .await?;
            let cpu = procfs::cpu_seconds(c.pid, ticks) - before;
            let sum = closed.entry(c.name).or_default();
            sum.0 += result.ok;
            sum.1 += cpu;
            sum.2 += result.elapsed.as_secs_f64();
            figures.entry(c.name).or_default().errors += result.errors;
        }
    }
    if shipped.is_some() {
        // The column measures shipping only if the records arrived.
        let stored = collector.stored()?;
        eprintln!("  the collector stored {stored} entries from {SHIPPING}");
        anyhow::ensure!(
            stored > 0,
            "the collector stored nothing from {SHIPPING}; see {}",
            d.join("portcullis-ship.log").display()
        );
    }
    for (name, (ok, cpu, wall)) in closed {
        let f = figures.entry(name).or_default();
        f.max_rps = Some(ok as f64 / wall.max(1e-9));
        f.cpu_cores = stats::ratio(cpu, wall);
        f.per_core = stats::per_core_second(ok, cpu);
        f.cpu_per_1k = stats::cpu_per_thousand(cpu, ok);
    }

    for &rate in &options.rates {
        eprintln!(
            "== open loop, {rate} req/s, {:?} each, {} round(s) taking turns",
            plan.open, options.rounds
        );
        // Per column, summed over the rounds like the closed loop: at equal load the
        // columns differ by a few µs of CPU per request, which one window of /proc
        // ticks cannot tell apart from a slow patch of the machine.
        let mut open: BTreeMap<&str, OpenSum> = BTreeMap::new();
        for round in 1..=options.rounds.max(1) {
            for c in columns.iter().filter(|c| c.open_loop) {
                let before = procfs::cpu_seconds(c.pid, ticks);
                let result = load::open_loop(
                    &c.target,
                    options.connections,
                    f64::from(rate),
                    Bounds {
                        count: u64::from(rate) * plan.open.as_secs().max(1),
                        time: plan.open,
                    },
                    &format!("open {rate}/s {} (round {round})", c.name),
                )
                .await?;
                if result.generator_lag_us > 5_000 {
                    eprintln!(
                        "  warning: the generator's timer ran up to {} µs late (core 0 busy?)",
                        result.generator_lag_us
                    );
                }
                let cpu = procfs::cpu_seconds(c.pid, ticks) - before;
                open.entry(c.name).or_default().add(cpu, &result)?;
            }
        }
        for (name, sum) in open {
            let f = figures.entry(name).or_default();
            if sum.ok > 0 {
                f.open_cpu_us.insert(rate, sum.cpu * 1e6 / sum.ok as f64);
            }
            f.open.insert(
                rate,
                sum.latency.as_ref().map(stats::summary).unwrap_or_default(),
            );
            f.missed.insert(rate, sum.missed);
            f.errors += sum.errors;
        }
    }

    eprintln!(
        "== TLS handshakes, {HANDSHAKE_LOOPS} concurrent, {:?} each",
        plan.handshakes
    );
    for c in columns.iter().filter(|c| c.tls_server) {
        let client_auth =
            (c.name == "portcullis mTLS").then_some((&*pki.client_cert, &*pki.client_key));
        for resume in [false, true] {
            let tls = load::client_config(&pki.ca, Verify::Skip, client_auth, resume)?;
            let before = procfs::cpu_seconds(c.pid, ticks);
            let result = load::handshakes(
                c.target.addr,
                tls,
                HANDSHAKE_LOOPS,
                Bounds {
                    count: 200_000,
                    time: plan.handshakes,
                },
                &format!(
                    "{} handshakes {}",
                    if resume { "resumed" } else { "full" },
                    c.name
                ),
            )
            .await?;
            let cpu = procfs::cpu_seconds(c.pid, ticks) - before;
            let f = figures.entry(c.name).or_default();
            f.errors += result.errors;
            let per_core = stats::per_core_second(result.ok, cpu);
            if resume {
                f.resumed_hs = Some((
                    result.rate(),
                    per_core,
                    result.resumed as f64 / result.ok.max(1) as f64,
                ));
            } else {
                f.full_hs = Some((result.rate(), per_core));
            }
        }
    }

    eprintln!("== RSS with {} TLS connections open", plan.hold);
    for c in columns
        .iter()
        .filter(|c| c.tls_server && c.name != "portcullis mTLS")
    {
        let held = load::hold(&c.target, plan.hold, Duration::from_secs(60)).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        figures.entry(c.name).or_default().rss_1k = Some(procfs::rss_bytes(c.pid));
        drop(held);
        tokio::time::sleep(Duration::from_millis(500)).await;
        if plan.hold_many > 0 {
            let held = load::hold(&c.target, plan.hold_many, Duration::from_secs(120)).await?;
            tokio::time::sleep(Duration::from_millis(1000)).await;
            figures.entry(c.name).or_default().rss_many = Some(procfs::rss_bytes(c.pid));
            drop(held);
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
    }

    // The big policy: a second Portcullis with `options.keys` keys plus the bench key.
    eprintln!(
        "== Portcullis with {} keys in the policy",
        big_keys.keys.len()
    );
    let mut big_bundle_keys = big_keys.keys.clone();
    big_bundle_keys.insert(
        token.key_id().clone(),
        keys::key_policy("bench/events", token.hash(keys::BENCH_COST)?, &["events"]),
    );
    let big_bundle = keys::bundle(1, big_bundle_keys);
    let big_path = d.join("policy-big.json");
    let bytes = keys::write_bundle(&big_path, &big_bundle)?;
    let (big_proxy, big_addr, big_admin) = start_proxy(
        "portcullis-big",
        &big_path,
        "warn",
        &d.join("portcullis-big.log"),
        "",
    )?;
    let ready_in = servers::wait_ready(big_admin, Duration::from_secs(300)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let big_rss_idle = procfs::rss_bytes(big_proxy.pid);
    let big_target = target("portcullis big", big_addr, Some(verified.clone()), true);
    let held = load::hold(&big_target, plan.hold, Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut big = BigPolicy {
        keys: big_bundle.keys.len(),
        bytes,
        generated_in: big_keys.generated_in,
        ready_in,
        rss_idle: big_rss_idle,
        rss_1k: procfs::rss_bytes(big_proxy.pid),
        parsers: vec![],
    };
    drop(held);
    drop(big_proxy);
    // The same file read in a fresh process, by the sidecar's reader and as the wire form.
    for parser in ["sidecar", "wire"] {
        let output = std::process::Command::new("taskset")
            .args(["-c", "0"])
            .arg(&self_exe)
            .args(["bundle-memory", "--parser", parser, "--file"])
            .arg(&big_path)
            .output()?;
        let text = String::from_utf8_lossy(&output.stdout);
        let v: Vec<u64> = text
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if let [ms, rss, hwm, _keys] = v[..] {
            big.parsers.push((parser, ms, rss, hwm));
        }
    }

    eprintln!("== key check micro-benchmark (KeyVerifier::verify, in process, core 0)");
    let costs = keys::key_check_costs(&big_bundle, &token, options.quick).await?;

    meta.load_after = procfs::load_average();
    drop((
        portcullis, audited, shipped, collector, nginx, haproxy, echo,
    ));
    let names: Vec<&str> = columns.iter().map(|c| c.name).collect();
    let report = render_report(&meta, &names, &figures, &options.rates, &big, &costs);
    println!("{report}");
    if let Some(out) = &options.out {
        std::fs::write(out, &report)?;
    }
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / MIB)
}

fn num(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "–".to_owned(), |v| format!("{v:.decimals$}"))
}

fn ratio_cell(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => num(stats::ratio(a, b), 2) + "×",
        _ => "–".to_owned(),
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "**met**" } else { "**missed**" }
}

/// The markdown report: header, one table (figures × targets, last column Portcullis
/// ÷ nginx), the 100k-key and key-check lines, and the targets.
pub fn render_report(
    meta: &Meta,
    names: &[&str],
    figures: &BTreeMap<&str, Figures>,
    rates: &[u32],
    big: &BigPolicy,
    costs: &KeyCheckCosts,
) -> String {
    let get = |name: &str| figures.get(name).cloned().unwrap_or_default();
    let pc = get("portcullis");
    let ng = get("nginx");
    let direct = get("direct");
    let mut out = String::new();
    let _ = writeln!(out, "Command: `{}`", meta.command);
    let _ = writeln!(
        out,
        "Machine: {} cores, {}; load average before {} / after {}",
        meta.cores, meta.cpu, meta.load_before, meta.load_after
    );
    let _ = writeln!(out, "Versions: {}", meta.versions.join("; "));
    let _ = writeln!(
        out,
        "Servers on core 1, generator + echo upstream on core 0, niceness {}; HTTP/1.1 keep-alive, {} connections, GET /v1/events/1; {}\n",
        meta.nice, meta.connections, meta.plan
    );
    let _ = write!(out, "| figure |");
    for n in names {
        let _ = write!(out, " {n} |");
    }
    let _ = writeln!(out, " portcullis ÷ nginx |");
    let _ = writeln!(out, "|---|{}---|", "---:|".repeat(names.len()));
    let mut row = |label: &str, cell: &dyn Fn(&str, &Figures) -> String, r: String| {
        let _ = write!(out, "| {label} |");
        for n in names {
            let _ = write!(out, " {} |", cell(n, &get(n)));
        }
        let _ = writeln!(out, " {r} |");
    };
    row(
        "max req/s (closed loop, wall)",
        &|_, f| num(f.max_rps, 0),
        ratio_cell(pc.max_rps, ng.max_rps),
    );
    row(
        "server CPU used (cores)",
        &|_, f| num(f.cpu_cores, 2),
        String::new(),
    );
    row(
        "**req/s per server core**",
        &|_, f| num(f.per_core, 0),
        ratio_cell(pc.per_core, ng.per_core),
    );
    row(
        "CPU s per 1000 req",
        &|_, f| num(f.cpu_per_1k, 4),
        ratio_cell(pc.cpu_per_1k, ng.cpu_per_1k),
    );
    for &rate in rates {
        let base = direct.open.get(&rate).copied();
        row(
            &format!("latency p50/p99/p99.9 µs @{rate}/s"),
            &|_, f| {
                f.open
                    .get(&rate)
                    .map_or("–".into(), |s| format!("{}/{}/{}", s.p50, s.p99, s.p999))
            },
            String::new(),
        );
        row(
            &format!("**added** p50/p99/p99.9 µs @{rate}/s"),
            &|n, f| match (f.open.get(&rate), base) {
                (Some(s), Some(b)) if n != "direct" => {
                    let [a, b, c] = stats::added(s, &b);
                    format!("{a}/{b}/{c}")
                }
                _ => "–".into(),
            },
            {
                let p = pc
                    .open
                    .get(&rate)
                    .zip(base)
                    .map(|(s, b)| stats::added(s, &b)[1]);
                let n = ng
                    .open
                    .get(&rate)
                    .zip(base)
                    .map(|(s, b)| stats::added(s, &b)[1]);
                match (p, n) {
                    (Some(p), Some(n)) => format!("p99 {p} vs {n} µs"),
                    _ => "–".into(),
                }
            },
        );
    }
    for &rate in rates {
        row(
            &format!("server CPU µs per request @{rate}/s"),
            &|_, f| num(f.open_cpu_us.get(&rate).copied(), 1),
            ratio_cell(
                pc.open_cpu_us.get(&rate).copied(),
                ng.open_cpu_us.get(&rate).copied(),
            ),
        );
    }
    row(
        "open-loop requests missed",
        &|_, f| {
            if f.missed.is_empty() {
                "–".into()
            } else {
                f.missed.values().sum::<u64>().to_string()
            }
        },
        String::new(),
    );
    row(
        "RSS idle (MiB)",
        &|_, f| f.rss_idle.map_or("–".into(), mib),
        ratio_cell(pc.rss_idle.map(|v| v as f64), ng.rss_idle.map(|v| v as f64)),
    );
    row(
        "RSS, 1000 TLS conns open (MiB)",
        &|_, f| f.rss_1k.map_or("–".into(), mib),
        ratio_cell(pc.rss_1k.map(|v| v as f64), ng.rss_1k.map(|v| v as f64)),
    );
    row(
        &format!("RSS, {HOLD_MANY} idle TLS conns open (MiB)"),
        &|_, f| f.rss_many.map_or("–".into(), mib),
        ratio_cell(pc.rss_many.map(|v| v as f64), ng.rss_many.map(|v| v as f64)),
    );
    // What one more idle connection costs: the slope from 1000 held to HOLD_MANY.
    let per_conn = |f: &Figures| {
        let (few, many) = (f.rss_1k?, f.rss_many?);
        Some(many.saturating_sub(few) as f64 / (HOLD_MANY - 1000) as f64 / 1024.0)
    };
    row(
        &format!("KiB per idle TLS conn (1000 → {HOLD_MANY})"),
        &|_, f| num(per_conn(f), 1),
        ratio_cell(per_conn(&pc), per_conn(&ng)),
    );
    row(
        "full handshakes/s (wall)",
        &|_, f| num(f.full_hs.map(|h| h.0), 0),
        ratio_cell(pc.full_hs.map(|h| h.0), ng.full_hs.map(|h| h.0)),
    );
    row(
        "**full handshakes/s per server core**",
        &|_, f| num(f.full_hs.and_then(|h| h.1), 0),
        ratio_cell(pc.full_hs.and_then(|h| h.1), ng.full_hs.and_then(|h| h.1)),
    );
    row(
        "resumption offered: handshakes/s (wall)",
        &|_, f| num(f.resumed_hs.map(|h| h.0), 0),
        ratio_cell(pc.resumed_hs.map(|h| h.0), ng.resumed_hs.map(|h| h.0)),
    );
    row(
        "resumption offered: per server core",
        &|_, f| num(f.resumed_hs.and_then(|h| h.1), 0),
        ratio_cell(
            pc.resumed_hs.and_then(|h| h.1),
            ng.resumed_hs.and_then(|h| h.1),
        ),
    );
    row(
        "share actually resumed",
        &|_, f| {
            f.resumed_hs
                .map_or("–".into(), |h| format!("{:.0}%", h.2 * 100.0))
        },
        String::new(),
    );
    row("errors", &|_, f| f.errors.to_string(), String::new());

    let _ = writeln!(
        out,
        "\nPortcullis with {} keys in the policy (bcrypt cost {} hashes{}; bundle {:.1} MiB JSON): start to /ready {:.2} s, RSS idle {} MiB, with 1000 TLS conns {} MiB",
        big.keys,
        keys::BENCH_COST,
        big.generated_in.map_or(", cached".to_owned(), |t| format!(
            ", generated in {:.0} s",
            t.as_secs_f64()
        )),
        big.bytes as f64 / MIB,
        big.ready_in.as_secs_f64(),
        mib(big.rss_idle),
        mib(big.rss_1k),
    );
    for (parser, ms, rss, hwm) in &big.parsers {
        let who = if *parser == "sidecar" {
            "the sidecar's reader into its compact form (`policy::file::read_policy`)"
        } else {
            "serde_json into the wire form (`PolicyBundle`)"
        };
        let _ = writeln!(
            out,
            "The same bundle read alone in a fresh process by {who}: {ms} ms, RSS after {} MiB, peak {} MiB",
            mib(*rss),
            mib(*hwm)
        );
    }
    let _ = writeln!(
        out,
        "Key check (`KeyVerifier::verify` called directly, one core): cache hit {:.0} ns (3-key bundle), {:.0} ns ({} keys); of which `token::check` (shape, alphabet, checksum) {:.0} ns and the SHA-256 cache digest {:.0} ns; miss {:.0} µs at cost {}, {:.0} µs at cost {} (production)",
        costs.hit_ns,
        costs.hit_big_ns,
        costs.big_keys,
        costs.check_ns,
        costs.digest_ns,
        costs.miss_cost4_us,
        keys::BENCH_COST,
        costs.miss_prod_us,
        costs.prod_cost,
    );

    let _ = writeln!(out, "\n| target | measured | |\n|---|---|---|");
    let mut target = |what: &str, measured: String, met: Option<bool>| {
        let v = met.map_or("not measured", verdict);
        let _ = writeln!(out, "| {what} | {measured} | {v} |");
    };
    target(
        "throughput per core ≥ nginx",
        format!(
            "{} vs {} req/s per core",
            num(pc.per_core, 0),
            num(ng.per_core, 0)
        ),
        pc.per_core.zip(ng.per_core).map(|(p, n)| p >= n),
    );
    let added = |f: &Figures, rate: u32| {
        f.open
            .get(&rate)
            .zip(direct.open.get(&rate))
            .map(|(s, b)| stats::added(s, b)[1])
    };
    target(
        "p99 added < 1 ms at 1k req/s",
        format!(
            "{} µs",
            added(&pc, 1000).map_or("–".into(), |v| v.to_string())
        ),
        added(&pc, 1000).map(|v| v < 1000),
    );
    target(
        "p99 added ≤ nginx at 5k req/s",
        format!(
            "{} vs {} µs",
            added(&pc, 5000).map_or("–".into(), |v| v.to_string()),
            added(&ng, 5000).map_or("–".into(), |v| v.to_string())
        ),
        added(&pc, 5000).zip(added(&ng, 5000)).map(|(p, n)| p <= n),
    );
    target(
        "RSS < 20 MiB idle",
        format!("{} MiB", pc.rss_idle.map_or("–".into(), mib)),
        pc.rss_idle.map(|v| (v as f64) < 20.0 * MIB),
    );
    target(
        "RSS < 64 MiB with 1k conns + 100k keys",
        format!("{} MiB ({} keys)", mib(big.rss_1k), big.keys),
        (big.keys > 0).then_some((big.rss_1k as f64) < 64.0 * MIB),
    );
    target(
        "full handshakes/s ≥ 2× nginx (per server core)",
        format!(
            "{} vs {} per core ({} wall)",
            num(pc.full_hs.and_then(|h| h.1), 0),
            num(ng.full_hs.and_then(|h| h.1), 0),
            ratio_cell(pc.full_hs.map(|h| h.0), ng.full_hs.map(|h| h.0)),
        ),
        pc.full_hs
            .and_then(|h| h.1)
            .zip(ng.full_hs.and_then(|h| h.1))
            .map(|(p, n)| p >= 2.0 * n),
    );
    // An audited column's requests per core against audit off's.
    let mut per_core_vs_off = |what: &str, f: &Figures, note: &str| {
        target(
            what,
            format!(
                "{} ({} vs {} req/s per core{note})",
                ratio_cell(f.per_core, pc.per_core),
                num(f.per_core, 0),
                num(pc.per_core, 0)
            ),
            f.per_core.zip(pc.per_core).map(|(a, p)| a >= 0.9 * p),
        );
    };
    per_core_vs_off(
        "audit on ≥ 0.9× audit off (per server core)",
        &get(AUDITED),
        "",
    );
    let shipping = get(SHIPPING);
    per_core_vs_off(
        "shipping to a collector ≥ 0.9× audit off (per server core, closed loop)",
        &shipping,
        "; the in-process collector shares the generator's core",
    );
    // The same at equal load: CPU per request at the highest open-loop rate.
    if let Some(&rate) = rates.iter().max() {
        let cpu = |f: &Figures| f.open_cpu_us.get(&rate).copied();
        target(
            &format!(
                "shipping to a collector ≥ 0.9× audit off (per server core, {rate}/s open loop)"
            ),
            format!(
                "{} ({} vs {} CPU µs per request)",
                ratio_cell(cpu(&pc), cpu(&shipping)),
                num(cpu(&shipping), 1),
                num(cpu(&pc), 1)
            ),
            cpu(&pc).zip(cpu(&shipping)).map(|(p, s)| p >= 0.9 * s),
        );
    }
    target(
        "key check on a cache hit < 1 µs",
        format!("{:.0} ns", costs.hit_ns),
        (costs.hit_ns > 0.0).then_some(costs.hit_ns < 1000.0),
    );
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn summary(p50: u64, p99: u64, p999: u64) -> Summary {
        Summary {
            count: 100,
            p50,
            p99,
            p999,
            max: p999,
        }
    }

    #[test]
    fn report_has_one_column_per_target_ratios_and_verdicts() {
        let mut figures = BTreeMap::new();
        figures.insert(
            "direct",
            Figures {
                max_rps: Some(20_000.0),
                open: BTreeMap::from([(1000, summary(50, 100, 200))]),
                ..Figures::default()
            },
        );
        figures.insert(
            "portcullis",
            Figures {
                max_rps: Some(10_000.0),
                per_core: Some(12_000.0),
                open: BTreeMap::from([(1000, summary(150, 400, 900))]),
                rss_idle: Some(8 * 1024 * 1024),
                full_hs: Some((2000.0, Some(3000.0))),
                ..Figures::default()
            },
        );
        figures.insert(
            "nginx",
            Figures {
                max_rps: Some(8_000.0),
                per_core: Some(10_000.0),
                full_hs: Some((2000.0, Some(2000.0))),
                ..Figures::default()
            },
        );
        let costs = KeyCheckCosts {
            hit_ns: 1500.0,
            ..KeyCheckCosts::default()
        };
        let text = render_report(
            &Meta::default(),
            &["direct", "portcullis", "nginx"],
            &figures,
            &[1000],
            &BigPolicy::default(),
            &costs,
        );
        let header = text.lines().find(|l| l.starts_with("| figure |")).unwrap();
        assert_eq!(header.matches('|').count(), 6, "{header}");
        assert!(
            text.contains("| max req/s (closed loop, wall) | 20000 | 10000 | 8000 | 1.25× |"),
            "{text}"
        );
        assert!(
            text.contains("| **added** p50/p99/p99.9 µs @1000/s | – | 100/300/700 | – |"),
            "{text}"
        );
        assert!(
            text.contains(
                "| throughput per core ≥ nginx | 12000 vs 10000 req/s per core | **met** |"
            )
        );
        assert!(text.contains("| p99 added < 1 ms at 1k req/s | 300 µs | **met** |"));
        assert!(text.contains("| RSS < 20 MiB idle | 8.0 MiB | **met** |"));
        assert!(text.contains("| full handshakes/s ≥ 2× nginx (per server core) | 3000 vs 2000 per core (1.00× wall) | **missed** |"));
        assert!(text.contains("| key check on a cache hit < 1 µs | 1500 ns | **missed** |"));
        assert!(text.contains("not measured"), "no 5k data must say so");
    }
}
