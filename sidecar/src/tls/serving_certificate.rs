//! The bring-your-own serving certificate (issue 20): a `kubernetes.io/tls` Secret the
//! injector mounts (optional, read-only) at `PORTCULLIS_SERVING_CERT_DIR`, presented to
//! clients outside the mesh instead of the workload certificate (the selection rule is
//! in [`crate::tls::server`]).
//!
//! The directory is polled, not watched: the kubelet updates a Secret volume by swapping
//! its `..data` symlink, so both files are read through one resolved `..data` and
//! compared by content hash. A certificate that is missing, unparseable, not matched by
//! its key, expired or not yet valid is refused: the one in force stays (while it is
//! valid), else clients get the workload certificate. Each refusal is logged once per
//! change of the files or the verdict, and counted by reason; a bad certificate never
//! makes the pod unready.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How often the mounted directory is read.
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);
pub use portcullis_tls::serving_certificate::{
    CERT_FILE, KEY_FILE, Loaded, Refusal, Refused, check, display_time, parse,
};

/// The files of one generation: read through `..data` when the kubelet's layout is
/// there, so a swap between the two reads cannot pair an old key with a new chain.
fn read_files(dir: &Path) -> Result<(Vec<u8>, Vec<u8>), Refused> {
    let generation = std::fs::canonicalize(dir.join("..data")).unwrap_or_else(|_| dir.to_owned());
    let read = |name: &str| {
        std::fs::read(generation.join(name)).map_err(|e| {
            Refused::new(
                Refusal::Missing,
                format!(
                    "cannot read {name} in {} ({e}): the Secret named by portcullis.dev/serving-certificate \
                     (or the Tenant's spec.defaults.servingCertificateSecret) is missing or not a kubernetes.io/tls Secret",
                    dir.display()
                ),
            )
        })
    };
    Ok((read(CERT_FILE)?, read(KEY_FILE)?))
}

fn fingerprint(cert_pem: &[u8], key_pem: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in [cert_pem, key_pem] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hasher.finalize().into()
}

/// What `/ready` reports about the serving certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// notAfter of the certificate in force, if one is.
    pub in_force_until: Option<i64>,
    /// The latest refusal, while the files are refused.
    pub refused: Option<Refused>,
}

struct Shared {
    in_force: ArcSwapOption<Loaded>,
    status: ArcSwap<Status>,
}

/// The serving certificate read from a directory; cheap to clone. Handshakes read it
/// lock-free.
#[derive(Clone)]
pub struct ServingCertificate {
    dir: PathBuf,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ServingCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCertificate")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// The previous poll, so each change is reported once.
#[derive(Default)]
struct LastPoll {
    fingerprint: Option<[u8; 32]>,
    parsed: Option<Result<Arc<Loaded>, Refused>>,
    reported: Option<(Option<[u8; 32]>, Option<Refusal>)>,
}

impl ServingCertificate {
    /// Nothing in force until the first poll of `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            shared: Arc::new(Shared {
                in_force: ArcSwapOption::empty(),
                status: ArcSwap::from_pointee(Status::default()),
            }),
        }
    }

    /// The certificate to present to a client outside the mesh: the one in force, if
    /// it is valid at `now` (Unix seconds).
    pub fn current(&self, now: i64) -> Option<Arc<CertifiedKey>> {
        let loaded = self.shared.in_force.load_full()?;
        loaded
            .valid_at(now)
            .ok()
            .map(|()| loaded.certified_key().clone())
    }

    /// The current status.
    pub fn status(&self) -> Status {
        (**self.shared.status.load()).clone()
    }

    /// The status as `/ready` shows it (never makes the pod unready).
    pub fn status_json(&self) -> serde_json::Value {
        let status = self.status();
        let mut json = serde_json::json!({
            "inForce": status.in_force_until.is_some(),
            "notAfter": status.in_force_until.map(display_time),
        });
        if let Some(refused) = status.refused {
            json["refused"] = refused.reason.as_str().into();
            json["detail"] = refused.detail.into();
        }
        json
    }

    /// One poll at `now`: reads the files, puts a good certificate in force, keeps the
    /// previous one on a refusal while it is valid, and reports a change once.
    fn poll(&self, now: i64, last: &mut LastPoll, metrics: &Metrics) {
        let files = read_files(&self.dir);
        let fingerprint = files.as_ref().ok().map(|(c, k)| fingerprint(c, k));
        if fingerprint.is_none() || fingerprint != last.fingerprint {
            last.parsed = Some(files.and_then(|(cert, key)| parse(&cert, &key).map(Arc::new)));
            last.fingerprint = fingerprint;
        }
        let outcome = match &last.parsed {
            Some(Ok(loaded)) => loaded.valid_at(now).map(|()| loaded.clone()),
            Some(Err(refusal)) => Err(refusal.clone()),
            None => return,
        };
        let refusal = outcome.as_ref().err().cloned();
        match outcome {
            Ok(loaded) => {
                let previous = self.shared.in_force.swap(Some(loaded.clone()));
                if previous.is_none_or(|p| !Arc::ptr_eq(&p, &loaded)) {
                    tracing::info!(
                        dir = %self.dir.display(),
                        not_after = %display_time(loaded.not_after()),
                        "serving certificate in force for clients outside the mesh"
                    );
                }
            }
            Err(_) => {
                // Keep the previous certificate while it is valid; else the workload's.
                let keep = self
                    .shared
                    .in_force
                    .load_full()
                    .filter(|previous| previous.valid_at(now).is_ok());
                self.shared.in_force.store(keep);
            }
        }
        let in_force_until = self.shared.in_force.load().as_ref().map(|l| l.not_after());
        metrics.serving_certificate_in_force(in_force_until.is_some());
        let key = (fingerprint, refusal.as_ref().map(|r| r.reason));
        if let Some(refusal) = &refusal
            && last.reported.as_ref() != Some(&key)
        {
            tracing::warn!(
                dir = %self.dir.display(),
                reason = refusal.reason.as_str(),
                problem = %refusal.detail,
                fallback = if in_force_until.is_some() { "previous serving certificate" } else { "workload certificate" },
                "serving certificate refused"
            );
            metrics.serving_certificate_refused(refusal.reason.as_str());
        }
        last.reported = Some(key);
        self.shared.status.store(Arc::new(Status {
            in_force_until,
            refused: refusal,
        }));
    }

    /// Polls the directory now and then every `interval` until `shutdown`.
    pub async fn watch(self, interval: Duration, metrics: Metrics, shutdown: CancellationToken) {
        let mut last = LastPoll::default();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            self.poll(jiff::Timestamp::now().as_second(), &mut last, &metrics);
        }
    }
}
