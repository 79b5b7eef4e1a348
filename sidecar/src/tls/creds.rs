//! The credentials store. A feed — the PEM files of a standalone proxy
//! ([`super::files`]) or the identity renewer of an injected pod
//! ([`crate::control::identity::CertificateStore`]) — installs a certificate and its
//! trust roots; the store then builds whole rustls server and client configs and
//! publishes them through `watch` channels. Listeners and connectors take the current
//! config per connection, so a handshake never pairs a new certificate with old roots,
//! and open connections keep the config they started with.

use std::{
    fmt,
    sync::{Arc, Mutex, PoisonError},
};

use portcullis_api::spiffe::TrustDomain;
use rustls::{ClientConfig, RootCertStore, ServerConfig, sign::CertifiedKey};
use tokio::sync::watch;

use super::{
    ClientConfigSource, TlsError, client,
    server::{self, ClientAuth},
    serving_certificate::ServingCertificate,
};

/// One generation of credentials: our certificate chain and key, and the roots peers
/// and clients must chain to.
#[derive(Clone)]
pub struct TlsCredentials {
    /// Leaf + intermediates and the signing key.
    pub certified_key: Arc<CertifiedKey>,
    /// The trust bundle.
    pub roots: Arc<RootCertStore>,
}

impl fmt::Debug for TlsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsCredentials")
            .field("chain", &self.certified_key.cert.len())
            .field("roots", &self.roots.len())
            .finish()
    }
}

/// What the configs check, fixed for the life of a store.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    /// Whether inbound clients must present a certificate.
    pub client_auth: ClientAuth,
    /// A client certificate must name a workload of this trust domain; `None`
    /// (standalone): chaining to the trust bundle is enough.
    pub client_trust_domain: Option<TrustDomain>,
    /// Peer proxies must be workloads of this trust domain; `None`: no peer client.
    pub peer_trust_domain: Option<TrustDomain>,
    /// The bring-your-own certificate shown to clients outside the mesh.
    pub serving: Option<ServingCertificate>,
}

/// The inbound configs as they are published; cheap to clone.
#[derive(Clone, Debug)]
pub struct ServerConfigs(watch::Receiver<Arc<ServerConfig>>);

impl ServerConfigs {
    /// The config for the next handshake.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.0.borrow().clone()
    }
}

/// Publishes whole TLS configs for the credentials in force; cheap to clone.
#[derive(Clone)]
pub struct CredentialStore {
    settings: Arc<TlsSettings>,
    server: Arc<watch::Sender<Arc<ServerConfig>>>,
    peer_client: Arc<watch::Sender<Option<Arc<ClientConfig>>>>,
    operator_client: Arc<watch::Sender<Option<Arc<ClientConfig>>>>,
}

impl fmt::Debug for CredentialStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialStore")
            .field("settings", &self.settings)
            .field("installed", &self.operator_client.borrow().is_some())
            .finish()
    }
}

impl CredentialStore {
    /// A store with no credentials yet: inbound handshakes can show only the serving
    /// certificate, client configs are not available.
    pub fn new(settings: TlsSettings) -> Result<Self, TlsError> {
        let server = server::server_config(None, &settings)?;
        Ok(Self {
            settings: Arc::new(settings),
            server: Arc::new(watch::Sender::new(Arc::new(server))),
            peer_client: Arc::new(watch::Sender::new(None)),
            operator_client: Arc::new(watch::Sender::new(None)),
        })
    }

    /// Builds every config for `credentials`, then publishes them; on error nothing
    /// changes.
    pub fn install(&self, credentials: &TlsCredentials) -> Result<(), TlsError> {
        let server = server::server_config(Some(credentials), &self.settings)?;
        let peer = match &self.settings.peer_trust_domain {
            Some(trust_domain) => Some(Arc::new(client::peer_config(
                credentials.certified_key.clone(),
                credentials.roots.clone(),
                trust_domain.clone(),
            )?)),
            None => None,
        };
        let operator =
            client::operator_config(credentials.certified_key.clone(), credentials.roots.clone())?;
        self.server.send_replace(Arc::new(server));
        self.peer_client.send_replace(peer);
        self.operator_client.send_replace(Some(Arc::new(operator)));
        Ok(())
    }

    /// The inbound configs, for an accept loop.
    pub fn server_configs(&self) -> ServerConfigs {
        ServerConfigs(self.server.subscribe())
    }

    /// The proxy-to-proxy client config in force.
    pub fn peer_client(&self) -> ClientConfigSource {
        current_of(self.peer_client.subscribe())
    }

    /// The client config for the operator's endpoints in force (roots: the trust
    /// bundle of the credentials).
    pub fn operator_client(&self) -> ClientConfigSource {
        current_of(self.operator_client.subscribe())
    }
}

fn current_of(configs: watch::Receiver<Option<Arc<ClientConfig>>>) -> ClientConfigSource {
    Arc::new(move || configs.borrow().clone().ok_or(TlsError::NoIdentity))
}

/// The stores a credential source feeds. Locked only when credentials change or a store
/// is attached, never by a handshake.
#[derive(Clone, Default)]
pub struct Feed(Arc<Mutex<Vec<CredentialStore>>>);

impl fmt::Debug for Feed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Feed").finish_non_exhaustive()
    }
}

impl Feed {
    /// Attaches `store` and installs the source's `current` credentials, if any, in it.
    pub fn attach(
        &self,
        store: &CredentialStore,
        current: impl FnOnce() -> Option<TlsCredentials>,
    ) -> Result<(), TlsError> {
        let mut stores = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(credentials) = current() {
            store.install(&credentials)?;
        }
        stores.push(store.clone());
        Ok(())
    }

    /// Runs `swap`, which puts the source's new credentials in force and returns them,
    /// and installs them in every attached store; no store is attached meanwhile, so
    /// none misses a generation.
    pub fn swap(&self, swap: impl FnOnce() -> TlsCredentials) -> Result<(), TlsError> {
        let stores = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let credentials = swap();
        let mut result = Ok(());
        for store in stores.iter() {
            if let Err(e) = store.install(&credentials) {
                result = Err(e);
            }
        }
        result
    }
}
