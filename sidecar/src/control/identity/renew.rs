//! The renew loop: obtain credentials, then renew them at the rotation period with
//! jitter, retrying with capped exponential backoff, swapping the store atomically.
//! Also renews early when the certificate's DNS names are stale: the policy bundle
//! lists another revision of the namespace's Services than the one the names were
//! decided from (see [`Renewer::with_names_trigger`]).

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use rand::Rng;
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::IdentityError;
use super::client::IssueCertificate;
use super::csr::WorkloadKey;
use super::store::{CertificateStore, Credentials};
use portcullis_api::clock::{self, Clock};
use portcullis_api::spiffe::WorkloadId;

/// When to renew and how to retry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenewalSettings {
    /// Renew this long after issuance unless the service says otherwise (72 h).
    pub rotation_period: Duration,
    /// Fraction of the renewal interval to add or subtract at random (0.05 = ±5 %), so
    /// a fleet started together does not renew together.
    pub jitter: f64,
    /// First retry delay after a failure (1 s).
    pub backoff_initial: Duration,
    /// Largest retry delay (2 min).
    pub backoff_max: Duration,
}

impl Default for RenewalSettings {
    fn default() -> Self {
        Self {
            rotation_period: Duration::from_secs(72 * 3600),
            jitter: 0.05,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(120),
        }
    }
}

/// When to renew credentials received at `received`: at the service's `renew_after`
/// (else `received + rotation_period`), moved by `jitter_sample` (in [-1, 1]) times
/// `settings.jitter` of the interval, and never later than 90 % of the way to expiry.
pub fn renewal_time(
    received: Timestamp,
    credentials: &Credentials,
    settings: &RenewalSettings,
    jitter_sample: f64,
) -> Timestamp {
    let hinted = clock::until(received, credentials.renew_after());
    let interval = if hinted.is_zero() {
        settings.rotation_period
    } else {
        hinted
    };
    let factor = 1.0 + settings.jitter.clamp(0.0, 0.5) * jitter_sample.clamp(-1.0, 1.0);
    let jittered = interval.mul_f64(factor);
    let latest = clock::until(received, credentials.not_after()).mul_f64(0.9);
    clock::add(received, jittered.min(latest))
}

/// Keeps a [`CertificateStore`] filled with fresh credentials for one workload.
pub struct Renewer<S> {
    source: S,
    store: CertificateStore,
    workload: WorkloadId,
    bootstrap_roots: Vec<CertificateDer<'static>>,
    clock: Arc<dyn Clock>,
    settings: RenewalSettings,
    names_wanted: Option<watch::Receiver<Option<String>>>,
}

/// The shortest time between two renewals for stale names; doubled while the names
/// stay stale after a renewal (the two sides' views of the Services may lag), up to
/// [`NAMES_GAP_MAX`].
const NAMES_GAP_MIN: Duration = Duration::from_secs(10);
/// See [`NAMES_GAP_MIN`].
const NAMES_GAP_MAX: Duration = Duration::from_secs(600);

/// The next change of the wanted names revision; `false` once nobody sends any more.
async fn names_changed(wanted: &mut Option<watch::Receiver<Option<String>>>) -> bool {
    match wanted {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

impl<S: IssueCertificate> Renewer<S> {
    /// A renewer asking `source` for certificates for `workload`. `bootstrap_roots` (the
    /// mounted trust bundle) is trusted for the identity service in addition to the
    /// bundle of the current credentials.
    pub fn new(
        source: S,
        store: CertificateStore,
        workload: WorkloadId,
        bootstrap_roots: Vec<CertificateDer<'static>>,
        clock: Arc<dyn Clock>,
        settings: RenewalSettings,
    ) -> Self {
        Self {
            source,
            store,
            workload,
            bootstrap_roots,
            clock,
            settings,
            names_wanted: None,
        }
    }

    /// Renews early when `wanted` (the policy bundle's revision of this namespace's
    /// Services) differs from the revision the current certificate's names came from.
    pub fn with_names_trigger(mut self, wanted: watch::Receiver<Option<String>>) -> Self {
        self.names_wanted = Some(wanted);
        self
    }

    /// Whether the current certificate's names were decided under another revision of
    /// the Services than the one wanted (never when either side does not say).
    fn names_stale(&self) -> bool {
        let Some(wanted) = self
            .names_wanted
            .as_ref()
            .and_then(|rx| rx.borrow().clone())
        else {
            return false;
        };
        self.store
            .load()
            .and_then(|c| c.names_revision().map(|r| r != wanted))
            .unwrap_or(false)
    }

    /// The store this renewer fills.
    pub fn store(&self) -> &CertificateStore {
        &self.store
    }

    fn service_roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        let current = self.store.load();
        let bundle = current
            .as_ref()
            .map(|c| c.trust_bundle())
            .unwrap_or_default();
        // Unparseable roots are skipped: the other roots may still be enough.
        let _ = roots.add_parsable_certificates(self.bootstrap_roots.iter().chain(bundle).cloned());
        roots
    }

    /// Generates a key, asks for a certificate, and swaps the result into the store.
    pub async fn renew_once(&self) -> Result<Arc<Credentials>, IdentityError> {
        let key = WorkloadKey::generate()?;
        let csr = key.csr_pem(&self.workload)?;
        let roots = self.service_roots();
        let issued = self.source.issue(&csr, &roots).await?;
        let credentials =
            Credentials::from_issued(&key, &self.workload, &issued, self.clock.now())?;
        self.store.swap(credentials);
        self.store
            .load()
            .ok_or_else(|| IdentityError::InvalidResponse("store lost its credentials".into()))
    }

    /// Runs until `shutdown`: obtains credentials right away, then renews on schedule,
    /// and early when the names are stale.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut next_renewal = self.clock.now();
        let mut backoff = self.settings.backoff_initial;
        let mut wanted = self.names_wanted.clone();
        let mut last_issued: Option<Timestamp> = None;
        let mut names_gap = NAMES_GAP_MIN;
        loop {
            let wait = clock::until(self.clock.now(), next_renewal);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
                alive = names_changed(&mut wanted) => {
                    if !alive {
                        wanted = None;
                        self.names_wanted = None;
                    } else if self.names_stale() {
                        let now = self.clock.now();
                        let spread = Duration::from_millis(rand::rng().random_range(0..2000));
                        let earliest = last_issued.map_or(now, |at| clock::add(at, names_gap));
                        let at = clock::add(now, spread).max(earliest);
                        if at < next_renewal {
                            tracing::info!(workload = %self.workload, at = %at, "the Services selecting this pod changed; renewing the certificate for its names");
                            next_renewal = at;
                        }
                    }
                    continue;
                }
            }
            let renewed = tokio::select! {
                () = shutdown.cancelled() => return,
                renewed = self.renew_once() => renewed,
            };
            match renewed {
                Ok(credentials) => {
                    let received = self.clock.now();
                    let sample = rand::rng().random_range(-1.0..=1.0);
                    next_renewal = renewal_time(received, &credentials, &self.settings, sample);
                    backoff = self.settings.backoff_initial;
                    last_issued = Some(received);
                    if self.names_stale() {
                        // The identity service saw other Services than the bundle: ask
                        // again later, further apart each time.
                        names_gap = (names_gap * 2).min(NAMES_GAP_MAX);
                        next_renewal = next_renewal.min(clock::add(received, names_gap));
                    } else {
                        names_gap = NAMES_GAP_MIN;
                    }
                    tracing::info!(
                        workload = %self.workload,
                        expires_at = %credentials.not_after(),
                        next_renewal = %next_renewal,
                        "workload certificate renewed"
                    );
                }
                Err(error) => {
                    tracing::warn!(workload = %self.workload, %error, retry_in = ?backoff, "certificate renewal failed");
                    next_renewal = clock::add(self.clock.now(), backoff);
                    backoff = (backoff * 2).min(self.settings.backoff_max);
                }
            }
        }
    }
}

impl<S> std::fmt::Debug for Renewer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renewer")
            .field("workload", &self.workload.to_string())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}
