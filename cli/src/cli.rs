//! The command tree (clap derive).

use clap::{Args, Parser, Subcommand, ValueEnum};
use jiff::Timestamp;
use std::path::PathBuf;

/// Portcullis: API keys, identities, tenants and audit trails from kubectl.
#[derive(Debug, Parser)]
#[command(
    name = "kubectl-portcullis",
    bin_name = "kubectl portcullis",
    version,
    about
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands. `key`, `tenant`, `identity` and `check` will join `audit` here.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Verify and export audit trails.
    #[command(subcommand)]
    Audit(AuditCommand),
}

/// `kubectl portcullis audit ...`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check hash chains and checkpoint signatures; prints OK or the first problem.
    Verify(VerifyArgs),
    /// Export records as CSV or JSON lines, filtered by time and tenant.
    Export(ExportArgs),
}

/// Keys for encrypted segments.
#[derive(Debug, Clone, Default, Args)]
pub struct KeyArgs {
    /// File holding the tenant DEK (32 raw bytes, base64 or hex); used for every segment.
    #[arg(long, value_name = "FILE", conflicts_with = "key_ring")]
    pub dek_file: Option<PathBuf>,
    /// JSON key ring {"<version>": "<base64 key>", ...} for trails spanning DEK rotations.
    #[arg(long, value_name = "FILE")]
    pub key_ring: Option<PathBuf>,
}

/// `audit verify`
#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// A record file, checkpoint file or encrypted segment, or a directory of them.
    #[arg(value_name = "FILE|DIR")]
    pub path: PathBuf,
    /// Decryption keys.
    #[command(flatten)]
    pub keys: KeyArgs,
    /// Accept only checkpoints signed by this public key (base64 SEC1 point); repeatable.
    #[arg(long = "trusted-key", value_name = "BASE64")]
    pub trusted_keys: Vec<String>,
    /// Accept only checkpoints signed by this certificate's key (PEM or DER); repeatable.
    #[arg(long = "trusted-cert", value_name = "FILE")]
    pub trusted_certs: Vec<PathBuf>,
    /// Allow chains whose oldest records were removed by retention.
    #[arg(long)]
    pub allow_pruned_start: bool,
}

/// Export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// CSV with a header row.
    Csv,
    /// JSON lines, each record exactly as stored (still verifiable).
    Json,
}

/// `audit export`
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// A record file or encrypted segment, or a directory of them.
    #[arg(value_name = "FILE|DIR")]
    pub path: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "json")]
    pub format: ExportFormat,
    /// Only records at or after this time (RFC 3339, e.g. 2026-03-16T00:00:00Z).
    #[arg(long, value_parser = parse_time, value_name = "RFC3339")]
    pub since: Option<Timestamp>,
    /// Only records before this time (RFC 3339).
    #[arg(long, value_parser = parse_time, value_name = "RFC3339")]
    pub until: Option<Timestamp>,
    /// Only records of this tenant.
    #[arg(long, value_name = "NAME")]
    pub tenant: Option<String>,
    /// Write here instead of stdout.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Decryption keys.
    #[command(flatten)]
    pub keys: KeyArgs,
}

fn parse_time(s: &str) -> Result<Timestamp, String> {
    s.parse::<Timestamp>().map_err(|_| {
        format!("{s:?} is not an RFC 3339 time; write it like 2026-03-16T14:22:01Z or 2026-03-16T16:22:01+02:00")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bad_time_says_how_to_write_it() {
        let err = Cli::try_parse_from([
            "kubectl-portcullis",
            "audit",
            "export",
            "--since",
            "yesterday",
            "x",
        ]);
        let msg = err
            .map(|_| ())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("2026-03-16T14:22:01Z"), "{msg}");
    }
}
