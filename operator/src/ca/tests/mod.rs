//! CA tests: certificate contents, CSR refusals, rotation and the trust bundle,
//! persistence, authentication and the identity service over TLS.

mod authenticate;
mod certificates;
mod csr_refusals;
mod kube_fixtures;
mod persistence;
mod rotation;
mod service;

use std::time::Duration;

use jiff::Timestamp;
use portcullis_api::spiffe::{TenantId, TrustDomain, WorkloadId};
use rcgen::{CertificateParams, DistinguishedName, IsCa, KeyPair, SanType};
use rustls::pki_types::CertificateDer;

use super::settings::CaSettings;

pub(super) const T0: i64 = 1_700_000_000;

/// `T0 + secs`.
pub(super) fn t(secs: i64) -> Timestamp {
    Timestamp::from_second(T0 + secs).unwrap()
}

pub(super) fn td() -> TrustDomain {
    TrustDomain::new("td").unwrap()
}

pub(super) fn settings() -> CaSettings {
    CaSettings::new(td())
}

/// Short periods for rotation tests: leaf 10 s + 10 s grace, intermediate 30 s,
/// root 100 s (so the next root is published at 80 s).
pub(super) fn fast_settings() -> CaSettings {
    CaSettings {
        leaf_rotation_period: Duration::from_secs(10),
        leaf_grace: Duration::from_secs(10),
        intermediate_rotation_period: Duration::from_secs(30),
        root_rotation_period: Duration::from_secs(100),
        ..settings()
    }
}

pub(super) fn workload(ns: &str, sa: &str) -> WorkloadId {
    WorkloadId::new(td(), ns, sa).unwrap()
}

pub(super) fn tenant(name: &str) -> TenantId {
    TenantId::new(td(), name).unwrap()
}

pub(super) fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

/// A CSR with exactly `sans` and `is_ca`, signed by `key`.
pub(super) fn csr_with(key: &KeyPair, sans: Vec<SanType>, is_ca: IsCa) -> String {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.is_ca = is_ca;
    params.serialize_request(key).unwrap().pem().unwrap()
}

/// A well-formed CSR for `id`.
pub(super) fn good_csr(key: &KeyPair, id: &WorkloadId) -> String {
    csr_with(key, vec![uri(&id.to_string())], IsCa::NoCa)
}

pub(super) fn p256() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

pub(super) fn der_of(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

pub(super) fn unix(ts: Timestamp) -> rustls::pki_types::UnixTime {
    rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(ts.as_second() as u64))
}

/// Verifies `leaf` + `chain` as a client certificate against `bundle` at `at`, the way
/// a sidecar's inbound side does (rustls WebPkiClientVerifier).
pub(super) fn verify_client_chain(
    leaf: &str,
    chain: &str,
    bundle: &str,
    at: Timestamp,
) -> Result<(), rustls::Error> {
    use rustls::server::WebPkiClientVerifier;
    let mut roots = rustls::RootCertStore::empty();
    for root in der_of(bundle) {
        roots.add(root).unwrap();
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        portcullis_tls::provider(),
    )
    .build()
    .unwrap();
    verifier
        .verify_client_cert(&der_of(leaf)[0], &der_of(chain), unix(at))
        .map(|_| ())
}
