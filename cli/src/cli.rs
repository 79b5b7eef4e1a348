//! The command tree (clap derive).

use clap::{Args, Parser, Subcommand, ValueEnum};
use jiff::Timestamp;
use portcullis_crds::DurationSpec;
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
    /// Which cluster and namespace, as kubectl takes them.
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Verify and export audit trails.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Create, rotate, revoke and inspect API keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Inspect tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Inspect workload identities.
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Preflight and health checks of the installation; exits 1 when a check fails.
    Check(CheckArgs),
    /// The key-encryption key.
    #[command(subcommand)]
    Kek(KekCommand),
}

/// `kubectl portcullis kek ...`
#[derive(Debug, Subcommand)]
pub enum KekCommand {
    /// Ask the operator to rotate the key-encryption key (secret or kms provider): a new key is
    /// staged, made current once every replica has it, and every wrapped key re-wrapped,
    /// with no restart. Progress: `kubectl portcullis check`.
    Rotate,
}

/// The kubectl-style connection flags, accepted before or after any subcommand.
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        help_heading = "Cluster options"
    )]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(
        long,
        global = true,
        value_name = "NAME",
        help_heading = "Cluster options"
    )]
    pub context: Option<String>,
    /// Namespace (default: the context's namespace, else `default`).
    #[arg(
        short = 'n',
        long,
        global = true,
        value_name = "NAMESPACE",
        help_heading = "Cluster options"
    )]
    pub namespace: Option<String>,
    /// Namespace the operator runs in (its CA Secrets and Deployment live there).
    #[arg(
        long,
        global = true,
        value_name = "NAMESPACE",
        default_value = "portcullis-system",
        help_heading = "Cluster options"
    )]
    pub operator_namespace: String,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people.
    #[default]
    Table,
    /// JSON, for scripts.
    Json,
    /// YAML.
    Yaml,
}

/// `-o/--output`.
#[derive(Debug, Clone, Copy, Default, Args)]
pub struct OutputArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
}

/// `kubectl portcullis key ...`
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create an ApiKey, wait for the operator to issue it and print its token once.
    Create(KeyCreateArgs),
    /// Issue a new token for a key and print it once; the old one keeps working for the overlap.
    Rotate(KeyRotateArgs),
    /// Revoke a key: every sidecar refuses it within a second.
    Revoke(KeyRevokeArgs),
    /// Show a key (the token only with --reveal).
    Show(KeyShowArgs),
    /// List keys with their state.
    List(KeyListArgs),
}

/// `key create`
#[derive(Debug, Clone, Args)]
pub struct KeyCreateArgs {
    /// Name of the ApiKey.
    pub name: String,
    /// The role the key acts as (`Developer`, or a custom Role's name).
    #[arg(long)]
    pub role: String,
    /// Scopes to grant, comma-separated; each must be granted by the role.
    #[arg(long, value_delimiter = ',', required = true, value_name = "SCOPE,...")]
    pub scopes: Vec<String>,
    /// Requests per window, e.g. 1000/1m (default: the tenant's).
    #[arg(long, value_name = "N/WINDOW")]
    pub rate_limit: Option<RateLimitArg>,
    /// Requests allowed at once beyond the steady rate.
    #[arg(long, requires = "rate_limit", value_name = "N")]
    pub burst: Option<u32>,
    /// Networks the key may be used from, comma-separated CIDRs.
    #[arg(long, value_delimiter = ',', value_name = "CIDR,...")]
    pub ip_allowlist: Vec<String>,
    /// Lifetime from issue, e.g. 90d (default: the tenant's).
    #[arg(long, value_name = "DURATION", conflicts_with = "expires_at")]
    pub expires_after: Option<DurationSpec>,
    /// Fixed expiry (RFC 3339).
    #[arg(long, value_parser = parse_time, value_name = "RFC3339")]
    pub expires_at: Option<Timestamp>,
    /// How long to wait for the operator to issue the key.
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    pub wait: DurationSpec,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `key rotate`
#[derive(Debug, Clone, Args)]
pub struct KeyRotateArgs {
    /// Name of the ApiKey.
    pub name: String,
    /// How long to wait for the operator to issue the new token.
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    pub wait: DurationSpec,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `key revoke`
#[derive(Debug, Clone, Args)]
pub struct KeyRevokeArgs {
    /// Name of the ApiKey.
    pub name: String,
    /// How long to wait for the operator to confirm.
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    pub wait: DurationSpec,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `key show`
#[derive(Debug, Clone, Args)]
pub struct KeyShowArgs {
    /// Name of the ApiKey.
    pub name: String,
    /// Also print the plaintext token, read from the key's Secret.
    #[arg(long)]
    pub reveal: bool,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `key list`
#[derive(Debug, Clone, Args)]
pub struct KeyListArgs {
    /// List keys in every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `kubectl portcullis tenant ...`
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Namespaces, classification, encryption key, keys by state and warnings.
    Status(TenantStatusArgs),
}

/// `tenant status`
#[derive(Debug, Clone, Args)]
pub struct TenantStatusArgs {
    /// Name of the Tenant.
    pub name: String,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `kubectl portcullis identity ...`
#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// Whether a pod is injected, its SPIFFE ID and (with --admin-url) its certificate.
    Inspect(IdentityInspectArgs),
}

/// `identity inspect`
#[derive(Debug, Clone, Args)]
pub struct IdentityInspectArgs {
    /// Name of the pod.
    pub pod: String,
    /// SPIFFE trust domain (the operator's --trust-domain).
    #[arg(long, default_value = "cluster.local", value_name = "DOMAIN")]
    pub trust_domain: String,
    /// Fetch the certificate from the proxy's admin endpoint at this URL, e.g.
    /// http://127.0.0.1:4191 after `kubectl port-forward pod/POD 4191`. Without it no
    /// request is sent to the pod.
    #[arg(long, value_name = "URL")]
    pub admin_url: Option<String>,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `check`
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `--rate-limit N/WINDOW`: `requests` per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitArg {
    /// Requests per window (at least 1).
    pub requests: u32,
    /// The window.
    pub per: DurationSpec,
}

impl std::str::FromStr for RateLimitArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let hint = "write requests per window, e.g. 1000/1m, 50/1s or 10000/1h";
        let (requests, per) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} has no '/': {hint}"))?;
        let requests: u32 = requests
            .trim()
            .parse()
            .map_err(|_| format!("{requests:?} is not a whole number of requests: {hint}"))?;
        if requests == 0 {
            return Err(format!("the limit must allow at least 1 request: {hint}"));
        }
        let per = per.trim();
        // "1000/m" reads naturally: a bare unit means one of it.
        let per: DurationSpec = if per.bytes().all(|b| b.is_ascii_alphabetic()) {
            format!("1{per}").parse()
        } else {
            per.parse()
        }
        .map_err(|e| format!("{e}; {hint}"))?;
        if per.get().is_zero() {
            return Err(format!("the window must be longer than 0s: {hint}"));
        }
        Ok(Self { requests, per })
    }
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
    /// Leave it out to verify a tenant's whole log in the audit collector (--tenant and
    /// --server; pruned starts are allowed there, retention removes old days).
    #[arg(value_name = "FILE|DIR", required_unless_present = "tenant")]
    pub path: Option<PathBuf>,
    /// The tenant whose log in the collector to verify.
    #[arg(
        long,
        value_name = "NAME",
        conflicts_with = "path",
        requires = "server"
    )]
    pub tenant: Option<String>,
    /// Reading from the audit collector instead of files.
    #[command(flatten)]
    pub collector: CollectorArgs,
    /// Decryption keys.
    #[command(flatten)]
    pub keys: KeyArgs,
    /// Accept only checkpoints signed by this public key (base64 SEC1 point); repeatable.
    #[arg(long = "trusted-key", value_name = "BASE64")]
    pub trusted_keys: Vec<String>,
    /// Accept only checkpoints signed by this certificate's key (PEM or DER); repeatable.
    #[arg(long = "trusted-cert", value_name = "FILE")]
    pub trusted_certs: Vec<PathBuf>,
    /// Check checkpoint signers against this trust bundle (PEM, the `ca-bundle.crt` of
    /// ConfigMap portcullis-trust-bundle) instead of reading it from the cluster.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure_any_signer")]
    pub trust_bundle: Option<PathBuf>,
    /// Accept checkpoints signed by any key: proves only that the trail is
    /// self-consistent, not who wrote it.
    #[arg(long)]
    pub insecure_any_signer: bool,
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
    /// A record file or encrypted segment, or a directory of them. Leave it out to read
    /// the tenant's log from the audit collector (--tenant and --server).
    #[arg(value_name = "FILE|DIR")]
    pub path: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "json")]
    pub format: ExportFormat,
    /// Only records at or after this time: RFC 3339 (2026-03-16T00:00:00Z) or an age
    /// (24h, 7d).
    #[arg(long, value_parser = parse_time, value_name = "TIME|AGE")]
    pub since: Option<Timestamp>,
    /// Only records before this time: RFC 3339 or an age.
    #[arg(long, value_parser = parse_time, value_name = "TIME|AGE")]
    pub until: Option<Timestamp>,
    /// Only records of this tenant (required when reading from the collector).
    #[arg(long, value_name = "NAME")]
    pub tenant: Option<String>,
    /// Only this action (api.identify), or with a trailing * every action starting so
    /// (admin.*).
    #[arg(long, value_name = "ACTION")]
    pub action: Option<String>,
    /// Only this principal (key:ak_***7f2, spiffe://..., user:...).
    #[arg(long, value_name = "PRINCIPAL")]
    pub principal: Option<String>,
    /// Write here instead of stdout.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Decryption keys (local files only).
    #[command(flatten)]
    pub keys: KeyArgs,
    /// Reading from the audit collector instead of files.
    #[command(flatten)]
    pub collector: CollectorArgs,
}

/// Where the audit collector is and how to prove who you are to it.
#[derive(Debug, Clone, Default, Args)]
pub struct CollectorArgs {
    /// Where the collector is reached, e.g. https://127.0.0.1:8091 after
    /// `kubectl -n portcullis-system port-forward svc/portcullis-audit 8091`.
    #[arg(long, value_name = "URL", help_heading = "Collector")]
    pub server: Option<String>,
    /// The name the collector's certificate must carry (default:
    /// portcullis-audit.<operator namespace>.svc, whatever address --server uses).
    #[arg(long, value_name = "NAME", help_heading = "Collector")]
    pub server_name: Option<String>,
    /// Roots the collector's certificate must chain to (default: ConfigMap
    /// portcullis-trust-bundle in the -n namespace).
    #[arg(long, value_name = "FILE", help_heading = "Collector")]
    pub ca_file: Option<PathBuf>,
    /// A file holding the bearer token to send (default: the kubeconfig user's token),
    /// e.g. from `kubectl create token <serviceaccount>`.
    #[arg(long, value_name = "FILE", help_heading = "Collector")]
    pub token_file: Option<PathBuf>,
}

fn parse_time(s: &str) -> Result<Timestamp, String> {
    if let Ok(at) = s.parse::<Timestamp>() {
        return Ok(at);
    }
    let age = s.parse::<DurationSpec>().map_err(|_| {
        format!("{s:?} is neither an RFC 3339 time nor an age; write it like 2026-03-16T14:22:01Z, 2026-03-16T16:22:01+02:00, 24h or 7d")
    })?;
    jiff::SignedDuration::try_from(age.get())
        .ok()
        .and_then(|age| Timestamp::now().checked_sub(age).ok())
        .ok_or_else(|| format!("{s:?} reaches back before the earliest time there is"))
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
    fn rate_limit_parses_requests_per_window() {
        let parse = |s: &str| s.parse::<RateLimitArg>();
        assert_eq!(
            parse("1000/1m"),
            Ok(RateLimitArg {
                requests: 1000,
                per: DurationSpec::minutes(1)
            })
        );
        assert_eq!(parse("50/m").map(|r| r.per), Ok(DurationSpec::minutes(1)));
        assert_eq!(parse("10/1h30m").map(|r| r.per.get().as_secs()), Ok(5_400));
        for bad in [
            "1000", "0/1m", "x/1m", "1000/1y", "1000/0s", "-1/1m", "/1m", "1000/",
        ] {
            let err = parse(bad).err().unwrap_or_default();
            assert!(err.contains("e.g. 1000/1m"), "{bad}: {err}");
        }
    }

    #[test]
    fn global_flags_work_before_and_after_the_subcommand() {
        let before = Cli::try_parse_from([
            "kubectl-portcullis",
            "-n",
            "acme",
            "--context",
            "prod",
            "key",
            "list",
            "-o",
            "json",
        ]);
        let after = Cli::try_parse_from([
            "kubectl-portcullis",
            "key",
            "show",
            "ingest",
            "--namespace",
            "acme",
            "--kubeconfig",
            "/tmp/kc",
        ]);
        let (Ok(before), Ok(after)) = (before, after) else {
            panic!("global flags were refused");
        };
        assert_eq!(before.cluster.namespace.as_deref(), Some("acme"));
        assert_eq!(before.cluster.context.as_deref(), Some("prod"));
        assert_eq!(before.cluster.operator_namespace, "portcullis-system");
        assert!(matches!(
            before.command,
            Command::Key(KeyCommand::List(KeyListArgs {
                output: OutputArgs {
                    format: OutputFormat::Json
                },
                ..
            }))
        ));
        assert_eq!(after.cluster.namespace.as_deref(), Some("acme"));
        assert!(matches!(
            after.command,
            Command::Key(KeyCommand::Show(KeyShowArgs { reveal: false, .. }))
        ));
    }

    #[test]
    fn key_create_takes_lists_and_refuses_two_expiries() {
        let cli = Cli::try_parse_from([
            "kubectl-portcullis",
            "key",
            "create",
            "ingest",
            "--role",
            "Developer",
            "--scopes",
            "identify,events",
            "--ip-allowlist",
            "10.0.0.0/8,2001:db8::/32",
            "--rate-limit",
            "1000/1m",
            "--burst",
            "50",
            "--expires-after",
            "90d",
        ]);
        let Ok(Cli {
            command: Command::Key(KeyCommand::Create(args)),
            ..
        }) = cli
        else {
            panic!("key create was refused");
        };
        assert_eq!(args.scopes, ["identify", "events"]);
        assert_eq!(args.ip_allowlist, ["10.0.0.0/8", "2001:db8::/32"]);
        assert_eq!(args.burst, Some(50));
        assert_eq!(args.wait.get().as_secs(), 30);
        let both = Cli::try_parse_from([
            "kubectl-portcullis",
            "key",
            "create",
            "k",
            "--role",
            "R",
            "--scopes",
            "a",
            "--expires-after",
            "1d",
            "--expires-at",
            "2030-01-01T00:00:00Z",
        ]);
        assert!(both.is_err());
    }

    #[test]
    fn audit_keeps_its_own_output_flag() {
        let cli = Cli::try_parse_from([
            "kubectl-portcullis",
            "audit",
            "export",
            "dir",
            "-o",
            "out.csv",
            "--format",
            "csv",
        ]);
        assert!(
            matches!(
                cli,
                Ok(Cli {
                    command: Command::Audit(AuditCommand::Export(ExportArgs {
                        output: Some(_),
                        ..
                    })),
                    ..
                })
            ),
            "{cli:?}"
        );
    }

    #[test]
    fn an_age_counts_back_from_now() {
        let before = Timestamp::now();
        let since = parse_time("24h").unwrap_or_else(|e| panic!("{e}"));
        let back = before.duration_since(since).as_secs();
        assert!((86_399..=86_401).contains(&back), "{back}");
        assert_eq!(
            parse_time("2026-03-16T14:22:01Z").map(|t| t.to_string()),
            Ok("2026-03-16T14:22:01Z".to_owned())
        );
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
