//! The policy server over real loopback HTTP: GET, the NDJSON watch, 404s, shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jiff::Timestamp;
use portcullis_crds::{DataClassification, PolicyBundle};
use portcullis_operator::policy::{PolicyHub, server};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn bundle(classification: DataClassification) -> PolicyBundle {
    PolicyBundle {
        tenant: "acme".into(),
        classification,
        ..PolicyBundle::default()
    }
}

async fn start() -> (
    Arc<PolicyHub>,
    std::net::SocketAddr,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let hub = Arc::new(PolicyHub::default());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server::serve(listener, hub.clone(), None, shutdown.clone()));
    (hub, addr, shutdown, task)
}

#[tokio::test]
async fn get_watch_and_shutdown() {
    let (hub, addr, shutdown, task) = start().await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let get = |path: &str| {
        let uri: http::Uri = format!("http://{addr}{path}")
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        client.get(uri)
    };

    let missing = get("/v1/policy/acme")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(missing.status(), 404);

    // A watch opened before the first bundle waits for it.
    let watch = tokio::time::timeout(Duration::from_secs(5), get("/v1/policy/acme/watch"))
        .await
        .unwrap_or_else(|_| panic!("watch headers not sent before the first bundle"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(watch.status(), 200);
    assert_eq!(
        watch
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        Some(server::NDJSON)
    );
    let mut body = watch.into_body();
    hub.publish(
        bundle(DataClassification::Internal),
        Vec::new(),
        Timestamp::now(),
    );
    let mut buffer = Vec::new();
    let mut next_line = async || -> PolicyBundle {
        loop {
            if let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=end).collect();
                return serde_json::from_slice(&line).unwrap_or_else(|e| panic!("bad line: {e}"));
            }
            let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .unwrap_or_else(|_| panic!("no line within 5 s"))
                .unwrap_or_else(|| panic!("stream ended"))
                .unwrap_or_else(|e| panic!("{e}"));
            if let Ok(data) = frame.into_data() {
                buffer.extend_from_slice(&data);
            }
        }
    };
    let first = next_line().await;
    assert_eq!(first.classification, DataClassification::Internal);

    let published = Instant::now();
    hub.publish(
        bundle(DataClassification::Restricted),
        Vec::new(),
        Timestamp::now(),
    );
    let second = next_line().await;
    assert!(
        published.elapsed() < Duration::from_millis(200),
        "{:?}",
        published.elapsed()
    );
    assert!(second.version > first.version);

    let current = get("/v1/policy/acme")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(current.status(), 200);
    let bytes = current
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let served: PolicyBundle = serde_json::from_slice(&bytes).unwrap_or_default();
    assert_eq!(served.version, second.version);
    assert_eq!(
        get("/v1/nothing")
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0),
        404
    );
    let debug = get("/debug/policy").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(debug.status(), 200);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(6), task)
        .await
        .unwrap_or_else(|_| panic!("server did not stop"))
        .unwrap_or_else(|e| panic!("{e}"));
}
