//! `portcullis-operator`: the operator binary.

mod flags;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use portcullis_operator::audit_server::{self, ClusterAccess};
use portcullis_operator::run;

use flags::{AuditServerArgs, Pkcs11Flags, RunArgs};

#[derive(Parser)]
#[command(
    name = "portcullis-operator",
    version,
    about = "The Portcullis Kubernetes operator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the CustomResourceDefinitions as YAML, one file per kind.
    Crdgen {
        /// Folder to write into (default: this checkout's crds/).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run the operator: identity service, policy server, webhooks, metrics, and the controllers and CA rotation while leader.
    Run(Box<RunArgs>),
    /// Run the audit service: the per-tenant audit log proxies ship their chains to.
    AuditServer(Box<AuditServerArgs>),
    /// Create the key-encryption key in an HSM for a new install: a token-resident,
    /// sensitive, non-extractable AES-256 key under --pkcs11-key-label (never replaces
    /// one). Starting never creates one; a KEK rotation generates its new key itself.
    Pkcs11CreateKey(Box<Pkcs11Flags>),
    /// Inspect compiled policy.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Compile a tenant's bundle from the cluster and print it with the keys left out.
    /// (A running operator shows its live bundles on `GET /debug/policy` of --policy-addr.)
    Dump {
        /// The tenant.
        #[arg(long)]
        tenant: String,
    },
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn termination() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

async fn run_operator(args: Box<RunArgs>) -> anyhow::Result<()> {
    init_tracing(args.log_json);
    let settings = args.settings()?;
    tracing::info!(?settings, "starting");
    let client = kube::Client::try_default()
        .await
        .context("finding the cluster (in-cluster config, else KUBECONFIG)")?;
    let operator = run::start(client, settings).await?;
    tracing::info!(
        metrics = %operator.metrics_addr, policy = %operator.policy_addr,
        identity = %operator.identity_addr, webhooks = ?operator.webhook_addr, "serving"
    );
    termination().await?;
    tracing::info!("shutting down: finishing reconciles, releasing the lease");
    tokio::select! {
        _ = operator.stop() => {}
        _ = termination() => tracing::warn!("second signal: exiting at once"),
        _ = tokio::time::sleep(run::FORCE_AFTER) => tracing::warn!("shutdown took too long: exiting"),
    }
    Ok(())
}

async fn run_audit_server(args: Box<AuditServerArgs>) -> anyhow::Result<()> {
    init_tracing(args.log_json);
    let settings = args.settings();
    // Exports are authorised by the API server; without one the collector still ingests.
    let server = match kube::Client::try_default().await {
        Ok(client) => {
            use portcullis_operator::audit_cluster::{
                KubeExportAuthorizer, KubeRetention, TenantEvents, TenantSource,
            };
            use portcullis_operator::audit_sinks::KubeSinks;
            let instance = std::env::var("POD_NAME").unwrap_or_else(|_| "portcullis-audit".into());
            let namespace = client.default_namespace().to_owned();
            let events = Arc::new(TenantEvents::new(client.clone(), instance.clone()));
            // Forwarding and retention read every tenant's Tenant: from one watch.
            let tenants =
                TenantSource::watched(client.clone(), tokio_util::sync::CancellationToken::new());
            let access = ClusterAccess {
                retention: KubeRetention::new(tenants.clone(), settings.retention_days),
                sinks: KubeSinks::new(client.clone(), tenants, namespace, instance.clone()),
                observer: Some(events.clone()),
                sink_observer: Some(events),
                authorizer: KubeExportAuthorizer::new(client),
            };
            audit_server::start(settings, access).await?
        }
        Err(e) => {
            tracing::warn!(error = %e, "no Kubernetes API access: exports are refused (503) and every tenant keeps --retention-days until the collector runs with its ServiceAccount");
            let access = ClusterAccess::none(settings.retention_days);
            audit_server::start(settings, access).await?
        }
    };
    termination().await?;
    tracing::info!("shutting down: finishing open batches");
    server.stop().await;
    Ok(())
}

async fn dump_policy(tenant: &str) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("finding the cluster")?;
    let compiled = portcullis_operator::policy::dump(client, tenant).await?;
    println!("{}", serde_json::to_string_pretty(&compiled)?);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")
    };
    match cli.command {
        Command::Crdgen { out } => {
            let dir = out.unwrap_or_else(portcullis_operator::crdgen::default_dir);
            for path in portcullis_operator::crdgen::write_all(&dir)? {
                println!("wrote {}", path.display());
            }
        }
        Command::Run(args) => runtime()?.block_on(run_operator(args))?,
        Command::AuditServer(args) => runtime()?.block_on(run_audit_server(args))?,
        Command::Pkcs11CreateKey(flags) => {
            let config = flags.config()?;
            let id = portcullis_operator::envelope::pkcs11::create_key(&config)?;
            println!(
                "created AES-256 key {:?} in {} (KEK id {id}); start the operator with --kek-provider pkcs11",
                config.key_label, config.token
            );
        }
        Command::Policy {
            command: PolicyCommand::Dump { tenant },
        } => runtime()?.block_on(dump_policy(&tenant))?,
    }
    Ok(())
}
