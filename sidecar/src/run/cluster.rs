//! `run --config-from-env`: the proxy of an injected pod.
//!
//! Start-up order: read the mounted trust bundle (bootstrap roots); start the renew loop
//! that gets the workload certificate from the operator's identity service with the
//! projected token; serve inbound TLS from the certificate store (rotation needs no
//! restart); once a certificate is in, follow the tenant's policy stream over mTLS
//! (tenant from the certificate's `spiffe://<td>/tenant/<t>` SAN, else
//! `PORTCULLIS_TENANT`) and start the audit trail. `/ready` turns true with a
//! certificate, a first policy and the audit trail; if the operator goes away later the
//! last good policy stays in force. A Confidential or Restricted tenant's pod also waits
//! for the tenant's data key: until it arrives requests are refused and `/ready` says
//! `waiting_for_data_key`. With `PORTCULLIS_SERVING_CERT_DIR` clients outside the mesh
//! are shown that directory's certificate instead of the workload's
//! ([`crate::tls::server`]).

use std::{io::Write, path::PathBuf, sync::Arc};

use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, pem::PemObject},
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::proxy::{self, RunningProxy, StartError, Wiring};
use crate::{
    admin::{self, app_health::AppHealth},
    audit::{
        cluster::{self as cluster_audit, ClusterAuditParts},
        trail::AuditTrail,
    },
    config::{StreamSource, env::ClusterConfig},
    control::{
        app_exit,
        identity::{CertificateStore, IdentityClient, Renewer, SystemClock},
        policy_stream,
    },
    inbound::upstream::Upstream,
    metrics::Metrics,
    policy::PolicyStore,
    tls::{
        self, ClientAuth, ClientConfigSource, CredentialStore, TlsError, TlsSettings,
        serving_certificate::ServingCertificate,
    },
};

/// The mounted trust bundle: read at start (the proxy cannot start without it) and
/// again whenever a client config is built, so a rotated ConfigMap is followed.
#[derive(Clone, Debug)]
struct TrustBundleFile {
    path: PathBuf,
    at_start: Vec<CertificateDer<'static>>,
}

fn parse_bundle(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem).flatten().collect()
}

impl TrustBundleFile {
    fn load(path: PathBuf) -> Result<Self, StartError> {
        let problem = |problem: String| StartError::TrustBundle {
            path: path.display().to_string(),
            problem,
        };
        let pem = std::fs::read(&path).map_err(|e| problem(e.to_string()))?;
        let at_start = parse_bundle(&pem);
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(at_start.iter().cloned());
        if added == 0 {
            return Err(problem("holds no usable PEM CA certificate".into()));
        }
        Ok(Self { path, at_start })
    }

    fn current(&self) -> Vec<CertificateDer<'static>> {
        std::fs::read(&self.path)
            .ok()
            .map(|pem| parse_bundle(&pem))
            .filter(|certs| !certs.is_empty())
            .unwrap_or_else(|| self.at_start.clone())
    }
}

/// mTLS to the operator's policy server: our workload certificate, the operator's
/// serving certificate checked by name against the mounted bundle plus the bundle
/// that came with our certificate.
fn operator_tls(store: &CertificateStore, bundle: &TrustBundleFile) -> ClientConfigSource {
    let store = store.clone();
    let bundle = bundle.clone();
    Arc::new(move || {
        let Some(credentials) = store.load() else {
            return Err(TlsError::NoIdentity);
        };
        let mut roots = RootCertStore::empty();
        let _ = roots.add_parsable_certificates(
            bundle
                .current()
                .into_iter()
                .chain(credentials.trust_bundle().iter().cloned()),
        );
        Ok(Arc::new(tls::client::operator_config(
            credentials.certified_key().clone(),
            Arc::new(roots),
        )?))
    })
}

/// The tenant whose policy to follow: the certificate's tenant SAN, else the configured
/// one.
fn tenant_of(store: &CertificateStore, configured: Option<&str>) -> Option<String> {
    let from_certificate = store
        .load()
        .and_then(|c| c.tenant().map(|t| t.tenant().to_owned()));
    match (from_certificate, configured) {
        (Some(cert), Some(conf)) if cert != conf => {
            tracing::warn!(
                certificate = %cert,
                configured = %conf,
                "PORTCULLIS_TENANT differs from the certificate's tenant; following the certificate's"
            );
            Some(cert)
        }
        (Some(cert), _) => Some(cert),
        (None, conf) => conf.map(str::to_owned),
    }
}

/// Waits for a certificate, then follows the tenant's policy stream until `shutdown`.
async fn follow_policy(
    config: Arc<ClusterConfig>,
    store: CertificateStore,
    tls: ClientConfigSource,
    policy: PolicyStore,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut certificates = store.subscribe();
    let tenant = loop {
        if store.is_ready() {
            match tenant_of(&store, config.tenant.as_deref()) {
                Some(tenant) => break tenant,
                None => tracing::error!(
                    "the workload certificate names no tenant and PORTCULLIS_TENANT is not set; no policy can be followed until one does"
                ),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = certificates.changed() => if changed.is_err() { return },
        }
    };
    tracing::info!(%tenant, operator = %config.policy.host, "following the tenant's policy");
    let source = StreamSource {
        host: config.policy.host.clone(),
        port: config.policy.port,
        tenant,
        min_backoff: config.policy_min_backoff,
        max_backoff: config.policy_max_backoff,
    };
    policy_stream::follow(source, tls, policy, metrics, shutdown).await;
}

/// Counts and logs certificate changes.
async fn watch_certificates(
    store: CertificateStore,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut changes = store.subscribe();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
        if let Some(credentials) = store.load() {
            metrics.cert_update(
                "identity",
                "issued",
                Some(credentials.not_after().as_second()),
            );
        }
    }
}

/// Hands the renewer the policy's revision of this namespace's Services, so the
/// certificate's DNS names follow the Services that select the pod.
async fn follow_service_revision(
    policy: PolicyStore,
    namespace: String,
    wanted: tokio::sync::watch::Sender<Option<String>>,
    shutdown: CancellationToken,
) {
    let mut changes = policy.subscribe();
    loop {
        let revision = policy
            .load()
            .and_then(|p| p.service_revisions.get(&namespace).cloned());
        wanted.send_if_modified(|current| {
            let changed = *current != revision;
            *current = revision;
            changed
        });
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
    }
}

/// Starts the proxy of an injected pod; audit JSON lines go to `audit_stdout` (the
/// process's stdout in a pod).
pub async fn start(
    config: ClusterConfig,
    audit_stdout: Box<dyn Write + Send>,
) -> Result<RunningProxy, StartError> {
    let config = Arc::new(config);
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();

    let bundle = TrustBundleFile::load(config.trust_bundle.clone())?;
    let store = CertificateStore::new();
    let (names_wanted, names_trigger) = tokio::sync::watch::channel(None);
    let renewer = Renewer::new(
        IdentityClient::new(config.identity.clone(), config.token_path.clone()),
        store.clone(),
        config.workload.clone(),
        bundle.at_start.clone(),
        Arc::new(SystemClock),
        config.renewal,
    )
    .with_names_trigger(names_trigger);
    tracing::info!(workload = %config.workload, "requesting the workload certificate");
    tasks.spawn(renewer.run(shutdown.clone()));
    tasks.spawn(watch_certificates(
        store.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let serving = config.serving_cert_dir.clone().map(ServingCertificate::new);
    if let Some(serving) = &serving {
        tracing::info!(dir = ?config.serving_cert_dir, "serving clients outside the mesh the certificate in PORTCULLIS_SERVING_CERT_DIR when it is valid");
        tasks.spawn(serving.clone().watch(
            config.serving_cert_poll,
            metrics.clone(),
            shutdown.clone(),
        ));
    }
    // Clients and peers must be workloads of our trust domain; whether a client
    // certificate is needed at all is the inbound mode's call, per request.
    let trust_domain = config.workload.trust_domain().clone();
    let credentials = CredentialStore::new(TlsSettings {
        client_auth: ClientAuth::Optional,
        client_trust_domain: Some(trust_domain.clone()),
        peer_trust_domain: Some(trust_domain),
        serving: serving.clone(),
    })?;
    store.feed(&credentials)?;

    let policy = PolicyStore::new();
    tasks.spawn(follow_service_revision(
        policy.clone(),
        config.workload.namespace().to_owned(),
        names_wanted,
        shutdown.clone(),
    ));
    let operator = operator_tls(&store, &bundle);
    tasks.spawn(follow_policy(
        config.clone(),
        store.clone(),
        operator.clone(),
        policy.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));

    let trail = AuditTrail::new(config.pod_name.clone());
    tasks.spawn(cluster_audit::run(
        ClusterAuditParts {
            trail: trail.clone(),
            store: store.clone(),
            policy: policy.clone(),
            operator: config.policy.clone(),
            tls: operator.clone(),
            data_dir: config.data_dir.clone(),
            settings: config.audit.clone(),
            stdout: audit_stdout,
            metrics: metrics.clone(),
        },
        shutdown.clone(),
    ));

    if config.exit_when_app_exits.is_some() {
        tasks.spawn(app_exit::follow_operator(
            app_exit::OperatorSignal {
                endpoint: config.policy.clone(),
                tls: operator.clone(),
                store: store.clone(),
                namespace: config.workload.namespace().to_owned(),
                pod: config.pod_name.clone(),
            },
            shutdown.clone(),
        ));
    }
    if let (Some(grace), Some(port)) = (config.exit_when_app_exits, config.app_port) {
        tasks.spawn(app_exit::watch(
            port,
            config.app_probe_interval,
            grace,
            shutdown.clone(),
        ));
    }
    let upstream = match config.app_port {
        Some(port) => Upstream::new(&config.upstream(port)),
        None => {
            tracing::warn!(
                "PORTCULLIS_APP_PORT is not set: the pod declares no port, so inbound requests are answered 502"
            );
            Upstream::without_app()
        }
    };

    let readiness = admin::Readiness {
        policy: policy.clone(),
        certificate: {
            let store = store.clone();
            Arc::new(move || store.is_ready())
        },
        audit: {
            let trail = trail.clone();
            Arc::new(move || trail.readiness())
        },
        identity: {
            let store = store.clone();
            Arc::new(move || store.load().map(|c| c.chain_pem()))
        },
        app_health: Arc::new(AppHealth::new(config.app_probes.clone())),
        serving_certificate: serving,
    };
    proxy::serve(Wiring {
        inbound: config.inbound.clone(),
        admin: config.admin.clone(),
        outbound: Some((config.outbound.clone(), credentials.peer_client())),
        limits: config.limits.clone(),
        keys: config.keys.clone(),
        scopes_map: config.scopes_map.clone(),
        trusted_proxies: Vec::new(),
        upstream,
        server_configs: credentials.server_configs(),
        policy,
        audit: trail.clone(),
        trail: Some(trail),
        readiness,
        metrics,
        shutdown,
        tasks,
        credentials: None,
        certificates: Some(store),
    })
    .await
}
