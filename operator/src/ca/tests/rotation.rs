//! Rotation schedules and the overlapping trust bundle.

use super::*;
use crate::ca::authority::{CaState, RotationEvent};
use crate::ca::csr::validate_csr;

fn issue_at(
    state: &mut CaState,
    s: &CaSettings,
    at: Timestamp,
) -> portcullis_api::identity::IssueResponse {
    let id = workload("ns", "sa");
    let csr = validate_csr(&good_csr(&p256(), &id), &id).unwrap();
    state.issue_leaf(&csr, &id, &tenant("t"), s, at).unwrap()
}

fn bundle_fingerprints(state: &CaState) -> Vec<String> {
    state
        .trust_bundle()
        .iter()
        .map(|c| c.fingerprint().to_string())
        .collect()
}

#[test]
fn intermediate_rotates_on_schedule_under_the_same_root() {
    let s = fast_settings();
    let mut state = CaState::generate(&s, t(0)).unwrap();
    let root = state.active_root().fingerprint().to_string();
    let first = state.intermediate().fingerprint().to_string();
    assert!(state.rotate(&s, t(29)).unwrap().is_empty());
    let events = state.rotate(&s, t(30)).unwrap();
    assert!(
        matches!(
            events.as_slice(),
            [RotationEvent::IntermediateRotated { .. }]
        ),
        "{events:?}"
    );
    assert_ne!(state.intermediate().fingerprint(), first);
    assert_eq!(state.active_root().fingerprint(), root);
    // A leaf from the old intermediate still verifies: the root did not change.
    let mut old_state = CaState::generate(&s, t(0)).unwrap();
    let old_leaf = issue_at(&mut old_state, &s, t(25));
    old_state.rotate(&s, t(30)).unwrap();
    verify_client_chain(
        &old_leaf.certificate,
        &old_leaf.chain,
        &old_state.trust_bundle_pem(),
        t(31),
    )
    .unwrap();
}

#[test]
fn a_root_leaves_the_bundle_only_after_its_last_leaf_expired() {
    let s = fast_settings(); // leaf lifetime 20 s, root period 100 s, publish lead 20 s
    let mut state = CaState::generate(&s, t(0)).unwrap();
    let old_root = state.active_root().fingerprint().to_string();

    // Before the publish time, one root.
    for second in 1..80 {
        state.rotate(&s, t(second)).unwrap();
    }
    assert_eq!(bundle_fingerprints(&state), vec![old_root.clone()]);

    // At 80 s the next root is published, not yet signing.
    let events = state.rotate(&s, t(80)).unwrap();
    let Some(RotationEvent::NextRootPublished {
        fingerprint: new_root,
        activates_at,
    }) = events.first().cloned()
    else {
        panic!("expected the next root at 80 s, got {events:?}");
    };
    assert_eq!(activates_at, t(100));
    assert_eq!(
        bundle_fingerprints(&state),
        vec![new_root.clone(), old_root.clone()]
    );
    let late_old_leaf = issue_at(&mut state, &s, t(99)); // last leaf of the old root: expires at 119
    assert_eq!(state.active_root().fingerprint(), old_root);

    // At 100 s the new root signs; the old one stays for its leaves.
    let events = state.rotate(&s, t(100)).unwrap();
    assert!(events.contains(&RotationEvent::RootActivated {
        fingerprint: new_root.clone(),
        retired: old_root.clone()
    }));
    assert_eq!(state.active_root().fingerprint(), new_root);
    let new_leaf = issue_at(&mut state, &s, t(101));
    let bundle_now = state.trust_bundle_pem();
    verify_client_chain(
        &late_old_leaf.certificate,
        &late_old_leaf.chain,
        &bundle_now,
        t(110),
    )
    .unwrap();
    verify_client_chain(&new_leaf.certificate, &new_leaf.chain, &bundle_now, t(110)).unwrap();
    // A workload that fetched the bundle when the new root was published trusts new leaves.
    verify_client_chain(
        &new_leaf.certificate,
        &new_leaf.chain,
        &late_old_leaf.trust_bundle,
        t(110),
    )
    .unwrap();

    for second in 101..119 {
        state.rotate(&s, t(second)).unwrap();
        assert!(
            bundle_fingerprints(&state).contains(&old_root),
            "old root dropped at {second} s while a leaf was valid"
        );
    }
    let events = state.rotate(&s, t(119)).unwrap();
    assert!(
        events.contains(&RotationEvent::RootDropped {
            fingerprint: old_root.clone()
        }),
        "{events:?}"
    );
    assert_eq!(bundle_fingerprints(&state), vec![new_root]);
}

#[test]
fn a_root_without_leaves_leaves_at_once_and_a_late_operator_still_publishes_ahead() {
    let s = fast_settings();
    let mut state = CaState::generate(&s, t(0)).unwrap();
    let old_root = state.active_root().fingerprint().to_string();
    // The operator was down from 0 to 150 s: the next root must still be published a
    // full lead (20 s) before it signs, not activated on the spot.
    let events = state.rotate(&s, t(150)).unwrap();
    let activates_at = events
        .iter()
        .find_map(|e| match e {
            RotationEvent::NextRootPublished { activates_at, .. } => Some(*activates_at),
            _ => None,
        })
        .unwrap();
    assert_eq!(activates_at, t(170));
    assert_eq!(state.active_root().fingerprint(), old_root);
    let events = state.rotate(&s, t(170)).unwrap();
    assert!(
        events.contains(&RotationEvent::RootDropped {
            fingerprint: old_root
        }),
        "{events:?}"
    );
    assert_eq!(state.trust_bundle().len(), 1);
}

#[test]
fn max_leaf_expiry_tracks_the_latest_leaf() {
    let s = fast_settings();
    let mut state = CaState::generate(&s, t(0)).unwrap();
    assert_eq!(state.active_max_leaf_expiry(), None);
    issue_at(&mut state, &s, t(10));
    issue_at(&mut state, &s, t(5));
    assert_eq!(state.active_max_leaf_expiry(), Some(t(30)));
}
