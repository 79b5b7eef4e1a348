//! The policy stream client against an in-process server speaking the operator's
//! format: first bundle, updates, fail-static while the server is away, reconnect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{sync::atomic::Ordering, time::Duration};

use support::{Harness, Identity, Options, admin_get, wait_until};

#[tokio::test]
async fn not_ready_until_the_first_bundle_then_follows_updates() {
    let mut h = Harness::start(Options {
        policy_stream: true,
        stream_server_down: true,
        ..Options::default()
    })
    .await;
    let client = h.client(Identity::Anonymous);
    let key = h.token("events").to_owned();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        admin_get(h.proxy.admin_addr, "/ready")
            .await
            .starts_with("HTTP/1.1 503")
    );
    let refused = client.get("/v1/events/1", &[("x-api-key", &key)]).await;
    assert_eq!(
        (refused.status, refused.reason().as_str()),
        (503, "policy_unavailable")
    );

    h.policy_server.as_mut().unwrap().restart().await;
    wait_until(|| h.proxy.policy.is_ready()).await;
    assert!(
        admin_get(h.proxy.admin_addr, "/ready")
            .await
            .starts_with("HTTP/1.1 200")
    );
    assert_eq!(
        client
            .get("/v1/events/1", &[("x-api-key", &key)])
            .await
            .status,
        200
    );

    let id = h.tokens["events"].key_id().clone();
    h.update_policy(|b| b.keys.get_mut(&id).unwrap().revoked = true)
        .await;
    assert_eq!(
        client
            .get("/v1/events/1", &[("x-api-key", &key)])
            .await
            .reason(),
        "key_revoked"
    );
}

#[tokio::test]
async fn fail_static_while_the_server_is_away_then_picks_up_new_bundles() {
    let mut h = Harness::start(Options {
        policy_stream: true,
        ..Options::default()
    })
    .await;
    wait_until(|| h.proxy.policy.is_ready()).await;
    let client = h.client(Identity::Anonymous);
    let key = h.token("events").to_owned();
    assert_eq!(
        client
            .get("/v1/events/1", &[("x-api-key", &key)])
            .await
            .status,
        200
    );

    h.policy_server.as_mut().unwrap().stop().await;
    // Bounded: 20 requests over ~1 s with the operator gone.
    for _ in 0..20 {
        assert_eq!(
            client
                .get("/v1/events/1", &[("x-api-key", &key)])
                .await
                .status,
            200
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        admin_get(h.proxy.admin_addr, "/ready")
            .await
            .starts_with("HTTP/1.1 200"),
        "fail-static stays ready"
    );
    assert_eq!(h.proxy.policy.load().unwrap().version, 1);

    // The server comes back with a newer bundle that revokes the key.
    let id = h.tokens["events"].key_id().clone();
    let mut next = h.bundle.clone();
    next.version = 2;
    next.keys.get_mut(&id).unwrap().revoked = true;
    h.bundle = next.clone();
    let server = h.policy_server.as_mut().unwrap();
    server.publish(next);
    server.restart().await;
    wait_until(|| h.proxy.policy.load().is_some_and(|b| b.version == 2)).await;
    assert_eq!(
        client
            .get("/v1/events/1", &[("x-api-key", &key)])
            .await
            .reason(),
        "key_revoked"
    );
    assert!(
        h.policy_server
            .as_ref()
            .unwrap()
            .connections
            .load(Ordering::SeqCst)
            >= 2,
        "the client reconnected"
    );
    assert!(
        h.metric("portcullis_policy_updates_total{source=\"stream\",result=\"installed\"}") >= 2.0
    );
}
