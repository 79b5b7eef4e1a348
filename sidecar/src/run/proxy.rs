//! Wiring: from a [`ProxyConfig`] (standalone, file-based certificates) to running
//! listeners. The injected pod's wiring is [`super::cluster`]; both hand a [`Wiring`]
//! to [`serve`], which binds the inbound, admin and outbound listeners. Used by `run`,
//! `demo` and the integration tests (which bind port 0 and read the bound addresses
//! back).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use portcullis_crds::scope::ScopeMap;
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    admin,
    audit::{
        AuditHook, TracingAudit,
        sinks::{AuditSetupError, build_sinks, signer_for_tls_files, start_when_policy_loaded},
        trail::AuditTrail,
    },
    config::{
        AdminConfig, InboundConfig, KeySettings, Limits, OutboundConfig, PolicySource, ProxyConfig,
    },
    control::{
        identity::{CertificateStore, TrustDomain},
        policy_stream,
    },
    inbound::{
        Inbound, InboundSettings, accept, authn::KeyVerifier, authorize_peer::PeerRules,
        ratelimit::RateLimits, upstream::Upstream,
    },
    metrics::Metrics,
    outbound::{self, Outbound},
    policy::{PolicyStore, file},
    tls::{
        ClientAuth, ClientConfigSource, CredentialStore, ServerConfigs, TlsError, TlsSettings,
        files::{CertError, FileCredentials},
    },
};

/// How long the audit trail gets at least to write what is queued and deliver its spool
/// after the listeners drained; it also gets whatever of the listeners' drain budget
/// they did not use, so a pod deleted right after a collector outage ships its spool
/// within the kubelet's grace period (drain 25 s + 5 s = the default 30 s).
pub const AUDIT_DRAIN: Duration = Duration::from_secs(5);

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
        /// `inbound`, `admin` or `outbound`.
        what: &'static str,
        /// The address.
        address: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The audit trail could not be set up.
    #[error(transparent)]
    Audit(#[from] AuditSetupError),
    /// The mounted trust bundle is unusable.
    #[error(
        "PORTCULLIS_TRUST_BUNDLE {path}: {problem} (mount the portcullis-trust-bundle ConfigMap there)"
    )]
    TrustBundle {
        /// The file.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// The outbound listener cannot tell which trust domain its peers belong to.
    #[error(
        "outbound.trustDomain is required: tls.certificate carries no spiffe:// workload ID to take it from"
    )]
    OutboundTrustDomain,
}

/// A running proxy.
#[derive(Debug)]
pub struct RunningProxy {
    /// Where the inbound TLS listener is bound.
    pub inbound_addr: SocketAddr,
    /// Where the admin listener is bound.
    pub admin_addr: SocketAddr,
    /// Where the outbound listener is bound, when there is one.
    pub outbound_addr: Option<SocketAddr>,
    /// Metrics (shared with `/metrics`).
    pub metrics: Metrics,
    /// The policy in force.
    pub policy: PolicyStore,
    /// The file credentials in use (standalone).
    pub credentials: Option<FileCredentials>,
    /// The workload certificate store (injected pods).
    pub certificates: Option<CertificateStore>,
    /// The tamper-evident audit trail, when the proxy runs one.
    pub audit: Option<Arc<AuditTrail>>,
    drain: Duration,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl RunningProxy {
    /// The token that stops the proxy (cancel it for a graceful drain).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the proxy has drained after its shutdown token is cancelled, then
    /// lets the audit trail write what is queued and a final checkpoint.
    pub async fn wait(mut self) {
        // The inbound listener task finishes last, after its drain.
        self.shutdown.cancelled().await;
        let budget = tokio::time::Instant::now() + self.drain + AUDIT_DRAIN;
        let joined = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(self.drain + Duration::from_secs(5), joined)
            .await
            .is_err()
        {
            tracing::warn!("some tasks did not stop in time; aborting them");
            self.tasks.abort_all();
        }
        if let Some(trail) = &self.audit {
            let left = budget.saturating_duration_since(tokio::time::Instant::now());
            trail.shutdown(left.max(AUDIT_DRAIN)).await;
        }
    }
}

/// What a mode (standalone or injected pod) hands to [`serve`].
pub(crate) struct Wiring {
    pub inbound: InboundConfig,
    pub admin: AdminConfig,
    pub outbound: Option<(OutboundConfig, ClientConfigSource)>,
    pub limits: Limits,
    pub keys: KeySettings,
    pub scopes_map: Option<ScopeMap>,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub upstream: Upstream,
    pub server_configs: ServerConfigs,
    pub policy: PolicyStore,
    pub audit: Arc<dyn AuditHook>,
    pub trail: Option<Arc<AuditTrail>>,
    pub readiness: admin::Readiness,
    pub metrics: Metrics,
    pub shutdown: CancellationToken,
    pub tasks: JoinSet<()>,
    pub credentials: Option<FileCredentials>,
    pub certificates: Option<CertificateStore>,
}

async fn bind(
    what: &'static str,
    address: SocketAddr,
) -> Result<(TcpListener, SocketAddr), StartError> {
    let error = |source| StartError::Bind {
        what,
        address,
        source,
    };
    let listener = TcpListener::bind(address).await.map_err(error)?;
    let bound = listener.local_addr().map_err(error)?;
    Ok((listener, bound))
}

/// Binds the listeners of `wiring` and serves until its shutdown token is cancelled.
pub(crate) async fn serve(wiring: Wiring) -> Result<RunningProxy, StartError> {
    let Wiring {
        inbound,
        admin,
        outbound,
        limits,
        keys,
        scopes_map,
        trusted_proxies,
        upstream,
        server_configs,
        policy,
        audit,
        trail,
        readiness,
        metrics,
        shutdown,
        mut tasks,
        credentials,
        certificates,
    } = wiring;
    let handler = Arc::new(Inbound {
        settings: InboundSettings {
            mode: inbound.mode,
            peers_need_mapped_route: inbound.peers_need_mapped_route,
            peers: PeerRules {
                trust_domain: inbound.trust_domain.clone(),
                allowed_peers: inbound.allowed_peers.clone(),
            },
            scopes_override: scopes_map,
            trusted_proxies,
            request_timeout: limits.request_timeout,
            max_headers: limits.max_headers,
            max_request_body_bytes: limits.max_request_body_bytes,
        },
        policy: policy.clone(),
        keys: Arc::new(KeyVerifier::new(
            keys.bcrypt_workers,
            keys.bcrypt_wait,
            keys.cache_capacity,
            metrics.clone(),
        )),
        limits: RateLimits::default(),
        upstream,
        audit,
        metrics: metrics.clone(),
    });

    let (inbound_listener, inbound_addr) = bind("inbound", inbound.listen).await?;
    let (admin_listener, admin_addr) = bind("admin", admin.listen).await?;
    let outbound_addr = match outbound {
        None => None,
        Some((settings, tls_source)) => {
            let (listener, address) = bind("outbound", settings.listen).await?;
            let path = Arc::new(Outbound::new(settings, tls_source, metrics.clone()));
            tasks.spawn(outbound::serve(
                listener,
                path,
                limits.clone(),
                shutdown.clone(),
            ));
            Some(address)
        }
    };
    tasks.spawn(admin::serve(
        admin_listener,
        readiness,
        metrics.clone(),
        shutdown.clone(),
    ));
    let drain = limits.drain_timeout;
    tasks.spawn(accept::serve(
        inbound_listener,
        server_configs,
        handler,
        limits,
        metrics.clone(),
        shutdown.clone(),
    ));
    tracing::info!(%inbound_addr, %admin_addr, outbound_addr = ?outbound_addr, mode = inbound.mode.as_str(), "proxy listening");
    Ok(RunningProxy {
        inbound_addr,
        admin_addr,
        outbound_addr,
        metrics,
        policy,
        credentials,
        certificates,
        audit: trail,
        drain,
        shutdown,
        tasks,
    })
}

/// The trust domain of our own certificate's workload ID.
fn own_trust_domain(credentials: &FileCredentials) -> Option<TrustDomain> {
    credentials
        .leaf()
        .and_then(|leaf| crate::tls::peer::leaf_facts(&leaf).ok())
        .and_then(|facts| facts.workload)
        .map(|workload| workload.trust_domain().clone())
}

fn outbound_trust_domain(
    settings: &OutboundConfig,
    credentials: &FileCredentials,
) -> Result<TrustDomain, StartError> {
    settings
        .trust_domain
        .clone()
        .or_else(|| own_trust_domain(credentials))
        .ok_or(StartError::OutboundTrustDomain)
}

enum AuditChoice {
    Hook(Arc<dyn AuditHook>),
    FromConfig,
}

/// Starts the proxy described by `config`, auditing through `audit` (the `audit:`
/// section of the configuration is not used; see [`start_default`]).
pub async fn start(
    config: ProxyConfig,
    audit: Arc<dyn AuditHook>,
) -> Result<RunningProxy, StartError> {
    start_with(config, AuditChoice::Hook(audit)).await
}

/// Starts the proxy with the audit trail of its `audit:` section, or a tracing line per
/// request when it has none.
pub async fn start_default(config: ProxyConfig) -> Result<RunningProxy, StartError> {
    if config.audit.is_some() {
        start_with(config, AuditChoice::FromConfig).await
    } else {
        start_with(config, AuditChoice::Hook(Arc::new(TracingAudit))).await
    }
}

async fn start_with(config: ProxyConfig, audit: AuditChoice) -> Result<RunningProxy, StartError> {
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let credentials = FileCredentials::load(&config.tls)?;
    metrics.cert_reload("loaded", Some(credentials.not_after()));
    let peer_trust_domain = match &config.outbound {
        Some(settings) => Some(outbound_trust_domain(settings, &credentials)?),
        None => None,
    };
    // Standalone clients need only chain to the trust bundle; the inbound mode checks
    // their SPIFFE ID per request.
    let tls = CredentialStore::new(TlsSettings {
        client_auth: ClientAuth::Optional,
        client_trust_domain: None,
        peer_trust_domain,
        serving: None,
    })?;
    credentials.feed(&tls)?;

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
            tasks.spawn(policy_stream::follow(
                source.clone(),
                tls.operator_client(),
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

    let (hook, trail): (Arc<dyn AuditHook>, Option<Arc<AuditTrail>>) = match (audit, &config.audit)
    {
        (AuditChoice::FromConfig, Some(audit_config)) => {
            let sinks = build_sinks(audit_config)?;
            let signer = signer_for_tls_files(&config.tls)?;
            let trail = AuditTrail::new(audit_config.pod.clone());
            tasks.spawn(start_when_policy_loaded(
                trail.clone(),
                policy.clone(),
                signer,
                sinks,
                audit_config.checkpoint,
                shutdown.clone(),
            ));
            (trail.clone(), Some(trail))
        }
        (AuditChoice::FromConfig, None) => (Arc::new(TracingAudit), None),
        (AuditChoice::Hook(hook), _) => (hook, None),
    };

    let outbound = config
        .outbound
        .as_ref()
        .map(|settings| (settings.clone(), tls.peer_client()));
    let readiness = admin::Readiness {
        policy: policy.clone(),
        certificate: Arc::new(|| true), // file credentials are loaded before we get here
        audit: match &trail {
            Some(trail) => {
                let trail = trail.clone();
                Arc::new(move || trail.readiness())
            }
            None => Arc::new(|| crate::audit::AuditReadiness::Ready),
        },
        identity: {
            let credentials = credentials.clone();
            Arc::new(move || Some(credentials.chain_pem()))
        },
        app_health: Arc::default(),
        serving_certificate: None,
    };
    let mut inbound = config.inbound.clone();
    if inbound.trust_domain.is_none() {
        inbound.trust_domain = own_trust_domain(&credentials);
    }
    serve(Wiring {
        inbound,
        admin: config.admin.clone(),
        outbound,
        limits: config.limits.clone(),
        keys: config.keys.clone(),
        scopes_map: config.scopes_map.clone(),
        trusted_proxies: config.trusted_proxies.clone(),
        upstream: Upstream::new(&config.upstream),
        server_configs: tls.server_configs(),
        policy,
        audit: hook,
        trail,
        readiness,
        metrics,
        shutdown,
        tasks,
        credentials: Some(credentials),
        certificates: None,
    })
    .await
}
