//! The CA's state and its rules: roots, the issuing intermediate, rotation and the trust
//! bundle.
//!
//! Root rotation overlaps: a new root is created and published in the bundle one leaf
//! lifetime before it starts signing ("next"), signs for a root period ("active"), and
//! stays in the bundle after that ("retired") until the last leaf issued under it has
//! expired. Workloads renew within one leaf lifetime, so by the time a peer presents a
//! certificate under a new root, everyone already trusts it.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use portcullis_api::clock::{self, Clock};
use portcullis_api::identity::IssueResponse;
use portcullis_api::spiffe::{TenantId, TrustDomain, WorkloadId};
use rcgen::{CertificateParams, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;

use super::CaError;
use super::certs::{self, CaCertificate};
use super::csr::ValidatedCsr;
use super::settings::CaSettings;

/// How a serving certificate's parameters are made ([`certs::server_params`] and the
/// audit service's).
type ServingParams = fn(
    &TrustDomain,
    &[String],
    Timestamp,
    Duration,
    Duration,
) -> Result<CertificateParams, CaError>;

/// A CA certificate with the key that signs under it.
pub struct SigningCa {
    pub(crate) cert: CaCertificate,
    pub(crate) issuer: Issuer<'static, KeyPair>,
}

impl SigningCa {
    pub(crate) fn from_parts(cert: CaCertificate, key: KeyPair) -> Result<Self, CaError> {
        let issuer = Issuer::from_ca_cert_der(cert.der(), key)
            .map_err(|e| CaError::Corrupt(format!("CA certificate: {e}")))?;
        Ok(Self { cert, issuer })
    }

    /// The CA certificate.
    pub fn cert(&self) -> &CaCertificate {
        &self.cert
    }

    /// The private key in PKCS#8 DER, for wrapping under the KEK.
    pub(crate) fn key_pkcs8(&self) -> Vec<u8> {
        self.issuer.key().serialize_der()
    }
}

impl fmt::Debug for SigningCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningCa")
            .field("fingerprint", &self.cert.fingerprint())
            .field("not_after", &self.cert.not_after())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// The root currently signing intermediates.
#[derive(Debug)]
pub struct ActiveRoot {
    pub(crate) ca: SigningCa,
    /// When it became active.
    pub(crate) since: Timestamp,
    /// The latest notAfter of any leaf issued under it.
    pub(crate) max_leaf_expiry: Option<Timestamp>,
}

/// The root published ahead of its activation.
#[derive(Debug)]
pub struct NextRoot {
    pub(crate) ca: SigningCa,
    pub(crate) activates_at: Timestamp,
}

/// A root that no longer signs but is still trusted (its key is gone).
#[derive(Debug, Clone)]
pub struct RetiredRoot {
    pub(crate) cert: CaCertificate,
    pub(crate) since: Timestamp,
    pub(crate) max_leaf_expiry: Option<Timestamp>,
}

/// The issuing intermediate, always under the active root.
#[derive(Debug)]
pub struct Intermediate {
    pub(crate) ca: SigningCa,
    pub(crate) created_at: Timestamp,
}

/// What a rotation step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotationEvent {
    /// A next root was created and published (fingerprint, activation time).
    NextRootPublished {
        fingerprint: String,
        activates_at: Timestamp,
    },
    /// The next root became active; the old one retired.
    RootActivated {
        fingerprint: String,
        retired: String,
    },
    /// A new intermediate took over.
    IntermediateRotated { fingerprint: String },
    /// A retired root left the bundle: all its leaves have expired.
    RootDropped { fingerprint: String },
}

/// The whole CA: roots, intermediate, and the leaf-expiry bookkeeping.
#[derive(Debug)]
pub struct CaState {
    pub(crate) active: ActiveRoot,
    pub(crate) next: Option<NextRoot>,
    pub(crate) retired: Vec<RetiredRoot>,
    pub(crate) intermediate: Intermediate,
}

fn new_key() -> Result<KeyPair, CaError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CaError::Signing(format!("key generation: {e}")))
}

fn new_root(settings: &CaSettings, now: Timestamp) -> Result<SigningCa, CaError> {
    let key = new_key()?;
    let params = certs::root_params(
        &settings.trust_domain,
        now,
        settings.backdate,
        settings.root_lifetime(),
    );
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError::Signing(format!("root: {e}")))?;
    Ok(SigningCa {
        cert: CaCertificate::from_der(cert.der().clone())?,
        issuer: Issuer::new(params, key),
    })
}

pub(crate) fn new_intermediate(
    root: &SigningCa,
    settings: &CaSettings,
    now: Timestamp,
) -> Result<Intermediate, CaError> {
    let key = new_key()?;
    let params = certs::intermediate_params(
        &settings.trust_domain,
        now,
        settings.backdate,
        settings.intermediate_lifetime(),
    );
    let cert = params
        .signed_by(&key, &root.issuer)
        .map_err(|e| CaError::Signing(format!("intermediate: {e}")))?;
    Ok(Intermediate {
        ca: SigningCa {
            cert: CaCertificate::from_der(cert.der().clone())?,
            issuer: Issuer::new(params, key),
        },
        created_at: now,
    })
}

impl CaState {
    /// A brand-new CA: one active root and an intermediate under it.
    pub fn generate(settings: &CaSettings, now: Timestamp) -> Result<Self, CaError> {
        settings.validate()?;
        let root = new_root(settings, now)?;
        let intermediate = new_intermediate(&root, settings, now)?;
        Ok(Self {
            active: ActiveRoot {
                ca: root,
                since: now,
                max_leaf_expiry: None,
            },
            next: None,
            retired: Vec::new(),
            intermediate,
        })
    }

    /// The active root's certificate.
    pub fn active_root(&self) -> &CaCertificate {
        &self.active.ca.cert
    }

    /// The next root's certificate, when one is published.
    pub fn next_root(&self) -> Option<&CaCertificate> {
        self.next.as_ref().map(|n| &n.ca.cert)
    }

    /// The intermediate's certificate.
    pub fn intermediate(&self) -> &CaCertificate {
        &self.intermediate.ca.cert
    }

    /// Every root still trusted: next, active, then retired ones.
    pub fn trust_bundle(&self) -> Vec<&CaCertificate> {
        self.next
            .iter()
            .map(|n| &n.ca.cert)
            .chain(std::iter::once(&self.active.ca.cert))
            .chain(self.retired.iter().map(|r| &r.cert))
            .collect()
    }

    /// The trust bundle as concatenated PEM.
    pub fn trust_bundle_pem(&self) -> String {
        self.trust_bundle().iter().map(|c| c.pem()).collect()
    }

    /// The latest expiry of a leaf issued under the active root, if any.
    pub fn active_max_leaf_expiry(&self) -> Option<Timestamp> {
        self.active.max_leaf_expiry
    }

    /// Applies every rotation due at `now`; returns what happened (empty: nothing).
    pub fn rotate(
        &mut self,
        settings: &CaSettings,
        now: Timestamp,
    ) -> Result<Vec<RotationEvent>, CaError> {
        let mut events = Vec::new();

        if let Some(next) = self.next.take_if(|n| now >= n.activates_at) {
            let intermediate = match new_intermediate(&next.ca, settings, now) {
                Ok(intermediate) => intermediate,
                Err(e) => {
                    // Keep the next root for the next attempt.
                    self.next = Some(next);
                    return Err(e);
                }
            };
            let old = std::mem::replace(
                &mut self.active,
                ActiveRoot {
                    ca: next.ca,
                    since: now,
                    max_leaf_expiry: None,
                },
            );
            events.push(RotationEvent::RootActivated {
                fingerprint: self.active.ca.cert.fingerprint().to_string(),
                retired: old.ca.cert.fingerprint().to_string(),
            });
            self.retired.push(RetiredRoot {
                cert: old.ca.cert,
                since: now,
                max_leaf_expiry: old.max_leaf_expiry,
            });
            self.intermediate = intermediate;
            events.push(RotationEvent::IntermediateRotated {
                fingerprint: self.intermediate.ca.cert.fingerprint().to_string(),
            });
        }

        let rotate_root_at = clock::add(self.active.since, settings.root_rotation_period);
        if self.next.is_none() && now >= clock::sub(rotate_root_at, settings.root_publish_lead()) {
            // Never activate sooner than one lead from now, even when we are late.
            let activates_at = rotate_root_at.max(clock::add(now, settings.root_publish_lead()));
            let ca = new_root(settings, now)?;
            events.push(RotationEvent::NextRootPublished {
                fingerprint: ca.cert.fingerprint().to_string(),
                activates_at,
            });
            self.next = Some(NextRoot { ca, activates_at });
        }

        let intermediate_due = now
            >= clock::add(
                self.intermediate.created_at,
                settings.intermediate_rotation_period,
            );
        let intermediate_short =
            clock::add(now, settings.leaf_lifetime()) > self.intermediate.ca.cert.not_after();
        if intermediate_due || intermediate_short {
            self.intermediate = new_intermediate(&self.active.ca, settings, now)?;
            events.push(RotationEvent::IntermediateRotated {
                fingerprint: self.intermediate.ca.cert.fingerprint().to_string(),
            });
        }

        let mut dropped = Vec::new();
        self.retired.retain(|root| {
            // No leaf recorded: nothing under it can still be valid once it retired.
            let needed_until = root.max_leaf_expiry.unwrap_or(root.since);
            let keep = now < needed_until;
            if !keep {
                dropped.push(root.cert.fingerprint().to_string());
            }
            keep
        });
        events.extend(
            dropped
                .into_iter()
                .map(|fingerprint| RotationEvent::RootDropped { fingerprint }),
        );
        Ok(events)
    }

    fn record_leaf(&mut self, not_after: Timestamp) {
        let max = self.active.max_leaf_expiry.get_or_insert(not_after);
        *max = (*max).max(not_after);
    }

    /// Signs a workload leaf for `csr`'s key, naming `workload` and `tenant`.
    pub fn issue_leaf(
        &mut self,
        csr: &ValidatedCsr,
        workload: &WorkloadId,
        tenant: &TenantId,
        settings: &CaSettings,
        now: Timestamp,
    ) -> Result<IssueResponse, CaError> {
        self.issue_named_leaf(csr, workload, tenant, &[], settings, now)
    }

    /// [`Self::issue_leaf`] with DNS SANs besides the SPIFFE IDs (the names of the
    /// Services that select the pod).
    pub fn issue_named_leaf(
        &mut self,
        csr: &ValidatedCsr,
        workload: &WorkloadId,
        tenant: &TenantId,
        dns_names: &[String],
        settings: &CaSettings,
        now: Timestamp,
    ) -> Result<IssueResponse, CaError> {
        let params = certs::leaf_params(
            workload,
            tenant,
            dns_names,
            now,
            settings.backdate,
            settings.leaf_lifetime(),
        )?;
        let cert = params
            .signed_by(csr.public_key(), &self.intermediate.ca.issuer)
            .map_err(|e| CaError::Signing(format!("leaf: {e}")))?;
        let leaf = CaCertificate::from_der(cert.der().clone())?;
        self.record_leaf(leaf.not_after());
        Ok(IssueResponse {
            certificate: leaf.pem().to_string(),
            chain: self.intermediate.ca.cert.pem().to_string(),
            trust_bundle: self.trust_bundle_pem(),
            expires_at: leaf.not_after(),
            renew_after: clock::add(now, settings.leaf_rotation_period),
            dns_names: dns_names.to_vec(),
            names_revision: None,
        })
    }

    /// Signs a server certificate (with a fresh key) for the CA's own TLS endpoints.
    pub fn issue_server_certificate(
        &mut self,
        dns_names: &[String],
        settings: &CaSettings,
        now: Timestamp,
    ) -> Result<ServerCertificate, CaError> {
        self.issue_serving(certs::server_params, dns_names, settings, now)
    }

    /// Signs the audit service's certificate (with a fresh key): a server certificate
    /// that also authenticates the collector as a client of the policy server
    /// ([`certs::audit_service_params`]).
    pub fn issue_audit_service_certificate(
        &mut self,
        dns_names: &[String],
        settings: &CaSettings,
        now: Timestamp,
    ) -> Result<ServerCertificate, CaError> {
        self.issue_serving(certs::audit_service_params, dns_names, settings, now)
    }

    fn issue_serving(
        &mut self,
        params: ServingParams,
        dns_names: &[String],
        settings: &CaSettings,
        now: Timestamp,
    ) -> Result<ServerCertificate, CaError> {
        let params = params(
            &settings.trust_domain,
            dns_names,
            now,
            settings.backdate,
            settings.leaf_lifetime(),
        )?;
        self.sign_with_new_key(&params)
    }

    fn sign_with_new_key(
        &mut self,
        params: &CertificateParams,
    ) -> Result<ServerCertificate, CaError> {
        let key = new_key()?;
        let cert = params
            .signed_by(&key, &self.intermediate.ca.issuer)
            .map_err(|e| CaError::Signing(format!("server certificate: {e}")))?;
        let leaf = CaCertificate::from_der(cert.der().clone())?;
        self.record_leaf(leaf.not_after());
        Ok(ServerCertificate {
            chain: vec![leaf.der().clone(), self.intermediate.ca.cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            not_before: leaf.not_before(),
            not_after: leaf.not_after(),
        })
    }
}

/// A server certificate chain and its key.
pub struct ServerCertificate {
    /// Leaf then intermediate.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivatePkcs8KeyDer<'static>,
    /// The leaf's notBefore.
    pub not_before: Timestamp,
    /// The leaf's notAfter.
    pub not_after: Timestamp,
}

impl fmt::Debug for ServerCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCertificate")
            .field("chain", &self.chain.len())
            .field("not_after", &self.not_after)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Expiry times of the signing CAs, for the `portcullis_identity_ca_expiry_seconds` gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaExpiry {
    /// The active root's notAfter.
    pub root: Timestamp,
    /// The intermediate's notAfter.
    pub intermediate: Timestamp,
}

/// The running CA shared by the identity service, the rotation loop and the bundle
/// publisher. Signing takes a short lock; subscribers learn of every rotation.
pub struct CertificateAuthority {
    settings: CaSettings,
    clock: Arc<dyn Clock>,
    state: Mutex<CaState>,
    generation: watch::Sender<u64>,
}

impl CertificateAuthority {
    /// Wraps a loaded or generated state.
    pub fn new(settings: CaSettings, state: CaState, clock: Arc<dyn Clock>) -> Self {
        Self {
            settings,
            clock,
            state: Mutex::new(state),
            generation: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CaState> {
        // A panic while holding the lock cannot leave a half-rotated state (each step
        // assigns whole values), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The settings.
    pub fn settings(&self) -> &CaSettings {
        &self.settings
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Signs a workload leaf.
    pub fn issue(
        &self,
        csr: &ValidatedCsr,
        workload: &WorkloadId,
        tenant: &TenantId,
    ) -> Result<IssueResponse, CaError> {
        self.issue_named(csr, workload, tenant, &[])
    }

    /// [`Self::issue`] with DNS SANs (see [`CaState::issue_named_leaf`]).
    pub fn issue_named(
        &self,
        csr: &ValidatedCsr,
        workload: &WorkloadId,
        tenant: &TenantId,
        dns_names: &[String],
    ) -> Result<IssueResponse, CaError> {
        let now = self.clock.now();
        self.lock()
            .issue_named_leaf(csr, workload, tenant, dns_names, &self.settings, now)
    }

    /// Signs a server certificate for the CA's own endpoints.
    pub fn issue_server_certificate(
        &self,
        dns_names: &[String],
    ) -> Result<ServerCertificate, CaError> {
        let now = self.clock.now();
        self.lock()
            .issue_server_certificate(dns_names, &self.settings, now)
    }

    /// Signs the audit service's certificate (serverAuth + clientAuth; see
    /// [`CaState::issue_audit_service_certificate`]).
    pub fn issue_audit_service_certificate(
        &self,
        dns_names: &[String],
    ) -> Result<ServerCertificate, CaError> {
        let now = self.clock.now();
        self.lock()
            .issue_audit_service_certificate(dns_names, &self.settings, now)
    }

    /// Applies due rotations; subscribers are notified when anything changed.
    pub fn rotate(&self) -> Result<Vec<RotationEvent>, CaError> {
        let now = self.clock.now();
        let events = self.lock().rotate(&self.settings, now)?;
        if !events.is_empty() {
            self.generation.send_modify(|g| *g += 1);
        }
        Ok(events)
    }

    /// Takes over `state` as loaded from the Secrets when its roots or intermediate
    /// differ from ours (another replica rotated); subscribers are notified then.
    /// Returns whether anything changed.
    pub fn adopt(&self, state: CaState) -> bool {
        let changed = {
            let mut current = self.lock();
            let same = current.trust_bundle_pem() == state.trust_bundle_pem()
                && current.intermediate().fingerprint() == state.intermediate().fingerprint();
            if !same {
                *current = state;
            }
            !same
        };
        if changed {
            self.generation.send_modify(|g| *g += 1);
        }
        changed
    }

    /// The trust bundle PEM.
    pub fn trust_bundle_pem(&self) -> String {
        self.lock().trust_bundle_pem()
    }

    /// The signing CAs' expiry.
    pub fn expiry(&self) -> CaExpiry {
        let state = self.lock();
        CaExpiry {
            root: state.active.ca.cert.not_after(),
            intermediate: state.intermediate.ca.cert.not_after(),
        }
    }

    /// Runs `f` on the state (for persistence and inspection).
    pub fn with_state<R>(&self, f: impl FnOnce(&CaState) -> R) -> R {
        f(&self.lock())
    }

    /// A receiver that changes after every rotation.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}
