//! The rotation phases on the KEK Secret, and counting what is still under old keys.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

fn kek_secret(key: &SecretKek, created: Timestamp) -> Secret {
    let mut secret = Secret {
        data: Some(key.to_secret_data()),
        ..Secret::default()
    };
    set_annotation(&mut secret, CREATED_ANNOTATION, created.to_string());
    secret
}

fn at(seconds: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + seconds).unwrap()
}

fn settings() -> KekRotationSettings {
    KekRotationSettings {
        period: Some(Duration::from_secs(1000)),
        propagation: Duration::from_secs(30),
        ..KekRotationSettings::new("portcullis-kek")
    }
}

#[test]
fn a_rotation_stages_then_promotes_then_retires() {
    let first = SecretKek::generate();
    let mut secret = kek_secret(&first, at(0));
    let s = settings();
    assert_eq!(plan(&secret, at(10), &s), Step::Idle);

    // On demand: a new annotation value, handled once.
    set_annotation(&mut secret, ROTATE_ANNOTATION, "1".into());
    let trigger = Trigger::Annotation("1".into());
    assert_eq!(plan(&secret, at(10), &s), Step::Stage(trigger.clone()));
    let next = SecretKek::generate();
    stage(&mut secret, &next, &trigger, at(10));
    // Staged: every replica's keyring opens the next key, the current one still wraps.
    let ring = Kek::from_secret_data(secret.data.as_ref().unwrap()).unwrap();
    assert_eq!(ring.id(), first.id());
    assert_eq!(ring.unwrap_only(), vec![Kek::from(next.clone()).key_ref()]);
    assert_eq!(plan(&secret, at(20), &s), Step::WaitForReplicas);
    assert_eq!(plan(&secret, at(40), &s), Step::Promote);

    assert_eq!(
        promote(&mut secret, at(40)).unwrap(),
        (first.id(), next.id())
    );
    let ring = Kek::from_secret_data(secret.data.as_ref().unwrap()).unwrap();
    assert_eq!(ring.id(), next.id());
    assert_eq!(previous_ids(&secret), vec![first.id().to_string()]);
    assert!(!secret.data.as_ref().unwrap().contains_key(KEK_NEXT_KEY));
    assert_eq!(current_since(&secret), Some(at(40)));
    assert_eq!(plan(&secret, at(50), &s), Step::WaitForReplicas);
    assert_eq!(plan(&secret, at(80), &s), Step::Rewrap);

    retire(&mut secret);
    assert!(previous_ids(&secret).is_empty());
    // The same annotation value does not rotate again; the schedule counts from now.
    assert_eq!(plan(&secret, at(500), &s), Step::Idle);
    assert_eq!(plan(&secret, at(1040), &s), Step::Stage(Trigger::Schedule));
    let disabled = KekRotationSettings {
        period: None,
        ..settings()
    };
    assert_eq!(plan(&secret, at(99_999), &disabled), Step::Idle);
}

#[test]
fn blobs_under_old_keys_are_counted_by_header_only() {
    let old = Kek::generate();
    let new = Kek::generate();
    let ring = Kek::keyring(&new, std::slice::from_ref(&old));
    let data = BTreeMap::from([
        ("v1".to_owned(), ByteString(old.wrap(b"dek", b"a").unwrap())),
        ("v2".to_owned(), ByteString(new.wrap(b"dek", b"b").unwrap())),
        (
            "ca.key.wrapped".to_owned(),
            ByteString(old.wrap(b"key", b"c").unwrap()),
        ),
        ("ca.crt".to_owned(), ByteString(b"-----BEGIN".to_vec())),
        ("version".to_owned(), ByteString(vec![1; 64])),
    ]);
    assert_eq!(blobs_under_old_keys(&data, &ring), 2);
    assert_eq!(blobs_under_old_keys(&data, &old), 1);
}

fn sealed(byte: u8, key_id: &str) -> SealedKek {
    SealedKek {
        ciphertext: vec![byte; 48],
        key_id: key_id.to_owned(),
        annotations: std::collections::HashMap::from([("a".to_owned(), vec![byte])]),
    }
}

#[test]
fn a_kms_rotation_keeps_the_sealed_keys_under_their_prefixes() {
    let first = sealed(1, "key-1");
    let next = sealed(2, "key-2");
    let mut secret = Secret {
        data: Some(first.to_secret_data()),
        ..Secret::default()
    };
    secret.metadata.name = Some("portcullis-kek".into());
    set_annotation(&mut secret, CREATED_ANNOTATION, at(0).to_string());
    let s = settings();
    stage_kms(&mut secret, &next, &Trigger::Schedule, at(10));
    assert!(is_kms(&secret));
    assert_eq!(plan(&secret, at(20), &s), Step::WaitForReplicas);
    assert_eq!(plan(&secret, at(40), &s), Step::Promote);
    let data = secret.data.clone().unwrap();
    assert_eq!(
        SealedKek::unwrap_only(&data, "ns/portcullis-kek").unwrap(),
        vec![next.clone()]
    );
    assert_eq!(
        SealedKek::from_secret_data(&data, "ns/portcullis-kek").unwrap(),
        first
    );

    let (old, new) = promote_kms(&mut secret, at(40)).unwrap();
    assert_eq!(
        (old, new),
        (
            kms::key_id(&first.ciphertext),
            kms::key_id(&next.ciphertext)
        )
    );
    let data = secret.data.clone().unwrap();
    assert_eq!(
        SealedKek::from_secret_data(&data, "ns/portcullis-kek").unwrap(),
        next
    );
    assert_eq!(
        SealedKek::unwrap_only(&data, "ns/portcullis-kek").unwrap(),
        vec![first.clone()]
    );
    assert_eq!(previous_ids(&secret), vec![old.to_string()]);
    assert_eq!(
        kms::keyring_ids(&data, "ns/portcullis-kek").unwrap(),
        vec![new, old]
    );
    assert!(!has_next(&secret));
    assert_eq!(plan(&secret, at(80), &s), Step::Rewrap);

    retire(&mut secret);
    let data = secret.data.clone().unwrap();
    assert!(
        SealedKek::unwrap_only(&data, "ns/portcullis-kek")
            .unwrap()
            .is_empty()
    );
    assert_eq!(data, next.to_secret_data());
}

#[test]
fn a_pkcs11_rotation_moves_labels_and_never_key_material() {
    use crate::envelope::pkcs11::{KeyLabels, key_id, labels as hsm};

    let mut secret = Secret {
        data: Some(KeyLabels::new("kek").to_secret_data("token")),
        ..Secret::default()
    };
    set_annotation(&mut secret, CREATED_ANNOTATION, at(0).to_string());
    set_annotation(&mut secret, ROTATE_ANNOTATION, "1".into());
    let s = settings();
    let trigger = Trigger::Annotation("1".into());
    assert_eq!(plan(&secret, at(10), &s), Step::Stage(trigger.clone()));

    // What pkcs11::stage records once the HSM made the key: its label.
    let label = hsm::rotated_label("kek", at(10));
    stage_entries(
        &mut secret,
        BTreeMap::from([(
            hsm::NEXT_LABEL_KEY.to_owned(),
            ByteString(label.clone().into_bytes()),
        )]),
        &trigger,
        at(10),
    );
    assert_eq!(plan(&secret, at(20), &s), Step::WaitForReplicas);
    assert_eq!(plan(&secret, at(40), &s), Step::Promote);

    let (old, new) = pkcs11::promote(&mut secret, "ns/portcullis-kek", "token", at(40)).unwrap();
    assert_eq!(
        (old, new),
        (key_id("token", "kek"), key_id("token", &label))
    );
    let labels = pkcs11::labels(&secret, "ns/portcullis-kek").unwrap();
    assert_eq!(
        labels,
        KeyLabels {
            current: label.clone(),
            next: None,
            previous: vec!["kek".into()],
        }
    );
    assert_eq!(previous_ids(&secret), vec![old.to_string()]);
    assert_eq!(annotation(&secret, ID_ANNOTATION), Some(&*new.to_string()));
    assert_eq!(plan(&secret, at(80), &s), Step::Rewrap);

    assert_eq!(pkcs11::previous_labels(&secret), vec!["kek".to_owned()]);
    retire(&mut secret);
    assert!(previous_ids(&secret).is_empty());
    assert_eq!(
        pkcs11::labels(&secret, "ns/portcullis-kek").unwrap(),
        KeyLabels::new(label)
    );
    assert_eq!(plan(&secret, at(500), &s), Step::Idle);
}
