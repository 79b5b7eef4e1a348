//! The operator as witness of the audit collector's seals. A seal
//! ([`portcullis_audit::seal`]) stops a workload from rewriting its chain, but whoever
//! holds the collector's key could rebuild a whole log and seal it again. So every few
//! minutes the leader reads each Tenant's newest seal from the collector, checks it
//! (its signature; its signer is the collector's serving certificate from this CA; its
//! number never goes back; one number, one digest) and adds it to the Tenant's
//! `status.auditAnchors`, which only the operator writes. `kubectl portcullis audit
//! verify --tenant` then requires every anchor in the log: a log rewritten after a seal
//! was witnessed no longer matches it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use portcullis_api::audit_export::seal_path;
use portcullis_audit::seal::{Seal, verify_seal_value};
use portcullis_audit::verify::TrustBundle;
use portcullis_crds::{SealAnchor, Tenant};
use portcullis_server::oneshot::{self, Target};
use tokio_util::sync::CancellationToken;

use crate::ca::CertificateAuthority;
use crate::context::publish_cluster_scoped_event;

/// How often each Tenant's newest seal is witnessed.
pub const WITNESS_EVERY: Duration = Duration::from_secs(300);

/// Anchors kept per Tenant: the newest pins everything before it; older ones, spread
/// over the log's life, show a rewrite made between two witness rounds.
pub const MAX_ANCHORS: usize = 32;

/// The field manager of `status.auditAnchors` (the Tenant controller never writes it).
pub const FIELD_MANAGER: &str = "portcullis-audit-witness";

/// The Warning Event reason for a seal the witness refused.
pub const REFUSED: &str = "AuditSealRefused";

/// A seal as large as this is not one the collector makes.
const MAX_SEAL_BYTES: usize = 4 << 20;

/// How long one request to the collector may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Where the collector is and how the operator proves it may read seals.
#[derive(Clone, Debug)]
pub struct WitnessSettings {
    /// The collector's URL (`https://host:port`).
    pub collector_url: String,
    /// The name its serving certificate carries (`<service>.<namespace>.svc`).
    pub server_name: String,
    /// The operator's ServiceAccount token, sent as a bearer token (the collector asks
    /// the API server whether it may export `auditrecords`, which the chart grants).
    pub token_file: PathBuf,
    /// How often.
    pub every: Duration,
}

/// What the witness makes of a Tenant's newest seal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Already anchored.
    Unchanged,
    /// The anchors with the new seal added (and thinned).
    Anchor(Vec<SealAnchor>),
    /// Not a seal to anchor; why, for a Warning Event.
    Refused(String),
}

/// Judges `line`, the newest seal the collector serves for `tenant`, against the
/// anchors the Tenant holds.
pub fn judge(tenant: &str, anchors: &[SealAnchor], line: &str, bundle: &TrustBundle) -> Verdict {
    let value: serde_json::Value = match serde_json::from_str(line) {
        Ok(value) => value,
        Err(e) => return Verdict::Refused(format!("the collector's answer is not a seal: {e}")),
    };
    let (seal, digest): (Seal, String) = match verify_seal_value(value) {
        Ok(verified) => verified,
        Err(fault) => return Verdict::Refused(format!("the newest seal does not verify: {fault}")),
    };
    if seal.tenant != tenant {
        return Verdict::Refused(format!(
            "the collector answered with a seal of tenant {:?}",
            seal.tenant
        ));
    }
    if let Err(detail) = bundle.check_service(&seal.signer, seal.timestamp) {
        return Verdict::Refused(format!(
            "seal {} is not signed by the audit collector: {detail}",
            seal.number
        ));
    }
    if let Some(last) = anchors.last() {
        if seal.number == last.number && digest == last.digest {
            return Verdict::Unchanged;
        }
        if seal.number == last.number {
            return Verdict::Refused(format!(
                "seal {} now has digest {digest}, but digest {} was witnessed: the tenant's audit log was rewritten and sealed again; keep the collector's volume for investigation and run kubectl portcullis audit verify --tenant {tenant}",
                seal.number, last.digest
            ));
        }
        if seal.number < last.number {
            return Verdict::Refused(format!(
                "the newest seal is {}, but seal {} was already witnessed: the collector lost or replaced its log; run kubectl portcullis audit verify --tenant {tenant}",
                seal.number, last.number
            ));
        }
    }
    let mut anchored = anchors.to_vec();
    anchored.push(SealAnchor {
        number: seal.number,
        digest,
        sealed_at: seal.timestamp.to_string(),
    });
    thin(&mut anchored, MAX_ANCHORS);
    Verdict::Anchor(anchored)
}

/// Drops anchors until `max` remain, never the first or the newest, each time the one
/// whose neighbours are closest (by seal number), so those left stay spread out.
pub fn thin(anchors: &mut Vec<SealAnchor>, max: usize) {
    while anchors.len() > max.max(2) {
        let Some(drop) = (1..anchors.len() - 1)
            .min_by_key(|&i| anchors[i + 1].number.saturating_sub(anchors[i - 1].number))
        else {
            return;
        };
        anchors.remove(drop);
    }
}

/// Why a round could not read a seal.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    /// The collector could not be asked.
    #[error("audit collector {url}: {message}")]
    Collector {
        /// Its URL.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The Tenant's status could not be written.
    #[error("writing the audit anchors: {0}")]
    Kube(#[from] kube::Error),
}

/// Reads Tenants' newest seals from the collector and anchors them.
pub struct AuditWitness {
    client: kube::Client,
    tenants: Store<Tenant>,
    ca: Arc<CertificateAuthority>,
    settings: WitnessSettings,
    instance: String,
}

impl std::fmt::Debug for AuditWitness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditWitness")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl AuditWitness {
    /// A witness of `settings.collector_url` for the Tenants in `tenants`, checking
    /// signers against `ca`'s trust bundle.
    pub fn new(
        client: kube::Client,
        tenants: Store<Tenant>,
        ca: Arc<CertificateAuthority>,
        settings: WitnessSettings,
        instance: String,
    ) -> Self {
        Self {
            client,
            tenants,
            ca,
            settings,
            instance,
        }
    }

    /// Witnesses every Tenant every `settings.every` until `stop`.
    pub async fn run(&self, stop: CancellationToken) {
        let mut every = tokio::time::interval(self.settings.every);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                () = stop.cancelled() => return,
            }
            self.round().await;
        }
    }

    /// One round over every Tenant; returns how many got a new anchor.
    pub async fn round(&self) -> usize {
        let bundle = match TrustBundle::from_pem(self.ca.trust_bundle_pem().as_bytes()) {
            Ok(bundle) => bundle,
            Err(e) => {
                tracing::warn!(error = %e, "audit witness: no usable trust bundle");
                return 0;
            }
        };
        let mut anchored = 0;
        for tenant in self.tenants.state() {
            match self.witness(&tenant, &bundle).await {
                Ok(true) => anchored += 1,
                Ok(false) => {}
                Err(e @ WitnessError::Collector { .. }) => {
                    // One warning a round: the collector is down for every tenant alike.
                    tracing::warn!(error = %e, "audit witness: cannot read seals this round");
                    return anchored;
                }
                Err(e) => tracing::warn!(tenant = %tenant.name_any(), error = %e, "audit witness"),
            }
        }
        anchored
    }

    /// Witnesses `tenant`'s newest seal now; true when it was anchored.
    pub async fn witness_now(&self, tenant: &Tenant) -> Result<bool, WitnessError> {
        let bundle = TrustBundle::from_pem(self.ca.trust_bundle_pem().as_bytes()).map_err(|e| {
            WitnessError::Collector {
                url: self.settings.collector_url.clone(),
                message: format!("no usable trust bundle: {e}"),
            }
        })?;
        self.witness(tenant, &bundle).await
    }

    /// Witnesses one Tenant's newest seal; true when it was anchored.
    async fn witness(&self, tenant: &Tenant, bundle: &TrustBundle) -> Result<bool, WitnessError> {
        let name = tenant.name_any();
        let Some(line) = self.newest_seal(&name).await? else {
            return Ok(false);
        };
        let anchors = tenant
            .status
            .as_ref()
            .map(|s| s.audit_anchors.clone())
            .unwrap_or_default();
        match judge(&name, &anchors, &line, bundle) {
            Verdict::Unchanged => Ok(false),
            Verdict::Anchor(anchors) => {
                let patch = serde_json::json!({
                    "apiVersion": Tenant::api_version(&()),
                    "kind": Tenant::kind(&()),
                    "status": { "auditAnchors": anchors },
                });
                Api::<Tenant>::all(self.client.clone())
                    .patch_status(
                        &name,
                        &PatchParams::apply(FIELD_MANAGER).force(),
                        &Patch::Apply(&patch),
                    )
                    .await?;
                Ok(true)
            }
            Verdict::Refused(why) => {
                tracing::error!(tenant = %name, %why, "audit witness: seal refused");
                let published = publish_cluster_scoped_event(
                    &self.client,
                    &self.instance,
                    &tenant.object_ref(&()),
                    EventType::Warning,
                    REFUSED,
                    why,
                    jiff::Timestamp::now(),
                )
                .await;
                if let Err(e) = published {
                    tracing::warn!(error = %e, "could not publish the Tenant's Event");
                }
                Ok(false)
            }
        }
    }

    /// The newest seal of `tenant`'s log, `None` when it has none yet.
    async fn newest_seal(&self, tenant: &str) -> Result<Option<String>, WitnessError> {
        let fail = |message: String| WitnessError::Collector {
            url: self.settings.collector_url.clone(),
            message,
        };
        match self.get(&seal_path(tenant)).await.map_err(fail)? {
            (StatusCode::OK, body) => Ok(Some(String::from_utf8_lossy(&body).into_owned())),
            (StatusCode::NOT_FOUND, _) => Ok(None),
            (status, body) => Err(fail(format!(
                "answered {status}: {}",
                String::from_utf8_lossy(&body).trim()
            ))),
        }
    }

    /// `GET path` on the collector with the ServiceAccount token, verifying the
    /// collector against the trust bundle.
    async fn get(&self, path: &str) -> Result<(StatusCode, Bytes), String> {
        let mut target =
            Target::from_url(&self.settings.collector_url).map_err(|e| e.to_string())?;
        target.server_name.clone_from(&self.settings.server_name);
        let token = tokio::fs::read_to_string(&self.settings.token_file)
            .await
            .map_err(|e| {
                format!(
                    "reading the token {}: {e}",
                    self.settings.token_file.display()
                )
            })?;
        let mut bearer = HeaderValue::from_str(&format!("Bearer {}", token.trim()))
            .map_err(|_| "the token is not a valid header value".to_owned())?;
        bearer.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, bearer);
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(
            portcullis_tls::parse_pem_certs(&self.ca.trust_bundle_pem(), "trust bundle")
                .map_err(|e| e.to_string())?,
        );
        let tls = rustls::ClientConfig::builder_with_provider(portcullis_tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        oneshot::get(
            &target,
            Arc::new(tls),
            path,
            headers,
            MAX_SEAL_BYTES,
            TIMEOUT,
        )
        .await
        .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn anchor(number: u64) -> SealAnchor {
        SealAnchor {
            number,
            digest: format!("{number:064}"),
            sealed_at: "2027-01-15T08:00:00Z".into(),
        }
    }

    #[test]
    fn thinning_keeps_the_first_and_newest_and_spreads_the_rest() {
        let mut anchors: Vec<SealAnchor> = (0..100).map(anchor).collect();
        thin(&mut anchors, 8);
        let numbers: Vec<u64> = anchors.iter().map(|a| a.number).collect();
        assert_eq!(numbers.len(), 8);
        assert_eq!((numbers[0], numbers[7]), (0, 99));
        let widest = numbers.windows(2).map(|w| w[1] - w[0]).max().unwrap();
        assert!(widest <= 2 * 99 / 7 + 1, "spread out: {numbers:?}");
    }

    #[test]
    fn what_is_not_a_seal_is_refused() {
        let bundle = TrustBundle::from_pem(
            rcgen::CertificateParams::default()
                .self_signed(&rcgen::KeyPair::generate().unwrap())
                .unwrap()
                .pem()
                .as_bytes(),
        )
        .unwrap();
        assert!(matches!(
            judge("acme", &[], "{\"error\":\"x\"}", &bundle),
            Verdict::Refused(_)
        ));
    }
}
