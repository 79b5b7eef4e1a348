//! `kubectl-portcullis` (the real binary) against a real kube-apiserver (envtest).
//!
//! The operator is not running here: where a command waits for it, the test plays its
//! part (a stand-in issuer writes the Secret and the status the way the operator does).
//! Skipped when `KUBEBUILDER_ASSETS` is not set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use portcullis_crds::apikey::{RetiredKey, SECRET_TOKEN_KEY, secret_name};
use portcullis_crds::{ApiKey, ApiKeySpec, ApiKeyStatus, ApiToken, KeyState, ScopeName};
use portcullis_e2e::envtest::{self, EnvTest, StartOptions};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_kubectl-portcullis");

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }
}

/// Runs the binary with the envtest's admin kubeconfig.
async fn cli(env: &EnvTest, args: &[&str]) -> Run {
    let output = tokio::process::Command::new(BIN)
        .arg("--kubeconfig")
        .arg(env.kubeconfig_path())
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .await
        .expect("run kubectl-portcullis");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

async fn env() -> Option<&'static EnvTest> {
    let env = envtest::shared().await.expect("envtest starts")?;
    env.install_crds().await.expect("CRDs install");
    Some(env)
}

fn ready(status: &str, reason: &str, message: &str, now: Timestamp) -> Condition {
    Condition {
        type_: "Ready".into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: None,
        last_transition_time: Time(now),
    }
}

/// One pass of the stand-in operator over the keys of `ns`: issue new and rotated keys
/// (Secret first, then status, as the operator does) and confirm revocations.
async fn issue_round(client: &Client, ns: &str) -> Result<(), kube::Error> {
    let keys: Api<ApiKey> = Api::namespaced(client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    for key in keys.list(&ListParams::default()).await?.items {
        let name = key.name_any();
        let status = key.status.clone().unwrap_or_default();
        let now = Timestamp::now();
        if key.spec.revoked {
            if status.state != KeyState::Revoked {
                let revoked = ApiKeyStatus {
                    state: KeyState::Revoked,
                    conditions: vec![ready("False", "Revoked", "revoked by spec.revoked", now)],
                    ..status
                };
                keys.patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": revoked})),
                )
                .await?;
            }
            continue;
        }
        if status.state == KeyState::Active && status.rotation >= key.spec.rotate {
            continue;
        }
        let token = ApiToken::generate();
        let key_id = token.key_id().as_str().to_owned();
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(secret_name(&name)),
                annotations: Some([("portcullis.dev/key-id".to_owned(), key_id.clone())].into()),
                ..Default::default()
            },
            type_: Some("portcullis.dev/api-key".into()),
            data: Some(
                [(
                    SECRET_TOKEN_KEY.to_owned(),
                    ByteString(token.expose_secret().as_bytes().to_vec()),
                )]
                .into(),
            ),
            ..Default::default()
        };
        let mut body = serde_json::to_value(&secret).unwrap();
        body["apiVersion"] = json!("v1");
        body["kind"] = json!("Secret");
        secrets
            .patch(
                &secret_name(&name),
                &PatchParams::apply("stand-in-operator").force(),
                &Patch::Apply(body),
            )
            .await?;
        let mut previous_keys = status.previous_keys.clone();
        if let Some(old) = status.key_id.clone() {
            previous_keys.push(RetiredKey {
                key_id: old,
                hash: status.hash.clone().unwrap_or_default(),
                valid_until: Time(now + SignedDuration::from_hours(24)),
            });
        }
        let issued = ApiKeyStatus {
            state: KeyState::Active,
            prefix: Some(format!("ak_{key_id}")),
            key_id: Some(key_id),
            hash: Some("$2b$04$stand.in.hash".into()),
            issued_at: Some(Time(now)),
            expires_at: Some(Time(now + SignedDuration::from_hours(90 * 24))),
            rotation: key.spec.rotate,
            secret_name: Some(secret_name(&name)),
            previous_keys,
            conditions: vec![ready("True", "Issued", "token issued", now)],
            observed_generation: key.metadata.generation,
        };
        keys.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": issued})),
        )
        .await?;
    }
    Ok(())
}

/// The stand-in operator, until the handle is aborted.
fn spawn_issuer(client: Client, ns: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Err(e) = issue_round(&client, &ns).await {
                eprintln!("stand-in issuer: {e}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

async fn secret_token(client: &Client, ns: &str, name: &str) -> (String, Secret) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = secrets.get(&secret_name(name)).await.unwrap();
    let token =
        String::from_utf8(secret.data.clone().unwrap()[SECRET_TOKEN_KEY].0.clone()).unwrap();
    (token, secret)
}

#[tokio::test]
async fn key_create_prints_the_token_once_and_show_hides_it() {
    let Some(env) = env().await else { return };
    let client = env.client().unwrap();
    let ns = env.create_namespace("cli-create").await.unwrap();
    let issuer = spawn_issuer(client.clone(), ns.clone());

    let created = cli(
        env,
        &[
            "-n",
            &ns,
            "key",
            "create",
            "ingest",
            "--role",
            "Developer",
            "--scopes",
            "identify,events",
            "--rate-limit",
            "1000/1m",
            "--ip-allowlist",
            "10.0.0.0/8",
            "--wait",
            "20s",
        ],
    )
    .await;
    assert_eq!(created.code, Some(0), "{created:?}");
    let (token, secret) = secret_token(&client, &ns, "ingest").await;
    assert!(token.starts_with("ak_"));
    assert_eq!(created.stdout.trim(), token, "stdout is the token alone");
    let everything = format!("{}{}", created.stdout, created.stderr);
    assert_eq!(everything.matches(&token).count(), 1, "{created:?}");
    assert!(
        created.stderr.contains("will not be shown again"),
        "{created:?}"
    );
    assert_eq!(
        secret
            .annotations()
            .get("portcullis.dev/delivered")
            .map(String::as_str),
        Some("true"),
        "the CLI marks the token delivered"
    );
    let key: ApiKey = Api::namespaced(client.clone(), &ns)
        .get("ingest")
        .await
        .unwrap();
    assert_eq!(key.spec.ip_allowlist[0].as_str(), "10.0.0.0/8");
    assert_eq!(key.spec.rate_limit.as_ref().map(|r| r.requests), Some(1000));

    let shown = cli(env, &["-n", &ns, "key", "show", "ingest"]).await;
    assert_eq!(shown.code, Some(0), "{shown:?}");
    assert!(
        !shown.stdout.contains(&token) && !shown.stderr.contains(&token),
        "{shown:?}"
    );
    let prefix = key.status.as_ref().unwrap().prefix.clone().unwrap();
    assert!(
        shown.stdout.contains(&format!("Key:           {prefix}\n")),
        "{shown:?}"
    );
    assert!(
        shown.stdout.contains("State:         Active\n"),
        "{shown:?}"
    );
    assert!(shown.stdout.contains("1000/1m burst 100"), "{shown:?}");

    let shown_json = cli(env, &["-n", &ns, "key", "show", "ingest", "-o", "json"]).await;
    assert!(!shown_json.stdout.contains(&token), "{shown_json:?}");
    let report = shown_json.json();
    assert_eq!(report["keyPrefix"], prefix.as_str());
    assert_eq!(report["scopes"], json!(["identify", "events"]));
    assert!(report.get("token").is_none());

    let revealed = cli(env, &["-n", &ns, "key", "show", "ingest", "--reveal"]).await;
    assert!(
        revealed
            .stdout
            .contains(&format!("Token:         {token}\n")),
        "{revealed:?}"
    );

    let listed = cli(env, &["-n", &ns, "key", "list"]).await;
    assert!(listed.stdout.starts_with("NAME "), "{listed:?}");
    assert!(
        listed.stdout.contains("ingest") && listed.stdout.contains("Active"),
        "{listed:?}"
    );
    let listed_json = cli(env, &["-n", &ns, "key", "list", "-o", "json"])
        .await
        .json();
    assert_eq!(listed_json["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(listed_json["items"][0]["status"]["state"], "Active");
    let listed_yaml = cli(env, &["-n", &ns, "key", "list", "-o", "yaml"]).await;
    let yaml: Value = serde_yaml::from_str(&listed_yaml.stdout).unwrap();
    assert_eq!(yaml["kind"], "List");
    issuer.abort();
}

#[tokio::test]
async fn key_rotate_prints_the_new_token_and_the_overlap() {
    let Some(env) = env().await else { return };
    let client = env.client().unwrap();
    let ns = env.create_namespace("cli-rotate").await.unwrap();
    let issuer = spawn_issuer(client.clone(), ns.clone());
    let created = cli(
        env,
        &[
            "-n",
            &ns,
            "key",
            "create",
            "k",
            "--role",
            "Developer",
            "--scopes",
            "identify",
        ],
    )
    .await;
    assert_eq!(created.code, Some(0), "{created:?}");
    let old = created.stdout.trim().to_owned();

    let rotated = cli(env, &["-n", &ns, "key", "rotate", "k", "-o", "json"]).await;
    assert_eq!(rotated.code, Some(0), "{rotated:?}");
    let report = rotated.json();
    let (new, _) = secret_token(&client, &ns, "k").await;
    assert_eq!(report["token"], new.as_str());
    assert_ne!(new, old);
    assert!(!rotated.stdout.contains(&old) && !rotated.stderr.contains(&old));
    let old_prefix = &old[..15];
    assert_eq!(report["previousKey"]["keyPrefix"], old_prefix);
    assert!(
        report["previousKey"]["validUntil"].is_string(),
        "{rotated:?}"
    );
    let key: ApiKey = Api::namespaced(client, &ns).get("k").await.unwrap();
    assert_eq!(key.spec.rotate, 1);
    issuer.abort();
}

#[tokio::test]
async fn key_revoke_patches_revoked_and_waits_for_the_operator() {
    let Some(env) = env().await else { return };
    let client = env.client().unwrap();
    let ns = env.create_namespace("cli-revoke").await.unwrap();
    let issuer = spawn_issuer(client.clone(), ns.clone());
    let created = cli(
        env,
        &[
            "-n", &ns, "key", "create", "old", "--role", "Viewer", "--scopes", "events",
        ],
    )
    .await;
    assert_eq!(created.code, Some(0), "{created:?}");

    let revoked = cli(env, &["-n", &ns, "key", "revoke", "old"]).await;
    assert_eq!(revoked.code, Some(0), "{revoked:?}");
    assert!(revoked.stdout.contains("revoked: ak_"), "{revoked:?}");
    let key: ApiKey = Api::namespaced(client, &ns).get("old").await.unwrap();
    assert!(key.spec.revoked);
    assert_eq!(key.status.map(|s| s.state), Some(KeyState::Revoked));

    let again = cli(env, &["-n", &ns, "key", "revoke", "old"]).await;
    assert_eq!(again.code, Some(0), "{again:?}");
    assert!(again.stderr.contains("already revoked"), "{again:?}");
    issuer.abort();
}

#[tokio::test]
async fn key_create_refuses_bad_input_locally_and_shows_server_refusals() {
    let Some(env) = env().await else { return };
    let client = env.client().unwrap();
    let ns = env.create_namespace("cli-refuse").await.unwrap();

    let bad_cidr = cli(
        env,
        &[
            "-n",
            &ns,
            "key",
            "create",
            "k",
            "--role",
            "Developer",
            "--scopes",
            "identify",
            "--ip-allowlist",
            "10.0.0.0/8,10.0.0.300/8",
        ],
    )
    .await;
    assert_ne!(bad_cidr.code, Some(0), "{bad_cidr:?}");
    assert!(
        bad_cidr
            .stderr
            .contains("spec.ipAllowlist[1]: invalid CIDR \"10.0.0.300/8\""),
        "{bad_cidr:?}"
    );
    assert!(
        bad_cidr.stderr.contains("nothing was created"),
        "{bad_cidr:?}"
    );
    let keys: Api<ApiKey> = Api::namespaced(client.clone(), &ns);
    assert!(
        keys.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );

    // The schema caps role names at 63 characters; local validation leaves that to the
    // server, whose message is shown as-is.
    let long_role = "r".repeat(70);
    let refused = cli(
        env,
        &[
            "-n", &ns, "key", "create", "k", "--role", &long_role, "--scopes", "identify",
        ],
    )
    .await;
    assert_ne!(refused.code, Some(0), "{refused:?}");
    assert!(refused.stderr.contains("spec.role"), "{refused:?}");
    assert!(refused.stderr.contains("63"), "{refused:?}");

    // No operator: the wait ends with how to find out why.
    let unissued = cli(
        env,
        &[
            "-n",
            &ns,
            "key",
            "create",
            "lonely",
            "--role",
            "Developer",
            "--scopes",
            "identify",
            "--wait",
            "1s",
        ],
    )
    .await;
    assert_ne!(unissued.code, Some(0), "{unissued:?}");
    assert!(
        unissued.stderr.contains("did not issue ApiKey"),
        "{unissued:?}"
    );
    assert!(
        unissued
            .stderr
            .contains(&format!("kubectl describe ak lonely -n {ns}")),
        "{unissued:?}"
    );
    assert!(unissued.stderr.contains("logs"), "{unissued:?}");
    assert!(unissued.stdout.is_empty(), "{unissued:?}");
}

fn ca_pem(valid_for: SignedDuration, age: SignedDuration) -> String {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let secs = |t: Timestamp| Duration::from_secs(u64::try_from(t.as_second()).unwrap());
    let now = Timestamp::now();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test CA");
    params.not_before = epoch + secs(now - age);
    params.not_after = epoch + secs(now - age + valid_for);
    params.self_signed(&key).unwrap().pem()
}

async fn put_ca(client: &Client, ns: &str, name: &str, key: &str, pem: String) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some([(key.to_owned(), ByteString(pem.into_bytes()))].into()),
        ..Default::default()
    };
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
}

fn check_named<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no check {name} in {report}"))
}

const DAY: SignedDuration = SignedDuration::from_hours(24);

#[tokio::test]
async fn check_flags_expiring_and_expired_cas_and_unprotected_pods() {
    let Some(env) = env().await else { return };
    let client = env.client().unwrap();

    // Operator namespace 1: root expiring in 10 days, intermediate fine.
    let expiring = env.create_namespace("cli-ca-expiring").await.unwrap();
    put_ca(
        &client,
        &expiring,
        "portcullis-ca-root",
        "ca.crt",
        ca_pem(DAY * 11 + SignedDuration::from_hours(1), DAY),
    )
    .await;
    put_ca(
        &client,
        &expiring,
        "portcullis-ca-intermediate",
        "tls.crt",
        ca_pem(DAY * 60, DAY),
    )
    .await;
    // Operator namespace 2: root expired two days ago.
    let expired = env.create_namespace("cli-ca-expired").await.unwrap();
    put_ca(
        &client,
        &expired,
        "portcullis-ca-root",
        "ca.crt",
        ca_pem(DAY * 30, DAY * 32),
    )
    .await;

    // An opted-in namespace with a pod the injector never saw.
    let apps = env.create_namespace("cli-apps").await.unwrap();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            &apps,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"portcullis.dev/inject": "enabled"}}})),
        )
        .await
        .unwrap();
    create_pod(&client, &apps, "bare", json!({})).await;

    let table = cli(env, &["check", "--operator-namespace", &expiring]).await;
    assert_eq!(table.code, Some(1), "webhooks are missing: {table:?}");
    let line = |prefix: &str| {
        table
            .stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?}: {table:?}"))
            .to_owned()
    };
    assert!(
        line("! CA root").contains("trust anchor expires in 10d"),
        "{table:?}"
    );
    assert!(
        line("✓ CA intermediate").contains("valid until"),
        "{table:?}"
    );
    assert!(
        line("✓ Audit collector").contains("records stay in each pod"),
        "{table:?}"
    );
    assert!(
        line("✓ CRD apikeys.portcullis.dev").contains("installed and current"),
        "{table:?}"
    );
    assert!(
        line("✗ Webhook portcullis-injector").contains("not found"),
        "{table:?}"
    );
    assert!(
        line("! API server").contains("no native sidecars"),
        "envtest is 1.20: {table:?}"
    );
    assert!(
        line("✗ Injection").contains("run without the proxy"),
        "{table:?}"
    );
    assert!(
        table.stdout.contains(&format!("      {apps}/bare\n")),
        "{table:?}"
    );
    assert!(table.stdout.contains("→ rotation is overdue"), "{table:?}");

    let json = cli(
        env,
        &["check", "--operator-namespace", &expired, "-o", "json"],
    )
    .await;
    assert_eq!(json.code, Some(1), "{json:?}");
    let report = json.json();
    let root = check_named(&report, "CA root");
    assert_eq!(root["status"], "fail", "{root}");
    assert!(
        root["message"].as_str().unwrap().contains("EXPIRED 2d ago"),
        "{root}"
    );
    assert!(
        root["hint"]
            .as_str()
            .unwrap()
            .contains("delete secret portcullis-ca-root"),
        "{root}"
    );
    assert_eq!(check_named(&report, "CA intermediate")["status"], "fail");
    assert!(report["summary"]["failed"].as_u64().unwrap() >= 2);

    // identity inspect on the same pod: not injected, SPIFFE ID from its namespace and SA.
    let identity = cli(
        env,
        &[
            "-n",
            &apps,
            "identity",
            "inspect",
            "bare",
            "--trust-domain",
            "example.org",
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(identity.code, Some(0), "{identity:?}");
    let identity = identity.json();
    assert_eq!(identity["injected"], false);
    assert_eq!(
        identity["spiffeId"],
        format!("spiffe://example.org/ns/{apps}/sa/default")
    );
}

async fn create_pod(client: &Client, ns: &str, name: &str, annotations: Value) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]}
    }))
    .unwrap();
    // The controller-manager creates the `default` ServiceAccount the pod needs shortly
    // after the namespace.
    for attempt in 0.. {
        match pods.create(&PostParams::default(), &pod).await {
            Ok(_) => return,
            Err(e) if attempt < 50 => {
                eprintln!("pod not created yet: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("cannot create pod {ns}/{name}: {e}"),
        }
    }
}

#[tokio::test]
async fn identity_inspect_reads_an_injected_pod() {
    let Some(env) = env().await else { return };
    let client = env.client().unwrap();
    let ns = env.create_namespace("cli-identity").await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "api-0", "annotations": {"portcullis.dev/injected": "0.1.0"}},
        "spec": {
            "containers": [
                {"name": "portcullis-proxy", "image": "registry.example/proxy:1"},
                {"name": "app", "image": "registry.example/app:1"}
            ]
        }
    }))
    .unwrap();
    for attempt in 0.. {
        match pods.create(&PostParams::default(), &pod).await {
            Ok(_) => break,
            Err(_) if attempt < 50 => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => panic!("{e}"),
        }
    }
    let table = cli(env, &["-n", &ns, "identity", "inspect", "api-0"]).await;
    assert_eq!(table.code, Some(0), "{table:?}");
    assert!(
        table
            .stdout
            .contains("Injected:         yes (container, injector 0.1.0)\n"),
        "{table:?}"
    );
    assert!(
        table.stdout.contains(&format!(
            "SPIFFE ID:        spiffe://cluster.local/ns/{ns}/sa/default\n"
        )),
        "{table:?}"
    );
    assert!(
        table.stdout.contains("--admin-url"),
        "no request to the pod without it: {table:?}"
    );
}

/// A control plane of its own: the other tests install the CRDs into the shared one.
#[tokio::test]
async fn check_reports_missing_crds_then_current_then_stale() {
    let Some(env) = EnvTest::start_with(StartOptions {
        controller_manager: false,
        ..StartOptions::default()
    })
    .await
    .expect("envtest starts") else {
        return;
    };
    let crd_statuses = |run: &Run| -> Vec<(String, String, String)> {
        run.json()["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["name"].as_str().is_some_and(|n| n.starts_with("CRD ")))
            .map(|c| {
                (
                    c["name"].as_str().unwrap().to_owned(),
                    c["status"].as_str().unwrap().to_owned(),
                    c["message"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };

    let before = cli(&env, &["check", "-o", "json"]).await;
    assert_eq!(before.code, Some(1), "{before:?}");
    let crds = crd_statuses(&before);
    assert_eq!(crds.len(), 3, "{before:?}");
    for (name, status, message) in &crds {
        assert_eq!(
            (status.as_str(), message.as_str()),
            ("fail", "not installed"),
            "{name}"
        );
    }
    let table = cli(&env, &["check"]).await;
    assert!(
        table.stdout.contains("✗ CRD tenants.portcullis.dev"),
        "{table:?}"
    );
    assert!(
        table
            .stdout
            .contains("→ run kubectl apply --server-side -f crds/"),
        "{table:?}"
    );

    env.install_crds().await.unwrap();
    let after = cli(&env, &["check", "-o", "json"]).await;
    for (name, status, message) in crd_statuses(&after) {
        assert_eq!(status, "pass", "{name}: {message}");
    }

    // An older schema on the server: stale.
    let crds: Api<CustomResourceDefinition> = Api::all(env.client().unwrap());
    crds.patch(
        "apikeys.portcullis.dev",
        &PatchParams::default(),
        &Patch::Json::<()>(
            serde_json::from_value(json!([{
                "op": "replace",
                "path": "/spec/versions/0/schema/openAPIV3Schema/description",
                "value": "an older description"
            }]))
            .unwrap(),
        ),
    )
    .await
    .unwrap();
    let stale = cli(&env, &["check", "-o", "yaml"]).await;
    let report: Value = serde_yaml::from_str(&stale.stdout).unwrap();
    let apikeys = check_named(&report, "CRD apikeys.portcullis.dev");
    assert_eq!(apikeys["status"], "fail", "{apikeys}");
    assert!(
        apikeys["message"].as_str().unwrap().starts_with("stale"),
        "{apikeys}"
    );
    assert_eq!(
        check_named(&report, "CRD roles.portcullis.dev")["status"],
        "pass"
    );
}

#[tokio::test]
async fn scope_names_round_trip_through_the_created_object() {
    // Guards the spec the CLI builds against the API types: what create sends is what
    // a client reading the object gets back.
    let Some(env) = env().await else { return };
    let client = env.client().unwrap();
    let ns = env.create_namespace("cli-roundtrip").await.unwrap();
    let run = cli(
        env,
        &[
            "-n",
            &ns,
            "key",
            "create",
            "rt",
            "--role",
            "Analyst",
            "--scopes",
            "signals",
            "--expires-after",
            "30d",
            "--burst",
            "5",
            "--rate-limit",
            "10/s",
            "--wait",
            "1s",
        ],
    )
    .await;
    assert_ne!(
        run.code,
        Some(0),
        "no operator, so the wait times out: {run:?}"
    );
    let key: ApiKey = Api::namespaced(client, &ns).get("rt").await.unwrap();
    let expected = ApiKeySpec {
        role: "Analyst".into(),
        scopes: vec![ScopeName::new("signals").unwrap()],
        rate_limit: Some(portcullis_crds::RateLimit {
            requests: 10,
            per: "1s".parse().unwrap(),
            burst: Some(5),
        }),
        expires_after: Some("30d".parse().unwrap()),
        ..ApiKeySpec::default()
    };
    assert_eq!(key.spec, expected);
}

#[tokio::test]
async fn tenant_status_counts_keys_and_warns() {
    let Some(env) = env().await else { return };
    let client = env.client().unwrap();
    let ns = env.create_namespace("cli-tenant").await.unwrap();
    let name = format!("t-{ns}");
    let tenants: Api<portcullis_crds::Tenant> = Api::all(client.clone());
    let tenant: portcullis_crds::Tenant = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
        "metadata": {"name": name},
        "spec": {"namespaces": [ns], "dataClassification": "Restricted"}
    }))
    .unwrap();
    tenants
        .create(&PostParams::default(), &tenant)
        .await
        .unwrap();
    let now = Timestamp::now();
    tenants
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "namespaces": [ns], "activeDekVersion": 2, "apiKeys": 2, "roles": 5,
                "conditions": [ready("True", "Reconciled", "1 namespace bound", now)]
            }})),
        )
        .await
        .unwrap();
    let keys: Api<ApiKey> = Api::namespaced(client.clone(), &ns);
    for (key, status) in [
        (
            "soon",
            ApiKeyStatus {
                state: KeyState::Active,
                expires_at: Some(Time(now + DAY * 3 + SignedDuration::from_hours(1))),
                ..ApiKeyStatus::default()
            },
        ),
        (
            "bad",
            ApiKeyStatus {
                state: KeyState::Invalid,
                conditions: vec![ready(
                    "False",
                    "ScopeNotInRole",
                    "scope signals is not granted by role Viewer",
                    now,
                )],
                ..ApiKeyStatus::default()
            },
        ),
    ] {
        let spec = ApiKeySpec {
            role: "Viewer".into(),
            scopes: vec![ScopeName::new("signals").unwrap()],
            ..ApiKeySpec::default()
        };
        keys.create(&PostParams::default(), &ApiKey::new(key, spec))
            .await
            .unwrap();
        keys.patch_status(
            key,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await
        .unwrap();
    }

    let table = cli(env, &["tenant", "status", &name]).await;
    assert_eq!(table.code, Some(0), "{table:?}");
    assert!(
        table.stdout.contains(&format!("Namespaces:       {ns}\n")),
        "{table:?}"
    );
    assert!(
        table
            .stdout
            .contains("Active DEK:       v2 (rotates every 7d)\n"),
        "{table:?}"
    );
    assert!(
        table
            .stdout
            .contains("Keys by state:    Active 1, Invalid 1\n"),
        "{table:?}"
    );
    assert!(
        table
            .stdout
            .contains(&format!("  ! ApiKey {ns}/soon expires in 3d")),
        "{table:?}"
    );
    assert!(
        table
            .stdout
            .contains(&format!("  ✗ ApiKey {ns}/bad is Invalid (ScopeNotInRole")),
        "{table:?}"
    );
    let json = cli(env, &["tenant", "status", &name, "-o", "json"])
        .await
        .json();
    assert_eq!(json["classification"], "Restricted");
    assert_eq!(json["findings"].as_array().map(Vec::len), Some(2));

    let missing = cli(env, &["tenant", "status", "no-such-tenant"]).await;
    assert_ne!(missing.code, Some(0));
    assert!(
        missing.stderr.contains("Tenant no-such-tenant not found"),
        "{missing:?}"
    );
}

/// An injected pod (by the injector's label) with the given containers and spec fields;
/// its status is what a kubelet would report.
async fn create_injected_pod(client: &Client, ns: &str, name: &str, spec: Value, status: Value) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut body = json!({
        "metadata": {"name": name, "labels": {"portcullis.dev/injected": "true"},
            "annotations": {"portcullis.dev/injected": "0.1.0"}},
        "spec": {"containers": [
            {"name": "portcullis-proxy", "image": "registry.example/proxy:1"},
            {"name": "app", "image": "registry.example/app:1"}
        ]}
    });
    if let (Some(into), Some(extra)) = (body["spec"].as_object_mut(), spec.as_object()) {
        into.extend(extra.clone());
    }
    let pod: Pod = serde_json::from_value(body).unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    // envtest has no kubelet: write the status it would.
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await
    .unwrap();
}

fn container_status(name: &str, ready: bool, state: Value) -> Value {
    json!({"name": name, "ready": ready, "restartCount": 0, "image": "x", "imageID": "", "state": state})
}

fn ago(minutes: i64) -> String {
    (Timestamp::now() - SignedDuration::from_mins(minutes)).to_string()
}

fn running_since(minutes: i64) -> Value {
    json!({"running": {"startedAt": ago(minutes)}})
}

/// A key with the status the operator would write.
async fn create_key(client: &Client, ns: &str, name: &str, status: Value) {
    let keys: Api<ApiKey> = Api::namespaced(client.clone(), ns);
    let key = ApiKey::new(
        name,
        ApiKeySpec {
            role: "Developer".into(),
            scopes: vec![ScopeName::new("identify").unwrap()],
            ..ApiKeySpec::default()
        },
    );
    keys.create(&PostParams::default(), &key).await.unwrap();
    keys.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await
    .unwrap();
}

/// A control plane of its own, so the other tests' pods and keys do not count.
#[tokio::test]
async fn check_names_stuck_injected_pods_and_keys_not_active() {
    let Some(env) = EnvTest::start().await.expect("envtest starts") else {
        return;
    };
    env.install_crds().await.unwrap();
    let client = env.client().unwrap();
    let ns = env.create_namespace("cli-workloads").await.unwrap();
    let sections = |run: &Run| -> Value {
        let report = run.json();
        json!({
            "pods": check_named(&report, "Injected pods"),
            "keys": check_named(&report, "ApiKeys"),
        })
    };

    // Healthy: a Ready injected pod and an Active key.
    create_injected_pod(
        &client,
        &ns,
        "api-0",
        json!({}),
        json!({"phase": "Running",
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": ago(9)}],
        "containerStatuses": [
            container_status("portcullis-proxy", true, running_since(10)),
            container_status("app", true, running_since(10)),
        ]}),
    )
    .await;
    create_key(&client, &ns, "ingest", json!({"state": "Active"})).await;
    let healthy = cli(&env, &["check", "-o", "json"]).await;
    let found = sections(&healthy);
    assert_eq!(found["pods"]["status"], "pass", "{found}");
    assert_eq!(
        found["pods"]["message"], "1 injected pod(s) Ready",
        "{found}"
    );
    assert_eq!(found["keys"]["status"], "pass", "{found}");
    assert_eq!(
        found["keys"]["message"], "1 of 1 ApiKey(s) Active",
        "{found}"
    );

    // An app failing its readiness probe for six minutes, with the kubelet's Event.
    create_injected_pod(
        &client,
        &ns,
        "api-1",
        json!({}),
        json!({"phase": "Running",
        "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": ago(6)}],
        "containerStatuses": [
            container_status("portcullis-proxy", true, running_since(7)),
            container_status("app", false, running_since(7)),
        ]}),
    )
    .await;
    let pod_uid = Api::<Pod>::namespaced(client.clone(), &ns)
        .get("api-1")
        .await
        .unwrap()
        .uid();
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), &ns);
    let event = serde_json::from_value(json!({
        "metadata": {"name": "api-1.unhealthy"},
        "involvedObject": {"kind": "Pod", "namespace": ns, "name": "api-1", "uid": pod_uid,
            "apiVersion": "v1", "fieldPath": "spec.containers{app}"},
        "reason": "Unhealthy", "type": "Warning", "count": 40,
        "message": "Readiness probe failed: HTTP probe failed with statuscode: 503",
        "firstTimestamp": ago(6), "lastTimestamp": ago(0),
        "source": {"component": "kubelet"}
    }))
    .unwrap();
    events.create(&PostParams::default(), &event).await.unwrap();
    // A Job's pod whose app finished five minutes ago while the proxy runs on.
    create_injected_pod(
        &client,
        &ns,
        "migrate-x1",
        json!({"restartPolicy": "Never", "containers": [
            {"name": "portcullis-proxy", "image": "registry.example/proxy:1", "env": [
                {"name": "PORTCULLIS_EXIT_WHEN_APP_EXITS", "value": "true"},
                {"name": "PORTCULLIS_APP_PORT", "value": "8080"}
            ]},
            {"name": "app", "image": "registry.example/app:1"}
        ]}),
        json!({"phase": "Running",
        "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": ago(5)}],
        "containerStatuses": [
            container_status("portcullis-proxy", true, running_since(8)),
            container_status("app", false, json!({"terminated": {
                "exitCode": 0, "reason": "Completed", "startedAt": ago(8), "finishedAt": ago(5)}})),
        ]}),
    )
    .await;
    create_key(
        &client,
        &ns,
        "wide",
        json!({"state": "Invalid", "conditions": [{"type": "Ready", "status": "False",
            "reason": "ScopeNotInRole", "message": "scope admin is not granted by role Developer",
            "lastTransitionTime": ago(1)}]}),
    )
    .await;

    let table = cli(&env, &["check"]).await;
    assert_eq!(table.code, Some(1), "{table:?}");
    let line = |prefix: &str| {
        table
            .stdout
            .lines()
            .map(str::trim_start)
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?}: {table:?}"))
            .to_owned()
    };
    assert!(
        line("✗ Injected pods").ends_with("2 of 3 injected pod(s) not Ready for over 2m"),
        "{table:?}"
    );
    assert!(
        line(&format!("{ns}/api-1 (6m): ")).contains(
            "container app fails its readiness probe: \"HTTP probe failed with statuscode: 503\" → "
        ),
        "{table:?}"
    );
    assert!(
        line(&format!("{ns}/migrate-x1 (5m): ")).contains(
            "the app finished but the proxy still runs; the Job cannot complete → the operator tells the proxy once the app has exited"
        ),
        "{table:?}"
    );
    assert!(
        line("✗ ApiKeys").ends_with("1 of 2 ApiKey(s) Active; 1 invalid or unissued, 0 expired"),
        "{table:?}"
    );
    assert!(
        line(&format!("{ns}/wide: ")).starts_with(&format!(
            "{ns}/wide: Invalid (ScopeNotInRole: scope admin is not granted by role Developer) → "
        )),
        "{table:?}"
    );

    let json = cli(&env, &["check", "-o", "json"]).await;
    let found = sections(&json);
    assert_eq!(found["pods"]["status"], "fail", "{found}");
    assert_eq!(
        found["pods"]["details"].as_array().unwrap().len(),
        2,
        "{found}"
    );
    assert_eq!(found["keys"]["status"], "fail", "{found}");
}

mod export_from_the_collector {
    //! `audit export --tenant T --server URL` against the real audit server, which asks
    //! this API server (TokenReview, SubjectAccessReview) whether the token's subject
    //! may read the tenant's records: RBAC as the operator emits it for the built-in
    //! roles, so an analyst exports and a developer does not.

    use super::*;
    use std::collections::BTreeSet;
    use std::path::Path;
    use std::sync::Arc;

    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{Role as RbacRole, RoleBinding, RoleRef, Subject};
    use portcullis_api::clock::SystemClock;
    use portcullis_api::spiffe::TrustDomain;
    use portcullis_audit::segment;
    use portcullis_audit::{AuditRecord, Chain, DataKey, Entry, TenantKeys};
    use portcullis_collector::{Collector, FileStore, KeyCache, Sender};
    use portcullis_crds::role::builtin_role;
    use portcullis_crds::{Permission, Tenant};
    use portcullis_operator::audit_cluster::KubeExportAuthorizer;
    use portcullis_operator::audit_server::{self, AuditServerSettings};
    use portcullis_operator::audit_witness::{self, AuditWitness, WitnessSettings};
    use portcullis_operator::ca::certs::{pem_block, pem_encode};
    use portcullis_operator::ca::{CaSettings, CaState, CertificateAuthority};
    use portcullis_operator::rbac::rules_for;

    const SERVICE: &str = "portcullis-audit.portcullis-system.svc";

    /// The permissions of built-in role `name`, inheritance folded in.
    fn permissions(name: &str) -> BTreeSet<Permission> {
        let mut all = BTreeSet::new();
        let mut todo = vec![name.to_owned()];
        while let Some(next) = todo.pop() {
            let spec = builtin_role(&next).expect("a built-in role");
            all.extend(spec.permissions.iter().copied());
            todo.extend(spec.inherits.iter().cloned());
        }
        all
    }

    /// A ServiceAccount bound in `ns` to the RBAC the operator emits for built-in `role`;
    /// returns a token for it.
    async fn member(client: &Client, ns: &str, account: &str, role: &str) -> String {
        let pp = PostParams::default();
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
        let sa: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": account}})).unwrap();
        accounts.create(&pp, &sa).await.unwrap();
        let name = format!("portcullis:{role}");
        let rbac = RbacRole {
            metadata: kube::api::ObjectMeta {
                name: Some(format!("{name}-{account}")),
                ..Default::default()
            },
            rules: Some(rules_for(&permissions(role))),
        };
        Api::<RbacRole>::namespaced(client.clone(), ns)
            .create(&pp, &rbac)
            .await
            .unwrap();
        let binding = RoleBinding {
            metadata: kube::api::ObjectMeta {
                name: Some(format!("{name}-{account}")),
                ..Default::default()
            },
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "Role".into(),
                name: format!("{name}-{account}"),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: account.into(),
                namespace: Some(ns.into()),
                ..Default::default()
            }]),
        };
        Api::<RoleBinding>::namespaced(client.clone(), ns)
            .create(&pp, &binding)
            .await
            .unwrap();
        let request = TokenRequest {
            spec: TokenRequestSpec {
                expiration_seconds: Some(600),
                ..TokenRequestSpec::default()
            },
            ..TokenRequest::default()
        };
        accounts
            .create_token_request(account, &pp, &request)
            .await
            .unwrap()
            .status
            .expect("a token")
            .token
    }

    /// Tenant `name` owning `ns`, as the operator's status says.
    async fn tenant(client: &Client, name: &str, ns: &str) {
        let api: Api<Tenant> = Api::all(client.clone());
        let tenant: Tenant = serde_json::from_value(json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
            "metadata": {"name": name}, "spec": {"namespaces": [ns]}
        }))
        .unwrap();
        api.create(&PostParams::default(), &tenant).await.unwrap();
        api.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"namespaces": [ns]}})),
        )
        .await
        .unwrap();
    }

    /// The audit server on 127.0.0.1 over the files of [`collector_files`] in `dir`.
    /// Tenant `tenant`'s key, the same at every call.
    fn tenant_keys(tenant: &str) -> Arc<KeyCache> {
        let keys = KeyCache::new();
        keys.insert(TenantKeys::single(tenant, DataKey::new(1, [5; 32])));
        Arc::new(keys)
    }

    fn server_settings(dir: &Path, tenant: &str) -> AuditServerSettings {
        AuditServerSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_addr: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.join("data"),
            cert_file: dir.join("tls.crt"),
            key_file: dir.join("tls.key"),
            trust_bundle_file: dir.join("ca.crt"),
            trust_domain: TrustDomain::new("cluster.local").unwrap(),
            retention_days: 365,
            reload_every: Duration::from_secs(30),
            sinks_every: Duration::from_millis(200),
            seal_every: Duration::from_millis(200),
            admin_writer: None,
            keys: audit_server::KeySupply::Given(tenant_keys(tenant)),
        }
    }

    /// The collector's files: its serving certificate from a CA like the operator's,
    /// and a log already holding `records` of tenant `owner`.
    fn collector_files(
        dir: &Path,
        owner: &str,
        records: usize,
    ) -> (Vec<String>, Arc<CertificateAuthority>) {
        let td = TrustDomain::new("cluster.local").unwrap();
        let settings = CaSettings::new(td);
        let ca = Arc::new(CertificateAuthority::new(
            settings.clone(),
            CaState::generate(&settings, Timestamp::now()).unwrap(),
            Arc::new(SystemClock),
        ));
        let issued = ca.issue_server_certificate(&[SERVICE.to_owned()]).unwrap();
        let chain: String = issued.chain.iter().map(|c| pem_encode(c)).collect();
        std::fs::write(dir.join("tls.crt"), chain).unwrap();
        std::fs::write(
            dir.join("tls.key"),
            pem_block("PRIVATE KEY", issued.key.secret_pkcs8_der()),
        )
        .unwrap();
        std::fs::write(dir.join("ca.crt"), ca.trust_bundle_pem()).unwrap();

        let mut collector = Collector::open(
            FileStore::open(dir.join("data"), tenant_keys(owner)).unwrap(),
            Arc::new(SystemClock),
        )
        .unwrap();
        let mut chain = Chain::new("web-1");
        let mut lines = Vec::new();
        for i in 0..records {
            let mut record = AuditRecord::new(
                Timestamp::now(),
                owner,
                "web-1",
                "api.identify",
                "key:ak_***7f2",
            );
            record.path = format!("/v1/identify/{i}");
            record.status = 200;
            let record = chain.append(record).unwrap();
            lines.push(Entry::Record(record).to_json_line().unwrap());
        }
        let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let sender = Sender {
            tenant: owner,
            workload: "spiffe://cluster.local/ns/shop/sa/web",
        };
        collector.ingest(sender, &body).unwrap();
        (lines, ca)
    }

    #[tokio::test]
    async fn an_analyst_exports_the_tenants_records_and_a_developer_may_not() {
        let Some(env) = env().await else { return };
        let client = env.client().unwrap();
        let ns = env.create_namespace("export").await.unwrap();
        let other_ns = env.create_namespace("export-other").await.unwrap();
        let name = format!("{ns}-t");
        let other = format!("{other_ns}-t");
        tenant(&client, &name, &ns).await;
        tenant(&client, &other, &other_ns).await;
        let analyst = member(&client, &ns, "ana", "analyst").await;
        let developer = member(&client, &ns, "dev", "developer").await;

        let dir = tempfile::tempdir().unwrap();
        let (shipped, authority) = collector_files(dir.path(), &name, 4);
        let server = audit_server::start(
            server_settings(dir.path(), &name),
            audit_server::ClusterAccess {
                authorizer: KubeExportAuthorizer::new(client.clone()),
                retention: portcullis_collector::FixedRetention(365),
                sinks: portcullis_collector::NoSinks,
                observer: None,
                sink_observer: None,
            },
        )
        .await
        .unwrap();
        let url = format!("https://{}", server.addr);
        let ca = dir.path().join("ca.crt");
        let export = |token: &str, tenant: &str, extra: &[&str]| {
            let token_file = dir.path().join(format!("token-{}", token.len() % 997));
            std::fs::write(&token_file, token).unwrap();
            let mut args: Vec<String> = [
                "audit",
                "export",
                "--tenant",
                tenant,
                "--server",
                &url,
                "--ca-file",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            args.push(ca.display().to_string());
            args.push("--token-file".into());
            args.push(token_file.display().to_string());
            args.extend(extra.iter().map(|s| (*s).to_owned()));
            args
        };

        // RBAC reaches the authorizer's cache shortly after the binding is written.
        let mut csv = None;
        for _ in 0..50 {
            let args = export(&analyst, &name, &["--since", "24h", "--format", "csv"]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let run = cli(env, &args).await;
            if run.code == Some(0) {
                csv = Some(run);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let csv = csv.expect("the analyst's export succeeds");
        let rows: Vec<&str> = csv.stdout.lines().collect();
        assert_eq!(rows.len(), 5, "{csv:?}");
        assert!(
            rows[0].starts_with("timestamp,chain_id,seq,tenant"),
            "{csv:?}"
        );
        assert!(rows[4].contains("/v1/identify/3"), "{csv:?}");
        assert!(csv.stderr.contains("exported 4 records"), "{csv:?}");

        // JSON lines come back exactly as the chain wrote them.
        let args = export(&analyst, &name, &[]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let json = cli(env, &args).await;
        assert_eq!(json.code, Some(0), "{json:?}");
        assert_eq!(json.stdout.lines().collect::<Vec<_>>(), shipped, "{json:?}");

        // A developer of the same tenant may not; the message says what grants it.
        let args = export(&developer, &name, &[]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let refused = cli(env, &args).await;
        assert_ne!(refused.code, Some(0), "{refused:?}");
        assert!(
            refused.stderr.contains("403") && refused.stderr.contains("audit:read"),
            "{refused:?}"
        );
        assert!(refused.stdout.is_empty(), "{refused:?}");

        // The analyst of one tenant reads nothing of another.
        let args = export(&analyst, &other, &[]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let elsewhere = cli(env, &args).await;
        assert!(elsewhere.stderr.contains("403"), "{elsewhere:?}");

        // The tenant's whole history verifies (pruned starts allowed: retention).
        let token_file = dir.path().join("analyst-token");
        std::fs::write(&token_file, &analyst).unwrap();
        let verify = |env| {
            let args = [
                "audit".to_owned(),
                "verify".into(),
                "--tenant".into(),
                name.clone(),
                "--server".into(),
                url.clone(),
                "--ca-file".into(),
                ca.display().to_string(),
                "--token-file".into(),
                token_file.display().to_string(),
                "--insecure-any-signer".into(),
            ];
            async move {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                cli(env, &args).await
            }
        };
        let verified = verify(env).await;
        assert_eq!(verified.code, Some(0), "{verified:?}");
        assert!(
            verified.stdout.contains("OK: 4 records") && verified.stdout.contains("chain web-1"),
            "{verified:?}"
        );

        // The operator witnesses the newest seal (the collector seals every 200 ms here)
        // into the Tenant's status, through the same authorisation as the export.
        let witness = AuditWitness::new(
            client.clone(),
            kube::runtime::reflector::store().0,
            authority,
            WitnessSettings {
                collector_url: url.clone(),
                server_name: SERVICE.into(),
                token_file: token_file.clone(),
                every: Duration::from_secs(300),
            },
            "envtest".into(),
        );
        let tenants: Api<Tenant> = Api::all(client.clone());
        let mut anchored = false;
        for _ in 0..50 {
            let current = tenants.get(&name).await.unwrap();
            if witness.witness_now(&current).await.unwrap() {
                anchored = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(anchored, "the newest seal is anchored");
        let anchors = tenants
            .get(&name)
            .await
            .unwrap()
            .status
            .unwrap()
            .audit_anchors;
        assert_eq!(anchors.len(), 1, "{anchors:?}");
        let verified = verify(env).await;
        assert_eq!(verified.code, Some(0), "{verified:?}");
        assert!(
            verified
                .stdout
                .contains("1 witnessed by the operator and matched"),
            "{verified:?}"
        );

        // A log whose seal differs from the one witnessed fails, naming the seal.
        let mut forged = anchors.clone();
        forged[0].digest = "0".repeat(64);
        tenants
            .patch_status(
                &name,
                &PatchParams::apply(audit_witness::FIELD_MANAGER).force(),
                &Patch::Apply(json!({
                    "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
                    "status": {"auditAnchors": forged},
                })),
            )
            .await
            .unwrap();
        let mismatched = verify(env).await;
        assert_eq!(mismatched.code, Some(1), "{mismatched:?}");
        assert!(
            mismatched.stdout.contains(&format!(
                "but the operator witnessed seal {}",
                anchors[0].number
            )),
            "{mismatched:?}"
        );
        // Someone with the volume and the tenant's key edits a stored record: the next
        // verify says so.
        let day_file = std::fs::read_dir(dir.path().join("data").join(&name))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "seg"))
            .unwrap();
        let key = tenant_keys(&name).get(&name).unwrap().active.clone();
        let opened = segment::open_segment(
            &std::fs::read(&day_file).unwrap(),
            &portcullis_audit::KeyRing::from_keys([key.clone()]),
        );
        assert_eq!(opened.error, None);
        let edited = opened.plaintext.replace("/v1/identify/2", "/v1/identify/9");
        assert_ne!(edited, opened.plaintext);
        let header = segment::new_header(&key);
        let mut bytes = header.to_vec();
        bytes.extend(segment::seal_frame(&key, &header, 0, edited.as_bytes()).unwrap());
        std::fs::write(&day_file, bytes).unwrap();
        let tampered = verify(env).await;
        assert_eq!(tampered.code, Some(1), "{tampered:?}");
        assert!(tampered.stdout.contains("FAILED"), "{tampered:?}");

        // A token the API server does not know.
        let args = export("not-a-token", &name, &[]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let stranger = cli(env, &args).await;
        assert!(
            stranger.stderr.contains("401") && stranger.stderr.contains("--token-file"),
            "{stranger:?}"
        );
        server.stop().await;
    }

    /// The Tenant names a Splunk HEC and a Secret in the collector's namespace; the
    /// collector reads both through this API server and forwards the tenant's log, once,
    /// in order. A wrong token is refused by the SIEM and nothing is skipped: once the
    /// Secret is corrected, the records arrive.
    #[tokio::test]
    async fn the_collector_forwards_the_tenants_log_to_its_splunk_hec_with_the_secrets_token() {
        use k8s_openapi::api::core::v1::Secret;
        use k8s_openapi::api::events::v1::Event;
        use portcullis_operator::audit_cluster::{SINK_FAILING, TenantEvents, TenantSource};
        use portcullis_operator::audit_sinks::KubeSinks;
        let Some(env) = env().await else { return };
        let client = env.client().unwrap();
        let ns = env.create_namespace("forward").await.unwrap();
        let home = env.create_namespace("forward-home").await.unwrap();
        let name = format!("{ns}-t");
        tenant(&client, &name, &ns).await;
        let received =
            portcullis_e2e::hec::Receiver::start("127.0.0.1:0".parse().unwrap(), "hec-0042")
                .await
                .unwrap();
        let hec = received.addr;
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &home);
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "splunk"}, "stringData": {"token": "stale-token"}
        }))
        .unwrap();
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
        Api::<Tenant>::all(client.clone())
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"audit": {"sinks": [
                    {"stdout": {}},
                    {"splunkHec": {"url": format!("http://{hec}"), "index": "audit",
                                   "tokenSecretRef": {"name": "splunk"}}}
                ]}}})),
            )
            .await
            .unwrap();

        let dir = tempfile::tempdir().unwrap();
        let (shipped, _) = collector_files(dir.path(), &name, 4);
        let server = audit_server::start(
            server_settings(dir.path(), &name),
            audit_server::ClusterAccess {
                authorizer: KubeExportAuthorizer::new(client.clone()),
                retention: portcullis_collector::FixedRetention(365),
                // Tenants from a watch, as the collector reads them.
                sinks: KubeSinks::new(
                    client.clone(),
                    TenantSource::watched(
                        client.clone(),
                        tokio_util::sync::CancellationToken::new(),
                    ),
                    home.clone(),
                    "portcullis-audit-0".into(),
                ),
                observer: None,
                sink_observer: Some(Arc::new(TenantEvents::new(
                    client.clone(),
                    "portcullis-audit-0".into(),
                ))),
            },
        )
        .await
        .unwrap();

        // The SIEM refuses the wrong token: nothing arrives, and the Tenant says why.
        let api: Api<Event> = Api::namespaced(client.clone(), "kube-system");
        let mut warned = None;
        for _ in 0..50 {
            warned = api
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some(SINK_FAILING)
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                            == Some(name.as_str())
                });
            if warned.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let note = warned.and_then(|e| e.note).unwrap_or_default();
        assert!(
            note.contains("403") && note.contains("splunk-hec-"),
            "a Warning Event names the sink and the SIEM's answer: {note:?}"
        );
        assert!(
            received.events().is_empty(),
            "the SIEM refuses a wrong token"
        );
        secrets
            .patch(
                "splunk",
                &PatchParams::default(),
                &Patch::Merge(json!({"stringData": {"token": "hec-0042"}})),
            )
            .await
            .unwrap();
        let want: Vec<serde_json::Value> = shipped
            .iter()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        // A Secret is read again at most every 5 s.
        for _ in 0..200 {
            if received.events().len() >= want.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(received.events(), want, "every record once, in order");
        server.stop().await;
    }

    #[tokio::test]
    async fn a_refused_batch_is_a_warning_event_on_its_tenant() {
        use k8s_openapi::api::events::v1::Event;
        use portcullis_api::audit_ship::{ShipRefusal, ShipRefusalReason};
        use portcullis_collector::RefusalObserver;
        use portcullis_operator::audit_cluster::{BATCH_REFUSED, TenantEvents};
        let Some(env) = env().await else { return };
        let client = env.client().unwrap();
        let ns = env.create_namespace("refused").await.unwrap();
        let name = format!("{ns}-t");
        tenant(&client, &name, &ns).await;
        let events = TenantEvents::new(client.clone(), "portcullis-audit-0".into());
        let refusal = ShipRefusal {
            error: "the batch skips records; resend from seq 4".into(),
            reason: ShipRefusalReason::MissingRecords,
            chain_id: Some("web-1".into()),
            expected_seq: Some(4),
        };
        events.refused(&name, "spiffe://cluster.local/ns/shop/sa/web", &refusal);
        // The same refusal again, as a proxy's resend: no second Event.
        events.refused(&name, "spiffe://cluster.local/ns/shop/sa/web", &refusal);
        let api: Api<Event> = Api::namespaced(client.clone(), "kube-system");
        let mut found = Vec::new();
        for _ in 0..50 {
            found = api
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .into_iter()
                .filter(|e| {
                    e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str())
                })
                .collect();
            if !found.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Long enough for a second Event to have landed, had one been sent.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let again = api.list(&ListParams::default()).await.unwrap().items;
        let count = again
            .iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str()))
            .count();
        assert_eq!((found.len(), count), (1, 1), "{found:?}");
        let event = &found[0];
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        assert_eq!(event.reason.as_deref(), Some(BATCH_REFUSED));
        let note = event.note.clone().unwrap_or_default();
        assert!(
            note.contains("chain web-1") && note.contains("resend from seq 4"),
            "{note}"
        );
        assert_eq!(
            event.regarding.as_ref().and_then(|r| r.kind.as_deref()),
            Some("Tenant")
        );
    }
}

#[tokio::test]
async fn kek_rotate_sets_the_annotation_and_check_shows_the_rotation() {
    let Some(env) = env().await else { return };
    let client = env.client().unwrap();
    let ns = env.create_namespace("cli-kek").await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);

    // No KEK Secret: the KEK is elsewhere (pkcs11), which the operator cannot rotate.
    let run = cli(env, &["kek", "rotate", "--operator-namespace", &ns]).await;
    assert_ne!(run.code, Some(0), "{run:?}");
    assert!(run.stderr.contains("HSM"), "{run:?}");

    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "portcullis-kek", "annotations": {
            "portcullis.dev/kek-id": "0123456789abcdef",
            "portcullis.dev/kek-created": "2026-01-01T00:00:00Z"}},
        "data": {"kek": ByteString(vec![7; 32])}
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let json = cli(env, &["check", "--operator-namespace", &ns, "-o", "json"]).await;
    let report = json.json();
    let kek = check_named(&report, "KEK rotation");
    assert_eq!(kek["status"], "pass", "{kek}");
    assert!(
        kek["message"]
            .as_str()
            .unwrap()
            .contains("KEK 0123456789abcdef"),
        "{kek}"
    );

    let run = cli(env, &["kek", "rotate", "--operator-namespace", &ns]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let annotations = secrets
        .get("portcullis-kek")
        .await
        .unwrap()
        .annotations()
        .clone();
    assert!(
        annotations.contains_key("portcullis.dev/rotate-kek"),
        "{annotations:?}"
    );
    let json = cli(env, &["check", "--operator-namespace", &ns, "-o", "json"]).await;
    let report = json.json();
    let kek = check_named(&report, "KEK rotation");
    assert_eq!(kek["status"], "warn", "{kek}");
    assert!(
        kek["message"].as_str().unwrap().contains("requested"),
        "{kek}"
    );
    // The key itself is never printed.
    assert!(!json.stdout.contains("BwcHBwcH"), "{json:?}");

    // While previous keys are kept, a second rotation is refused.
    secrets
        .patch(
            "portcullis-kek",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"data": {"kek-previous-00000000000000aa": ByteString(vec![8; 32])}}),
            ),
        )
        .await
        .unwrap();
    let run = cli(env, &["kek", "rotate", "--operator-namespace", &ns]).await;
    assert_ne!(run.code, Some(0), "{run:?}");
    assert!(run.stderr.contains("already in progress"), "{run:?}");
    let json = cli(env, &["check", "--operator-namespace", &ns, "-o", "json"]).await;
    let report = json.json();
    let kek = check_named(&report, "KEK rotation");
    assert!(
        kek["message"]
            .as_str()
            .unwrap()
            .contains("00000000000000aa"),
        "{kek}"
    );
}
