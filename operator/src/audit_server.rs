//! `portcullis-operator audit-server`: the audit collector ([`portcullis_collector`])
//! as a process. Ingest (mutual TLS) and export (a bearer token, authorised by the API
//! server: [`crate::audit_cluster`]) on `--listen`, with the files it is given (a
//! mounted `kubernetes.io/tls` Secret the operator keeps fresh: re-read every 30 s and
//! served from the next handshake on), `/metrics` and `/healthz` on `--metrics-addr`,
//! retention enforced hourly, each tenant's log forwarded to its SIEM sinks
//! ([`crate::audit_sinks`]), and each tenant's data-encryption keys fetched from the
//! operator ([`crate::audit_keys`]) to seal its stored days.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::StatusCode;
use portcullis_api::clock::SystemClock;
use portcullis_api::spiffe::TrustDomain;
use portcullis_audit::checkpoint::{CheckpointSigner, SignerIdentity};
use portcullis_audit::retry::RetryPolicy;
use portcullis_collector::{
    Collector, Export, ExportAuthorizer, ExportMetrics, FileStore, ForwardMetrics, Forwarding,
    Ingest, IngestMetrics, KeyCache, NoSinks, Pruned, RefusalObserver, RetentionPolicy,
    SinkDirectory, SinkObserver, StoreError,
};
use portcullis_server::oneshot::Target;
use portcullis_server::{self as serve, ServerTls};
use portcullis_tls::{parse_pem_certs, root_store};
use prometheus_client::registry::Registry;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How often the certificate files are checked for a renewal (kubelet refreshes a
/// mounted Secret within about a minute).
pub const RELOAD_EVERY: Duration = Duration::from_secs(30);

/// How often each tenant's SIEM sinks are read again: a sink added to a Tenant, or a
/// rotated token, is in force within this.
pub const SINKS_EVERY: Duration = Duration::from_secs(30);

/// How often each tenant log that grew is sealed.
pub const SEAL_EVERY: Duration = Duration::from_secs(60);

/// A log that stored this many records since its last seal is sealed before
/// [`SEAL_EVERY`] comes round.
pub const SEAL_RECORDS: u64 = 10_000;

/// How often logs are checked for [`SEAL_RECORDS`].
const SEAL_CHECK: Duration = Duration::from_secs(5);

/// How often retention is enforced.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// What the audit server needs.
#[derive(Clone, Debug)]
pub struct AuditServerSettings {
    /// Ingest address.
    pub listen: SocketAddr,
    /// `/metrics` and `/healthz`.
    pub metrics_addr: SocketAddr,
    /// Where tenant logs live (the PersistentVolume in a cluster).
    pub data_dir: PathBuf,
    /// The serving certificate chain (PEM).
    pub cert_file: PathBuf,
    /// Its key (PEM).
    pub key_file: PathBuf,
    /// The roots shipping workloads' certificates chain to (PEM).
    pub trust_bundle_file: PathBuf,
    /// Workloads of this trust domain may ship.
    pub trust_domain: TrustDomain,
    /// Days kept, per tenant.
    pub retention_days: u32,
    /// How often the certificate files are checked for a renewal.
    pub reload_every: Duration,
    /// How often each tenant's SIEM sinks are read again (a new sink, a rotated token).
    pub sinks_every: Duration,
    /// How often each tenant log that grew is sealed with the serving key.
    pub seal_every: Duration,
    /// The operator's SPIFFE id: its admin chains are filed under the tenants their
    /// records name.
    pub admin_writer: Option<String>,
    /// Where each tenant's data-encryption keys come from.
    pub keys: KeySupply,
}

/// Where the collector's tenant keys come from.
#[derive(Clone, Debug)]
pub enum KeySupply {
    /// The operator's policy server at this `https://` URL, asked with the serving
    /// certificate ([`crate::audit_keys`]).
    Operator(String),
    /// Keys the caller holds (tests; a collector beside no operator).
    Given(Arc<KeyCache>),
}

/// Why the audit server did not start.
#[derive(Debug, thiserror::Error)]
pub enum AuditServerError {
    /// A certificate, key or bundle file cannot be used.
    #[error("{path}: {message}; give the PEM the operator issued for the audit service")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The TLS configuration was refused.
    #[error(transparent)]
    Tls(#[from] portcullis_collector::server::ServerTlsError),
    /// The key URL cannot be used.
    #[error(
        "--key-url: {0}; give the operator's policy server, https://<operator service>.<namespace>.svc:8090"
    )]
    KeyUrl(portcullis_server::oneshot::OneshotError),
    /// The data directory cannot be used.
    #[error("audit data directory: {0}")]
    Store(#[from] StoreError),
    /// A listener cannot bind.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

fn pem_error(path: &Path, message: impl std::fmt::Display) -> AuditServerError {
    AuditServerError::Pem {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// The certificates in `pem`, read from `path` (named in every error).
fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, AuditServerError> {
    let text = std::str::from_utf8(pem).map_err(|e| pem_error(path, e))?;
    parse_pem_certs(text, "PEM").map_err(|e| pem_error(path, e))
}

/// The running audit server.
#[derive(Debug)]
pub struct AuditServer {
    /// Where ingest listens.
    pub addr: SocketAddr,
    /// Where `/metrics` listens.
    pub metrics_addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl AuditServer {
    /// Stops accepting, lets open batches finish, and returns.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// The certificate, key and trust bundle files.
#[derive(Clone, Debug)]
struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    bundle: PathBuf,
    every: Duration,
}

impl From<&AuditServerSettings> for TlsFiles {
    fn from(settings: &AuditServerSettings) -> Self {
        Self {
            cert: settings.cert_file.clone(),
            key: settings.key_file.clone(),
            bundle: settings.trust_bundle_file.clone(),
            every: settings.reload_every,
        }
    }
}

impl TlsFiles {
    fn read(path: &Path) -> Result<Vec<u8>, AuditServerError> {
        std::fs::read(path).map_err(|e| pem_error(path, e))
    }

    /// The files' bytes (to notice a change) and the config they make.
    fn load(&self) -> Result<(Vec<Vec<u8>>, ServerConfig), AuditServerError> {
        let contents = vec![
            Self::read(&self.cert)?,
            Self::read(&self.key)?,
            Self::read(&self.bundle)?,
        ];
        let chain = certificates(&self.cert, &contents[0])?;
        let key =
            PrivateKeyDer::from_pem_slice(&contents[1]).map_err(|e| pem_error(&self.key, e))?;
        let roots = root_store(&certificates(&self.bundle, &contents[2])?)
            .map_err(|e| pem_error(&self.bundle, e))?;
        let config = portcullis_collector::server_config(chain, key, roots)?;
        Ok((contents, config))
    }

    /// A client configuration presenting the serving certificate (the policy server
    /// lets the audit service read tenant keys) and trusting the bundle.
    fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, AuditServerError> {
        let chain = certificates(&self.cert, &Self::read(&self.cert)?)?;
        let key = PrivateKeyDer::from_pem_slice(&Self::read(&self.key)?)
            .map_err(|e| pem_error(&self.key, e))?;
        let roots = root_store(&certificates(&self.bundle, &Self::read(&self.bundle)?)?)
            .map_err(|e| pem_error(&self.bundle, e))?;
        let config = rustls::ClientConfig::builder_with_provider(portcullis_tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| pem_error(&self.cert, e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| pem_error(&self.key, e))?;
        Ok(Arc::new(config))
    }

    /// The serving key as a seal signer, with the serving chain as its identity: read
    /// at each round, so seals follow a renewed certificate.
    fn signer(&self) -> Result<CheckpointSigner, AuditServerError> {
        let chain = certificates(&self.cert, &Self::read(&self.cert)?)?;
        let key = PrivateKeyDer::from_pem_slice(&Self::read(&self.key)?)
            .map_err(|e| pem_error(&self.key, e))?;
        let PrivateKeyDer::Pkcs8(key) = key else {
            return Err(pem_error(
                &self.key,
                "seals need a PKCS#8 ECDSA P-256 key, as the operator issues",
            ));
        };
        let mut chain = chain.into_iter().map(|der| der.to_vec());
        let identity = SignerIdentity {
            spiffe_id: None,
            certificate_der: chain.next(),
            intermediates_der: chain.collect(),
        };
        CheckpointSigner::from_pkcs8(key.secret_pkcs8_der(), identity)
            .map_err(|e| pem_error(&self.key, e))
    }

    /// Re-reads the files every `every` and swaps in the config they make when
    /// they changed; a broken renewal is logged and the current config kept.
    async fn follow(
        self,
        mut contents: Vec<Vec<u8>>,
        current: Arc<ArcSwap<ServerConfig>>,
        shutdown: CancellationToken,
    ) {
        let mut every = tokio::time::interval(self.every);
        every.tick().await;
        loop {
            tokio::select! {
                _ = every.tick() => {}
                () = shutdown.cancelled() => return,
            }
            let changed = [&self.cert, &self.key, &self.bundle]
                .iter()
                .zip(&contents)
                .any(|(path, seen)| std::fs::read(path).is_ok_and(|now| &now != seen));
            if !changed {
                continue;
            }
            match self.load() {
                Ok((now, config)) => {
                    contents = now;
                    current.store(Arc::new(config));
                    tracing::info!(cert = %self.cert.display(), "serving certificate reloaded");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "renewed certificate files not usable; serving the current one");
                }
            }
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, AuditServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AuditServerError::Bind { addr, source })
}

/// What the collector learns from and tells the cluster.
pub struct ClusterAccess<A, R, K> {
    /// Who may export.
    pub authorizer: A,
    /// How long each tenant's log is kept.
    pub retention: R,
    /// Where each tenant's log is forwarded.
    pub sinks: K,
    /// Told of refused batches.
    pub observer: Option<Arc<dyn RefusalObserver>>,
    /// Told of failing SIEM sinks.
    pub sink_observer: Option<Arc<dyn SinkObserver>>,
}

impl ClusterAccess<portcullis_collector::NoExport, portcullis_collector::FixedRetention, NoSinks> {
    /// No API server: exports refused, every tenant kept `retention_days`, nothing
    /// forwarded, refusals only logged and counted.
    pub fn none(retention_days: u32) -> Self {
        Self {
            authorizer: portcullis_collector::NoExport,
            retention: portcullis_collector::FixedRetention(retention_days),
            sinks: NoSinks,
            observer: None,
            sink_observer: None,
        }
    }
}

/// Opens the store (recovering every chain from it), then serves.
pub async fn start<A: ExportAuthorizer, R: RetentionPolicy, K: SinkDirectory>(
    settings: AuditServerSettings,
    cluster: ClusterAccess<A, R, K>,
) -> Result<AuditServer, AuditServerError> {
    let ClusterAccess {
        authorizer,
        retention,
        sinks,
        observer,
        sink_observer,
    } = cluster;
    let files = TlsFiles::from(&settings);
    let (contents, tls) = files.load()?;
    // Refuse to start with a key that cannot seal, rather than run without seals.
    files.signer()?;
    let files_for_seals = files.clone();
    let files_for_keys = files.clone();
    let tls = Arc::new(ArcSwap::from_pointee(tls));

    let (keys, key_source) = match &settings.keys {
        KeySupply::Given(keys) => (keys.clone(), None),
        KeySupply::Operator(url) => (
            Arc::new(KeyCache::new()),
            Some(Target::from_url(url).map_err(AuditServerError::KeyUrl)?),
        ),
    };
    let store = FileStore::open(&settings.data_dir, keys.clone())?;
    let collector = Arc::new(Mutex::new(Collector::open(store, Arc::new(SystemClock))?));
    let mut registry = Registry::default();
    let metrics = IngestMetrics::register(&mut registry);
    let mut ingest = Ingest::new(collector.clone(), settings.trust_domain.clone(), metrics);
    if let Some(observer) = observer {
        ingest = ingest.observe_refusals(observer);
    }
    if let Some(writer) = &settings.admin_writer {
        ingest = ingest.admin_writer(writer);
    }
    let export = Export::new(
        collector.clone(),
        authorizer,
        ExportMetrics::register(&mut registry),
    );
    let mut forwarding = Forwarding::new(
        collector.clone(),
        sinks,
        ForwardMetrics::register(&mut registry),
        RetryPolicy::default(),
    );
    if let Some(observer) = sink_observer {
        forwarding = forwarding.observe(observer);
    }

    let listener = bind(settings.listen).await?;
    let addr = listener
        .local_addr()
        .map_err(|source| AuditServerError::Bind {
            addr: settings.listen,
            source,
        })?;
    let metrics_listener = bind(settings.metrics_addr).await?;
    let metrics_addr = metrics_listener
        .local_addr()
        .map_err(|source| AuditServerError::Bind {
            addr: settings.metrics_addr,
            source,
        })?;

    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let current = tls.clone();
    tasks.spawn(files.follow(contents, tls, shutdown.clone()));
    tasks.spawn(serve::serve(
        listener,
        Some(ServerTls::Current(Arc::new(move || current.load_full()))),
        move |request| portcullis_collector::route(ingest.clone(), export.clone(), request),
        shutdown.clone(),
    ));
    let registry = Arc::new(registry);
    tasks.spawn(serve::serve(
        metrics_listener,
        None,
        move |request: http::Request<hyper::body::Incoming>| {
            let registry = registry.clone();
            async move {
                match request.uri().path() {
                    "/metrics" => {
                        let mut text = String::new();
                        match prometheus_client::encoding::text::encode(&mut text, &registry) {
                            Ok(()) => serve::full(
                                StatusCode::OK,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                text,
                            ),
                            Err(e) => {
                                serve::error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
                            }
                        }
                    }
                    "/healthz" => serve::full(StatusCode::OK, "text/plain", "ok"),
                    _ => serve::error(StatusCode::NOT_FOUND, "no such endpoint"),
                }
            }
        },
        shutdown.clone(),
    ));
    if let Some(target) = key_source {
        tasks.spawn(crate::audit_keys::supply(
            keys,
            target,
            move || files_for_keys.client_config(),
            shutdown.clone(),
        ));
    }
    tasks.spawn(forwarding.run(settings.sinks_every, shutdown.clone()));
    tasks.spawn(seal_periodically(
        collector.clone(),
        files_for_seals,
        settings.seal_every,
        shutdown.clone(),
    ));
    tasks.spawn(enforce_retention(collector, retention, shutdown.clone()));
    tracing::info!(%addr, %metrics_addr, data = %settings.data_dir.display(), "audit server serving");
    Ok(AuditServer {
        addr,
        metrics_addr,
        shutdown,
        tasks,
    })
}

/// Seals every tenant log that grew, every `every` and once more at shutdown, so the
/// records of the last moments are sealed too; and in between, every
/// [`SEAL_CHECK`], each log that stored [`SEAL_RECORDS`] records since its last seal.
async fn seal_periodically(
    collector: Arc<Mutex<Collector<FileStore>>>,
    files: TlsFiles,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut every = tokio::time::interval(every);
    every.tick().await;
    let mut busy = tokio::time::interval(SEAL_CHECK);
    busy.tick().await;
    loop {
        let (records, last_round) = tokio::select! {
            _ = every.tick() => (0, false),
            _ = busy.tick() => (SEAL_RECORDS, false),
            () = shutdown.cancelled() => (0, true),
        };
        match files.signer() {
            Ok(signer) => {
                match portcullis_collector::seal_grown(&collector, signer, records).await {
                    Ok(sealed) if !sealed.is_empty() => {
                        tracing::debug!(tenants = sealed.len(), "sealed tenant logs");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "sealing tenant logs failed; the next round seals them")
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot seal tenant logs with the serving key");
            }
        }
        if last_round {
            return;
        }
    }
}

async fn enforce_retention<R: RetentionPolicy>(
    collector: Arc<Mutex<Collector<FileStore>>>,
    retention: R,
    shutdown: CancellationToken,
) {
    let mut every = tokio::time::interval(PRUNE_EVERY);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match portcullis_collector::prune_all(&collector, &retention).await {
            Ok(rounds) => {
                for (tenant, pruned) in rounds {
                    if let Pruned::Days {
                        retention_days,
                        removed: removed @ 1..,
                    } = pruned
                    {
                        tracing::info!(
                            tenant,
                            days = removed,
                            retention_days,
                            "retention: pruned days"
                        );
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "retention: pruning failed"),
        }
    }
}
