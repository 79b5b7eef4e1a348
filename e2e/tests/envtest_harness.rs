//! The envtest harness itself: the control plane starts, authenticates the identities
//! the project relies on (client certificates, ServiceAccount tokens with the
//! `portcullis.dev/identity` audience), enforces RBAC and tears down cleanly.
//!
//! Every test skips (prints why, passes) when `KUBEBUILDER_ASSETS` is not set.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::api::authentication::v1::{
    TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec, TokenReviewStatus,
};
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::Client;
use kube::api::{Api, DynamicObject, ListParams, ObjectMeta, PostParams};
use kube::discovery::ApiResource;
use portcullis_e2e::envtest::{self, EnvTest, StartOptions};

const IDENTITY_AUDIENCE: &str = "portcullis.dev/identity";

#[tokio::test]
async fn api_server_is_ready_and_a_namespace_can_be_created() -> Result<()> {
    let Some(env) = envtest::shared().await? else {
        return Ok(());
    };
    let client = env.client()?;
    let readyz = client
        .request_text(http::Request::get("/readyz").body(Vec::new())?)
        .await?;
    assert_eq!(readyz.trim(), "ok");

    let name = env.create_namespace("harness").await?;
    assert!(name.starts_with("harness-"), "{name}");
    let namespaces: Api<Namespace> = Api::all(client);
    let fetched = namespaces.get(&name).await?;
    assert_eq!(fetched.metadata.name.as_deref(), Some(name.as_str()));

    assert!(env.kubeconfig_path().is_file());
    assert!(env.server_url().starts_with("https://127.0.0.1:"));
    assert!(env.ca_cert_pem().contains("BEGIN CERTIFICATE"));
    assert!(env.serving_ca_pem().contains("BEGIN CERTIFICATE"));
    Ok(())
}

#[tokio::test]
async fn identity_audience_token_passes_token_review() -> Result<()> {
    let Some(env) = envtest::shared().await? else {
        return Ok(());
    };
    let client = env.client()?;
    let ns = env.create_namespace("token").await?;
    create_service_account(&client, &ns, "workload").await?;

    let token = request_token(&client, &ns, "workload", IDENTITY_AUDIENCE).await?;
    // The harness's service-account key is ECDSA P-256, so 1.20 signs with ES256.
    let header = token.split('.').next().context("token is not a JWT")?;
    let header: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header)?)?;
    assert_eq!(header["alg"], "ES256", "{header}");
    let status = review_token(&client, &token, IDENTITY_AUDIENCE).await?;
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    let user = status.user.context("TokenReview without user")?;
    assert_eq!(
        user.username.as_deref(),
        Some(format!("system:serviceaccount:{ns}:workload").as_str())
    );
    let groups = user.groups.unwrap_or_default();
    assert!(
        groups
            .iter()
            .any(|g| g == &format!("system:serviceaccounts:{ns}")),
        "{groups:?}"
    );
    assert_eq!(status.audiences, Some(vec![IDENTITY_AUDIENCE.to_owned()]));
    Ok(())
}

#[tokio::test]
async fn token_for_another_audience_is_not_authenticated_for_identity() -> Result<()> {
    let Some(env) = envtest::shared().await? else {
        return Ok(());
    };
    let client = env.client()?;
    let ns = env.create_namespace("audience").await?;
    create_service_account(&client, &ns, "workload").await?;

    for other in ["https://kubernetes.default.svc", "other.example.com"] {
        let token = request_token(&client, &ns, "workload", other).await?;
        let status = review_token(&client, &token, IDENTITY_AUDIENCE).await?;
        assert_ne!(status.authenticated, Some(true), "{other}: {status:?}");
        // The same token is good for the audience it was issued for.
        let status = review_token(&client, &token, other).await?;
        assert_eq!(status.authenticated, Some(true), "{other}: {status:?}");
    }
    Ok(())
}

#[tokio::test]
async fn user_clients_are_subject_to_rbac() -> Result<()> {
    let Some(env) = envtest::shared().await? else {
        return Ok(());
    };
    let admin = env.client()?;
    let ns = env.create_namespace("rbac").await?;
    let alice = env.client_for_user("alice@acme.com", &["acme-devs", "acme-ops"])?;
    let alice_secrets: Api<Secret> = Api::namespaced(alice, &ns);

    match alice_secrets.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) if status.is_forbidden() => {}
        other => bail!("expected 403 for alice listing secrets, got {other:?}"),
    }

    // Granting the *second* group proves both O= attributes reach the API server.
    grant_secret_listing(&admin, &ns, "Group", "acme-ops").await?;
    let all = ListParams::default();
    let listed = eventually(|| alice_secrets.list(&all)).await?;
    assert!(
        listed
            .items
            .iter()
            .all(|s| s.metadata.namespace.as_deref() == Some(&*ns))
    );

    // Impersonation: the same rules apply to the impersonated user.
    let bob = env.client_impersonating("bob@acme.com", &["a", "b", "c"])?;
    let bob_secrets: Api<Secret> = Api::namespaced(bob, &ns);
    match bob_secrets.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) if status.is_forbidden() => {}
        other => bail!("expected 403 for bob listing secrets, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn controller_manager_creates_default_service_accounts() -> Result<()> {
    let Some(env) = envtest::shared().await? else {
        return Ok(());
    };
    if !env.has_controller_manager() {
        eprintln!("skipping: no kube-controller-manager in KUBEBUILDER_ASSETS");
        return Ok(());
    }
    let ns = env.create_namespace("defaults").await?;
    let accounts: Api<ServiceAccount> = Api::namespaced(env.client()?, &ns);
    let deadline = Instant::now() + Duration::from_secs(30);
    while accounts.get_opt("default").await?.is_none() {
        ensure!(
            Instant::now() < deadline,
            "no default ServiceAccount in {ns} after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test]
async fn crds_from_a_directory_are_established_and_served() -> Result<()> {
    let Some(env) = envtest::shared().await? else {
        return Ok(());
    };
    let fixtures = tempfile::tempdir()?;
    std::fs::write(fixtures.path().join("widgets.example.dev.yaml"), WIDGET_CRD)?;
    std::fs::write(fixtures.path().join("README.md"), "not a manifest")?;
    let names = env.install_crds_from(fixtures.path()).await?;
    assert_eq!(names, ["widgets.example.dev"]);
    // Idempotent: tests sharing an instance may all install.
    env.install_crds_from(fixtures.path()).await?;

    let ns = env.create_namespace("crd").await?;
    let resource = ApiResource {
        group: "example.dev".into(),
        version: "v1".into(),
        api_version: "example.dev/v1".into(),
        kind: "Widget".into(),
        plural: "widgets".into(),
    };
    let widgets: Api<DynamicObject> = Api::namespaced_with(env.client()?, &ns, &resource);
    let widget: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "example.dev/v1", "kind": "Widget",
        "metadata": {"name": "w"}, "spec": {"size": 3},
    }))?;
    let created = widgets.create(&PostParams::default(), &widget).await?;
    assert_eq!(created.data["spec"]["size"], 3);
    let invalid: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "example.dev/v1", "kind": "Widget",
        "metadata": {"name": "bad"}, "spec": {"size": 0},
    }))?;
    assert!(
        widgets
            .create(&PostParams::default(), &invalid)
            .await
            .is_err()
    );
    Ok(())
}

#[tokio::test]
async fn dedicated_instance_stops_its_processes_and_removes_its_dir_on_drop() -> Result<()> {
    let options = StartOptions {
        controller_manager: false,
        ..StartOptions::default()
    };
    let started = Instant::now();
    let Some(env) = EnvTest::start_with(options).await? else {
        return Ok(());
    };
    eprintln!("dedicated envtest started in {:.1?}", started.elapsed());
    let dir = env.dir().to_path_buf();
    let pids: Vec<u32> = std::fs::read_to_string(dir.join("pids"))?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    assert_eq!(pids.len(), 2, "etcd and kube-apiserver: {pids:?}");
    assert!(pids.iter().all(|pid| process_alive(*pid)));
    let namespaces: Api<Namespace> = Api::all(env.client()?);
    namespaces.get("default").await?;

    let stopping = Instant::now();
    drop(env);
    eprintln!("dedicated envtest stopped in {:.1?}", stopping.elapsed());
    let alive: Vec<u32> = pids.into_iter().filter(|pid| process_alive(*pid)).collect();
    assert!(alive.is_empty(), "still running: {alive:?}");
    assert!(!dir.exists(), "{} still exists", dir.display());
    Ok(())
}

fn process_alive(pid: u32) -> bool {
    // A zombie has released everything; only count processes that still run.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            !stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

async fn create_service_account(client: &Client, ns: &str, name: &str) -> Result<()> {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let account = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        ..ServiceAccount::default()
    };
    accounts.create(&PostParams::default(), &account).await?;
    Ok(())
}

async fn request_token(client: &Client, ns: &str, account: &str, audience: &str) -> Result<String> {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_owned()],
            // 1.20 rejects less than 10 minutes.
            expiration_seconds: Some(600),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    let issued = accounts
        .create_token_request(account, &PostParams::default(), &request)
        .await?;
    let token = issued.status.context("TokenRequest without status")?.token;
    ensure!(!token.is_empty(), "empty token");
    Ok(token)
}

async fn review_token(client: &Client, token: &str, audience: &str) -> Result<TokenReviewStatus> {
    let reviews: Api<TokenReview> = Api::all(client.clone());
    let review = TokenReview {
        spec: TokenReviewSpec {
            audiences: Some(vec![audience.to_owned()]),
            token: Some(token.to_owned()),
        },
        ..TokenReview::default()
    };
    let reviewed = reviews.create(&PostParams::default(), &review).await?;
    reviewed.status.context("TokenReview without status")
}

async fn grant_secret_listing(client: &Client, ns: &str, kind: &str, name: &str) -> Result<()> {
    let role = Role {
        metadata: ObjectMeta {
            name: Some("secret-lister".into()),
            ..ObjectMeta::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["secrets".into()]),
            verbs: vec!["list".into()],
            ..PolicyRule::default()
        }]),
    };
    Api::<Role>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &role)
        .await?;
    let binding = RoleBinding {
        metadata: ObjectMeta {
            name: Some("secret-lister".into()),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: "secret-lister".into(),
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: kind.into(),
            name: name.into(),
            namespace: None,
        }]),
    };
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await?;
    Ok(())
}

/// RBAC changes reach the authorizer through an informer: retry briefly.
async fn eventually<T, F, Fut>(mut call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = kube::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(e) if Instant::now() >= deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

const WIDGET_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.dev
spec:
  group: example.dev
  names: {kind: Widget, plural: widgets, singular: widget, listKind: WidgetList}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer, minimum: 1}
---
"#;
