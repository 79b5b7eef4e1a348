//! Shared helpers for the audit integration tests.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use jiff::{SignedDuration, Timestamp};
use portcullis_audit::{AuditRecord, Chain, CheckpointSigner, Decision, Entry, SignerIdentity};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

pub fn signer() -> Result<CheckpointSigner, portcullis_audit::Error> {
    CheckpointSigner::from_pkcs8(
        &CheckpointSigner::generate_pkcs8()?,
        SignerIdentity {
            spiffe_id: Some("spiffe://cluster.local/ns/acme-prod/sa/api".into()),
            certificate_der: None,
            intermediates_der: Vec::new(),
        },
    )
}

pub fn record(i: u64, ts: Timestamp) -> AuditRecord {
    let mut r = AuditRecord::new(ts, "acme", "api-7d9f", "api.identify", "key:ak_***7f2");
    r.client_ip = Some(std::net::IpAddr::from([10, 0, 0, 7]));
    r.method = "POST".into();
    r.path = format!("/v1/identify/{i}");
    r.status = 200;
    r.latency_ms = 12;
    r.bytes.received = 512;
    r.bytes.sent = 90;
    r.decision = Decision::Allow;
    r
}

pub fn t0() -> Timestamp {
    Timestamp::from_second(1_773_670_921).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// `n` chained records with a checkpoint after every `every` records, as entries.
pub fn chain_entries(
    chain_id: &str,
    n: u64,
    every: u64,
    signer: &CheckpointSigner,
) -> Result<Vec<Entry>, portcullis_audit::Error> {
    let mut chain = Chain::new(chain_id);
    let mut out = Vec::new();
    for i in 0..n {
        let rec = chain.append(record(i, t0() + SignedDuration::from_secs(i as i64)))?;
        let (seq, hash) = (rec.seq, rec.hash.clone());
        out.push(Entry::Record(rec));
        if (i + 1) % every == 0 {
            out.push(Entry::Checkpoint(signer.sign(
                chain_id,
                seq,
                &hash,
                t0(),
            )?));
        }
    }
    Ok(out)
}

/// Entries as JSON lines.
pub fn to_lines(entries: &[Entry]) -> Result<Vec<String>, portcullis_audit::Error> {
    entries.iter().map(Entry::to_json_line).collect()
}

/// One request the test server saw.
#[derive(Debug, Clone)]
pub struct Captured {
    pub method: String,
    pub path: String,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
    pub answered: u16,
}

/// A local HTTP server standing in for Splunk HEC or Datadog; answers `status`.
pub struct TestServer {
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    pub status: Arc<AtomicU16>,
    pub requests: Arc<Mutex<Vec<Captured>>>,
    task: tokio::task::JoinHandle<()>,
}

/// A loopback port held for a server that is not up yet: every connection is closed
/// unanswered. Holding it matters: a released port can be taken meanwhile, even by the
/// client's own reconnect connecting to itself, and the later start would then fail.
pub struct DownPort {
    pub addr: SocketAddr,
    up: tokio::sync::oneshot::Sender<()>,
    refusing: tokio::task::JoinHandle<tokio::net::TcpListener>,
}

impl DownPort {
    pub async fn reserve() -> std::io::Result<DownPort> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (up, mut until_up) = tokio::sync::oneshot::channel();
        let refusing = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut until_up => return listener,
                    // Dropping the accepted socket closes it.
                    _ = listener.accept() => {}
                }
            }
        });
        Ok(DownPort { addr, up, refusing })
    }

    /// Serves on the held port, answering `status`.
    pub async fn serve(self, status: u16) -> std::io::Result<TestServer> {
        let _ = self.up.send(());
        let listener = self.refusing.await.map_err(std::io::Error::other)?;
        TestServer::serve(listener, status)
    }
}

impl TestServer {
    pub async fn start(addr: SocketAddr, status: u16) -> std::io::Result<TestServer> {
        Self::serve(tokio::net::TcpListener::bind(addr).await?, status)
    }

    fn serve(listener: tokio::net::TcpListener, status: u16) -> std::io::Result<TestServer> {
        let addr = listener.local_addr()?;
        let status = Arc::new(AtomicU16::new(status));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (st, rq) = (status.clone(), requests.clone());
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accepted = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let (st, rq) = (st.clone(), rq.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (st, rq) = (st.clone(), rq.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let answered = st.load(Ordering::SeqCst);
                            rq.lock().unwrap_or_else(|p| p.into_inner()).push(Captured {
                                method: parts.method.to_string(),
                                path: parts.uri.path().to_string(),
                                headers: parts.headers,
                                body,
                                answered,
                            });
                            let mut resp = Response::new(Full::new(Bytes::from_static(b"{}")));
                            *resp.status_mut() = hyper::StatusCode::from_u16(answered)
                                .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(TestServer {
            addr,
            connections,
            status,
            requests,
            task,
        })
    }

    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    pub fn captured(&self) -> Vec<Captured> {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback port with nothing listening on it (connections are refused).
pub fn unused_port() -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.local_addr()
}

/// Polls `cond` every 20 ms for at most `limit`; true when it held.
pub async fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}
