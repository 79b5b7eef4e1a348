//! Admission webhooks (DESIGN.md §3, §4), served by the operator on port 9443:
//!
//! - [`inject`]: the mutating webhook — sidecar injection, a pure function of the pod;
//! - [`validate`]: the validating webhook — Tenant, Role and ApiKey invariants and no
//!   privilege escalation, pure functions over a [`validate::lookup`] snapshot;
//! - [`audit`]: the admin audit event every admitted change yields;
//! - [`tls`]: the webhook's own CA and hot-swapped serving certificate, and the
//!   `caBundle` patched into the configurations;
//! - [`config`]: the Mutating/ValidatingWebhookConfiguration objects, as data;
//! - [`server`]: the HTTPS server.
//!
//! Wiring (the operator's `run`):
//!
//! ```ignore
//! let certificates = WebhookCertificates::start(client.clone(), tls_settings, kek, clock.clone()).await?;
//! tokio::spawn(certificates.clone().run(shutdown.clone()));
//! let state = Arc::new(WebhookState::new(client.clone(), inject_settings, validator_settings,
//!     ServerVersion::detect(&client).await?));
//! webhook::serve(addr, certificates.server_config()?, state, shutdown).await?;
//! ```
//!
//! or all of it at once with [`run`] ([`start`] on a bound listener).

use std::net::SocketAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Namespace;
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt as _;
use portcullis_api::clock::{Clock, SystemClock};
use tokio_util::sync::CancellationToken;

use crate::envelope::Kek;
use crate::stores::Synced;
use validate::cached_lookup::{CachedLookup, SyncedStore, WebhookCaches};

pub mod admin_identity;
pub mod audit;
pub mod audit_chain;
pub mod config;
pub mod inject;
mod review;
pub mod server;
pub mod tls;
pub mod validate;

pub use admin_identity::{AdminIdentity, AdminIdentityError};
pub use audit::{AdminAuditEvent, AdminAuditSink, TracingAuditSink};
pub use audit_chain::{AdminAuditError, AdminShipping, ChainedAdminAudit};
pub use inject::{Decision, InjectSettings, ServerVersion};
pub use review::{review_admin, review_pod};
pub use server::{ServerLimits, serve, serve_on};
pub use tls::{WebhookCertificates, WebhookTlsSettings};
pub use validate::ValidatorSettings;
pub use validate::lookup::{ClusterLookup, KubeLookup};

/// Errors of the webhook server and its certificates.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The listen address could not be bound.
    #[error("binding the webhook server to {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// rcgen could not make a key or certificate.
    #[error("webhook certificate: {0}")]
    Certificate(String),
    /// The CA Secret exists but cannot be read; delete it to have a new CA made.
    #[error(
        "Secret portcullis-webhook-ca is unreadable ({0}); delete it and the operator makes a new CA"
    )]
    CorruptCaSecret(String),
    /// rustls refused the configuration.
    #[error("webhook TLS configuration: {0}")]
    Tls(String),
    /// An API request failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// What the admission handlers read.
pub struct WebhookState {
    /// What injection adds.
    pub inject: InjectSettings,
    /// Decides native sidecar (≥ 1.29) or regular container.
    pub server_version: ServerVersion,
    /// Who skips the escalation checks.
    pub validator: ValidatorSettings,
    /// Cluster reads (namespace labels, Roles, Tenants).
    pub lookup: Arc<dyn ClusterLookup>,
    /// Where admin audit events go.
    pub audit: Arc<dyn AdminAuditSink>,
    /// The time of audit events.
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for WebhookState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookState")
            .field("inject", &self.inject)
            .field("server_version", &self.server_version)
            .field("validator", &self.validator)
            .finish_non_exhaustive()
    }
}

impl WebhookState {
    /// State reading through `client`, logging admin audit events via tracing.
    pub fn new(
        client: kube::Client,
        inject: InjectSettings,
        validator: ValidatorSettings,
        server_version: ServerVersion,
    ) -> Self {
        Self {
            inject,
            server_version,
            validator,
            lookup: Arc::new(KubeLookup::new(client)),
            audit: Arc::new(TracingAuditSink),
            clock: Arc::new(SystemClock),
        }
    }

    /// The same state with admin audit events going to `sink`.
    pub fn with_audit(mut self, sink: Arc<dyn AdminAuditSink>) -> Self {
        self.audit = sink;
        self
    }
}

/// Everything [`run`] needs.
#[derive(Clone, Debug)]
pub struct WebhookSettings {
    /// Listen address (`0.0.0.0:9443`).
    pub addr: SocketAddr,
    /// Serving certificate settings.
    pub tls: WebhookTlsSettings,
    /// Injection settings.
    pub inject: InjectSettings,
    /// Escalation-check exemptions.
    pub validator: ValidatorSettings,
    /// When set, the operator applies both webhook configurations itself (field
    /// manager [`CONFIGURATION_MANAGER`]) pointing at this target — e.g. a URL when it
    /// runs outside the cluster. `None`: the Helm chart owns them and the operator only
    /// patches their `caBundle`.
    pub configurations: Option<config::WebhookConfigSettings>,
}

/// Field manager of the webhook configurations the operator applies itself; distinct
/// from the one that owns `caBundle`, so neither apply removes the other's fields.
pub const CONFIGURATION_MANAGER: &str = "portcullis-operator-webhooks";

/// Server-side applies the two configurations under the names in `tls`.
pub async fn apply_configurations(
    client: &kube::Client,
    configurations: &config::WebhookConfigSettings,
    tls: &WebhookTlsSettings,
) -> Result<(), WebhookError> {
    use k8s_openapi::api::admissionregistration::v1::{
        MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
    };
    use kube::api::{Api, Patch, PatchParams};
    let params = PatchParams::apply(CONFIGURATION_MANAGER).force();
    let mut mutating = config::mutating(configurations);
    mutating.metadata.name = Some(tls.mutating_configuration.clone());
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .patch(
            &tls.mutating_configuration,
            &params,
            &Patch::Apply(&mutating),
        )
        .await?;
    let mut validating = config::validating(configurations);
    validating.metadata.name = Some(tls.validating_configuration.clone());
    Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .patch(
            &tls.validating_configuration,
            &params,
            &Patch::Apply(&validating),
        )
        .await?;
    Ok(())
}

/// Reserves `addr` for the webhook server without listening yet (so the port is known
/// — e.g. for a URL — but nothing connects before the certificates are in place).
pub fn reserve(addr: SocketAddr) -> Result<tokio::net::TcpSocket, WebhookError> {
    let bind = |addr: SocketAddr| -> std::io::Result<tokio::net::TcpSocket> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        Ok(socket)
    };
    bind(addr).map_err(|source| WebhookError::Bind { addr, source })
}

/// Binds `settings.addr` and serves the webhooks until `shutdown` (see [`start`]).
pub async fn run(
    client: kube::Client,
    settings: WebhookSettings,
    kek: Arc<Kek>,
    audit: Arc<dyn AdminAuditSink>,
    shutdown: CancellationToken,
) -> Result<(), WebhookError> {
    let socket = reserve(settings.addr)?;
    start(client, socket, settings, kek, audit, None, shutdown)
        .await?
        .await
}

/// Every namespace's metadata (labels are all the webhooks read), kept by a watch until
/// `shutdown`, managed fields dropped.
fn watch_namespaces(
    client: &kube::Client,
    shutdown: &CancellationToken,
) -> SyncedStore<PartialObjectMeta<Namespace>> {
    let (store, writer) = kube::runtime::reflector::store();
    let synced = Synced::default();
    let events = kube::runtime::watcher(
        kube::Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
        kube::runtime::watcher::Config::default(),
    )
    .modify(|namespace| namespace.metadata.managed_fields = None);
    crate::stores::reflect_synced(
        events,
        writer,
        Arc::new(tokio::sync::Notify::new()),
        synced.clone(),
        shutdown.clone(),
    );
    SyncedStore { store, synced }
}

/// Everything up to serving: the API server version, the certificates (CA Secret,
/// leaf, `caBundle`) and their refresh task, the configurations (when the operator owns
/// them, applied with the `caBundle` already in, so the API server never sees them
/// without it), and only then listening on `socket` — a connection accepted means the
/// webhooks are ready. Returns the server, to be awaited (it runs until `shutdown`).
/// With `stores` the admission checks read the operator's caches (and a namespace watch
/// of their own) before the API server.
pub async fn start(
    client: kube::Client,
    socket: tokio::net::TcpSocket,
    settings: WebhookSettings,
    kek: Arc<Kek>,
    audit: Arc<dyn AdminAuditSink>,
    stores: Option<&crate::stores::Stores>,
    shutdown: CancellationToken,
) -> Result<
    impl std::future::Future<Output = Result<(), WebhookError>> + Send + 'static,
    WebhookError,
> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let server_version = ServerVersion::detect(&client).await?;
    tracing::info!(
        ?server_version,
        native_sidecars = server_version.supports_native_sidecars(),
        "injecting the proxy as a {}",
        if server_version.supports_native_sidecars() {
            "native sidecar"
        } else {
            "regular container"
        }
    );
    let certificates =
        WebhookCertificates::start(client.clone(), settings.tls.clone(), kek, clock.clone())
            .await?;
    if let Some(configurations) = &settings.configurations {
        let configurations = config::WebhookConfigSettings {
            ca_bundle: certificates.ca_bundle_pem().await,
            ..configurations.clone()
        };
        apply_configurations(&client, &configurations, &settings.tls).await?;
        tracing::info!(target = ?configurations.target, "webhook configurations applied");
    }
    tokio::spawn(certificates.clone().run(shutdown.clone()));
    let live = KubeLookup::new(client.clone());
    let lookup: Arc<dyn ClusterLookup> = match stores {
        Some(stores) => Arc::new(CachedLookup::new(
            live,
            WebhookCaches {
                tenants: SyncedStore {
                    store: stores.tenants.clone(),
                    synced: stores.tenants_synced.clone(),
                },
                roles: SyncedStore {
                    store: stores.roles.clone(),
                    synced: stores.roles_synced.clone(),
                },
                namespaces: watch_namespaces(&client, &shutdown),
            },
        )),
        None => Arc::new(live),
    };
    let state = WebhookState {
        clock,
        lookup,
        ..WebhookState::new(client, settings.inject, settings.validator, server_version)
            .with_audit(audit)
    };
    let tls = certificates.server_config()?;
    let listener = socket.listen(1024).map_err(|source| WebhookError::Bind {
        addr: settings.addr,
        source,
    })?;
    Ok(async move {
        // Keeps the certificates alive while serving.
        let _certificates = certificates;
        serve_on(
            listener,
            tls,
            Arc::new(state),
            ServerLimits::default(),
            shutdown,
        )
        .await
    })
}
