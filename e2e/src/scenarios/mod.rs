//! The scenario suite every cluster tier runs (DESIGN.md §7): written once against
//! [`Cluster`], which the local-cluster tier (pods as processes in network namespaces)
//! and the kubelet tiers (the node, kind) implement. A test binary wraps each scenario
//! in a `#[tokio::test]` of its own; scenarios that need a kubelet (probes, Jobs,
//! rotation under load) live in the kubelet tiers' binary only.
//!
//! Every scenario makes its own tenant namespace, with the injected echo app `server`
//! and a plain client pod holding the tenant's trust bundle, and sends its requests with
//! `pod-app request` from inside those pods.

mod suite;

use std::process::Output;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt as _};
use portcullis_crds::{ApiKey, Tenant};
use serde_json::{Value, json};

pub use suite::*;

/// The port the echo app listens on (the proxy takes it over in injected pods).
pub const APP_PORT: u16 = 8080;
/// The proxy's outbound port, for tiers that do not redirect outbound traffic.
pub const OUTBOUND_PORT: u16 = 4140;

/// What the scenarios need from a cluster tier.
#[allow(async_fn_in_trait)] // test binaries only, each on one runtime thread: no Send bound
pub trait Cluster {
    /// A running pod.
    type Pod;

    /// The API, as a cluster admin: a client made on the calling test's runtime (a kube
    /// client's worker task dies with the runtime that spawned it).
    fn client(&self) -> Result<Client>;

    /// The image whose entrypoint path holds `pod-app` (the echo app and the client).
    fn image(&self) -> String;

    /// Creates `pod` in `namespace` (through the webhooks) and waits until it runs.
    async fn start_pod(&self, namespace: &str, pod: Value) -> Result<Self::Pod>;

    /// The pod's IP address.
    fn ip(&self, pod: &Self::Pod) -> String;

    /// Runs `pod-app request <args>` inside `pod` (its `app` container) and returns
    /// the JSON it printed.
    async fn pod_app_request(&self, pod: &Self::Pod, args: &[String]) -> Result<Value>;

    /// The tenant's trust bundle (volume `trust`) as the client pod's `pod-app` reads it.
    fn trust_bundle(&self, pod: &Self::Pod) -> String;

    /// What `pod-app request` needs to send an app's plain HTTP call out through its
    /// own proxy: nothing where the init step redirects outbound traffic.
    fn outbound_args(&self) -> Vec<String>;

    /// What the pod's proxy container has printed.
    async fn proxy_output(&self, pod: &Self::Pod) -> Result<String>;

    /// What each operator replica has printed (admin audit records among it).
    async fn operator_outputs(&self) -> Result<Vec<String>>;

    /// `kubectl <args>` as `user` (a user without groups), or as the admin.
    async fn kubectl(&self, user: Option<&str>, args: &[&str]) -> Result<Output>;
}

pub use crate::wait::eventually;

/// A tenant owning one fresh namespace with the injected echo app `server` (service
/// account `server`) and a plain client pod (not injected, trust bundle mounted).
pub struct TenantPods<P> {
    pub ns: String,
    pub server: P,
    pub client: P,
}

/// The echo app, injected unless `annotations` opt out.
pub fn app_pod(
    image: &str,
    name: &str,
    service_account: &str,
    port: u16,
    annotations: &[(&str, &str)],
) -> Value {
    let mut all = serde_json::Map::new();
    all.insert("portcullis.dev/app-port".into(), json!(port.to_string()));
    all.insert(
        "portcullis.dev/inbound-mode".into(),
        json!("mtls-or-apikey"),
    );
    for (k, v) in annotations {
        all.insert((*k).into(), json!(v));
    }
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}, "annotations": all},
        "spec": {"serviceAccountName": service_account, "terminationGracePeriodSeconds": 1,
          "containers": [{
            "name": "app", "image": image, "imagePullPolicy": "IfNotPresent",
            "command": ["pod-app", "serve", "--port", port.to_string()],
            "ports": [{"containerPort": port}]}]}})
}

/// A pod playing an API client: never injected, with the tenant's trust bundle mounted.
pub fn client_pod(image: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "annotations": {"portcullis.dev/inject": "disabled"}},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
            "name": "app", "image": image, "imagePullPolicy": "IfNotPresent",
            "command": ["pod-app", "serve", "--port", "9000"],
            "volumeMounts": [{"name": "trust", "mountPath": "/etc/portcullis"}]}],
          "volumes": [{"name": "trust", "configMap": {"name": "portcullis-trust-bundle"}}]}})
}

/// A Tenant named after a fresh namespace (labelled for injection) that it owns, with
/// the scopes `identify` (POST /v1/identify) and `events` (GET, POST /v1/events/*).
pub async fn tenant_namespace(client: &Client, prefix: &str) -> Result<String> {
    let namespace: Namespace = serde_json::from_value(json!({
        "metadata": {"generateName": format!("pc-{prefix}-"),
                     "labels": {"portcullis.dev/inject": "enabled"}}
    }))?;
    let ns = Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await?
        .name_any();
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
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    eventually(
        "the tenant's trust bundle ConfigMap",
        Duration::from_secs(60),
        || async { Ok(config_maps.get_opt("portcullis-trust-bundle").await?) },
    )
    .await?;
    Ok(ns)
}

/// Creates ServiceAccount `name` (unless `default`) and waits for its token Secret: the
/// 1.20 ServiceAccount admission refuses pods until the controller-manager made it.
pub async fn service_account(client: &Client, ns: &str, name: &str) -> Result<()> {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    if name != "default" && accounts.get_opt(name).await?.is_none() {
        let account: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": name}}))?;
        accounts.create(&PostParams::default(), &account).await?;
    }
    eventually(
        &format!("a token Secret for ServiceAccount {ns}/{name}"),
        Duration::from_secs(60),
        || async {
            let secrets = accounts
                .get_opt(name)
                .await?
                .and_then(|a| a.secrets)
                .unwrap_or_default();
            Ok((!secrets.is_empty()).then_some(()))
        },
    )
    .await
}

/// [`tenant_namespace`] with the echo app `server` and the client pod running.
pub async fn tenant<C: Cluster>(cluster: &C, prefix: &str) -> Result<TenantPods<C::Pod>> {
    let client = cluster.client()?;
    let ns = tenant_namespace(&client, prefix).await?;
    for account in ["server", "caller", "default"] {
        service_account(&client, &ns, account).await?;
    }
    let image = cluster.image();
    let server = cluster
        .start_pod(&ns, app_pod(&image, "server", "server", APP_PORT, &[]))
        .await
        .context("the injected echo app")?;
    let client = cluster
        .start_pod(&ns, client_pod(&image, "client"))
        .await
        .context("the client pod")?;
    Ok(TenantPods { ns, server, client })
}

/// Creates an ApiKey and returns its token once the operator has issued it.
pub async fn api_key(client: &Client, ns: &str, name: &str, spec: Value) -> Result<String> {
    let key: ApiKey = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiKey",
        "metadata": {"name": name}, "spec": spec}))?;
    Api::<ApiKey>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &key)
        .await
        .with_context(|| format!("creating ApiKey {ns}/{name}"))?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = format!("{name}-key");
    eventually(
        &format!("the Secret {ns}/{secret}"),
        Duration::from_secs(60),
        || async {
            Ok(secrets
                .get_opt(&secret)
                .await?
                .and_then(|s| s.data)
                .and_then(|d| {
                    d.get("token")
                        .map(|t| String::from_utf8_lossy(&t.0).into_owned())
                }))
        },
    )
    .await
}

/// The arguments of an HTTPS request from the client pod to the server pod's app port
/// (which the init step hands to the proxy), trusting the tenant's bundle.
fn call_args<C: Cluster>(
    cluster: &C,
    pods: &TenantPods<C::Pod>,
    method: &str,
    path: &str,
    key: Option<&str>,
) -> Vec<String> {
    let mut args = vec![
        format!("https://{}:{APP_PORT}{path}", cluster.ip(&pods.server)),
        "-X".into(),
        method.into(),
        "--cacert".into(),
        cluster.trust_bundle(&pods.client),
        // The workload certificate names Services and the SPIFFE ID, not pod IPs.
        "--skip-hostname-check".into(),
    ];
    if let Some(key) = key {
        args.extend(["-H".into(), format!("Authorization: Bearer {key}")]);
    }
    args
}

/// One such request; the answer `pod-app request` printed.
pub async fn call<C: Cluster>(
    cluster: &C,
    pods: &TenantPods<C::Pod>,
    method: &str,
    path: &str,
    key: Option<&str>,
) -> Result<Value> {
    let args = call_args(cluster, pods, method, path, key);
    cluster.pod_app_request(&pods.client, &args).await
}

/// Waits until `token` gets a 200 for `POST /v1/identify` (the operator has issued it
/// and the proxy holds a policy with it) and returns that answer.
pub async fn until_served<C: Cluster>(
    cluster: &C,
    pods: &TenantPods<C::Pod>,
    token: &str,
) -> Result<Value> {
    eventually("the key to be served", Duration::from_secs(60), || async {
        let answer = call(cluster, pods, "POST", "/v1/identify", Some(token)).await?;
        Ok((answer["status"] == 200).then_some(answer))
    })
    .await
}

/// The request the echo app saw, from its answer.
pub fn echoed(answer: &Value) -> Result<Value> {
    let body = answer["body"].as_str().unwrap_or_default();
    serde_json::from_str(body).with_context(|| format!("the app's answer is not JSON: {answer}"))
}

/// The pod as stored (mutated by the webhooks).
pub async fn stored_pod(client: &Client, ns: &str, name: &str) -> Result<Pod> {
    Ok(Api::<Pod>::namespaced(client.clone(), ns).get(name).await?)
}

/// Fails with `what` and the command's stderr unless it succeeded.
pub fn succeeded(output: &Output, what: &str) -> Result<()> {
    if !output.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(())
}
