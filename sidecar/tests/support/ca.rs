//! A throwaway CA issuing server and client certificates for tests.

use std::{net::IpAddr, path::Path, time::Duration};

use rustls::pki_types::pem::PemObject;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

pub struct TestCa {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

fn unix_now() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
}

fn set_validity(params: &mut CertificateParams, from: Duration, to: Duration) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + from;
    params.not_after = epoch + to;
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = unix_now();
        set_validity(
            &mut params,
            now - Duration::from_secs(86_400),
            now + Duration::from_secs(86_400 * 30),
        );
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn issue(
        &self,
        sans: Vec<SanType>,
        ekus: Vec<ExtendedKeyUsagePurpose>,
        expired: bool,
    ) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "test leaf");
        params.subject_alt_names = sans;
        params.extended_key_usages = ekus;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = unix_now();
        if expired {
            set_validity(
                &mut params,
                now - Duration::from_secs(86_400 * 10),
                now - Duration::from_secs(86_400),
            );
        } else {
            set_validity(
                &mut params,
                now - Duration::from_secs(3600),
                now + Duration::from_secs(86_400 * 7),
            );
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A serving certificate for localhost / 127.0.0.1, also usable as a client
    /// certificate (the proxy presents it to the policy server).
    pub fn server(&self) -> Issued {
        self.issue(
            vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress("127.0.0.1".parse::<IpAddr>().unwrap()),
                SanType::URI("spiffe://test.local/ns/acme/sa/proxy".try_into().unwrap()),
                SanType::URI("spiffe://test.local/tenant/acme".try_into().unwrap()),
            ],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            false,
        )
    }

    /// A mesh workload's client certificate: the SPIFFE ID and, as the identity service
    /// issues them, the tenant URI of tenant `acme` in the same trust domain.
    pub fn client(&self, spiffe_id: &str) -> Issued {
        self.workload(spiffe_id, Some("acme"))
    }

    /// A client certificate with a workload SPIFFE ID and, when given, the tenant URI
    /// `spiffe://<td>/tenant/<tenant>` of the ID's trust domain.
    pub fn workload(&self, spiffe_id: &str, tenant: Option<&str>) -> Issued {
        let mut uris = vec![spiffe_id.to_owned()];
        if let Some(tenant) = tenant {
            let td = spiffe_id["spiffe://".len()..].split('/').next().unwrap();
            uris.push(format!("spiffe://{td}/tenant/{tenant}"));
        }
        self.with_uris(&uris)
    }

    /// A client certificate whose only SANs are these URIs.
    pub fn with_uris(&self, uris: &[String]) -> Issued {
        self.issue(
            uris.iter()
                .map(|uri| SanType::URI(uri.as_str().try_into().unwrap()))
                .collect(),
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            false,
        )
    }

    /// A client certificate without any SPIFFE ID.
    pub fn client_without_spiffe(&self) -> Issued {
        self.issue(
            vec![SanType::DnsName("client.example".try_into().unwrap())],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            false,
        )
    }

    /// A client certificate that expired yesterday.
    pub fn expired_client(&self, spiffe_id: &str) -> Issued {
        self.issue(
            vec![SanType::URI(spiffe_id.try_into().unwrap())],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            true,
        )
    }

    /// A serving certificate for the DNS name `host` only (as a public or corporate CA
    /// issues them), expired yesterday when `expired`.
    pub fn dns_server(&self, host: &str, expired: bool) -> Issued {
        self.issue(
            vec![SanType::DnsName(host.try_into().unwrap())],
            vec![ExtendedKeyUsagePurpose::ServerAuth],
            expired,
        )
    }

    /// This CA as the only root.
    pub fn root_store(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(self.pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        roots
    }

    /// Writes server.pem, server-key.pem and ca.pem into `dir`.
    pub fn write_server_files(&self, dir: &Path) -> Issued {
        let server = self.server();
        write_atomic(&dir.join("server.pem"), &server.cert_pem);
        write_atomic(&dir.join("server-key.pem"), &server.key_pem);
        write_atomic(&dir.join("ca.pem"), &self.pem);
        server
    }
}

/// Replaces a file atomically so a reader never sees half of it.
pub fn write_atomic(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
