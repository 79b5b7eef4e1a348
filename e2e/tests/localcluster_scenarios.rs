//! The scenario suite (`portcullis_e2e::scenarios`, the same one the node and kind tiers
//! run) on the local-cluster tier (DESIGN.md §7, tier 3): the real operator binary
//! against a real API server, pods admitted and mutated by its webhooks and run as
//! processes in network namespaces, requests crossing the real proxy. The operator and
//! the pod network are shared by the tests of this binary.

use std::{path::PathBuf, process::Output};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::PostParams};
use portcullis_e2e::{
    envtest::{self, EnvTest},
    localcluster::{LocalCluster, OperatorProcess, RunningPod, target_dir},
    scenarios::{self, Cluster},
};
use serde_json::Value;
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

/// The local tier as the scenarios see it.
impl Cluster for Fixture {
    type Pod = RunningPod;

    fn client(&self) -> anyhow::Result<kube::Client> {
        Ok(self.env.client()?)
    }

    fn image(&self) -> String {
        "portcullis-e2e/app:test".into()
    }

    async fn start_pod(&self, namespace: &str, pod: Value) -> anyhow::Result<RunningPod> {
        let pod: Pod = serde_json::from_value(pod)?;
        let name = pod.metadata.name.clone().context("the pod has no name")?;
        Api::<Pod>::namespaced(self.client()?, namespace)
            .create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("creating pod {namespace}/{name}"))?;
        self.cluster
            .run_pod(namespace, &name)
            .await
            .map_err(|e| anyhow::anyhow!("{e}\n--- operator log ---\n{}", self.operator.logs(40)))
    }

    fn ip(&self, pod: &RunningPod) -> String {
        pod.ip().to_string()
    }

    async fn pod_app_request(&self, pod: &RunningPod, args: &[String]) -> anyhow::Result<Value> {
        let mut all = vec!["request"];
        all.extend(args.iter().map(String::as_str));
        let out = pod.exec(0, "pod-app", &all).await?;
        serde_json::from_slice(&out.stdout).map_err(|e| {
            anyhow::anyhow!(
                "pod-app printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    fn trust_bundle(&self, pod: &RunningPod) -> String {
        pod.volume_dir("trust")
            .join("ca-bundle.crt")
            .to_string_lossy()
            .into_owned()
    }

    fn outbound_args(&self) -> Vec<String> {
        // Outbound traffic is not redirected here: the app names its proxy.
        vec![
            "--via".into(),
            format!("127.0.0.1:{}", scenarios::OUTBOUND_PORT),
        ]
    }

    async fn proxy_output(&self, pod: &RunningPod) -> anyhow::Result<String> {
        Ok(pod.logs("portcullis-proxy", 100_000))
    }

    async fn operator_outputs(&self) -> anyhow::Result<Vec<String>> {
        Ok(vec![std::fs::read_to_string(self.operator.log_path())?])
    }

    async fn kubectl(&self, user: Option<&str>, args: &[&str]) -> anyhow::Result<Output> {
        let kubeconfig = match user {
            Some(user) => self.env.kubeconfig_for_user(user, &[])?,
            None => self.env.kubeconfig_path().to_path_buf(),
        };
        tokio::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .output()
            .await
            .context("running kubectl")
    }
}

/// One `#[tokio::test]` per scenario of the suite, run against the shared fixture.
macro_rules! local_scenarios {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $name() -> anyhow::Result<()> {
            let Some(fx) = fixture().await? else {
                return Ok(());
            };
            scenarios::$name(fx).await
        }
    )*};
}

local_scenarios!(
    injected_pod_gets_a_certificate_and_is_reached_only_through_the_proxy,
    rate_limit_and_ip_allowlist_are_enforced_per_key,
    revoked_key_is_refused_within_a_second_of_kubectl_patch,
    mtls_between_injected_pods_carries_the_spiffe_principal,
    audit_records_every_request_and_the_chain_verifies,
    opt_out_annotation_is_respected,
    webhook_refuses_an_over_scoped_key_with_the_kubectl_message,
);
