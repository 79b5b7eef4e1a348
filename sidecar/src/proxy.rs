//! Wiring: from a [`ProxyConfig`] to running listeners. Used by `run`, `demo` and the
//! integration tests (which bind port 0 and read the bound addresses back).

use std::{net::SocketAddr, sync::Arc};

use tokio::{net::TcpListener, task::JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::{
    accept, admin,
    audit::{AuditHook, TracingAudit},
    authn::KeyVerifier,
    certs::{CertError, FileCredentials},
    config::{PolicySource, ProxyConfig},
    inbound::{Inbound, InboundSettings},
    metrics::Metrics,
    policy::{PolicyStore, file, stream},
    ratelimit::RateLimits,
    tls::{self, TlsError},
    upstream::Upstream,
};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Certificates could not be loaded.
    #[error(transparent)]
    Certificates(#[from] CertError),
    /// TLS could not be configured.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A listener could not be bound.
    #[error(
        "binding {what} on {address}: {source} (is another proxy running? change {what}.listen)"
    )]
    Bind {
        /// `inbound` or `admin`.
        what: &'static str,
        /// The address.
        address: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A running proxy.
#[derive(Debug)]
pub struct RunningProxy {
    /// Where the inbound TLS listener is bound.
    pub inbound_addr: SocketAddr,
    /// Where the admin listener is bound.
    pub admin_addr: SocketAddr,
    /// Metrics (shared with `/metrics`).
    pub metrics: Metrics,
    /// The policy in force.
    pub policy: PolicyStore,
    /// The file credentials in use.
    pub credentials: FileCredentials,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl RunningProxy {
    /// The token that stops the proxy (cancel it for a graceful drain).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the proxy has drained after its shutdown token is cancelled.
    pub async fn wait(mut self) {
        // The inbound listener task finishes last, after its drain.
        self.shutdown.cancelled().await;
        while self.tasks.join_next().await.is_some() {}
    }
}

async fn bind(what: &'static str, address: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| StartError::Bind {
            what,
            address,
            source,
        })
}

/// Starts the proxy described by `config`, auditing through `audit`.
pub async fn start(
    config: ProxyConfig,
    audit: Arc<dyn AuditHook>,
) -> Result<RunningProxy, StartError> {
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let credentials = FileCredentials::load(&config.tls)?;
    metrics.cert_reload("loaded", Some(credentials.not_after()));
    let server_config = tls::server_config(credentials.resolver(), credentials.client_verifier())?;
    let acceptor = TlsAcceptor::from(Arc::new(server_config));

    let policy = PolicyStore::new();
    let mut tasks = JoinSet::new();
    match &config.policy {
        PolicySource::File {
            path,
            poll_interval,
        } => {
            tasks.spawn(file::load_and_watch(
                path.clone(),
                *poll_interval,
                policy.clone(),
                metrics.clone(),
                shutdown.clone(),
            ));
        }
        PolicySource::Stream(source) => {
            tasks.spawn(stream::follow(
                source.clone(),
                credentials.client_config_source(),
                policy.clone(),
                metrics.clone(),
                shutdown.clone(),
            ));
        }
    }
    tasks.spawn(credentials.clone().watch(
        config.tls.reload_interval,
        metrics.clone(),
        shutdown.clone(),
    ));

    let inbound = Arc::new(Inbound {
        settings: InboundSettings {
            mode: config.inbound.mode,
            peers_need_mapped_route: config.inbound.peers_need_mapped_route,
            scopes_override: config.scopes_map.clone(),
            trusted_proxies: config.trusted_proxies.clone(),
            request_timeout: config.limits.request_timeout,
        },
        policy: policy.clone(),
        keys: Arc::new(KeyVerifier::new(
            config.keys.bcrypt_workers,
            config.keys.bcrypt_wait,
            config.keys.cache_capacity,
            metrics.clone(),
        )),
        limits: RateLimits::default(),
        upstream: Upstream::new(&config.upstream),
        audit,
        metrics: metrics.clone(),
    });

    let inbound_listener = bind("inbound", config.inbound.listen).await?;
    let admin_listener = bind("admin", config.admin.listen).await?;
    let inbound_addr = inbound_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            what: "inbound",
            address: config.inbound.listen,
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            what: "admin",
            address: config.admin.listen,
            source,
        })?;
    let readiness = admin::Readiness {
        policy: policy.clone(),
        certificate: Arc::new(|| true), // file credentials are loaded before we get here
    };
    tasks.spawn(admin::serve(
        admin_listener,
        readiness,
        metrics.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(accept::serve(
        inbound_listener,
        acceptor,
        inbound,
        config.limits.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    tracing::info!(%inbound_addr, %admin_addr, mode = config.inbound.mode.as_str(), "proxy listening");
    Ok(RunningProxy {
        inbound_addr,
        admin_addr,
        metrics,
        policy,
        credentials,
        shutdown,
        tasks,
    })
}

/// Starts the proxy with the default audit hook (a tracing line per request).
pub async fn start_default(config: ProxyConfig) -> Result<RunningProxy, StartError> {
    start(config, Arc::new(TracingAudit)).await
}
