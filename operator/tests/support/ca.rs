//! The operator's real CA for the audit tests: a fresh one, and a workload leaf from it
//! as the identity service issues it.
#![allow(dead_code)]

use std::sync::Arc;

use jiff::Timestamp;
use portcullis_api::clock::SystemClock;
use portcullis_api::spiffe::{TenantId, TrustDomain, WorkloadId};
use portcullis_operator::ca::{CaSettings, CaState, CertificateAuthority, validate_csr};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

pub fn new_ca() -> Arc<CertificateAuthority> {
    let settings = CaSettings::new(td());
    let state = CaState::generate(&settings, Timestamp::now()).unwrap();
    Arc::new(CertificateAuthority::new(
        settings,
        state,
        Arc::new(SystemClock),
    ))
}

/// A workload certificate of `tenant` (namespace `tenant`, account web) from the CA, as the identity service issues.
pub fn workload_identity(
    ca: &CertificateAuthority,
    tenant: &str,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let workload = WorkloadId::new(td(), tenant, "web").unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(workload.to_string().try_into().unwrap())];
    let csr_pem = params.serialize_request(&key).unwrap().pem().unwrap();
    let csr = validate_csr(&csr_pem, &workload).unwrap();
    let issued = ca
        .issue(&csr, &workload, &TenantId::new(td(), tenant).unwrap())
        .unwrap();
    let chain = CertificateDer::pem_slice_iter(
        format!("{}{}", issued.certificate, issued.chain).as_bytes(),
    )
    .collect::<Result<Vec<_>, _>>()
    .unwrap();
    (
        chain,
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}
