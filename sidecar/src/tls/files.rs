//! The file feed of the credentials store, for standalone use: the serving certificate
//! chain, its key and the trust bundle, read from PEM files and re-read when they
//! change. Each new generation is installed in the attached [`CredentialStore`]s; a
//! half-written file is refused and the previous generation kept.

use std::{path::Path, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    sign::CertifiedKey,
};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::{
    ClientAuth, CredentialStore, Feed, TlsCredentials, TlsError, provider, verify::ClientVerifier,
};
use crate::{config::TlsFiles, metrics::Metrics};

/// Why credentials could not be loaded. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read.
    #[error("reading {field} file {path}: {source}")]
    Read {
        /// Which config field.
        field: &'static str,
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file holds no usable PEM object.
    #[error("{field} file {path}: {problem}")]
    Pem {
        /// Which config field.
        field: &'static str,
        /// The file.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// The key does not belong to the certificate, or rustls refused it.
    #[error("tls.privateKey does not match tls.certificate or is unsupported: {0}")]
    Key(String),
    /// The trust bundle cannot build a verifier.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// One generation of credentials.
struct Generation {
    tls: TlsCredentials,
    not_after: i64,
    fingerprint: [u8; 32],
}

/// Credentials from files, swapped atomically on reload; cheap to clone.
#[derive(Clone)]
pub struct FileCredentials {
    files: TlsFiles,
    current: Arc<ArcSwap<Generation>>,
    feed: Feed,
}

impl std::fmt::Debug for FileCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileCredentials")
            .field("certificate", &self.files.certificate)
            .field("not_after", &self.current.load().not_after)
            .finish_non_exhaustive()
    }
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Read {
        field,
        path: path.display().to_string(),
        source,
    })
}

fn pem_error(field: &'static str, path: &Path, problem: impl Into<String>) -> CertError {
    CertError::Pem {
        field,
        path: path.display().to_string(),
        problem: problem.into(),
    }
}

fn parse_certs(
    field: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(field, path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(pem_error(field, path, "holds no CERTIFICATE block"));
    }
    Ok(certs)
}

fn load_generation(files: &TlsFiles) -> Result<Generation, CertError> {
    let cert_pem = read("tls.certificate", &files.certificate)?;
    let key_pem = read("tls.privateKey", &files.private_key)?;
    let bundle_pem = read("tls.trustBundle", &files.trust_bundle)?;
    let mut hasher = Sha256::new();
    for part in [&cert_pem, &key_pem, &bundle_pem] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    let fingerprint: [u8; 32] = hasher.finalize().into();

    let chain = parse_certs("tls.certificate", &files.certificate, &cert_pem)?;
    // The key's own parse error could quote key bytes; say only what is wrong.
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        pem_error(
            "tls.privateKey",
            &files.private_key,
            "holds no PKCS#8, SEC1 or PKCS#1 PRIVATE KEY block",
        )
    })?;
    let signing_key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| CertError::Key(e.to_string()))?;
    let certified_key = CertifiedKey::new(chain, signing_key);
    certified_key
        .keys_match()
        .map_err(|e| CertError::Key(e.to_string()))?;
    let not_after = certified_key
        .end_entity_cert()
        .ok()
        .and_then(|der| x509_parser::parse_x509_certificate(der).ok())
        .map(|(_, cert)| cert.validity().not_after.timestamp())
        .unwrap_or(0);

    let mut roots = RootCertStore::empty();
    for cert in parse_certs("tls.trustBundle", &files.trust_bundle, &bundle_pem)? {
        roots.add(cert).map_err(|e| {
            pem_error(
                "tls.trustBundle",
                &files.trust_bundle,
                format!("unusable CA certificate: {e}"),
            )
        })?;
    }
    let roots = Arc::new(roots);
    // Refuse a bundle that cannot verify client certificates before it is in force.
    ClientVerifier::new(Some(roots.clone()), None, ClientAuth::Optional)?;
    Ok(Generation {
        tls: TlsCredentials {
            certified_key: Arc::new(certified_key),
            roots,
        },
        not_after,
        fingerprint,
    })
}

impl FileCredentials {
    /// Loads the files named in `files`.
    pub fn load(files: &TlsFiles) -> Result<Self, CertError> {
        let generation = load_generation(files)?;
        Ok(Self {
            files: files.clone(),
            current: Arc::new(ArcSwap::from_pointee(generation)),
            feed: Feed::default(),
        })
    }

    /// Installs the current files in `store`, and every later generation.
    pub fn feed(&self, store: &CredentialStore) -> Result<(), CertError> {
        self.feed
            .attach(store, || Some(self.current.load().tls.clone()))?;
        Ok(())
    }

    /// Re-reads the files; true when a new generation is now in force.
    pub fn reload(&self) -> Result<bool, CertError> {
        let generation = load_generation(&self.files)?;
        if generation.fingerprint == self.current.load().fingerprint {
            return Ok(false);
        }
        let installed = generation.tls.clone();
        self.feed.swap(|| {
            self.current.store(Arc::new(generation));
            installed
        })?;
        Ok(true)
    }

    /// The serving certificate's notAfter, in Unix seconds.
    pub fn not_after(&self) -> i64 {
        self.current.load().not_after
    }

    /// The serving certificate (leaf, DER).
    pub fn leaf(&self) -> Option<CertificateDer<'static>> {
        self.current.load().tls.certified_key.cert.first().cloned()
    }

    /// The serving certificate chain as PEM (public material only).
    pub fn chain_pem(&self) -> String {
        super::pem_chain(&self.current.load().tls.certified_key.cert)
    }

    /// Re-reads the files every `interval` until `shutdown`.
    pub async fn watch(self, interval: Duration, metrics: Metrics, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            match self.reload() {
                Ok(true) => {
                    tracing::info!(
                        not_after = self.not_after(),
                        "certificate and trust bundle reloaded"
                    );
                    metrics.cert_reload("reloaded", Some(self.not_after()));
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "keeping the current certificate");
                    metrics.cert_reload("failed", None);
                }
            }
        }
    }
}
