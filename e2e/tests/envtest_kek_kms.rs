//! The kms key-encryption key against a real API server (envtest) and the KMS v2 test
//! plugin on a Unix socket: the operator's start creates Secret `portcullis-kek` with
//! only the plugin's ciphertext, a second start (and a replica racing the first) reads
//! the same key, a secret-provider operator refuses that Secret, a plugin down at start
//! is waited for, and a plugin with another key stops the start. The whole operator
//! (`run::start`) starts on a kms KEK and reports the plugin going down on `/metrics`
//! while it keeps running.
//!
//! Skips (prints why, passes) when `KUBEBUILDER_ASSETS` is not set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use portcullis_e2e::envtest;
use portcullis_operator::envelope::kms::test_plugin::TestKmsPlugin;
use portcullis_operator::envelope::kms::{Backoff, load_or_create_kms_kek};
use portcullis_operator::envelope::{self, Kek, KmsClient, KmsConfig, KmsError};
use portcullis_operator::run::{self, OperatorSettings};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn client(socket: &std::path::Path) -> KmsClient {
    let mut config = KmsConfig::new(socket);
    config.timeout = Duration::from_secs(2);
    KmsClient::new(config)
}

const FAST: Backoff = Backoff {
    initial: Duration::from_millis(100),
    max: Duration::from_millis(400),
};

#[tokio::test]
async fn the_kek_secret_holds_only_the_kms_ciphertext_and_every_start_reads_it() {
    let Some(env) = envtest::shared().await.unwrap() else {
        return;
    };
    let kube = env.client().unwrap();
    let ns = env.create_namespace("kek-kms").await.unwrap();
    let dir = TempDir::new().unwrap();
    let mut plugin = TestKmsPlugin::started(dir.path().join("kms.sock"), "key-1")
        .await
        .unwrap();
    let kms = client(plugin.socket());

    // Two replicas start at once: one creates the Secret, the other reads it.
    let (a, b) = tokio::join!(
        run::open_kms_kek(&kube, &ns, &kms, FAST),
        run::open_kms_kek(&kube, &ns, &kms, FAST)
    );
    let (first, racer) = (a.unwrap(), b.unwrap());
    assert_eq!(first.key_ref(), racer.key_ref());
    assert_eq!(first.kms_key_id().as_deref(), Some("key-1"));
    let blob = first.wrap(b"tenant dek", b"portcullis-dek/acme/1").unwrap();
    assert_eq!(
        racer.unwrap(&blob, b"portcullis-dek/acme/1").unwrap(),
        b"tenant dek"
    );

    // The Secret: provider marker, ciphertext, key id, annotations; no key.
    let secret = Api::<Secret>::namespaced(kube.clone(), &ns)
        .get(envelope::KEK_SECRET_NAME)
        .await
        .unwrap();
    let data = secret.data.unwrap();
    assert_eq!(data["provider"].0, b"kms");
    assert_eq!(data["kms-key-id"].0, b"key-1");
    assert!(!data.contains_key("kek"));
    assert_eq!(envelope::kms::key_id(&data["kms-ciphertext"].0), first.id());
    for key in plugin.encrypted_plaintexts() {
        for (name, value) in &data {
            assert!(
                !value.0.windows(key.len()).any(|w| w == key.as_slice()),
                "{name} holds an intermediate key"
            );
        }
    }

    // A later start (the plugin restarted too) reads the same key.
    plugin.stop().await;
    plugin.start().await.unwrap();
    let again = run::open_kms_kek(&kube, &ns, &client(plugin.socket()), FAST)
        .await
        .unwrap();
    assert_eq!(again.key_ref(), first.key_ref());
    assert_eq!(
        again.unwrap(&blob, b"portcullis-dek/acme/1").unwrap(),
        b"tenant dek"
    );

    // An operator started with the secret provider refuses the Secret, clearly.
    let message = run::load_kek(&kube, &ns, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("holds a \"kms\"-provider KEK") && message.contains("--kek-provider kms"),
        "{message}"
    );
}

#[tokio::test]
async fn a_secret_provider_kek_is_not_taken_for_a_kms_one() {
    let Some(env) = envtest::shared().await.unwrap() else {
        return;
    };
    let kube = env.client().unwrap();
    let ns = env.create_namespace("kek-kms-secret").await.unwrap();
    let secret_kek: Kek = envelope::load_or_create_kek(kube.clone(), &ns)
        .await
        .unwrap();
    let dir = TempDir::new().unwrap();
    let plugin = TestKmsPlugin::started(dir.path().join("kms.sock"), "key-1")
        .await
        .unwrap();
    let err = load_or_create_kms_kek(kube.clone(), &ns, &client(plugin.socket()))
        .await
        .unwrap_err();
    assert!(matches!(err, KmsError::InvalidSecret { .. }), "{err}");
    assert!(err.to_string().contains("`secret`-provider KEK"), "{err}");
    // Nothing was overwritten.
    assert_eq!(
        run::load_kek(&kube, &ns, None).await.unwrap().key_ref(),
        secret_kek.key_ref()
    );
}

#[tokio::test]
async fn a_plugin_down_at_start_is_waited_for_and_a_wrong_one_stops_the_start() {
    let Some(env) = envtest::shared().await.unwrap() else {
        return;
    };
    let kube = env.client().unwrap();
    let ns = env.create_namespace("kek-kms-wait").await.unwrap();
    let dir = TempDir::new().unwrap();
    let socket = dir.path().join("kms.sock");
    let kms = client(&socket);

    // No plugin yet: the start waits (and has written nothing) until it comes.
    let starting = {
        let (kube, ns, kms) = (kube.clone(), ns.clone(), kms.clone());
        tokio::spawn(async move { run::open_kms_kek(&kube, &ns, &kms, FAST).await })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!starting.is_finished());
    let secrets = Api::<Secret>::namespaced(kube.clone(), &ns);
    assert!(
        secrets
            .get_opt(envelope::KEK_SECRET_NAME)
            .await
            .unwrap()
            .is_none()
    );
    let mut plugin = TestKmsPlugin::started(&socket, "key-1").await.unwrap();
    let kek = tokio::time::timeout(Duration::from_secs(20), starting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(kek.kms_key_id().as_deref(), Some("key-1"));

    // A plugin whose KMS key is another one cannot decrypt the stored KEK: fatal, named.
    plugin.stop().await;
    drop(plugin);
    let _impostor = {
        let mut p = TestKmsPlugin::with_key(&socket, "key-1", [7; 32]);
        p.start().await.unwrap();
        p
    };
    let message = tokio::time::timeout(
        Duration::from_secs(20),
        run::open_kms_kek(&kube, &ns, &kms, FAST),
    )
    .await
    .unwrap()
    .unwrap_err()
    .to_string();
    assert!(
        message.contains(&format!(
            "cannot decrypt the key-encryption key in Secret {ns}/portcullis-kek"
        )) && message.contains(&socket.display().to_string()),
        "{message}"
    );
}

async fn metrics(addr: std::net::SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: operator\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    text
}

#[tokio::test]
async fn the_operator_starts_on_a_kms_kek_and_reports_the_plugin_going_down() {
    let Some(env) = envtest::shared().await.unwrap() else {
        return;
    };
    env.install_crds().await.unwrap();
    let ns = env.create_namespace("kms-operator").await.unwrap();
    let dir = TempDir::new().unwrap();
    let mut plugin = TestKmsPlugin::started(dir.path().join("kms.sock"), "key-1")
        .await
        .unwrap();
    let mut settings = OperatorSettings::new(&ns, "kms-test");
    let loopback = |port| std::net::SocketAddr::from(([127, 0, 0, 1], port));
    settings.metrics_addr = loopback(0);
    settings.policy_addr = loopback(0);
    settings.identity_addr = loopback(0);
    settings.extra_sans = vec!["127.0.0.1".into()];
    settings.webhooks = None;
    settings.leader_election = false;
    let mut kms = KmsConfig::new(plugin.socket());
    kms.timeout = Duration::from_secs(2);
    settings.kek_kms = Some(kms);
    settings.kms_backoff = FAST;
    settings.kms_status_interval = Duration::from_millis(200);

    let operator = run::start(env.client().unwrap(), settings).await.unwrap();
    // The CA keys went into their Secrets wrapped by the kms KEK.
    assert_eq!(operator.context.kek.provider(), envelope::KekProvider::Kms);
    assert_eq!(operator.context.kek.kms_key_id().as_deref(), Some("key-1"));
    let socket = plugin.socket().display().to_string();
    let healthy =
        |v: u8| format!("portcullis_operator_kms_plugin_healthy{{socket=\"{socket}\"}} {v}");
    let text = metrics(operator.metrics_addr).await;
    assert!(text.contains(&healthy(1)), "{text}");

    plugin.stop().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = metrics(operator.metrics_addr).await;
        if text.contains(&healthy(0)) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still wrapping with the key in memory.
    let kek = &operator.context.kek;
    let blob = kek.wrap(b"dek", b"aad").unwrap();
    assert_eq!(kek.unwrap(&blob, b"aad").unwrap(), b"dek");
    operator.stop().await;
}
