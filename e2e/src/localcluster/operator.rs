//! The real `portcullis-operator run` binary as a child process of the test, pointed at
//! the envtest API server and reachable from pods on the bridge gateway.

use std::{
    ffi::OsString,
    net::{Ipv4Addr, TcpListener},
    path::Path,
    time::{Duration, Instant},
};

use super::LocalClusterError;
use crate::envtest::{
    EnvTest,
    process::{Supervised, log_tail},
};

/// How long the operator may take to serve its webhooks and identity service.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running operator; stopped (SIGTERM, then SIGKILL) when dropped or when the test
/// process exits.
pub struct OperatorProcess {
    process: Supervised,
    log: std::path::PathBuf,
    pids: std::path::PathBuf,
    /// The namespace it keeps its CA, KEK and Lease in.
    pub namespace: String,
    /// Identity service port (on every address).
    pub identity_port: u16,
    /// Policy server port (on every address).
    pub policy_port: u16,
    /// Webhook port (on 127.0.0.1, where the API server calls it).
    pub webhook_port: u16,
    /// Metrics and health port (127.0.0.1).
    pub metrics_port: u16,
}

/// What [`OperatorProcess::start_with`] may change from the test defaults.
#[derive(Clone, Debug)]
pub struct OperatorOptions {
    /// `--key-hash-cost` (4: fast; production's default is 10).
    pub key_hash_cost: u32,
    /// `RUST_LOG` of the operator.
    pub log_filter: String,
    /// More `run` flags, each with its value (e.g. a KEK provider's).
    pub extra_args: Vec<(String, String)>,
    /// More environment variables of the operator (e.g. `SOFTHSM2_CONF`).
    pub extra_env: Vec<(String, String)>,
}

impl Default for OperatorOptions {
    fn default() -> Self {
        Self {
            key_hash_cost: 4,
            log_filter: "info,portcullis_operator=debug".to_owned(),
            extra_args: Vec::new(),
            extra_env: Vec::new(),
        }
    }
}

fn free_port(ip: Ipv4Addr) -> Result<u16, LocalClusterError> {
    Ok(TcpListener::bind((ip, 0))?.local_addr()?.port())
}

impl OperatorProcess {
    /// Starts `binary run` against `env` with its namespace `namespace` (created by the
    /// caller), pods reaching it on `gateway`, and waits until its webhook port accepts.
    pub async fn start(
        env: &EnvTest,
        binary: &Path,
        namespace: &str,
        gateway: Ipv4Addr,
        dir: &Path,
    ) -> Result<Self, LocalClusterError> {
        Self::start_with(
            env,
            binary,
            namespace,
            gateway,
            dir,
            &OperatorOptions::default(),
        )
        .await
    }

    /// [`Self::start`] with `options` instead of the test defaults.
    pub async fn start_with(
        env: &EnvTest,
        binary: &Path,
        namespace: &str,
        gateway: Ipv4Addr,
        dir: &Path,
        options: &OperatorOptions,
    ) -> Result<Self, LocalClusterError> {
        let identity_port = free_port(Ipv4Addr::UNSPECIFIED)?;
        let policy_port = free_port(Ipv4Addr::UNSPECIFIED)?;
        let webhook_port = free_port(Ipv4Addr::LOCALHOST)?;
        let metrics_port = free_port(Ipv4Addr::LOCALHOST)?;
        std::fs::create_dir_all(dir)?;
        let log = dir.join("operator.log");
        // `env` sets the variables for the binary alone; the supervisor runs `env`.
        let mut args: Vec<OsString> = vec![
            format!("KUBECONFIG={}", env.kubeconfig_path().display()).into(),
            format!("POD_NAMESPACE={namespace}").into(),
            format!("RUST_LOG={}", options.log_filter).into(),
        ];
        for (name, value) in &options.extra_env {
            args.push(format!("{name}={value}").into());
        }
        args.extend([binary.into(), "run".into()]);
        let flags = [
            ("--metrics-addr", format!("127.0.0.1:{metrics_port}")),
            ("--policy-addr", format!("0.0.0.0:{policy_port}")),
            ("--identity-addr", format!("0.0.0.0:{identity_port}")),
            ("--webhook-addr", format!("127.0.0.1:{webhook_port}")),
            ("--extra-san", "127.0.0.1".to_owned()),
            ("--extra-san", gateway.to_string()),
            (
                "--identity-url",
                format!("https://{gateway}:{identity_port}"),
            ),
            ("--policy-url", format!("https://{gateway}:{policy_port}")),
            ("--webhook-url", format!("https://127.0.0.1:{webhook_port}")),
            ("--proxy-image", "portcullis-proxy:local".to_owned()),
            ("--key-hash-cost", options.key_hash_cost.to_string()),
        ];
        let extra = options
            .extra_args
            .iter()
            .map(|(flag, value)| (flag.as_str(), value.clone()));
        for (flag, value) in flags.into_iter().chain(extra) {
            args.push(flag.into());
            args.push(value.into());
        }
        let pids = dir.join("pids");
        // A fresh list: `pid` reads the one process this start spawns.
        let _ = std::fs::remove_file(&pids);
        let process = Supervised::spawn(
            "portcullis-operator",
            Path::new("env"),
            &args,
            dir,
            &log,
            &pids,
        )?;
        let operator = Self {
            process,
            log,
            pids,
            namespace: namespace.to_owned(),
            identity_port,
            policy_port,
            webhook_port,
            metrics_port,
        };
        operator.wait_ready().await?;
        Ok(operator)
    }

    /// Waits until `/readyz` answers and the webhook port accepts connections.
    async fn wait_ready(&self) -> Result<(), LocalClusterError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let webhook = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, self.webhook_port))
                .await
                .is_ok();
            let identity =
                tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, self.identity_port))
                    .await
                    .is_ok();
            if webhook && identity {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LocalClusterError::Timeout(format!(
                    "operator did not serve webhooks and identity within {READY_TIMEOUT:?}:\n{}",
                    self.logs(40)
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The last lines of the operator's log.
    pub fn logs(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// The operator's whole log (stdout and stderr), e.g. to read its audit chain.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The operator's process id (`env` execs the binary, so it is the operator's own),
    /// e.g. to read its memory from `/proc/<pid>/status`.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pids)
            .ok()?
            .lines()
            .last()?
            .trim()
            .parse()
            .ok()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.process.exited().is_none()
    }
}
