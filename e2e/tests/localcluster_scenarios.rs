//! Local-cluster scenarios (DESIGN.md §7, tier 3; the same list as the kind tier): the
//! real operator binary against a real API server, pods admitted and mutated by its
//! webhooks and run as processes in network namespaces, requests crossing the real
//! proxy. Each test makes its own tenant namespace; the operator and the pod network
//! are shared by the tests of this binary.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use portcullis_crds::{ApiKey, Tenant};
use portcullis_e2e::{
    envtest::{self, EnvTest},
    localcluster::{LocalCluster, OperatorProcess, RunningPod, target_dir},
};
use serde_json::{Value, json};
use tokio::sync::OnceCell;

struct Fixture {
    env: &'static EnvTest,
    cluster: LocalCluster,
    operator: OperatorProcess,
}

static FIXTURE: OnceCell<Result<Option<Fixture>, String>> = OnceCell::const_new();

/// The shared operator and pod network, or `None` where this machine cannot run them
/// (the reason is printed).
async fn fixture() -> anyhow::Result<Option<&'static Fixture>> {
    let slot = FIXTURE
        .get_or_init(|| async { start_fixture().await.map_err(|e| format!("{e:#}")) })
        .await;
    match slot {
        Ok(f) => Ok(f.as_ref()),
        Err(e) => anyhow::bail!("local cluster failed to start: {e}"),
    }
}

async fn start_fixture() -> anyhow::Result<Option<Fixture>> {
    let Some(env) = envtest::shared().await? else {
        return Ok(None);
    };
    let target = target_dir().ok_or_else(|| anyhow::anyhow!("cannot find the target directory"))?;
    let (proxy, operator) = (
        target.join("portcullis-proxy"),
        target.join("portcullis-operator"),
    );
    for binary in [&proxy, &operator] {
        if !binary.exists() {
            eprintln!(
                "skipping: {} is not built; run cargo test --workspace",
                binary.display()
            );
            return Ok(None);
        }
    }
    let binaries = [
        ("pod-app", PathBuf::from(env!("CARGO_BIN_EXE_pod-app"))),
        ("portcullis-proxy", proxy),
    ];
    let Some(cluster) = LocalCluster::start(env, &binaries)? else {
        return Ok(None);
    };
    env.install_crds().await?;
    let system = env.create_namespace("portcullis-system").await?;
    let operator = OperatorProcess::start(
        env,
        &operator,
        &system,
        cluster.gateway(),
        &cluster.dir().join("operator"),
    )
    .await?;
    Ok(Some(Fixture {
        env,
        cluster,
        operator,
    }))
}

/// Polls `check` every 100 ms until it returns `Some`, failing after `limit`.
async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            anyhow::bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A tenant owning one fresh namespace, with a server pod (injected) and a client pod
/// (not injected, holding the trust bundle) running.
struct TenantPods {
    ns: String,
    server: RunningPod,
    client: RunningPod,
}

impl Fixture {
    fn client(&self) -> anyhow::Result<kube::Client> {
        Ok(self.env.client()?)
    }

    /// [`Fixture::tenant_pods`], with the operator's log tail on failure.
    async fn tenant(&self, prefix: &str) -> anyhow::Result<TenantPods> {
        self.tenant_pods(prefix)
            .await
            .map_err(|e| anyhow::anyhow!("{e:#}\n--- operator log ---\n{}", self.operator.logs(40)))
    }

    async fn tenant_pods(&self, prefix: &str) -> anyhow::Result<TenantPods> {
        let client = self.client()?;
        let ns = self.env.create_namespace(prefix).await?;
        let tenant: Tenant = serde_json::from_value(json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
            "metadata": {"name": ns},
            "spec": {"namespaces": [ns], "scopes": {
                "identify": [{"methods": ["POST"], "path": "/v1/identify"}],
                "events": [{"methods": ["GET", "POST"], "path": "/v1/events/*"}]}},
        }))?;
        Api::<Tenant>::all(client.clone())
            .create(&PostParams::default(), &tenant)
            .await?;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        eventually(
            "the operator to label the namespace",
            Duration::from_secs(30),
            || async {
                let labels = namespaces
                    .get(&ns)
                    .await?
                    .metadata
                    .labels
                    .unwrap_or_default();
                Ok(labels.get("portcullis.dev/tenant").cloned())
            },
        )
        .await?;
        let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
        eventually(
            "the trust bundle ConfigMap",
            Duration::from_secs(30),
            || async { Ok(config_maps.get_opt("portcullis-trust-bundle").await?) },
        )
        .await?;
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
        for sa in ["server", "caller", "default"] {
            if sa != "default" {
                let account = ServiceAccount {
                    metadata: ObjectMeta {
                        name: Some(sa.into()),
                        ..ObjectMeta::default()
                    },
                    ..ServiceAccount::default()
                };
                accounts.create(&PostParams::default(), &account).await?;
            }
            // The 1.20 ServiceAccount admission plugin refuses pods until the
            // controller-manager has given the account its token Secret.
            eventually(
                &format!("a token Secret for ServiceAccount {sa}"),
                Duration::from_secs(30),
                || async {
                    let secrets = accounts
                        .get_opt(sa)
                        .await?
                        .and_then(|a| a.secrets)
                        .unwrap_or_default();
                    Ok((!secrets.is_empty()).then_some(()))
                },
            )
            .await?;
        }
        self.create_pod(&ns, app_pod("server", "server", 8080, &[]))
            .await?;
        self.create_pod(&ns, client_pod("client")).await?;
        let server = self.cluster.run_pod(&ns, "server").await?;
        let client = self.cluster.run_pod(&ns, "client").await?;
        Ok(TenantPods { ns, server, client })
    }

    async fn create_pod(&self, ns: &str, pod: Value) -> anyhow::Result<Pod> {
        let pod: Pod = serde_json::from_value(pod)?;
        Ok(Api::<Pod>::namespaced(self.client()?, ns)
            .create(&PostParams::default(), &pod)
            .await?)
    }

    /// Creates an ApiKey and returns its token once the operator has issued it.
    async fn api_key(&self, ns: &str, name: &str, spec: Value) -> anyhow::Result<String> {
        let client = self.client()?;
        let key: ApiKey = serde_json::from_value(json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiKey",
            "metadata": {"name": name}, "spec": spec}))?;
        Api::<ApiKey>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &key)
            .await?;
        let secrets: Api<Secret> = Api::namespaced(client, ns);
        let secret = format!("{name}-key");
        eventually(
            &format!("the Secret {secret}"),
            Duration::from_secs(30),
            || async {
                let token = secrets
                    .get_opt(&secret)
                    .await?
                    .and_then(|s| s.data)
                    .and_then(|d| {
                        d.get("token")
                            .map(|t| String::from_utf8_lossy(&t.0).into_owned())
                    });
                Ok(token)
            },
        )
        .await
    }

    fn kubectl(
        &self,
        kubeconfig: &std::path::Path,
        args: &[&str],
    ) -> anyhow::Result<std::process::Output> {
        Ok(std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .output()?)
    }
}

fn app_pod(name: &str, service_account: &str, port: u16, annotations: &[(&str, &str)]) -> Value {
    let mut all = serde_json::Map::new();
    all.insert("portcullis.dev/app-port".into(), json!(port.to_string()));
    for (k, v) in annotations {
        all.insert((*k).into(), json!(v));
    }
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "annotations": all},
        "spec": {"serviceAccountName": service_account, "containers": [{
            "name": "app", "image": "portcullis-e2e/app:test",
            "command": ["pod-app", "serve", "--port", port.to_string()],
            "ports": [{"containerPort": port}]}]}})
}

/// A pod playing an API client: never injected, with the tenant's trust bundle mounted.
fn client_pod(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "annotations": {"portcullis.dev/inject": "disabled"}},
        "spec": {"containers": [{
            "name": "app", "image": "portcullis-e2e/app:test",
            "command": ["pod-app", "serve", "--port", "9000"],
            "volumeMounts": [{"name": "trust", "mountPath": "/etc/portcullis"}]}],
          "volumes": [{"name": "trust", "configMap": {"name": "portcullis-trust-bundle"}}]}})
}

/// One request from inside `from`; the JSON `pod-app request` printed.
async fn request(from: &RunningPod, url: &str, extra: &[&str]) -> anyhow::Result<Value> {
    let mut args = vec!["request", url];
    args.extend_from_slice(extra);
    let out = from.exec(0, "pod-app", &args).await?;
    serde_json::from_slice(&out.stdout).map_err(|e| {
        anyhow::anyhow!(
            "pod-app printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// An HTTPS request from the client pod to the server pod's app port (which the init
/// step redirects to the proxy), trusting the tenant's bundle.
async fn call(
    pods: &TenantPods,
    method: &str,
    path: &str,
    key: Option<&str>,
) -> anyhow::Result<Value> {
    let url = format!("https://{}:8080{path}", pods.server.ip());
    let cacert = pods.client.volume_dir("trust").join("ca-bundle.crt");
    let cacert = cacert.to_string_lossy().into_owned();
    let auth = key.map(|k| format!("Authorization: Bearer {k}"));
    let mut args = vec!["-X", method, "--cacert", &cacert, "--skip-hostname-check"];
    if let Some(auth) = &auth {
        args.extend(["-H", auth]);
    }
    request(&pods.client, &url, &args).await
}

/// Waits until `token` gets a 200 for `POST /v1/identify` (the operator has issued it
/// and the proxy holds a policy with it) and returns that answer.
async fn until_served(pods: &TenantPods, token: &str) -> anyhow::Result<Value> {
    eventually("the key to be served", Duration::from_secs(10), || async {
        let answer = call(pods, "POST", "/v1/identify", Some(token)).await?;
        Ok((answer["status"] == 200).then_some(answer))
    })
    .await
}

/// Whether the tenant's `portcullis-inbound` NetworkPolicy in `ns` selects `pod`.
async fn selected_by_inbound_policy(
    client: kube::Client,
    ns: &str,
    pod: &str,
) -> anyhow::Result<bool> {
    use kube::core::{Selector, SelectorExt as _};
    let policy = eventually(
        "the tenant's NetworkPolicy",
        Duration::from_secs(20),
        || async {
            Ok(Api::<NetworkPolicy>::namespaced(client.clone(), ns)
                .get_opt("portcullis-inbound")
                .await?)
        },
    )
    .await?;
    let selector: Selector = policy
        .spec
        .unwrap_or_default()
        .pod_selector
        .unwrap_or_default()
        .try_into()?;
    let labels = Api::<Pod>::namespaced(client, ns)
        .get(pod)
        .await?
        .metadata
        .labels
        .unwrap_or_default();
    Ok(selector.matches(&labels))
}

fn echoed(answer: &Value) -> anyhow::Result<Value> {
    Ok(serde_json::from_str(
        answer["body"].as_str().unwrap_or_default(),
    )?)
}

#[tokio::test]
async fn injected_pod_gets_a_certificate_and_is_reached_only_through_the_proxy()
-> anyhow::Result<()> {
    let Some(fx) = fixture().await? else {
        return Ok(());
    };
    let pods = fx.tenant("inject").await?;

    // The webhook mutated the pod: init step first, proxy before the app (1.20 has no
    // native sidecars), projected identity token.
    let stored = Api::<Pod>::namespaced(fx.client()?, &pods.ns)
        .get("server")
        .await?;
    let spec = stored.spec.unwrap_or_default();
    let init: Vec<_> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(init, ["portcullis-init"], "{init:?}");
    assert_eq!(spec.containers[0].name, "portcullis-proxy");
    assert_eq!(spec.containers[1].name, "app");

    // The proxy holds a certificate from the identity service (real projected token).
    let identity = request(&pods.server, "http://127.0.0.1:4191/identity", &[]).await?;
    assert_eq!(identity["status"], 200, "{identity}");
    assert!(
        identity["body"]
            .as_str()
            .unwrap_or_default()
            .contains("BEGIN CERTIFICATE")
    );

    // A valid key crosses the proxy; the app sees the masked principal, never the key.
    let token = fx
        .api_key(
            &pods.ns,
            "ingest",
            json!({"role": "Developer", "scopes": ["identify"]}),
        )
        .await?;
    let answer = until_served(&pods, &token).await?;
    let seen = echoed(&answer)?;
    let principal = seen["headers"]["x-portcullis-principal"]
        .as_str()
        .unwrap_or_default();
    assert!(principal.starts_with("key:ak_***"), "{seen}");
    assert!(
        seen["headers"].get("authorization").is_none(),
        "the key reached the app: {seen}"
    );

    // A scope the key lacks: 403 naming the reason.
    let denied = call(&pods, "GET", "/v1/events/1", Some(&token)).await?;
    assert_eq!(denied["status"], 403, "{denied}");
    assert!(
        denied["body"]
            .as_str()
            .unwrap_or_default()
            .contains("reason"),
        "{denied}"
    );

    // Plain HTTP to the app port lands on the TLS proxy, not the app...
    let direct = request(
        &pods.client,
        &format!("http://{}:8080/v1/identify", pods.server.ip()),
        &["-X", "POST"],
    )
    .await?;
    assert_ne!(
        direct["status"], 200,
        "the app answered a direct plain connection: {direct}"
    );
    // ...although the app listens there (seen from inside its own pod).
    let inside = request(
        &pods.server,
        "http://127.0.0.1:8080/v1/identify",
        &["-X", "POST"],
    )
    .await?;
    assert_eq!(inside["status"], 200, "{inside}");
    // The namespace's NetworkPolicy (TCP only: every TCP port lands on the proxy)
    // selects the injected pod by the label the webhook set.
    assert!(selected_by_inbound_policy(fx.client()?, &pods.ns, "server").await?);
    Ok(())
}

#[tokio::test]
async fn rate_limit_and_ip_allowlist_are_enforced_per_key() -> anyhow::Result<()> {
    let Some(fx) = fixture().await? else {
        return Ok(());
    };
    let pods = fx.tenant("limits").await?;
    let client_ip = pods.client.ip().to_string();
    let limited = fx
        .api_key(
            &pods.ns,
            "limited",
            json!({"role": "Developer", "scopes": ["identify"],
            "rateLimit": {"requests": 2, "per": "1m", "burst": 1}}),
        )
        .await?;
    let here = fx
        .api_key(
            &pods.ns,
            "here",
            json!({"role": "Developer", "scopes": ["identify"],
            "ipAllowlist": [format!("{client_ip}/32")]}),
        )
        .await?;
    let elsewhere = fx
        .api_key(
            &pods.ns,
            "elsewhere",
            json!({"role": "Developer", "scopes": ["identify"],
            "ipAllowlist": ["10.255.255.0/24", "2001:db8::/32"]}),
        )
        .await?;

    until_served(&pods, &here).await?;
    let outside = call(&pods, "POST", "/v1/identify", Some(&elsewhere)).await?;
    assert_eq!(outside["status"], 403, "{outside}");

    let mut statuses = Vec::new();
    let mut limited_answer = None;
    for _ in 0..6 {
        let a = call(&pods, "POST", "/v1/identify", Some(&limited)).await?;
        statuses.push(a["status"].as_u64().unwrap_or_default());
        if a["status"] == 429 {
            limited_answer = Some(a);
            break;
        }
    }
    let limited_answer =
        limited_answer.ok_or_else(|| anyhow::anyhow!("never rate limited: {statuses:?}"))?;
    assert!(
        limited_answer["headers"].get("retry-after").is_some(),
        "{limited_answer}"
    );
    assert!(statuses.contains(&200), "{statuses:?}");
    Ok(())
}

#[tokio::test]
async fn revoked_key_is_refused_within_a_second_of_kubectl_patch() -> anyhow::Result<()> {
    let Some(fx) = fixture().await? else {
        return Ok(());
    };
    let pods = fx.tenant("revoke").await?;
    let token = fx
        .api_key(
            &pods.ns,
            "doomed",
            json!({"role": "Developer", "scopes": ["identify"]}),
        )
        .await?;
    until_served(&pods, &token).await?;
    let patch = fx.kubectl(
        fx.env.kubeconfig_path(),
        &[
            "-n",
            &pods.ns,
            "patch",
            "ak",
            "doomed",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"revoked":true}}"#,
        ],
    )?;
    assert!(
        patch.status.success(),
        "{}",
        String::from_utf8_lossy(&patch.stderr)
    );
    let patched = Instant::now();
    let refused = eventually(
        "the revoked key to be refused",
        Duration::from_secs(5),
        || async {
            let a = call(&pods, "POST", "/v1/identify", Some(&token)).await?;
            Ok((a["status"] == 401 || a["status"] == 403).then_some(a))
        },
    )
    .await?;
    let latency = patched.elapsed();
    eprintln!("revocation reached the proxy in {latency:?}");
    assert!(
        refused["body"]
            .as_str()
            .unwrap_or_default()
            .contains("revoked"),
        "{refused}"
    );
    assert!(
        latency < Duration::from_secs(1),
        "revocation took {latency:?}"
    );
    Ok(())
}

#[tokio::test]
async fn mtls_between_injected_pods_carries_the_spiffe_principal() -> anyhow::Result<()> {
    let Some(fx) = fixture().await? else {
        return Ok(());
    };
    let pods = fx.tenant("mtls").await?;
    fx.create_pod(&pods.ns, app_pod("caller", "caller", 8080, &[]))
        .await?;
    let caller = fx.cluster.run_pod(&pods.ns, "caller").await?;
    // The caller's app speaks plain HTTP to its own proxy's outbound port, which opens
    // mTLS to the server's proxy with the caller's workload certificate.
    let url = format!("http://{}:8080/v1/events/7", pods.server.ip());
    let answer = request(&caller, &url, &["--via", "127.0.0.1:4140"]).await?;
    assert_eq!(answer["status"], 200, "{answer}");
    let seen = echoed(&answer)?;
    let expected = format!("spiffe://cluster.local/ns/{}/sa/caller", pods.ns);
    assert_eq!(
        seen["headers"]["x-portcullis-principal"],
        expected.as_str(),
        "{seen}"
    );
    Ok(())
}

#[tokio::test]
async fn audit_records_every_request_and_the_chain_verifies() -> anyhow::Result<()> {
    let Some(fx) = fixture().await? else {
        return Ok(());
    };
    let pods = fx.tenant("audit").await?;
    let token = fx
        .api_key(
            &pods.ns,
            "audited",
            json!({"role": "Developer", "scopes": ["identify"]}),
        )
        .await?;
    until_served(&pods, &token).await?;
    let denied = call(&pods, "GET", "/v1/events/1", Some(&token)).await?;
    assert_eq!(denied["status"], 403);

    let records = eventually(
        "audit records in the proxy's output",
        Duration::from_secs(10),
        || async {
            let log = pods.server.logs("portcullis-proxy", 5000);
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| l.starts_with('{') && l.contains("\"prev_hash\""))
                .collect();
            let has_denial = lines.iter().any(|l| l.contains("\"deny\""));
            Ok((has_denial && lines.len() >= 2).then(|| lines.join("\n")))
        },
    )
    .await?;
    let report =
        portcullis_audit::verify::verify_jsonl(&records, "proxy stdout", Default::default())
            .map_err(|problem| anyhow::anyhow!("audit chain does not verify: {problem}"))?;
    assert!(report.records >= 2, "{report:?}");
    assert!(records.contains("key:ak_***"), "{records}");
    let log = pods.server.logs("portcullis-proxy", 5000);
    assert!(!log.contains(&token), "the proxy logged a token");
    Ok(())
}

#[tokio::test]
async fn opt_out_annotation_is_respected() -> anyhow::Result<()> {
    let Some(fx) = fixture().await? else {
        return Ok(());
    };
    let pods = fx.tenant("optout").await?;
    let created = fx
        .create_pod(
            &pods.ns,
            app_pod(
                "plain",
                "server",
                8081,
                &[("portcullis.dev/inject", "disabled")],
            ),
        )
        .await?;
    let spec = created.spec.unwrap_or_default();
    assert!(spec.init_containers.is_none(), "{:?}", spec.init_containers);
    assert_eq!(spec.containers.len(), 1);
    let plain = fx.cluster.run_pod(&pods.ns, "plain").await?;
    let answer = eventually("the plain app", Duration::from_secs(10), || async {
        let a = request(
            &pods.client,
            &format!("http://{}:8081/anything", plain.ip()),
            &[],
        )
        .await?;
        Ok((a["status"] == 200).then_some(a))
    })
    .await?;
    assert!(
        echoed(&answer)?["headers"]
            .get("x-portcullis-principal")
            .is_none()
    );
    // The tenant's NetworkPolicy leaves the opted-out pod alone.
    assert!(!selected_by_inbound_policy(fx.client()?, &pods.ns, "plain").await?);
    Ok(())
}

#[tokio::test]
async fn webhook_refuses_an_over_scoped_key_with_the_kubectl_message() -> anyhow::Result<()> {
    let Some(fx) = fixture().await? else {
        return Ok(());
    };
    let client = fx.client()?;
    let ns = fx.env.create_namespace("webhook").await?;
    let tenant: Tenant = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant", "metadata": {"name": ns},
        "spec": {"namespaces": [ns], "scopes": {
            "identify": [{"methods": ["POST"], "path": "/v1/identify"}],
            "events": [{"methods": ["GET"], "path": "/v1/events/*"}]}}}))?;
    Api::<Tenant>::all(client.clone())
        .create(&PostParams::default(), &tenant)
        .await?;
    let role = json!({"apiVersion": "portcullis.dev/v1alpha1", "kind": "Role",
        "metadata": {"name": "reader", "namespace": ns},
        "spec": {"scopes": ["identify"], "permissions": ["keys:create", "keys:read"],
                 "subjects": [{"kind": "User", "name": "alice"}]}});
    let role_file = fx.cluster.dir().join(format!("{ns}-role.json"));
    std::fs::write(&role_file, role.to_string())?;
    let applied = fx.kubectl(
        fx.env.kubeconfig_path(),
        &["apply", "-f", &role_file.to_string_lossy()],
    )?;
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );

    // alice gets kubectl access from the Role (the operator's RBAC), then asks for more
    // scopes than it grants.
    let alice = fx.env.kubeconfig_for_user("alice", &[])?;
    eventually("alice's RBAC", Duration::from_secs(30), || async {
        let out = fx.kubectl(
            &alice,
            &[
                "auth",
                "can-i",
                "create",
                "apikeys.portcullis.dev",
                "-n",
                &ns,
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .trim()
            .eq("yes")
            .then_some(()))
    })
    .await?;
    let key = json!({"apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiKey",
        "metadata": {"name": "greedy", "namespace": ns},
        "spec": {"role": "reader", "scopes": ["identify", "events"]}});
    let key_file = fx.cluster.dir().join(format!("{ns}-key.json"));
    std::fs::write(&key_file, key.to_string())?;
    let refused = fx.kubectl(&alice, &["create", "-f", &key_file.to_string_lossy()])?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "an over-scoped key was admitted");
    assert!(stderr.contains("denied the request"), "{stderr}");
    assert!(stderr.contains("\"events\""), "{stderr}");
    assert!(stderr.contains("reader"), "{stderr}");
    eprintln!("kubectl said: {stderr}");

    // Within the role's scopes alice succeeds.
    let fine = json!({"apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiKey",
        "metadata": {"name": "modest", "namespace": ns},
        "spec": {"role": "reader", "scopes": ["identify"]}});
    std::fs::write(&key_file, fine.to_string())?;
    let admitted = fx.kubectl(&alice, &["create", "-f", &key_file.to_string_lossy()])?;
    assert!(
        admitted.status.success(),
        "{}",
        String::from_utf8_lossy(&admitted.stderr)
    );

    // The admitted change is an admin audit record in the operator's hash chain.
    let object = format!("{ns}/modest");
    let chain = eventually(
        "the admin audit record",
        Duration::from_secs(10),
        || async {
            // The whole log: the chain starts at its first line, not in the tail.
            let log = std::fs::read_to_string(fx.operator.log_path())?;
            let records: Vec<&str> = log
                .lines()
                .filter(|l| l.starts_with('{') && l.contains("\"prev_hash\""))
                .collect();
            let found = records.iter().any(|l| {
                l.contains("\"action\":\"admin.key.create\"")
                    && l.contains("\"principal\":\"user:alice\"")
                    && l.contains(&object)
            });
            Ok(found.then(|| records.join("\n")))
        },
    )
    .await?;
    portcullis_audit::verify::verify_jsonl(&chain, "operator stdout", Default::default())
        .map_err(|problem| anyhow::anyhow!("admin audit chain does not verify: {problem}"))?;
    Ok(())
}
