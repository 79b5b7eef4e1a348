//! HTTP/2, WebSocket upgrade, streaming bodies, and graceful drain through the proxy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::{Harness, Identity, Options, client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn http2_requests_are_proxied_with_multiplexing() {
    let h = Harness::start(Options::default()).await;
    let client = h.client(Identity::Anonymous);
    let sender = client.h2().await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..10 {
        let mut sender = sender.clone();
        let key = h.token("events").to_owned();
        tasks.push(tokio::spawn(async move {
            let request = Request::post(format!("https://localhost/v1/events/{i}"))
                .header("x-api-key", key)
                .body(Full::new(Bytes::from(format!("body {i}"))))
                .unwrap();
            let response = sender.send_request(request).await.unwrap();
            assert_eq!(response.version(), http::Version::HTTP_2);
            assert_eq!(response.status(), 200);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(json["path"], format!("/v1/events/{i}"));
            assert_eq!(json["body"], format!("body {i}"));
            assert_eq!(json["headers"]["host"], "localhost");
            assert!(
                json["headers"]["x-portcullis-principal"]
                    .as_str()
                    .unwrap()
                    .starts_with("key:ak_***")
            );
            assert!(json["headers"].get("x-api-key").is_none());
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test]
async fn websocket_upgrade_passes_through() {
    let h = Harness::start(Options::default()).await;
    let mut stream = h.client(Identity::Anonymous).tls(false).await.unwrap();
    let head = format!(
        "GET /v1/events/stream HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-API-Key: {}\r\n\r\n",
        h.token("events")
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut byte))
            .await
            .unwrap()
            .unwrap();
        answer.push(byte[0]);
    }
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(answer.starts_with("http/1.1 101"), "{answer}");
    assert!(answer.contains("upgrade: websocket"), "{answer}");
    for message in ["hello", "through the proxy"] {
        stream.write_all(message.as_bytes()).await.unwrap();
        let mut echoed = vec![0u8; message.len()];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echoed))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(echoed, message.as_bytes());
    }
}

#[tokio::test]
async fn large_bodies_stream_both_ways() {
    let h = Harness::start(Options::default()).await;
    let client = h.client(Identity::Anonymous);
    let body = "0123456789abcdef".repeat(32 * 1024); // 512 KiB
    let reply = client
        .post("/v1/events/big", &[("x-api-key", h.token("events"))], &body)
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["body"].as_str().unwrap().len(), body.len());
}

#[tokio::test]
async fn keep_alive_serves_many_requests_on_one_connection() {
    let h = Harness::start(Options::default()).await;
    let client = h.client(Identity::Anonymous);
    let mut connection = client.h1().await.unwrap();
    for i in 0..20 {
        let request = client::request(
            "GET",
            &format!("/v1/signals/{i}"),
            &[("x-api-key", h.token("signals"))],
            "",
        );
        assert_eq!(
            client::send_on(&mut connection, request)
                .await
                .unwrap()
                .status,
            200
        );
    }
    assert_eq!(h.metric("portcullis_tls_handshakes_total"), 1.0);
}

/// Over TLS only ALPN picks HTTP/2 (RFC 9113 §3.2): a client that names no protocol
/// (an old or minimal TLS stack) is served HTTP/1.1, keep-alive included.
#[tokio::test]
async fn a_client_naming_no_protocol_is_served_http1() {
    let h = Harness::start(Options::default()).await;
    let config = client::client_config(
        &h.ca.pem,
        &Identity::Anonymous,
        &[&rustls::version::TLS13],
        &[],
    );
    let tcp = tokio::net::TcpStream::connect(h.proxy.inbound_addr)
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    let key = h.token("signals").to_owned();
    for i in 0..2 {
        let request =
            format!("GET /v1/signals/{i} HTTP/1.1\r\nhost: localhost\r\nx-api-key: {key}\r\n\r\n");
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let length: usize = head
            .lines()
            .find_map(|line| {
                line.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap();
        let mut body = vec![0u8; length];
        tls.read_exact(&mut body).await.unwrap();
    }
}

#[tokio::test]
async fn drain_finishes_in_flight_requests_and_refuses_new_connections() {
    let h = Harness::start(Options::default()).await;
    let client = h.client(Identity::Anonymous);
    let mut stream = client.tls(false).await.unwrap();
    let head = format!(
        "POST /v1/events/slow HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {}\r\nContent-Length: 10\r\n\r\nhello",
        h.token("events")
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.proxy.shutdown_token().cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // New connections are no longer accepted.
    assert!(
        client.tls(false).await.is_err(),
        "a draining proxy must not accept new connections"
    );
    stream.write_all(b"world").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "in-flight request must complete: {answer}"
    );
    assert!(answer.contains("helloworld"));
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_for_a_free_slot() {
    let mut options = Options::default();
    options.limits.max_connections = 1;
    let h = Harness::start(options).await;
    let client = h.client(Identity::Anonymous);
    let key = h.token("events").to_owned();
    let mut first = client.h1().await.unwrap();
    let request = || client::request("GET", "/v1/events/1", &[("x-api-key", &key)], "");
    assert_eq!(
        client::send_on(&mut first, request()).await.unwrap().status,
        200
    );
    // The second connection is not accepted while the first holds the only slot.
    let second = tokio::spawn({
        let client = client.clone();
        async move { client.h1().await.map(|_| ()).map_err(|e| e.to_string()) }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!second.is_finished(), "the handshake must wait for a slot");
    drop(first);
    tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// An app on 127.0.0.1 that counts the connections it accepts: `/big` answers 4 MiB,
/// anything else `ok`; with `close_after`, it closes each connection that long after
/// a response, as apps with a short keep-alive timeout do, without saying so.
async fn counting_app(
    close_after: Option<Duration>,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::{Arc, atomic::AtomicUsize, atomic::Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|request: Request<_>| async move {
                    let body = if request.uri().path() == "/v1/events/big" {
                        Bytes::from(vec![b'x'; 4 << 20])
                    } else {
                        Bytes::from_static(b"ok")
                    };
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(body)))
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
                match close_after {
                    None => {
                        let _ = connection.await;
                    }
                    Some(after) => {
                        let _ = tokio::time::timeout(after, connection).await;
                    }
                }
            });
        }
    });
    (port, accepted)
}

async fn proxy_in_front_of(app_port: u16) -> Harness {
    Harness::start(Options {
        app_port: Some(app_port),
        ..Options::default()
    })
    .await
}

#[tokio::test]
async fn the_app_connection_is_kept_alive_across_requests_and_clients() {
    let (port, accepted) = counting_app(None).await;
    let h = proxy_in_front_of(port).await;
    let key = h.token("events").to_owned();
    for _ in 0..3 {
        let client = h.client(Identity::Anonymous);
        let mut connection = client.h1().await.unwrap();
        for _ in 0..5 {
            let request = client::request("GET", "/v1/events/1", &[("x-api-key", &key)], "");
            let reply = client::send_on(&mut connection, request).await.unwrap();
            assert_eq!((reply.status, reply.body.as_ref()), (200, &b"ok"[..]));
        }
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "15 requests in turn, from three client connections, need one app connection"
    );
}

#[tokio::test]
async fn an_app_that_closes_idle_connections_loses_no_request() {
    let (port, accepted) = counting_app(Some(Duration::from_millis(50))).await;
    let h = proxy_in_front_of(port).await;
    let client = h.client(Identity::Anonymous);
    let key = h.token("events").to_owned();
    let mut connection = client.h1().await.unwrap();
    for _ in 0..4 {
        let request = client::request("GET", "/v1/events/1", &[("x-api-key", &key)], "");
        let reply = client::send_on(&mut connection, request).await.unwrap();
        assert_eq!((reply.status, reply.body.as_ref()), (200, &b"ok"[..]));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_response_the_client_abandons_never_reaches_the_next_request() {
    let (port, accepted) = counting_app(None).await;
    let h = proxy_in_front_of(port).await;
    let client = h.client(Identity::Anonymous);
    let key = h.token("events").to_owned();
    // The client reads the head of a 4 MiB answer and hangs up.
    let mut stream = client.tls(false).await.unwrap();
    let head =
        format!("GET /v1/events/big HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut start = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut start))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&start, b"HTTP/1.1 200");
    drop(stream);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The rest of that answer is still on its app connection, which must not be reused.
    for _ in 0..3 {
        let reply = client.get("/v1/events/1", &[("x-api-key", &key)]).await;
        assert_eq!((reply.status, reply.body.as_ref()), (200, &b"ok"[..]));
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
}
