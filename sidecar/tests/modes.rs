//! Every inbound mode: who gets through, who gets a 401 and which reason, and what the
//! app sees (principal, tenant, scopes; never the key; never client-sent X-Portcullis-*).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use portcullis_crds::InboundMode;
use support::{Harness, Identity, Options, logs};

const PEER: &str = "spiffe://test.local/ns/acme/sa/caller";

async fn harness(mode: InboundMode) -> Harness {
    Harness::start(Options {
        mode,
        ..Options::default()
    })
    .await
}

#[tokio::test]
async fn mtls_mode_needs_a_spiffe_client_certificate() {
    let h = harness(InboundMode::Mtls).await;
    let peer = h.client(Identity::Certificate(h.ca.client(PEER)));
    let ok = peer.get("/anything", &[]).await;
    assert_eq!(ok.status, 200);
    assert_eq!(
        ok.echoed_header("x-portcullis-principal").as_deref(),
        Some(PEER)
    );
    assert_eq!(
        ok.echoed_header("x-portcullis-tenant").as_deref(),
        Some("acme")
    );
    assert_eq!(ok.echoed_header("x-portcullis-scopes"), None);

    let anonymous = h.client(Identity::Anonymous);
    let denied = anonymous
        .get("/v1/events/1", &[("x-api-key", h.token("events"))])
        .await;
    assert_eq!(
        (denied.status, denied.reason().as_str()),
        (401, "client_certificate_required")
    );
    assert!(
        denied.json()["error"]
            .as_str()
            .unwrap()
            .contains("client certificate")
    );

    let no_spiffe = h.client(Identity::Certificate(h.ca.client_without_spiffe()));
    let denied = no_spiffe.get("/x", &[]).await;
    assert_eq!(
        (denied.status, denied.reason().as_str()),
        (401, "no_workload_identity")
    );
    assert_eq!(h.denials("client_certificate_required", 401), 1.0);
    assert_eq!(h.denials("no_workload_identity", 401), 1.0);
    logs::assert_not_logged(h.token("events"));
}

#[tokio::test]
async fn apikey_mode_needs_a_key_even_with_a_certificate() {
    let h = harness(InboundMode::Apikey).await;
    let peer = h.client(Identity::Certificate(h.ca.client(PEER)));
    let denied = peer.get("/v1/events/1", &[]).await;
    assert_eq!(
        (denied.status, denied.reason().as_str()),
        (401, "api_key_required")
    );
    let anonymous = h.client(Identity::Anonymous);
    let bearer = format!("Bearer {}", h.token("events"));
    let ok = anonymous
        .get("/v1/events/1", &[("authorization", &bearer)])
        .await;
    assert_eq!(ok.status, 200);
    let masked = h.tokens["events"].masked();
    assert_eq!(
        ok.echoed_header("x-portcullis-principal"),
        Some(format!("key:{masked}"))
    );
    assert_eq!(
        ok.echoed_header("x-portcullis-scopes").as_deref(),
        Some("events")
    );
    assert_eq!(
        ok.echoed_header("authorization"),
        None,
        "the key must not reach the app"
    );
    assert!(!String::from_utf8_lossy(&ok.body).contains(h.token("events")));
    assert_eq!(ok.headers["ratelimit-limit"], "100000");
    logs::assert_not_logged(h.token("events"));
}

#[tokio::test]
async fn mtls_or_apikey_accepts_either_and_refuses_neither() {
    let h = harness(InboundMode::MtlsOrApikey).await;
    let anonymous = h.client(Identity::Anonymous);
    let denied = anonymous.get("/v1/events/1", &[]).await;
    assert_eq!(
        (denied.status, denied.reason().as_str()),
        (401, "credentials_required")
    );
    let ok = anonymous
        .get("/v1/events/1", &[("x-api-key", h.token("events"))])
        .await;
    assert_eq!(ok.status, 200);
    assert_eq!(
        ok.echoed_header("x-api-key"),
        None,
        "the key must not reach the app"
    );
    let peer = h.client(Identity::Certificate(h.ca.client(PEER)));
    let ok = peer.get("/unmapped/route", &[]).await;
    assert_eq!(
        ok.status, 200,
        "mTLS peers may call unmapped routes where peersNeedMappedRoute is false"
    );
    // A key sent along with a certificate must still be valid, and then decides scopes.
    let wrong_scope = peer
        .get("/v1/events/1", &[("x-api-key", h.token("identify"))])
        .await;
    assert_eq!(
        (wrong_scope.status, wrong_scope.reason().as_str()),
        (403, "missing_scope")
    );
    logs::assert_not_logged(h.token("events"));
    logs::assert_not_logged(h.token("identify"));
}

#[tokio::test]
async fn mtls_and_apikey_needs_both() {
    let h = harness(InboundMode::MtlsAndApikey).await;
    let peer = h.client(Identity::Certificate(h.ca.client(PEER)));
    let anonymous = h.client(Identity::Anonymous);
    let no_key = peer.get("/v1/events/1", &[]).await;
    assert_eq!(
        (no_key.status, no_key.reason().as_str()),
        (401, "api_key_required")
    );
    let no_cert = anonymous
        .get("/v1/events/1", &[("x-api-key", h.token("events"))])
        .await;
    assert_eq!(
        (no_cert.status, no_cert.reason().as_str()),
        (401, "client_certificate_required")
    );
    let ok = peer
        .get("/v1/events/1", &[("x-api-key", h.token("events"))])
        .await;
    assert_eq!(ok.status, 200);
    assert!(
        ok.echoed_header("x-portcullis-principal")
            .unwrap()
            .starts_with("key:ak_***")
    );
}

#[tokio::test]
async fn spoofed_portcullis_headers_are_replaced_before_the_app() {
    let h = harness(InboundMode::MtlsOrApikey).await;
    let client = h.client(Identity::Anonymous);
    let ok = client
        .get(
            "/v1/signals/x",
            &[
                ("x-api-key", h.token("signals")),
                ("x-portcullis-principal", "spiffe://evil/ns/x/sa/admin"),
                ("x-portcullis-tenant", "other"),
                ("x-portcullis-scopes", "identify,events,signals"),
                ("x-portcullis-admin", "true"),
            ],
        )
        .await;
    assert_eq!(ok.status, 200);
    assert!(
        ok.echoed_header("x-portcullis-principal")
            .unwrap()
            .starts_with("key:ak_***")
    );
    assert_eq!(
        ok.echoed_header("x-portcullis-tenant").as_deref(),
        Some("acme")
    );
    assert_eq!(
        ok.echoed_header("x-portcullis-scopes").as_deref(),
        Some("signals")
    );
    assert_eq!(ok.echoed_header("x-portcullis-admin"), None);
}

#[tokio::test]
async fn restricted_tenants_need_both_whatever_the_configured_mode() {
    let h = Harness::start(Options {
        mode: InboundMode::MtlsOrApikey,
        classification: portcullis_crds::DataClassification::Restricted,
        ..Options::default()
    })
    .await;
    let anonymous = h.client(Identity::Anonymous);
    let key_only = anonymous
        .get("/v1/events/1", &[("x-api-key", h.token("events"))])
        .await;
    assert_eq!(
        (key_only.status, key_only.reason().as_str()),
        (401, "client_certificate_required")
    );
    let peer = h.client(Identity::Certificate(h.ca.client(PEER)));
    assert_eq!(
        peer.get("/v1/events/1", &[]).await.reason(),
        "api_key_required"
    );
    assert_eq!(
        peer.get("/v1/events/1", &[("x-api-key", h.token("events"))])
            .await
            .status,
        200
    );
}
