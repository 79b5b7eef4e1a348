//! A CA like the operator's for the collector's tests: workload leaves (SPIFFE URI
//! SANs) and serving leaves (DNS names).
#![allow(dead_code)]

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The value, or the test fails with the error.
pub fn ok<T, E: std::fmt::Display>(result: Result<T, E>) -> T {
    result.unwrap_or_else(|e| panic!("{e}"))
}

/// A CA like the operator's, issuing leaves on demand.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
    root_pem: String,
}

/// A leaf and its key.
pub struct Leaf {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl TestCa {
    pub fn new() -> Self {
        let key = ok(KeyPair::generate());
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "portcullis test root");
        let root = ok(params.self_signed(&key));
        Self {
            root_pem: root.pem(),
            root: root.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The root as PEM, as in the trust-bundle ConfigMap.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        ok(roots.add(self.root.clone()));
        roots
    }

    pub fn leaf(&self, sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose) -> Leaf {
        self.leaf_for(sans, vec![usage])
    }

    fn leaf_for(&self, sans: Vec<SanType>, usages: Vec<ExtendedKeyUsagePurpose>) -> Leaf {
        let key = ok(KeyPair::generate());
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.extended_key_usages = usages;
        let cert = ok(params.signed_by(&key, &self.issuer));
        Leaf {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }

    /// A serving certificate as the operator issues the audit collector's.
    pub fn collector(&self) -> Leaf {
        self.leaf(
            vec![SanType::DnsName(ok(
                "portcullis-audit.portcullis-system.svc".try_into(),
            ))],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A workload certificate as the identity service issues it: the workload and its
    /// tenant as URI SANs.
    pub fn workload(&self, namespace: &str, account: &str, tenant: &str) -> Leaf {
        let uri = |s: String| SanType::URI(ok(s.as_str().try_into()));
        self.leaf_for(
            vec![
                uri(format!("spiffe://td/ns/{namespace}/sa/{account}")),
                uri(format!("spiffe://td/tenant/{tenant}")),
            ],
            // Like the operator's: a workload serves and connects with one leaf.
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }
}
