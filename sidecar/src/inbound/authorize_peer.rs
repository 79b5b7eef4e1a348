//! Which mTLS peers may call this workload (DESIGN.md §5). A verified certificate only
//! proves the peer is *some* workload of the mesh; by default a pod admits workloads of
//! its own trust domain and tenant only (the tenant from the peer certificate's
//! `spiffe://<td>/tenant/<t>` SAN). Others get in when the Tenant (`spec.allowedPeers`,
//! carried in the bundle) or the pod (`portcullis.dev/allowed-peers`) names them. A
//! certificate the bundle lists as revoked (its pod is gone) is refused before anything
//! else, on every request, so open connections lose access too.

use portcullis_api::spiffe::TrustDomain;
use portcullis_crds::{AllowedPeer, peers::PeerMatch};

use crate::{
    listener::deny::{Denial, Reason},
    policy::CompiledPolicy,
    tls::peer::PeerIdentity,
};

/// Who this workload is, as far as peers are concerned.
#[derive(Clone, Debug, Default)]
pub struct PeerRules {
    /// The trust domain of this workload; `None` when it has no SPIFFE identity and
    /// none is configured (then only peers named by SPIFFE ID get in).
    pub trust_domain: Option<TrustDomain>,
    /// Peers the pod admits besides its tenant's (`portcullis.dev/allowed-peers`).
    pub allowed_peers: Vec<AllowedPeer>,
}

fn names(entry: &AllowedPeer, peer: &PeerIdentity, principal: &str, same_domain: bool) -> bool {
    match entry.to_match() {
        Ok(PeerMatch::SpiffeId(id)) => id == principal,
        Ok(PeerMatch::Namespace(ns)) => same_domain && peer.workload.namespace() == ns,
        Ok(PeerMatch::Tenant(tenant)) => {
            same_domain && peer.tenant.as_ref().is_some_and(|t| t.tenant() == tenant)
        }
        Err(_) => false,
    }
}

fn how_to_admit(tenant: &str) -> String {
    format!(
        "spec.allowedPeers of Tenant {tenant} or the pod's portcullis.dev/allowed-peers annotation"
    )
}

/// Whether `peer` (whose workload ID is `principal`) may call this workload under
/// `bundle`.
pub fn authorize_peer(
    peer: &PeerIdentity,
    principal: &str,
    rules: &PeerRules,
    bundle: &CompiledPolicy,
) -> Result<(), Denial> {
    if let Some(revoked) = bundle.revoked_certificates.get(&peer.serial) {
        return Err(Denial::new(
            Reason::PeerCertificateRevoked,
            format!(
                "the certificate of {principal} (serial {}) was issued to a pod that no longer exists and is revoked; the caller must present a current workload certificate (restart it if it kept an old one)",
                revoked.serial
            ),
        ));
    }
    let peer_domain = peer.workload.trust_domain();
    let same_domain = rules.trust_domain.as_ref() == Some(peer_domain);
    let named = bundle
        .allowed_peers
        .iter()
        .chain(&rules.allowed_peers)
        .any(|entry| names(entry, peer, principal, same_domain));
    if named {
        return Ok(());
    }
    let tenant = &bundle.tenant;
    if !same_domain {
        let ours = rules.trust_domain.as_ref().map_or_else(
            || {
                "none known (set inbound.trustDomain or give the proxy a spiffe:// certificate)"
                    .to_owned()
            },
            ToString::to_string,
        );
        return Err(Denial::new(
            Reason::PeerTrustDomainNotAllowed,
            format!(
                "{principal} is from trust domain {peer_domain}, this service admits peers of its own trust domain ({ours}) only; to admit this workload, add spiffeId {principal} to {}",
                how_to_admit(tenant)
            ),
        ));
    }
    match &peer.tenant {
        Some(theirs) if theirs.tenant() == tenant => Ok(()),
        Some(theirs) => Err(Denial::new(
            Reason::PeerTenantNotAllowed,
            format!(
                "{principal} belongs to tenant {}, this service to tenant {tenant}; to admit it, add spiffeId {principal}, namespace {} or tenant {} to {}",
                theirs.tenant(),
                peer.workload.namespace(),
                theirs.tenant(),
                how_to_admit(tenant)
            ),
        )),
        None => Err(Denial::new(
            Reason::PeerTenantNotAllowed,
            format!(
                "the certificate of {principal} names no tenant, and this service admits its own tenant {tenant} only; use a workload certificate issued by the mesh, or add spiffeId {principal} or namespace {} to {}",
                peer.workload.namespace(),
                how_to_admit(tenant)
            ),
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use portcullis_crds::{PolicyBundle, RevokedCertificate};

    use super::*;
    use portcullis_api::spiffe::{TenantId, WorkloadId};

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).unwrap()
    }

    fn peer(domain: &str, ns: &str, tenant: Option<&str>) -> (PeerIdentity, String) {
        let workload = WorkloadId::new(td(domain), ns, "api").unwrap();
        let principal = workload.to_string();
        let identity = PeerIdentity {
            tenant: tenant.map(|t| TenantId::new(td(domain), t).unwrap()),
            workload,
            serial: "0a".into(),
        };
        (identity, principal)
    }

    fn bundle(allowed: Vec<AllowedPeer>) -> CompiledPolicy {
        CompiledPolicy::from(PolicyBundle {
            tenant: "acme".into(),
            allowed_peers: allowed,
            ..PolicyBundle::default()
        })
    }

    fn rules() -> PeerRules {
        PeerRules {
            trust_domain: Some(td("cluster.local")),
            allowed_peers: vec![],
        }
    }

    fn reason(result: Result<(), Denial>) -> Option<Reason> {
        result.err().map(|d| d.reason)
    }

    #[test]
    fn own_tenant_and_trust_domain_only_by_default() {
        let policy = bundle(vec![]);
        let (own, id) = peer("cluster.local", "acme-prod", Some("acme"));
        assert!(authorize_peer(&own, &id, &rules(), &policy).is_ok());
        let (other, id) = peer("cluster.local", "globex", Some("globex"));
        assert_eq!(
            reason(authorize_peer(&other, &id, &rules(), &policy)),
            Some(Reason::PeerTenantNotAllowed)
        );
        let (foreign, id) = peer("evil.example", "acme-prod", Some("acme"));
        assert_eq!(
            reason(authorize_peer(&foreign, &id, &rules(), &policy)),
            Some(Reason::PeerTrustDomainNotAllowed)
        );
        let unknown = PeerRules::default();
        assert_eq!(
            reason(authorize_peer(&own, &id, &unknown, &policy)),
            Some(Reason::PeerTrustDomainNotAllowed)
        );
    }

    #[test]
    fn named_peers_get_in_and_names_stay_in_the_trust_domain() {
        let (other, id) = peer("cluster.local", "globex", Some("globex"));
        for entry in [
            AllowedPeer::tenant("globex"),
            AllowedPeer::namespace("globex"),
            AllowedPeer::spiffe_id(id.clone()),
        ] {
            let policy = bundle(vec![entry.clone()]);
            assert!(
                authorize_peer(&other, &id, &rules(), &policy).is_ok(),
                "{entry:?}"
            );
            let pod = PeerRules {
                allowed_peers: vec![entry.clone()],
                ..rules()
            };
            assert!(
                authorize_peer(&other, &id, &pod, &bundle(vec![])).is_ok(),
                "{entry:?}"
            );
        }
        // A namespace or tenant name never admits another trust domain's workloads.
        let (foreign, fid) = peer("evil.example", "globex", Some("globex"));
        let policy = bundle(vec![
            AllowedPeer::tenant("globex"),
            AllowedPeer::namespace("globex"),
        ]);
        assert!(authorize_peer(&foreign, &fid, &rules(), &policy).is_err());
        let by_id = bundle(vec![AllowedPeer::spiffe_id(fid.clone())]);
        assert!(authorize_peer(&foreign, &fid, &rules(), &by_id).is_ok());
    }

    #[test]
    fn revoked_certificates_are_refused_even_when_named() {
        let (own, id) = peer("cluster.local", "acme-prod", Some("acme"));
        let policy = CompiledPolicy::from(PolicyBundle {
            tenant: "acme".into(),
            allowed_peers: vec![AllowedPeer::spiffe_id(id.clone())],
            revoked_certificates: vec![RevokedCertificate {
                serial: "0a".into(),
                spiffe_id: id.clone(),
                not_after: jiff::Timestamp::now(),
            }],
            ..PolicyBundle::default()
        });
        let denial = authorize_peer(&own, &id, &rules(), &policy).unwrap_err();
        assert_eq!(denial.reason, Reason::PeerCertificateRevoked);
        assert!(denial.error.contains("serial 0a"));
    }
}
