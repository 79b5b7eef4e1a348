//! The certificate authority and the identity service.
//!
//! A root and an issuing intermediate (ECDSA P-256) live in Secrets in the operator's
//! namespace, their keys wrapped by the KEK ([`persist`]). Workloads obtain leaves from
//! the identity service ([`identity_service`]), which authenticates them by projected
//! ServiceAccount token and Pod ([`authenticator`]), signs only the CSR's public key
//! ([`csr`]) and records each leaf against its pod ([`issued`]) so the leaf can be
//! revoked when the pod is deleted. Roots and intermediates rotate on their own schedules ([`authority`],
//! [`rotation`]) and the roots still trusted are published to tenant namespaces
//! ([`bundle`]).
//!
//! Wiring in the operator:
//!
//! ```ignore
//! let kek = envelope::load_or_create_kek(client.clone(), &ns).await?;
//! let settings = CaSettings::new(trust_domain);
//! let (store, state) = CaSecretStore::load_or_create(client.clone(), &ns, kek, &settings, Timestamp::now()).await?;
//! let ca = Arc::new(CertificateAuthority::new(settings, state, Arc::new(SystemClock)));
//! tokio::spawn(run_rotation(ca.clone(), Some(store), Duration::from_secs(60), shutdown.clone()));
//! let metrics = IdentityMetrics::register(&mut registry);
//! let service = Arc::new(IdentityService::new(ca.clone(), Arc::new(KubeAuthenticator::new(client.clone())), metrics));
//! let config = IdentityServiceConfig { server_names: service_names(&service_name, &ns, &cluster_domain, &extra_sans), ..IdentityServiceConfig::default() };
//! let bound = service.bind(config).await?;
//! tokio::spawn(bound.serve(shutdown.clone()));
//! // on ca.subscribe() changes and tenant namespace changes:
//! publish_trust_bundle(client, &tenant_namespaces, &ca.trust_bundle_pem()).await?;
//! ```

pub mod audit_secret;
pub mod authenticator;
pub mod authority;
pub mod bundle;
pub mod certs;
pub mod csr;
pub mod identity_service;
pub mod issued;
pub mod metrics;
pub mod persist;
pub mod rotation;
pub mod service_names;
pub mod serving;
pub mod settings;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;

pub use authenticator::{
    AuthenticatedWorkload, KubeAuthenticator, LookupError, PodFacts, Refusal, StaticAuthenticator,
    TokenReviewOutcome, WorkloadAuthenticator, authenticate,
};
pub use authority::{CaExpiry, CaState, CertificateAuthority, RotationEvent, ServerCertificate};
pub use bundle::{PublishError, TRUST_BUNDLE_CONFIGMAP, TRUST_BUNDLE_KEY, publish_trust_bundle};
pub use certs::CaCertificate;
pub use csr::{CsrError, ValidatedCsr, validate_csr};
pub use identity_service::{BoundIdentityService, IdentityService, IdentityServiceConfig};
pub use issued::{IssuedLeaf, KubeLeafLedger, LeafLedger};
pub use metrics::IdentityMetrics;
pub use persist::{CaSecretStore, INTERMEDIATE_SECRET, ROOT_SECRET};
pub use rotation::run_rotation;
pub use serving::{CaServingCertificate, service_names};
pub use settings::CaSettings;

use crate::envelope::EnvelopeError;

/// Errors of the CA. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The settings do not fit together.
    #[error("CA settings: {0}")]
    Settings(String),
    /// Generating a key or signing a certificate failed.
    #[error("signing: {0}")]
    Signing(String),
    /// Stored CA data is unreadable or inconsistent.
    #[error("stored CA data: {0}")]
    Corrupt(String),
    /// A stored private key could not be unwrapped with the KEK.
    #[error("unwrapping a key from Secret {secret}: {source}")]
    Unwrap {
        /// Secret name.
        secret: String,
        /// Why.
        source: EnvelopeError,
    },
    /// The Kubernetes API failed.
    #[error("Secret {secret}: {source}")]
    Kube {
        /// Secret name.
        secret: String,
        /// The API error.
        source: kube::Error,
    },
    /// A Secret changed under us.
    #[error("conflict: {0}")]
    Conflict(String),
    /// Binding or accepting failed.
    #[error("I/O: {0}")]
    Io(std::io::Error),
    /// TLS setup failed.
    #[error("TLS: {0}")]
    Tls(String),
}
