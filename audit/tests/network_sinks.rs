//! Splunk HEC and Datadog sinks against local stand-in servers on 127.0.0.1: exact path,
//! auth header and body format; nothing lost through an outage and a writer restart.

mod common;

use common::*;
use portcullis_audit::retry::RetryPolicy;
use portcullis_audit::sink::datadog::{Datadog, DatadogConfig};
use portcullis_audit::sink::splunk_hec::{SplunkHec, SplunkHecConfig};
use portcullis_audit::sink::spool::Spool;
use portcullis_audit::sink::spooled::SpooledSink;
use portcullis_audit::sink::{Deliver, Sink};
use portcullis_audit::verify::verify_entries;
use portcullis_audit::{
    AuditWriter, Chain, CheckpointPolicy, Entry, Secret, VerifyOptions, WriterConfig,
};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const FAST_RETRY: RetryPolicy = RetryPolicy {
    initial: Duration::from_millis(20),
    max: Duration::from_millis(200),
};

fn splunk(addr: SocketAddr) -> Result<SplunkHec, portcullis_audit::Error> {
    SplunkHec::new(SplunkHecConfig {
        url: format!("http://{addr}"),
        token: Secret::new("hec-token-0042"),
        host: "api-7d9f".into(),
        index: Some("audit".into()),
        tls_roots: None,
        timeout: Duration::from_secs(2),
    })
}

fn datadog(addr: SocketAddr) -> Result<Datadog, portcullis_audit::Error> {
    Datadog::new(DatadogConfig {
        url: format!("http://{addr}/"),
        api_key: Secret::new("dd-key-0042"),
        service: "portcullis".into(),
        hostname: "api-7d9f".into(),
        tags: "tenant:acme,env:test".into(),
        tls_roots: None,
        timeout: Duration::from_secs(2),
    })
}

fn writer(
    spool_dir: &Path,
    deliver: impl Deliver,
    every: u64,
    retry: RetryPolicy,
) -> Result<(AuditWriter, Arc<SpooledSink>), portcullis_audit::Error> {
    let sink = Arc::new(SpooledSink::start(
        Spool::open(spool_dir, 1 << 20)?,
        deliver,
        retry,
    ));
    let mut config = WriterConfig::new(Chain::new_id("api-7d9f", t0()));
    config.batch_max = 4;
    config.batch_linger = Duration::from_millis(5);
    config.checkpoint = CheckpointPolicy {
        every_records: every,
        every: Duration::from_secs(3600),
    };
    config.sink_retry = FAST_RETRY;
    let dyn_sink: Arc<dyn Sink> = sink.clone();
    Ok((AuditWriter::start(config, signer()?, vec![dyn_sink]), sink))
}

async fn submit_n(writer: &AuditWriter, n: u64) -> TestResult {
    for i in 0..n {
        writer.submit(record(i, t0())).await?;
    }
    Ok(())
}

/// Entries from the 2xx-answered requests, in the order the server accepted them.
fn accepted_entries(
    server: &TestServer,
    parse: impl Fn(&[u8]) -> Vec<Value>,
) -> Result<Vec<Entry>, portcullis_audit::Error> {
    server
        .captured()
        .iter()
        .filter(|c| c.answered == 200)
        .flat_map(|c| parse(&c.body))
        .map(Entry::from_value)
        .collect()
}

fn hec_events(body: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|mut v| v["event"].take())
        .collect()
}

fn dd_messages(body: &[u8]) -> Vec<Value> {
    let items: Vec<Value> = serde_json::from_slice(body).unwrap_or_default();
    items
        .iter()
        .filter_map(|i| {
            i["message"]
                .as_str()
                .and_then(|m| serde_json::from_str(m).ok())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splunk_hec_gets_every_record_through_outage_and_restart() -> TestResult {
    let spool_dir = tempfile::tempdir()?;
    let port = DownPort::reserve().await?;
    let addr = port.addr;

    // 1. The service is down (its port closes every connection): batches pile up in
    // the spool; the writer shuts down.
    let (w1, sink1) = writer(spool_dir.path(), splunk(addr)?, 5, FAST_RETRY)?;
    submit_n(&w1, 12).await?;
    assert!(
        wait_for(Duration::from_secs(5), || sink1.stats().transient_errors
            > 0)
        .await
    );
    w1.shutdown(Duration::from_millis(100)).await;
    assert!(
        sink1.stats().spool_batches > 0,
        "undelivered batches stay spooled"
    );
    drop((w1, sink1));

    // 2. The service comes back answering 503, then recovers; a new writer reopens the spool.
    let server = port.serve(503).await?;
    let (w2, sink2) = writer(spool_dir.path(), splunk(addr)?, 5, FAST_RETRY)?;
    submit_n(&w2, 8).await?;
    assert!(wait_for(Duration::from_secs(5), || !server.captured().is_empty()).await);
    assert_eq!(sink2.stats().delivered_batches, 0);
    server.set_status(200);
    assert!(
        wait_for(Duration::from_secs(10), || sink2.stats().spool_batches == 0
            && sink2.stats().delivered_batches > 0)
        .await
    );
    w2.shutdown(Duration::from_secs(2)).await;
    assert_eq!(sink2.stats().spool_batches, 0);

    let captured = server.captured();
    for c in &captured {
        assert_eq!(
            (c.method.as_str(), c.path.as_str()),
            ("POST", "/services/collector/event")
        );
        assert_eq!(
            c.headers.get("authorization").and_then(|v| v.to_str().ok()),
            Some("Splunk hec-token-0042")
        );
        for line in String::from_utf8_lossy(&c.body).lines() {
            let v: Value = serde_json::from_str(line)?;
            assert!(
                v["time"].is_f64(),
                "time is epoch seconds as a float: {line}"
            );
            assert_eq!(v["source"], "portcullis");
            assert_eq!(v["sourcetype"], "portcullis:audit");
            assert_eq!(v["host"], "api-7d9f");
            assert_eq!(v["index"], "audit");
            assert!(v["event"].is_object());
        }
    }
    let received = accepted_entries(&server, hec_events)?;
    let report = verify_entries(&received, VerifyOptions::default())?;
    assert_eq!(report.chains.len(), 2, "both writers' chains arrived");
    let mut counts: Vec<u64> = report.chains.values().map(|c| c.records).collect();
    counts.sort();
    assert_eq!(counts, vec![8, 12]);
    assert!(report.checkpoints >= 4, "checkpoints are shipped too");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datadog_gets_every_record_and_keeps_batches_on_permanent_errors() -> TestResult {
    let spool_dir = tempfile::tempdir()?;
    let server = TestServer::start("127.0.0.1:0".parse()?, 403).await?;
    let (w, sink) = writer(spool_dir.path(), datadog(server.addr)?, 4, FAST_RETRY)?;
    submit_n(&w, 10).await?;
    assert!(
        wait_for(Duration::from_secs(5), || sink.stats().permanent_errors
            >= 2)
        .await
    );
    assert!(
        sink.stats().spool_batches > 0,
        "refused batches are kept, not dropped"
    );
    assert_eq!(sink.stats().delivered_batches, 0);
    server.set_status(200);
    assert!(wait_for(Duration::from_secs(10), || sink.stats().spool_batches == 0).await);
    w.shutdown(Duration::from_secs(2)).await;

    for c in server.captured() {
        assert_eq!(
            (c.method.as_str(), c.path.as_str()),
            ("POST", "/api/v2/logs")
        );
        assert_eq!(
            c.headers.get("dd-api-key").and_then(|v| v.to_str().ok()),
            Some("dd-key-0042")
        );
        assert_eq!(
            c.headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/json")
        );
        let items: Vec<Value> = serde_json::from_slice(&c.body)?;
        for item in items {
            assert_eq!(item["ddsource"], "portcullis");
            assert_eq!(item["service"], "portcullis");
            assert_eq!(item["hostname"], "api-7d9f");
            assert_eq!(item["ddtags"], "tenant:acme,env:test");
            assert!(
                item["message"].is_string(),
                "message is the entry's JSON text"
            );
        }
    }
    let received = accepted_entries(&server, dd_messages)?;
    let report = verify_entries(&received, VerifyOptions::default())?;
    assert_eq!((report.records, report.checkpoints), (10, 3));
    Ok(())
}

/// A destination that comes back only after the close began (a restarted collector whose
/// Service endpoint is programmed a moment later) still gets the whole spool before the
/// deadline, however long the backoff had grown: the spool may die with the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closing_sink_keeps_retrying_until_its_deadline() -> TestResult {
    let spool_dir = tempfile::tempdir()?;
    let port = DownPort::reserve().await?;
    let addr = port.addr;
    let slow = RetryPolicy {
        initial: Duration::from_secs(20),
        max: Duration::from_secs(60),
    };
    let (w, sink) = writer(spool_dir.path(), splunk(addr)?, 5, slow)?;
    submit_n(&w, 6).await?;
    assert!(wait_for(Duration::from_secs(5), || sink.stats().transient_errors > 0).await);
    let closing = tokio::spawn(async move { w.shutdown(Duration::from_secs(4)).await });
    // The close's first attempt is refused too; only then does the destination come up.
    assert!(
        wait_for(Duration::from_secs(3), || sink.stats().transient_errors > 1).await,
        "the close retries at once, not after the 20 s backoff"
    );
    let server = port.serve(200).await?;
    closing.await?;
    assert_eq!(
        sink.stats().spool_batches,
        0,
        "every batch is delivered before the deadline"
    );
    let received = accepted_entries(&server, hec_events)?;
    let report = verify_entries(&received, VerifyOptions::default())?;
    assert_eq!(report.records, 6);
    Ok(())
}

#[test]
fn secrets_stay_out_of_debug_output() -> TestResult {
    let addr: SocketAddr = "127.0.0.1:9".parse()?;
    let text = format!("{:?} {:?}", splunk(addr)?, datadog(addr)?);
    assert!(
        !text.contains("hec-token-0042") && !text.contains("dd-key-0042"),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn a_sink_keeps_its_connection_between_batches_and_opens_a_new_one_after_a_failure()
-> TestResult {
    use portcullis_audit::sink::http::HttpEndpoint;
    let server = TestServer::start("127.0.0.1:0".parse()?, 200).await?;
    let endpoint = HttpEndpoint::new(
        &format!("http://{}", server.addr),
        None,
        Duration::from_secs(5),
    )?;
    let post = || endpoint.post("/batch", &[], bytes::Bytes::from_static(b"{}"));
    for _ in 0..3 {
        post().await?;
    }
    assert_eq!(
        server.connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "three batches over one connection"
    );

    server.set_status(503);
    assert!(post().await.is_err());
    server.set_status(200);
    post().await?;
    post().await?;
    assert_eq!(
        server.connections.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "a refused batch closes the connection; the next ones share a new one"
    );
    assert_eq!(server.captured().len(), 6);
    Ok(())
}

#[tokio::test]
async fn a_kept_connection_the_service_closed_is_replaced_without_failing_the_batch() -> TestResult
{
    use portcullis_audit::sink::http::HttpEndpoint;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A service that answers one request per connection, then closes it (as an idle
    // timeout would) without saying so in the answer.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = answered.clone();
    let server = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.ends_with(b"{}") {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let _ = tcp
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await;
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let endpoint = HttpEndpoint::new(&format!("http://{addr}"), None, Duration::from_secs(5))?;
    for _ in 0..3 {
        endpoint
            .post("/batch", &[], bytes::Bytes::from_static(b"{}"))
            .await?;
    }
    assert_eq!(answered.load(std::sync::atomic::Ordering::SeqCst), 3);
    server.abort();
    Ok(())
}
