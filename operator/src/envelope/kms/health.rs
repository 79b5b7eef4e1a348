//! The KMS plugin while the operator runs: the KEK is in memory, so an outage fails no
//! wrap or unwrap, but it would stop the next start. A poll of `Status` (every 60 s in
//! the operator) logs changes and sets two gauges: the plugin's health, and whether its
//! current key id differs from the one that encrypted the stored KEK (the plugin's key
//! was rotated: the KEK should be re-wrapped, which is not built yet).

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::KmsClient;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabels {
    socket: String,
}

/// The KMS gauges, registered once in the operator's registry. Labelled by the plugin's
/// socket and only present once a kms KEK is loaded, so other providers export no
/// misleading 0.
#[derive(Clone, Debug, Default)]
pub struct KmsMetrics {
    plugin_healthy: Family<PluginLabels, Gauge>,
    key_id_changed: Family<PluginLabels, Gauge>,
}

/// The two gauges of one plugin.
#[derive(Clone, Debug)]
pub struct PluginGauges {
    /// 1 while the last `Status` was healthy, 0 otherwise.
    pub healthy: Gauge,
    /// 1 while the plugin's current key id differs from the recorded one.
    pub key_id_changed: Gauge,
}

impl KmsMetrics {
    /// Registers the gauges in `registry` (the operator's, prefixed
    /// `portcullis_operator_`). They stay absent-valued (0) without the kms provider.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "kms_plugin_healthy",
            "1 while the KMS plugin holding the key-encryption key answers Status healthy (kms provider only)",
            metrics.plugin_healthy.clone(),
        );
        registry.register(
            "kms_key_id_changed",
            "1 while the KMS plugin's current key id differs from the one that encrypted the stored key-encryption key",
            metrics.key_id_changed.clone(),
        );
        metrics
    }

    /// The gauges of the plugin on `socket`, created (and so exported) on first use.
    pub fn plugin(&self, socket: &str) -> PluginGauges {
        let labels = PluginLabels {
            socket: socket.to_owned(),
        };
        PluginGauges {
            healthy: self.plugin_healthy.get_or_create(&labels).clone(),
            key_id_changed: self.key_id_changed.get_or_create(&labels).clone(),
        }
    }
}

/// What one poll found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PluginHealth {
    /// Healthy; `current_key_id` is the plugin's write key now.
    Healthy {
        /// The plugin's current key id.
        current_key_id: String,
        /// Whether it differs from the recorded one.
        key_id_changed: bool,
    },
    /// Down, unhealthy or refusing: the message says which.
    Down(String),
}

/// Polls the plugin's `Status` and remembers the last result, logging changes only.
#[derive(Debug)]
pub struct HealthMonitor {
    kms: KmsClient,
    recorded_key_id: String,
    /// The running KEK, whose recorded key id moves with a KEK rotation.
    kek: Option<crate::envelope::Kek>,
    metrics: PluginGauges,
    /// 0 unknown, 1 healthy, 2 down, 3 healthy with another key id.
    last: AtomicU8,
}

impl HealthMonitor {
    /// A monitor of `kms` whose stored KEK was encrypted under `recorded_key_id`.
    pub fn new(kms: KmsClient, recorded_key_id: String, metrics: &KmsMetrics) -> Self {
        let metrics = metrics.plugin(&kms.socket().display().to_string());
        // Loading the KEK just talked to the plugin.
        metrics.healthy.set(1);
        Self {
            kms,
            recorded_key_id,
            kek: None,
            metrics,
            last: AtomicU8::new(0),
        }
    }

    /// Compares with the key id of `kek`'s current key from now on (a KEK rotation
    /// encrypts the new key under the plugin's current KMS key).
    pub fn following(mut self, kek: crate::envelope::Kek) -> Self {
        self.kek = Some(kek);
        self
    }

    fn recorded(&self) -> String {
        self.kek
            .as_ref()
            .and_then(crate::envelope::Kek::kms_key_id)
            .unwrap_or_else(|| self.recorded_key_id.clone())
    }

    /// One `Status` call: updates the gauges and logs when the state changed.
    pub async fn poll(&self) -> PluginHealth {
        let socket = self.kms.socket().display().to_string();
        let (health, state) = match self.kms.status().await {
            Ok(status) => {
                let changed = status.key_id != self.recorded();
                let health = PluginHealth::Healthy {
                    current_key_id: status.key_id,
                    key_id_changed: changed,
                };
                (health, if changed { 3 } else { 1 })
            }
            Err(e) => (PluginHealth::Down(e.to_string()), 2),
        };
        self.metrics.healthy.set(i64::from(state != 2));
        if let PluginHealth::Healthy { key_id_changed, .. } = &health {
            self.metrics.key_id_changed.set(i64::from(*key_id_changed));
        }
        let previous = self.last.swap(state, Ordering::Relaxed);
        if previous != state {
            match &health {
                PluginHealth::Down(why) => tracing::warn!(
                    %socket, error = %why,
                    "KMS plugin down: wrapping goes on with the key in memory, but the operator cannot start again until it is back"
                ),
                PluginHealth::Healthy {
                    current_key_id,
                    key_id_changed: true,
                } => tracing::warn!(
                    %socket, recorded_kms_key_id = %self.recorded(), %current_key_id,
                    "the KMS plugin's key id changed: the stored key-encryption key is under the old KMS key until the KEK rotation this starts completes"
                ),
                PluginHealth::Healthy { .. } if previous != 0 => {
                    tracing::info!(%socket, "KMS plugin healthy again");
                }
                PluginHealth::Healthy { .. } => {}
            }
        }
        health
    }

    /// Polls every `interval` until `shutdown`.
    pub async fn run(self, interval: Duration, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = shutdown.cancelled() => return,
            }
            self.poll().await;
        }
    }
}
