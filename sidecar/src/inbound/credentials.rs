//! The credentials step: what the mode in force asks a request to present, and
//! whether it did. `mtls` needs a workload certificate (a key, if sent, is ignored);
//! `apikey` needs a key; `mtls-or-apikey` needs either; `mtls-and-apikey` needs both.

use portcullis_crds::InboundMode;

use crate::listener::deny::{Denial, Reason};

/// What the client's TLS certificate gave the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientCertificate {
    /// No certificate was presented.
    Absent,
    /// A verified certificate that names no workload (a tenant URI alone, say).
    NoWorkload,
    /// A verified workload certificate.
    Workload,
}

/// The credentials a request goes on with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Credentials<'a> {
    /// The API key to verify, if it takes part.
    pub key: Option<&'a str>,
    /// Whether the mTLS peer takes part: alone, or with a key in `mtls-and-apikey`.
    /// (In `mtls-or-apikey` a key, when sent, decides alone.)
    pub peer: bool,
}

/// Checks the presented credentials against `mode`.
pub fn required<'a>(
    mode: InboundMode,
    certificate: ClientCertificate,
    presented_key: Option<&'a str>,
) -> Result<Credentials<'a>, Denial> {
    let key = match mode {
        InboundMode::Mtls => None,
        _ => presented_key,
    };
    let has_peer = certificate == ClientCertificate::Workload;
    let need_peer = matches!(mode, InboundMode::Mtls | InboundMode::MtlsAndApikey);
    let need_key = matches!(mode, InboundMode::Apikey | InboundMode::MtlsAndApikey);
    if need_peer && !has_peer {
        return Err(match certificate {
            ClientCertificate::NoWorkload => no_workload_identity(),
            _ => Denial::new(
                Reason::ClientCertificateRequired,
                "this service requires mutual TLS; present a client certificate issued by the mesh",
            ),
        });
    }
    if need_key && key.is_none() {
        return Err(Denial::new(
            Reason::ApiKeyRequired,
            "this service requires an API key; send it as \"Authorization: Bearer ak_...\" or \"X-API-Key: ak_...\"",
        ));
    }
    if key.is_none() && !has_peer {
        return Err(match certificate {
            ClientCertificate::NoWorkload => no_workload_identity(),
            _ => Denial::new(
                Reason::CredentialsRequired,
                "present a client certificate (mutual TLS) or an API key (\"Authorization: Bearer ak_...\")",
            ),
        });
    }
    Ok(Credentials {
        key,
        peer: has_peer && (need_peer || key.is_none()),
    })
}

fn no_workload_identity() -> Denial {
    Denial::new(
        Reason::NoWorkloadIdentity,
        "your client certificate names no workload (a spiffe://<trust-domain>/ns/<namespace>/sa/<service-account> URI SAN; a tenant URI alone is no identity); present a workload certificate issued by the mesh",
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use ClientCertificate::{Absent, NoWorkload, Workload};
    use InboundMode::{Apikey, Mtls, MtlsAndApikey, MtlsOrApikey};

    fn reason(mode: InboundMode, cert: ClientCertificate, key: Option<&str>) -> Reason {
        required(mode, cert, key).unwrap_err().reason
    }

    #[test]
    fn each_mode_names_what_is_missing() {
        assert_eq!(
            reason(Mtls, Absent, Some("ak_x")),
            Reason::ClientCertificateRequired
        );
        assert_eq!(reason(Mtls, NoWorkload, None), Reason::NoWorkloadIdentity);
        assert_eq!(reason(Apikey, Workload, None), Reason::ApiKeyRequired);
        assert_eq!(
            reason(MtlsAndApikey, Workload, None),
            Reason::ApiKeyRequired
        );
        assert_eq!(
            reason(MtlsAndApikey, Absent, Some("ak_x")),
            Reason::ClientCertificateRequired
        );
        assert_eq!(
            reason(MtlsOrApikey, Absent, None),
            Reason::CredentialsRequired
        );
        assert_eq!(
            reason(MtlsOrApikey, NoWorkload, None),
            Reason::NoWorkloadIdentity
        );
    }

    #[test]
    fn who_decides_follows_the_mode() {
        // mtls ignores a key; apikey ignores a peer; or-mode lets a key decide alone.
        let mtls = required(Mtls, Workload, Some("ak_x")).unwrap();
        assert_eq!((mtls.key, mtls.peer), (None, true));
        let apikey = required(Apikey, Workload, Some("ak_x")).unwrap();
        assert_eq!((apikey.key, apikey.peer), (Some("ak_x"), false));
        let either_key = required(MtlsOrApikey, Workload, Some("ak_x")).unwrap();
        assert_eq!((either_key.key, either_key.peer), (Some("ak_x"), false));
        let either_peer = required(MtlsOrApikey, Workload, None).unwrap();
        assert_eq!((either_peer.key, either_peer.peer), (None, true));
        let both = required(MtlsAndApikey, Workload, Some("ak_x")).unwrap();
        assert_eq!((both.key, both.peer), (Some("ak_x"), true));
    }
}
