//! The audit trail of an injected proxy: stdout JSON lines always, plus segments under
//! `<data dir>/audit` encrypted with the tenant's data key when the operator hands it
//! out ([`crate::control::audit_key`]). Without the key a fail-closed (Confidential,
//! Restricted) tenant's trail does not start: requests are refused until the key
//! arrives; other tenants run stdout-only, and both say so (log,
//! `portcullis_audit_data_key_missing`). With a collector configured, every entry is
//! also shipped to it over mTLS with the workload certificate, through a bounded spool
//! under `<data dir>/audit-spool` that keeps each batch until the collector acknowledges
//! it durable. Checkpoints are signed with the workload key, the certificate and SPIFFE
//! ID riding along, and the signer follows every certificate rotation.

use std::{io::Write, path::PathBuf, sync::Arc, time::Duration};

use portcullis_audit::{
    AuditWriter, CheckpointSigner, SignerIdentity, SystemClock,
    sink::{
        Sink,
        collector::AuditCollector,
        file::{FileSink, FileSinkConfig},
        spool::Spool,
        spooled::SpooledSink,
        stdout::StdoutSink,
    },
};
use tokio_util::sync::CancellationToken;

use super::{
    sinks::{policy_loaded, process_signer, writer_config},
    trail::{AuditTrail, failure_mode},
};
use crate::{
    config::env::{ClusterAudit, OperatorEndpoint},
    control::{
        audit_key::{self, KeyError, TenantKeys},
        identity::{CertificateStore, Credentials},
    },
    metrics::Metrics,
    policy::PolicyStore,
    tls::ClientConfigSource,
};

/// What the in-pod audit trail is built from.
pub struct ClusterAuditParts {
    /// The hook the inbound path records to.
    pub trail: Arc<AuditTrail>,
    /// The workload certificate (checkpoint signer).
    pub store: CertificateStore,
    /// The policy (classification, tenant).
    pub policy: PolicyStore,
    /// The operator's policy server, which also serves the tenant's data key.
    pub operator: OperatorEndpoint,
    /// mTLS to the operator with the workload certificate.
    pub tls: ClientConfigSource,
    /// `<data dir>/audit` receives the encrypted segments.
    pub data_dir: PathBuf,
    /// Checkpoints and key timing.
    pub settings: ClusterAudit,
    /// Where the JSON lines go (the process's stdout in a pod).
    pub stdout: Box<dyn Write + Send>,
    /// Where a missing data key is reported.
    pub metrics: Metrics,
}

/// A checkpoint signer holding the workload key, naming its certificate and SPIFFE ID.
pub fn workload_signer(credentials: &Credentials) -> Option<CheckpointSigner> {
    CheckpointSigner::from_pkcs8(
        credentials.workload_key_pkcs8(),
        SignerIdentity {
            spiffe_id: Some(credentials.workload().to_string()),
            certificate_der: Some(credentials.leaf().to_vec()),
            // So `audit verify` can chain the leaf to the trust bundle's roots.
            intermediates_der: credentials
                .certified_key()
                .cert
                .iter()
                .skip(1)
                .map(|c| c.to_vec())
                .collect(),
        },
    )
    .map_err(|e| tracing::error!(error = %e, "workload key cannot sign audit checkpoints"))
    .ok()
}

async fn certificate_loaded(store: &CertificateStore, shutdown: &CancellationToken) -> bool {
    let mut changes = store.subscribe();
    loop {
        if store.is_ready() {
            return true;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            changed = changes.changed() => if changed.is_err() { return false },
        }
    }
}

/// Asks for the tenant's keys until `wait` has passed; gives up at once when the
/// operator says it will not hand them out.
async fn first_keys(
    operator: &OperatorEndpoint,
    tls: &ClientConfigSource,
    wait: Duration,
    tenant: &str,
) -> Result<TenantKeys, KeyError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match audit_key::fetch(operator, tls, tenant).await {
            Ok(keys) => return Ok(keys),
            Err(
                e @ (KeyError::NotServed { .. } | KeyError::Refused { .. } | KeyError::Invalid(_)),
            ) => {
                return Err(e);
            }
            Err(e) if tokio::time::Instant::now() + Duration::from_millis(500) >= deadline => {
                return Err(e);
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Asks for the tenant's keys until they come (or `shutdown`): a fail-closed tenant's
/// pod serves nothing until then, so it keeps asking, backing off to 5 s.
async fn keys_eventually(
    operator: &OperatorEndpoint,
    tls: &ClientConfigSource,
    tenant: &str,
    shutdown: &CancellationToken,
) -> Option<TenantKeys> {
    let mut backoff = Duration::from_millis(500);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(backoff) => {}
        }
        match audit_key::fetch(operator, tls, tenant).await {
            Ok(keys) => return Some(keys),
            Err(e) => tracing::debug!(error = %e, "tenant data key still not available"),
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn open_file_sink(data_dir: &std::path::Path, keys: &TenantKeys) -> Option<FileSink> {
    let mut config = FileSinkConfig::new(data_dir.join("audit"));
    if let Some(days) = keys.retention_days {
        config.retention_days = days.clamp(1, 2555);
    }
    FileSink::open(config, keys.active.clone(), Arc::new(SystemClock))
        .map_err(|e| {
            tracing::warn!(error = %e, "audit: encrypted file sink off, records go to stdout only");
        })
        .ok()
}

/// How long one shipment may take before it is retried.
const SHIP_TIMEOUT: Duration = Duration::from_secs(10);

/// The collector behind a spool under `data_dir`, reached with the workload
/// certificate in force when each batch starts.
fn collector_sink(
    url: &str,
    data_dir: &std::path::Path,
    settings: &ClusterAudit,
    tls: &ClientConfigSource,
) -> Result<SpooledSink, portcullis_audit::Error> {
    let tls = tls.clone();
    let collector = AuditCollector::new(
        url,
        Arc::new(move || tls().map_err(|e| e.to_string())),
        SHIP_TIMEOUT,
    )?;
    let spool = Spool::open(data_dir.join("audit-spool"), settings.spool_max_bytes)?;
    Ok(SpooledSink::start(spool, collector, settings.ship_retry))
}

/// Runs the in-pod audit trail until `shutdown`: starts the writer once a certificate
/// and a policy are loaded, then keeps the checkpoint signer and the data key current.
pub async fn run(parts: ClusterAuditParts, shutdown: CancellationToken) {
    if !certificate_loaded(&parts.store, &shutdown).await
        || !policy_loaded(&parts.policy, &shutdown).await
    {
        return;
    }
    let (Some(credentials), Some(bundle)) = (parts.store.load(), parts.policy.load()) else {
        return;
    };
    let tenant = bundle.tenant.clone();
    let ClusterAuditParts {
        trail,
        store,
        operator,
        tls,
        data_dir,
        settings,
        stdout,
        metrics,
        ..
    } = parts;
    let fails_closed = bundle.classification.audit_fails_closed();
    let keys = tokio::select! {
        _ = shutdown.cancelled() => return,
        keys = first_keys(&operator, &tls, settings.key_wait, &tenant) => keys,
    };
    let keys = match keys {
        Ok(keys) => Some(keys),
        Err(e) if fails_closed => {
            // Stdout alone is not the durable, encrypted log this tenant requires: hold
            // the trail back, so requests are refused and /ready says why.
            metrics.audit_data_key_missing(true);
            trail.set_waiting_for_data_key(true);
            tracing::error!(
                tenant = %tenant,
                classification = ?bundle.classification,
                error = %e,
                "AUDIT DATA KEY MISSING: refusing every request (503 audit_unavailable, /ready false) until the operator hands out the tenant's data key; check the operator's logs and the Tenant's status"
            );
            let keys = keys_eventually(&operator, &tls, &tenant, &shutdown).await;
            let Some(keys) = keys else { return };
            tracing::info!(tenant = %tenant, "tenant data key arrived; audit trail starting");
            trail.set_waiting_for_data_key(false);
            Some(keys)
        }
        Err(e) => {
            metrics.audit_data_key_missing(true);
            tracing::warn!(
                tenant = %tenant,
                error = %e,
                "AUDIT DATA KEY MISSING: no tenant data key from the operator, so no encrypted file sink; records go to stdout only"
            );
            None
        }
    };
    if keys.is_some() {
        metrics.audit_data_key_missing(false);
    }
    let file = keys.and_then(|keys| {
        open_file_sink(&data_dir, &keys).map(|sink| (sink, keys.active.version()))
    });
    let mut sinks: Vec<Arc<dyn Sink>> = vec![trail.watch(Arc::new(StdoutSink::to_writer(stdout)))];
    if let Some((sink, _)) = &file {
        sinks.push(trail.watch(Arc::new(sink.clone())));
    }
    if let Some(url) = &settings.collector {
        match collector_sink(url, &data_dir, &settings, &tls) {
            Ok(sink) => sinks.push(trail.watch(Arc::new(sink))),
            Err(e) if fails_closed => {
                // Without the spool nothing this tenant records outlives the pod.
                tracing::error!(error = %e, "AUDIT SPOOL UNAVAILABLE: refusing every request until the proxy restarts with a writable data dir");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "audit: shipping to the collector is off; records stay in the pod")
            }
        }
    }
    let signer = match workload_signer(&credentials) {
        Some(signer) => signer,
        None => match process_signer(SignerIdentity {
            spiffe_id: None,
            certificate_der: None,
            intermediates_der: Vec::new(),
        }) {
            Ok(signer) => signer,
            Err(e) => {
                tracing::error!(error = %e, "audit trail cannot start");
                return;
            }
        },
    };
    let mode = failure_mode(bundle.classification);
    let writer = AuditWriter::start(
        writer_config(trail.pod(), settings.checkpoint, mode),
        signer,
        sinks,
    );
    trail.start(writer);
    tracing::info!(
        tenant = %tenant,
        encrypted_file = file.is_some(),
        collector = settings.collector.as_deref().unwrap_or("none"),
        fail_closed = fails_closed,
        "audit trail started; checkpoints signed with the workload key"
    );

    let mut certificates = store.subscribe();
    certificates.mark_unchanged();
    let mut refresh = tokio::time::interval(settings.key_refresh);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    refresh.tick().await;
    let mut key_version = file.as_ref().map(|(_, version)| *version);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = certificates.changed() => {
                if changed.is_err() {
                    return;
                }
                if let (Some(credentials), Some(writer)) = (store.load(), trail.writer())
                    && let Some(signer) = workload_signer(&credentials)
                {
                    writer.replace_signer(signer);
                    tracing::debug!("audit checkpoint signer follows the renewed certificate");
                }
            }
            _ = refresh.tick() => {
                let Some((sink, _)) = &file else { continue };
                let fetched = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    fetched = audit_key::fetch(&operator, &tls, &tenant) => fetched,
                };
                match fetched {
                    Ok(keys) if Some(keys.active.version()) != key_version => {
                        let version = keys.active.version();
                        match sink.rotate_key(keys.active) {
                            Ok(()) => {
                                key_version = Some(version);
                                tracing::info!(version, "audit data key rotated");
                            }
                            Err(e) => tracing::warn!(error = %e, "audit data key rotation failed"),
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "audit data key refresh failed; keeping the current key"),
                }
            }
        }
    }
}
