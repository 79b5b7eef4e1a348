//! `kubectl-portcullis`: the kubectl plugin for Portcullis.
//!
//! Today: `audit verify` and `audit export`. The command tree leaves room for `key`,
//! `tenant`, `identity` and `check`.

#![warn(missing_docs)]

pub mod audit;
pub mod cli;

pub use cli::{Cli, Command};

/// How a command ended when it did not fail outright.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything checked out (exit 0).
    Clean,
    /// The command ran but found problems (exit 1).
    Findings,
}

/// Runs a parsed command line, writing results to `out` and progress/warnings to `err`.
pub fn run(
    cli: Cli,
    out: &mut dyn std::io::Write,
    err: &mut dyn std::io::Write,
) -> anyhow::Result<Outcome> {
    match cli.command {
        Command::Audit(cli::AuditCommand::Verify(args)) => audit::verify(&args, out, err),
        Command::Audit(cli::AuditCommand::Export(args)) => audit::export(&args, out, err),
    }
}
