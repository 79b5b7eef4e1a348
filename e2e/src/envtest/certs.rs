//! The generated PKI of one envtest control plane: the client CA, the admin identity
//! (`O=system:masters`) and the service-account token signing key.
//!
//! Everything is ECDSA P-256 made by rcgen. kube-apiserver 1.20 accepts a PKCS#8
//! ECDSA key for `--service-account-signing-key-file` and signs tokens with ES256.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use super::HarnessError;

/// OID of the X.509 `organizationName` attribute (2.5.4.10).
const ORGANIZATION_NAME_OID: [u64; 4] = [2, 5, 4, 10];

/// A client certificate and its private key, both PEM encoded.
#[derive(Clone)]
pub struct ClientIdentity {
    /// The certificate, signed by the envtest client CA.
    pub cert_pem: String,
    /// The PKCS#8 private key of the certificate.
    pub key_pem: String,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity").finish_non_exhaustive()
    }
}

/// The CA that the API server trusts for client certificates (`--client-ca-file`),
/// plus the service-account signing key pair.
pub(crate) struct Pki {
    ca_cert_pem: String,
    ca_key_pem: String,
    ca: Issuer<'static, KeyPair>,
    service_account_key: KeyPair,
}

impl Pki {
    pub(crate) fn generate() -> Result<Self, HarnessError> {
        let ca_key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "portcullis-envtest-ca");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert_pem = params.self_signed(&ca_key)?.pem();
        let ca_key_pem = ca_key.serialize_pem();
        Ok(Self {
            ca_cert_pem,
            ca_key_pem,
            ca: Issuer::new(params, ca_key),
            service_account_key: KeyPair::generate()?,
        })
    }

    pub(crate) fn ca_cert_pem(&self) -> &str {
        &self.ca_cert_pem
    }

    pub(crate) fn ca_key_pem(&self) -> &str {
        &self.ca_key_pem
    }

    /// PKCS#8 PEM of the service-account signing key (private).
    pub(crate) fn service_account_key_pem(&self) -> String {
        self.service_account_key.serialize_pem()
    }

    /// SubjectPublicKeyInfo PEM of the service-account signing key.
    pub(crate) fn service_account_public_pem(&self) -> String {
        self.service_account_key.public_key_pem()
    }

    /// A client certificate with `CN=user` and one `O=` attribute per group, which the
    /// API server maps to user name and groups.
    ///
    /// rcgen keeps one value per attribute type, so the second group is written under
    /// the organizationName OID spelled as a custom type: at most two groups fit. Use
    /// impersonation ([`super::EnvTest::client_impersonating`]) for more.
    pub(crate) fn client_identity(
        &self,
        user: &str,
        groups: &[&str],
    ) -> Result<ClientIdentity, HarnessError> {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, user);
        match groups {
            [] => {}
            [first] => dn.push(DnType::OrganizationName, *first),
            [first, second] => {
                dn.push(DnType::OrganizationName, *first);
                dn.push(
                    DnType::CustomDnType(ORGANIZATION_NAME_OID.to_vec()),
                    *second,
                );
            }
            _ => {
                return Err(HarnessError::TooManyGroups {
                    user: user.to_owned(),
                    count: groups.len(),
                });
            }
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca)?;
        Ok(ClientIdentity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}
