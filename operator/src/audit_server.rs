//! `portcullis-operator audit-server`: the audit collector ([`portcullis_collector`])
//! as a process. Ingest on `--listen` over mutual TLS with the files it is given,
//! `/metrics` and `/healthz` on `--metrics-addr`, and retention enforced hourly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::StatusCode;
use portcullis_api::clock::SystemClock;
use portcullis_api::spiffe::TrustDomain;
use portcullis_collector::{Collector, FileStore, Ingest, IngestMetrics, StoreError};
use portcullis_server::{self as serve};
use prometheus_client::registry::Registry;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

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

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, AuditServerError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(pem_error(path, "no CERTIFICATE block"));
    }
    Ok(certs)
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

async fn bind(addr: SocketAddr) -> Result<TcpListener, AuditServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AuditServerError::Bind { addr, source })
}

/// Opens the store (recovering every chain from it), then serves.
pub async fn start(settings: AuditServerSettings) -> Result<AuditServer, AuditServerError> {
    let chain = certificates(&settings.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&settings.key_file)
        .map_err(|e| pem_error(&settings.key_file, e))?;
    let mut roots = rustls::RootCertStore::empty();
    for root in certificates(&settings.trust_bundle_file)? {
        roots
            .add(root)
            .map_err(|e| pem_error(&settings.trust_bundle_file, e))?;
    }
    let tls = portcullis_collector::server_config(chain, key, roots)?;

    let store = FileStore::open(&settings.data_dir)?;
    let collector = Arc::new(Mutex::new(Collector::open(store, Arc::new(SystemClock))?));
    let mut registry = Registry::default();
    let metrics = IngestMetrics::register(&mut registry);
    let ingest = Ingest::new(collector.clone(), settings.trust_domain.clone(), metrics);

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
    tasks.spawn(serve::serve(
        listener,
        Some(Arc::new(tls)),
        move |request| ingest.clone().handle(request),
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
    tasks.spawn(enforce_retention(
        collector,
        settings.retention_days,
        shutdown.clone(),
    ));
    tracing::info!(%addr, %metrics_addr, data = %settings.data_dir.display(), "audit server serving");
    Ok(AuditServer {
        addr,
        metrics_addr,
        shutdown,
        tasks,
    })
}

async fn enforce_retention(
    collector: Arc<Mutex<Collector<FileStore>>>,
    retention_days: u32,
    shutdown: CancellationToken,
) {
    let mut every = tokio::time::interval(PRUNE_EVERY);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let collector = collector.clone();
        let pruned = tokio::task::spawn_blocking(move || {
            let mut collector = collector.lock().unwrap_or_else(PoisonError::into_inner);
            let tenants = collector.tenants()?;
            let mut pruned = 0;
            for tenant in tenants {
                pruned += collector.prune(&tenant, retention_days)?;
            }
            Ok::<_, StoreError>(pruned)
        })
        .await;
        match pruned {
            Ok(Ok(0)) => {}
            Ok(Ok(days)) => tracing::info!(days, retention_days, "retention: pruned days"),
            Ok(Err(e)) => tracing::warn!(error = %e, "retention: pruning failed"),
            Err(e) => tracing::warn!(error = %e, "retention: pruning task failed"),
        }
    }
}
