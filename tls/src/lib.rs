//! The TLS vocabulary the operator and the proxy share, so the control plane never
//! depends on the data plane to agree on what a certificate says: the one crypto
//! provider, what a workload leaf names ([`leaf`]), the peer-server check ([`verify`]),
//! trust roots ([`roots`]), PEM writing ([`pem`]) and the verdict on a bring-your-own serving certificate
//! ([`serving_certificate`]). No runtime: the proxy's hot-swapped stores and the
//! operator's servers build on these.

#![warn(missing_docs)]

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

pub mod leaf;
pub mod pem;
pub mod roots;
pub mod serving_certificate;
pub mod verify;

pub use leaf::{LeafFacts, leaf_facts, serial_hex};
pub use pem::{pem_block, pem_chain};
pub use roots::{parse_pem_certs, root_store, unix_time};
pub use verify::PeerServerVerifier;

/// The one crypto provider of the workspace: ring, measured against aws-lc-rs on this
/// workload (bench/RESULTS.md: aws-lc-rs 1.09× the handshakes, 0.75× the records).
/// Key exchange groups in a fixed order, X25519 first: rustls 0.23.48 moves secp384r1
/// to the front of ring's defaults, which made handshakes 4.7× slower in that
/// measurement.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            use rustls::crypto::ring::kx_group::{SECP256R1, SECP384R1, X25519};
            Arc::new(CryptoProvider {
                kx_groups: vec![X25519, SECP256R1, SECP384R1],
                ..rustls::crypto::ring::default_provider()
            })
        })
        .clone()
}

/// A certificate, key or bundle that cannot be used; the text says which and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidCertificate(pub String);

#[cfg(test)]
mod tests {
    use rustls::NamedGroup;

    #[test]
    fn clients_offer_and_servers_prefer_x25519_first() {
        let groups: Vec<NamedGroup> = super::provider()
            .kx_groups
            .iter()
            .map(|g| g.name())
            .collect();
        assert_eq!(
            groups,
            [
                NamedGroup::X25519,
                NamedGroup::secp256r1,
                NamedGroup::secp384r1
            ]
        );
    }
}
