//! The injected-pod proxy end to end, in process: started by the same function
//! `run --config-from-env` uses, against a fake operator (identity service and mTLS
//! policy server speaking the real wire formats).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use portcullis_audit::{
    DataKey, Entry, KeyRing, VerifyOptions,
    files::{ExportFilter, export_path, verify_path},
};
use portcullis_crds::DataClassification;
use portcullis_sidecar::{audit::AuditHook, run::proxy::RunningProxy};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use support::{
    admin_get,
    cluster::{
        self, TENANT, bundle, echo_app, environment, inbound_request, mesh_client_config,
        outbound_request, stop, wait_ready,
    },
    operator::FakeOperator,
    wait_until,
};
use tokio_util::sync::CancellationToken;

const WORKLOAD: &str = "spiffe://cluster.local/ns/acme-prod/sa/api";

#[tokio::test]
async fn ready_after_certificate_and_policy_then_serves_rotates_and_stays_fail_static() {
    let op = FakeOperator::start("cluster.local", TENANT).await;
    op.state
        .identity_down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    *op.state.renew_after.lock().unwrap() = Duration::from_secs(1);
    let (app, _app_stop) = echo_app().await;
    let dir = tempfile::tempdir().unwrap();
    let vars = environment(
        &op,
        dir.path(),
        "api-0",
        "acme-prod",
        "api",
        Some(app.port()),
    );
    let (proxy, _stdout) = cluster::start(cluster::config(&vars)).await;
    let store = proxy.certificates.clone().unwrap();

    tokio::time::sleep(Duration::from_millis(300)).await;
    let ready = admin_get(proxy.admin_addr, "/ready").await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(ready.contains(r#""certificate":false"#), "{ready}");
    assert!(
        admin_get(proxy.admin_addr, "/identity")
            .await
            .starts_with("HTTP/1.1 503")
    );

    op.state
        .identity_down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    wait_until(|| store.is_ready()).await;
    let ready = admin_get(proxy.admin_addr, "/ready").await;
    assert!(ready.starts_with("HTTP/1.1 503"), "no policy yet: {ready}");
    assert!(ready.contains(r#""certificate":true"#), "{ready}");
    assert!(ready.contains(r#""policyVersion":null"#), "{ready}");

    let (policy, tokens) = bundle(1, DataClassification::Internal);
    op.publish(policy);
    wait_ready(&proxy).await;

    // /identity: the chain the proxy presents, PEM, for `identity inspect --admin-url`.
    let identity = admin_get(proxy.admin_addr, "/identity").await;
    assert!(identity.starts_with("HTTP/1.1 200"), "{identity}");
    let pem = &identity[identity.find("-----BEGIN").unwrap()..];
    let chain: Vec<CertificateDer> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    assert_eq!(chain.len(), 2, "leaf and intermediate");
    let facts = portcullis_sidecar::tls::peer::leaf_facts(&chain[0]).unwrap();
    assert_eq!(facts.workload.unwrap().to_string(), WORKLOAD);
    assert_eq!(facts.tenant.unwrap().tenant(), TENANT);
    assert!(!identity.contains("PRIVATE KEY"));

    let client = mesh_client_config(&op);
    let key = tokens["events"].expose_secret();
    let reply = inbound_request(
        &client,
        proxy.inbound_addr,
        "GET",
        "/v1/events/1",
        &[("x-api-key", key)],
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.echoed_header("x-portcullis-tenant").as_deref(),
        Some(TENANT)
    );

    // Rotation with traffic flowing: every request succeeds across two renewals.
    let first = *store.subscribe().borrow();
    let mut requests = 0;
    for _ in 0..300 {
        let reply = inbound_request(
            &client,
            proxy.inbound_addr,
            "GET",
            "/v1/events/2",
            &[("x-api-key", key)],
        )
        .await
        .unwrap();
        assert_eq!(reply.status, 200);
        requests += 1;
        if *store.subscribe().borrow() >= first + 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        *store.subscribe().borrow() >= first + 2,
        "renewed twice while serving"
    );
    assert!(op.issued() >= 3);
    assert!(requests > 2);

    // The operator goes away: the last good policy and certificate stay in force.
    op.stop().await;
    for _ in 0..10 {
        let reply = inbound_request(
            &client,
            proxy.inbound_addr,
            "GET",
            "/v1/events/3",
            &[("x-api-key", key)],
        )
        .await
        .unwrap();
        assert_eq!(reply.status, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        admin_get(proxy.admin_addr, "/ready")
            .await
            .starts_with("HTTP/1.1 200"),
        "fail-static stays ready"
    );
    stop(proxy).await;
}

#[tokio::test]
async fn audit_is_chained_signed_masked_and_encrypted() {
    let op = FakeOperator::start("cluster.local", TENANT).await;
    op.set_audit_key(1, [7u8; 32]);
    let (policy, tokens) = bundle(1, DataClassification::Internal);
    op.publish(policy);
    let (app, _app_stop) = echo_app().await;
    let dir = tempfile::tempdir().unwrap();
    let vars = environment(
        &op,
        dir.path(),
        "api-0",
        "acme-prod",
        "api",
        Some(app.port()),
    );
    let (proxy, stdout) = cluster::start(cluster::config(&vars)).await;
    wait_ready(&proxy).await;

    let client = mesh_client_config(&op);
    let (events, identify) = (
        tokens["events"].expose_secret(),
        tokens["identify"].expose_secret(),
    );
    let bearer = format!("Bearer {}", tokens["signals"].expose_secret());
    type Call<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16);
    let calls: [Call; 4] = [
        (
            "/v1/events/1?token=SECRET-QUERY",
            vec![("x-api-key", events)],
            200,
        ),
        ("/v1/events/2", vec![("x-api-key", identify)], 403),
        ("/v1/signals", vec![], 401),
        ("/v1/signals", vec![("authorization", bearer.as_str())], 200),
    ];
    for (path, headers, status) in &calls {
        let reply = inbound_request(&client, proxy.inbound_addr, "GET", path, headers)
            .await
            .unwrap();
        assert_eq!(reply.status, *status, "{path}");
    }
    let trail = proxy.audit.clone().unwrap();
    wait_until(|| {
        trail
            .writer()
            .is_some_and(|w| w.stats().records_written >= 4)
    })
    .await;
    assert!(
        op.state
            .audit_key_requests
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1
    );
    stop(proxy).await;

    // stdout: JSON lines, one record per request, chain intact, checkpoint signed with
    // the workload key and naming the workload.
    let text = stdout.text();
    let lines_path = dir.path().join("stdout.jsonl");
    std::fs::write(&lines_path, &text).unwrap();
    let report = verify_path(&lines_path, None, VerifyOptions::default(), |_| {})
        .unwrap()
        .unwrap();
    assert_eq!(report.records, 4);
    assert!(report.checkpoints >= 1);
    let entries: Vec<Entry> = text
        .lines()
        .map(|line| Entry::from_json_line(line).unwrap())
        .collect();
    let records: Vec<_> = entries
        .iter()
        .filter_map(|e| match e {
            Entry::Record(r) => Some(r),
            Entry::Checkpoint(_) => None,
        })
        .collect();
    assert_eq!(records[0].action, "api.events");
    assert_eq!(records[0].path, "/v1/events/1", "no query string");
    assert_eq!(
        records[0].principal,
        format!("key:{}", tokens["events"].masked())
    );
    assert_eq!(records[0].pod, "api-0");
    assert_eq!(records[0].tenant, TENANT);
    assert_eq!(records[0].client_ip.unwrap().to_string(), "127.0.0.1");
    assert_eq!(
        (records[1].status, records[1].reason.as_str()),
        (403, "missing_scope")
    );
    assert_eq!(
        (records[2].status, records[2].principal.as_str()),
        (401, "anonymous")
    );
    assert_eq!(
        records[3].principal,
        format!("key:{}", tokens["signals"].masked())
    );
    let checkpoint = entries
        .iter()
        .find_map(|e| match e {
            Entry::Checkpoint(c) => Some(c),
            Entry::Record(_) => None,
        })
        .unwrap();
    assert_eq!(checkpoint.signer.spiffe_id.as_deref(), Some(WORKLOAD));
    assert!(checkpoint.signer.certificate.is_some());
    for token in tokens.values() {
        assert!(
            !text.contains(token.expose_secret()),
            "no token text on stdout"
        );
    }
    assert!(!text.contains("SECRET-QUERY"));

    // The encrypted file sink holds the same chain, readable with the tenant's key.
    let audit_dir = dir.path().join("data").join("audit");
    let ring = KeyRing::from_keys([DataKey::new(1, [7u8; 32])]);
    let report = verify_path(&audit_dir, Some(&ring), VerifyOptions::default(), |_| {})
        .unwrap()
        .unwrap();
    assert_eq!(report.records, 4);
    let mut exported = Vec::new();
    export_path(
        &audit_dir,
        Some(&ring),
        &ExportFilter::default(),
        |line, _| {
            exported.push(line.to_owned());
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(exported.len(), 4);
    for token in tokens.values() {
        assert!(exported.iter().all(|l| !l.contains(token.expose_secret())));
    }
    // Nothing secret reached the logs either: keys, the projected token, the data key.
    for token in tokens.values() {
        support::logs::assert_not_logged(token.expose_secret());
    }
    support::logs::assert_not_logged(support::operator::TOKEN);
    use base64::Engine as _;
    support::logs::assert_not_logged(&base64::engine::general_purpose::STANDARD.encode([7u8; 32]));
    for segment in std::fs::read_dir(&audit_dir).unwrap() {
        let bytes = std::fs::read(segment.unwrap().path()).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains("api.events"),
            "segments are encrypted"
        );
    }
}

#[tokio::test]
async fn fail_closed_tenant_refuses_while_the_audit_sink_fails() {
    let op = FakeOperator::start("cluster.local", TENANT).await;
    // A fail-closed tenant's pod serves only with its data key (issue 15).
    op.set_audit_key(1, [7u8; 32]);
    let (policy, tokens) = bundle(1, DataClassification::Confidential);
    op.publish(policy);
    let (app, _app_stop) = echo_app().await;
    let dir = tempfile::tempdir().unwrap();
    let vars = environment(
        &op,
        dir.path(),
        "api-0",
        "acme-prod",
        "api",
        Some(app.port()),
    );
    let (proxy, stdout) = cluster::start(cluster::config(&vars)).await;
    wait_ready(&proxy).await;
    let trail = proxy.audit.clone().unwrap();
    let client = mesh_client_config(&op);
    let headers = [("x-api-key", tokens["events"].expose_secret())];
    let get = || inbound_request(&client, proxy.inbound_addr, "GET", "/v1/events/1", &headers);

    assert_eq!(get().await.unwrap().status, 200);
    wait_until(|| {
        trail
            .writer()
            .is_some_and(|w| w.stats().records_written >= 1)
    })
    .await;
    stdout.set_failing(true);
    // This record is queued, then the sink refuses it.
    assert_eq!(get().await.unwrap().status, 200);
    wait_until(|| !trail.available()).await;
    let refused = get().await.unwrap();
    assert_eq!(
        (refused.status, refused.reason().as_str()),
        (503, "audit_unavailable")
    );

    stdout.set_failing(false);
    wait_until(|| trail.available()).await;
    assert_eq!(get().await.unwrap().status, 200);
    stop(proxy).await;

    let lines_path = dir.path().join("stdout.jsonl");
    std::fs::write(&lines_path, stdout.text()).unwrap();
    let report = verify_path(&lines_path, None, VerifyOptions::default(), |_| {})
        .unwrap()
        .unwrap();
    assert_eq!(report.records, 4, "nothing lost while the sink was down");
}

#[tokio::test]
async fn outbound_carries_the_workload_identity_to_the_peer_proxy() {
    let op = FakeOperator::start("cluster.local", TENANT).await;
    let (policy, _tokens) = bundle(1, DataClassification::Internal);
    op.publish(policy);
    let (app, _app_stop) = echo_app().await;
    let dir_b = tempfile::tempdir().unwrap();
    let vars_b = environment(
        &op,
        dir_b.path(),
        "api-0",
        "acme-prod",
        "api",
        Some(app.port()),
    );
    let (server, _) = cluster::start(cluster::config(&vars_b)).await;
    let dir_a = tempfile::tempdir().unwrap();
    let mut vars_a = environment(&op, dir_a.path(), "job-0", "acme-jobs", "client", None);
    // In the test the peer proxy is not on 4143: keep the port the app names.
    vars_a.insert("PORTCULLIS_OUTBOUND_KEEP_PORT".into(), "true".into());
    let (client, _) = cluster::start(cluster::config(&vars_a)).await;
    wait_ready(&server).await;
    wait_ready(&client).await;
    let outbound = client.outbound_addr.unwrap();

    let reply = outbound_request(outbound, server.inbound_addr, "/v1/events/1?x=1", &[]).await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(
        reply.echoed_header("x-portcullis-principal").as_deref(),
        Some("spiffe://cluster.local/ns/acme-jobs/sa/client")
    );
    assert_eq!(reply.json()["path"], "/v1/events/1");
    assert_eq!(
        reply.echoed_header("host").as_deref(),
        Some(server.inbound_addr.to_string().as_str()),
        "the app's authority reaches the peer's app"
    );
    assert!(
        reply
            .echoed_header("x-portcullis-expect-identity")
            .is_none()
    );

    let pinned = outbound_request(
        outbound,
        server.inbound_addr,
        "/v1/events/1",
        &[("x-portcullis-expect-identity", WORKLOAD)],
    )
    .await;
    assert_eq!(pinned.status, 200);

    let other = "spiffe://cluster.local/ns/acme-prod/sa/other";
    let mismatch = outbound_request(
        outbound,
        server.inbound_addr,
        "/v1/events/1",
        &[("x-portcullis-expect-identity", other)],
    )
    .await;
    assert_eq!(
        (mismatch.status, mismatch.reason().as_str()),
        (502, "peer_identity_mismatch")
    );
    let error = mismatch.json()["error"].as_str().unwrap().to_owned();
    assert!(error.contains(other) && error.contains(WORKLOAD), "{error}");

    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let unreachable = outbound_request(outbound, closed, "/", &[]).await;
    assert_eq!(
        (unreachable.status, unreachable.reason().as_str()),
        (502, "peer_unreachable")
    );
    assert!(
        client
            .metrics
            .sample("portcullis_outbound_requests_total{reason=\"peer_identity_mismatch\",status=\"502\"}")
            .unwrap_or(0.0)
            >= 1.0
    );
    stop(client).await;
    stop(server).await;
}

/// A pod of a tenant of `classification` whose operator has no data key to hand out
/// (yet), and a GET with a key the tenant knows.
struct KeylessPod {
    op: FakeOperator,
    proxy: RunningProxy,
    key: String,
    _app_stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl KeylessPod {
    async fn start(classification: DataClassification) -> Self {
        let op = FakeOperator::start("cluster.local", TENANT).await;
        let (policy, tokens) = bundle(1, classification);
        op.publish(policy);
        let (app, app_stop) = echo_app().await;
        let dir = tempfile::tempdir().unwrap();
        let vars = environment(
            &op,
            dir.path(),
            "api-0",
            "acme-prod",
            "api",
            Some(app.port()),
        );
        let (proxy, _stdout) = cluster::start(cluster::config(&vars)).await;
        Self {
            op,
            proxy,
            key: tokens["events"].expose_secret().to_owned(),
            _app_stop: app_stop,
            _dir: dir,
        }
    }

    async fn get(&self) -> support::Reply {
        let headers = [("x-api-key", self.key.as_str())];
        inbound_request(
            &mesh_client_config(&self.op),
            self.proxy.inbound_addr,
            "GET",
            "/v1/events/1",
            &headers,
        )
        .await
        .unwrap()
    }

    fn key_missing(&self) -> Option<f64> {
        self.proxy
            .metrics
            .sample("portcullis_audit_data_key_missing")
    }
}

#[tokio::test]
async fn a_confidential_pod_without_its_data_key_refuses_and_says_so_until_the_key_arrives() {
    let pod = KeylessPod::start(DataClassification::Confidential).await;
    // Asked for the key and waited past the 2 s the test config gives it.
    wait_until(|| {
        pod.op
            .state
            .audit_key_requests
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let ready = admin_get(pod.proxy.admin_addr, "/ready").await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(
        ready.contains(r#""auditReason":"waiting_for_data_key""#),
        "{ready}"
    );
    assert_eq!(pod.key_missing(), Some(1.0));
    let refused = pod.get().await;
    assert_eq!(
        (refused.status, refused.reason().as_str()),
        (503, "audit_unavailable")
    );

    // The key arrives: ready, serving, and the metric clears.
    pod.op.set_audit_key(1, [7u8; 32]);
    wait_ready(&pod.proxy).await;
    assert_eq!(pod.get().await.status, 200);
    assert_eq!(pod.key_missing(), Some(0.0));
    stop(pod.proxy).await;
}

#[tokio::test]
async fn an_internal_pod_without_its_data_key_serves_stdout_only_and_reports_it() {
    let pod = KeylessPod::start(DataClassification::Internal).await;
    wait_ready(&pod.proxy).await;
    assert_eq!(pod.get().await.status, 200);
    assert_eq!(pod.key_missing(), Some(1.0));
    stop(pod.proxy).await;
}
