//! The kms key-encryption key against the KMS v2 test plugin on a Unix socket: the
//! intermediate key is stored only as the plugin's ciphertext, a second start recovers
//! it, wrapping goes on while the plugin is down, and every way the plugin can be
//! missing or wrong is named. The Secret round trip against a real API server is in
//! `e2e/tests/envtest_kek_kms.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use base64::Engine as _;

use portcullis_operator::envelope::kms::health::{HealthMonitor, PluginHealth};
use portcullis_operator::envelope::kms::test_plugin::TestKmsPlugin;
use portcullis_operator::envelope::kms::{
    self, Backoff, KMS_KEY_ID_KEY, SealedKek, retry_while_transient,
};
use portcullis_operator::envelope::{
    EnvelopeError, Kek, KekProvider, KeyRef, KmsClient, KmsConfig, KmsError, KmsKek, pkcs11,
};
use portcullis_operator::metrics::Metrics;
use tempfile::TempDir;

const SECRET: &str = "portcullis-system/portcullis-kek";

fn client(socket: &std::path::Path) -> KmsClient {
    let mut config = KmsConfig::new(socket);
    config.timeout = Duration::from_secs(2);
    KmsClient::new(config)
}

async fn plugin(dir: &TempDir, key_id: &str) -> TestKmsPlugin {
    TestKmsPlugin::started(dir.path().join("kms.sock"), key_id)
        .await
        .unwrap()
}

async fn new_kek(kms: &KmsClient) -> (Kek, SealedKek) {
    let (kek, sealed) = KmsKek::create(kms).await.unwrap();
    (Kek::from(kek), sealed)
}

#[tokio::test]
async fn wrap_and_unwrap_round_trip_under_a_kms_kek() {
    let dir = TempDir::new().unwrap();
    let plugin = plugin(&dir, "key-1").await;
    let kms = client(plugin.socket());
    let status = kms.status().await.unwrap();
    assert_eq!(
        (
            status.version.as_str(),
            status.healthz.as_str(),
            status.key_id.as_str()
        ),
        ("v2", "ok", "key-1")
    );
    let (kek, sealed) = new_kek(&kms).await;
    assert_eq!(kek.provider(), KekProvider::Kms);
    assert_eq!(kek.kms_key_id().as_deref(), Some("key-1"));
    assert_eq!(kek.id(), kms::key_id(&sealed.ciphertext));
    assert_eq!(sealed.key_id, "key-1");

    let wrapped = kek.wrap(b"tenant dek", b"portcullis-dek/acme/1").unwrap();
    // v2, provider byte 3, the key id of the KMS ciphertext.
    assert_eq!(&wrapped[..2], &[2, 3]);
    assert_eq!(&wrapped[2..10], kek.id().as_bytes());
    assert_eq!(
        kek.unwrap(&wrapped, b"portcullis-dek/acme/1").unwrap(),
        b"tenant dek"
    );
    // The AAD binding holds as with every provider.
    assert_eq!(
        kek.unwrap(&wrapped, b"portcullis-dek/acme/2"),
        Err(EnvelopeError::Tampered)
    );
    // A second intermediate key is another KEK with another id.
    let (other, _) = new_kek(&kms).await;
    assert_ne!(other.id(), kek.id());
    assert!(matches!(
        other.unwrap(&wrapped, b"portcullis-dek/acme/1"),
        Err(EnvelopeError::WrongKey { .. })
    ));
    // Debug names the provider and the plugin's key id, never the key.
    let debug = format!("{kek:?}");
    assert!(debug.contains("kms") && debug.contains("key-1") && debug.contains("redacted"));
    let key = &plugin.encrypted_plaintexts()[0];
    assert!(!debug.contains(&format!("{key:?}")) && !debug.contains(&hex::encode(key)));
}

#[tokio::test]
async fn blobs_of_other_providers_are_refused_naming_both() {
    let dir = TempDir::new().unwrap();
    let plugin = plugin(&dir, "key-1").await;
    let (kek, _) = new_kek(&client(plugin.socket())).await;

    let secret = Kek::generate();
    let from_secret = secret.wrap(b"x", b"aad").unwrap();
    let err = kek.unwrap(&from_secret, b"aad").unwrap_err();
    assert_eq!(
        err,
        EnvelopeError::WrongKey {
            expected: kek.key_ref(),
            found: secret.key_ref()
        }
    );
    let message = err.to_string();
    assert!(
        message.contains(&format!("wrapped under secret KEK {}", secret.id()))
            && message.contains(&format!("loaded KEK is kms KEK {}", kek.id())),
        "{message}"
    );

    // A pkcs11 blob: the same layout with provider byte 2 and an HSM key's id.
    let hsm_id = pkcs11::key_id("portcullis", "portcullis-kek");
    let mut from_hsm = kek.wrap(b"x", b"aad").unwrap();
    from_hsm[1] = KekProvider::Pkcs11.byte();
    from_hsm[2..10].copy_from_slice(hsm_id.as_bytes());
    let message = kek.unwrap(&from_hsm, b"aad").unwrap_err().to_string();
    assert!(
        message.contains(&format!("wrapped under pkcs11 KEK {hsm_id}"))
            && message.contains(&format!("loaded KEK is kms KEK {}", kek.id())),
        "{message}"
    );

    // And the other way: a secret KEK refuses a kms blob.
    let from_kms = kek.wrap(b"x", b"aad").unwrap();
    assert_eq!(
        secret.unwrap(&from_kms, b"aad"),
        Err(EnvelopeError::WrongKey {
            expected: secret.key_ref(),
            found: KeyRef {
                provider: KekProvider::Kms,
                id: kek.id()
            }
        })
    );
}

#[tokio::test]
async fn the_secret_holds_only_the_kms_ciphertext() {
    let dir = TempDir::new().unwrap();
    let plugin = plugin(&dir, "key-1").await;
    let (_, sealed) = new_kek(&client(plugin.socket())).await;
    let key = plugin.encrypted_plaintexts().pop().unwrap();
    assert_eq!(key.len(), 32);
    let data = sealed.to_secret_data();
    assert_eq!(
        data.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "kms-annotations",
            "kms-ciphertext",
            "kms-key-id",
            "provider"
        ]
    );
    assert_eq!(data["provider"].0, b"kms");
    assert_eq!(data[KMS_KEY_ID_KEY].0, b"key-1");
    for (name, value) in &data {
        assert!(
            !value.0.windows(key.len()).any(|w| w == key.as_slice()),
            "{name} holds the key"
        );
        let b64 = base64::engine::general_purpose::STANDARD.encode(&key);
        assert!(!String::from_utf8_lossy(&value.0).contains(&b64), "{name}");
    }
    // A secret-provider operator reading it fails clearly instead of using the bytes.
    let err = Kek::from_secret_data(&data).unwrap_err();
    assert!(
        matches!(&err, EnvelopeError::OtherProviderSecret { provider, .. } if provider == "kms"),
        "{err}"
    );
    assert!(err.to_string().contains("--kek-provider kms"), "{err}");
    // And a kms operator reading a secret-provider Secret fails clearly too.
    let secret_data = portcullis_operator::envelope::SecretKek::generate().to_secret_data();
    let err = SealedKek::from_secret_data(&secret_data, SECRET).unwrap_err();
    assert!(!err.is_transient());
    let message = err.to_string();
    assert!(
        message.contains(SECRET)
            && message.contains("`secret`-provider KEK")
            && message.contains("--kek-provider kms"),
        "{message}"
    );
}

#[tokio::test]
async fn a_second_start_recovers_the_same_key_from_the_secret() {
    let dir = TempDir::new().unwrap();
    let mut plugin = plugin(&dir, "key-1").await;
    let (first, sealed) = new_kek(&client(plugin.socket())).await;
    let blob = first.wrap(b"ca key", b"portcullis-ca/root").unwrap();
    let data = sealed.to_secret_data();

    // The plugin restarts (same key, same socket); the operator starts again.
    plugin.stop().await;
    plugin.start().await.unwrap();
    let kms = client(plugin.socket());
    let stored = SealedKek::from_secret_data(&data, SECRET).unwrap();
    assert_eq!(stored, sealed);
    let second = Kek::from(KmsKek::open(&kms, &stored, SECRET).await.unwrap());
    assert_eq!(second.key_ref(), first.key_ref());
    assert_eq!(second.kms_key_id().as_deref(), Some("key-1"));
    assert_eq!(
        second.unwrap(&blob, b"portcullis-ca/root").unwrap(),
        b"ca key"
    );
    // Only the first start encrypted anything.
    assert_eq!(plugin.encrypted_plaintexts().len(), 1);
}

#[tokio::test]
async fn a_plugin_down_at_start_is_named_then_waited_for() {
    let dir = TempDir::new().unwrap();
    let socket = dir.path().join("kms.sock");
    let kms = client(&socket);

    // No socket at all.
    let err = kms.status().await.unwrap_err();
    assert!(err.is_transient());
    let message = err.to_string();
    assert!(
        message.contains(&format!("no KMS plugin socket at {}", socket.display()))
            && message.contains("--kms-socket"),
        "{message}"
    );

    // A socket file nobody listens on (a crashed plugin).
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let err = kms.status().await.unwrap_err();
    assert!(matches!(err, KmsError::Unreachable { .. }), "{err}");
    assert!(
        err.to_string().contains(&socket.display().to_string()),
        "{err}"
    );

    // Unhealthy.
    let mut plugin = TestKmsPlugin::new(&socket, "key-1");
    plugin.start().await.unwrap();
    plugin.set_healthz("cannot reach the KMS");
    let err = kms.status().await.unwrap_err();
    assert!(err.is_transient());
    assert!(
        err.to_string()
            .contains("unhealthy (healthz \"cannot reach the KMS\")"),
        "{err}"
    );
    plugin.stop().await;

    // The start retries with backoff until the plugin comes up, then loads.
    let backoff = Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(200),
    };
    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let waiting = {
        let (kms, attempts) = (kms.clone(), attempts.clone());
        tokio::spawn(async move {
            retry_while_transient(backoff, || {
                attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let kms = kms.clone();
                async move {
                    kms.status().await?;
                    KmsKek::create(&kms).await
                }
            })
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!waiting.is_finished());
    plugin.set_healthz("ok");
    plugin.start().await.unwrap();
    let (kek, _) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(kek.plugin_key_id(), "key-1");
    assert!(attempts.load(std::sync::atomic::Ordering::Relaxed) >= 3);
}

#[tokio::test]
async fn wrapping_goes_on_while_the_plugin_is_down_and_the_poll_reports_it() {
    let dir = TempDir::new().unwrap();
    let mut plugin = plugin(&dir, "key-1").await;
    let kms = client(plugin.socket());
    let (kek, sealed) = new_kek(&kms).await;
    let metrics = Metrics::default();
    // No kms gauges before a kms KEK is loaded: other providers export none.
    assert!(!metrics.encode().contains("kms_plugin_healthy"));
    let socket = plugin.socket().display().to_string();
    let gauge =
        |name: &str, v: u8| format!("portcullis_operator_kms_{name}{{socket=\"{socket}\"}} {v}");
    let monitor = HealthMonitor::new(kms.clone(), sealed.key_id.clone(), &metrics.kms);
    assert_eq!(
        monitor.poll().await,
        PluginHealth::Healthy {
            current_key_id: "key-1".into(),
            key_id_changed: false
        }
    );
    let text = metrics.encode();
    assert!(text.contains(&gauge("plugin_healthy", 1)), "{text}");

    plugin.stop().await;
    let blob = kek.wrap(b"dek", b"aad").unwrap();
    assert_eq!(kek.unwrap(&blob, b"aad").unwrap(), b"dek");
    let health = monitor.poll().await;
    assert!(
        matches!(&health, PluginHealth::Down(why) if why.contains("no KMS plugin socket")),
        "{health:?}"
    );
    let text = metrics.encode();
    assert!(text.contains(&gauge("plugin_healthy", 0)), "{text}");

    // Back, then its key rotated: reported, not acted on.
    plugin.start().await.unwrap();
    assert!(matches!(
        monitor.poll().await,
        PluginHealth::Healthy {
            key_id_changed: false,
            ..
        }
    ));
    plugin.set_key_id("key-2");
    assert_eq!(
        monitor.poll().await,
        PluginHealth::Healthy {
            current_key_id: "key-2".into(),
            key_id_changed: true
        }
    );
    let text = metrics.encode();
    assert!(
        text.contains(&gauge("plugin_healthy", 1)) && text.contains(&gauge("key_id_changed", 1)),
        "{text}"
    );
    assert_eq!(kek.unwrap(&blob, b"aad").unwrap(), b"dek");
}

#[tokio::test]
async fn a_plugin_with_another_key_is_a_clear_fatal_error() {
    let dir = TempDir::new().unwrap();
    let mut plugin = plugin(&dir, "key-1").await;
    let (_, sealed) = new_kek(&client(plugin.socket())).await;
    plugin.stop().await;
    drop(plugin);

    // Same socket, same key id, another AES key.
    let impostor = plugin_with_new_key(&dir).await;
    let kms = client(impostor.socket());
    let attempts = std::sync::atomic::AtomicUsize::new(0);
    let backoff = Backoff {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(10),
    };
    let err = retry_while_transient(backoff, || {
        attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        KmsKek::open(&kms, &sealed, SECRET)
    })
    .await
    .unwrap_err();
    // Fatal: no retry.
    assert_eq!(attempts.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert!(matches!(err, KmsError::DecryptRefused { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains(
            "cannot decrypt the key-encryption key in Secret portcullis-system/portcullis-kek"
        ) && message.contains("\"key-1\"")
            && message.contains("not encrypted under this plugin's key"),
        "{message}"
    );
}

async fn plugin_with_new_key(dir: &TempDir) -> TestKmsPlugin {
    let mut plugin = TestKmsPlugin::with_key(dir.path().join("kms.sock"), "key-1", [7; 32]);
    plugin.start().await.unwrap();
    plugin
}

/// `run::start` with the plugin down waits for it before anything else: no listener,
/// no API request, no Secret read.
#[tokio::test]
async fn the_operator_start_waits_for_the_plugin_before_touching_anything() {
    let dir = TempDir::new().unwrap();
    let (service, mut handle) = tower_test::mock::pair::<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >();
    let client = kube::Client::new(service, "default");
    let mut settings = portcullis_operator::run::OperatorSettings::new("portcullis-system", "test");
    settings.kek_kms = Some(KmsConfig::new(dir.path().join("kms.sock")));
    settings.kms_backoff = Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(100),
    };
    let start = tokio::spawn(portcullis_operator::run::start(client, settings));
    let request = tokio::time::timeout(Duration::from_secs(1), handle.next_request())
        .await
        .ok()
        .flatten();
    assert!(
        request.is_none(),
        "the operator sent {:?}",
        request.map(|(r, _)| r.uri().clone())
    );
    assert!(!start.is_finished());
    start.abort();
}
