//! What the real-cluster suites share: the tier, the client, the fixture (a tenant
//! namespace with an injected echo app and a plain client namespace), waiting, keys,
//! curl Jobs and the hammer pod. Each test binary uses its own part of it.
#![allow(dead_code, unused_imports)]

// A prelude for the suites: they glob-import this module.

pub use std::time::{Duration, Instant};

pub use anyhow::{Context as _, Result, bail, ensure};
pub use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
pub use k8s_openapi::api::apps::v1::Deployment;
pub use k8s_openapi::api::batch::v1::Job;
pub use k8s_openapi::api::coordination::v1::Lease;
pub use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service, ServiceAccount};
pub use kube::api::{Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
pub use kube::{Client, ResourceExt};
pub use portcullis_crds::{ApiKey, Tenant};
pub use serde_json::{Value, json};
pub use tokio::sync::OnceCell;

pub const APP_PORT: u16 = 8080;
/// The operator's Deployment and Lease.
pub const OPERATOR: &str = "portcullis-operator";
pub const TRUST_DOMAIN: &str = "cluster.local";
/// Impersonated identity for every write (see the module docs).
pub const E2E_USER: &str = "portcullis-e2e";
pub const E2E_GROUPS: [&str; 2] = ["system:masters", "system:authenticated"];

/// The cluster tier the suite runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// `../shared/node`: Kubernetes 1.20, images built here with buildah.
    Node,
    /// A kind cluster: Kubernetes 1.31, images built with docker (e2e/kind/run.sh).
    Kind,
}

impl Tier {
    pub fn from_env() -> Option<Self> {
        match std::env::var("PORTCULLIS_E2E").as_deref() {
            Ok("node") => Some(Self::Node),
            Ok("kind") => Some(Self::Kind),
            _ => None,
        }
    }

    /// The image that serves the echo app (`pod-app serve`) and runs the clients
    /// (`pod-app request`, curl): built from this checkout on every tier.
    pub fn app_image(self) -> String {
        tools_image()
    }

    pub fn client_image(self) -> String {
        tools_image()
    }

    /// Arguments that make the app image serve the echo app on `port`.
    pub fn app_args(self, port: u16) -> Vec<String> {
        vec!["serve".into(), "--port".into(), port.to_string()]
    }

    /// Native sidecars (init containers with `restartPolicy: Always`) need 1.29+.
    pub fn native_sidecars(self) -> bool {
        self == Self::Kind
    }
}

/// The test-tool image e2e/node/up.sh or e2e/kind/run.sh built (tag from
/// `PORTCULLIS_E2E_TAG`, as in DIR/tag).
pub fn tools_image() -> String {
    let tag = std::env::var("PORTCULLIS_E2E_TAG").unwrap_or_else(|_| "dev".into());
    format!("localhost/portcullis-e2e-tools:{tag}")
}

pub fn tier() -> Option<Tier> {
    let tier = Tier::from_env();
    if tier.is_none() {
        eprintln!(
            "skipping: the real-cluster scenarios run only with PORTCULLIS_E2E=node (as root: \
             e2e/node/up.sh starts a node and installs the chart) or PORTCULLIS_E2E=kind \
             (e2e/kind/run.sh, needs docker and kind)"
        );
    }
    tier
}

pub fn release_namespace() -> String {
    std::env::var("PORTCULLIS_RELEASE_NAMESPACE").unwrap_or_else(|_| "portcullis-system".into())
}

/// The KUBECONFIG cluster, impersonating [`E2E_USER`] in [`E2E_GROUPS`].
pub async fn client() -> Result<Client> {
    let mut config = kube::Config::infer()
        .await
        .context("no cluster: set KUBECONFIG (e2e/kind/run.sh does)")?;
    config.auth_info.impersonate = Some(E2E_USER.into());
    config.auth_info.impersonate_groups =
        Some(E2E_GROUPS.iter().map(|g| (*g).to_owned()).collect());
    Ok(Client::try_from(config)?)
}

pub use portcullis_e2e::wait::suffix;

pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    portcullis_e2e::wait::until(what, timeout, Duration::from_millis(500), check).await
}

// ---------------------------------------------------------------------------------
// The shared scenario: a tenant namespace with an injected echo app, a plain client
// namespace.
// ---------------------------------------------------------------------------------

pub struct Fixture {
    pub tier: Tier,
    /// Labelled portcullis.dev/inject=enabled, owned by Tenant `tenant`.
    pub app_ns: String,
    pub tenant: String,
    /// Not opted in: curl Jobs there are plain clients.
    pub client_ns: String,
}

impl Fixture {
    pub fn app_url(&self) -> String {
        format!("https://echo.{}.svc:{APP_PORT}", self.app_ns)
    }

    pub fn spiffe_id(&self, service_account: &str) -> String {
        format!(
            "spiffe://{TRUST_DOMAIN}/ns/{}/sa/{service_account}",
            self.app_ns
        )
    }
}

pub static FIXTURE: OnceCell<Result<Fixture, String>> = OnceCell::const_new();

pub async fn fixture() -> Result<Option<(Client, &'static Fixture)>> {
    let Some(tier) = tier() else {
        return Ok(None);
    };
    let fixture = FIXTURE
        .get_or_init(|| async { set_up(tier).await.map_err(|e| format!("{e:#}")) })
        .await;
    match fixture {
        Ok(fixture) => Ok(Some((client().await?, fixture))),
        Err(message) => bail!("setting up the {tier:?} scenario failed: {message}"),
    }
}

pub async fn operator_ready(client: &Client) -> Result<()> {
    let namespace = release_namespace();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    wait_for(
        "operator Deployment ready",
        Duration::from_secs(180),
        || async {
            let deployment = deployments.get("portcullis-operator").await?;
            let wanted = deployment
                .spec
                .as_ref()
                .and_then(|s| s.replicas)
                .unwrap_or(1);
            let ready = deployment
                .status
                .as_ref()
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0);
            Ok((ready >= wanted).then_some(()))
        },
    )
    .await?;
    wait_for(
        "webhook caBundles set",
        Duration::from_secs(120),
        || async {
            let mutating = Api::<MutatingWebhookConfiguration>::all(client.clone())
                .get("portcullis-injector")
                .await?;
            let validating = Api::<ValidatingWebhookConfiguration>::all(client.clone())
                .get("portcullis-validator")
                .await?;
            let set = mutating
                .webhooks
                .iter()
                .flatten()
                .all(|w| w.client_config.ca_bundle.is_some())
                && validating
                    .webhooks
                    .iter()
                    .flatten()
                    .all(|w| w.client_config.ca_bundle.is_some());
            Ok(set.then_some(()))
        },
    )
    .await
}

pub async fn create_namespace(client: &Client, prefix: &str, labels: Value) -> Result<String> {
    let namespace: Namespace = serde_json::from_value(json!({
        "metadata": {"generateName": format!("{prefix}-"), "labels": labels}
    }))?;
    let created = Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await?;
    Ok(created.name_any())
}

pub async fn set_up(tier: Tier) -> Result<Fixture> {
    let client = client().await?;
    operator_ready(&client).await?;
    let app_ns = tenant_with_echo(&client, tier, "pc-app").await?;
    let client_ns = create_namespace(&client, "pc-client", json!({})).await?;
    Ok(Fixture {
        tier,
        tenant: app_ns.clone(),
        app_ns,
        client_ns,
    })
}

/// A new injected namespace `<prefix>-…`, an Internal Tenant of the same name holding
/// it, and the app: an echo server `echo` behind a Service `echo`, whose inbound
/// requests need mTLS or a key. Returns the namespace (= the tenant's name).
pub async fn tenant_with_echo(client: &Client, tier: Tier, prefix: &str) -> Result<String> {
    let app_ns =
        create_namespace(client, prefix, json!({"portcullis.dev/inject": "enabled"})).await?;
    let tenant = app_ns.clone();
    let object: Tenant = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
        "metadata": {"name": tenant},
        "spec": {
            "namespaces": [app_ns],
            "dataClassification": "Internal",
            "scopes": {
                "identify": [{"methods": ["POST"], "path": "/v1/identify"}],
                "events": [{"methods": ["GET", "POST"], "path": "/v1/events/*"}]
            }
        }
    }))?;
    let tenants: Api<Tenant> = Api::all(client.clone());
    tenants.create(&PostParams::default(), &object).await?;
    wait_for("Tenant Ready", Duration::from_secs(60), || async {
        let tenant = tenants.get(&tenant).await?;
        let ready = tenant.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        Ok(ready.then_some(()))
    })
    .await?;

    let pod: Pod = serde_json::from_value(json!({
        "metadata": {
            "name": "echo",
            "labels": {"app": "echo"},
            "annotations": {
                "portcullis.dev/inbound-mode": "mtls-or-apikey",
                "portcullis.dev/app-port": APP_PORT.to_string()
            }
        },
        "spec": {"containers": [{
            "name": "app",
            "image": tier.app_image(),
            "imagePullPolicy": "IfNotPresent",
            "args": tier.app_args(APP_PORT),
            "ports": [{"name": "http", "containerPort": APP_PORT}]
        }]}
    }))?;
    Api::<Pod>::namespaced(client.clone(), &app_ns)
        .create(&PostParams::default(), &pod)
        .await
        .context("creating the echo pod (admitted through the injector)")?;
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "echo"},
        "spec": {"selector": {"app": "echo"}, "ports": [{"name": "http", "port": APP_PORT, "targetPort": APP_PORT}]}
    }))?;
    Api::<Service>::namespaced(client.clone(), &app_ns)
        .create(&PostParams::default(), &service)
        .await?;
    pod_ready(client, &app_ns, "echo").await?;
    Ok(app_ns)
}

pub async fn pod_ready(client: &Client, namespace: &str, name: &str) -> Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    wait_for(
        &format!("pod {namespace}/{name} Ready"),
        Duration::from_secs(180),
        || async {
            let pod = pods.get(name).await?;
            let ready = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            Ok(ready.then_some(pod))
        },
    )
    .await
}

/// A Developer key holding the `identify` scope, named `<prefix>-<random>`, in the app
/// namespace; returns its token.
pub async fn identify_key(client: &Client, fx: &Fixture, prefix: &str) -> Result<String> {
    create_key(
        client,
        &fx.app_ns,
        &format!("{prefix}-{}", suffix()),
        json!({"role": "Developer", "scopes": ["identify"]}),
    )
    .await
}

/// Creates an ApiKey and returns its token, read from the Secret `<name>-key` as
/// `kubectl get secret <name>-key -o jsonpath='{.data.token}' | base64 -d` would.
pub async fn create_key(
    client: &Client,
    namespace: &str,
    name: &str,
    spec: Value,
) -> Result<String> {
    portcullis_e2e::scenarios::api_key(client, namespace, name, spec).await
}

// ---------------------------------------------------------------------------------
// Clients: curl Jobs whose logs are the result.
// ---------------------------------------------------------------------------------

pub struct JobRun {
    pub succeeded: bool,
    pub logs: String,
}

impl JobRun {
    /// The value of a `name=value` line the script printed.
    pub fn value(&self, name: &str) -> Option<&str> {
        let prefix = format!("{name}=");
        self.logs
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
    }

    /// For a load script that prints `ready=<code>` for its first request and
    /// `failed=<n>` at its end: the Job succeeded, the key worked before the load, and
    /// no request failed `during` what the load ran across.
    pub fn ensure_all_served(&self, during: &str) -> Result<()> {
        ensure!(self.succeeded, "the client failed:\n{}", self.logs);
        ensure!(
            self.value("ready") == Some("200"),
            "the key never worked before the load started:\n{}",
            self.logs
        );
        ensure!(
            self.value("failed") == Some("0"),
            "requests failed during {during}:\n{}",
            self.logs
        );
        Ok(())
    }
}

/// Runs `script` (sh) in a curl Job in `namespace` and returns its logs.
pub async fn run_job(
    client: &Client,
    tier: Tier,
    namespace: &str,
    service_account: Option<&str>,
    env: &[(&str, &str)],
    script: &str,
) -> Result<JobRun> {
    let env: Vec<Value> = env
        .iter()
        .map(|(k, v)| json!({"name": k, "value": v}))
        .collect();
    let job: Job = serde_json::from_value(json!({
        "metadata": {"generateName": "curl-"},
        "spec": {
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": 600,
            "template": {"spec": {
                "restartPolicy": "Never",
                "serviceAccountName": service_account.unwrap_or("default"),
                "containers": [{
                    "name": "curl",
                    "image": tier.client_image(),
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["sh", "-c", script],
                    "env": env
                }]
            }}
        }
    }))?;
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    let job = jobs.create(&PostParams::default(), &job).await?;
    let name = job.name_any();
    // The client container's own exit decides: an injected Job on a cluster without
    // native sidecars completes only once its proxy has exited too, which is a scenario
    // of its own, not every client's concern.
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let (pod, succeeded) = wait_for(
        &format!("Job {namespace}/{name}: container curl finished"),
        Duration::from_secs(300),
        || async {
            let Some(pod) = pods
                .list(&ListParams::default().labels(&format!("job-name={name}")))
                .await?
                .items
                .into_iter()
                .next()
            else {
                return Ok(None);
            };
            let exit_code = pod
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|statuses| statuses.iter().find(|c| c.name == "curl"))
                .and_then(|c| c.state.as_ref())
                .and_then(|state| state.terminated.as_ref())
                .map(|terminated| terminated.exit_code);
            Ok(exit_code.map(|code| (pod.name_any(), code == 0)))
        },
    )
    .await?;
    let logs = pods
        .logs(
            &pod,
            &LogParams {
                container: Some("curl".into()),
                ..LogParams::default()
            },
        )
        .await?;
    Ok(JobRun { succeeded, logs })
}

/// Shell: retry `curl ... -w '%{http_code}'` until it answers `$want` (policy and
/// certificates propagate asynchronously), print `name=<code>`. When curl gets no answer
/// (code 000) its own error goes to stderr, so a failure says why (DNS, connect, TLS).
pub const UNTIL: &str = r#"
curl_code() { # curl-args...: the status code; curl's error, if any, on stderr
  out=$(curl -sk -w '%{http_code} %{errormsg}' --max-time 5 "$@")
  err=${out#????}
  [ -n "$err" ] && echo "curl: $err" >&2
  echo "${out%% *}"
}
until_code() { # name want curl-args...
  name=$1; want=$2; shift 2
  for i in $(seq 1 60); do
    code=$(curl_code -o /tmp/body "$@")
    [ "$code" = "$want" ] && break
    sleep 1
  done
  echo "$name=$code"
}
code_of() { curl_code -o /tmp/body "$@"; }
until_up() { # curl-args...: until the proxy answers at all
  for i in $(seq 1 60); do
    code=$(curl_code -o /dev/null "$@")
    [ "$code" != 000 ] && break
    sleep 1
  done
  echo "up=$code"
}
"#;

/// Requests a hammer sends at most (one every 100 ms or so: several minutes).
pub const HAMMER_REQUESTS: u32 = 3000;

/// A client pod that calls the app every 100 ms and prints each status code (followed by
/// curl's error when there was no answer), for at most [`HAMMER_REQUESTS`] requests.
pub async fn start_hammer(client: &Client, fx: &Fixture, token: &str) -> Result<String> {
    let script = format!(
        "i=0; while [ $i -lt {HAMMER_REQUESTS} ]; do i=$((i+1)); \
         echo \"$(curl -sk -o /dev/null -w '%{{http_code}} %{{errormsg}}' --max-time 2 -X POST \
         -H \"Authorization: Bearer $KEY\" {url}/v1/identify)\"; sleep 0.1; done",
        url = fx.app_url()
    );
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"generateName": "hammer-"},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1, "containers": [{
            "name": "curl", "image": fx.tier.client_image(), "imagePullPolicy": "IfNotPresent",
            "command": ["sh", "-c", script], "env": [{"name": "KEY", "value": token}]
        }]}
    }))?;
    let pod = Api::<Pod>::namespaced(client.clone(), &fx.client_ns)
        .create(&PostParams::default(), &pod)
        .await?;
    Ok(pod.name_any())
}

/// The hammer's log lines as (kubelet timestamp, status code or `000 <curl's error>`).
pub async fn hammer_lines(
    client: &Client,
    namespace: &str,
    pod: &str,
) -> Result<Vec<(jiff::Timestamp, String)>> {
    let logs = Api::<Pod>::namespaced(client.clone(), namespace)
        .logs(
            pod,
            &LogParams {
                timestamps: true,
                ..LogParams::default()
            },
        )
        .await?;
    Ok(logs
        .lines()
        .filter_map(|line| {
            let (time, code) = line.split_once(' ')?;
            Some((time.parse().ok()?, code.trim().to_owned()))
        })
        .collect())
}

/// Whether `pod` is Ready.
pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// `kubectl portcullis check`: whether it passed, and what it printed.
pub async fn portcullis_check() -> Result<(bool, String)> {
    let binary = portcullis_e2e::localcluster::target_dir()
        .context("cannot find the build directory")?
        .join("kubectl-portcullis");
    let output = tokio::process::Command::new(&binary)
        .args(["check", "-n", &release_namespace()])
        .output()
        .await
        .with_context(|| format!("running {}", binary.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((output.status.success(), text))
}

/// The operator Deployment's pods.
pub async fn operator_pods(client: &Client) -> Result<Vec<Pod>> {
    let deployment = Api::<Deployment>::namespaced(client.clone(), &release_namespace())
        .get(OPERATOR)
        .await?;
    let selector = deployment
        .spec
        .and_then(|s| s.selector.match_labels)
        .context("the operator Deployment has no matchLabels")?
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    Ok(Api::<Pod>::namespaced(client.clone(), &release_namespace())
        .list(&ListParams::default().labels(&selector))
        .await?
        .items)
}
