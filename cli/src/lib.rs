//! `kubectl-portcullis`: the kubectl plugin for Portcullis.
//!
//! - `audit verify|export`: check and export audit trails (local files; `verify` reads
//!   the cluster's trust bundle unless given one or a pinned signer).
//! - `key create|rotate|revoke|show|list`: API keys, with the token printed only by the
//!   commands whose job it is.
//! - `tenant status`, `identity inspect`, `check`: what the operator made of the cluster.
//! - `kek rotate`: ask the operator to rotate the key-encryption key.
//!
//! Cluster commands take kubectl's `--kubeconfig`, `--context`, `-n` and print tables,
//! or JSON/YAML with `-o`.

#![warn(missing_docs)]

pub mod audit;
pub mod cert;
pub mod check;
pub mod cli;
pub mod cluster;
pub mod collector;
pub mod error;
pub mod identity;
pub mod kek;
pub mod key;
pub mod output;
pub mod tenant;

pub use cli::{Cli, Command};
pub use error::CliError;

/// How a command ended when it did not fail outright.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything checked out (exit 0).
    Clean,
    /// The command ran but found problems (exit 1).
    Findings,
}

/// Runs a parsed command line, writing results to `out` and progress/warnings to `err`.
/// Cluster commands run on a runtime of their own; from async code use [`run_async`].
pub fn run(
    cli: Cli,
    out: &mut dyn std::io::Write,
    err: &mut dyn std::io::Write,
) -> anyhow::Result<Outcome> {
    match cli.command {
        Command::Audit(cli::AuditCommand::Verify(args))
            if args.tenant.is_none() && !audit::needs_cluster_bundle(&args) =>
        {
            audit::verify(&args, None, out, err)
        }
        Command::Audit(cli::AuditCommand::Export(args)) if args.path.is_some() => {
            audit::export(&args, out, err)
        }
        command => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(run_async(
                Cli {
                    cluster: cli.cluster,
                    command,
                },
                out,
                err,
            ))
        }
    }
}

/// [`run`] for callers already on a tokio runtime.
pub async fn run_async(
    cli: Cli,
    out: &mut dyn std::io::Write,
    err: &mut dyn std::io::Write,
) -> anyhow::Result<Outcome> {
    use cli::{IdentityCommand, KekCommand, KeyCommand, TenantCommand};
    let connect = || cluster::Cluster::connect(&cli.cluster);
    let outcome = match &cli.command {
        Command::Audit(cli::AuditCommand::Verify(args)) => {
            let bundle = if audit::needs_cluster_bundle(args) {
                // Local mistakes are reported before the cluster is asked.
                audit::load_keys(&args.keys)?;
                Some(audit::cluster_trust_bundle(&cli.cluster).await?)
            } else {
                None
            };
            if let Some(tenant) = &args.tenant {
                return collector::verify(&cli.cluster, args, tenant, bundle, out, err).await;
            }
            return audit::verify(args, bundle, out, err);
        }
        Command::Audit(cli::AuditCommand::Export(args)) if args.path.is_some() => {
            return audit::export(args, out, err);
        }
        Command::Audit(cli::AuditCommand::Export(args)) => {
            return collector::export(&cli.cluster, args, out, err).await;
        }
        Command::Key(KeyCommand::Create(args)) => {
            key::create(&connect().await?, args, out, err).await
        }
        Command::Key(KeyCommand::Rotate(args)) => {
            key::rotate(&connect().await?, args, out, err).await
        }
        Command::Key(KeyCommand::Revoke(args)) => {
            key::revoke(&connect().await?, args, out, err).await
        }
        Command::Key(KeyCommand::Show(args)) => key::show(&connect().await?, args, out, err).await,
        Command::Key(KeyCommand::List(args)) => key::list(&connect().await?, args, out, err).await,
        Command::Tenant(TenantCommand::Status(args)) => {
            tenant::status(&connect().await?, args, out, err).await
        }
        Command::Identity(IdentityCommand::Inspect(args)) => {
            identity::inspect(&connect().await?, args, out, err).await
        }
        Command::Check(args) => check::run(&connect().await?, args, out, err).await,
        Command::Kek(KekCommand::Rotate) => kek::rotate(&connect().await?, out, err).await,
    };
    Ok(outcome?)
}
