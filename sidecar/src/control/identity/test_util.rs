//! A throwaway two-level CA for the identity tests.

use std::time::Duration;

use jiff::Timestamp;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use portcullis_api::identity::IssueResponse;

/// Sets notBefore/notAfter without naming rcgen's `time` types.
pub(crate) fn set_validity(p: &mut CertificateParams, not_before: Timestamp, not_after: Timestamp) {
    let secs = |ts: Timestamp| Duration::from_secs(u64::try_from(ts.as_second()).unwrap_or(0));
    p.not_before = rcgen::date_time_ymd(1970, 1, 1) + secs(not_before);
    p.not_after = rcgen::date_time_ymd(1970, 1, 1) + secs(not_after);
}

pub(crate) struct TestCa {
    pub root_pem: String,
    intermediate_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let root_key = KeyPair::generate().unwrap();
        let mut root = CertificateParams::default();
        root.distinguished_name = DistinguishedName::new();
        root.distinguished_name
            .push(DnType::CommonName, format!("{name} root"));
        root.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let root_cert = root.self_signed(&root_key).unwrap();
        let root_issuer = Issuer::new(root, root_key);

        let int_key = KeyPair::generate().unwrap();
        let mut int = CertificateParams::default();
        int.distinguished_name = DistinguishedName::new();
        int.distinguished_name
            .push(DnType::CommonName, format!("{name} intermediate"));
        int.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        int.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        int.use_authority_key_identifier_extension = true;
        let int_cert = int.signed_by(&int_key, &root_issuer).unwrap();
        Self {
            root_pem: root_cert.pem(),
            intermediate_pem: int_cert.pem(),
            issuer: Issuer::new(int, int_key),
        }
    }

    /// Signs the CSR's key and names (plus an optional tenant SAN) as a workload leaf.
    pub fn sign(
        &self,
        csr_pem: &str,
        tenant: Option<&str>,
        now: Timestamp,
        lifetime: Duration,
    ) -> IssueResponse {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).unwrap();
        let p = &mut csr.params;
        set_validity(
            p,
            portcullis_api::clock::sub(now, Duration::from_secs(60)),
            portcullis_api::clock::add(now, lifetime),
        );
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        if let Some(tenant) = tenant {
            p.subject_alt_names.push(SanType::URI(
                format!("spiffe://td/tenant/{tenant}").try_into().unwrap(),
            ));
        }
        let cert = csr.signed_by(&self.issuer).unwrap();
        IssueResponse {
            certificate: cert.pem(),
            chain: self.intermediate_pem.clone(),
            trust_bundle: self.root_pem.clone(),
            expires_at: portcullis_api::clock::add(now, lifetime),
            renew_after: portcullis_api::clock::add(now, lifetime / 2),
            dns_names: Vec::new(),
            names_revision: None,
        }
    }
}
