//! Local-cluster tier (DESIGN.md §7, tier 3): pods admitted by the real API server run
//! as processes in their own network namespaces.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::PostParams};
use portcullis_e2e::{
    envtest::{self, EnvTest},
    localcluster::{LocalCluster, RunningPod, target_dir},
};
use serde_json::json;

/// The shared envtest and a pod runner on it, or `None` (reason printed) where this
/// machine lacks the assets, root or network tools.
async fn cluster() -> anyhow::Result<Option<(&'static EnvTest, LocalCluster)>> {
    let Some(env) = envtest::shared().await? else {
        return Ok(None);
    };
    let target = target_dir().ok_or_else(|| anyhow::anyhow!("cannot find the target directory"))?;
    let binaries = [
        (
            "pod-app",
            std::path::PathBuf::from(env!("CARGO_BIN_EXE_pod-app")),
        ),
        ("portcullis-proxy", target.join("portcullis-proxy")),
    ];
    Ok(LocalCluster::start(env, &binaries)?.map(|c| (env, c)))
}

fn app_pod(name: &str, port: u16) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{
            "name": "app", "image": "portcullis-e2e/app:test",
            "command": ["pod-app", "serve", "--port", port.to_string()],
            "ports": [{"containerPort": port}],
        }]},
    }))?)
}

/// Sends one request from inside `from` and returns the JSON `pod-app request` printed.
async fn request(from: &RunningPod, url: &str, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let mut all = vec!["request", url];
    all.extend_from_slice(args);
    let out = from.exec(0, "pod-app", &all).await?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

async fn wait_for_listener(from: &RunningPod, url: &str) -> anyhow::Result<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let answer = request(from, url, &[]).await?;
        if answer.get("status").is_some() || tokio::time::Instant::now() > deadline {
            return Ok(answer);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn pods_run_as_processes_in_their_own_network_namespaces() -> anyhow::Result<()> {
    let Some((env, cluster)) = cluster().await? else {
        return Ok(());
    };
    let ns = env.create_namespace("plain").await?;
    let pods: Api<Pod> = Api::namespaced(env.client()?, &ns);
    pods.create(&PostParams::default(), &app_pod("server", 8080)?)
        .await?;
    pods.create(&PostParams::default(), &app_pod("client", 8081)?)
        .await?;
    let server = cluster.run_pod(&ns, "server").await?;
    let client = cluster.run_pod(&ns, "client").await?;
    assert_ne!(server.ip(), client.ip());

    let answer = wait_for_listener(&client, &format!("http://{}:8080/hello", server.ip())).await?;
    assert_eq!(answer["status"], 200, "{answer}");
    let echoed: serde_json::Value =
        serde_json::from_str(answer["body"].as_str().unwrap_or_default())?;
    assert_eq!(echoed["path"], "/hello");

    // The runner reports the pod running with its address, as a kubelet would.
    let stored = pods.get("server").await?;
    let status = stored.status.unwrap_or_default();
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(status.pod_ip, Some(server.ip().to_string()));

    // Each pod has its own loopback: the server's port is not open in the client's.
    let local = request(&client, "http://127.0.0.1:8080/", &[]).await?;
    assert!(local.get("error").is_some(), "{local}");
    Ok(())
}
