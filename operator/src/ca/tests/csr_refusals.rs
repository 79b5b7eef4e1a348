//! Each bad CSR is refused with its own reason.

use portcullis_api::identity::RefusalReason;
use rcgen::{BasicConstraints, IsCa, KeyPair};

use super::*;
use crate::ca::csr::{CsrError, validate_csr};

fn reason(pem: &str) -> RefusalReason {
    validate_csr(pem, &workload("ns", "sa"))
        .unwrap_err()
        .reason()
}

const ME: &str = "spiffe://td/ns/ns/sa/sa";

#[test]
fn a_good_csr_passes() {
    let key = p256();
    let csr = validate_csr(
        &good_csr(&key, &workload("ns", "sa")),
        &workload("ns", "sa"),
    )
    .unwrap();
    assert_eq!(
        rcgen::PublicKeyData::der_bytes(csr.public_key()),
        key.public_key_raw()
    );
}

#[test]
fn garbage_is_invalid() {
    assert_eq!(reason(""), RefusalReason::CsrInvalid);
    assert_eq!(reason("hello"), RefusalReason::CsrInvalid);
    assert_eq!(
        reason("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"),
        RefusalReason::CsrInvalid
    );
    // A certificate is not a CSR.
    let (_, cert_pem) = {
        let key = p256();
        let cert = rcgen::CertificateParams::default()
            .self_signed(&key)
            .unwrap();
        ((), cert.pem())
    };
    assert!(
        matches!(validate_csr(&cert_pem, &workload("ns", "sa")), Err(CsrError::Invalid(m)) if m.contains("CERTIFICATE"))
    );
    assert_eq!(reason(&"A".repeat(20_000)), RefusalReason::CsrInvalid);
}

#[test]
fn a_broken_signature_is_invalid() {
    let pem = good_csr(&p256(), &workload("ns", "sa"));
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let mut der = block.contents.clone();
    let last = der.len() - 2;
    der[last] ^= 0x55;
    let err = crate::ca::csr::validate_csr_der(&der, &workload("ns", "sa")).unwrap_err();
    assert_eq!(err.reason(), RefusalReason::CsrInvalid, "{err}");
}

#[test]
fn any_basic_constraints_is_refused() {
    let key = p256();
    let ca = csr_with(
        &key,
        vec![uri(ME)],
        IsCa::Ca(BasicConstraints::Unconstrained),
    );
    assert_eq!(reason(&ca), RefusalReason::CsrHasCaFlag);
    let explicit_no_ca = csr_with(&key, vec![uri(ME)], IsCa::ExplicitNoCa);
    assert_eq!(reason(&explicit_no_ca), RefusalReason::CsrHasCaFlag);
}

#[test]
fn extra_names_are_refused() {
    let key = p256();
    let dns = rcgen::SanType::DnsName("evil.example".try_into().unwrap());
    let err = validate_csr(
        &csr_with(&key, vec![uri(ME), dns], IsCa::NoCa),
        &workload("ns", "sa"),
    )
    .unwrap_err();
    assert_eq!(err, CsrError::ExtraSans(vec!["DNS:evil.example".into()]));
    let two_ids = csr_with(
        &key,
        vec![uri(ME), uri("spiffe://td/ns/ns/sa/admin")],
        IsCa::NoCa,
    );
    assert_eq!(reason(&two_ids), RefusalReason::CsrExtraSans);
    let tenant_too = csr_with(
        &key,
        vec![uri(ME), uri("spiffe://td/tenant/other")],
        IsCa::NoCa,
    );
    assert_eq!(reason(&tenant_too), RefusalReason::CsrExtraSans);
}

#[test]
fn another_identity_or_none_is_refused() {
    let key = p256();
    assert_eq!(
        reason(&good_csr(&key, &workload("ns", "admin"))),
        RefusalReason::CsrWrongIdentity
    );
    assert_eq!(
        reason(&good_csr(&key, &workload("kube-system", "sa"))),
        RefusalReason::CsrWrongIdentity
    );
    assert_eq!(
        reason(&csr_with(
            &key,
            vec![uri("spiffe://other-td/ns/ns/sa/sa")],
            IsCa::NoCa
        )),
        RefusalReason::CsrWrongIdentity
    );
    let none =
        validate_csr(&csr_with(&key, vec![], IsCa::NoCa), &workload("ns", "sa")).unwrap_err();
    assert_eq!(
        none,
        CsrError::WrongIdentity {
            requested: None,
            expected: ME.into()
        }
    );
}

#[test]
fn keys_other_than_p256_are_refused() {
    for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
        let key = KeyPair::generate_for(alg).unwrap();
        let err = validate_csr(
            &good_csr(&key, &workload("ns", "sa")),
            &workload("ns", "sa"),
        )
        .unwrap_err();
        assert_eq!(
            err.reason(),
            RefusalReason::UnsupportedKey,
            "{alg:?}: {err}"
        );
    }
}
