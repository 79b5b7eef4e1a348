//! The local-cluster tier (DESIGN.md §7, tier 3): envtest plus a small process-based pod
//! runner. Pods admitted (and mutated) by the real API server run as processes in their
//! own network namespaces on a private bridge: the init step programs real iptables,
//! the proxy gets a real projected token from the TokenRequest API, so a request
//! crosses the real proxy exactly as in a cluster.
//!
//! It exists to test our pods, not to be a kubelet: see [`pod`] for what it translates.
//! It needs root, `ip`, `iptables-restore` and `setpriv`; [`LocalCluster::start`]
//! returns `Ok(None)` after printing which is missing.

mod network;
mod operator;
mod pod;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use tempfile::TempDir;

pub use network::{Bridge, PodNetns};
pub use operator::{OperatorOptions, OperatorProcess};
pub use pod::RunningPod;

use crate::envtest::EnvTest;

/// Why the local cluster could not do something.
#[derive(Debug, thiserror::Error)]
pub enum LocalClusterError {
    /// Creating namespaces, links, files or processes failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The API server refused a call.
    #[error(transparent)]
    Kube(#[from] kube::Error),
    /// The pod uses something the runner does not translate.
    #[error("unsupported pod: {0}")]
    Unsupported(String),
    /// An init container or postStart hook failed.
    #[error("pod {pod}: {container} failed: {output}")]
    InitFailed {
        /// `namespace/name`.
        pod: String,
        /// The failing step.
        container: String,
        /// What it printed.
        output: String,
    },
    /// A bounded step did not finish.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A binary the pods run is missing.
    #[error("{0} not found: build the workspace first (cargo test --workspace builds it)")]
    MissingBinary(String),
}

/// The pod runner: a bridge, a bin directory of commands pods may run, and the pods.
pub struct LocalCluster {
    env: &'static EnvTest,
    bridge: Bridge,
    dir: TempDir,
}

impl LocalCluster {
    /// Starts the runner on an envtest, with `binaries` (command name → host path)
    /// available to pods as commands. `Ok(None)` (after printing why) when this machine
    /// cannot create network namespaces.
    pub fn start(
        env: &'static EnvTest,
        binaries: &[(&str, PathBuf)],
    ) -> Result<Option<Self>, LocalClusterError> {
        if let Some(reason) = missing_requirement() {
            eprintln!("skipping local-cluster tier: {reason}");
            return Ok(None);
        }
        let dir = tempfile::Builder::new()
            .prefix("portcullis-local-")
            .tempdir()?;
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin)?;
        for (name, path) in binaries {
            if !path.exists() {
                return Err(LocalClusterError::MissingBinary(path.display().to_string()));
            }
            std::os::unix::fs::symlink(path, bin.join(name))?;
        }
        // Pods run as other users: they must be able to reach the binaries and files.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        Ok(Some(Self {
            env,
            bridge: Bridge::create()?,
            dir,
        }))
    }

    /// The address pods reach the host (and so the operator) on.
    pub fn gateway(&self) -> std::net::Ipv4Addr {
        self.bridge.gateway()
    }

    /// Runs an admitted pod: reads it back from the API server (as mutated by the
    /// webhooks), and starts it. The returned handle stops it when dropped.
    pub async fn run_pod(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<RunningPod, LocalClusterError> {
        let client = self
            .env
            .client()
            .map_err(|e| LocalClusterError::Unsupported(e.to_string()))?;
        let pod: Pod = Api::namespaced(client.clone(), namespace).get(name).await?;
        if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
            return Err(LocalClusterError::Unsupported(format!(
                "{namespace}/{name} uses hostNetwork; the local cluster runs pods in their own network namespace"
            )));
        }
        let start = pod::PodStart {
            client,
            pod,
            netns: Some(self.bridge.add_pod()?),
            dir: self.dir.path().join("pods").join(namespace).join(name),
            bin_dir: &self.dir.path().join("bin"),
        };
        start.run().await
    }

    /// The directory holding the bin links and pod directories.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// What this machine lacks for network namespaces, if anything.
fn missing_requirement() -> Option<String> {
    // The effective uid, from /proc: no libc call needed.
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned));
    if uid.as_deref() != Some("0") {
        return Some("needs root to create network namespaces".into());
    }
    for tool in ["ip", "iptables-restore", "setpriv"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!(
                "{tool} is not installed (apt-get install iproute2 iptables util-linux)"
            ));
        }
    }
    None
}

/// The directory holding this build's binaries (`target/<profile>`), found from the
/// running test executable (`target/<profile>/deps/<test>`).
pub fn target_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    exe.parent()?.parent().map(Path::to_path_buf)
}
