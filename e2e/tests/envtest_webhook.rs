//! The admission webhooks behind a real kube-apiserver (envtest, 1.20): the API server
//! calls the operator's webhook server on 127.0.0.1 over TLS, trusting the CA bundle
//! the operator patched into the webhook configurations itself.
//!
//! One webhook server per test binary (on its own runtime thread, so it outlives every
//! test's runtime); each test works in its own namespaces. Every test skips (prints
//! why, passes) when `KUBEBUILDER_ASSETS` is not set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role as RbacRole, RoleBinding, RoleRef, Subject};
use kube::Client;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use portcullis_crds::{ApiKey, Role, Tenant};
use portcullis_e2e::envtest::{self, EnvTest};
use portcullis_operator::envelope::Kek;
use portcullis_operator::webhook::config::{self, WebhookConfigSettings, WebhookTarget};
use portcullis_operator::webhook::{
    AdminAuditEvent, AdminAuditSink, InjectSettings, ServerLimits, ServerVersion,
    ValidatorSettings, WebhookCertificates, WebhookState, WebhookTlsSettings, serve_on,
};
use portcullis_sidecar::control::identity::SystemClock;
use serde_json::json;
use tokio::sync::OnceCell;

const E2E_MANAGER: &str = "portcullis-e2e";
const PROXY_IMAGE: &str = "ghcr.io/portcullis-dev/portcullis-proxy:dev";

/// Collects admin audit events for the tests to look at.
#[derive(Default)]
struct CollectedAudit(Mutex<Vec<AdminAuditEvent>>);

impl AdminAuditSink for CollectedAudit {
    fn record(&self, event: AdminAuditEvent) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(event);
    }
}

impl CollectedAudit {
    fn lines_for(&self, object: &str) -> Vec<String> {
        let events = self.0.lock().unwrap_or_else(|e| e.into_inner());
        events
            .iter()
            .filter(|e| e.object == object)
            .map(ToString::to_string)
            .collect()
    }
}

struct Webhook {
    port: u16,
    operator_namespace: String,
    certificates: Arc<WebhookCertificates>,
    audit: Arc<CollectedAudit>,
    server_version: ServerVersion,
}

static WEBHOOK: OnceCell<Result<Webhook, String>> = OnceCell::const_new();

/// The envtest and the webhook server, or `None` when envtest is skipped.
async fn setup() -> Result<Option<(&'static EnvTest, &'static Webhook)>> {
    let Some(env) = envtest::shared().await? else {
        return Ok(None);
    };
    let webhook = WEBHOOK
        .get_or_init(|| async move { start_webhook(env).await.map_err(|e| format!("{e:#}")) })
        .await
        .as_ref()
        .map_err(|e| anyhow::anyhow!("webhook fixture failed: {e}"))?;
    Ok(Some((env, webhook)))
}

/// Starts the webhook server on a runtime of its own and waits until the API server
/// reaches it.
async fn start_webhook(env: &'static EnvTest) -> Result<Webhook> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<Webhook>>();
    std::thread::spawn(move || {
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                let _ = ready_tx.send(Err(e.into()));
                return;
            }
        };
        runtime.block_on(async move {
            match prepare(env).await {
                Ok((webhook, server)) => {
                    let _ = ready_tx.send(Ok(webhook));
                    if let Err(e) = server.await {
                        eprintln!("webhook server stopped: {e}");
                    }
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        });
    });
    let webhook = ready_rx.await.context("the webhook thread died")??;
    wait_until_the_api_server_uses_the_webhook(env).await?;
    Ok(webhook)
}

type ServerFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<(), portcullis_operator::webhook::WebhookError>>
            + Send,
    >,
>;

async fn prepare(env: &'static EnvTest) -> Result<(Webhook, ServerFuture)> {
    let client = env.client()?;
    env.install_crds().await?;
    let operator_namespace = env.create_namespace("portcullis-system").await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();

    // What the Helm chart installs: the configurations without a CA bundle.
    let settings = WebhookConfigSettings {
        target: WebhookTarget::Url(format!("https://127.0.0.1:{port}")),
        operator_namespace: operator_namespace.clone(),
        ca_bundle: String::new(),
    };
    let params = PatchParams::apply(E2E_MANAGER).force();
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    mutating
        .patch(
            config::MUTATING_CONFIGURATION,
            &params,
            &Patch::Apply(config::mutating(&settings)),
        )
        .await
        .context("installing the MutatingWebhookConfiguration")?;
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    validating
        .patch(
            config::VALIDATING_CONFIGURATION,
            &params,
            &Patch::Apply(config::validating(&settings)),
        )
        .await
        .context("installing the ValidatingWebhookConfiguration")?;

    // The operator: its CA Secret, serving leaf and the caBundle patch.
    let mut tls = WebhookTlsSettings::new(&operator_namespace, "portcullis-operator");
    tls.extra_sans = vec!["127.0.0.1".into()];
    let certificates = WebhookCertificates::start(
        client.clone(),
        tls,
        Arc::new(Kek::generate()),
        Arc::new(SystemClock),
    )
    .await?;
    let server_version = ServerVersion::detect(&client).await?;
    let audit = Arc::new(CollectedAudit::default());
    let state = WebhookState::new(
        client,
        InjectSettings::new(PROXY_IMAGE, &operator_namespace, "portcullis-operator"),
        ValidatorSettings::new(&operator_namespace, "portcullis-operator"),
        server_version,
    )
    .with_audit(audit.clone());
    let server: ServerFuture = Box::pin(serve_on(
        listener,
        certificates.server_config()?,
        Arc::new(state),
        ServerLimits::default(),
        Default::default(), // never cancelled: serves until the test process exits
    ));
    Ok((
        Webhook {
            port,
            operator_namespace,
            certificates,
            audit,
            server_version,
        },
        server,
    ))
}

/// The API server picks up webhook configurations asynchronously: dry-run pods until
/// one comes back injected.
async fn wait_until_the_api_server_uses_the_webhook(env: &EnvTest) -> Result<()> {
    let client = env.client()?;
    let ns = opted_in_namespace(env, "probe", "enabled").await?;
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = match pods.create(&dry_run, &app_pod("probe", None)).await {
            Ok(pod) if container_names(&pod).contains(&"portcullis-proxy".to_owned()) => {
                return Ok(());
            }
            Ok(_) => "created without the proxy".to_owned(),
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            bail!("the API server never called the webhook: {last}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn label_namespace(client: &Client, ns: &str, labels: &[(&str, &str)]) -> Result<()> {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": labels}})),
        )
        .await?;
    Ok(())
}

/// A namespace labelled `portcullis.dev/inject=<level>` whose `default` ServiceAccount
/// exists (the ServiceAccount admission plugin refuses pods until it does).
async fn opted_in_namespace(env: &EnvTest, prefix: &str, level: &str) -> Result<String> {
    let client = env.client()?;
    let ns = env.create_namespace(prefix).await?;
    if !level.is_empty() {
        label_namespace(&client, &ns, &[("portcullis.dev/inject", level)]).await?;
    }
    let accounts: Api<ServiceAccount> = Api::namespaced(client, &ns);
    let deadline = Instant::now() + Duration::from_secs(30);
    while accounts.get_opt("default").await?.is_none() {
        ensure!(
            Instant::now() < deadline,
            "no default ServiceAccount in {ns}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(ns)
}

fn app_pod(name: &str, annotations: Option<BTreeMap<String, String>>) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            // No token Secret needed (1.20's token controller may not have made one yet).
            "automountServiceAccountToken": false,
            "containers": [{"name": "app", "image": "acme/web:1", "ports": [{"containerPort": 8080, "name": "http"}]}]
        }
    }))
    .unwrap()
}

fn container_names(pod: &Pod) -> Vec<String> {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter().map(|c| c.name.clone()))
        .collect()
}

fn init_container_names(pod: &Pod) -> Vec<String> {
    pod.spec
        .iter()
        .flat_map(|s| s.init_containers.iter().flatten().map(|c| c.name.clone()))
        .collect()
}

#[tokio::test]
async fn a_pod_in_an_opted_in_namespace_is_stored_with_the_proxy() -> Result<()> {
    let Some((env, webhook)) = setup().await? else {
        return Ok(());
    };
    ensure!(
        !webhook.server_version.supports_native_sidecars(),
        "envtest is 1.20: expected regular-container mode, got {:?}",
        webhook.server_version
    );
    let ns = opted_in_namespace(env, "inject", "enabled").await?;
    let pods: Api<Pod> = Api::namespaced(env.client()?, &ns);
    pods.create(&PostParams::default(), &app_pod("web", None))
        .await?;

    let stored = pods.get("web").await?;
    assert_eq!(container_names(&stored), ["portcullis-proxy", "app"]);
    assert_eq!(init_container_names(&stored), ["portcullis-init"]);
    let spec = stored.spec.clone().context("no spec")?;
    let proxy = &spec.containers[0];
    assert_eq!(proxy.restart_policy, None, "no native sidecar on 1.20");
    assert!(
        proxy
            .lifecycle
            .as_ref()
            .and_then(|l| l.post_start.as_ref())
            .is_some(),
        "postStart waits for /ready"
    );
    let env_vars: BTreeMap<String, String> = proxy
        .env
        .iter()
        .flatten()
        .filter_map(|e| e.value.clone().map(|v| (e.name.clone(), v)))
        .collect();
    assert_eq!(
        env_vars.get("PORTCULLIS_APP_PORT").map(String::as_str),
        Some("8080")
    );

    let init = &spec.init_containers.clone().unwrap_or_default()[0];
    let capabilities = init
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.clone())
        .unwrap_or_default();
    assert_eq!(
        capabilities.add,
        Some(vec!["NET_ADMIN".to_owned(), "NET_RAW".to_owned()])
    );

    let volumes = spec.volumes.clone().unwrap_or_default();
    let token = volumes
        .iter()
        .find(|v| v.name == "portcullis-identity-token")
        .and_then(|v| v.projected.clone())
        .and_then(|p| p.sources)
        .and_then(|s| s.into_iter().next())
        .and_then(|s| s.service_account_token)
        .context("no projected identity token")?;
    assert_eq!(token.audience.as_deref(), Some("portcullis.dev/identity"));
    assert_eq!(token.expiration_seconds, Some(3600));
    let bundle = volumes
        .iter()
        .find(|v| v.name == "portcullis-trust-bundle")
        .context("no trust bundle volume")?;
    assert_eq!(
        bundle.config_map.as_ref().map(|c| c.name.as_str()),
        Some("portcullis-trust-bundle")
    );
    let annotations = stored.metadata.annotations.clone().unwrap_or_default();
    assert!(
        annotations.contains_key("portcullis.dev/injected"),
        "{annotations:?}"
    );

    // A Tenant-owned namespace (labelled by the operator) injects without the inject label.
    let tenant_ns = opted_in_namespace(env, "tenant-inject", "").await?;
    label_namespace(
        &env.client()?,
        &tenant_ns,
        &[("portcullis.dev/tenant", "acme")],
    )
    .await?;
    let tenant_pods: Api<Pod> = Api::namespaced(env.client()?, &tenant_ns);
    let created = create_when_selector_seen(&tenant_pods, "web").await?;
    assert_eq!(container_names(&created)[0], "portcullis-proxy");
    Ok(())
}

/// Namespace label changes reach the API server's webhook matcher through an informer;
/// retry briefly until the pod is injected.
async fn create_when_selector_seen(pods: &Api<Pod>, name: &str) -> Result<Pod> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pod = pods
            .create(
                &PostParams {
                    dry_run: true,
                    ..PostParams::default()
                },
                &app_pod(name, None),
            )
            .await?;
        if container_names(&pod).contains(&"portcullis-proxy".to_owned()) {
            return Ok(pods
                .create(&PostParams::default(), &app_pod(name, None))
                .await?);
        }
        ensure!(
            Instant::now() < deadline,
            "never injected: {:?}",
            container_names(&pod)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn opt_out_and_not_opted_in_pods_are_stored_unchanged() -> Result<()> {
    let Some((env, _)) = setup().await? else {
        return Ok(());
    };
    let ns = opted_in_namespace(env, "optout", "enabled").await?;
    let pods: Api<Pod> = Api::namespaced(env.client()?, &ns);
    let annotations = BTreeMap::from([("portcullis.dev/inject".to_owned(), "disabled".to_owned())]);
    let created = pods
        .create(&PostParams::default(), &app_pod("batch", Some(annotations)))
        .await?;
    assert_eq!(container_names(&created), ["app"]);
    assert!(init_container_names(&created).is_empty());

    let plain = opted_in_namespace(env, "plain", "").await?;
    let pods: Api<Pod> = Api::namespaced(env.client()?, &plain);
    let created = pods
        .create(&PostParams::default(), &app_pod("web", None))
        .await?;
    assert_eq!(container_names(&created), ["app"]);
    Ok(())
}

#[tokio::test]
async fn a_namespace_requiring_injection_refuses_host_network_pods() -> Result<()> {
    let Some((env, _)) = setup().await? else {
        return Ok(());
    };
    let ns = opted_in_namespace(env, "required", "required").await?;
    let pods: Api<Pod> = Api::namespaced(env.client()?, &ns);
    let mut pod = app_pod("node-agent", None);
    if let Some(spec) = pod.spec.as_mut() {
        spec.host_network = Some(true);
    }
    match pods.create(&PostParams::default(), &pod).await {
        Ok(_) => bail!("a hostNetwork pod was admitted where injection is required"),
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "{status:?}");
            assert_eq!(
                status.message,
                format!(
                    "admission webhook \"inject.portcullis.dev\" denied the request: pod {ns}/node-agent cannot be \
                     injected with the Portcullis proxy: it uses hostNetwork, so the init step's iptables rules \
                     would redirect the node's own traffic; namespace \"{ns}\" requires injection (label \
                     portcullis.dev/inject=required)"
                )
            );
        }
        Err(other) => return Err(other.into()),
    }
    Ok(())
}

/// A tenant namespace with a catalogue (identify, events, signals), a Role
/// `ingest-writer` (identify + keys:create) held by alice, and Kubernetes RBAC letting
/// alice and bob write ApiKeys (what the Role controller will emit).
async fn tenant_namespace(env: &EnvTest) -> Result<String> {
    let admin = env.client()?;
    let ns = env.create_namespace("keys").await?;
    let tenants: Api<Tenant> = Api::all(admin.clone());
    let tenant: Tenant = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
        "metadata": {"name": format!("t-{ns}")},
        "spec": {
            "namespaces": [ns],
            "scopes": {
                "identify": [{"methods": ["POST"], "path": "/v1/identify"}],
                "events": [{"methods": ["GET", "POST"], "path": "/v1/events/*"}],
                "signals": [{"methods": ["GET"], "path": "/v1/signals*"}]
            }
        }
    }))?;
    tenants
        .create(&PostParams::default(), &tenant)
        .await
        .context("creating the Tenant")?;
    let roles: Api<Role> = Api::namespaced(admin.clone(), &ns);
    let role: Role = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "Role",
        "metadata": {"name": "ingest-writer"},
        "spec": {"scopes": ["identify"], "permissions": ["keys:create"], "subjects": [{"kind": "User", "name": "alice"}]}
    }))?;
    roles
        .create(&PostParams::default(), &role)
        .await
        .context("creating the Role")?;

    let rbac_roles: Api<RbacRole> = Api::namespaced(admin.clone(), &ns);
    rbac_roles
        .create(
            &PostParams::default(),
            &RbacRole {
                metadata: ObjectMeta {
                    name: Some("apikey-writer".into()),
                    ..ObjectMeta::default()
                },
                rules: Some(vec![PolicyRule {
                    api_groups: Some(vec!["portcullis.dev".into()]),
                    resources: Some(vec!["apikeys".into()]),
                    verbs: ["get", "list", "create", "update", "patch", "delete"]
                        .map(String::from)
                        .to_vec(),
                    ..PolicyRule::default()
                }]),
            },
        )
        .await?;
    let bindings: Api<RoleBinding> = Api::namespaced(admin, &ns);
    bindings
        .create(
            &PostParams::default(),
            &RoleBinding {
                metadata: ObjectMeta {
                    name: Some("apikey-writers".into()),
                    ..ObjectMeta::default()
                },
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".into(),
                    kind: "Role".into(),
                    name: "apikey-writer".into(),
                },
                subjects: Some(
                    ["alice", "bob"]
                        .map(|user| Subject {
                            api_group: Some("rbac.authorization.k8s.io".into()),
                            kind: "User".into(),
                            name: user.into(),
                            namespace: None,
                        })
                        .to_vec(),
                ),
            },
        )
        .await?;
    Ok(ns)
}

fn api_key(name: &str, role: &str, scopes: &[&str]) -> Result<ApiKey> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiKey",
        "metadata": {"name": name},
        "spec": {"role": role, "scopes": scopes}
    }))?)
}

async fn refusal(api: &Api<ApiKey>, key: &ApiKey) -> Result<(u16, String)> {
    match api.create(&PostParams::default(), key).await {
        Ok(_) => bail!("the ApiKey was admitted"),
        Err(kube::Error::Api(status)) => Ok((status.code, status.message)),
        Err(other) => Err(other.into()),
    }
}

#[tokio::test]
async fn a_scope_beyond_the_role_is_refused_with_the_message_kubectl_shows() -> Result<()> {
    let Some((env, webhook)) = setup().await? else {
        return Ok(());
    };
    let ns = tenant_namespace(env).await?;
    let alice: Api<ApiKey> = Api::namespaced(env.client_for_user("alice", &[])?, &ns);
    let key = api_key("ingest", "ingest-writer", &["identify", "events"])?;
    let expected = "ApiKey \"ingest\" asks for scope \"events\" which role \"ingest-writer\" does not grant; grant it \
                    in Role \"ingest-writer\" or remove it from spec.scopes";
    let (code, message) = refusal(&alice, &key).await?;
    assert_eq!(code, 422);
    assert_eq!(
        message,
        format!("admission webhook \"validate.portcullis.dev\" denied the request: {expected}")
    );

    // The same through kubectl, as alice: kubectl prints a 422 without field causes as
    // "The request is invalid: <message>" (causes would hide the message behind field paths).
    if std::process::Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_ok()
    {
        let kubeconfig = env.kubeconfig_for_user("alice", &[])?;
        let mut child = std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["create", "-n", &ns, "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write as _;
            stdin.write_all(serde_json::to_string(&key)?.as_bytes())?;
        }
        let output = child.wait_with_output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success());
        assert!(
            stderr.contains(&format!(
                "The request is invalid: error when creating \"STDIN\": admission webhook \
                 \"validate.portcullis.dev\" denied the request: {expected}"
            )),
            "kubectl said: {stderr}"
        );
    } else {
        eprintln!("kubectl not found: checked the API error only");
    }
    assert!(
        webhook.audit.lines_for(&format!("{ns}/ingest")).is_empty(),
        "refusals are not audited"
    );
    Ok(())
}

#[tokio::test]
async fn a_user_holding_keys_create_succeeds_and_others_are_told_what_they_miss() -> Result<()> {
    let Some((env, webhook)) = setup().await? else {
        return Ok(());
    };
    let ns = tenant_namespace(env).await?;

    let bob: Api<ApiKey> = Api::namespaced(env.client_for_user("bob", &[])?, &ns);
    let (code, message) =
        refusal(&bob, &api_key("ingest", "ingest-writer", &["identify"])?).await?;
    assert_eq!(code, 403);
    assert!(
        message.ends_with(&format!(
            "user \"bob\" may not create ApiKey \"ingest\": that needs permission keys:create, which none of your \
             Roles in namespace \"{ns}\" grants (you hold: none); ask a tenant admin to add you (User \"bob\") to \
             the subjects of a Role with keys:create, such as Developer"
        )),
        "{message}"
    );

    let alice: Api<ApiKey> = Api::namespaced(env.client_for_user("alice", &[])?, &ns);
    alice
        .create(
            &PostParams::default(),
            &api_key("ingest", "ingest-writer", &["identify"])?,
        )
        .await?;
    let lines = webhook.audit.lines_for(&format!("{ns}/ingest"));
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].ends_with(" | admin.key.create | user:alice | 201"),
        "{lines:?}"
    );

    // alice may not hand out a scope she does not hold, even one the role grants.
    let (code, message) = refusal(&alice, &api_key("wide", "Developer", &["events"])?).await?;
    assert_eq!(code, 403);
    assert!(
        message.contains("user \"alice\" may not grant scope \"events\""),
        "{message}"
    );
    Ok(())
}

#[tokio::test]
async fn a_cluster_admin_creates_any_valid_key() -> Result<()> {
    let Some((env, webhook)) = setup().await? else {
        return Ok(());
    };
    let ns = tenant_namespace(env).await?;
    let admin: Api<ApiKey> = Api::namespaced(env.client()?, &ns);
    // Developer has no object yet: built-in roles exist before the operator creates them.
    admin
        .create(
            &PostParams::default(),
            &api_key("ops", "Developer", &["identify", "events", "signals"])?,
        )
        .await?;
    let lines = webhook.audit.lines_for(&format!("{ns}/ops"));
    assert!(
        lines
            .iter()
            .any(|l| l.ends_with(" | admin.key.create | user:envtest-admin | 201")),
        "{lines:?}"
    );
    // Still validated: a scope outside the tenant's catalogue.
    let (code, _) = refusal(&admin, &api_key("typo", "Developer", &["identfy"])?).await?;
    assert_eq!(code, 422);
    Ok(())
}

#[tokio::test]
async fn the_operator_patched_the_ca_bundle_with_server_side_apply() -> Result<()> {
    let Some((env, webhook)) = setup().await? else {
        return Ok(());
    };
    let client = env.client()?;
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let config = mutating.get(config::MUTATING_CONFIGURATION).await?;
    let bundle = webhook.certificates.ca_bundle_pem().await;
    for hook in config.webhooks.iter().flatten() {
        let patched = hook
            .client_config
            .ca_bundle
            .as_ref()
            .map(|b| b.0.clone())
            .unwrap_or_default();
        assert_eq!(
            String::from_utf8_lossy(&patched),
            bundle,
            "webhook {}",
            hook.name
        );
    }
    let managers: Vec<String> = config
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        managers.contains(&"portcullis-operator".to_owned()),
        "{managers:?}"
    );
    assert!(
        managers.contains(&E2E_MANAGER.to_owned()),
        "the chart's fields stay the chart's: {managers:?}"
    );
    // The CA lives in the operator's namespace.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client, &webhook.operator_namespace);
    assert!(secrets.get_opt("portcullis-webhook-ca").await?.is_some());
    Ok(())
}

/// The DER of the certificate the webhook serves now.
async fn served_certificate(webhook: &Webhook) -> Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, ServerName};
    let bundle = webhook.certificates.ca_bundle_pem().await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(portcullis_sidecar::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", webhook.port)).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1")?, tcp)
        .await?;
    let der = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .context("no certificate")?;
    Ok(der.to_vec())
}

#[tokio::test]
async fn rotating_the_serving_certificate_fails_no_admission() -> Result<()> {
    let Some((env, webhook)) = setup().await? else {
        return Ok(());
    };
    let ns = opted_in_namespace(env, "rotation", "enabled").await?;
    let pods: Api<Pod> = Api::namespaced(env.client()?, &ns);
    let before = served_certificate(webhook).await?;

    let rotating = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let rotations = tokio::spawn({
        let rotating = rotating.clone();
        let certificates = webhook.certificates.clone();
        async move {
            let mut count = 0u32;
            while rotating.load(std::sync::atomic::Ordering::Relaxed) {
                certificates.rotate_leaf().await?;
                if count.is_multiple_of(5) {
                    certificates.refresh().await?; // the periodic path: re-applies the bundle
                }
                count += 1;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            anyhow::Ok(count)
        }
    });
    let mut failures = Vec::new();
    let total = 30;
    for i in 0..total {
        let name = format!("web-{i}");
        match pods
            .create(&PostParams::default(), &app_pod(&name, None))
            .await
        {
            Ok(pod) if container_names(&pod)[0] == "portcullis-proxy" => {}
            Ok(pod) => failures.push(format!("{name}: not injected: {:?}", container_names(&pod))),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    rotating.store(false, std::sync::atomic::Ordering::Relaxed);
    let count = rotations.await??;
    let after = served_certificate(webhook).await?;
    assert!(
        failures.is_empty(),
        "{} of {total} admissions failed: {failures:?}",
        failures.len()
    );
    assert!(
        count >= 3,
        "only {count} rotations happened during the admissions"
    );
    assert_ne!(before, after, "the served certificate did not change");
    Ok(())
}

// ------------------------------------------------ attacks: forging or skipping the proxy

/// A namespace bound (labelled, as the Tenant controller does) to a new Tenant of
/// `classification`.
async fn classified_namespace(env: &EnvTest, classification: &str) -> Result<String> {
    let client = env.client()?;
    let ns = opted_in_namespace(env, &classification.to_lowercase(), "").await?;
    let tenant = format!("t-{ns}");
    let tenants: Api<Tenant> = Api::all(client.clone());
    let object: Tenant = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
        "metadata": {"name": tenant},
        "spec": {"namespaces": [ns], "dataClassification": classification}
    }))?;
    tenants
        .create(&PostParams::default(), &object)
        .await
        .context("creating the Tenant")?;
    label_namespace(&client, &ns, &[("portcullis.dev/tenant", &tenant)]).await?;
    Ok(ns)
}

/// The API server's refusal of creating `pod`; an error when it was admitted.
async fn refused_creation(pods: &Api<Pod>, pod: &Pod) -> Result<String> {
    match pods.create(&PostParams::default(), pod).await {
        Ok(created) => bail!(
            "admitted with containers {:?} and init containers {:?}",
            container_names(&created),
            init_container_names(&created)
        ),
        Err(kube::Error::Api(status)) => {
            ensure!(status.code == 403, "{status:?}");
            Ok(status.message)
        }
        Err(other) => Err(other.into()),
    }
}

#[tokio::test]
async fn a_forged_injected_annotation_and_fake_proxy_are_refused_in_a_required_namespace()
-> Result<()> {
    let Some((env, _)) = setup().await? else {
        return Ok(());
    };
    let ns = opted_in_namespace(env, "forged", "required").await?;
    let pods: Api<Pod> = Api::namespaced(env.client()?, &ns);
    let forged: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "forged", "annotations": {"portcullis.dev/injected": "0.1.0"}},
        "spec": {
            "automountServiceAccountToken": false,
            "containers": [
                {"name": "portcullis-proxy", "image": "mallory/sleep:1"},
                {"name": "app", "image": "acme/web:1", "ports": [{"containerPort": 8080}]}
            ]
        }
    }))?;
    let message = refused_creation(&pods, &forged).await?;
    assert!(
        message.contains("not what Portcullis injects") && message.contains("mallory/sleep:1"),
        "{message}"
    );
    Ok(())
}

#[tokio::test]
async fn a_pod_cannot_opt_out_in_a_restricted_tenant_namespace() -> Result<()> {
    let Some((env, _)) = setup().await? else {
        return Ok(());
    };
    let ns = classified_namespace(env, "Restricted").await?;
    let pods: Api<Pod> = Api::namespaced(env.client()?, &ns);
    let annotations = BTreeMap::from([("portcullis.dev/inject".to_owned(), "disabled".to_owned())]);
    let message = refused_creation(&pods, &app_pod("batch", Some(annotations))).await?;
    assert!(
        message.contains("cannot opt out")
            && message.contains("Restricted")
            && message.contains("remove the annotation portcullis.dev/inject: disabled"),
        "{message}"
    );
    // Nor does labelling the namespace inject=disabled switch injection off there.
    label_namespace(
        &env.client()?,
        &ns,
        &[("portcullis.dev/inject", "disabled")],
    )
    .await?;
    let created = pods
        .create(&PostParams::default(), &app_pod("web", None))
        .await?;
    assert_eq!(container_names(&created), ["portcullis-proxy", "app"]);
    Ok(())
}

#[tokio::test]
async fn skipping_the_app_port_is_refused_in_a_confidential_tenant() -> Result<()> {
    let Some((env, _)) = setup().await? else {
        return Ok(());
    };
    let ns = classified_namespace(env, "Confidential").await?;
    let pods: Api<Pod> = Api::namespaced(env.client()?, &ns);
    let annotations = BTreeMap::from([(
        "portcullis.dev/skip-inbound-ports".to_owned(),
        "8080".to_owned(),
    )]);
    let message = refused_creation(&pods, &app_pod("web", Some(annotations))).await?;
    assert!(
        message.contains("skip port 8080") && message.contains("Confidential"),
        "{message}"
    );
    Ok(())
}

#[tokio::test]
async fn an_update_swapping_the_proxy_image_is_refused() -> Result<()> {
    let Some((env, _)) = setup().await? else {
        return Ok(());
    };
    let ns = opted_in_namespace(env, "swap", "enabled").await?;
    let pods: Api<Pod> = Api::namespaced(env.client()?, &ns);
    pods.create(&PostParams::default(), &app_pod("web", None))
        .await?;
    let swap = |container: &str, image: &str| json!({"spec": {"containers": [{"name": container, "image": image}]}});
    match pods
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Strategic(swap("portcullis-proxy", "mallory/proxy:1")),
        )
        .await
    {
        Ok(pod) => bail!(
            "the proxy image was swapped: {:?}",
            pod.spec.map(|s| s.containers[0].image.clone())
        ),
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "{status:?}");
            assert!(
                status
                    .message
                    .contains("\"portcullis-proxy\" cannot be changed"),
                "{}",
                status.message
            );
        }
        Err(other) => return Err(other.into()),
    }
    // The app's own image may still change.
    let updated = pods
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Strategic(swap("app", "acme/web:2")),
        )
        .await?;
    let spec = updated.spec.context("no spec")?;
    assert_eq!(spec.containers[1].image.as_deref(), Some("acme/web:2"));
    assert_eq!(spec.containers[0].image.as_deref(), Some(PROXY_IMAGE));
    Ok(())
}

// ------------------------------------------------ the webhook CA at rest

#[tokio::test]
async fn the_webhook_ca_secret_holds_no_pem_private_key_and_a_restart_reads_it_back() -> Result<()>
{
    let Some((env, _)) = setup().await? else {
        return Ok(());
    };
    let client = env.client()?;
    let ns = env.create_namespace("webhook-ca").await?;
    let mut tls = WebhookTlsSettings::new(&ns, "portcullis-operator");
    // Configurations that do not exist: this test leaves the shared ones alone.
    tls.mutating_configuration = format!("{ns}-injector");
    tls.validating_configuration = format!("{ns}-validator");
    let kek = Arc::new(Kek::generate());
    let first = WebhookCertificates::start(
        client.clone(),
        tls.clone(),
        kek.clone(),
        Arc::new(SystemClock),
    )
    .await?;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
    let stored = secrets.get("portcullis-webhook-ca").await?;
    for (key, value) in stored.data.iter().flatten() {
        assert!(
            !String::from_utf8_lossy(&value.0).contains("PRIVATE KEY"),
            "{key} holds a PEM private key"
        );
    }
    assert!(
        stored
            .data
            .iter()
            .flatten()
            .any(|(k, _)| k == "ca.key.wrapped")
    );
    // A restart (a second replica) reads the wrapped key back and serves from the same CA.
    let second = WebhookCertificates::start(
        client.clone(),
        tls.clone(),
        kek.clone(),
        Arc::new(SystemClock),
    )
    .await?;
    assert_eq!(second.ca_bundle_pem().await, first.ca_bundle_pem().await);
    // A restart with another KEK refuses the Secret rather than misreading it.
    let refused = WebhookCertificates::start(
        client.clone(),
        tls.clone(),
        Arc::new(Kek::generate()),
        Arc::new(SystemClock),
    )
    .await
    .err()
    .context("another KEK read the wrapped key")?;
    assert!(
        refused.to_string().contains("cannot be unwrapped"),
        "{refused}"
    );

    // Upgrade: a Secret written before wrapping (PEM key under ca.key) is read once and
    // written back wrapped, keeping the CA.
    let legacy_ns = env.create_namespace("webhook-ca-legacy").await?;
    let legacy = rcgen::generate_simple_self_signed(vec!["legacy".into()])?;
    let legacy_secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), &legacy_ns);
    legacy_secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "portcullis-webhook-ca"},
                "stringData": {"ca.crt": legacy.cert.pem(), "ca.key": legacy.signing_key.serialize_pem()}
            }))?,
        )
        .await?;
    tls.namespace.clone_from(&legacy_ns);
    let upgraded = WebhookCertificates::start(client, tls, kek, Arc::new(SystemClock)).await?;
    assert_eq!(upgraded.ca_bundle_pem().await, legacy.cert.pem());
    let rewritten = legacy_secrets.get("portcullis-webhook-ca").await?;
    let keys: Vec<&String> = rewritten.data.iter().flatten().map(|(k, _)| k).collect();
    assert_eq!(keys, ["ca.crt", "ca.key.wrapped"]);
    for (key, value) in rewritten.data.iter().flatten() {
        assert!(
            !String::from_utf8_lossy(&value.0).contains("PRIVATE KEY"),
            "{key} holds a PEM private key after the upgrade"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_stored_injected_pod_counts_as_genuinely_injected() -> Result<()> {
    let Some((env, webhook)) = setup().await? else {
        return Ok(());
    };
    let ns = opted_in_namespace(env, "genuine", "enabled").await?;
    let client = env.client()?;
    // With the API token mounted (the ServiceAccount admission plugin adds it to every
    // container, ours too), which needs the token Secret first.
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let deadline = Instant::now() + Duration::from_secs(30);
    while accounts
        .get_opt("default")
        .await?
        .and_then(|a| a.secrets)
        .is_none_or(|s| s.is_empty())
    {
        ensure!(Instant::now() < deadline, "no token Secret in {ns}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let mut pod = app_pod("web", None);
    if let Some(spec) = pod.spec.as_mut() {
        spec.automount_service_account_token = None;
    }
    pods.create(&PostParams::default(), &pod).await?;
    // As the API server stores it, defaults and all: what the Tenant's report reads.
    let stored = pods.get("web").await?;
    let settings = InjectSettings::new(
        PROXY_IMAGE,
        &webhook.operator_namespace,
        "portcullis-operator",
    );
    portcullis_operator::webhook::inject::genuine::check(&stored, &settings)
        .map_err(|m| anyhow::anyhow!("the stored pod does not look injected: its {m}"))?;
    // A copy of it created again (e.g. by a controller) is left alone, not refused.
    let mut copy = stored.clone();
    copy.metadata = ObjectMeta {
        name: Some("web-copy".into()),
        annotations: stored.metadata.annotations.clone(),
        labels: stored.metadata.labels.clone(),
        ..ObjectMeta::default()
    };
    copy.status = None;
    if let Some(spec) = copy.spec.as_mut() {
        spec.node_name = None;
    }
    let created = pods.create(&PostParams::default(), &copy).await?;
    assert_eq!(container_names(&created), ["portcullis-proxy", "app"]);
    Ok(())
}
