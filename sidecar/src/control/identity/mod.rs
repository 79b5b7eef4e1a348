//! Workload identity, client side: the proxy's own key, its CSR, the call to the
//! operator's identity service, the certificate store read by every TLS handshake, and
//! the loop that keeps it fresh. (Who a peer is, read from its certificate, is
//! [`crate::tls::peer`].)
//!
//! Typical wiring in the proxy:
//!
//! ```ignore
//! let store = CertificateStore::new();
//! let client = IdentityClient::new(IdentityEndpoint::parse(url)?, token_path);
//! let renewer = Renewer::new(client, store.clone(), workload_id, bootstrap_roots,
//!                            Arc::new(SystemClock), RenewalSettings::default());
//! tokio::spawn(renewer.run(shutdown.clone()));
//! let tls = CredentialStore::new(settings)?;
//! store.feed(&tls)?; // every renewal now publishes new server and client configs
//! ```

use std::path::PathBuf;
use std::time::Duration;

pub mod client;
pub mod clock;
pub mod csr;
pub mod renew;
pub mod store;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod test_util;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;

pub use client::{IdentityClient, IdentityEndpoint, IssueCertificate};
pub use clock::TokioClock;
pub use csr::WorkloadKey;
pub use renew::{RenewalSettings, Renewer, renewal_time};
// The contracts, re-exported so the proxy's own modules keep one `identity` vocabulary.
pub use portcullis_api::clock::{Clock, ManualClock, SystemClock};
pub use portcullis_api::identity::{
    ErrorBody, IDENTITY_AUDIENCE, IssueRequest, IssueResponse, RefusalReason,
};
pub use portcullis_api::spiffe::{SpiffeId, SpiffeIdError, TenantId, TrustDomain, WorkloadId};
pub use store::{CertificateStore, Credentials};

/// Why obtaining or installing a workload certificate failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The key pair could not be generated or loaded.
    #[error("workload key: {0}")]
    KeyGeneration(String),
    /// The CSR could not be built.
    #[error("certificate signing request: {0}")]
    Csr(String),
    /// The projected ServiceAccount token could not be read.
    #[error("reading the service account token at {path}: {source}")]
    Token {
        /// Where the token was expected.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The identity service could not be reached.
    #[error("connecting to the identity service: {0}")]
    Connect(std::io::Error),
    /// TLS setup or handshake failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// The HTTP exchange failed.
    #[error("HTTP: {0}")]
    Http(String),
    /// The identity service refused.
    #[error("identity service refused ({status}, {}): {message}", reason.map(|r| r.as_str()).unwrap_or("no reason"))]
    Refused {
        /// HTTP status.
        status: u16,
        /// The service's reason, when it gave one.
        reason: Option<RefusalReason>,
        /// The service's explanation.
        message: String,
    },
    /// The answer was not usable (bad PEM, wrong identity, chain does not verify...).
    #[error("invalid identity service response: {0}")]
    InvalidResponse(String),
    /// The request took too long.
    #[error("identity request timed out after {0:?}")]
    Timeout(Duration),
    /// The configuration is unusable.
    #[error("identity configuration: {0}")]
    Config(String),
}

impl From<portcullis_tls::InvalidCertificate> for IdentityError {
    // A certificate the proxy cannot use came from the identity service (or the
    // bootstrap bundle): report it as an unusable answer, as before the split.
    fn from(e: portcullis_tls::InvalidCertificate) -> Self {
        Self::InvalidResponse(e.0)
    }
}
