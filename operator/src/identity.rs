//! The CA at run time: loaded (or created) at start, rotated by the leader, and kept in
//! step on every replica — each one signs with its in-memory copy, so the other
//! replicas re-read the Secrets every check interval and adopt what the leader saved.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kube::Client;
use tokio_util::sync::CancellationToken;

use crate::ca::{CaError, CaSecretStore, CaSettings, CertificateAuthority, run_rotation};
use crate::envelope::Kek;

/// Loads or creates the CA in `namespace`.
pub async fn load(
    client: &Client,
    namespace: &str,
    kek: &Kek,
    settings: &CaSettings,
) -> Result<(CaSecretStore, Arc<CertificateAuthority>), CaError> {
    let (store, state) = CaSecretStore::load_or_create(
        client.clone(),
        namespace,
        kek.clone(),
        settings,
        jiff::Timestamp::now(),
    )
    .await?;
    let ca = CertificateAuthority::new(
        settings.clone(),
        state,
        Arc::new(portcullis_api::clock::SystemClock),
    );
    Ok((store, Arc::new(ca)))
}

/// What the CA tasks need.
#[derive(Clone)]
pub struct CaRuntime {
    /// Reads and writes the CA Secrets.
    pub client: Client,
    /// The operator's namespace.
    pub namespace: String,
    /// Unwraps the CA keys.
    pub kek: Arc<Kek>,
    /// The running CA.
    pub ca: Arc<CertificateAuthority>,
    /// How often rotation is checked and the Secrets re-read.
    pub check_interval: Duration,
}

impl std::fmt::Debug for CaRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaRuntime")
            .field("namespace", &self.namespace)
            .field("check_interval", &self.check_interval)
            .finish_non_exhaustive()
    }
}

impl CaRuntime {
    async fn reload(&self) -> Result<CaSecretStore, CaError> {
        let (store, state) = CaSecretStore::load_or_create(
            self.client.clone(),
            &self.namespace,
            (*self.kek).clone(),
            self.ca.settings(),
            self.ca.clock().now(),
        )
        .await?;
        if self.ca.adopt(state) {
            tracing::info!("adopted the CA another replica rotated");
        }
        Ok(store)
    }

    /// While leading (until `term` ends): re-reads the Secrets (a previous leader may
    /// have rotated), then rotates on schedule and saves.
    pub async fn rotate_while_leading(self, term: CancellationToken) {
        let store = loop {
            match self.reload().await {
                Ok(store) => break store,
                Err(e) => {
                    tracing::error!(error = %e, "reading the CA before rotating failed; retrying");
                    tokio::select! {
                        () = term.cancelled() => return,
                        () = tokio::time::sleep(self.check_interval) => {}
                    }
                }
            }
        };
        // A rotation due now happens at once, not one interval later.
        let mut store = store;
        match self.ca.rotate() {
            Ok(events) if !events.is_empty() => {
                tracing::info!(?events, "CA rotated");
                if let Err(e) = store.save_authority(&self.ca).await {
                    tracing::error!(error = %e, "saving the rotated CA failed");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "CA rotation failed; retrying"),
        }
        run_rotation(self.ca, Some(store), self.check_interval, term).await;
    }

    /// Until `shutdown`, while not `leading`: re-reads the Secrets every check interval
    /// and adopts a CA rotated by the leader. (The leader re-reads when its term starts
    /// and is then the only writer.)
    pub async fn follow(self, leading: Arc<AtomicBool>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.check_interval) => {}
            }
            if leading.load(Ordering::Relaxed) {
                continue;
            }
            if let Err(e) = self.reload().await {
                tracing::warn!(error = %e, "re-reading the CA Secrets failed");
            }
        }
    }
}
