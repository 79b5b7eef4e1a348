//! Who may sign checkpoints: certificates that chain to a trust bundle (the cluster's
//! `portcullis-trust-bundle`). A checkpoint's signature only proves the trail is
//! consistent with *some* key; without this check anyone who rewrites a trail can sign
//! it again with a key of their own.
//!
//! Path building and validation are webpki's (through rustls, the workspace's one TLS
//! stack): the signer's certificate must chain through the intermediates it carries to a
//! root of the bundle, be valid at the checkpoint's time, and be a workload (client
//! auth) certificate.

use std::{sync::Arc, time::Duration};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use jiff::Timestamp;
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, UnixTime, pem::PemObject},
    server::{ParsedCertificate, WebPkiClientVerifier, danger::ClientCertVerifier},
};
use x509_parser::extensions::GeneralName;

use crate::checkpoint::SignerInfo;
use crate::error::Error;

/// The CAs whose workload certificates may sign checkpoints.
#[derive(Clone)]
pub struct TrustBundle {
    verifier: Arc<dyn ClientCertVerifier>,
    store: Arc<RootCertStore>,
    roots: usize,
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundle")
            .field("roots", &self.roots)
            .finish_non_exhaustive()
    }
}

impl TrustBundle {
    /// The bundle in `pem` (concatenated PEM CA certificates, as in `ca-bundle.crt`).
    pub fn from_pem(pem: &[u8]) -> Result<Self, Error> {
        let mut roots = RootCertStore::empty();
        let (added, _) =
            roots.add_parsable_certificates(CertificateDer::pem_slice_iter(pem).flatten());
        if added == 0 {
            return Err(Error::Config(
                "the trust bundle holds no usable PEM CA certificate".into(),
            ));
        }
        let store = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(
            store.clone(),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| Error::Config(format!("trust bundle: {e}")))?;
        Ok(Self {
            verifier,
            store,
            roots: added,
        })
    }

    /// Checks that `signer`'s certificate chains to the bundle at `at` as a workload
    /// (client) certificate; the error says why not.
    pub fn check(&self, signer: &SignerInfo, at: Timestamp) -> Result<(), String> {
        let (leaf, intermediates) = certificates(signer)?;
        self.verifier
            .verify_client_cert(&leaf, &intermediates, unix_time(at))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Checks that `signer`'s certificate is one of the control plane's serving
    /// certificates at `at`: it chains to the bundle as a server certificate and names
    /// no SPIFFE id, which every workload certificate does (a workload's leaf is a
    /// server certificate too, so the chain alone would let a pod sign seals).
    pub fn check_service(&self, signer: &SignerInfo, at: Timestamp) -> Result<(), String> {
        let (leaf, intermediates) = certificates(signer)?;
        let parsed = ParsedCertificate::try_from(&leaf).map_err(|e| e.to_string())?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.store,
            &intermediates,
            unix_time(at),
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
        )
        .map_err(|e| e.to_string())?;
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf)
            .map_err(|e| format!("the signer certificate does not parse: {e}"))?;
        let names_a_workload = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .is_some_and(|san| {
                san.value.general_names.iter().any(
                    |name| matches!(name, GeneralName::URI(uri) if uri.starts_with("spiffe://")),
                )
            });
        if names_a_workload {
            return Err("the signer is a workload certificate, not the audit collector's".into());
        }
        Ok(())
    }
}

type Certificates = (CertificateDer<'static>, Vec<CertificateDer<'static>>);

/// The signer's leaf and the intermediates it carries.
fn certificates(signer: &SignerInfo) -> Result<Certificates, String> {
    let Some(certificate) = &signer.certificate else {
        return Err(
            "the signer carries no certificate, only a bare public key (a standalone proxy's key?)"
                .into(),
        );
    };
    let leaf = B64
        .decode(certificate)
        .map_err(|_| "the signer certificate is not base64".to_string())?;
    let mut intermediates = Vec::with_capacity(signer.chain.len());
    for der in &signer.chain {
        let der = B64
            .decode(der)
            .map_err(|_| "an intermediate in the signer chain is not base64".to_string())?;
        intermediates.push(CertificateDer::from(der));
    }
    Ok((CertificateDer::from(leaf), intermediates))
}

fn unix_time(at: Timestamp) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(
        u64::try_from(at.as_second()).unwrap_or(0),
    ))
}
