//! `portcullis-operator`: the operator binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use portcullis_api::names::{is_dns_label, is_dns_subdomain};
use portcullis_api::spiffe::TrustDomain;
use portcullis_crds::DurationSpec;
use portcullis_operator::ca::CaSettings;
use portcullis_operator::context::SecretsBinding;
use portcullis_operator::run::{self, OperatorSettings, WebhookRunSettings};
use portcullis_operator::webhook::inject::ProxyResources;

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

#[derive(Args, Debug)]
struct RunArgs {
    /// The operator's own namespace (KEK, CA and DEK Secrets, Lease).
    #[arg(long, env = "POD_NAMESPACE", default_value = "portcullis-system")]
    namespace: String,
    /// The operator's Service: its serving certificates name <service>.<ns>.svc and
    /// <service>.<ns>.svc.cluster.local, and injected pods call it there.
    #[arg(long, env = "PORTCULLIS_SERVICE_NAME", default_value = run::SERVICE_NAME, value_parser = dns_label)]
    service_name: String,
    /// The ServiceAccount the operator runs as (exempt from the webhook's escalation
    /// check); default: the Service name.
    #[arg(long, env = "PORTCULLIS_SERVICE_ACCOUNT", value_parser = dns_subdomain)]
    service_account: Option<String>,
    /// The ClusterRole granting ApiKey Secret access, which the operator binds to its
    /// ServiceAccount in each tenant namespace (the chart's `<release>-tenant-secrets`);
    /// unset: no binding is written (the operator's credentials must reach the Secrets).
    #[arg(long, env = "PORTCULLIS_TENANT_SECRETS_ROLE", value_parser = dns_subdomain)]
    tenant_secrets_role: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "PORTCULLIS_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Address of the policy server (mTLS).
    #[arg(long, env = "PORTCULLIS_POLICY_ADDR", default_value = "0.0.0.0:8090")]
    policy_addr: SocketAddr,
    /// Address of the identity service.
    #[arg(long, env = "PORTCULLIS_IDENTITY_ADDR", default_value = "0.0.0.0:8443")]
    identity_addr: SocketAddr,
    /// Address of the admission webhooks.
    #[arg(long, env = "PORTCULLIS_WEBHOOK_ADDR", default_value = "0.0.0.0:9443")]
    webhook_addr: SocketAddr,
    /// Another name (DNS name or IP address) for the identity, policy and webhook
    /// serving certificates; repeatable (environment: comma-separated).
    #[arg(long = "extra-san", env = "PORTCULLIS_EXTRA_SANS", value_delimiter = ',', value_parser = san)]
    extra_sans: Vec<String>,
    /// The identity service URL the injector writes into pods
    /// [default: https://<service>.<namespace>.svc:8443].
    #[arg(long, env = "PORTCULLIS_IDENTITY_URL", value_parser = https_url)]
    identity_url: Option<String>,
    /// The policy server URL the injector writes into pods
    /// [default: https://<service>.<namespace>.svc:8090].
    #[arg(long, env = "PORTCULLIS_POLICY_URL", value_parser = https_url)]
    policy_url: Option<String>,
    /// Run outside the cluster: the operator applies the webhook configurations itself
    /// with clientConfig.url <url>/inject and <url>/validate (default: the chart's
    /// configurations, through the Service; only their caBundle is patched).
    #[arg(long, env = "PORTCULLIS_WEBHOOK_URL", value_parser = https_url)]
    webhook_url: Option<String>,
    /// Do not serve the admission webhooks.
    #[arg(long, env = "PORTCULLIS_NO_WEBHOOKS", conflicts_with = "webhook_url")]
    no_webhooks: bool,
    /// Serve the policy server over plain HTTP, to anyone, without the tenant check
    /// (audit keys are then not served). For debugging only: never in a cluster.
    #[arg(long, env = "PORTCULLIS_POLICY_INSECURE_DEBUG")]
    policy_insecure_debug: bool,
    /// Name of the MutatingWebhookConfiguration whose caBundle the operator keeps.
    #[arg(long, env = "PORTCULLIS_MUTATING_WEBHOOK_NAME", default_value = "portcullis-injector", value_parser = dns_subdomain)]
    mutating_webhook_name: String,
    /// Name of the ValidatingWebhookConfiguration whose caBundle the operator keeps.
    #[arg(long, env = "PORTCULLIS_VALIDATING_WEBHOOK_NAME", default_value = "portcullis-validator", value_parser = dns_subdomain)]
    validating_webhook_name: String,

    /// The cluster's DNS domain: workload certificates name their Services
    /// <service>.<ns>.svc and <service>.<ns>.svc.<cluster-domain>.
    #[arg(long, env = "PORTCULLIS_CLUSTER_DOMAIN", default_value = "cluster.local", value_parser = dns_subdomain)]
    cluster_domain: String,
    /// SPIFFE trust domain: workloads get spiffe://<trust-domain>/ns/<ns>/sa/<sa>.
    #[arg(long, env = "PORTCULLIS_TRUST_DOMAIN", default_value = "cluster.local", value_parser = trust_domain)]
    trust_domain: TrustDomain,
    /// Workload certificates are renewed this often.
    #[arg(long, env = "PORTCULLIS_ROTATION_PERIOD", default_value = "72h", value_parser = positive_duration)]
    rotation_period: DurationSpec,
    /// A workload certificate stays valid this long past its rotation period.
    #[arg(long, env = "PORTCULLIS_ROTATION_GRACE", default_value = "24h")]
    rotation_grace: DurationSpec,
    /// The issuing intermediate CA rotates this often.
    #[arg(long, env = "PORTCULLIS_INTERMEDIATE_ROTATION_PERIOD", default_value = "720h", value_parser = positive_duration)]
    intermediate_rotation_period: DurationSpec,
    /// The root CA rotates this often (overlapping trust bundle).
    #[arg(long, env = "PORTCULLIS_ROOT_ROTATION_PERIOD", default_value = "8760h", value_parser = positive_duration)]
    root_rotation_period: DurationSpec,

    /// Run the controllers only while holding the Lease (--leader-election=false to disable).
    #[arg(long, env = "PORTCULLIS_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Name of the leader-election Lease.
    #[arg(long, env = "PORTCULLIS_LEASE_NAME", default_value = run::LEASE_NAME)]
    lease_name: String,
    /// How long a Lease holds without renewal.
    #[arg(long, env = "PORTCULLIS_LEASE_DURATION", default_value = "15s", value_parser = positive_duration)]
    lease_duration: DurationSpec,
    /// The leader gives up leading when it cannot renew within this.
    #[arg(long, env = "PORTCULLIS_RENEW_DEADLINE", default_value = "10s", value_parser = positive_duration)]
    renew_deadline: DurationSpec,
    /// How often candidates retry and the leader renews.
    #[arg(long, env = "PORTCULLIS_RETRY_PERIOD", default_value = "2s", value_parser = positive_duration)]
    retry_period: DurationSpec,
    /// This replica's identity in the Lease (default: pod name plus a random suffix).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,

    /// An existing Secret (in --namespace) holding the key-encryption key under `kek`;
    /// by default `portcullis-kek`, created on first start.
    #[arg(long, env = "PORTCULLIS_KEK_SECRET")]
    kek_secret: Option<String>,
    /// How long a rotated key's previous token stays valid.
    #[arg(long, env = "PORTCULLIS_KEY_ROTATION_OVERLAP", default_value = "1h")]
    key_rotation_overlap: DurationSpec,
    /// bcrypt cost of new API-key hashes (4-31).
    #[arg(long, env = "PORTCULLIS_KEY_HASH_COST", default_value_t = portcullis_crds::token::HASH_COST, value_parser = clap::value_parser!(u32).range(4..=31))]
    key_hash_cost: u32,

    /// The proxy image the injector adds (it also runs the init step).
    #[arg(long, env = "PORTCULLIS_PROXY_IMAGE", default_value = run::PROXY_IMAGE)]
    proxy_image: String,
    /// imagePullPolicy of the injected containers.
    #[arg(long, env = "PORTCULLIS_PROXY_IMAGE_PULL_POLICY", default_value = "IfNotPresent", value_parser = ["Always", "IfNotPresent", "Never"])]
    proxy_image_pull_policy: String,
    /// Requests and limits of the injected proxy, as JSON:
    /// {"requests":{"cpu":"10m","memory":"20Mi"},"limits":{"cpu":"500m","memory":"128Mi"}}.
    #[arg(long, env = "PORTCULLIS_PROXY_RESOURCES", value_parser = proxy_resources)]
    proxy_resources: Option<ProxyResources>,
    /// Also redirect outbound TCP through the proxy's outbound port 4140.
    #[arg(long, env = "PORTCULLIS_REDIRECT_OUTBOUND", default_value_t = false, action = clap::ArgAction::Set)]
    redirect_outbound: bool,
    /// Lifetime of the projected identity token in injected pods (600 or more).
    #[arg(long, env = "PORTCULLIS_TOKEN_EXPIRATION_SECONDS", default_value_t = 3600, value_parser = clap::value_parser!(i64).range(600..))]
    token_expiration_seconds: i64,
    /// Namespaces never injected (comma-separated); kube-system and --namespace always are.
    #[arg(long, env = "PORTCULLIS_EXCLUDED_NAMESPACES", value_delimiter = ',', default_value = "kube-system,kube-public,kube-node-lease", value_parser = dns_label)]
    excluded_namespaces: Vec<String>,

    /// Log as JSON lines instead of text.
    #[arg(long, env = "PORTCULLIS_LOG_JSON")]
    log_json: bool,
}

fn trust_domain(value: &str) -> Result<TrustDomain, String> {
    TrustDomain::new(value).map_err(|e| e.to_string())
}

fn positive_duration(value: &str) -> Result<DurationSpec, String> {
    let duration: DurationSpec = value
        .parse()
        .map_err(|e: portcullis_crds::duration::DurationError| e.to_string())?;
    if duration.get().is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(duration)
}

fn dns_label(value: &str) -> Result<String, String> {
    if is_dns_label(value) {
        Ok(value.to_owned())
    } else {
        Err("must be a DNS label: lowercase letters, digits and '-', at most 63".into())
    }
}

fn dns_subdomain(value: &str) -> Result<String, String> {
    if is_dns_subdomain(value) {
        Ok(value.to_owned())
    } else {
        Err("must be a DNS subdomain: dot-separated DNS labels".into())
    }
}

/// An IP address or a DNS name (a leading `*.` wildcard allowed).
fn san(value: &str) -> Result<String, String> {
    let value = value.trim();
    if value.parse::<std::net::IpAddr>().is_ok() {
        return Ok(value.to_owned());
    }
    let name = value.strip_prefix("*.").unwrap_or(value);
    dns_subdomain(name)
        .map(|_| value.to_owned())
        .map_err(|_| format!("{value:?} is neither an IP address nor a DNS name"))
}

fn https_url(value: &str) -> Result<String, String> {
    let uri: http::Uri = value.parse().map_err(|e| format!("not a URL: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err("must be an https:// URL".into());
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    if uri.query().is_some() {
        return Err("must not have a query".into());
    }
    Ok(value.trim_end_matches('/').to_owned())
}

fn proxy_resources(value: &str) -> Result<ProxyResources, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Amounts {
        cpu: Option<String>,
        memory: Option<String>,
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Resources {
        requests: Option<Amounts>,
        limits: Option<Amounts>,
    }
    let parsed: Resources = serde_json::from_str(value).map_err(|e| {
        format!(r#"not {{"requests":{{"cpu":..,"memory":..}},"limits":{{..}}}}: {e}"#)
    })?;
    let quantity = |q: Option<String>, default: String| -> Result<String, String> {
        match q {
            None => Ok(default),
            Some(q)
                if !q.is_empty() && q.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.') =>
            {
                Ok(q)
            }
            Some(q) => Err(format!("{q:?} is not a Kubernetes quantity")),
        }
    };
    let defaults = ProxyResources::default();
    let requests = parsed.requests.unwrap_or(Amounts {
        cpu: None,
        memory: None,
    });
    let limits = parsed.limits.unwrap_or(Amounts {
        cpu: None,
        memory: None,
    });
    Ok(ProxyResources {
        cpu_request: quantity(requests.cpu, defaults.cpu_request)?,
        memory_request: quantity(requests.memory, defaults.memory_request)?,
        cpu_limit: quantity(limits.cpu, defaults.cpu_limit)?,
        memory_limit: quantity(limits.memory, defaults.memory_limit)?,
    })
}

impl RunArgs {
    fn settings(&self) -> anyhow::Result<OperatorSettings> {
        let identity = match &self.identity {
            Some(pod) => format!("{pod}-{:08x}", rand::random::<u32>()),
            None => run::default_identity(),
        };
        let namespace = dns_label(&self.namespace).map_err(|e| {
            anyhow::anyhow!("--namespace (POD_NAMESPACE) {:?}: {e}", self.namespace)
        })?;
        let mut settings = OperatorSettings::new(&namespace, &identity);
        settings.metrics_addr = self.metrics_addr;
        settings.policy_addr = self.policy_addr;
        settings.policy_insecure_debug = self.policy_insecure_debug;
        settings.identity_addr = self.identity_addr;
        settings.service_name.clone_from(&self.service_name);
        settings.extra_sans.clone_from(&self.extra_sans);
        settings.cluster_domain.clone_from(&self.cluster_domain);
        settings.reconcile.key_rotation_overlap = self.key_rotation_overlap.get();
        settings.reconcile.hash_cost = self.key_hash_cost;
        settings.reconcile.secrets_binding =
            self.tenant_secrets_role
                .as_ref()
                .map(|cluster_role| SecretsBinding {
                    cluster_role: cluster_role.clone(),
                    service_account: self
                        .service_account
                        .clone()
                        .unwrap_or_else(|| self.service_name.clone()),
                });
        settings.leader_election = self.leader_election;
        settings.lease.name.clone_from(&self.lease_name);
        settings.lease.lease_duration = self.lease_duration.get();
        settings.lease.renew_deadline = self.renew_deadline.get();
        settings.lease.retry_period = self.retry_period.get();
        if settings.lease.renew_deadline >= settings.lease.lease_duration {
            anyhow::bail!(
                "--renew-deadline (PORTCULLIS_RENEW_DEADLINE) must be shorter than --lease-duration (PORTCULLIS_LEASE_DURATION)"
            );
        }
        if settings.lease.retry_period >= settings.lease.renew_deadline {
            anyhow::bail!(
                "--retry-period (PORTCULLIS_RETRY_PERIOD) must be shorter than --renew-deadline (PORTCULLIS_RENEW_DEADLINE)"
            );
        }
        settings.kek_secret.clone_from(&self.kek_secret);

        let mut ca = CaSettings::new(self.trust_domain.clone());
        ca.leaf_rotation_period = self.rotation_period.get();
        ca.leaf_grace = self.rotation_grace.get();
        ca.intermediate_rotation_period = self.intermediate_rotation_period.get();
        ca.root_rotation_period = self.root_rotation_period.get();
        ca.validate().map_err(|e| {
            anyhow::anyhow!(
                "--rotation-period/--rotation-grace/--intermediate-rotation-period/--root-rotation-period \
                 (PORTCULLIS_ROTATION_PERIOD, ...): {e}"
            )
        })?;
        settings.ca = ca;

        settings.webhooks = if self.no_webhooks {
            None
        } else {
            let mut webhooks = WebhookRunSettings::new(&namespace, &self.service_name);
            webhooks.addr = self.webhook_addr;
            webhooks.url.clone_from(&self.webhook_url);
            webhooks
                .mutating_configuration
                .clone_from(&self.mutating_webhook_name);
            webhooks
                .validating_configuration
                .clone_from(&self.validating_webhook_name);
            if let Some(account) = &self.service_account {
                webhooks.service_account.clone_from(account);
            }
            let inject = &mut webhooks.inject;
            inject.proxy_image.clone_from(&self.proxy_image);
            inject
                .image_pull_policy
                .clone_from(&self.proxy_image_pull_policy);
            if let Some(resources) = &self.proxy_resources {
                inject.resources = resources.clone();
            }
            inject.redirect_outbound = self.redirect_outbound;
            inject.token_expiration_seconds = self.token_expiration_seconds;
            inject
                .excluded_namespaces
                .clone_from(&self.excluded_namespaces);
            if let Some(url) = &self.identity_url {
                inject.identity_url.clone_from(url);
            }
            if let Some(url) = &self.policy_url {
                inject.policy_url.clone_from(url);
            }
            Some(webhooks)
        };
        Ok(settings)
    }
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
        Command::Policy {
            command: PolicyCommand::Dump { tenant },
        } => runtime()?.block_on(dump_policy(&tenant))?,
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// Parses `portcullis-operator run <args>`; the process environment must not set
    /// these flags (clap reads `PORTCULLIS_*` too).
    fn parse(args: &[&str]) -> Result<Box<RunArgs>, String> {
        let argv = ["portcullis-operator", "run"].iter().chain(args);
        match Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Run(args) => Ok(args),
            _ => Err("not run".into()),
        }
    }

    fn settings(args: &[&str]) -> OperatorSettings {
        parse(args).unwrap().settings().unwrap()
    }

    #[test]
    fn defaults_match_the_chart_and_the_design() {
        let s = settings(&["--namespace", "portcullis-system"]);
        assert_eq!(s.service_name, "portcullis-operator");
        assert_eq!(s.identity_addr.to_string(), "0.0.0.0:8443");
        assert_eq!(s.policy_addr.to_string(), "0.0.0.0:8090");
        assert!(!s.policy_insecure_debug);
        assert_eq!(s.ca.trust_domain.as_str(), "cluster.local");
        assert_eq!(s.ca.leaf_rotation_period.as_secs(), 72 * 3600);
        assert_eq!(s.ca.leaf_grace.as_secs(), 24 * 3600);
        assert_eq!(s.ca.intermediate_rotation_period.as_secs(), 720 * 3600);
        assert_eq!(s.ca.root_rotation_period.as_secs(), 8760 * 3600);
        assert_eq!(s.lease.lease_duration.as_secs(), 15);
        let w = s.webhooks.clone().unwrap();
        assert_eq!(w.addr.to_string(), "0.0.0.0:9443");
        assert_eq!(w.url, None);
        assert_eq!(w.mutating_configuration, "portcullis-injector");
        assert_eq!(w.validating_configuration, "portcullis-validator");
        assert_eq!(w.service_account, "portcullis-operator");
        assert_eq!(
            w.inject.identity_url,
            "https://portcullis-operator.portcullis-system.svc:8443"
        );
        assert_eq!(
            w.inject.policy_url,
            "https://portcullis-operator.portcullis-system.svc:8090"
        );
        assert_eq!(w.inject.token_expiration_seconds, 3600);
        assert_eq!(
            w.inject.excluded_namespaces,
            ["kube-system", "kube-public", "kube-node-lease"]
        );
        assert_eq!(
            s.serving_names(),
            [
                "portcullis-operator.portcullis-system.svc",
                "portcullis-operator.portcullis-system.svc.cluster.local"
            ]
        );
    }

    #[test]
    fn the_local_cluster_flags_are_taken() {
        let s = settings(&[
            "--namespace",
            "pc-system",
            "--service-name",
            "pc",
            "--identity-addr",
            "0.0.0.0:31443",
            "--policy-addr",
            "0.0.0.0:31090",
            "--webhook-addr",
            "127.0.0.1:31943",
            "--metrics-addr",
            "127.0.0.1:31080",
            "--extra-san",
            "127.0.0.1",
            "--extra-san",
            "10.200.0.1",
            "--identity-url",
            "https://10.200.0.1:31443",
            "--policy-url",
            "https://10.200.0.1:31090/",
            "--webhook-url",
            "https://127.0.0.1:31943",
            "--proxy-image",
            "portcullis-proxy:local",
            "--key-hash-cost",
            "4",
            "--trust-domain",
            "prod.acme",
            "--proxy-resources",
            r#"{"requests":{"cpu":"5m"},"limits":{"memory":"64Mi"}}"#,
            "--excluded-namespaces",
            "kube-system,monitoring",
            "--redirect-outbound",
            "true",
            "--token-expiration-seconds",
            "7200",
            "--proxy-image-pull-policy",
            "Never",
        ]);
        assert_eq!(s.extra_sans, ["127.0.0.1", "10.200.0.1"]);
        assert_eq!(
            s.serving_names(),
            [
                "pc.pc-system.svc",
                "pc.pc-system.svc.cluster.local",
                "127.0.0.1",
                "10.200.0.1"
            ]
        );
        assert_eq!(s.reconcile.hash_cost, 4);
        assert_eq!(s.ca.trust_domain.as_str(), "prod.acme");
        let w = s.webhooks.unwrap();
        assert_eq!(w.url.as_deref(), Some("https://127.0.0.1:31943"));
        assert_eq!(w.inject.identity_url, "https://10.200.0.1:31443");
        assert_eq!(w.inject.policy_url, "https://10.200.0.1:31090");
        assert_eq!(w.inject.proxy_image, "portcullis-proxy:local");
        assert_eq!(w.inject.image_pull_policy, "Never");
        assert_eq!(w.inject.resources.cpu_request, "5m");
        assert_eq!(w.inject.resources.memory_request, "20Mi");
        assert_eq!(w.inject.resources.memory_limit, "64Mi");
        assert_eq!(w.inject.excluded_namespaces, ["kube-system", "monitoring"]);
        assert!(w.inject.redirect_outbound);
        assert_eq!(w.inject.token_expiration_seconds, 7200);
        assert_eq!(w.service_account, "pc");
    }

    #[test]
    fn tenant_secrets_are_bound_only_when_the_cluster_role_is_named() {
        assert_eq!(settings(&[]).reconcile.secrets_binding, None);
        let s = settings(&["--tenant-secrets-role", "pc-tenant-secrets"]);
        assert_eq!(
            s.reconcile.secrets_binding,
            Some(SecretsBinding {
                cluster_role: "pc-tenant-secrets".into(),
                service_account: "portcullis-operator".into(),
            })
        );
        let s = settings(&[
            "--tenant-secrets-role",
            "pc-tenant-secrets",
            "--service-account",
            "pc",
        ]);
        assert_eq!(
            s.reconcile.secrets_binding.map(|b| b.service_account),
            Some("pc".into())
        );
    }

    #[test]
    fn no_webhooks_and_the_debug_policy_server_are_explicit() {
        let s = settings(&["--no-webhooks", "--policy-insecure-debug"]);
        assert!(s.webhooks.is_none());
        assert!(s.policy_insecure_debug);
        assert!(parse(&["--no-webhooks", "--webhook-url", "https://127.0.0.1:9443"]).is_err());
    }

    #[test]
    fn bad_values_name_the_flag() {
        for (flag, value) in [
            ("--trust-domain", "Bad Domain"),
            ("--rotation-period", "soon"),
            ("--rotation-period", "0s"),
            ("--identity-url", "http://op:8443"),
            ("--policy-url", "op:8090"),
            ("--webhook-url", "https://"),
            ("--extra-san", "not a name"),
            ("--proxy-resources", "{\"requests\": 1}"),
            ("--proxy-image-pull-policy", "Sometimes"),
            ("--token-expiration-seconds", "60"),
            ("--key-hash-cost", "3"),
            ("--lease-duration", "fast"),
            ("--service-name", "Portcullis"),
            ("--identity-addr", "localhost"),
        ] {
            let message = parse(&[flag, value]).map(drop).unwrap_err();
            assert!(message.contains(flag), "{flag} {value}: {message}");
        }
        let message = parse(&["--renew-deadline", "20s"])
            .unwrap()
            .settings()
            .unwrap_err()
            .to_string();
        assert!(message.contains("--renew-deadline"), "{message}");
        let message = parse(&["--root-rotation-period", "48h"])
            .unwrap()
            .settings()
            .unwrap_err()
            .to_string();
        assert!(message.contains("--root-rotation-period"), "{message}");
    }
}
