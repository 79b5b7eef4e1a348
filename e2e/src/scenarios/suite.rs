//! The scenarios themselves, one function each (see the module docs of `scenarios`).

use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::Client;
use kube::api::Api;
use kube::core::{Selector, SelectorExt as _};
use serde_json::{Value, json};

use super::{
    APP_PORT, Cluster, api_key, app_pod, call, call_args, echoed, eventually, service_account,
    stored_pod, succeeded, tenant, tenant_namespace, until_served,
};

/// Revocation must reach the proxy within this (DESIGN.md §3)...
pub const REVOCATION_BUDGET: Duration = Duration::from_secs(1);
/// ...measured from just before `kubectl patch` starts to the first refusal the client
/// pod sees, asking every 50 ms: allow one interval plus a request on top.
pub const REVOCATION_SLACK: Duration = Duration::from_millis(250);

/// The trust domain of the chart's and the local tier's default install.
const TRUST_DOMAIN: &str = "cluster.local";

fn developer(scopes: &[&str]) -> Value {
    json!({"role": "Developer", "scopes": scopes})
}

/// Whether the tenant's `portcullis-inbound` NetworkPolicy in `ns` selects `pod`.
async fn selected_by_inbound_policy(client: &Client, ns: &str, pod: &str) -> Result<bool> {
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
    let policy = eventually(
        "the tenant's NetworkPolicy",
        Duration::from_secs(30),
        || async { Ok(policies.get_opt("portcullis-inbound").await?) },
    )
    .await?;
    let selector: Selector = policy
        .spec
        .unwrap_or_default()
        .pod_selector
        .unwrap_or_default()
        .try_into()?;
    let labels = stored_pod(client, ns, pod)
        .await?
        .metadata
        .labels
        .unwrap_or_default();
    Ok(selector.matches(&labels))
}

/// The webhook injected the init step first and the proxy before the app: as the first
/// container before native sidecars (1.29), else as an init container that restarts.
fn assert_injected(pod: &k8s_openapi::api::core::v1::Pod) -> Result<()> {
    let spec = pod.spec.clone().unwrap_or_default();
    let init: Vec<_> = spec.init_containers.iter().flatten().collect();
    ensure!(
        init.first().map(|c| c.name.as_str()) == Some("portcullis-init"),
        "the init step is not the first init container: {:?}",
        init.iter().map(|c| &c.name).collect::<Vec<_>>()
    );
    let native_sidecar = init
        .iter()
        .any(|c| c.name == "portcullis-proxy" && c.restart_policy.as_deref() == Some("Always"));
    let first_container = spec.containers.first().map(|c| c.name.as_str());
    ensure!(
        native_sidecar || first_container == Some("portcullis-proxy"),
        "the proxy does not start before the app: containers {:?}",
        spec.containers.iter().map(|c| &c.name).collect::<Vec<_>>()
    );
    Ok(())
}

/// An injected pod holds a certificate, a valid key crosses its proxy with the
/// principal and tenant the app sees (never the key), a missing key or scope is refused
/// with a JSON reason, and plain HTTP cannot reach the app past the proxy.
pub async fn injected_pod_gets_a_certificate_and_is_reached_only_through_the_proxy<C: Cluster>(
    cluster: &C,
) -> Result<()> {
    let client = cluster.client()?;
    let pods = tenant(cluster, "inject").await?;
    assert_injected(&stored_pod(&client, &pods.ns, "server").await?)?;

    // The proxy holds a certificate from the identity service (real projected token).
    let identity = cluster
        .pod_app_request(&pods.server, &["http://127.0.0.1:4191/identity".into()])
        .await?;
    ensure!(identity["status"] == 200, "{identity}");
    ensure!(
        identity["body"]
            .as_str()
            .unwrap_or_default()
            .contains("BEGIN CERTIFICATE"),
        "{identity}"
    );

    // A valid key crosses the proxy; the app sees the masked principal and the tenant,
    // never the key.
    let token = api_key(&client, &pods.ns, "ingest", developer(&["identify"])).await?;
    let answer = until_served(cluster, &pods, &token).await?;
    let seen = echoed(&answer)?;
    let principal = seen["headers"]["x-portcullis-principal"]
        .as_str()
        .unwrap_or_default();
    ensure!(principal.starts_with("key:ak_***"), "{seen}");
    ensure!(
        seen["headers"]["x-portcullis-tenant"] == pods.ns.as_str(),
        "the app did not see the tenant: {seen}"
    );
    ensure!(
        seen["headers"].get("authorization").is_none() && !seen.to_string().contains(&token),
        "the key reached the app: {seen}"
    );

    // No key: 401. A scope the key lacks: 403. Both say why, as JSON.
    let anonymous = call(cluster, &pods, "POST", "/v1/identify", None).await?;
    ensure!(anonymous["status"] == 401, "{anonymous}");
    let denied = call(cluster, &pods, "GET", "/v1/events/1", Some(&token)).await?;
    ensure!(denied["status"] == 403, "{denied}");
    let reason: Value = serde_json::from_str(denied["body"].as_str().unwrap_or_default())
        .with_context(|| format!("denials are JSON: {denied}"))?;
    ensure!(
        reason.get("error").is_some() && reason.get("reason").is_some(),
        "{reason}"
    );

    // Plain HTTP to the app port lands on the TLS proxy, not the app...
    let direct = cluster
        .pod_app_request(
            &pods.client,
            &[
                format!("http://{}:{APP_PORT}/v1/identify", cluster.ip(&pods.server)),
                "-X".into(),
                "POST".into(),
            ],
        )
        .await
        .unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
    ensure!(
        direct["status"] != 200,
        "the app answered a direct plain connection: {direct}"
    );
    // ...although the app listens there (seen from inside its own pod).
    let inside = cluster
        .pod_app_request(
            &pods.server,
            &[
                format!("http://127.0.0.1:{APP_PORT}/v1/identify"),
                "-X".into(),
                "POST".into(),
            ],
        )
        .await?;
    ensure!(inside["status"] == 200, "{inside}");
    // The namespace's NetworkPolicy (TCP only: every TCP port lands on the proxy)
    // selects the injected pod by the label the webhook set.
    ensure!(
        selected_by_inbound_policy(&client, &pods.ns, "server").await?,
        "the tenant's NetworkPolicy does not select the injected pod"
    );
    Ok(())
}

/// A key's rate limit answers 429 with Retry-After once spent, and its IP allowlist
/// refuses a client outside it while admitting one inside.
pub async fn rate_limit_and_ip_allowlist_are_enforced_per_key<C: Cluster>(
    cluster: &C,
) -> Result<()> {
    let client = cluster.client()?;
    let pods = tenant(cluster, "limits").await?;
    let client_ip = cluster.ip(&pods.client);
    let limited = api_key(
        &client,
        &pods.ns,
        "limited",
        json!({"role": "Developer", "scopes": ["identify"],
            "rateLimit": {"requests": 2, "per": "1m", "burst": 1}}),
    )
    .await?;
    let here = api_key(
        &client,
        &pods.ns,
        "here",
        json!({"role": "Developer", "scopes": ["identify"],
            "ipAllowlist": [format!("{client_ip}/32")]}),
    )
    .await?;
    let elsewhere = api_key(
        &client,
        &pods.ns,
        "elsewhere",
        json!({"role": "Developer", "scopes": ["identify"],
            "ipAllowlist": ["10.255.255.0/24", "2001:db8::/32"]}),
    )
    .await?;

    until_served(cluster, &pods, &here).await?;
    // The key is in the policy the proxy holds (the same update carried all three).
    let outside = call(cluster, &pods, "POST", "/v1/identify", Some(&elsewhere)).await?;
    ensure!(outside["status"] == 403, "{outside}");
    ensure!(
        outside["body"]
            .as_str()
            .unwrap_or_default()
            .contains("reason"),
        "{outside}"
    );

    let mut statuses = Vec::new();
    let mut limited_answer = None;
    for _ in 0..6 {
        let answer = call(cluster, &pods, "POST", "/v1/identify", Some(&limited)).await?;
        statuses.push(answer["status"].as_u64().unwrap_or_default());
        if answer["status"] == 429 {
            limited_answer = Some(answer);
            break;
        }
    }
    let limited_answer =
        limited_answer.with_context(|| format!("never rate limited: {statuses:?}"))?;
    ensure!(
        limited_answer["headers"].get("retry-after").is_some(),
        "a 429 without Retry-After: {limited_answer}"
    );
    ensure!(statuses.contains(&200), "{statuses:?}");
    Ok(())
}

/// `kubectl patch apikey ... revoked: true` is refused by the proxy within
/// [`REVOCATION_BUDGET`], timed by the client pod itself, and stays refused.
pub async fn revoked_key_is_refused_within_a_second_of_kubectl_patch<C: Cluster>(
    cluster: &C,
) -> Result<()> {
    let client = cluster.client()?;
    let pods = tenant(cluster, "revoke").await?;
    let token = api_key(&client, &pods.ns, "doomed", developer(&["identify"])).await?;
    until_served(cluster, &pods, &token).await?;

    // The client asks every 50 ms from before the patch until it is refused.
    let mut args = call_args(cluster, &pods, "POST", "/v1/identify", Some(&token));
    args.extend(
        [
            "--until-status",
            "401,403",
            "--every-ms",
            "50",
            "--for-seconds",
            "15",
        ]
        .map(String::from),
    );
    let watching = cluster.pod_app_request(&pods.client, &args);
    let patching = async {
        // Let the client start (an exec into a real pod takes a moment).
        tokio::time::sleep(Duration::from_secs(3)).await;
        let started = jiff::Timestamp::now();
        let output = cluster
            .kubectl(
                None,
                &[
                    "-n",
                    &pods.ns,
                    "patch",
                    "apikey",
                    "doomed",
                    "--type",
                    "merge",
                    "-p",
                    r#"{"spec":{"revoked":true}}"#,
                ],
            )
            .await?;
        succeeded(&output, "kubectl patch")?;
        Ok::<_, anyhow::Error>(started)
    };
    let (refused, patched) = tokio::join!(watching, patching);
    let (refused, patched) = (refused?, patched?);
    ensure!(
        refused["status"] == 401 || refused["status"] == 403,
        "the revoked key was never refused: {refused}"
    );
    ensure!(
        refused["before"]
            .as_array()
            .is_some_and(|before| before.contains(&json!(200))),
        "the client was not served before the patch, so nothing was timed: {refused}"
    );
    ensure!(
        refused["body"]
            .as_str()
            .unwrap_or_default()
            .contains("revoked"),
        "the refusal should say the key is revoked: {refused}"
    );
    let at = refused["at_ms"].as_i64().context("no at_ms")?;
    let delay = Duration::from_millis(u64::try_from(at - patched.as_millisecond()).unwrap_or(0));
    eprintln!("revocation reached the proxy {delay:?} after kubectl patch started");
    ensure!(
        delay <= REVOCATION_BUDGET + REVOCATION_SLACK,
        "the revoked key was still accepted {delay:?} after the patch (budget {REVOCATION_BUDGET:?})"
    );
    // And it stays refused.
    let again = call(cluster, &pods, "POST", "/v1/identify", Some(&token)).await?;
    ensure!(
        again["status"] == 401 || again["status"] == 403,
        "a revoked key was served again: {again}"
    );
    Ok(())
}

/// An injected app's plain HTTP call leaves through its proxy, which speaks mutual TLS
/// to the server's proxy: the app there sees the caller's SPIFFE ID, and no key.
pub async fn mtls_between_injected_pods_carries_the_spiffe_principal<C: Cluster>(
    cluster: &C,
) -> Result<()> {
    let pods = tenant(cluster, "mtls").await?;
    let caller = cluster
        .start_pod(
            &pods.ns,
            app_pod(&cluster.image(), "caller", "caller", APP_PORT, &[]),
        )
        .await?;
    let mut args = vec![format!(
        "http://{}:{APP_PORT}/v1/events/7",
        cluster.ip(&pods.server)
    )];
    args.extend(cluster.outbound_args());
    // The server's proxy may learn the caller's policy a moment after both run.
    let answer = eventually("an answer over mTLS", Duration::from_secs(60), || async {
        let answer = cluster.pod_app_request(&caller, &args).await?;
        Ok((answer["status"] == 200).then_some(answer))
    })
    .await?;
    let seen = echoed(&answer)?;
    let expected = format!("spiffe://{TRUST_DOMAIN}/ns/{}/sa/caller", pods.ns);
    ensure!(
        seen["headers"]["x-portcullis-principal"] == expected.as_str(),
        "the app did not see the caller's SPIFFE ID {expected}: {seen}"
    );
    Ok(())
}

/// Every request, allowed or denied, is an audit record in the proxy's hash chain,
/// which verifies; the key appears masked, never in full.
pub async fn audit_records_every_request_and_the_chain_verifies<C: Cluster>(
    cluster: &C,
) -> Result<()> {
    let client = cluster.client()?;
    let pods = tenant(cluster, "audit").await?;
    let token = api_key(&client, &pods.ns, "audited", developer(&["identify"])).await?;
    until_served(cluster, &pods, &token).await?;
    let denied = call(cluster, &pods, "GET", "/v1/events/1", Some(&token)).await?;
    ensure!(denied["status"] == 403, "{denied}");

    let masked = format!("ak_***{}", &token[token.len().saturating_sub(3)..]);
    let records = eventually(
        "audit records of both requests in the proxy's output",
        Duration::from_secs(30),
        || async {
            let output = cluster.proxy_output(&pods.server).await?;
            let lines: Vec<&str> = output
                .lines()
                .filter(|l| l.starts_with('{') && l.contains("\"prev_hash\""))
                .collect();
            let has = |action: &str, status: &str| {
                lines
                    .iter()
                    .any(|l| l.contains(action) && l.contains(&masked) && l.contains(status))
            };
            let both = has("api.identify", "200") && has("api.events", "403");
            Ok(both.then(|| lines.join("\n")))
        },
    )
    .await?;
    let report =
        portcullis_audit::verify::verify_jsonl(&records, "proxy stdout", Default::default())
            .map_err(|problem| anyhow::anyhow!("the audit chain does not verify: {problem}"))?;
    ensure!(report.records >= 2, "{report:?}");
    let output = cluster.proxy_output(&pods.server).await?;
    ensure!(!output.contains(&token), "the proxy printed a key");
    Ok(())
}

/// A pod annotated `portcullis.dev/inject: disabled` gets no proxy, is reached by plain
/// HTTP, and the tenant's NetworkPolicy leaves it alone.
pub async fn opt_out_annotation_is_respected<C: Cluster>(cluster: &C) -> Result<()> {
    let client = cluster.client()?;
    let pods = tenant(cluster, "optout").await?;
    let port = 8081;
    let plain = cluster
        .start_pod(
            &pods.ns,
            app_pod(
                &cluster.image(),
                "plain",
                "server",
                port,
                &[("portcullis.dev/inject", "disabled")],
            ),
        )
        .await?;
    let stored = stored_pod(&client, &pods.ns, "plain").await?;
    let spec = stored.spec.clone().unwrap_or_default();
    let names: Vec<&str> = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .map(|c| c.name.as_str())
        .collect();
    ensure!(names == ["app"], "an opted-out pod was injected: {names:?}");
    let url = format!("http://{}:{port}/anything", cluster.ip(&plain));
    let answer = eventually("the plain app", Duration::from_secs(30), || async {
        let answer = cluster
            .pod_app_request(&pods.client, std::slice::from_ref(&url))
            .await?;
        Ok((answer["status"] == 200).then_some(answer))
    })
    .await?;
    ensure!(
        echoed(&answer)?["headers"]
            .get("x-portcullis-principal")
            .is_none(),
        "{answer}"
    );
    ensure!(
        !selected_by_inbound_policy(&client, &pods.ns, "plain").await?,
        "the tenant's NetworkPolicy selects the opted-out pod"
    );
    Ok(())
}

/// A user whose Role grants `identify` asks `kubectl` for a key with more: the
/// validating webhook refuses with a message naming the scope and the Role; within the
/// Role's scopes the user succeeds, and that change is an admin audit record in an
/// operator's hash chain, which verifies.
pub async fn webhook_refuses_an_over_scoped_key_with_the_kubectl_message<C: Cluster>(
    cluster: &C,
) -> Result<()> {
    let client = cluster.client()?;
    let ns = tenant_namespace(&client, "webhook").await?;
    service_account(&client, &ns, "default").await?;
    let files = tempfile::tempdir()?;
    let manifest_file = |name: &str, manifest: Value| -> Result<String> {
        let path = files.path().join(name);
        std::fs::write(&path, manifest.to_string())?;
        Ok(path.to_string_lossy().into_owned())
    };
    let role = manifest_file(
        "role.json",
        json!({"apiVersion": "portcullis.dev/v1alpha1", "kind": "Role",
            "metadata": {"name": "reader", "namespace": ns},
            "spec": {"scopes": ["identify"], "permissions": ["keys:create", "keys:read"],
                     "subjects": [{"kind": "User", "name": "alice"}]}}),
    )?;
    succeeded(
        &cluster.kubectl(None, &["apply", "-f", &role]).await?,
        "kubectl apply the Role",
    )?;

    // alice gets kubectl access from the Role (RBAC the operator writes), then asks for
    // more scopes than it grants.
    eventually("alice's RBAC", Duration::from_secs(60), || async {
        let output = cluster
            .kubectl(
                Some("alice"),
                &[
                    "auth",
                    "can-i",
                    "create",
                    "apikeys.portcullis.dev",
                    "-n",
                    &ns,
                ],
            )
            .await?;
        Ok((String::from_utf8_lossy(&output.stdout).trim() == "yes").then_some(()))
    })
    .await?;
    let greedy = manifest_file(
        "greedy.json",
        json!({"apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiKey",
            "metadata": {"name": "greedy", "namespace": ns},
            "spec": {"role": "reader", "scopes": ["identify", "events"]}}),
    )?;
    let refused = cluster
        .kubectl(Some("alice"), &["create", "-f", &greedy])
        .await?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    ensure!(!refused.status.success(), "an over-scoped key was admitted");
    ensure!(
        stderr.contains(r#"admission webhook "validate.portcullis.dev" denied the request"#),
        "{stderr}"
    );
    ensure!(
        stderr.contains("\"events\"") && stderr.contains("reader"),
        "the refusal should name the scope and the Role: {stderr}"
    );
    eprintln!("kubectl said: {stderr}");

    // Within the Role's scopes alice succeeds.
    let modest = manifest_file(
        "modest.json",
        json!({"apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiKey",
            "metadata": {"name": "modest", "namespace": ns},
            "spec": {"role": "reader", "scopes": ["identify"]}}),
    )?;
    succeeded(
        &cluster
            .kubectl(Some("alice"), &["create", "-f", &modest])
            .await?,
        "alice creating a key within her Role",
    )?;

    // The admitted change is an admin audit record in one replica's hash chain (the
    // whole output: a chain starts at its first line).
    let object = format!("{ns}/modest");
    let chain = eventually(
        "the admin audit record",
        Duration::from_secs(30),
        || async {
            let outputs = cluster.operator_outputs().await?;
            Ok(outputs.into_iter().find_map(|output| {
                let records: Vec<&str> = output
                    .lines()
                    .filter(|l| l.starts_with('{') && l.contains("\"prev_hash\""))
                    .collect();
                let found = records.iter().any(|l| {
                    l.contains("\"action\":\"admin.key.create\"")
                        && l.contains("\"principal\":\"user:alice\"")
                        && l.contains(&object)
                });
                found.then(|| records.join("\n"))
            }))
        },
    )
    .await?;
    if let Err(problem) =
        portcullis_audit::verify::verify_jsonl(&chain, "operator stdout", Default::default())
    {
        bail!("the admin audit chain does not verify: {problem}");
    }
    Ok(())
}
