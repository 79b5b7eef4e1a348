//! `portcullis-operator run`: everything one replica does, startable in-process (tests
//! run two replicas side by side).
//!
//! Every replica loads the KEK and the CA, keeps the caches, compiles policy and
//! serves: the identity service (`identity_addr`, 8443), the policy server over mTLS
//! (`policy_addr`, 8090), the admission webhooks (`webhooks.addr`, 9443) and the admin
//! endpoint (`metrics_addr`, 8080). Only the leader (Lease `portcullis-operator`) runs
//! the controllers, rotates the CA and publishes the trust bundle into tenant
//! namespaces; every replica re-reads the CA Secrets so it adopts a rotation. On
//! shutdown the controllers finish what is in flight and the Lease is released so
//! another replica takes over at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use portcullis_api::spiffe::{TenantId, TrustDomain, WorkloadId};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::audit_witness::{AuditWitness, WitnessSettings};
use crate::ca::audit_secret::AuditTlsSecret;
use crate::ca::{
    CaError, CaSettings, CertificateAuthority, IdentityService, IdentityServiceConfig,
    KubeAuthenticator, KubeLeafLedger, service_names,
};
use crate::clock::Clock;
use crate::context::{Context, ReconcileSettings};
use crate::envelope::{self, Kek};
use crate::error::{Error, Result};
use crate::identity::{self, CaRuntime};
use crate::kek_rotation::{KekRotation, KekRotationSettings};
use crate::leader::{LeaderElector, LeaseSettings};
use crate::metrics::Metrics;
use crate::policy::app_exit::AppExits;
use crate::policy::server::{Access, PolicyApi};
use crate::policy::server_audit_key::AuditKeys;
use crate::policy::server_tls::PolicyServerTls;
use crate::policy::{self, PolicyHub, RevocationCaches};
use crate::stores::Stores;
use crate::trust_bundle::TrustBundlePublisher;
use crate::webhook::config::{WebhookConfigSettings, WebhookTarget};
use crate::webhook::{
    self, AdminIdentity, AdminShipping, ChainedAdminAudit, InjectSettings, ValidatorSettings,
    WebhookError, WebhookSettings, WebhookTlsSettings,
};

/// Default Lease name.
pub const LEASE_NAME: &str = "portcullis-operator";

/// Default Service (and ServiceAccount) name of the operator: the chart's full name.
pub const SERVICE_NAME: &str = "portcullis-operator";
/// Default proxy image the injector adds.
pub const PROXY_IMAGE: &str = concat!(
    "ghcr.io/portcullis-dev/portcullis-proxy:",
    env!("CARGO_PKG_VERSION")
);

/// Why a replica could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// KEK, caches, listeners.
    #[error(transparent)]
    Operator(#[from] Error),
    /// The CA (Secrets, settings) or a serving certificate.
    #[error("certificate authority: {0}")]
    Ca(#[from] CaError),
    /// The admission webhooks (certificates, configurations).
    #[error("admission webhooks: {0}")]
    Webhook(#[from] WebhookError),
    /// The settings do not fit together.
    #[error("settings: {0}")]
    Settings(String),
    /// The admin audit chain.
    #[error(transparent)]
    AdminAudit(#[from] crate::webhook::AdminAuditError),
}

/// The admission webhooks of a replica.
#[derive(Clone, Debug)]
pub struct WebhookRunSettings {
    /// Listen address (0.0.0.0:9443).
    pub addr: SocketAddr,
    /// `None`: the Helm chart owns the webhook configurations (clientConfig.service:
    /// the operator's Service) and the operator only patches their caBundle. `Some(url)`,
    /// e.g. `https://127.0.0.1:9443` for an operator outside the cluster: the operator
    /// applies both configurations itself with clientConfig.url `<url>/inject` and
    /// `<url>/validate`. A URL with port 0 gets the port actually bound.
    pub url: Option<String>,
    /// What injection adds. Its `operator_namespace` and `trust_domain` are taken from
    /// the operator's settings; `identity_url`/`policy_url` with port 0 get the ports
    /// actually bound.
    pub inject: InjectSettings,
    /// Name of the MutatingWebhookConfiguration (`portcullis-injector`).
    pub mutating_configuration: String,
    /// Name of the ValidatingWebhookConfiguration (`portcullis-validator`).
    pub validating_configuration: String,
    /// The ServiceAccount the operator runs as (exempt from the escalation check).
    pub service_account: String,
}

impl WebhookRunSettings {
    /// Defaults for Service `service` in `namespace`.
    pub fn new(namespace: &str, service: &str) -> Self {
        Self {
            addr: SocketAddr::from(([0, 0, 0, 0], portcullis_api::injection::WEBHOOK_PORT)),
            url: None,
            inject: InjectSettings::new(PROXY_IMAGE, namespace, service),
            mutating_configuration: webhook::config::MUTATING_CONFIGURATION.into(),
            validating_configuration: webhook::config::VALIDATING_CONFIGURATION.into(),
            service_account: service.into(),
        }
    }
}

/// Everything `run` is configured with (the CLI fills it from flags and environment).
#[derive(Clone)]
pub struct OperatorSettings {
    /// Reconcile settings (operator namespace, overlap, hash cost, backoff).
    pub reconcile: ReconcileSettings,
    /// Admin endpoint address.
    pub metrics_addr: SocketAddr,
    /// Policy server address.
    pub policy_addr: SocketAddr,
    /// Serve the policy server over plain HTTP to anyone, without the tenant check and
    /// without audit keys (debugging only; `--policy-insecure-debug`). Off: mTLS,
    /// client certificate required, tenant checked.
    pub policy_insecure_debug: bool,
    /// Identity service address.
    pub identity_addr: SocketAddr,
    /// The operator's Service: serving certificates name `<service>.<ns>.svc` and
    /// `<service>.<ns>.svc.cluster.local`.
    pub service_name: String,
    /// More names (DNS names or IP addresses) in the identity, policy and webhook
    /// serving certificates.
    pub extra_sans: Vec<String>,
    /// The Kubernetes cluster domain in workload certificates' long Service names
    /// (`<service>.<ns>.svc.<cluster domain>`).
    pub cluster_domain: String,
    /// Trust domain and rotation schedule of the CA.
    pub ca: CaSettings,
    /// How often CA rotation is checked and the CA Secrets re-read (60 s).
    pub ca_check_interval: Duration,
    /// The admission webhooks; `None` disables them (`--no-webhooks`).
    pub webhooks: Option<WebhookRunSettings>,
    /// Run the controllers only while holding the Lease.
    pub leader_election: bool,
    /// Lease name and timing; `identity` names this replica.
    pub lease: LeaseSettings,
    /// An existing Secret holding the KEK; `None`: `portcullis-kek`, created if absent.
    pub kek_secret: Option<String>,
    /// The KEK is a key in a PKCS#11 token (`--kek-provider pkcs11`); `kek_secret` is
    /// then unused. The operator refuses to start when the key is not usable.
    pub kek_pkcs11: Option<envelope::Pkcs11Config>,
    /// The KEK is stored encrypted by a KMS v2 plugin (`--kek-provider kms`). The start
    /// waits for the plugin (with `kms_backoff`) and loads nothing else before the KEK.
    pub kek_kms: Option<envelope::KmsConfig>,
    /// How long to wait between attempts while the KMS plugin is down at start.
    pub kms_backoff: envelope::kms::Backoff,
    /// How often the running operator polls the KMS plugin's `Status` (60 s).
    pub kms_status_interval: Duration,
    /// KEK rotation: schedule, reload and propagation
    /// (`--kek-rotation-period`). The Secret and webhook CA names are filled in at start.
    pub kek_rotation: KekRotationSettings,
    /// Refuse a Tenant becoming Restricted while the KEK is not hardware-backed (else
    /// it is admitted with a warning).
    pub restricted_requires_hardware_kek: bool,
    /// The audit service's Service name: its serving certificate is kept in the Secret
    /// `<name>-tls` ([`crate::ca::audit_secret`]), with which the collector also reads
    /// every tenant's audit keys from the policy server; `None`: no audit service.
    pub audit_service: Option<String>,
    /// Witness the audit collector's seals into each Tenant's status; `None`: no
    /// collector to witness.
    pub audit_witness: Option<WitnessSettings>,
}

impl std::fmt::Debug for OperatorSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorSettings")
            .field("reconcile", &self.reconcile)
            .field("metrics_addr", &self.metrics_addr)
            .field("policy_addr", &self.policy_addr)
            .field("policy_insecure_debug", &self.policy_insecure_debug)
            .field("identity_addr", &self.identity_addr)
            .field("service_name", &self.service_name)
            .field("extra_sans", &self.extra_sans)
            .field("cluster_domain", &self.cluster_domain)
            .field("ca", &self.ca)
            .field("ca_check_interval", &self.ca_check_interval)
            .field("webhooks", &self.webhooks)
            .field("leader_election", &self.leader_election)
            .field("lease", &self.lease)
            .field("kek_secret", &self.kek_secret)
            .field("kek_pkcs11", &self.kek_pkcs11)
            .field("kek_kms", &self.kek_kms)
            .field("kms_backoff", &self.kms_backoff)
            .field("kms_status_interval", &self.kms_status_interval)
            .field("kek_rotation", &self.kek_rotation)
            .field(
                "restricted_requires_hardware_kek",
                &self.restricted_requires_hardware_kek,
            )
            .field("audit_service", &self.audit_service)
            .field("audit_witness", &self.audit_witness)
            .finish()
    }
}

impl OperatorSettings {
    /// Defaults for namespace `namespace` and replica `identity`.
    pub fn new(namespace: &str, identity: &str) -> Self {
        let trust_domain = TrustDomain::new(webhook::inject::DEFAULT_TRUST_DOMAIN)
            .unwrap_or_else(|_| unreachable!("cluster.local is a valid trust domain"));
        Self {
            reconcile: ReconcileSettings::new(namespace),
            metrics_addr: SocketAddr::from(([0, 0, 0, 0], 8080)),
            policy_addr: SocketAddr::from(([0, 0, 0, 0], portcullis_api::injection::POLICY_PORT)),
            policy_insecure_debug: false,
            identity_addr: SocketAddr::from((
                [0, 0, 0, 0],
                portcullis_api::injection::IDENTITY_PORT,
            )),
            service_name: SERVICE_NAME.into(),
            extra_sans: Vec::new(),
            cluster_domain: crate::ca::service_names::DEFAULT_CLUSTER_DOMAIN.to_owned(),
            ca: CaSettings::new(trust_domain),
            ca_check_interval: Duration::from_secs(60),
            webhooks: Some(WebhookRunSettings::new(namespace, SERVICE_NAME)),
            leader_election: true,
            lease: LeaseSettings::new(LEASE_NAME, namespace, identity),
            kek_secret: None,
            kek_pkcs11: None,
            kek_kms: None,
            kms_backoff: envelope::kms::Backoff::default(),
            kms_status_interval: Duration::from_secs(60),
            kek_rotation: KekRotationSettings::new(envelope::KEK_SECRET_NAME),
            restricted_requires_hardware_kek: false,
            audit_service: None,
            audit_witness: None,
        }
    }

    /// The names in every serving certificate.
    pub fn serving_names(&self) -> Vec<String> {
        service_names(
            &self.service_name,
            &self.reconcile.namespace,
            &self.cluster_domain,
            &self.extra_sans,
        )
    }
}

/// A running replica.
pub struct RunningOperator {
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    /// Where the admin endpoint listens.
    pub metrics_addr: SocketAddr,
    /// Where the policy server listens.
    pub policy_addr: SocketAddr,
    /// Where the identity service listens.
    pub identity_addr: SocketAddr,
    /// Where the admission webhooks listen (when enabled).
    pub webhook_addr: Option<SocketAddr>,
    /// The CA.
    pub ca: Arc<crate::ca::CertificateAuthority>,
    /// The bundles served.
    pub hub: Arc<PolicyHub>,
    /// The controllers' context.
    pub context: Arc<Context>,
    leading: Arc<AtomicBool>,
}

impl std::fmt::Debug for RunningOperator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningOperator")
            .field("metrics_addr", &self.metrics_addr)
            .field("policy_addr", &self.policy_addr)
            .field("identity_addr", &self.identity_addr)
            .field("webhook_addr", &self.webhook_addr)
            .field("leading", &self.is_leader())
            .finish_non_exhaustive()
    }
}

impl RunningOperator {
    /// Whether this replica is running the controllers.
    pub fn is_leader(&self) -> bool {
        self.leading.load(Ordering::Relaxed)
    }

    /// A token that stops the replica when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops gracefully: controllers finish in-flight reconciles, the Lease is released,
    /// servers drain. Returns when everything has stopped, or after [`FORCE_AFTER`] with
    /// whatever still runs aborted.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let stopped = tokio::time::timeout(FORCE_AFTER, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        // Bounded like the process's own shutdown: a task that does not stop is aborted,
        // and said so, rather than holding its caller forever.
        if stopped.is_err() {
            tracing::warn!(
                tasks = self.tasks.len(),
                "operator tasks still running {FORCE_AFTER:?} after shutdown: aborted"
            );
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
    }

    /// Waits until the replica stops (after [`RunningOperator::shutdown_token`] fires).
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Loads the KEK: from `secret` when given (it must exist), else from
/// `portcullis-kek`, created on first start.
pub async fn load_kek(client: &Client, namespace: &str, secret: Option<&str>) -> Result<Kek> {
    match secret {
        None => envelope::load_or_create_kek(client.clone(), namespace)
            .await
            .map_err(|e| Error::Kek(e.to_string())),
        Some(name) => {
            let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
            let secret = api.get_opt(name).await?.ok_or_else(|| {
                Error::Kek(format!(
                    "Secret {namespace}/{name} given by --kek-secret does not exist"
                ))
            })?;
            Kek::from_secret_data(&secret.data.unwrap_or_default())
                .map_err(|e| Error::Kek(format!("Secret {namespace}/{name}: {e}")))
        }
    }
}

/// Opens the KEK in the PKCS#11 token `config` names (blocking on the HSM off the
/// runtime's threads). The key `--pkcs11-key-label` names is opened first, before any
/// API call, so a wrong module, token, PIN or key fails with the cause and its fix and
/// nothing written. Then the labels recorded in `portcullis-kek` (recorded on the first
/// start) say which keys are current, staged and previous: a start mid-rotation opens
/// them all and loses nothing.
pub async fn open_pkcs11_kek(
    client: &Client,
    namespace: &str,
    config: envelope::Pkcs11Config,
) -> Result<Kek> {
    let failed = |e: envelope::Pkcs11Error| Error::Kek(format!("PKCS#11: {e}"));
    let open = config.clone();
    let configured = tokio::task::spawn_blocking(move || envelope::Pkcs11Kek::open(&open))
        .await
        .map_err(|e| Error::Task(format!("opening the PKCS#11 KEK: {e}")))?
        .map(Kek::from)
        .map_err(failed)?;
    let labels = envelope::pkcs11::labels::load_or_record_labels(
        client.clone(),
        namespace,
        &config.key_label,
    )
    .await
    .map_err(failed)?;
    let secret = format!("{namespace}/{}", envelope::KEK_SECRET_NAME);
    tokio::task::spawn_blocking(move || {
        envelope::pkcs11::labels::open_keyring(&config, &labels, &configured, &secret)
    })
    .await
    .map_err(|e| Error::Task(format!("opening the PKCS#11 KEK: {e}")))?
    .map_err(failed)
}

/// Waits for the KMS plugin (retrying while it is down, with `backoff`), then loads
/// or creates the KEK through it. A plugin that refuses, or a Secret it cannot decrypt,
/// fails at once.
pub async fn open_kms_kek(
    client: &Client,
    namespace: &str,
    kms: &envelope::KmsClient,
    backoff: envelope::kms::Backoff,
) -> Result<Kek> {
    let current = envelope::kms::open_kms_kek(client, namespace, kms, backoff)
        .await
        .map(Kek::from)
        .map_err(|e| Error::Kek(format!("KMS: {e}")))?;
    // Mid-rotation, staged and previous keys are needed too: what is still wrapped
    // under them must open from the start.
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get_opt(envelope::KEK_SECRET_NAME)
        .await
        .map_err(|e| Error::Kek(format!("KMS: {e}")))?;
    let Some(data) = secret.and_then(|s| s.data) else {
        return Ok(current);
    };
    envelope::kms::open_keyring(
        kms,
        &data,
        &format!("{namespace}/{}", envelope::KEK_SECRET_NAME),
        Some(&current),
    )
    .await
    .map_err(|e| Error::Kek(format!("KMS: {e}")))
}

async fn bind(addr: SocketAddr, what: &str) -> Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await.map_err(|source| Error::Io {
        context: format!("binding the {what} on {addr}"),
        source,
    })?;
    let local = listener.local_addr().map_err(|source| Error::Io {
        context: format!("reading the {what} address"),
        source,
    })?;
    Ok((listener, local))
}

/// `url` with its port replaced by `port` when it says port 0 (in-process tests bind
/// port 0 and learn the port only then); otherwise unchanged.
pub fn with_bound_port(url: &str, port: u16) -> String {
    match url.parse::<http::Uri>() {
        Ok(uri) if uri.port_u16() == Some(0) => {
            let host = uri.host().unwrap_or_default();
            let scheme = uri.scheme_str().unwrap_or("https");
            let path = uri.path_and_query().map_or("", |p| p.as_str());
            let path = if path == "/" && !url.ends_with('/') {
                ""
            } else {
                path
            };
            format!("{scheme}://{host}:{port}{path}")
        }
        _ => url.to_owned(),
    }
}

/// Starts a replica. Returns once the KEK and the CA are loaded, the listeners are
/// bound and the webhook certificates and configurations are in place.
pub async fn start(
    client: Client,
    settings: OperatorSettings,
) -> std::result::Result<RunningOperator, StartError> {
    let namespace = settings.reconcile.namespace.clone();
    settings.ca.validate()?;
    // First, before anything is written: a KEK that cannot be used stops the start here.
    let kms = settings.kek_kms.clone().map(envelope::KmsClient::new);
    let kek = match (&settings.kek_pkcs11, &kms) {
        (Some(config), _) => open_pkcs11_kek(&client, &namespace, config.clone()).await?,
        (None, Some(kms)) => open_kms_kek(&client, &namespace, kms, settings.kms_backoff).await?,
        (None, None) => load_kek(&client, &namespace, settings.kek_secret.as_deref()).await?,
    };
    let kek = Arc::new(kek);
    tracing::info!(kek = %kek.id(), provider = %kek.provider(), kms_key_id = kek.kms_key_id().as_deref(), namespace = %namespace, "key-encryption key loaded");
    let (metrics_listener, metrics_addr) = bind(settings.metrics_addr, "metrics endpoint").await?;
    let (policy_listener, policy_addr) = bind(settings.policy_addr, "policy server").await?;
    // Reserved now (its port goes into the webhook URL), listening once ready.
    let webhook_socket = match &settings.webhooks {
        Some(w) => {
            let socket = webhook::reserve(w.addr)?;
            let addr = socket.local_addr().map_err(|source| Error::Io {
                context: format!("reading the webhook server address ({})", w.addr),
                source,
            })?;
            Some((socket, addr))
        }
        None => None,
    };

    let (_, ca) = identity::load(&client, &namespace, &kek, &settings.ca).await?;
    tracing::info!(
        trust_domain = %settings.ca.trust_domain,
        root = ca.with_state(|s| s.active_root().fingerprint().to_owned()),
        "certificate authority loaded"
    );
    let names = settings.serving_names();
    let metrics = Arc::new(Metrics::default());
    let identity_service = Arc::new(
        IdentityService::new(
            ca.clone(),
            Arc::new(KubeAuthenticator::new(client.clone())),
            metrics.identity.clone(),
        )
        .with_ledger(Arc::new(KubeLeafLedger::new(client.clone(), &namespace)))
        .with_cluster_domain(settings.cluster_domain.clone()),
    );
    let identity_service = identity_service
        .bind(IdentityServiceConfig {
            listen: settings.identity_addr,
            server_names: names.clone(),
            ..IdentityServiceConfig::default()
        })
        .await?;
    let identity_addr = identity_service.local_addr();
    let policy_tls = if settings.policy_insecure_debug {
        tracing::warn!(%policy_addr, "policy server on plain HTTP without the tenant check (--policy-insecure-debug): for debugging only");
        None
    } else {
        Some(PolicyServerTls::new(&ca, &names)?)
    };

    let shutdown = CancellationToken::new();
    let changed = Arc::new(Notify::new());
    let mut tasks = JoinSet::new();
    // The KEK is in memory now; the plugin's health and key id are watched, not needed.
    let rotation_kms = kms.clone();
    if let (Some(kms), Some(recorded)) = (kms, kek.kms_key_id()) {
        let monitor = envelope::kms::health::HealthMonitor::new(kms, recorded, &metrics.kms)
            .following((*kek).clone());
        tasks.spawn(monitor.run(settings.kms_status_interval, shutdown.clone()));
    }
    let (mut stores, reflectors) = Stores::start(&client, changed.clone(), &shutdown);
    for reflector in reflectors {
        tasks.spawn(async move {
            let _ = reflector.await;
        });
    }
    // One cache event wakes both the policy compiler and the trust-bundle publisher
    // (a Notify wakes one waiter).
    let policy_changed = Arc::new(Notify::new());
    let tenants_changed = Arc::new(Notify::new());
    {
        let (policy_changed, tenants_changed) = (policy_changed.clone(), tenants_changed.clone());
        let token = shutdown.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    () = changed.notified() => {}
                    () = token.cancelled() => return,
                }
                policy_changed.notify_one();
                tenants_changed.notify_one();
            }
        });
    }
    // Ledger and pod events concern the policy compiler only.
    let (revocations, revocation_reflectors) =
        RevocationCaches::start(&client, &namespace, policy_changed.clone(), &shutdown);
    for reflector in revocation_reflectors {
        tasks.spawn(async move {
            let _ = reflector.await;
        });
    }
    let hub = Arc::new(PolicyHub::default());
    let clock = Clock::System;
    let ready = Arc::new(AtomicBool::new(false));
    stores.revocations = Some(revocations);
    // Service selectors, so each bundle tells its proxies when their names changed.
    let (services, service_writer) = kube::runtime::reflector::store();
    let service_reflector = crate::stores::reflect(
        kube::Api::<k8s_openapi::api::core::v1::Service>::all(client.clone()),
        service_writer,
        policy_changed.clone(),
        shutdown.clone(),
    );
    tasks.spawn(async move {
        let _ = service_reflector.await;
    });
    stores.services = Some(services);
    tasks.spawn(policy::run(
        stores.clone(),
        hub.clone(),
        policy_changed,
        metrics.clone(),
        clock.clone(),
        ready.clone(),
        shutdown.clone(),
    ));
    let api = PolicyApi {
        hub: hub.clone(),
        access: if policy_tls.is_some() {
            Access::TenantCertificate(settings.ca.trust_domain.clone())
        } else {
            Access::Open
        },
        // Key material never goes out over plain HTTP.
        audit_keys: policy_tls.is_some().then(|| {
            AuditKeys::new(
                client.clone(),
                &namespace,
                kek.clone(),
                Some(stores.tenants.clone()),
            )
        }),
        // The audit collector reads every tenant's DEKs with its Service certificate.
        audit_collector: settings
            .audit_service
            .as_deref()
            .map(|service| crate::ca::audit_secret::collector_name(service, &namespace)),
        app_exits: {
            let (exits, cache) = AppExits::start(&client, &shutdown);
            tasks.spawn(async move {
                let _ = cache.await;
            });
            Some(exits)
        },
    };
    let policy_config = policy_tls.as_ref().map(|t| t.config.clone());
    if let Some(policy_tls) = policy_tls {
        tasks.spawn(policy_tls.keep_fresh(ca.clone(), shutdown.clone()));
    }
    tasks.spawn(policy::server::serve_api(
        policy_listener,
        api,
        policy_config,
        shutdown.clone(),
    ));
    {
        let token = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = identity_service.serve(token).await {
                tracing::error!(error = %e, "identity service stopped");
            }
        });
    }
    let ca_runtime = CaRuntime {
        client: client.clone(),
        namespace: namespace.clone(),
        kek: kek.clone(),
        ca: ca.clone(),
        check_interval: settings.ca_check_interval,
    };

    let mut reconcile = settings.reconcile.clone();
    reconcile.inject.operator_namespace.clone_from(&namespace);
    reconcile.inject.trust_domain = settings.ca.trust_domain.to_string();
    let webhook_addr = match (settings.webhooks.clone(), webhook_socket) {
        (Some(webhooks), Some((socket, addr))) => {
            let account = webhooks.service_account.clone();
            let collector_url = webhooks.inject.audit_collector_url.clone();
            let webhook_settings =
                webhook_settings(&settings, webhooks, addr, identity_addr, policy_addr);
            // The Tenant controller judges pods by what this webhook injects.
            reconcile.inject = webhook_settings.inject.clone();
            let admin_audit = Arc::new(admin_audit(
                &settings,
                &account,
                collector_url,
                &namespace,
                &ca,
            )?);
            let serve = webhook::start(
                client.clone(),
                socket,
                webhook_settings,
                kek.clone(),
                admin_audit.clone(),
                Some(&stores),
                shutdown.clone(),
            )
            .await?;
            tasks.spawn(async move {
                if let Err(e) = serve.await {
                    tracing::error!(error = %e, "webhook server stopped");
                }
                // The webhook admits nothing more: hand the admin chains to the collector
                // before the pod (and the spool on its scratch space) goes.
                admin_audit.close(ADMIN_AUDIT_DRAIN).await;
            });
            Some(addr)
        }
        _ => None,
    };

    let context = Arc::new(Context::new(
        client.clone(),
        stores.clone(),
        kek,
        metrics.clone(),
        reconcile,
        clock,
        Some(settings.lease.identity.clone()),
    ));
    tasks.spawn(admin::serve(
        metrics_listener,
        AdminState {
            metrics: metrics.clone(),
            diagnostics: context.diagnostics.clone(),
            ready,
        },
        shutdown.clone(),
    ));

    // What the leader does: the controllers, CA rotation, the trust bundle.
    let publisher = TrustBundlePublisher::new(
        client.clone(),
        ca.clone(),
        stores.tenants.clone(),
        tenants_changed,
    );
    let audit_secret = settings.audit_service.as_deref().map(|service| {
        AuditTlsSecret::new(
            client.clone(),
            ca.clone(),
            &settings.reconcile.namespace,
            service,
            &settings.cluster_domain,
        )
    });
    let witness = settings.audit_witness.clone().map(|witness| {
        Arc::new(AuditWitness::new(
            client.clone(),
            stores.tenants.clone(),
            ca.clone(),
            witness,
            settings.lease.identity.clone(),
        ))
    });
    let leading = Arc::new(AtomicBool::new(false));
    tasks.spawn(ca_runtime.clone().follow(leading.clone(), shutdown.clone()));
    // KEK rotation (every provider): every replica reloads the keyring, the leader
    // rotates and re-wraps.
    {
        let mut rotation = settings.kek_rotation.clone();
        rotation.provider = context.kek.provider();
        rotation.kms = rotation_kms;
        rotation.pkcs11 = settings.kek_pkcs11.clone();
        rotation.secret = settings
            .kek_secret
            .clone()
            .unwrap_or_else(|| envelope::KEK_SECRET_NAME.into());
        // Even with --no-webhooks: a CA Secret left from before must stay readable.
        rotation.webhook_ca_secret = Some(webhook::tls::CA_SECRET.to_owned());
        tasks.spawn(
            KekRotation::new(context.clone(), rotation).run(leading.clone(), shutdown.clone()),
        );
    }
    let lead = {
        let ctx = context.clone();
        move |term: CancellationToken| {
            let ctx = ctx.clone();
            let publisher = publisher.clone();
            let ca_runtime = ca_runtime.clone();
            let audit_secret = audit_secret.clone();
            let witness = witness.clone();
            async move {
                let audit_secret = async {
                    if let Some(secret) = audit_secret {
                        secret.run(term.clone()).await;
                    }
                };
                let witness = async {
                    if let Some(witness) = witness {
                        witness.run(term.clone()).await;
                    }
                };
                tokio::join!(
                    crate::controller::run(ctx, term.clone()),
                    publisher.run(term.clone()),
                    audit_secret,
                    witness,
                    ca_runtime.rotate_while_leading(term.clone()),
                );
            }
        }
    };
    let token = shutdown.clone();
    let flag = leading.clone();
    if settings.leader_election {
        let elector = LeaderElector::new(client, settings.lease.clone());
        let diagnostics = context.diagnostics.clone();
        tasks.spawn(async move {
            let on_change = move |now_leading: bool| {
                flag.store(now_leading, Ordering::Relaxed);
                metrics.set_leader(now_leading);
                let diagnostics = diagnostics.clone();
                tokio::spawn(async move { diagnostics.write().await.leading = now_leading });
            };
            elector.run(token, lead, on_change).await;
        });
    } else {
        let diagnostics = context.diagnostics.clone();
        tasks.spawn(async move {
            flag.store(true, Ordering::Relaxed);
            metrics.set_leader(true);
            diagnostics.write().await.leading = true;
            lead(token).await;
        });
    }
    tracing::info!(
        %metrics_addr, %policy_addr, %identity_addr, ?webhook_addr,
        names = ?settings.serving_names(), "serving"
    );
    Ok(RunningOperator {
        shutdown,
        tasks,
        metrics_addr,
        policy_addr,
        identity_addr,
        webhook_addr,
        ca,
        hub,
        context,
        leading,
    })
}

/// The webhook server's settings from the operator's, with the addresses bound.
fn webhook_settings(
    settings: &OperatorSettings,
    webhooks: WebhookRunSettings,
    webhook_addr: SocketAddr,
    identity_addr: SocketAddr,
    policy_addr: SocketAddr,
) -> WebhookSettings {
    let namespace = &settings.reconcile.namespace;
    let mut inject = webhooks.inject;
    inject.operator_namespace.clone_from(namespace);
    inject.trust_domain = settings.ca.trust_domain.to_string();
    inject.identity_url = with_bound_port(&inject.identity_url, identity_addr.port());
    inject.policy_url = with_bound_port(&inject.policy_url, policy_addr.port());
    let mut tls = WebhookTlsSettings::new(namespace.clone(), settings.service_name.clone());
    tls.extra_sans.clone_from(&settings.extra_sans);
    tls.mutating_configuration = webhooks.mutating_configuration;
    tls.validating_configuration = webhooks.validating_configuration;
    let configurations = webhooks.url.map(|url| WebhookConfigSettings {
        target: WebhookTarget::Url(with_bound_port(&url, webhook_addr.port())),
        operator_namespace: namespace.clone(),
        ca_bundle: String::new(),
    });
    WebhookSettings {
        addr: webhook_addr,
        tls,
        inject,
        validator: ValidatorSettings {
            kek_custody: settings.reconcile.kek_custody.clone(),
            restricted_requires_hardware_kek: settings.restricted_requires_hardware_kek,
            ..ValidatorSettings::new(namespace, &webhooks.service_account)
        },
        configurations,
    }
}

/// A replica identity: the pod name (or host name) plus a random suffix, so two
/// processes on one host never share a Lease identity.
pub fn default_identity() -> String {
    let base = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "portcullis-operator".to_owned());
    let suffix: u32 = rand::random();
    format!("{base}-{suffix:08x}")
}

/// How long after SIGTERM a second signal forces exit (documented; enforced by main).
pub const FORCE_AFTER: Duration = Duration::from_secs(30);

/// How long the admin audit chains get at shutdown to reach the collector: well inside
/// [`FORCE_AFTER`] and the chart's default termination grace period.
const ADMIN_AUDIT_DRAIN: Duration = Duration::from_secs(10);

/// The admin audit chains: signed with the operator's own workload certificate from
/// `ca`, shipped per tenant to the audit collector the injector points pods at.
fn admin_audit(
    settings: &OperatorSettings,
    account: &str,
    collector_url: Option<String>,
    namespace: &str,
    ca: &Arc<CertificateAuthority>,
) -> Result<ChainedAdminAudit, StartError> {
    let trust_domain = settings.ca.trust_domain.clone();
    let own = |e: &dyn std::fmt::Display| {
        StartError::Settings(format!("the operator's own workload identity: {e}"))
    };
    let workload =
        WorkloadId::new(trust_domain.clone(), namespace, account).map_err(|e| own(&e))?;
    let tenant = TenantId::new(trust_domain, namespace).map_err(|e| own(&e))?;
    let identity = AdminIdentity::new(ca.clone(), workload, tenant)
        .map_err(crate::webhook::AdminAuditError::from)?;
    let shipping = collector_url.map(|collector_url| {
        AdminShipping::new(
            collector_url,
            std::env::temp_dir().join("portcullis-admin-audit"),
        )
    });
    Ok(ChainedAdminAudit::new(
        &settings.lease.identity,
        Arc::new(identity),
        shipping,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_with_port_zero_get_the_bound_port() {
        assert_eq!(
            with_bound_port("https://127.0.0.1:0", 31443),
            "https://127.0.0.1:31443"
        );
        assert_eq!(
            with_bound_port("https://127.0.0.1:0/hooks", 9),
            "https://127.0.0.1:9/hooks"
        );
        assert_eq!(
            with_bound_port("https://op.ns.svc:8443", 31443),
            "https://op.ns.svc:8443",
            "a real port is kept"
        );
        assert_eq!(with_bound_port("https://op.ns.svc", 1), "https://op.ns.svc");
    }

    #[test]
    fn defaults_serve_everything_securely() {
        let s = OperatorSettings::new("portcullis-system", "replica");
        assert!(!s.policy_insecure_debug);
        assert!(s.webhooks.is_some());
        assert_eq!(s.identity_addr.port(), 8443);
        assert_eq!(
            s.serving_names(),
            [
                "portcullis-operator.portcullis-system.svc",
                "portcullis-operator.portcullis-system.svc.cluster.local"
            ]
        );
        assert!(s.ca.validate().is_ok());
    }
}
