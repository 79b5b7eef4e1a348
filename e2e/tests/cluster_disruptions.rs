//! The disruptive scenarios of the real-cluster tiers (see `cluster_scenarios.rs` for how
//! to run them): each changes the whole install, so they run one after another in one
//! test, after the scenario suite, under a steady client load (a bounded hammer pod):
//!
//! 0. `kubectl portcullis check` passes on the healthy install;
//! 1. the leading operator pod is deleted: no request fails;
//! 2. the operator is scaled to 0: pods outside Portcullis still start, a namespace that
//!    requires injection refuses new pods and says which webhook, running injected pods
//!    keep serving their last policy, and `kubectl portcullis check` names the operator;
//! 3. `helm upgrade` to a new image tag rolls the operator without a failed request;
//! 4. `helm uninstall` leaves no webhook configuration behind, so pods are admitted again.
//!
//! Step 4 removes the install: the suite is the last thing run against a cluster.

mod cluster;

use cluster::*;

/// The hammer's status codes logged at or after `since`.
async fn codes_since(
    client: &Client,
    fx: &Fixture,
    hammer: &str,
    since: jiff::Timestamp,
) -> Result<Vec<String>> {
    Ok(hammer_lines(client, &fx.client_ns, hammer)
        .await?
        .into_iter()
        .filter(|(time, _)| *time >= since)
        .map(|(_, code)| code)
        .collect())
}

/// Fails unless every request since `since` succeeded, and there were some.
async fn no_failures_since(
    client: &Client,
    fx: &Fixture,
    hammer: &str,
    since: jiff::Timestamp,
    what: &str,
) -> Result<()> {
    let codes = codes_since(client, fx, hammer, since).await?;
    let failed: Vec<&String> = codes.iter().filter(|c| c.as_str() != "200").collect();
    eprintln!("{what}: {} requests, {} failed", codes.len(), failed.len());
    ensure!(
        codes.len() >= 10,
        "{what}: only {} requests were sent",
        codes.len()
    );
    ensure!(
        failed.is_empty(),
        "{what}: {} of {} requests failed: {failed:?}",
        failed.len(),
        codes.len()
    );
    Ok(())
}

async fn scale_operator(client: &Client, replicas: i32) -> Result<()> {
    let deployments = Api::<Deployment>::namespaced(client.clone(), &release_namespace());
    deployments
        .patch(
            OPERATOR,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": replicas}})),
        )
        .await?;
    if replicas == 0 {
        wait_for("no operator pods", Duration::from_secs(120), || async {
            Ok(operator_pods(client).await?.is_empty().then_some(()))
        })
        .await
    } else {
        operator_ready(client).await
    }
}

/// A plain pod (no Portcullis involved) in `namespace` that must get Running.
async fn plain_pod_runs(client: &Client, tier: Tier, namespace: &str) -> Result<()> {
    let name = format!("plain-{}", suffix());
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
            "name": "sleep", "image": tier.client_image(), "imagePullPolicy": "IfNotPresent",
            "command": ["sleep", "300"]
        }]}
    }))?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    // A new namespace's default ServiceAccount (and on 1.20 its token) appears a moment
    // after the namespace: retry that refusal only, never a webhook's.
    let created = wait_for(
        &format!("the default ServiceAccount of {namespace}"),
        Duration::from_secs(60),
        || async {
            match pods.create(&PostParams::default(), &pod).await {
                Ok(_) => Ok(Some(Ok(()))),
                Err(e) if format!("{e:?}").to_lowercase().contains("serviceaccount") => Ok(None),
                Err(e) => Ok(Some(Err(anyhow::anyhow!("{e:?}")))),
            }
        },
    )
    .await?;
    created.with_context(|| format!("creating a plain pod in {namespace}"))?;
    let running = wait_for(
        &format!("plain pod {namespace}/{name} Running"),
        Duration::from_secs(120),
        || async {
            let pod = pods.get(&name).await?;
            let phase = pod.status.and_then(|s| s.phase).unwrap_or_default();
            Ok((phase == "Running").then_some(()))
        },
    )
    .await;
    let _ = pods.delete(&name, &DeleteParams::default()).await;
    running
}

async fn helm(args: &[&str]) -> Result<String> {
    let output = tokio::process::Command::new("helm")
        .args(args)
        .output()
        .await
        .context("running helm (on PATH from ../shared/setup-tools.sh)")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(output.status.success(), "helm {}: {text}", args.join(" "));
    Ok(text)
}

/// Gives the node's operator image a second tag, as a release would.
async fn retag_operator_image(from: &str, to: &str) -> Result<()> {
    let address = std::env::var("CONTAINERD_ADDRESS")
        .unwrap_or_else(|_| "/run/realnode/containerd/containerd.sock".into());
    let output = tokio::process::Command::new("ctr")
        .args([
            "--address",
            &address,
            "-n",
            "k8s.io",
            "images",
            "tag",
            "--force",
            from,
            to,
        ])
        .output()
        .await
        .context("running ctr")?;
    ensure!(
        output.status.success(),
        "ctr images tag: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

#[tokio::test]
async fn disruptions_fail_no_request_and_never_brick_the_cluster() -> Result<()> {
    let Some((client, fx)) = fixture().await? else {
        return Ok(());
    };
    let token = identify_key(&client, fx, "steady").await?;
    let hammer = start_hammer(&client, fx, &token).await?;
    let result = disrupt(&client, fx, &hammer).await;
    let _ = Api::<Pod>::namespaced(client.clone(), &fx.client_ns)
        .delete(&hammer, &DeleteParams::default())
        .await;
    result
}

async fn disrupt(client: &Client, fx: &Fixture, hammer: &str) -> Result<()> {
    wait_for(
        "the key works (10 successes in a row)",
        Duration::from_secs(120),
        || async {
            let lines = hammer_lines(client, &fx.client_ns, hammer)
                .await
                .unwrap_or_default();
            let streak = lines
                .iter()
                .rev()
                .take_while(|(_, code)| code == "200")
                .count();
            Ok((streak >= 10).then_some(()))
        },
    )
    .await?;

    // 0. After the scenario suite, on the healthy install, check is green (1.20's lack of
    //    native sidecars is a warning, not a failure).
    let (passed, report) = portcullis_check().await?;
    eprintln!("check on the healthy install:\n{report}");
    ensure!(passed, "check failed on the healthy install:\n{report}");

    // 1. The leader goes away.
    let leader = Api::<Lease>::namespaced(client.clone(), &release_namespace())
        .get(OPERATOR)
        .await?
        .spec
        .and_then(|s| s.holder_identity)
        .context("the operator Lease has no holder")?;
    // The holder identity is the pod name plus a per-process suffix.
    let leader_pod = operator_pods(client)
        .await?
        .iter()
        .map(|p| p.name_any())
        .find(|name| leader.starts_with(name.as_str()))
        .with_context(|| format!("no operator pod holds the Lease ({leader})"))?;
    let since = jiff::Timestamp::now();
    Api::<Pod>::namespaced(client.clone(), &release_namespace())
        .delete(&leader_pod, &DeleteParams::default())
        .await
        .with_context(|| format!("deleting the leader {leader_pod}"))?;
    wait_for("a new leader", Duration::from_secs(120), || async {
        let holder = Api::<Lease>::namespaced(client.clone(), &release_namespace())
            .get(OPERATOR)
            .await?
            .spec
            .and_then(|s| s.holder_identity);
        Ok(holder.filter(|h| *h != leader).map(|_| ()))
    })
    .await?;
    operator_ready(client).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    no_failures_since(client, fx, hammer, since, "leader deleted").await?;

    // 2. No operator at all.
    scale_operator(client, 0).await?;
    let since = jiff::Timestamp::now();
    plain_pod_runs(client, fx.tier, "kube-system").await?;
    let plain_ns = create_namespace(client, "pc-plain", json!({})).await?;
    plain_pod_runs(client, fx.tier, &plain_ns).await?;
    let required_ns = create_namespace(
        client,
        "pc-required",
        json!({"portcullis.dev/inject": "required"}),
    )
    .await?;
    let refused = plain_pod_runs(client, fx.tier, &required_ns).await;
    let message = match refused {
        Ok(()) => bail!("a pod started in an inject=required namespace with no operator"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        message.contains("portcullis.dev"),
        "the refusal should name the Portcullis webhook: {message}"
    );
    no_failures_since(client, fx, hammer, since, "operator scaled to 0").await?;
    let (passed, report) = portcullis_check().await?;
    ensure!(
        !passed,
        "check passed with the operator scaled to 0:\n{report}"
    );
    ensure!(
        report.to_lowercase().contains("operator"),
        "check should name the operator:\n{report}"
    );
    scale_operator(client, 2).await?;
    let (_, report) = portcullis_check().await?;
    eprintln!("check after scaling back:\n{report}");

    // 3. An upgrade to a new image tag.
    match fx.tier {
        Tier::Node => {
            let tag = std::env::var("PORTCULLIS_E2E_TAG").unwrap_or_else(|_| "dev".into());
            let upgraded = format!("{tag}-upgrade");
            retag_operator_image(
                &format!("localhost/portcullis-operator:{tag}"),
                &format!("localhost/portcullis-operator:{upgraded}"),
            )
            .await?;
            let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/portcullis");
            let since = jiff::Timestamp::now();
            helm(&[
                "upgrade",
                "portcullis",
                chart,
                "-n",
                &release_namespace(),
                "--reuse-values",
                "--set",
                &format!("operator.image.tag={upgraded}"),
                "--wait",
                "--timeout",
                "5m",
            ])
            .await?;
            operator_ready(client).await?;
            // The old pods may still be terminating for a moment.
            wait_for(
                "only upgraded operator pods",
                Duration::from_secs(120),
                || async {
                    let images: Vec<String> = operator_pods(client)
                        .await?
                        .iter()
                        .filter_map(|p| p.spec.as_ref()?.containers.first()?.image.clone())
                        .collect();
                    Ok(images.iter().all(|i| i.ends_with(&upgraded)).then_some(()))
                },
            )
            .await?;
            tokio::time::sleep(Duration::from_secs(3)).await;
            no_failures_since(client, fx, hammer, since, "helm upgrade").await?;
        }
        Tier::Kind => eprintln!("kind: the upgrade step needs a second image tag; skipped"),
    }

    // 4. Uninstall leaves nothing that could refuse pods.
    helm(&[
        "uninstall",
        "portcullis",
        "-n",
        &release_namespace(),
        "--wait",
    ])
    .await?;
    let mutating = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let validating = Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let left: Vec<String> = mutating
        .items
        .iter()
        .map(|w| w.name_any())
        .chain(validating.items.iter().map(|w| w.name_any()))
        .filter(|n| n.starts_with("portcullis"))
        .collect();
    ensure!(left.is_empty(), "helm uninstall left {left:?} behind");
    plain_pod_runs(client, fx.tier, &required_ns).await?;
    Ok(())
}
