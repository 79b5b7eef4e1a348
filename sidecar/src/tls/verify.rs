//! The one client-certificate verifier of the proxy, built for one generation of
//! credentials: the chain must verify against that generation's trust bundle (validity,
//! clientAuth) and, when a trust domain is set, name a SPIFFE workload of it. Peer
//! servers are checked by [`PeerServerVerifier`], the shared one.

use std::{fmt, sync::Arc};

use portcullis_api::spiffe::TrustDomain;
use portcullis_tls::verify::require_workload_in;
use rustls::{
    DistinguishedName, Error, RootCertStore,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, UnixTime},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

pub use portcullis_tls::verify::PeerServerVerifier;

use super::{TlsError, provider, server::ClientAuth};

/// Verifies client certificates against fixed roots, optionally requiring a workload
/// ID of one trust domain.
pub struct ClientVerifier {
    // `None` until a feed installs credentials: an offered certificate is refused.
    chain: Option<Arc<dyn ClientCertVerifier>>,
    trust_domain: Option<TrustDomain>,
    client_auth: ClientAuth,
    provider: Arc<CryptoProvider>,
}

impl ClientVerifier {
    /// A verifier trusting `roots`; with `trust_domain`, the leaf must also name a
    /// workload of it. Fails when the roots cannot verify client certificates.
    pub fn new(
        roots: Option<Arc<RootCertStore>>,
        trust_domain: Option<TrustDomain>,
        client_auth: ClientAuth,
    ) -> Result<Self, TlsError> {
        let provider = provider();
        let chain = match roots {
            // Whether a certificate is required is `client_auth`'s call, made below.
            Some(roots) => Some(
                WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                    .allow_unauthenticated()
                    .build()?,
            ),
            None => None,
        };
        Ok(Self {
            chain,
            trust_domain,
            client_auth,
            provider,
        })
    }
}

impl fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientVerifier")
            .field("trust_domain", &self.trust_domain)
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.client_auth == ClientAuth::Required
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints means "send what you have": clients need not match our CA's name.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let chain = self
            .chain
            .as_ref()
            .ok_or_else(|| Error::General("no trust bundle yet".into()))?;
        let verified = chain.verify_client_cert(end_entity, intermediates, now)?;
        if let Some(trust_domain) = &self.trust_domain {
            require_workload_in(end_entity, trust_domain)?;
        }
        Ok(verified)
    }

    portcullis_tls::tls13_signatures!(provider);
}
