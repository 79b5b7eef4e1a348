//! The CA in Secrets: round trips, key protection, never overwriting, conflicts, and
//! publishing the trust bundle.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use serde_json::json;

use super::kube_fixtures::{Objects, fake_api, fake_api_with, status};
use super::*;
use crate::ca::CaError;
use crate::ca::authority::CaState;
use crate::ca::bundle::publish_trust_bundle;
use crate::ca::persist::{CaSecretStore, INTERMEDIATE_SECRET, ROOT_SECRET};
use crate::envelope::{EnvelopeError, Kek};

/// Root period 30 s (leaf lifetime 20 s): a next root, an active root and a retired
/// root with a live leaf all at once by 40 s.
fn overlapping_settings() -> CaSettings {
    CaSettings {
        root_rotation_period: std::time::Duration::from_secs(30),
        ..fast_settings()
    }
}

fn state_with_everything(s: &CaSettings) -> CaState {
    let mut state = CaState::generate(s, t(0)).unwrap();
    state.rotate(s, t(10)).unwrap(); // next root published, activates at 30
    let id = workload("ns", "sa");
    let csr = crate::ca::csr::validate_csr(&good_csr(&p256(), &id), &id).unwrap();
    state.issue_leaf(&csr, &id, &tenant("t"), s, t(29)).unwrap(); // valid until 49
    state.rotate(s, t(30)).unwrap(); // next → active, old → retired
    state.rotate(s, t(40)).unwrap(); // another next root
    state
}

#[test]
fn secret_data_round_trips_and_keeps_keys_wrapped() {
    let s = overlapping_settings();
    let kek = Kek::generate();
    let state = state_with_everything(&s);
    assert!(state.next_root().is_some());
    let data = state.to_secret_data(&kek).unwrap();

    // No private key in the clear: not PEM, not the raw PKCS#8 bytes.
    let key_der = state.active.ca.key_pkcs8();
    for value in data.root.values().chain(data.intermediate.values()) {
        assert!(!String::from_utf8_lossy(&value.0).contains("PRIVATE KEY"));
        assert!(
            !value
                .0
                .windows(key_der.len())
                .any(|w| w == key_der.as_slice())
        );
    }
    assert!(!format!("{data:?}").contains("BEGIN"));
    let printed = format!("{state:?}");
    assert!(printed.contains("<redacted>"));
    assert!(
        !printed.contains(&format!("{:?}", &key_der[..16])),
        "key bytes in Debug output"
    );

    let (loaded, regenerated) =
        CaState::from_secret_data(&data.root, Some(&data.intermediate), &kek, &s, t(41)).unwrap();
    assert!(!regenerated);
    assert_eq!(loaded.active_root(), state.active_root());
    assert_eq!(loaded.next_root(), state.next_root());
    assert_eq!(loaded.intermediate(), state.intermediate());
    assert_eq!(loaded.trust_bundle_pem(), state.trust_bundle_pem());
    assert_eq!(loaded.retired.len(), 1);
    assert_eq!(loaded.retired[0].max_leaf_expiry, Some(t(49)));
    // Leaves issued after the last save are unknown: assume one leaf lifetime from now.
    assert_eq!(loaded.active_max_leaf_expiry(), Some(t(41 + 20)));
    // The loaded keys sign: a leaf from the loaded state chains to the bundle.
    let mut loaded = loaded;
    let id = workload("ns", "sa");
    let csr = crate::ca::csr::validate_csr(&good_csr(&p256(), &id), &id).unwrap();
    let leaf = loaded
        .issue_leaf(&csr, &id, &tenant("t"), &s, t(42))
        .unwrap();
    verify_client_chain(&leaf.certificate, &leaf.chain, &leaf.trust_bundle, t(43)).unwrap();
}

#[test]
fn loading_with_another_kek_or_tampered_keys_fails_clearly() {
    let s = fast_settings();
    let state = CaState::generate(&s, t(0)).unwrap();
    let data = state.to_secret_data(&Kek::generate()).unwrap();
    let err = CaState::from_secret_data(
        &data.root,
        Some(&data.intermediate),
        &Kek::generate(),
        &s,
        t(1),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            CaError::Unwrap {
                source: EnvelopeError::WrongKey { .. },
                ..
            }
        ),
        "{err}"
    );

    // Swapping in another CA's certificate breaks the key's binding (AAD).
    let kek = Kek::generate();
    let mut data = state.to_secret_data(&kek).unwrap();
    let other = CaState::generate(&s, t(0)).unwrap();
    data.root.insert(
        "ca.crt".into(),
        ByteString(other.active_root().pem().as_bytes().to_vec()),
    );
    let err = CaState::from_secret_data(&data.root, Some(&data.intermediate), &kek, &s, t(1))
        .unwrap_err();
    assert!(
        matches!(
            err,
            CaError::Unwrap {
                source: EnvelopeError::Tampered,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn an_intermediate_from_another_root_is_replaced() {
    let s = fast_settings();
    let kek = Kek::generate();
    let state = CaState::generate(&s, t(0)).unwrap();
    let other = CaState::generate(&s, t(0)).unwrap();
    let data = state.to_secret_data(&kek).unwrap();
    let foreign = other.to_secret_data(&kek).unwrap();
    let (loaded, regenerated) =
        CaState::from_secret_data(&data.root, Some(&foreign.intermediate), &kek, &s, t(5)).unwrap();
    assert!(regenerated);
    assert_ne!(loaded.intermediate(), other.intermediate());
    let (_, regenerated) = CaState::from_secret_data(&data.root, None, &kek, &s, t(5)).unwrap();
    assert!(regenerated);
}

fn secrets() -> Objects {
    Objects::default()
}

fn no_patches(call: &super::kube_fixtures::Call) -> (u16, serde_json::Value) {
    panic!("unexpected call {} {}", call.method, call.path)
}

#[tokio::test]
async fn first_start_creates_then_later_starts_load_without_writing() {
    let s = fast_settings();
    let kek = Kek::generate();
    let objects = secrets();

    let (client, log) = fake_api(objects.clone(), no_patches);
    let (_, created) =
        CaSecretStore::load_or_create(client, "portcullis-system", kek.clone(), &s, t(0))
            .await
            .unwrap();
    let calls = log.await.unwrap();
    let shape: Vec<(String, String)> = calls
        .iter()
        .map(|c| (c.method.clone(), c.path.clone()))
        .collect();
    let base = "/api/v1/namespaces/portcullis-system/secrets";
    assert_eq!(
        shape,
        vec![
            ("GET".into(), format!("{base}/{ROOT_SECRET}")),
            ("GET".into(), format!("{base}/{INTERMEDIATE_SECRET}")),
            ("POST".into(), base.into()),
            ("POST".into(), base.into()),
        ]
    );
    assert_eq!(calls[2].body["metadata"]["name"], ROOT_SECRET);
    assert_eq!(calls[3].body["metadata"]["name"], INTERMEDIATE_SECRET);

    let (client, log) = fake_api(objects.clone(), no_patches);
    let (_, loaded) =
        CaSecretStore::load_or_create(client, "portcullis-system", kek.clone(), &s, t(10))
            .await
            .unwrap();
    let calls = log.await.unwrap();
    assert!(calls.iter().all(|c| c.method == "GET"), "{calls:?}");
    assert_eq!(loaded.active_root(), created.active_root());
    assert_eq!(loaded.intermediate(), created.intermediate());

    // A different KEK is an error, and nothing is overwritten.
    let (client, log) = fake_api(objects.clone(), no_patches);
    let err =
        CaSecretStore::load_or_create(client, "portcullis-system", Kek::generate(), &s, t(10))
            .await
            .unwrap_err();
    assert!(matches!(err, CaError::Unwrap { .. }), "{err}");
    assert!(log.await.unwrap().iter().all(|c| c.method == "GET"));
}

#[tokio::test]
async fn an_orphaned_intermediate_is_not_replaced_by_a_new_ca() {
    let objects = secrets();
    objects.lock().unwrap().insert(
        INTERMEDIATE_SECRET.into(),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": INTERMEDIATE_SECRET, "resourceVersion": "1"}, "data": {}}),
    );
    let (client, log) = fake_api(objects, no_patches);
    let err = CaSecretStore::load_or_create(client, "ns", Kek::generate(), &fast_settings(), t(0))
        .await
        .unwrap_err();
    assert!(matches!(err, CaError::Corrupt(_)), "{err}");
    assert!(log.await.unwrap().iter().all(|c| c.method == "GET"));
}

#[tokio::test]
async fn a_lost_creation_race_loads_the_winner() {
    let s = fast_settings();
    let kek = Kek::generate();
    let winner = CaState::generate(&s, t(0)).unwrap();
    let data = winner.to_secret_data(&kek).unwrap();
    let secret = |name: &str, data: &BTreeMap<String, ByteString>| json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "resourceVersion": "7"}, "data": data});
    let (root, intermediate) = (
        secret(ROOT_SECRET, &data.root),
        secret(INTERMEDIATE_SECRET, &data.intermediate),
    );
    // Another replica creates the CA between our GETs and our POST.
    let hook = move |call: &super::kube_fixtures::Call,
                     store: &mut BTreeMap<String, serde_json::Value>| {
        if call.method == "POST" && store.is_empty() {
            store.insert(ROOT_SECRET.into(), root.clone());
            store.insert(INTERMEDIATE_SECRET.into(), intermediate.clone());
        }
    };
    let (client, log) = fake_api_with(secrets(), hook, no_patches);
    let (_, loaded) = CaSecretStore::load_or_create(client, "ns", kek, &s, t(1))
        .await
        .unwrap();
    let methods: Vec<String> = log
        .await
        .unwrap()
        .iter()
        .map(|c| c.method.clone())
        .collect();
    assert_eq!(methods, ["GET", "GET", "POST", "GET", "GET"]);
    assert_eq!(loaded.active_root(), winner.active_root());
    assert_eq!(loaded.intermediate(), winner.intermediate());
}

#[tokio::test]
async fn saves_use_optimistic_concurrency() {
    let s = fast_settings();
    let kek = Kek::generate();
    let objects = secrets();
    let (client, log) = fake_api(objects.clone(), no_patches);
    let (mut store, mut state) = CaSecretStore::load_or_create(client, "ns", kek.clone(), &s, t(0))
        .await
        .unwrap();
    state.rotate(&s, t(30)).unwrap();
    store.save(&state).await.unwrap();
    // Someone else changes the root Secret: our next save must not clobber it.
    objects.lock().unwrap().get_mut(ROOT_SECRET).unwrap()["metadata"]["resourceVersion"] =
        json!("999");
    state.rotate(&s, t(60)).unwrap();
    let err = store.save(&state).await.unwrap_err();
    assert!(matches!(err, CaError::Conflict(_)), "{err}");
    drop(store);
    let calls = log.await.unwrap();
    let puts: Vec<&str> = calls
        .iter()
        .filter(|c| c.method == "PUT")
        .map(|c| c.path.as_str())
        .collect();
    assert_eq!(
        puts.len(),
        3,
        "root + intermediate, then the refused root: {puts:?}"
    );
    assert!(
        calls
            .iter()
            .filter(|c| c.method == "PUT")
            .all(|c| c.body["metadata"]["resourceVersion"].is_string())
    );
}

#[tokio::test]
async fn the_bundle_is_applied_to_every_namespace() {
    let (client, log) = fake_api(secrets(), |call| {
        if call.path.contains("/namespaces/broken/") {
            (500, status(500, "InternalError"))
        } else {
            (200, call.body.clone())
        }
    });
    let namespaces = vec![
        "acme-prod".to_string(),
        "broken".to_string(),
        "acme-dev".to_string(),
    ];
    let err = publish_trust_bundle(client, &namespaces, "PEM ROOTS")
        .await
        .unwrap_err();
    assert_eq!(err.failures.len(), 1);
    assert_eq!(err.failures[0].0, "broken");
    let calls = log.await.unwrap();
    assert_eq!(calls.len(), 3, "every namespace is tried");
    for (call, ns) in calls.iter().zip(&namespaces) {
        assert_eq!(call.method, "PATCH");
        assert_eq!(
            call.path,
            format!("/api/v1/namespaces/{ns}/configmaps/portcullis-trust-bundle")
        );
        assert!(
            call.query.contains("fieldManager=portcullis-operator"),
            "{}",
            call.query
        );
        assert!(call.query.contains("force=true"), "{}", call.query);
        assert_eq!(call.content_type, "application/apply-patch+yaml");
        assert_eq!(call.body["apiVersion"], "v1");
        assert_eq!(call.body["kind"], "ConfigMap");
        assert_eq!(call.body["data"]["ca-bundle.crt"], "PEM ROOTS");
    }
}
