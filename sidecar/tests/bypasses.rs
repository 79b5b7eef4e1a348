//! Issue 15, the request path: each test is one attack an adversarial review made work
//! against the proxy (paths that climb out of a key's scope, spoofed identity headers,
//! unbounded bodies and header lists, connections that never go idle, one client
//! holding every slot). The echo app is the real upstream: it reports the path, query
//! and headers it received.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    net::{IpAddr, Ipv4Addr},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::Frame;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use portcullis_sidecar::{
    audit::{AuditHook, AuditRefused, Decision, RequestOutcome},
    config::Limits,
};
use support::{Harness, Identity, Options, client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Keeps every audit record.
#[derive(Default)]
struct Records(Mutex<Vec<RequestOutcome>>);

impl AuditHook for Records {
    fn record(&self, event: RequestOutcome) -> Result<(), AuditRefused> {
        self.0.lock().unwrap().push(event);
        Ok(())
    }

    fn available(&self) -> bool {
        true
    }
}

impl Records {
    fn last(&self) -> RequestOutcome {
        self.0.lock().unwrap().last().cloned().expect("a record")
    }
}

async fn harness(limits: impl FnOnce(&mut Limits)) -> (Harness, Arc<Records>) {
    let records = Arc::new(Records::default());
    let mut options = Options {
        audit: records.clone(),
        ..Options::default()
    };
    limits(&mut options.limits);
    (Harness::start(options).await, records)
}

fn assert_denied(reply: &client::Reply, status: u16, reason: &str, path: &str) {
    assert_eq!(
        (reply.status, reply.reason().as_str()),
        (status, reason),
        "{path} must be refused with {status} {reason}, got {} {}",
        reply.status,
        String::from_utf8_lossy(&reply.body)
    );
}

/// `path` is refused with 400 `unsafe_path` and an error naming `says`.
async fn assert_unsafe(client: &support::TestClient, key: &str, path: &str, says: &str) {
    let reply = client.get(path, &[("x-api-key", key)]).await;
    assert_denied(&reply, 400, "unsafe_path", path);
    let error = reply.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(error.contains(says), "{path}: {error}");
}

#[tokio::test]
async fn dot_segments_cannot_escape_the_scoped_prefix() {
    let (h, records) = harness(|_| {}).await;
    let key = h.token("events");
    let path = "/v1/events/../../admin/secrets.txt";
    let reply = h
        .client(Identity::Anonymous)
        .get(path, &[("x-api-key", key)])
        .await;
    assert_denied(&reply, 403, "no_scope_for_route", path);
    let record = records.last();
    assert_eq!(record.path, "/admin/secrets.txt");
    assert_eq!(record.action, "api.unmapped");
    assert_eq!(record.decision, Decision::Deny);
}

#[tokio::test]
async fn encoded_slashes_cannot_escape_the_scoped_prefix() {
    let (h, records) = harness(|_| {}).await;
    let key = h.token("events");
    let client = h.client(Identity::Anonymous);
    for path in [
        "/v1/events/..%2f..%2fadmin%2fsecrets.txt",
        "/v1/events/..%2F..%2Fadmin%2Fsecrets.txt",
        "/v1/events/..%5c..%5cadmin%5csecrets.txt",
        "/v1/events/%2e%2e/%2E%2E/admin/secrets.txt",
    ] {
        assert_unsafe(&client, key, path, "encoded").await;
        let record = records.last();
        assert_eq!(record.decision, Decision::Deny);
        assert_eq!(record.reason, "unsafe_path");
    }
}

#[tokio::test]
async fn dot_segments_cannot_reach_another_scope() {
    let (h, records) = harness(|_| {}).await;
    let client = h.client(Identity::Anonymous);
    let path = "/v1/events/../signals";
    let reply = client.get(path, &[("x-api-key", h.token("events"))]).await;
    assert_denied(&reply, 403, "missing_scope", path);
    let record = records.last();
    assert_eq!(
        (record.path.as_str(), record.action.as_str()),
        ("/v1/signals", "api.signals")
    );

    // A key that holds the scope reaches the route, and the app sees the same path the
    // scope was matched on.
    let reply = client.get(path, &[("x-api-key", h.token("all"))]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["path"], "/v1/signals");
    let record = records.last();
    assert_eq!(
        (
            record.path.as_str(),
            record.action.as_str(),
            record.decision
        ),
        ("/v1/signals", "api.signals", Decision::Allow)
    );
}

#[tokio::test]
async fn dot_segments_in_an_h2_path_cannot_reach_another_scope() {
    let (h, _) = harness(|_| {}).await;
    let mut sender = h.client(Identity::Anonymous).h2().await.unwrap();
    let path = "/v1/events/../signals";
    let request = http::Request::builder()
        .uri(format!("https://localhost{path}"))
        .header("x-api-key", h.token("events"))
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 403, "{path} over h2 must be refused");
}

#[tokio::test]
async fn absolute_form_targets_cannot_reach_another_scope() {
    let (h, records) = harness(|_| {}).await;
    let target = "https://localhost/v1/events/../signals";
    let reply = h
        .client(Identity::Anonymous)
        .get(target, &[("x-api-key", h.token("events"))])
        .await;
    assert_denied(&reply, 403, "missing_scope", target);
    assert_eq!(records.last().path, "/v1/signals");
}

#[tokio::test]
async fn paths_climbing_above_the_root_are_refused() {
    let (h, _) = harness(|_| {}).await;
    let key = h.token("events");
    let client = h.client(Identity::Anonymous);
    assert_unsafe(&client, key, "/v1/events/../../../etc/passwd", "above").await;
}

#[tokio::test]
async fn backslashes_nul_and_dot_segment_parameters_are_refused() {
    let (h, _) = harness(|_| {}).await;
    let key = h.token("events");
    let client = h.client(Identity::Anonymous);
    for (path, says) in [
        ("/v1/events/..\\..\\admin", "backslash"),
        ("/v1/events/1%00.json", "NUL"),
        ("/v1/events/..;/..;/signals", "parameters"),
        ("/v1/events/.;/1", "parameters"),
        ("/v1/events/%zz", "hex digits"),
    ] {
        assert_unsafe(&client, key, path, says).await;
    }
}

#[tokio::test]
async fn repeated_slashes_and_unreserved_escapes_are_normalised_and_the_query_kept() {
    let (h, records) = harness(|_| {}).await;
    let reply = h
        .client(Identity::Anonymous)
        .get(
            "/v1//%65vents///1?next=..%2f..%2fadmin&x=1",
            &[("x-api-key", h.token("events"))],
        )
        .await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let echoed = reply.json();
    assert_eq!(echoed["path"], "/v1/events/1");
    assert_eq!(echoed["query"], "next=..%2f..%2fadmin&x=1");
    assert_eq!(records.last().path, "/v1/events/1");
}

#[tokio::test]
async fn underscore_spellings_of_identity_headers_never_reach_the_app() {
    let (h, _) = harness(|_| {}).await;
    let reply = h
        .client(Identity::Anonymous)
        .get(
            "/v1/events/1",
            &[
                ("x-api-key", h.token("events")),
                ("X_Portcullis_Principal", "admin"),
                ("x_portcullis_tenant", "other"),
                ("X-Portcullis_Scopes", "signals"),
                ("x-portcullis-admin", "true"),
                ("X_Forwarded_For", "10.0.0.1"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200);
    let headers = reply.json()["headers"].as_object().unwrap().clone();
    let spoofed: Vec<&String> = headers
        .keys()
        .filter(|name| name.contains('_') || name.as_str() == "x-portcullis-admin")
        .collect();
    assert!(
        spoofed.is_empty(),
        "client-sent headers reached the app: {spoofed:?}"
    );
    assert_eq!(headers["x-portcullis-tenant"], "acme");
    assert_eq!(headers["x-portcullis-scopes"], "events");
}

const BODY_LIMIT: usize = 64 * 1024;

#[tokio::test]
async fn oversized_declared_bodies_are_refused_with_413() {
    let (h, _) = harness(|l| l.max_request_body_bytes = BODY_LIMIT).await;
    let client = h.client(Identity::Anonymous);
    let key = h.token("events");
    let body = "x".repeat(BODY_LIMIT + 1);
    let reply = client
        .post("/v1/events/1", &[("x-api-key", key)], &body)
        .await;
    assert_denied(
        &reply,
        413,
        "body_too_large",
        "a declared body over the limit",
    );
    let fits = "x".repeat(BODY_LIMIT);
    let reply = client
        .post("/v1/events/1", &[("x-api-key", key)], &fits)
        .await;
    assert_eq!(reply.status, 200, "a body at the limit must pass");
}

/// A chunked body of `chunks` × 8 KiB, produced as it is sent.
struct Chunks(usize);

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.0 == 0 {
            return Poll::Ready(None);
        }
        self.0 -= 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; 8192])))))
    }
}

#[tokio::test]
async fn oversized_chunked_bodies_are_refused_with_413() {
    let (h, _) = harness(|l| l.max_request_body_bytes = BODY_LIMIT).await;
    let stream = h.client(Identity::Anonymous).tls(false).await.unwrap();
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let request = http::Request::builder()
        .method("POST")
        .uri("/v1/events/1")
        .header("host", "localhost")
        .header("x-api-key", h.token("events"))
        .body(Chunks(BODY_LIMIT / 8192 * 4))
        .unwrap();
    assert!(request.headers().get("content-length").is_none());
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["reason"], "body_too_large");
}

#[tokio::test]
async fn h2_requests_with_too_many_headers_get_431() {
    let (h, _) = harness(|_| {}).await;
    let mut sender = h.client(Identity::Anonymous).h2().await.unwrap();
    let mut request = http::Request::builder()
        .uri("https://localhost/v1/events/1")
        .header("x-api-key", h.token("events"));
    for i in 0..150 {
        request = request.header(format!("x-filler-{i}"), "1");
    }
    let request = request
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    // The proxy refuses it itself (the echo app's own HTTP/1 limit would answer 431
    // too, but only after the headers crossed the proxy).
    assert_eq!(response.status(), 431);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| panic!("not the proxy's JSON: {}", String::from_utf8_lossy(&body)));
    assert_eq!(json["reason"], "too_many_headers");
}

#[tokio::test]
async fn idle_h2_connections_that_only_ping_cannot_starve_a_real_client() {
    let (h, _) = harness(|l| {
        l.max_connections = 2;
        l.idle_timeout = Duration::from_millis(300);
    })
    .await;
    let client = h.client(Identity::Anonymous);
    let mut squatters = Vec::new();
    for _ in 0..2 {
        squatters.push(client.h2_pinging(Duration::from_millis(50)).await.unwrap());
    }
    // Every slot is held by a connection that pings and never asks for anything; a
    // real client must still be served once those count as idle.
    let served = tokio::time::timeout(
        Duration::from_secs(20),
        client.get("/v1/events/1", &[("x-api-key", h.token("events"))]),
    )
    .await
    .expect("a real client was starved by connections that only ping");
    assert_eq!(served.status, 200);
    // The squatters were told to go away (GOAWAY), not left hanging.
    support::wait_until(|| squatters.iter().all(|s| s.is_closed())).await;
}

/// A GET on a new HTTP/1.1 connection from `source`, and the connection.
async fn get_from(
    client: &support::TestClient,
    source: IpAddr,
    key: &str,
) -> Result<
    (
        http1::SendRequest<http_body_util::Full<Bytes>>,
        client::Reply,
    ),
    client::BoxError,
> {
    let stream = client.tls_from(source, false).await?;
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = client::request("GET", "/v1/events/1", &[("x-api-key", key)], "");
    let reply = client::send_on(&mut sender, request).await?;
    Ok((sender, reply))
}

#[tokio::test]
async fn one_source_cannot_take_every_connection_slot() {
    let (h, _) = harness(|l| {
        l.max_connections = 4;
        l.max_connections_per_source = 2;
    })
    .await;
    let client = h.client(Identity::Anonymous);
    let key = h.token("events");
    let first = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
    let mut held = Vec::new();
    for _ in 0..2 {
        let (sender, reply) = get_from(&client, first, key).await.unwrap();
        assert_eq!(reply.status, 200);
        held.push(sender);
    }
    // A third connection from the same source is closed at once.
    let third = tokio::time::timeout(Duration::from_secs(20), get_from(&client, first, key))
        .await
        .expect("the proxy neither served nor closed the third connection");
    assert!(
        third.is_err(),
        "a source over its connection cap was served"
    );
    support::wait_until(|| {
        h.metric("portcullis_connections_refused_total{reason=\"per_source_limit\"}") == 1.0
    })
    .await;

    // Another source still gets a slot.
    let second = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let (_, reply) = get_from(&client, second, key).await.unwrap();
    assert_eq!(reply.status, 200);
    drop(held);
}

/// A ClientHello as a TLS 1.0/1.1/1.2-only client sends it: `legacy_version` set to
/// `version`, no `supported_versions`, and `signature_algorithms` only when
/// `signature_algorithms` (TLS 1.2 clients send it; OpenSSL omits it below 1.2).
fn legacy_client_hello(version: [u8; 2], signature_algorithms: bool) -> Vec<u8> {
    let mut extensions = Vec::new();
    // supported_groups: x25519, secp256r1.
    extensions.extend_from_slice(&[0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]);
    // ec_point_formats: uncompressed.
    extensions.extend_from_slice(&[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]);
    if signature_algorithms {
        // ecdsa_secp256r1_sha256, rsa_pkcs1_sha256, rsa_pss_rsae_sha256.
        extensions.extend_from_slice(&[
            0x00, 0x0d, 0x00, 0x08, 0x00, 0x06, 0x04, 0x03, 0x04, 0x01, 0x08, 0x04,
        ]);
    }
    let mut hello = Vec::new();
    hello.extend_from_slice(&version);
    hello.extend_from_slice(&[0x42; 32]); // random
    hello.push(0); // session id
    // ECDHE-ECDSA/RSA-AES128-GCM-SHA256, ECDHE-RSA-AES128-SHA, AES128-SHA.
    hello.extend_from_slice(&[0x00, 0x08, 0xc0, 0x2b, 0xc0, 0x2f, 0xc0, 0x13, 0x00, 0x2f]);
    hello.extend_from_slice(&[0x01, 0x00]); // compression: null
    hello.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    hello.extend_from_slice(&extensions);
    let mut handshake = vec![0x01];
    handshake.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

/// TLS alert descriptions (RFC 8446 §6).
const HANDSHAKE_FAILURE: u8 = 40;
const PROTOCOL_VERSION: u8 = 70;

async fn alert_for(h: &Harness, hello: &[u8]) -> u8 {
    let mut tcp = tokio::net::TcpStream::connect(h.proxy.inbound_addr)
        .await
        .unwrap();
    tcp.write_all(hello).await.unwrap();
    let mut answer = [0u8; 7];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut answer))
        .await
        .expect("no answer to the ClientHello")
        .unwrap();
    assert_eq!(answer[0], 0x15, "expected an alert record, got {answer:?}");
    assert_eq!(answer[5], 2, "the alert must be fatal: {answer:?}");
    answer[6]
}

/// rustls answers a ClientHello without `signature_algorithms` with
/// `handshake_failure` before it looks at the version (rustls 0.23,
/// `server/hs.rs`), so old clients that omit it (OpenSSL below TLS 1.2) see
/// `handshake_failure`; every other pre-1.3 hello gets `protocol_version`. Either
/// way the alert is fatal and no ServerHello is sent.
#[tokio::test]
async fn legacy_client_hellos_are_refused_with_a_fatal_alert() {
    let (h, _) = harness(|_| {}).await;
    let mut seen = Vec::new();
    for (name, version) in [
        ("TLS 1.0", [3, 1]),
        ("TLS 1.1", [3, 2]),
        ("TLS 1.2", [3, 3]),
    ] {
        for signature_algorithms in [true, false] {
            let alert = alert_for(&h, &legacy_client_hello(version, signature_algorithms)).await;
            seen.push((name, signature_algorithms, alert));
        }
    }
    let expected: Vec<(&str, bool, u8)> = ["TLS 1.0", "TLS 1.1", "TLS 1.2"]
        .into_iter()
        .flat_map(|name| {
            [
                (name, true, PROTOCOL_VERSION),
                (name, false, HANDSHAKE_FAILURE),
            ]
        })
        .collect();
    assert_eq!(
        seen, expected,
        "(version, signature_algorithms sent, alert)"
    );
}

async fn tcp_from(source: Ipv4Addr, to: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::new(IpAddr::V4(source), 0))
        .unwrap();
    socket.connect(to).await.unwrap()
}

/// Sends `GET /live` and returns what came back before the connection closed.
async fn live_on(tcp: &mut tokio::net::TcpStream) -> String {
    let _ = tcp
        .write_all(b"GET /live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut out))
        .await
        .expect("the admin listener neither answered nor closed");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn one_source_cannot_take_every_admin_connection() {
    let (h, _) = harness(|_| {}).await;
    let admin = h.proxy.admin_addr;
    let cap = portcullis_sidecar::admin::MAX_CONNECTIONS_PER_SOURCE;
    let mut held = Vec::new();
    for _ in 0..cap {
        held.push(tcp_from(Ipv4Addr::new(127, 0, 0, 1), admin).await);
    }
    let mut over = tcp_from(Ipv4Addr::new(127, 0, 0, 1), admin).await;
    let answer = live_on(&mut over).await;
    assert!(
        !answer.contains("200"),
        "a source over the admin cap was served: {answer}"
    );
    support::wait_until(|| {
        h.metric("portcullis_connections_refused_total{reason=\"admin_per_source_limit\"}") == 1.0
    })
    .await;
    // The kubelet, from another address, still gets its probe answered.
    let mut probe = tcp_from(Ipv4Addr::new(127, 0, 0, 2), admin).await;
    assert!(live_on(&mut probe).await.starts_with("HTTP/1.1 200"));
    drop(held);
}
