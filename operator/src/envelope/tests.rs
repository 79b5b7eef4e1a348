//! The wrapped formats: round trips, v1 compatibility, the v2 header, and the errors that
//! tell another key from tampering. The pkcs11 provider is tested against SoftHSM in
//! `tests/kek_pkcs11.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};

use super::*;

/// A v1 blob exactly as the code before providers wrote it: `[1][id][nonce][ct+tag]`,
/// AES-256-GCM with AAD `[1][id] || aad`.
fn v1_blob(key: &SecretKek, nonce: [u8; NONCE_LEN], plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    let mut out = vec![1u8];
    out.extend_from_slice(key.id().as_bytes());
    let full_aad = [&out[..], aad].concat();
    out.extend_from_slice(&nonce);
    let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key.to_bytes()));
    let sealed = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad: &full_aad,
            },
        )
        .unwrap();
    out.extend_from_slice(&sealed);
    out
}

/// A v2 blob `[2][provider][id][nonce][ct+tag]` sealed with `key`.
fn v2_blob(key: &SecretKek, provider: u8, id: KekId, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    let mut out = vec![2u8, provider];
    out.extend_from_slice(id.as_bytes());
    let full_aad = [&out[..], aad].concat();
    let nonce = [9u8; NONCE_LEN];
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&key.seal(&nonce, &full_aad, plaintext).unwrap());
    out
}

#[test]
fn round_trip_with_aad() {
    let kek = Kek::generate();
    assert_eq!(kek.provider(), KekProvider::Secret);
    let wrapped = kek.wrap(b"secret key bytes", b"slot-a").unwrap();
    // The secret provider keeps writing v1, which every released operator reads.
    assert_eq!(wrapped[0], ENVELOPE_VERSION_1);
    assert_eq!(wrapped.len(), V1_HEADER_LEN + 16 + TAG_LEN);
    assert_eq!(
        kek.unwrap(&wrapped, b"slot-a").unwrap(),
        b"secret key bytes"
    );
    // A fresh nonce each time.
    assert_ne!(kek.wrap(b"secret key bytes", b"slot-a").unwrap(), wrapped);
    assert_eq!(kek.unwrap(&kek.wrap(b"", b"").unwrap(), b"").unwrap(), b"");
}

#[test]
fn a_v1_blob_written_before_providers_still_unwraps() {
    let key = SecretKek::from_bytes(&[0x42; 32]).unwrap();
    let blob = v1_blob(&key, [3; NONCE_LEN], b"dek v1", b"portcullis-dek/acme/1");
    let kek = Kek::from(key.clone());
    assert_eq!(
        kek.unwrap(&blob, b"portcullis-dek/acme/1").unwrap(),
        b"dek v1"
    );
    // The same key loaded again from its Secret reads it too.
    let reloaded = Kek::from_secret_data(&key.to_secret_data()).unwrap();
    assert_eq!(
        reloaded.unwrap(&blob, b"portcullis-dek/acme/1").unwrap(),
        b"dek v1"
    );
    assert_eq!(
        kek.unwrap(&blob, b"portcullis-dek/acme/2"),
        Err(EnvelopeError::Tampered)
    );
}

#[test]
fn the_v2_header_records_provider_and_key_and_is_authenticated() {
    let key = SecretKek::generate();
    let kek = Kek::from(key.clone());
    let blob = v2_blob(&key, 1, key.id(), b"plaintext", b"aad");
    assert_eq!(blob.len(), V2_HEADER_LEN + 9 + TAG_LEN);
    assert_eq!(&blob[2..2 + KEK_ID_LEN], key.id().as_bytes());
    assert_eq!(kek.unwrap(&blob, b"aad").unwrap(), b"plaintext");
    assert_eq!(kek.unwrap(&blob, b"other"), Err(EnvelopeError::Tampered));
    for i in V2_AUTHENTICATED..blob.len() {
        let mut t = blob.clone();
        t[i] ^= 0x01;
        assert_eq!(
            kek.unwrap(&t, b"aad"),
            Err(EnvelopeError::Tampered),
            "byte {i}"
        );
    }
    // The provider byte is part of the key's identity: the same id under another
    // provider is another key, named as such before any decryption.
    let mut as_pkcs11 = blob.clone();
    as_pkcs11[1] = KekProvider::Pkcs11.byte();
    let err = kek.unwrap(&as_pkcs11, b"aad").unwrap_err();
    assert_eq!(
        err,
        EnvelopeError::WrongKey {
            expected: KeyRef {
                provider: KekProvider::Secret,
                id: key.id()
            },
            found: KeyRef {
                provider: KekProvider::Pkcs11,
                id: key.id()
            },
        }
    );
    let message = err.to_string();
    assert!(
        message.contains(&format!("wrapped under pkcs11 KEK {}", key.id()))
            && message.contains(&format!("loaded KEK is secret KEK {}", key.id())),
        "{message}"
    );
    let mut unknown = blob.clone();
    unknown[1] = 9;
    assert_eq!(
        kek.unwrap(&unknown, b"aad"),
        Err(EnvelopeError::UnknownProvider(9))
    );
    assert_eq!(
        kek.unwrap(&blob[..V2_HEADER_LEN + TAG_LEN - 1], b"aad"),
        Err(EnvelopeError::Truncated {
            len: V2_HEADER_LEN + TAG_LEN - 1,
            min: V2_HEADER_LEN + TAG_LEN
        })
    );
}

#[test]
fn wrong_key_is_named_as_such() {
    let (a, b) = (Kek::generate(), Kek::generate());
    let wrapped = a.wrap(b"x", b"").unwrap();
    assert_eq!(
        b.unwrap(&wrapped, b""),
        Err(EnvelopeError::WrongKey {
            expected: b.key_ref(),
            found: a.key_ref()
        })
    );
}

#[test]
fn tampering_is_detected_anywhere() {
    let kek = Kek::generate();
    let wrapped = kek.wrap(b"plaintext", b"aad").unwrap();
    for i in V1_AUTHENTICATED..wrapped.len() {
        let mut t = wrapped.clone();
        t[i] ^= 0x01;
        assert_eq!(
            kek.unwrap(&t, b"aad"),
            Err(EnvelopeError::Tampered),
            "byte {i}"
        );
    }
    assert_eq!(
        kek.unwrap(&wrapped, b"other slot"),
        Err(EnvelopeError::Tampered)
    );
    let mut t = wrapped.clone();
    t[1] ^= 0x01;
    assert!(matches!(
        kek.unwrap(&t, b"aad"),
        Err(EnvelopeError::WrongKey { .. })
    ));
}

#[test]
fn truncation_and_versions() {
    let kek = Kek::generate();
    let wrapped = kek.wrap(b"plaintext", b"").unwrap();
    assert_eq!(
        kek.unwrap(&[], b""),
        Err(EnvelopeError::Truncated {
            len: 0,
            min: V1_HEADER_LEN + TAG_LEN
        })
    );
    assert!(matches!(
        kek.unwrap(&wrapped[..V1_HEADER_LEN + 3], b""),
        Err(EnvelopeError::Truncated { .. })
    ));
    // Cut inside the ciphertext: long enough for a header + tag, fails authentication.
    assert_eq!(
        kek.unwrap(&wrapped[..wrapped.len() - 1], b""),
        Err(EnvelopeError::Tampered)
    );
    for version in [0, 3, 0xff] {
        let mut other = wrapped.clone();
        other[0] = version;
        assert_eq!(
            kek.unwrap(&other, b""),
            Err(EnvelopeError::UnsupportedVersion(version))
        );
    }
}

#[test]
fn serialisation_round_trips_and_debug_is_redacted() {
    let key = SecretKek::generate();
    let kek = Kek::from(key.clone());
    let again = Kek::from_secret_data(&key.to_secret_data()).unwrap();
    assert_eq!(again.id(), kek.id());
    assert_eq!(
        SecretKek::from_base64(&key.to_base64()).unwrap().to_bytes(),
        key.to_bytes()
    );
    assert_eq!(Kek::from_base64(&key.to_base64()).unwrap().id(), key.id());
    assert_eq!(
        Kek::from_bytes(&[0u8; 31]).unwrap_err(),
        EnvelopeError::InvalidKeyLength(31)
    );
    assert!(Kek::from_secret_data(&BTreeMap::new()).is_err());
    let printed = format!("{kek:?}");
    assert!(
        printed.contains("redacted") && printed.contains("secret"),
        "{printed}"
    );
    assert!(!printed.contains(&key.to_base64()));
    assert!(!printed.contains(&hex::encode(key.to_bytes())));
    let data = kek.wrap(b"x", b"").unwrap();
    let wrong = Kek::generate().unwrap(&data, b"").unwrap_err().to_string();
    assert!(!wrong.contains(&hex::encode(key.to_bytes())));
}

#[test]
fn pkcs11_key_ids_depend_on_both_labels() {
    let id = pkcs11::key_id("portcullis", "portcullis-kek");
    assert_eq!(id, pkcs11::key_id("portcullis", "portcullis-kek"));
    assert_ne!(id, pkcs11::key_id("portcullis", "portcullis-kek-2"));
    assert_ne!(id, pkcs11::key_id("other", "portcullis-kek"));
    // Length-prefixed: moving the boundary between the labels changes the id.
    assert_ne!(pkcs11::key_id("ab", "c"), pkcs11::key_id("a", "bc"));
}

#[test]
fn a_keyring_wraps_under_the_current_key_and_unwraps_under_previous_ones() {
    let old = Kek::generate();
    let v1_under_old = old.wrap(b"ca key", b"slot").unwrap();
    let new = Kek::generate();
    let ring = Kek::keyring(&new, std::slice::from_ref(&old));
    assert_eq!(ring.key_ref(), new.key_ref());
    assert_eq!(ring.unwrap_only(), vec![old.key_ref()]);
    // Old blobs (v1, as the secret provider writes) still open, bound to their AAD.
    assert_eq!(ring.unwrap(&v1_under_old, b"slot").unwrap(), b"ca key");
    assert_eq!(
        ring.unwrap(&v1_under_old, b"other slot"),
        Err(EnvelopeError::Tampered)
    );
    // New blobs are under the current key, which the old key alone cannot open.
    let rewrapped = ring.wrap(b"ca key", b"slot").unwrap();
    assert_eq!(Kek::wrapped_under(&rewrapped).unwrap(), new.key_ref());
    assert_eq!(Kek::wrapped_under(&v1_under_old).unwrap(), old.key_ref());
    assert!(matches!(
        old.unwrap(&rewrapped, b"slot"),
        Err(EnvelopeError::WrongKey { .. })
    ));
    assert_eq!(new.unwrap(&rewrapped, b"slot").unwrap(), b"ca key");
}

#[test]
fn a_key_outside_the_keyring_is_refused_naming_both() {
    let ring = Kek::keyring(&Kek::generate(), &[Kek::generate()]);
    let stranger = Kek::generate();
    let wrapped = stranger.wrap(b"x", b"").unwrap();
    let err = ring.unwrap(&wrapped, b"").unwrap_err();
    assert_eq!(
        err,
        EnvelopeError::WrongKey {
            expected: ring.key_ref(),
            found: stranger.key_ref(),
        }
    );
    let text = err.to_string();
    assert!(text.contains(&ring.id().to_string()), "{text}");
    assert!(text.contains(&stranger.id().to_string()), "{text}");
}

#[test]
fn replacing_the_keyring_reaches_every_clone_of_the_handle() {
    let first = Kek::generate();
    let shared = first.clone();
    let under_first = shared.wrap(b"dek", b"t/v1").unwrap();
    let second = Kek::generate();
    first.replace_with(&Kek::keyring(&second, std::slice::from_ref(&first)));
    assert_eq!(shared.key_ref(), second.key_ref());
    assert_eq!(shared.unwrap(&under_first, b"t/v1").unwrap(), b"dek");
    assert_eq!(
        Kek::wrapped_under(&shared.wrap(b"dek", b"t/v1").unwrap()).unwrap(),
        second.key_ref()
    );
    // Duplicates and the current key itself are not kept as unwrap-only keys.
    let third = Kek::generate();
    let ring = Kek::keyring(&second, &[second.clone(), third.clone(), third.clone()]);
    assert_eq!(ring.unwrap_only(), vec![third.key_ref()]);
}

#[test]
fn the_secret_reads_next_and_previous_keys_as_unwrap_only() {
    let current = SecretKek::generate();
    let next = SecretKek::generate();
    let previous = SecretKek::generate();
    let mut data = current.to_secret_data();
    data.insert(
        KEK_NEXT_KEY.into(),
        k8s_openapi::ByteString(next.to_bytes().to_vec()),
    );
    data.insert(
        secret::previous_key(previous.id()),
        k8s_openapi::ByteString(previous.to_bytes().to_vec()),
    );
    let ring = Kek::from_secret_data(&data).unwrap();
    assert_eq!(ring.id(), current.id());
    let mut others: Vec<KekId> = ring.unwrap_only().iter().map(|k| k.id).collect();
    others.sort_by_key(|id| *id.as_bytes());
    let mut expected = vec![next.id(), previous.id()];
    expected.sort_by_key(|id| *id.as_bytes());
    assert_eq!(others, expected);
    let under_previous = Kek::from(previous).wrap(b"k", b"a").unwrap();
    assert_eq!(ring.unwrap(&under_previous, b"a").unwrap(), b"k");
    // Debug shows ids only.
    let debug = format!("{ring:?}");
    assert!(debug.contains("unwrap_only") && !debug.contains(&current.to_base64()));
    // A broken previous key is an error, not silently dropped.
    data.insert(
        format!("{KEK_PREVIOUS_PREFIX}0000"),
        k8s_openapi::ByteString(vec![1, 2, 3]),
    );
    assert_eq!(
        Kek::from_secret_data(&data).unwrap_err(),
        EnvelopeError::InvalidKeyLength(3)
    );
}
