//! KEK rotation without downtime against a real API server (envtest): the whole operator
//! (`run::start`, webhooks on, secret KEK) runs with two Tenants; the annotation
//! `portcullis.dev/rotate-kek` triggers a rotation; a Tenant created while it runs goes
//! through the validating webhook and becomes Ready; afterwards every CA, webhook CA and
//! DEK Secret is under the new KEK, the old key is gone from `portcullis-kek`, the DEKs
//! are unchanged, and the rotation's Events and metrics are there.
//!
//! The same with a kms KEK (the KMS v2 test plugin): a new intermediate key, encrypted
//! by the plugin, replaces the old one.
//!
//! The same with a pkcs11 KEK (SoftHSM, in a child process with its own token): a new
//! key generated in the HSM under a new label replaces the configured one, the operator
//! is restarted while it is staged and resumes, and the old key stays in the HSM.
//! Skips (prints why, passes) without softhsm2.
//!
//! Skips (prints why, passes) when `KUBEBUILDER_ASSETS` is not set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Result, ensure};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use portcullis_crds::{Tenant, conditions};
use portcullis_e2e::wait::{eventually, unique};
use portcullis_e2e::{envtest, softhsm};
use portcullis_operator::dek::{self, DekRing};
use portcullis_operator::envelope::{
    KEK_NEXT_KEY, KEK_PREVIOUS_PREFIX, KEK_SECRET_NAME, Kek, KeyRef,
};
use portcullis_operator::kek_rotation::{ROTATE_ANNOTATION, blobs_under_old_keys};
use portcullis_operator::run::{self, OperatorSettings, WebhookRunSettings};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

/// One operator at a time: each registers the cluster-wide webhook configurations
/// pointing at itself, which Tenant creation goes through.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn settings(ns: &str) -> OperatorSettings {
    let mut s = OperatorSettings::new(ns, "kek-rotation-test");
    let loopback = |port| std::net::SocketAddr::from(([127, 0, 0, 1], port));
    s.metrics_addr = loopback(0);
    s.policy_addr = loopback(0);
    s.identity_addr = loopback(0);
    s.extra_sans = vec!["127.0.0.1".into()];
    let mut webhooks = WebhookRunSettings::new(ns, &s.service_name);
    webhooks.addr = loopback(0);
    webhooks.url = Some("https://127.0.0.1:0".into());
    webhooks.inject.identity_url = "https://127.0.0.1:0".into();
    webhooks.inject.policy_url = "https://127.0.0.1:0".into();
    webhooks.inject.proxy_image = "portcullis-proxy:envtest".into();
    s.webhooks = Some(webhooks);
    s.leader_election = false;
    s.reconcile.hash_cost = 4;
    s.reconcile.backoff_base = Duration::from_millis(200);
    s.reconcile.backoff_max = Duration::from_secs(3);
    s.ca_check_interval = Duration::from_millis(300);
    s.kek_rotation.reload_interval = Duration::from_millis(200);
    s.kek_rotation.propagation = Duration::from_secs(1);
    s
}

async fn create_tenant(client: &Client, name: &str, namespace: &str) -> Result<()> {
    let tenant: Tenant = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant", "metadata": {"name": name},
        "spec": {"namespaces": [namespace], "dataClassification": "Confidential",
                 "scopes": {"identify": [{"methods": ["POST"], "path": "/v1/identify"}]},
                 "encryption": {"dekRotation": "7d"}}
    }))?;
    Api::<Tenant>::all(client.clone())
        .create(&PostParams::default(), &tenant)
        .await?;
    Ok(())
}

async fn ready(client: &Client, name: &str) -> Result<()> {
    let api: Api<Tenant> = Api::all(client.clone());
    eventually(&format!("tenant {name} Ready"), WAIT, || async {
        let t = api.get(name).await?;
        Ok(t.status
            .as_ref()
            .is_some_and(|s| conditions::is_ready(&s.conditions))
            .then_some(()))
    })
    .await
}

fn dek_ring(secret: &Secret, tenant: &str) -> DekRing {
    DekRing::from_secret_parts(
        tenant,
        secret.data.as_ref().unwrap(),
        secret.metadata.annotations.as_ref().unwrap(),
    )
    .unwrap()
}

/// Asks the operator for a KEK rotation: a new value of the rotate annotation.
async fn request_rotation(secrets: &Api<Secret>, value: &str) -> Result<()> {
    secrets
        .patch(
            KEK_SECRET_NAME,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {ROTATE_ANNOTATION: value}}})),
        )
        .await?;
    Ok(())
}

/// `tenant`'s first DEK, unwrapped with `kek`.
async fn first_dek(secrets: &Api<Secret>, tenant: &str, kek: &Kek) -> Result<Vec<u8>> {
    let secret = secrets.get(&dek::secret_name(tenant)).await?;
    Ok(dek_ring(&secret, tenant).unwrap_version(kek, 1)?)
}

/// Waits until the CA keys, the webhook CA key and `tenant`'s DEKs are all wrapped
/// under `new`, the KEK in force.
async fn all_wrapped_under(
    secrets: &Api<Secret>,
    kek: &Kek,
    tenant: &str,
    new: &KeyRef,
) -> Result<()> {
    for name in [
        "portcullis-ca-root".to_owned(),
        "portcullis-ca-intermediate".to_owned(),
        "portcullis-webhook-ca".to_owned(),
        dek::secret_name(tenant),
    ] {
        let data = eventually(&format!("{name} under the new KEK"), WAIT, || async {
            let data = secrets.get(&name).await?.data.unwrap_or_default();
            Ok((blobs_under_old_keys(&data, kek) == 0).then_some(data))
        })
        .await?;
        for (key, value) in &data {
            if key.ends_with(".wrapped")
                || (name.starts_with("portcullis-dek-") && key.starts_with('v'))
            {
                ensure!(Kek::wrapped_under(&value.0)? == *new, "{name} {key}");
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn an_annotation_rotates_the_kek_and_rewraps_everything_while_serving() -> Result<()> {
    let Some(env) = envtest::shared().await? else {
        return Ok(());
    };
    env.install_crds().await?;
    let admin = env.client()?;
    let ns = env.create_namespace("kek-rotation").await?;
    let _serial = SERIAL.lock().await;
    let operator = run::start(env.client()?, settings(&ns)).await?;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &ns);

    // Two Tenants with their DEKs, under the first KEK.
    let mut tenants = Vec::new();
    for prefix in ["rot-a", "rot-b"] {
        let tenant_ns = env.create_namespace(prefix).await?;
        let name = unique(prefix);
        create_tenant(&admin, &name, &tenant_ns).await?;
        ready(&admin, &name).await?;
        tenants.push(name);
    }
    let old = operator.context.kek.key_ref();
    let mut deks = BTreeMap::new();
    for tenant in &tenants {
        let secret = secrets.get(&dek::secret_name(tenant)).await?;
        let ring = dek_ring(&secret, tenant);
        deks.insert(
            tenant.clone(),
            ring.unwrap_version(&operator.context.kek, 1)?,
        );
    }

    // A deleted Tenant's DEK Secret stays behind; the rotation must find and re-wrap it
    // too, or it would no longer open once the old key is gone.
    let deleted = tenants[1].clone();
    let tenant_api = Api::<Tenant>::all(admin.clone());
    tenant_api
        .delete(&deleted, &DeleteParams::default())
        .await?;
    eventually("the deleted Tenant gone", WAIT, || async {
        Ok(tenant_api.get_opt(&deleted).await?.is_none().then_some(()))
    })
    .await?;
    ensure!(
        secrets
            .get_opt(&dek::secret_name(&deleted))
            .await?
            .is_some(),
        "the test needs a DEK Secret that outlives its Tenant"
    );

    // On demand, by annotation; a Tenant is created while the rotation runs.
    request_rotation(&secrets, "1").await?;
    let during_ns = env.create_namespace("rot-c").await?;
    let during = unique("rot-c");
    eventually("the new KEK staged", WAIT, || async {
        let kek = secrets.get(KEK_SECRET_NAME).await?;
        let data = kek.data.unwrap_or_default();
        Ok(
            (data.contains_key(KEK_NEXT_KEY) || operator.context.kek.key_ref() != old)
                .then_some(()),
        )
    })
    .await?;
    create_tenant(&admin, &during, &during_ns).await?;
    tenants.push(during.clone());

    // Done: one key in the Secret, the new one, and nothing under the old one.
    eventually("the rotation to complete", WAIT, || async {
        let kek = secrets.get(KEK_SECRET_NAME).await?;
        let data = kek.data.unwrap_or_default();
        let keys_left = data
            .keys()
            .filter(|k| *k == KEK_NEXT_KEY || k.starts_with(KEK_PREVIOUS_PREFIX))
            .count();
        Ok((keys_left == 0 && operator.context.kek.key_ref() != old).then_some(()))
    })
    .await?;
    ready(&admin, &during).await?;
    let new = operator.context.kek.key_ref();
    ensure!(operator.context.kek.unwrap_only().is_empty());
    let loaded =
        Kek::from_secret_data(&secrets.get(KEK_SECRET_NAME).await?.data.unwrap_or_default())?;
    ensure!(loaded.key_ref() == new && loaded.unwrap_only().is_empty());

    let mut names = vec![
        "portcullis-ca-root".to_owned(),
        "portcullis-ca-intermediate".to_owned(),
        "portcullis-webhook-ca".to_owned(),
    ];
    names.extend(tenants.iter().map(|t| dek::secret_name(t)));
    for name in &names {
        let secret = secrets.get(name).await?;
        let data = secret.data.unwrap_or_default();
        let wrapped: Vec<_> = data
            .iter()
            .filter(|(k, _)| {
                k.ends_with(".wrapped")
                    || (name.starts_with("portcullis-dek-") && k.starts_with('v'))
            })
            .map(|(k, v)| (k.clone(), Kek::wrapped_under(&v.0)))
            .collect();
        ensure!(!wrapped.is_empty(), "{name}: no wrapped key");
        for (key, under) in wrapped {
            ensure!(under? == new, "{name} {key} is not under {new}");
        }
        ensure!(blobs_under_old_keys(&data, &operator.context.kek) == 0);
    }
    // The DEKs themselves did not change, and the new KEK alone opens them.
    let alone =
        Kek::from_secret_data(&secrets.get(KEK_SECRET_NAME).await?.data.unwrap_or_default())?;
    for (tenant, before) in &deks {
        let ring = dek_ring(&secrets.get(&dek::secret_name(tenant)).await?, tenant);
        ensure!(
            &ring.unwrap_version(&alone, 1)? == before,
            "{tenant}: DEK changed"
        );
    }

    // Visible: Events on the KEK Secret and the gauges.
    let events: Api<Event> = Api::namespaced(admin.clone(), &ns);
    let reasons: Vec<String> = eventually("the rotation Events", WAIT, || async {
        let list = events.list(&ListParams::default()).await?;
        let reasons: Vec<String> = list
            .items
            .into_iter()
            .filter(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(KEK_SECRET_NAME)
            })
            .filter_map(|e| e.reason)
            .collect();
        Ok(reasons
            .iter()
            .any(|r| r == "KekRotationComplete")
            .then_some(reasons))
    })
    .await?;
    for reason in ["KekRotationStarted", "KekPromoted", "KekRewrapped"] {
        ensure!(
            reasons.iter().any(|r| r == reason),
            "no {reason}: {reasons:?}"
        );
    }
    let metrics = reqwest_free_get(operator.metrics_addr).await?;
    ensure!(
        metrics.contains("portcullis_operator_kek_unwrap_only_keys 0"),
        "{metrics}"
    );
    ensure!(
        metrics.contains("portcullis_operator_kek_secrets_under_previous_key 0"),
        "{metrics}"
    );
    operator.stop().await;
    Ok(())
}

/// `GET /metrics` over a plain TCP connection.
async fn reqwest_free_get(addr: std::net::SocketAddr) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    Ok(text)
}

#[tokio::test]
async fn a_kms_kek_rotates_to_a_new_intermediate_key_encrypted_by_the_plugin() -> Result<()> {
    use portcullis_operator::envelope::kms::test_plugin::TestKmsPlugin;
    use portcullis_operator::envelope::{KekProvider, KmsConfig};

    let Some(env) = envtest::shared().await? else {
        return Ok(());
    };
    env.install_crds().await?;
    let admin = env.client()?;
    let ns = env.create_namespace("kek-rotation-kms").await?;
    let dir = tempfile::TempDir::new()?;
    let plugin = TestKmsPlugin::started(dir.path().join("kms.sock"), "key-1").await?;
    let _serial = SERIAL.lock().await;
    let mut settings = settings(&ns);
    let mut kms = KmsConfig::new(dir.path().join("kms.sock"));
    kms.timeout = Duration::from_secs(2);
    settings.kek_kms = Some(kms);
    let operator = run::start(env.client()?, settings).await?;
    assert_eq!(operator.context.kek.provider(), KekProvider::Kms);
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &ns);

    let tenant_ns = env.create_namespace("rot-kms").await?;
    let tenant = unique("rot-kms");
    create_tenant(&admin, &tenant, &tenant_ns).await?;
    ready(&admin, &tenant).await?;
    let old = operator.context.kek.key_ref();
    let before = secrets.get(KEK_SECRET_NAME).await?.data.unwrap_or_default();
    let dek_before = first_dek(&secrets, &tenant, &operator.context.kek).await?;

    request_rotation(&secrets, "kms-1").await?;
    eventually("the kms rotation to complete", WAIT, || async {
        let data = secrets.get(KEK_SECRET_NAME).await?.data.unwrap_or_default();
        let left = data
            .keys()
            .filter(|k| k.starts_with("kms-next-") || k.starts_with("kms-previous-"))
            .count();
        Ok((left == 0 && operator.context.kek.key_ref() != old).then_some(data))
    })
    .await
    .map(|after| {
        assert_ne!(after.get("kms-ciphertext"), before.get("kms-ciphertext"));
        assert_eq!(after.get("provider"), before.get("provider"));
        assert!(!after.contains_key("kek"));
    })?;
    let new = operator.context.kek.key_ref();
    ensure!(new.provider == KekProvider::Kms && operator.context.kek.unwrap_only().is_empty());
    all_wrapped_under(&secrets, &operator.context.kek, &tenant, &new).await?;
    let dek_after = first_dek(&secrets, &tenant, &operator.context.kek).await?;
    ensure!(dek_after == dek_before, "the DEK changed");

    // The KMS key itself rotates: the KEK follows on its own, onto the new KMS key.
    let before = operator.context.kek.key_ref();
    plugin.set_key_id("key-2");
    eventually("a KEK rotation onto the new KMS key", WAIT, || async {
        let data = secrets.get(KEK_SECRET_NAME).await?.data.unwrap_or_default();
        let left = data
            .keys()
            .filter(|k| k.starts_with("kms-next-") || k.starts_with("kms-previous-"))
            .count();
        let on_key_2 = data.get("kms-key-id").map(|v| v.0.as_slice()) == Some(b"key-2".as_slice());
        Ok((left == 0 && on_key_2 && operator.context.kek.key_ref() != before).then_some(()))
    })
    .await?;
    ensure!(operator.context.kek.kms_key_id().as_deref() == Some("key-2"));
    let dek = secrets
        .get(&dek::secret_name(&tenant))
        .await?
        .data
        .unwrap_or_default();
    ensure!(blobs_under_old_keys(&dek, &operator.context.kek) == 0);
    operator.stop().await;
    Ok(())
}

/// Set in the child process that runs the pkcs11 case: its SoftHSM directory.
const HSM_CHILD_DIR: &str = "PORTCULLIS_HSM_DIR";
const HSM_TOKEN: &str = "portcullis-envtest";
const HSM_KEY: &str = "portcullis-kek";

/// SoftHSM reads `SOFTHSM2_CONF` once per process, so the pkcs11 case runs in a child
/// process of this binary with its own token directory (and its own envtest).
fn run_in_softhsm_child(test: &str) -> Result<()> {
    let dir = tempfile::TempDir::new()?;
    let conf = softhsm::write_conf(dir.path())?;
    let out = std::process::Command::new(std::env::current_exe()?)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("SOFTHSM2_CONF", &conf)
        .env(HSM_CHILD_DIR, dir.path())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && stdout.contains("1 passed"),
        "{test} in its SoftHSM process:\n{stdout}\n{stderr}"
    );
    eprintln!("{stderr}");
    Ok(())
}

#[tokio::test]
async fn a_pkcs11_kek_rotates_to_a_new_hsm_key_across_a_restart() -> Result<()> {
    use portcullis_operator::envelope::pkcs11::labels::{
        KEY_LABEL_KEY, NEXT_LABEL_KEY, PREVIOUS_PREFIX,
    };
    use portcullis_operator::envelope::{
        KekProvider, Pkcs11Config, Pkcs11Kek, TokenSelector, pkcs11,
    };

    const TEST: &str = "a_pkcs11_kek_rotates_to_a_new_hsm_key_across_a_restart";
    let Some(module) = softhsm::module() else {
        eprintln!("skipped {TEST}: libsofthsm2.so not found (apt-get install softhsm2)");
        return Ok(());
    };
    let Some(dir) = std::env::var_os(HSM_CHILD_DIR).map(std::path::PathBuf::from) else {
        if std::process::Command::new("softhsm2-util")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("skipped {TEST}: softhsm2-util not found (apt-get install softhsm2)");
            return Ok(());
        }
        return run_in_softhsm_child(TEST);
    };

    // The child: a token with the configured key, and the whole operator on it.
    let Some(env) = envtest::shared().await? else {
        return Ok(());
    };
    let out = std::process::Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", HSM_TOKEN])
        .args(["--pin", "user-pin-4711", "--so-pin", "so-pin-0815"])
        .output()?;
    ensure!(out.status.success(), "softhsm2-util: {out:?}");
    let pin_file = dir.join("pin");
    std::fs::write(&pin_file, "user-pin-4711\n")?;
    let config = Pkcs11Config {
        module,
        token: TokenSelector::Label(HSM_TOKEN.into()),
        key_label: HSM_KEY.into(),
        pin_file,
    };
    pkcs11::create_key(&config)?;

    env.install_crds().await?;
    let admin = env.client()?;
    let ns = env.create_namespace("kek-rotation-pkcs11").await?;
    let _serial = SERIAL.lock().await;
    let mut settings = settings(&ns);
    settings.kek_pkcs11 = Some(config.clone());
    // Long enough to restart the operator while the new key is staged.
    settings.kek_rotation.propagation = Duration::from_secs(4);
    let operator = run::start(env.client()?, settings.clone()).await?;
    ensure!(operator.context.kek.provider() == KekProvider::Pkcs11);
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &ns);
    // The first start recorded the configured key's label: labels, no key material.
    let recorded = secrets.get(KEK_SECRET_NAME).await?.data.unwrap_or_default();
    ensure!(
        recorded.get(KEY_LABEL_KEY).map(|v| v.0.as_slice()) == Some(HSM_KEY.as_bytes())
            && recorded.get("provider").map(|v| v.0.as_slice()) == Some(b"pkcs11".as_slice()),
        "{:?}",
        recorded.keys().collect::<Vec<_>>()
    );

    let tenant_ns = env.create_namespace("rot-p11").await?;
    let tenant = unique("rot-p11");
    create_tenant(&admin, &tenant, &tenant_ns).await?;
    ready(&admin, &tenant).await?;
    let old = operator.context.kek.key_ref();
    let dek_before = first_dek(&secrets, &tenant, &operator.context.kek).await?;

    request_rotation(&secrets, "p11-1").await?;
    eventually("the new HSM key staged", WAIT, || async {
        let data = secrets.get(KEK_SECRET_NAME).await?.data.unwrap_or_default();
        Ok(data.contains_key(NEXT_LABEL_KEY).then_some(()))
    })
    .await?;

    // A restart mid-rotation: the new process opens the staged key by its label too.
    operator.stop().await;
    let operator = run::start(env.client()?, settings).await?;
    ensure!(
        !operator.context.kek.unwrap_only().is_empty(),
        "restarted mid-rotation without the staged or previous key"
    );

    let after = eventually("the pkcs11 rotation to complete", WAIT, || async {
        let data = secrets.get(KEK_SECRET_NAME).await?.data.unwrap_or_default();
        let left = data
            .keys()
            .filter(|k| *k == NEXT_LABEL_KEY || k.starts_with(PREVIOUS_PREFIX))
            .count();
        Ok((left == 0 && operator.context.kek.key_ref() != old).then_some(data))
    })
    .await?;
    let current_label = String::from_utf8(after[KEY_LABEL_KEY].0.clone())?;
    ensure!(
        current_label.starts_with(&format!("{HSM_KEY}-")),
        "{current_label}"
    );
    let new = operator.context.kek.key_ref();
    ensure!(
        new.provider == KekProvider::Pkcs11 && new.id == pkcs11::key_id(HSM_TOKEN, &current_label)
    );
    ensure!(operator.context.kek.unwrap_only().is_empty());
    all_wrapped_under(&secrets, &operator.context.kek, &tenant, &new).await?;
    let dek_after = first_dek(&secrets, &tenant, &operator.context.kek).await?;
    ensure!(dek_after == dek_before, "the DEK changed");

    // The completion Event names the old HSM key, which is kept in the token.
    let events: Api<Event> = Api::namespaced(admin.clone(), &ns);
    let complete = eventually("KekRotationComplete", WAIT, || async {
        let list = events.list(&ListParams::default()).await?;
        Ok(list
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("KekRotationComplete"))
            .and_then(|e| e.note))
    })
    .await?;
    ensure!(
        complete.contains("the HSM still holds") && complete.contains(HSM_KEY),
        "{complete}"
    );
    ensure!(
        Pkcs11Kek::open(&config).is_ok(),
        "the previous HSM key was destroyed"
    );
    let metrics = reqwest_free_get(operator.metrics_addr).await?;
    ensure!(
        metrics.contains("portcullis_operator_kek_unwrap_only_keys 0"),
        "{metrics}"
    );
    operator.stop().await;
    Ok(())
}
