//! Policy from a file: a `PolicyBundle` as JSON or YAML, polled for changes (mtime and
//! length) so standalone proxies pick up edits without a restart.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use portcullis_crds::PolicyBundle;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use super::{CompiledPolicy, Install, PolicyStore};
use crate::metrics::Metrics;

/// Why a policy file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    /// It could not be read.
    #[error("reading policy file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// It is not a PolicyBundle.
    #[error(
        "policy file {path} is not a PolicyBundle (JSON or YAML with version, tenant, classification, scopes, keys): {message}"
    )]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
}

/// Reads a bundle from `path`.
pub fn read_bundle(path: &Path) -> Result<PolicyBundle, PolicyFileError> {
    read(path)
}

/// Reads a bundle from `path` straight into the form the proxy holds: the keys never
/// exist as a `PolicyBundle` map, so a large policy costs its compact size, not ~4x.
pub fn read_policy(path: &Path) -> Result<CompiledPolicy, PolicyFileError> {
    read(path)
}

fn read<T: DeserializeOwned>(path: &Path) -> Result<T, PolicyFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| PolicyFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    // JSON goes through serde_json: on a 100k-key bundle serde_yaml took 7x the time and
    // 4x the peak memory. Anything else is YAML.
    let parsed = if text.trim_start().starts_with('{') {
        serde_json::from_str(&text).map_err(|e| e.to_string())
    } else {
        serde_yaml::from_str(&text).map_err(|e| e.to_string())
    };
    parsed.map_err(|message| PolicyFileError::Parse {
        path: path.to_owned(),
        message,
    })
}

fn fingerprint(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Loads `path` once into `store`; errors are logged and counted, never fatal.
pub fn load_into(path: &Path, store: &PolicyStore, metrics: &Metrics) {
    match read_policy(path) {
        Ok(policy) => match store.install(policy) {
            Install::Installed { version } => {
                tracing::info!(version, path = %path.display(), "policy loaded");
                metrics.policy_update("file", "installed", Some(version));
            }
            Install::Stale { current, offered } => {
                tracing::warn!(
                    current,
                    offered,
                    path = %path.display(),
                    "policy file changed but its version is not newer than the one in force; bump `version`"
                );
                metrics.policy_update("file", "stale", None);
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "keeping the last good policy");
            metrics.policy_update("file", "invalid", None);
        }
    }
}

/// Loads `path` now, then polls it every `interval` until `shutdown`, loading it
/// whenever it changes. The first load happens before this returns, so a change made
/// right after start is never mistaken for the initial state.
pub fn load_and_watch(
    path: PathBuf,
    interval: Duration,
    store: PolicyStore,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let mut seen = fingerprint(&path);
    load_into(&path, &store, &metrics);
    async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let now = fingerprint(&path);
            if now.is_some() && now != seen {
                seen = now;
                load_into(&path, &store, &metrics);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn json_and_yaml_bundles_both_load_and_bad_files_keep_the_old_policy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.json");
        let store = PolicyStore::new();
        let metrics = Metrics::new();
        std::fs::write(
            &path,
            r#"{"version": 1, "tenant": "acme", "classification": "Internal"}"#,
        )
        .unwrap();
        load_into(&path, &store, &metrics);
        assert_eq!(store.load().unwrap().version, 1);
        std::fs::write(&path, "version: 2\ntenant: acme\nclassification: Public\n").unwrap();
        load_into(&path, &store, &metrics);
        assert_eq!(store.load().unwrap().version, 2);
        std::fs::write(&path, "{not json").unwrap();
        load_into(&path, &store, &metrics);
        assert_eq!(store.load().unwrap().version, 2);
        assert!(
            read_bundle(&path)
                .unwrap_err()
                .to_string()
                .contains("PolicyBundle")
        );
        assert!(
            read_policy(&path)
                .unwrap_err()
                .to_string()
                .contains("PolicyBundle")
        );
    }
}
