//! `portcullis-proxy`: `run --config proxy.yaml` (standalone, file-based certificates
//! and policy), `run --config-from-env` (an injected pod: identity, policy and audit key
//! from the operator), `demo` (zero setup; prints the contract lines of DESIGN.md §5),
//! and the pod init steps `init` and `wait-ready`.

use std::{io::Write, path::PathBuf, sync::Arc};

use anyhow::Context;
use clap::{Parser, Subcommand};
use portcullis_sidecar::{
    audit::{AuditHook, TracingAudit},
    config::{ProxyConfig, env::ClusterConfig},
    run::{cluster, demo, drain, proxy},
};

#[derive(Parser)]
#[command(
    name = "portcullis-proxy",
    version,
    about = "The Portcullis sidecar proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy from a proxy.yaml (see sidecar/examples/proxy.yaml), or in an
    /// injected pod from the PORTCULLIS_* environment.
    Run {
        /// Path to proxy.yaml.
        #[arg(
            long,
            env = "PORTCULLIS_PROXY_CONFIG",
            conflicts_with = "config_from_env"
        )]
        config: Option<PathBuf>,
        /// Read the configuration from the environment the Portcullis injector sets
        /// (POD_NAME, POD_NAMESPACE, PORTCULLIS_SERVICE_ACCOUNT, PORTCULLIS_IDENTITY_URL, ...).
        #[arg(long)]
        config_from_env: bool,
    },
    /// Zero-setup demo: throwaway CA, echo app, one key per scope, on 127.0.0.1.
    Demo {
        /// Where to write the PEM files and policy.json (default: a temp dir removed at exit).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Inbound TLS port.
        #[arg(long, default_value_t = 4143)]
        inbound_port: u16,
        /// Admin port.
        #[arg(long, default_value_t = 4191)]
        admin_port: u16,
    },
    /// Install the iptables redirect to the proxy (init container).
    Init(portcullis_sidecar::run::init::InitArgs),
    /// Wait until the proxy's /ready answers 200.
    WaitReady(portcullis_sidecar::run::init::WaitReadyArgs),
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Logs go to stderr: stdout carries the demo's contract lines.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Command::Init(args) => {
            portcullis_sidecar::run::init::run_init(&args)?;
            Ok(())
        }
        Command::WaitReady(args) => Ok(portcullis_sidecar::run::init::run_wait_ready(&args)?),
        command => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(serve(command)),
    }
}

async fn serve(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Init(_) | Command::WaitReady(_) => {}
        Command::Run {
            config_from_env: true,
            ..
        } => {
            let config = ClusterConfig::from_env()
                .context("reading the configuration from the environment (--config-from-env)")?;
            let running = cluster::start(config, Box::new(std::io::stdout())).await?;
            tokio::spawn(drain::on_signal(running.shutdown_token()));
            running.wait().await;
        }
        Command::Run {
            config: Some(config),
            ..
        } => {
            let config = ProxyConfig::load(&config)?;
            let running = proxy::start_default(config).await?;
            tokio::spawn(drain::on_signal(running.shutdown_token()));
            running.wait().await;
        }
        Command::Run { config: None, .. } => {
            anyhow::bail!(
                "say where the configuration is: --config proxy.yaml (or PORTCULLIS_PROXY_CONFIG), or --config-from-env in an injected pod"
            );
        }
        Command::Demo {
            dir,
            inbound_port,
            admin_port,
        } => {
            // With --dir the demo also keeps a verifiable audit trail in <dir>/audit.jsonl.
            let trail = match &dir {
                Some(dir) => Some(demo::file_audit(dir).context("starting the demo audit")?),
                None => None,
            };
            let audit: Arc<dyn AuditHook> = match &trail {
                Some(trail) => trail.clone(),
                None => Arc::new(TracingAudit),
            };
            let options = demo::DemoOptions {
                dir,
                inbound_port,
                admin_port,
                ..demo::DemoOptions::default()
            };
            let demo = demo::start(options, audit)
                .await
                .context("starting the demo")?;
            let mut stdout = std::io::stdout().lock();
            for line in demo.lines() {
                writeln!(stdout, "{line}")?;
            }
            writeln!(stdout, "ready")?;
            stdout.flush()?;
            drop(stdout);
            let token = demo.proxy.shutdown_token();
            tokio::spawn(drain::on_signal(token));
            let demo::Demo { proxy, .. } = demo;
            proxy.wait().await;
            if let Some(trail) = trail {
                trail.shutdown(proxy::AUDIT_DRAIN).await;
            }
        }
    }
    Ok(())
}
