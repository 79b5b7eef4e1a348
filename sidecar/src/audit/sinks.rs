//! Building the audit writer's parts: sinks from the `audit:` section, the checkpoint
//! signer, the writer settings, and the task that starts the writer once the first
//! policy says how the tenant's audit fails.

use std::{
    path::Path,
    sync::{Arc, Mutex, PoisonError},
};

use portcullis_audit::{
    AuditWriter, Chain, CheckpointPolicy, CheckpointSigner, SignerIdentity, SystemClock,
    WriterConfig,
    keyring::parse_key_material,
    retry::RetryPolicy,
    secret::Secret,
    sink::{
        Sink,
        collector::AuditCollector,
        datadog::{Datadog, DatadogConfig},
        file::{FileSink, FileSinkConfig},
        http::CurrentClientConfig,
        splunk_hec::{SplunkHec, SplunkHecConfig},
        spool::Spool,
        spooled::SpooledSink,
        stdout::StdoutSink,
    },
};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivatePkcs8KeyDer, pem::PemObject},
};
use tokio_util::sync::CancellationToken;

use super::trail::{AuditTrail, failure_mode};
use crate::{
    config::{
        TlsFiles,
        audit::{AuditConfig, AuditSink, CollectorAudit, Spool as SpoolConfig},
    },
    policy::PolicyStore,
};

/// Why the audit trail could not be set up. Never carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum AuditSetupError {
    /// A file named in the configuration could not be read.
    #[error("reading {field} {path}: {source}")]
    Read {
        /// The configuration field.
        field: String,
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A sink could not be built.
    #[error("{field}: {message}")]
    Sink {
        /// The configuration field.
        field: String,
        /// What is wrong (from portcullis-audit; never key material).
        message: String,
    },
    /// No checkpoint signing key.
    #[error("audit checkpoint signing key: {0}")]
    Signer(String),
}

fn read(field: &str, path: &Path) -> Result<Vec<u8>, AuditSetupError> {
    std::fs::read(path).map_err(|source| AuditSetupError::Read {
        field: field.to_owned(),
        path: path.display().to_string(),
        source,
    })
}

fn read_secret(field: &str, path: &Path) -> Result<Secret, AuditSetupError> {
    let bytes = read(field, path)?;
    let text = String::from_utf8(bytes).map_err(|_| AuditSetupError::Sink {
        field: field.to_owned(),
        message: format!("{} is not text", path.display()),
    })?;
    Ok(Secret::new(text.trim()))
}

fn roots(
    field: &str,
    path: Option<&std::path::PathBuf>,
) -> Result<Option<RootCertStore>, AuditSetupError> {
    let Some(path) = path else { return Ok(None) };
    let pem = read(field, path)?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem).flatten() {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(AuditSetupError::Sink {
            field: field.to_owned(),
            message: format!("{} holds no usable CA certificate", path.display()),
        });
    }
    Ok(Some(roots))
}

fn sink_error(field: &str, e: portcullis_audit::Error) -> AuditSetupError {
    AuditSetupError::Sink {
        field: field.to_owned(),
        message: e.to_string(),
    }
}

fn spool(field: &str, config: &SpoolConfig) -> Result<Spool, AuditSetupError> {
    Spool::open(&config.dir, config.max_bytes)
        .map_err(|e| sink_error(&format!("{field}.spoolDir"), e))
}

/// Builds the sinks of an `audit:` section (network sinks start delivering from their
/// spool right away). Must run inside a tokio runtime.
pub fn build_sinks(config: &AuditConfig) -> Result<Vec<Arc<dyn Sink>>, AuditSetupError> {
    let mut sinks: Vec<Arc<dyn Sink>> = Vec::new();
    for (i, sink) in config.sinks.iter().enumerate() {
        let field = format!("audit.sinks[{i}]");
        match sink {
            AuditSink::Stdout => sinks.push(Arc::new(StdoutSink::new())),
            AuditSink::File(file) => {
                let field = format!("{field}.file");
                let material = read(&format!("{field}.keyFile"), &file.key_file)?;
                let key = parse_key_material(file.key_version, &material)
                    .map_err(|e| sink_error(&format!("{field}.keyFile"), e))?;
                let sink_config = FileSinkConfig {
                    dir: file.dir.clone(),
                    max_segment_bytes: file.max_segment_bytes,
                    max_segment_age: file.max_segment_age,
                    retention_days: file.retention_days,
                };
                let sink = FileSink::open(sink_config, key, Arc::new(SystemClock))
                    .map_err(|e| sink_error(&format!("{field}.dir"), e))?;
                sinks.push(Arc::new(sink));
            }
            AuditSink::SplunkHec(hec) => {
                let field = format!("{field}.splunkHec");
                let deliver = SplunkHec::new(SplunkHecConfig {
                    url: hec.url.clone(),
                    token: read_secret(&format!("{field}.tokenFile"), &hec.token_file)?,
                    host: config.pod.clone(),
                    index: hec.index.clone(),
                    tls_roots: roots(&format!("{field}.caFile"), hec.ca_file.as_ref())?,
                    timeout: hec.timeout,
                })
                .map_err(|e| sink_error(&field, e))?;
                let spool = spool(&field, &hec.spool)?;
                sinks.push(Arc::new(SpooledSink::start(
                    spool,
                    deliver,
                    RetryPolicy::default(),
                )));
            }
            AuditSink::Collector(collector) => {
                let field = format!("{field}.collector");
                let roots = roots(&format!("{field}.caFile"), Some(&collector.ca_file))?
                    .unwrap_or_else(RootCertStore::empty);
                let client = collector_client(collector, Arc::new(roots));
                // A pair that cannot be used stops the start, naming the files.
                client().map_err(|message| AuditSetupError::Sink {
                    field: field.clone(),
                    message,
                })?;
                let deliver = AuditCollector::new(&collector.url, client, collector.timeout)
                    .map_err(|e| sink_error(&field, e))?;
                let spool = spool(&field, &collector.spool)?;
                sinks.push(Arc::new(SpooledSink::start(
                    spool,
                    deliver,
                    RetryPolicy::default(),
                )));
            }
            AuditSink::Datadog(dd) => {
                let field = format!("{field}.datadog");
                let deliver = Datadog::new(DatadogConfig {
                    url: dd.url.clone(),
                    api_key: read_secret(&format!("{field}.apiKeyFile"), &dd.api_key_file)?,
                    service: dd.service.clone(),
                    hostname: config.pod.clone(),
                    tags: dd.tags.clone(),
                    tls_roots: roots(&format!("{field}.caFile"), dd.ca_file.as_ref())?,
                    timeout: dd.timeout,
                })
                .map_err(|e| sink_error(&field, e))?;
                let spool = spool(&field, &dd.spool)?;
                sinks.push(Arc::new(SpooledSink::start(
                    spool,
                    deliver,
                    RetryPolicy::default(),
                )));
            }
        }
    }
    Ok(sinks)
}

/// A client config and the certificate and key PEM it was built from.
type BuiltClient = (Vec<u8>, Vec<u8>, Arc<ClientConfig>);

/// The collector's TLS client: the certificate and key files are read for every batch
/// and the config rebuilt only when they changed, so a renewed pair is presented at
/// once while an unchanged one keeps its TLS sessions for resumption.
fn collector_client(config: &CollectorAudit, roots: Arc<RootCertStore>) -> CurrentClientConfig {
    let (cert_file, key_file) = (config.cert_file.clone(), config.key_file.clone());
    let built: Mutex<Option<BuiltClient>> = Mutex::new(None);
    Arc::new(move || {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))
        };
        let (cert_pem, key_pem) = (read(&cert_file)?, read(&key_file)?);
        let mut built = built.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((cert, key, config)) = built.as_ref()
            && *cert == cert_pem
            && *key == key_pem
        {
            return Ok(config.clone());
        }
        let loaded = portcullis_tls::serving_certificate::parse_files(
            &cert_pem,
            &key_pem,
            &cert_file.display().to_string(),
            &key_file.display().to_string(),
        )
        .map_err(|refused| refused.detail)?;
        let config =
            crate::tls::client::operator_config(loaded.certified_key().clone(), roots.clone())
                .map(Arc::new)
                .map_err(|e| e.to_string())?;
        *built = Some((cert_pem, key_pem, config.clone()));
        Ok(config)
    })
}

/// A signer with a key made for this process. Its public key is in every checkpoint
/// (and logged once here), so a verifier can pin it.
pub fn process_signer(identity: SignerIdentity) -> Result<CheckpointSigner, AuditSetupError> {
    let pkcs8 =
        CheckpointSigner::generate_pkcs8().map_err(|e| AuditSetupError::Signer(e.to_string()))?;
    let signer = CheckpointSigner::from_pkcs8(&pkcs8, identity)
        .map_err(|e| AuditSetupError::Signer(e.to_string()))?;
    use base64::Engine as _;
    tracing::info!(
        public_key = %base64::engine::general_purpose::STANDARD.encode(signer.public_key()),
        "audit checkpoints are signed with a per-process ECDSA P-256 key"
    );
    Ok(signer)
}

/// The signer of a standalone proxy: its TLS key when that is a PKCS#8 ECDSA P-256 key
/// (checkpoints then carry the certificate and its SPIFFE ID), else a per-process key.
pub fn signer_for_tls_files(tls: &TlsFiles) -> Result<CheckpointSigner, AuditSetupError> {
    let from_files = || -> Option<CheckpointSigner> {
        let key_pem = std::fs::read(&tls.private_key).ok()?;
        let key = PrivatePkcs8KeyDer::from_pem_slice(&key_pem).ok()?;
        let cert_pem = std::fs::read(&tls.certificate).ok()?;
        let mut chain = CertificateDer::pem_slice_iter(&cert_pem);
        let leaf = chain.next()?.ok()?;
        let intermediates_der = chain.flatten().map(|c| c.to_vec()).collect();
        let spiffe_id = crate::tls::peer_spiffe_id(Some(std::slice::from_ref(&leaf)));
        CheckpointSigner::from_pkcs8(
            key.secret_pkcs8_der(),
            SignerIdentity {
                spiffe_id,
                certificate_der: Some(leaf.to_vec()),
                intermediates_der,
            },
        )
        .ok()
    };
    match from_files() {
        Some(signer) => {
            tracing::info!("audit checkpoints are signed with the tls.privateKey key");
            Ok(signer)
        }
        None => process_signer(SignerIdentity::default()),
    }
}

/// Writer settings for records of `pod` whose tenant fails as `mode` says.
pub fn writer_config(
    pod: &str,
    checkpoint: CheckpointPolicy,
    mode: portcullis_audit::FailureMode,
) -> WriterConfig {
    let mut config = WriterConfig::new(Chain::new_id(pod, jiff::Timestamp::now()));
    config.checkpoint = checkpoint;
    config.failure_mode = mode;
    config
}

/// Waits until `policy` holds a bundle; false when `shutdown` came first.
pub async fn policy_loaded(policy: &PolicyStore, shutdown: &CancellationToken) -> bool {
    let mut changes = policy.subscribe();
    loop {
        if policy.is_ready() {
            return true;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            changed = changes.changed() => if changed.is_err() { return false },
        }
    }
}

/// Starts `trail` with `sinks` and `signer` once `policy` holds a bundle, with the
/// failure mode of the bundle's classification.
pub async fn start_when_policy_loaded(
    trail: Arc<AuditTrail>,
    policy: PolicyStore,
    signer: CheckpointSigner,
    sinks: Vec<Arc<dyn Sink>>,
    checkpoint: CheckpointPolicy,
    shutdown: CancellationToken,
) {
    if !policy_loaded(&policy, &shutdown).await {
        return;
    }
    let Some(bundle) = policy.load() else { return };
    let mode = failure_mode(bundle.classification);
    let sinks = sinks.into_iter().map(|sink| trail.watch(sink)).collect();
    let writer = AuditWriter::start(writer_config(trail.pod(), checkpoint, mode), signer, sinks);
    trail.start(writer);
}
