//! x509 contents of every certificate kind.

use rcgen::{ExtendedKeyUsagePurpose, KeyUsagePurpose};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::*;
use crate::ca::authority::CaState;
use crate::ca::csr::validate_csr;

fn with_cert<R>(der: &[u8], f: impl FnOnce(&X509Certificate<'_>) -> R) -> R {
    let (rest, cert) = X509Certificate::from_der(der).unwrap();
    assert!(rest.is_empty());
    f(&cert)
}

#[test]
fn root_and_intermediate_are_constrained_cas() {
    let now = t(0);
    let state = CaState::generate(&settings(), now).unwrap();
    let root_der = state.active_root().der().to_vec();
    let int_der = state.intermediate().der().to_vec();

    with_cert(&root_der, |root| {
        let bc = root.basic_constraints().unwrap().unwrap();
        assert!(bc.critical);
        assert!(bc.value.ca);
        assert_eq!(bc.value.path_len_constraint, Some(1));
        let ku = root.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        assert!(!ku.digital_signature());
        assert_eq!(root.subject(), root.issuer());
        root.verify_signature(None).unwrap();
        assert_eq!(root.validity().not_before.timestamp(), now.as_second() - 60);
        assert!(root.extended_key_usage().unwrap().is_none());
    });
    with_cert(&int_der, |int| {
        let bc = int.basic_constraints().unwrap().unwrap();
        assert!(bc.value.ca);
        assert_eq!(bc.value.path_len_constraint, Some(0));
        let ku = int.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        let lifetime = int.validity().not_after.timestamp() - int.validity().not_before.timestamp();
        assert_eq!(
            lifetime as u64,
            settings().intermediate_lifetime().as_secs() + 60
        );
        with_cert(&root_der, |root| {
            assert_eq!(int.issuer(), root.subject());
            int.verify_signature(Some(root.public_key())).unwrap();
        });
    });
}

#[test]
fn leaf_has_exactly_the_computed_names_usages_and_lifetime() {
    let s = settings();
    let now = t(1000);
    let mut state = CaState::generate(&s, t(0)).unwrap();
    let key = p256();
    let id = workload("acme-prod", "api");
    let csr = validate_csr(&good_csr(&key, &id), &id).unwrap();
    let issued = state
        .issue_leaf(&csr, &id, &tenant("acme"), &s, now)
        .unwrap();

    let leaf_der = der_of(&issued.certificate).remove(0);
    with_cert(&leaf_der, |leaf| {
        let bc = leaf.basic_constraints().unwrap().unwrap();
        assert!(!bc.value.ca, "leaf must not be a CA");
        let ku = leaf.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature());
        assert!(!ku.key_cert_sign() && !ku.crl_sign() && !ku.key_encipherment());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!eku.any && !eku.code_signing && !eku.email_protection && eku.other.is_empty());
        let sans = &leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert_eq!(
            sans,
            &vec![
                GeneralName::URI("spiffe://td/ns/acme-prod/sa/api"),
                GeneralName::URI("spiffe://td/tenant/acme"),
            ]
        );
        // Validity: rotation period + 24 h grace from now, backdated one minute.
        assert_eq!(leaf.validity().not_before.timestamp(), now.as_second() - 60);
        assert_eq!(
            leaf.validity().not_after.timestamp() - now.as_second(),
            96 * 3600
        );
        // The key is the CSR's.
        assert_eq!(
            leaf.public_key().raw,
            rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        );
    });
    assert_eq!(issued.expires_at.as_second(), now.as_second() + 96 * 3600);
    assert_eq!(issued.renew_after.as_second(), now.as_second() + 72 * 3600);
    assert_eq!(issued.chain, state.intermediate().pem());
    assert_eq!(issued.trust_bundle, state.active_root().pem());

    // The chain verifies against the bundle as a client certificate...
    verify_client_chain(
        &issued.certificate,
        &issued.chain,
        &issued.trust_bundle,
        t(2000),
    )
    .unwrap();
    // ...and as a peer proxy's server certificate.
    let roots = portcullis_tls::root_store(&der_of(&issued.trust_bundle)).unwrap();
    let verifier = portcullis_tls::PeerServerVerifier::new(std::sync::Arc::new(roots), td());
    rustls::client::danger::ServerCertVerifier::verify_server_cert(
        &verifier,
        &leaf_der,
        &der_of(&issued.chain),
        &rustls::pki_types::ServerName::try_from("ignored.invalid").unwrap(),
        &[],
        unix(t(2000)),
    )
    .unwrap();
    // Not after it expires, not against another CA.
    assert!(
        verify_client_chain(
            &issued.certificate,
            &issued.chain,
            &issued.trust_bundle,
            t(1000 + 96 * 3600 + 1)
        )
        .is_err()
    );
    let other = CaState::generate(&s, t(0)).unwrap();
    assert!(
        verify_client_chain(
            &issued.certificate,
            &issued.chain,
            &other.trust_bundle_pem(),
            t(2000)
        )
        .is_err()
    );
}

#[test]
fn leaf_never_copies_requested_extensions_or_subject() {
    let s = settings();
    let mut state = CaState::generate(&s, t(0)).unwrap();
    let key = p256();
    let id = workload("ns", "sa");
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "admin");
    params.subject_alt_names = vec![uri(&id.to_string())];
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::CodeSigning,
        ExtendedKeyUsagePurpose::Any,
    ];
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    let csr = validate_csr(&pem, &id).unwrap();
    let issued = state.issue_leaf(&csr, &id, &tenant("t"), &s, t(5)).unwrap();
    with_cert(&der_of(&issued.certificate)[0], |leaf| {
        assert!(!leaf.subject().to_string().contains("admin"));
        let ku = leaf.key_usage().unwrap().unwrap().value;
        assert!(!ku.key_cert_sign());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(!eku.code_signing && !eku.any);
    });
}

#[test]
fn server_certificate_names_the_service() {
    let s = settings();
    let mut state = CaState::generate(&s, t(0)).unwrap();
    let cert = state
        .issue_server_certificate(&["identity.test".into(), "127.0.0.1".into()], &s, t(10))
        .unwrap();
    assert_eq!(cert.chain.len(), 2);
    with_cert(&cert.chain[0], |leaf| {
        let sans = &leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert_eq!(sans[0], GeneralName::DNSName("identity.test"));
        assert_eq!(sans[1], GeneralName::IPAddress(&[127, 0, 0, 1]));
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        assert!(!leaf.basic_constraints().unwrap().unwrap().value.ca);
    });
    assert!(!format!("{cert:?}").contains("PRIVATE"));
    // Server certificates count as leaves for the trust bundle bookkeeping.
    assert_eq!(state.active_max_leaf_expiry(), Some(cert.not_after));
}

#[test]
fn only_the_audit_service_certificate_also_authenticates_a_client() {
    use crate::ca::audit_secret::{audit_service_names, collector_name};
    use crate::ca::certs::pem_encode;
    use crate::ca::{CaServingCertificate, CertificateAuthority};

    let s = settings();
    let ca = CertificateAuthority::new(
        s.clone(),
        CaState::generate(&s, t(0)).unwrap(),
        std::sync::Arc::new(portcullis_api::clock::ManualClock::new(t(10))),
    );
    let bundle = ca.trust_bundle_pem();
    let names = audit_service_names("portcullis-audit", "portcullis-system", "cluster.local");
    assert!(names.contains(&collector_name("portcullis-audit", "portcullis-system")));

    // The audit service: serverAuth + clientAuth, DNS SANs only (no SPIFFE id).
    let audit = ca.issue_audit_service_certificate(&names).unwrap();
    with_cert(&audit.chain[0], |leaf| {
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!eku.any && eku.other.is_empty());
        let sans = &leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert_eq!(
            sans,
            &vec![
                GeneralName::DNSName("portcullis-audit.portcullis-system.svc"),
                GeneralName::DNSName("portcullis-audit.portcullis-system.svc.cluster.local"),
            ]
        );
    });
    let audit_leaf = pem_encode(&audit.chain[0]);
    let intermediate = pem_encode(&audit.chain[1]);
    verify_client_chain(&audit_leaf, &intermediate, &bundle, t(20)).unwrap();

    // The policy and identity servers' certificate: serverAuth only, refused as a client.
    let serving = CaServingCertificate::new(&ca, &["policy.test".to_owned()]).unwrap();
    let serving_chain = serving.chain();
    with_cert(&serving_chain[0], |leaf| {
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
    });
    assert!(
        verify_client_chain(
            &pem_encode(&serving_chain[0]),
            &pem_encode(&serving_chain[1]),
            &bundle,
            t(20)
        )
        .is_err(),
        "a serving certificate passed as a client certificate"
    );

    // The webhook's serving certificate (its own CA): serverAuth only.
    let webhook_ca =
        crate::webhook::tls::WebhookCa::generate(t(0), Duration::from_secs(3600)).unwrap();
    let webhook = webhook_ca
        .issue_leaf(
            &["portcullis-webhook.portcullis-system.svc".to_owned()],
            t(10),
            Duration::from_secs(600),
        )
        .unwrap();
    with_cert(webhook.der(), |leaf| {
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
    });
}

#[test]
fn an_audit_secret_without_client_auth_is_replaced() {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;

    use crate::ca::audit_secret::still_current;
    use crate::ca::certs::pem_encode;

    let s = settings();
    let mut state = CaState::generate(&s, t(0)).unwrap();
    let bundle = state.trust_bundle_pem();
    let names = vec!["portcullis-audit.portcullis-system.svc".to_owned()];
    let secret_of = |chain: &[rustls::pki_types::CertificateDer<'static>]| {
        let pem: String = chain.iter().map(|c| pem_encode(c)).collect();
        Secret {
            data: Some(BTreeMap::from([
                ("tls.crt".to_owned(), ByteString(pem.into_bytes())),
                ("tls.key".to_owned(), ByteString(b"key".to_vec())),
                ("ca.crt".to_owned(), ByteString(bundle.clone().into_bytes())),
            ])),
            ..Secret::default()
        }
    };
    let audit = state
        .issue_audit_service_certificate(&names, &s, t(10))
        .unwrap();
    assert!(still_current(&secret_of(&audit.chain), &bundle, t(20)).is_some());
    // Written before the collector needed clientAuth: replaced now, not at half-life.
    let server_only = state.issue_server_certificate(&names, &s, t(10)).unwrap();
    assert_eq!(
        still_current(&secret_of(&server_only.chain), &bundle, t(20)),
        None
    );
}
