//! The audit witness's judgement of a tenant's newest seal, with seals signed by serving
//! certificates from the operator's real CA: the first seal and each later one are
//! anchored; the same seal again changes nothing; a seal that went back, a seal number
//! whose digest changed, a seal of another tenant and a seal signed by a workload are
//! refused with what it means.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use jiff::Timestamp;
use portcullis_audit::checkpoint::{CheckpointSigner, SignerIdentity};
use portcullis_audit::seal::{Seal, SealedHead};
use portcullis_audit::verify::TrustBundle;
use portcullis_crds::SealAnchor;
#[path = "support/ca.rs"]
mod ca_support;
use ca_support::{new_ca, workload_identity};
use portcullis_operator::audit_witness::{MAX_ANCHORS, Verdict, judge};
use portcullis_operator::ca::CertificateAuthority;

/// The collector's signer: its serving certificate from the CA.
fn collector_signer(ca: &CertificateAuthority) -> CheckpointSigner {
    let issued = ca
        .issue_server_certificate(&["portcullis-audit.portcullis-system.svc".to_owned()])
        .unwrap();
    let mut chain = issued.chain.iter().map(|c| c.to_vec());
    let identity = SignerIdentity {
        spiffe_id: None,
        certificate_der: chain.next(),
        intermediates_der: chain.collect(),
    };
    CheckpointSigner::from_pkcs8(issued.key.secret_pkcs8_der(), identity).unwrap()
}

/// A workload's signer: its leaf from the identity service.
fn workload_signer(ca: &CertificateAuthority) -> CheckpointSigner {
    let (chain, key) = workload_identity(ca, "acme");
    let identity = SignerIdentity {
        spiffe_id: Some("spiffe://cluster.local/ns/acme/sa/web".into()),
        certificate_der: chain.first().map(|c| c.to_vec()),
        intermediates_der: chain[1..].iter().map(|c| c.to_vec()).collect(),
    };
    CheckpointSigner::from_pkcs8(key.secret_der(), identity).unwrap()
}

fn seal(signer: &CheckpointSigner, tenant: &str, previous: Option<(u64, &str)>, seq: u64) -> Seal {
    let heads = BTreeMap::from([(
        "web-1".to_owned(),
        SealedHead {
            seq,
            hash: format!("{seq:064}"),
        },
    )]);
    Seal::sign(signer, tenant, previous, heads, Timestamp::now()).unwrap()
}

fn line(seal: &Seal) -> String {
    serde_json::to_string(seal).unwrap()
}

fn anchored(verdict: Verdict) -> Vec<SealAnchor> {
    match verdict {
        Verdict::Anchor(anchors) => anchors,
        other => panic!("expected an anchor, got {other:?}"),
    }
}

fn refused(verdict: Verdict) -> String {
    match verdict {
        Verdict::Refused(why) => why,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn each_newer_seal_is_anchored_and_the_same_one_changes_nothing() {
    let ca = new_ca();
    let bundle = TrustBundle::from_pem(ca.trust_bundle_pem().as_bytes()).unwrap();
    let signer = collector_signer(&ca);
    let first = seal(&signer, "acme", None, 3);
    let anchors = anchored(judge("acme", &[], &line(&first), &bundle));
    assert_eq!(anchors.len(), 1);
    assert_eq!(anchors[0].number, 0);
    assert_eq!(anchors[0].digest, first.digest().unwrap());

    assert_eq!(
        judge("acme", &anchors, &line(&first), &bundle),
        Verdict::Unchanged
    );

    let digest = first.digest().unwrap();
    let second = seal(&signer, "acme", Some((0, &digest)), 9);
    let anchors = anchored(judge("acme", &anchors, &line(&second), &bundle));
    assert_eq!(anchors.iter().map(|a| a.number).collect::<Vec<_>>(), [0, 1]);
}

#[test]
fn anchors_stay_bounded_and_keep_the_first() {
    let ca = new_ca();
    let bundle = TrustBundle::from_pem(ca.trust_bundle_pem().as_bytes()).unwrap();
    let signer = collector_signer(&ca);
    let mut anchors = Vec::new();
    let mut previous: Option<(u64, String)> = None;
    for seq in 0..(MAX_ANCHORS as u64 + 10) {
        let next = seal(
            &signer,
            "acme",
            previous.as_ref().map(|(n, d)| (*n, d.as_str())),
            seq,
        );
        anchors = anchored(judge("acme", &anchors, &line(&next), &bundle));
        previous = Some((next.number, next.digest().unwrap()));
    }
    assert_eq!(anchors.len(), MAX_ANCHORS);
    assert_eq!(anchors[0].number, 0);
    assert_eq!(anchors.last().unwrap().number, MAX_ANCHORS as u64 + 9);
}

#[test]
fn a_rewritten_or_rewound_log_is_refused() {
    let ca = new_ca();
    let bundle = TrustBundle::from_pem(ca.trust_bundle_pem().as_bytes()).unwrap();
    let signer = collector_signer(&ca);
    let first = seal(&signer, "acme", None, 3);
    let digest = first.digest().unwrap();
    let second = seal(&signer, "acme", Some((0, &digest)), 9);
    let anchors = anchored(judge("acme", &[], &line(&first), &bundle));
    let anchors = anchored(judge("acme", &anchors, &line(&second), &bundle));

    // The collector's key seals a rebuilt log: seal 1 again, with other heads.
    let rebuilt = seal(&signer, "acme", Some((0, &digest)), 7);
    let why = refused(judge("acme", &anchors, &line(&rebuilt), &bundle));
    assert!(why.contains("rewritten"), "{why}");

    // Or it starts over.
    let why = refused(judge("acme", &anchors, &line(&first), &bundle));
    assert!(why.contains("lost or replaced"), "{why}");
}

#[test]
fn a_seal_of_another_tenant_or_by_a_workload_is_refused() {
    let ca = new_ca();
    let bundle = TrustBundle::from_pem(ca.trust_bundle_pem().as_bytes()).unwrap();
    let other_tenant = seal(&collector_signer(&ca), "globex", None, 3);
    let why = refused(judge("acme", &[], &line(&other_tenant), &bundle));
    assert!(why.contains("globex"), "{why}");

    let by_workload = seal(&workload_signer(&ca), "acme", None, 3);
    let why = refused(judge("acme", &[], &line(&by_workload), &bundle));
    assert!(why.contains("not signed by the audit collector"), "{why}");

    let elsewhere = seal(&collector_signer(&new_ca()), "acme", None, 3);
    let why = refused(judge("acme", &[], &line(&elsewhere), &bundle));
    assert!(why.contains("not signed by the audit collector"), "{why}");
}
