//! The rotation loop: applies due CA rotations and persists the result.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::authority::{CertificateAuthority, RotationEvent};
use super::persist::CaSecretStore;

/// Every `check_every`, applies due rotations; after a change, saves the CA to `store`
/// (retrying on later ticks until a save succeeds). Subscribers of
/// [`CertificateAuthority::subscribe`] (the identity service, the bundle publisher) are
/// told of every change.
pub async fn run_rotation(
    ca: Arc<CertificateAuthority>,
    mut store: Option<CaSecretStore>,
    check_every: Duration,
    shutdown: CancellationToken,
) {
    let mut unsaved = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(check_every) => {}
        }
        match ca.rotate() {
            Ok(events) => {
                for event in &events {
                    log_event(event);
                }
                unsaved |= !events.is_empty();
            }
            Err(e) => tracing::error!(error = %e, "CA rotation failed; retrying"),
        }
        // After a KEK rotation the Secrets are re-wrapped under the new key by this,
        // their only writer, so nobody else's write races the leader's store.
        unsaved |= store.as_ref().is_some_and(CaSecretStore::needs_rewrap);
        if let (true, Some(store)) = (unsaved, store.as_mut()) {
            match store.save_authority(&ca).await {
                Ok(()) => unsaved = false,
                Err(e) => tracing::error!(error = %e, "saving the rotated CA failed; retrying"),
            }
        } else {
            unsaved = false;
        }
    }
}

fn log_event(event: &RotationEvent) {
    match event {
        RotationEvent::NextRootPublished {
            fingerprint,
            activates_at,
        } => {
            tracing::info!(%fingerprint, %activates_at, "next root CA published in the trust bundle");
        }
        RotationEvent::RootActivated {
            fingerprint,
            retired,
        } => {
            tracing::info!(%fingerprint, %retired, "root CA rotated");
        }
        RotationEvent::IntermediateRotated { fingerprint } => {
            tracing::info!(%fingerprint, "intermediate CA rotated");
        }
        RotationEvent::RootDropped { fingerprint } => {
            tracing::info!(%fingerprint, "retired root CA left the trust bundle");
        }
    }
}
