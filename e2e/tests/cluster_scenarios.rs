//! The scenario suite of the kubelet tiers (DESIGN.md §7): real pods with the Helm chart
//! installed, on
//!
//! - **node** (tier 4): a real single-node Kubernetes 1.20.2 from `../shared/node`, with
//!   images built here by buildah. `sudo e2e/node/up.sh DIR` starts it, builds and loads
//!   the images and installs the chart; then
//!   `PORTCULLIS_E2E=node PORTCULLIS_E2E_TAG=$(cat DIR/tag) cargo test --workspace --test cluster_scenarios -- --test-threads=3`
//!   (`scripts/test` does all of this when run as root in CI);
//! - **kind** (tier 5): `e2e/kind/run.sh` creates a kind cluster (Kubernetes 1.31), builds
//!   and loads the images and runs the suite with `PORTCULLIS_E2E=kind`.
//!
//! Every test returns early, printing why, unless `PORTCULLIS_E2E` names one of them.
//!
//! Two parts: the suite every cluster tier runs (`portcullis_e2e::scenarios`, here
//! through [`Kubelet`], with requests sent by `pod-app request` through `kubectl exec`),
//! then the scenarios only a kubelet can show (probes, Jobs, rotation under load, an app's
//! first millisecond, Service names), whose clients run `sh` + curl in Jobs (or a Pod)
//! whose logs the tests read; the app echoes the request headers the proxy adds as JSON.
//!
//! The cluster admin of a kind (kubeadm ≥ 1.29) kubeconfig is in group
//! `kubeadm:cluster-admins`, not `system:masters`, and the validating webhook exempts
//! only `system:masters` from its escalation checks; the tests therefore act as
//! `portcullis-e2e` in `system:masters` through impersonation (which cluster-admin may).

mod cluster;

use cluster::*;
use portcullis_e2e::scenarios;
use portcullis_e2e::wait::eventually;

/// The kubelet tiers as the shared suite sees them.
struct Kubelet {
    client: Client,
}

impl scenarios::Cluster for Kubelet {
    type Pod = Pod;

    fn client(&self) -> Result<Client> {
        Ok(self.client.clone())
    }

    fn image(&self) -> String {
        tools_image()
    }

    async fn start_pod(&self, namespace: &str, pod: Value) -> Result<Pod> {
        let pod: Pod = serde_json::from_value(pod)?;
        let name = pod.name_any();
        Api::<Pod>::namespaced(self.client.clone(), namespace)
            .create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("creating pod {namespace}/{name}"))?;
        pod_ready(&self.client, namespace, &name).await
    }

    fn ip(&self, pod: &Pod) -> String {
        pod.status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .unwrap_or_default()
    }

    async fn pod_app_request(&self, pod: &Pod, args: &[String]) -> Result<Value> {
        let namespace = pod.namespace().unwrap_or_default();
        let output = tokio::process::Command::new("kubectl")
            .args(["exec", "-n", &namespace, &pod.name_any(), "-c", "app", "--"])
            .args(["pod-app", "request"])
            .args(args)
            .output()
            .await
            .context("running kubectl exec")?;
        serde_json::from_slice(&output.stdout).with_context(|| {
            format!(
                "pod-app printed no JSON in {namespace}/{}: {}",
                pod.name_any(),
                String::from_utf8_lossy(&output.stderr)
            )
        })
    }

    fn trust_bundle(&self, _pod: &Pod) -> String {
        "/etc/portcullis/ca-bundle.crt".into()
    }

    fn outbound_args(&self) -> Vec<String> {
        // The chart's values on these tiers set proxy.redirectOutbound: the init step
        // sends the app's outbound connections to its proxy.
        Vec::new()
    }

    async fn proxy_output(&self, pod: &Pod) -> Result<String> {
        Ok(
            Api::<Pod>::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default())
                .logs(
                    &pod.name_any(),
                    &LogParams {
                        container: Some("portcullis-proxy".into()),
                        ..LogParams::default()
                    },
                )
                .await?,
        )
    }

    async fn operator_outputs(&self) -> Result<Vec<String>> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &release_namespace());
        let mut outputs = Vec::new();
        for pod in operator_pods(&self.client).await? {
            outputs.push(pods.logs(&pod.name_any(), &LogParams::default()).await?);
        }
        Ok(outputs)
    }

    async fn kubectl(&self, user: Option<&str>, args: &[&str]) -> Result<std::process::Output> {
        let identity: Vec<&str> = match user {
            Some(user) => vec!["--as", user],
            None => vec!["--as", E2E_USER, "--as-group", E2E_GROUPS[0]],
        };
        tokio::process::Command::new("kubectl")
            .args(identity)
            .args(args)
            .output()
            .await
            .context("running kubectl (KUBECONFIG from the environment)")
    }
}

/// One `#[tokio::test]` per scenario of the shared suite.
macro_rules! shared_scenarios {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $name() -> Result<()> {
            let Some((client, _)) = fixture().await? else {
                return Ok(());
            };
            scenarios::$name(&Kubelet { client }).await
        }
    )*};
}

shared_scenarios!(
    injected_pod_gets_a_certificate_and_is_reached_only_through_the_proxy,
    rate_limit_and_ip_allowlist_are_enforced_per_key,
    revoked_key_is_refused_within_a_second_of_kubectl_patch,
    mtls_between_injected_pods_carries_the_spiffe_principal,
    audit_records_every_request_and_the_chain_verifies,
    opt_out_annotation_is_respected,
    webhook_refuses_an_over_scoped_key_with_the_kubectl_message,
);
// ---------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn operator_is_installed_leading_and_serving_webhooks() -> Result<()> {
    let Some((client, _)) = fixture().await? else {
        return Ok(());
    };
    let lease = Api::<Lease>::namespaced(client.clone(), &release_namespace())
        .get("portcullis-operator")
        .await?;
    let holder = lease
        .spec
        .and_then(|s| s.holder_identity)
        .unwrap_or_default();
    assert!(
        holder.starts_with("portcullis-operator-"),
        "Lease holder {holder:?}"
    );
    for secret in [
        "portcullis-kek",
        "portcullis-ca-root",
        "portcullis-ca-intermediate",
        "portcullis-webhook-ca",
    ] {
        Api::<Secret>::namespaced(client.clone(), &release_namespace())
            .get(secret)
            .await
            .with_context(|| format!("the operator did not create Secret {secret}"))?;
    }
    Ok(())
}

#[tokio::test]
async fn labelled_namespace_gets_the_proxy_and_a_spiffe_certificate() -> Result<()> {
    let Some((client, fx)) = fixture().await? else {
        return Ok(());
    };
    let pod = Api::<Pod>::namespaced(client.clone(), &fx.app_ns)
        .get("echo")
        .await?;
    assert!(
        pod.annotations().contains_key("portcullis.dev/injected"),
        "not injected: {:?}",
        pod.annotations()
    );
    let spec = pod.spec.context("pod spec")?;
    let init: Vec<&str> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        init.first(),
        Some(&"portcullis-init"),
        "init containers {init:?}"
    );
    if fx.tier.native_sidecars() {
        // Kubernetes 1.29+: the proxy is a native sidecar.
        let proxy = spec
            .init_containers
            .iter()
            .flatten()
            .find(|c| c.name == "portcullis-proxy")
            .context("no native-sidecar portcullis-proxy")?;
        assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));
    } else {
        // Before 1.29: a regular container, first, so it starts before the app.
        assert_eq!(
            spec.containers.first().map(|c| c.name.as_str()),
            Some("portcullis-proxy"),
            "the proxy is not the first container"
        );
    }

    // The certificate the proxy presents names the workload by SPIFFE ID; TLS 1.2 is
    // refused.
    let script = format!(
        r#"{UNTIL}
until_up {url}/
curl -sk -o /dev/null --max-time 5 -w '%{{certs}}' {url}/ > /tmp/certs; echo "certs-exit=$?"
cat /tmp/certs
curl -sk -o /dev/null --max-time 5 --tlsv1.2 --tls-max 1.2 {url}/; echo "tls12-exit=$?"
"#,
        url = fx.app_url()
    );
    let run = run_job(&client, fx.tier, &fx.client_ns, None, &[], &script).await?;
    assert!(
        run.logs.contains(&fx.spiffe_id("default")),
        "no SPIFFE ID in the certificate:\n{}",
        run.logs
    );
    assert_ne!(
        run.value("tls12-exit"),
        Some("0"),
        "TLS 1.2 was accepted:\n{}",
        run.logs
    );
    Ok(())
}

#[tokio::test]
async fn app_probes_reach_the_app_and_tell_the_truth_and_check_names_the_unready_pod() -> Result<()>
{
    let Some((client, fx)) = fixture().await? else {
        return Ok(());
    };
    // The app serves for 40 s, then closes its listener and keeps running. Its startup
    // probe is an httpGet and its readiness probe a tcpSocket on the app port: through
    // the redirect both would meet the proxy (TLS, or an accept that says nothing about
    // the app) unless the injector points them at the proxy's admin port.
    let name = format!("probed-{}", suffix());
    let script = format!(
        "pod-app serve --port {APP_PORT} & pid=$!; sleep 40; kill $pid; echo stopped; sleep 3600"
    );
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
            "name": "app", "image": fx.tier.app_image(), "imagePullPolicy": "IfNotPresent",
            "command": ["sh", "-c", script],
            "ports": [{"name": "http", "containerPort": APP_PORT}],
            "startupProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1, "failureThreshold": 60},
            "readinessProbe": {"tcpSocket": {"port": APP_PORT}, "periodSeconds": 2, "failureThreshold": 2}
        }]}
    }))?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &fx.app_ns);
    pods.create(&PostParams::default(), &pod).await?;
    let result = async {
        let pod = pod_ready(&client, &fx.app_ns, &name).await?;
        let app = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.iter().find(|c| c.name == "app"))
            .context("app container")?;
        let startup = app
            .startup_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .context("startup probe")?;
        ensure!(
            startup.path.as_deref() == Some("/app-health/app/startupz"),
            "the startup probe was not pointed at the proxy: {startup:?}"
        );
        // The app stops listening: the pod must go unready, however the proxy is doing.
        wait_for(
            "the pod to go unready once the app stopped listening",
            Duration::from_secs(90),
            || async { Ok((!is_ready(&pods.get(&name).await?)).then_some(())) },
        )
        .await?;
        // Unready past check's grace period (2 min), the pod is named with the cause the
        // kubelet reported, and check fails.
        let pod_line = format!("{}/{name}", fx.app_ns);
        let last_report = std::cell::RefCell::new(String::new());
        let found = wait_for(
            "kubectl portcullis check to fail naming the unready pod",
            Duration::from_secs(240),
            || async {
                let (passed, report) = portcullis_check().await?;
                // Stuck, by check's own rule: its age reads in minutes (2m and up), and
                // the Injected pods check fails.
                let line = report
                    .lines()
                    .map(str::trim)
                    .find(|l| {
                        l.strip_prefix(pod_line.as_str())
                            .and_then(|rest| rest.strip_prefix(" ("))
                            .and_then(|rest| rest.split_once(')'))
                            .is_some_and(|(age, _)| age.ends_with('m'))
                    })
                    .map(str::to_owned);
                let section_fails = report
                    .lines()
                    .any(|l| l.trim_start().starts_with("✗ Injected pods"));
                last_report.replace(report);
                Ok(line.filter(|_| !passed && section_fails))
            },
        )
        .await;
        let report = last_report.take();
        let line = found.with_context(|| format!("the last report:\n{report}"))?;
        eprintln!("check: {line}");
        ensure!(
            line.contains("container app fails its readiness probe") && line.contains(" → "),
            "check should say the app fails its readiness probe, with the fix:\n{report}"
        );
        Ok(())
    }
    .await;
    let _ = pods.delete(&name, &DeleteParams::default()).await;
    result
}

/// A batch pod whose app has no port: the proxy can only learn of the app's exit from
/// the operator (on 1.20 it is a regular container, and the pod completes only once it
/// has exited too).
fn batch_pod_template(tier: Tier) -> Value {
    json!({
        "metadata": {"labels": {"app": "report"}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "report",
                "image": tier.client_image(),
                "imagePullPolicy": "IfNotPresent",
                "command": ["sh", "-c", "echo report written; sleep 2"]
            }]
        }
    })
}

/// The Job's pod once it has ended: phase Succeeded, and (without native sidecars) the
/// proxy container terminated with exit code 0.
async fn job_completed(client: &Client, namespace: &str, job: &str, tier: Tier) -> Result<()> {
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    wait_for(
        &format!("Job {namespace}/{job} complete"),
        Duration::from_secs(150),
        || async {
            let job = jobs.get(job).await?;
            let status = job.status.unwrap_or_default();
            ensure!(
                status.failed.unwrap_or(0) == 0,
                "the Job failed: {status:?}"
            );
            Ok((status.succeeded.unwrap_or(0) >= 1).then_some(()))
        },
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod = pods
        .list(&ListParams::default().labels(&format!("job-name={job}")))
        .await?
        .items
        .into_iter()
        .next()
        .context("the Job's pod")?;
    let status = pod.status.clone().unwrap_or_default();
    ensure!(
        status.phase.as_deref() == Some("Succeeded"),
        "pod {} is {:?}, not Succeeded",
        pod.name_any(),
        status.phase
    );
    if !tier.native_sidecars() {
        let proxy_exit = status
            .container_statuses
            .iter()
            .flatten()
            .find(|c| c.name == "portcullis-proxy")
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.terminated.as_ref())
            .map(|t| t.exit_code);
        ensure!(
            proxy_exit == Some(0),
            "the proxy of {} ended with {proxy_exit:?}, not 0",
            pod.name_any()
        );
    }
    Ok(())
}

#[tokio::test]
async fn injected_job_and_cronjob_without_a_port_run_to_completion() -> Result<()> {
    let Some((client, fx)) = fixture().await? else {
        return Ok(());
    };
    let job: Job = serde_json::from_value(json!({
        "metadata": {"generateName": "report-"},
        "spec": {"backoffLimit": 0, "template": batch_pod_template(fx.tier)}
    }))?;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &fx.app_ns);
    let job = jobs.create(&PostParams::default(), &job).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &fx.app_ns);
    let job_name = job.name_any();
    let injected = wait_for("the Job's pod", Duration::from_secs(30), || async {
        Ok(pods
            .list(&ListParams::default().labels(&format!("job-name={job_name}")))
            .await?
            .items
            .into_iter()
            .next())
    })
    .await?;
    ensure!(
        injected
            .labels()
            .get("portcullis.dev/injected")
            .map(String::as_str)
            == Some("true"),
        "the Job's pod was not injected: {:?}",
        injected.labels()
    );
    job_completed(&client, &fx.app_ns, &job_name, fx.tier).await?;

    // A CronJob (batch/v1beta1 on 1.20, batch/v1 on kind): its first Job completes.
    let version = if fx.tier == Tier::Kind {
        "v1"
    } else {
        "v1beta1"
    };
    let resource = kube::discovery::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
        "batch", version, "CronJob",
    ));
    let cronjobs: Api<kube::api::DynamicObject> =
        Api::namespaced_with(client.clone(), &fx.app_ns, &resource);
    let cronjob: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": format!("batch/{version}"), "kind": "CronJob",
        "metadata": {"name": "nightly"},
        "spec": {
            "schedule": "*/1 * * * *",
            "concurrencyPolicy": "Forbid",
            "jobTemplate": {"spec": {"backoffLimit": 0, "template": batch_pod_template(fx.tier)}}
        }
    }))?;
    cronjobs.create(&PostParams::default(), &cronjob).await?;
    let scheduled = wait_for(
        "the CronJob's first Job",
        Duration::from_secs(150),
        || async {
            Ok(jobs
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .find_map(|job| {
                    job.owner_references()
                        .iter()
                        .any(|o| o.kind == "CronJob" && o.name == "nightly")
                        .then(|| job.name_any())
                }))
        },
    )
    .await?;
    let outcome = job_completed(&client, &fx.app_ns, &scheduled, fx.tier).await;
    cronjobs.delete("nightly", &DeleteParams::default()).await?;
    outcome
}

/// The operator's leaf rotation period as the chart set it (`PORTCULLIS_ROTATION_PERIOD`).
async fn leaf_rotation_period(client: &Client) -> Result<Option<Duration>> {
    let deployment = Api::<Deployment>::namespaced(client.clone(), &release_namespace())
        .get("portcullis-operator")
        .await?;
    let value = deployment
        .spec
        .and_then(|s| s.template.spec)
        .into_iter()
        .flat_map(|s| s.containers)
        .flat_map(|c| c.env.unwrap_or_default())
        .find(|e| e.name == "PORTCULLIS_ROTATION_PERIOD")
        .and_then(|e| e.value);
    Ok(value
        .and_then(|v| v.parse::<portcullis_crds::duration::DurationSpec>().ok())
        .map(|d| d.get()))
}

#[tokio::test]
async fn leaf_rotation_under_load_fails_no_request_and_changes_the_serial() -> Result<()> {
    let Some((client, fx)) = fixture().await? else {
        return Ok(());
    };
    let period = leaf_rotation_period(&client).await?;
    let Some(period) = period.filter(|p| *p <= Duration::from_secs(120)) else {
        eprintln!(
            "skipping: the leaf rotation period is {period:?}; the node tier sets \
             identity.rotationPeriod in e2e/node/values.yaml so a rotation happens within the test"
        );
        return Ok(());
    };
    let token = identify_key(&client, fx, "rotate").await?;
    // One TLS connection per request (a new curl each time), so every handshake shows
    // the certificate the proxy serves at that moment; stop 20 requests after the serial
    // changed, or after at most 1500 requests (bounded in count and time). The 10 s
    // limit keeps a slow handshake on a loaded 2-core CI machine from counting as a
    // failure; a failure prints curl's exit code (28 timeout, 35/56 TLS or reset).
    let script = format!(
        r#"{UNTIL}
until_code ready 200 -X POST -H "Authorization: Bearer $KEY" {url}/v1/identify
serial() {{ printf '%s\n' "$1" | grep -i -m1 'serial number' | sed 's/.*: *//'; }}
i=0; failed=0; first=; after=0
while [ $i -lt 1500 ] && [ $after -lt 20 ]; do
  i=$((i+1))
  out=$(curl -sk -o /dev/null --max-time 10 -w '%{{http_code}}\n%{{certs}}' -X POST -H "Authorization: Bearer $KEY" {url}/v1/identify); rc=$?
  code=$(printf '%s\n' "$out" | head -n1)
  [ "$code" = 200 ] || {{ failed=$((failed+1)); echo "bad=$code curl=$rc at $i"; }}
  s=$(serial "$out")
  [ -n "$first" ] || {{ first=$s; echo "first=$first"; }}
  if [ -n "$s" ] && [ "$s" != "$first" ]; then [ $after -gt 0 ] || echo "changed=$s at $i"; after=$((after+1)); fi
  sleep 0.1
done
echo "requests=$i"
echo "failed=$failed""#,
        url = fx.app_url()
    );
    let run = run_job(
        &client,
        fx.tier,
        &fx.client_ns,
        None,
        &[("KEY", token.as_str())],
        &script,
    )
    .await?;
    eprintln!("rotation period {period:?}:\n{}", run.logs);
    run.ensure_all_served("the rotation")?;
    ensure!(
        run.value("first").is_some_and(|s| !s.is_empty()),
        "curl printed no serial number:\n{}",
        run.logs
    );
    ensure!(
        run.value("changed").is_some(),
        "the serving certificate's serial did not change within the run:\n{}",
        run.logs
    );
    Ok(())
}

/// The KEK rotation on real pods: the operator, in its pod with the chart's RBAC,
/// stages a new KEK, promotes it on every replica, re-wraps the CA keys, the webhook CA
/// key and every tenant DEK and retires the old one, while a client keeps calling an
/// injected app (whose certificates the operator keeps issuing: they rotate every
/// minute here). No request fails.
#[tokio::test]
async fn kek_rotation_under_load_fails_no_request_and_retires_the_old_key() -> Result<()> {
    let Some((client, fx)) = fixture().await? else {
        return Ok(());
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &release_namespace());
    let annotation = |secret: &Secret, name: &str| secret.annotations().get(name).cloned();
    let before = secrets.get("portcullis-kek").await?;
    let old_id = annotation(&before, "portcullis.dev/kek-id");
    ensure!(
        old_id.is_some(),
        "portcullis-kek has no portcullis.dev/kek-id"
    );
    let token = identify_key(&client, fx, "kekrot").await?;
    // 900 requests 0.1 s apart (at least 90 s, bounded), across the whole rotation.
    let script = format!(
        r#"{UNTIL}
until_code ready 200 -X POST -H "Authorization: Bearer $KEY" {url}/v1/identify
i=0; failed=0
while [ $i -lt 900 ]; do
  i=$((i+1))
  code=$(curl -sk -o /dev/null --max-time 10 -w '%{{http_code}}' -X POST -H "Authorization: Bearer $KEY" {url}/v1/identify); rc=$?
  [ "$code" = 200 ] || {{ failed=$((failed+1)); echo "bad=$code curl=$rc at $i"; }}
  sleep 0.1
done
echo "requests=$i"
echo "failed=$failed""#,
        url = fx.app_url()
    );
    let load = tokio::spawn({
        let (client, tier, namespace) = (client.clone(), fx.tier, fx.client_ns.clone());
        async move {
            run_job(
                &client,
                tier,
                &namespace,
                None,
                &[("KEY", token.as_str())],
                &script,
            )
            .await
        }
    });
    // Ask for the rotation once the load is under way.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let request = format!("e2e-{}", suffix());
    secrets
        .patch(
            "portcullis-kek",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {
                "portcullis.dev/rotate-kek": request
            }}})),
        )
        .await?;
    // Done: a new current key, nothing staged, no previous key left to retire (the
    // operator retires it only once the re-wrap pass finds no blob under it).
    let rotated = eventually(
        "the KEK rotation to complete",
        Duration::from_secs(240),
        || {
            let secrets = secrets.clone();
            let (old_id, request) = (old_id.clone(), request.clone());
            async move {
                let secret = secrets.get("portcullis-kek").await?;
                let data = secret.data.clone().unwrap_or_default();
                let done = annotation(&secret, "portcullis.dev/rotate-kek-handled")
                    == Some(request)
                    && annotation(&secret, "portcullis.dev/kek-id") != old_id
                    && !data.contains_key("kek-next")
                    && !data.keys().any(|k| k.starts_with("kek-previous-"));
                Ok(done.then_some(secret))
            }
        },
    )
    .await;
    let run = load.await.context("the load task")??;
    eprintln!("KEK rotation under load:\n{}", run.logs);
    if let Err(e) = rotated {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &release_namespace());
        let mut logs = String::new();
        for pod in operator_pods(&client).await? {
            let tail = LogParams {
                tail_lines: Some(40),
                ..LogParams::default()
            };
            logs += &pods.logs(&pod.name_any(), &tail).await.unwrap_or_default();
        }
        bail!("{e:#}\noperator logs, the last 40 lines of each pod:\n{logs}");
    }
    run.ensure_all_served("the KEK rotation")
}

#[tokio::test]
async fn an_app_calling_out_in_its_first_millisecond_is_not_refused() -> Result<()> {
    let Some((client, fx)) = fixture().await? else {
        return Ok(());
    };
    // No retry: the app's very first instruction is the call. The injected proxy holds
    // the app back (postStart `wait-ready` on 1.20, a startup probe as a native sidecar)
    // until it has its certificate and policy, so the outbound mTLS call succeeds at once.
    let script = format!(
        "echo \"first=$(curl -s -o /dev/null -w '%{{http_code}}' --max-time 5 -X POST \
         http://echo.{ns}.svc:{port}/v1/identify)\"",
        ns = fx.app_ns,
        port = APP_PORT
    );
    let run = run_job(&client, fx.tier, &fx.app_ns, None, &[], &script).await?;
    ensure!(
        run.value("first") == Some("200"),
        "the app's first call did not succeed:\n{}",
        run.logs
    );
    Ok(())
}

#[tokio::test]
async fn an_api_key_client_verifies_the_server_with_the_trust_bundle() -> Result<()> {
    let Some((client, fx)) = fixture().await? else {
        return Ok(());
    };
    let bundle =
        Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), &fx.app_ns)
            .get("portcullis-trust-bundle")
            .await?
            .data
            .and_then(|mut d| d.remove("ca-bundle.crt"))
            .context("the tenant namespace's trust bundle")?;
    // A Service added now: the proxy renews for its name when the policy bundle says
    // the namespace's Services changed (well before the next rotation).
    let alias = format!("echo-{}", suffix());
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": alias},
        "spec": {"selector": {"app": "echo"}, "ports": [{"name": "http", "port": APP_PORT, "targetPort": APP_PORT}]}
    }))?;
    Api::<Service>::namespaced(client.clone(), &fx.app_ns)
        .create(&PostParams::default(), &service)
        .await?;
    let token = identify_key(&client, fx, "verify").await?;
    // No -k: curl checks the chain against the bundle and the name against the SANs.
    let script = format!(
        r#"printf '%s' "$CA" > /tmp/ca.crt
verify() {{ # name url
  for i in $(seq 1 30); do
    code=$(curl -s -o /dev/null -w '%{{http_code}}' --max-time 5 --cacert /tmp/ca.crt -X POST -H "Authorization: Bearer $KEY" "$2/v1/identify"); rc=$?
    [ "$code" = 200 ] && break
    sleep 1
  done
  echo "$1=$code rc=$rc"
}}
verify service https://echo.{ns}.svc:{port}
verify long https://echo.{ns}.svc.cluster.local:{port}
verify added https://{alias}.{ns}.svc:{port}
code=$(curl -s -o /dev/null -w '%{{http_code}}' --max-time 5 --cacert /tmp/ca.crt https://kubernetes.default.svc/); echo "foreign=$?""#,
        ns = fx.app_ns,
        port = APP_PORT,
    );
    let run = run_job(
        &client,
        fx.tier,
        &fx.client_ns,
        None,
        &[("CA", bundle.as_str()), ("KEY", token.as_str())],
        &script,
    )
    .await?;
    for name in ["service", "long", "added"] {
        ensure!(
            run.value(name).is_some_and(|v| v.starts_with("200 ")),
            "{name}: the client could not verify the server with the trust bundle:\n{}",
            run.logs
        );
    }
    // The bundle trusts only Portcullis workloads: another server fails verification
    // (curl 60: certificate problem).
    ensure!(
        run.value("foreign") == Some("60"),
        "a server outside Portcullis verified against the tenant bundle:\n{}",
        run.logs
    );
    Ok(())
}

/// Whether the chart's collector keeps its records on a PersistentVolumeClaim (up.sh
/// gives it one on the node it starts), so that they outlive the collector pod.
async fn collector_is_persistent(client: &Client, release: &str) -> Result<bool> {
    let set = Api::<k8s_openapi::api::apps::v1::StatefulSet>::namespaced(client.clone(), release)
        .get("portcullis-audit")
        .await?;
    Ok(set
        .spec
        .and_then(|s| s.volume_claim_templates)
        .is_some_and(|t| !t.is_empty()))
}

/// Deletes the collector pod and waits for its replacement to be Ready.
async fn restart_collector(client: &Client, release: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), release);
    let old = pods.get("portcullis-audit-0").await?.uid();
    pods.delete("portcullis-audit-0", &DeleteParams::default())
        .await?;
    wait_for(
        "the collector's new pod Ready",
        Duration::from_secs(120),
        || async {
            let Some(pod) = pods.get_opt("portcullis-audit-0").await? else {
                return Ok(None);
            };
            let ready = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            Ok((pod.uid() != old && ready).then_some(()))
        },
    )
    .await
}

#[tokio::test]
async fn audit_records_reach_the_collector_once_each_and_outlive_the_app_pod() -> Result<()> {
    let Some((client, fx)) = fixture().await? else {
        return Ok(());
    };
    let release = release_namespace();
    if Api::<Service>::namespaced(client.clone(), &release)
        .get_opt("portcullis-audit")
        .await?
        .is_none()
    {
        println!("skipping: the chart's audit collector is not enabled on this tier");
        return Ok(());
    }
    let persistent = collector_is_persistent(&client, &release).await?;
    if !persistent {
        println!(
            "the collector keeps its records on an emptyDir here: it is not restarted under load"
        );
    }
    // A tenant of its own: no other scenario's requests land in its log. Its analysts
    // read the log back over the export API with a Kubernetes token: a Role inheriting
    // Analyst for the client Jobs' ServiceAccount.
    let ns = tenant_with_echo(&client, fx.tier, "pc-audit").await?;
    let token = create_key(
        &client,
        &ns,
        &format!("audit-{}", suffix()),
        json!({"role": "Developer", "scopes": ["identify"]}),
    )
    .await?;
    let role: portcullis_crds::Role = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "Role",
        "metadata": {"name": "auditor", "namespace": ns},
        "spec": {"inherits": ["Analyst"],
                 "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": fx.client_ns}]}
    }))?;
    Api::<portcullis_crds::Role>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &role)
        .await?;
    let hec = tenant_splunk_hec(&client, fx, &release, &ns).await?;

    // A bounded load of 40 requests over about 10 s; every request that reached the
    // proxy (any status but curl's 000) is one record. Three seconds in, the collector
    // pod is deleted: its outage refuses nothing (the proxies' spools have room) and
    // loses nothing (what was acknowledged is on its volume, the rest is resent).
    let script = format!(
        r#"answered=0; ok=0
call() {{
  code=$(curl -sk -o /dev/null -w '%{{http_code}}' --max-time 5 -X POST -H "Authorization: Bearer $KEY" https://echo.{ns}.svc:{port}/v1/identify)
  [ "$code" != 000 ] && answered=$((answered+1))
  [ "$code" = 200 ] && ok=$((ok+1))
}}
for i in $(seq 1 60); do call; [ "$code" = 200 ] && break; sleep 1; done
for i in $(seq 2 40); do call; sleep 0.25; done
echo "answered=$answered"; echo "ok=$ok""#,
        ns = ns,
        port = APP_PORT,
    );
    let env = [("KEY", token.as_str())];
    let load = run_job(&client, fx.tier, &fx.client_ns, None, &env, &script);
    let outage = async {
        if persistent {
            tokio::time::sleep(Duration::from_secs(3)).await;
            restart_collector(&client, &release).await?;
        }
        anyhow::Ok(())
    };
    let (run, restarted) = tokio::join!(load, outage);
    let run = run?;
    restarted?;
    let answered: u64 = run
        .value("answered")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("the client printed no count:\n{}", run.logs))?;
    ensure!(
        run.value("ok") == Some("40"),
        "40 requests should have been served, the collector's outage notwithstanding:\n{}",
        run.logs
    );
    // Right after the last request the app pod is deleted: what its proxy still held in
    // its spool must reach the collector before it exits.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods.delete("echo", &DeleteParams::default()).await?;
    wait_for("the app pod gone", Duration::from_secs(90), || async {
        Ok(pods.get_opt("echo").await?.is_none().then_some(()))
    })
    .await?;

    // The collector seals the log (every 2 s here) and the operator witnesses the
    // newest seal into the Tenant's status (every 5 s here). Read before the export:
    // every seal witnessed by then is in the log the export returns.
    let tenants: Api<portcullis_crds::Tenant> = Api::all(client.clone());
    let anchors = wait_for(
        "the operator to witness a seal of the tenant's log",
        Duration::from_secs(90),
        || async {
            let anchors = tenants
                .get(&ns)
                .await?
                .status
                .map(|s| s.audit_anchors)
                .unwrap_or_default();
            Ok((!anchors.is_empty()).then_some(anchors))
        },
    )
    .await?;

    // The export holds exactly one record per request that reached the proxy, in order;
    // the whole chain (with the proxy's checkpoints) comes back for verification.
    // Without a token the collector answers 401.
    let export = format!(
        r#"T=/var/run/secrets/kubernetes.io/serviceaccount/token
URL="https://portcullis-audit.{release}.svc:8091/v1/tenants/{ns}/records"
rows=-1
for i in $(seq 1 60); do
  code=$(curl -sk -o /tmp/out -w '%{{http_code}}' --max-time 10 -H "Authorization: Bearer $(cat $T)" "$URL?format=csv&action=api.identify")
  [ "$code" = 200 ] && rows=$(($(wc -l < /tmp/out) - 1))
  [ "$rows" = "$WANT" ] && break
  sleep 2
done
echo "status=$code"
echo "rows=$rows"
echo "seqs=$(tail -n +2 /tmp/out | cut -d, -f3 | tr '\n' ' ')"
echo "admin=$(curl -sk --max-time 10 -H "Authorization: Bearer $(cat $T)" "$URL?format=csv&action=admin.*" | tail -n +2 | cut -d, -f6 | sort | tr '\n' ' ')"
echo "chain=$(curl -sk --max-time 10 -H "Authorization: Bearer $(cat $T)" "$URL?format=chain" | base64 -w0)"
echo "anonymous=$(curl -sk -o /dev/null -w '%{{http_code}}' --max-time 10 "$URL")""#
    );
    let want = answered.to_string();
    let run = run_job(
        &client,
        fx.tier,
        &fx.client_ns,
        None,
        &[("WANT", want.as_str())],
        &export,
    )
    .await?;
    ensure!(
        run.value("status") == Some("200") && run.value("rows") == Some(want.as_str()),
        "the analyst's export should hold the {answered} records that reached the proxy:\n{}",
        run.logs
    );
    // The tenant's admin changes are in its log too: the Tenant, its key, the Role.
    let admin = run.value("admin").unwrap_or_default();
    ensure!(
        [
            "admin.key.create",
            "admin.role.create",
            "admin.tenant.create"
        ]
        .iter()
        .all(|action| admin.contains(action)),
        "the tenant's log should hold its admin changes, found [{admin}]:\n{}",
        run.logs
    );
    // One chain, exported in order: sequence numbers 0, 1, 2, ...
    let seqs = sequence_numbers(&run);
    ensure!(
        seqs == (0..answered).collect::<Vec<_>>(),
        "the export is not the chain in order: {seqs:?}\n{}",
        run.logs
    );
    ensure!(
        run.value("anonymous") == Some("401"),
        "an export without a token should be refused with 401:\n{}",
        run.logs
    );
    // The history verifies: every hash and link, every checkpoint signed by a workload
    // of this cluster's trust bundle, every seal signed by the collector and linked,
    // and the seals the operator witnessed are the log's.
    use base64::Engine as _;
    let chain = base64::engine::general_purpose::STANDARD
        .decode(run.value("chain").unwrap_or_default())
        .context("the chain export as base64")?;
    let bundle = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), &ns)
        .get("portcullis-trust-bundle")
        .await?
        .data
        .and_then(|mut d| d.remove("ca-bundle.crt"))
        .context("the tenant namespace's trust bundle")?;
    let options = portcullis_audit::VerifyOptions {
        trust_bundle: Some(
            portcullis_audit::TrustBundle::from_pem(bundle.as_bytes())
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        ),
        anchors: anchors
            .iter()
            .map(|a| portcullis_audit::Anchor {
                number: a.number,
                digest: a.digest.clone(),
            })
            .collect(),
        ..portcullis_audit::VerifyOptions::default()
    };
    let report = portcullis_audit::verify::verify_jsonl(
        &String::from_utf8(chain)?,
        "the collector",
        options,
    )
    .map_err(|p| anyhow::anyhow!("the tenant's history does not verify: {p}"))?;
    // The proxy's chain, plus the operator's chain of this tenant's admin changes.
    ensure!(
        report.records >= answered,
        "the verified history holds {} records, at least {answered} expected",
        report.records
    );
    ensure!(
        report.seals >= 1 && report.anchors == anchors.len() as u64,
        "the history should carry the collector's seals and match every witnessed one: {report:?}"
    );

    // The collector forwarded the same records to the tenant's Splunk HEC, each once,
    // in order (a new sink is looked up within 30 s).
    let Some(hec) = hec else { return Ok(()) };
    let received = format!(
        r#"for i in $(seq 1 60); do
  curl -s --max-time 5 "{hec}/received" | grep '"action":"api.identify"' | grep "\"tenant\":\"$NS\"" > /tmp/got
  [ "$(wc -l < /tmp/got)" -ge "$WANT" ] && break
  sleep 2
done
echo "records=$(wc -l < /tmp/got)"
echo "seqs=$(grep -o '"seq":[0-9]*' /tmp/got | cut -d: -f2 | tr '\n' ' ')""#
    );
    let run = run_job(
        &client,
        fx.tier,
        &fx.client_ns,
        None,
        &[("WANT", want.as_str()), ("NS", ns.as_str())],
        &received,
    )
    .await?;
    ensure!(
        sequence_numbers(&run) == (0..answered).collect::<Vec<_>>(),
        "the Splunk HEC should hold the {answered} records once each, in order:\n{}",
        run.logs
    );
    Ok(())
}

/// The `seqs=` a job printed, space-separated.
fn sequence_numbers(run: &JobRun) -> Vec<u64> {
    run.value("seqs")
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The Secret the node tier's chart values let the collector read (`sinkSecrets`).
const HEC_SECRET: &str = "portcullis-e2e-hec";

/// A Splunk HEC stand-in pod (`pod-app hec`) in the client namespace, its token in the
/// Secret the chart lets the collector read, named in tenant `ns`'s `spec.audit.sinks`;
/// returns its URL. `None` (printed) when the chart was installed without that Secret
/// in `audit.collector.sinkSecrets`.
async fn tenant_splunk_hec(
    client: &Client,
    fx: &Fixture,
    release: &str,
    ns: &str,
) -> Result<Option<String>> {
    let readable = Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(client.clone(), release)
        .get_opt("portcullis-audit-sink-secrets")
        .await?
        .is_some_and(|role| {
            role.rules.iter().flatten().any(|rule| {
                rule.resource_names
                    .iter()
                    .flatten()
                    .any(|name| name == HEC_SECRET)
            })
        });
    if !readable {
        println!(
            "skipping the SIEM check: the chart's audit.collector.sinkSecrets does not list {HEC_SECRET}"
        );
        return Ok(None);
    }
    let token = format!("hec-{}", suffix());
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), release);
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": HEC_SECRET},
        "stringData": {"token": token}
    });
    secrets
        .patch(
            HEC_SECRET,
            &PatchParams::apply("portcullis-e2e").force(),
            &Patch::Apply(&secret),
        )
        .await?;
    let name = format!("hec-{}", suffix());
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"containers": [{
            "name": "hec",
            "image": fx.tier.app_image(),
            "imagePullPolicy": "IfNotPresent",
            "args": ["hec", "--port", "8088"],
            "env": [{"name": "HEC_TOKEN", "value": token}],
            "ports": [{"name": "hec", "containerPort": 8088}],
            "readinessProbe": {"tcpSocket": {"port": 8088}, "periodSeconds": 1}
        }]}
    }))?;
    Api::<Pod>::namespaced(client.clone(), &fx.client_ns)
        .create(&PostParams::default(), &pod)
        .await?;
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"selector": {"app": name}, "ports": [{"name": "hec", "port": 8088, "targetPort": 8088}]}
    }))?;
    Api::<Service>::namespaced(client.clone(), &fx.client_ns)
        .create(&PostParams::default(), &service)
        .await?;
    pod_ready(client, &fx.client_ns, &name).await?;
    let url = format!("http://{name}.{}.svc:8088", fx.client_ns);
    Api::<portcullis_crds::Tenant>::all(client.clone())
        .patch(
            ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"audit": {"sinks": [
                {"splunkHec": {"url": url, "tokenSecretRef": {"name": HEC_SECRET}}}
            ]}}})),
        )
        .await?;
    Ok(Some(url))
}
