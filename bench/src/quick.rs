//! `quick`: a bounded closed-loop load, side by side in one run, against the echo app
//! directly (plain HTTP/1.1) and through the proxy (TLS 1.3 + API key, the demo setup)
//! started in this process. Loopback only; every run is capped in requests and time.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use portcullis_crds::RateLimitPolicy;
use portcullis_sidecar::{audit::AuditHook, run::demo};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};

/// Audit off the measured path: the benchmark measures the proxy, not log output.
struct NoAudit;

impl AuditHook for NoAudit {
    fn record(
        &self,
        _event: portcullis_sidecar::audit::RequestOutcome,
    ) -> Result<(), portcullis_sidecar::audit::AuditRefused> {
        Ok(())
    }
}

#[derive(Clone)]
enum Target {
    Direct(std::net::SocketAddr),
    Proxy {
        addr: std::net::SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        key: String,
    },
}

struct Outcome {
    requests: u64,
    errors: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
}

type Sender = http1::SendRequest<Empty<Bytes>>;

async fn connect(target: &Target) -> anyhow::Result<Sender> {
    match target {
        Target::Direct(addr) => {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            Ok(sender)
        }
        Target::Proxy { addr, tls, .. } => {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(ServerName::try_from("localhost")?, tcp)
                .await?;
            let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            Ok(sender)
        }
    }
}

fn request(target: &Target) -> anyhow::Result<http::Request<Empty<Bytes>>> {
    let mut builder = http::Request::get("/v1/events/1").header("host", "localhost");
    if let Target::Proxy { key, .. } = target {
        builder = builder.header("x-api-key", key.as_str());
    }
    Ok(builder.body(Empty::new())?)
}

async fn one(sender: &mut Sender, target: &Target) -> anyhow::Result<()> {
    sender.ready().await?;
    let response = sender.send_request(request(target)?).await?;
    anyhow::ensure!(response.status() == 200, "status {}", response.status());
    response.into_body().collect().await?;
    Ok(())
}

async fn run(
    target: Target,
    connections: usize,
    requests: u64,
    cap: Duration,
) -> anyhow::Result<Outcome> {
    // Warm-up: open connections, fill the pool and the verified-key cache.
    let mut senders = Vec::new();
    for _ in 0..connections {
        let mut sender = connect(&target).await?;
        for _ in 0..20 {
            one(&mut sender, &target).await?;
        }
        senders.push(sender);
    }
    let issued = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + cap;
    let mut tasks = Vec::new();
    for mut sender in senders {
        let (target, issued, errors) = (target.clone(), issued.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            while issued.fetch_add(1, Ordering::Relaxed) < requests && Instant::now() < deadline {
                let t = Instant::now();
                if one(&mut sender, &target).await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                    sender = connect(&target).await?;
                    continue;
                }
                latency.record(t.elapsed().as_micros().max(1) as u64)?;
            }
            anyhow::Ok(latency)
        }));
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for task in tasks {
        latency.add(task.await??)?;
    }
    Ok(Outcome {
        requests: latency.len(),
        errors: errors.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        latency,
    })
}

fn rps(o: &Outcome) -> f64 {
    o.requests as f64 / o.elapsed.as_secs_f64()
}

fn print(name: &str, o: &Outcome) {
    println!(
        "{name:<28} {:>8} req  {:>6} err  {:>10.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms",
        o.requests,
        o.errors,
        rps(o),
        o.latency.value_at_quantile(0.50) as f64 / 1000.0,
        o.latency.value_at_quantile(0.99) as f64 / 1000.0,
    );
}

pub async fn quick(connections: usize, requests: u64, max_seconds: u64) -> anyhow::Result<()> {
    let options = demo::DemoOptions {
        inbound_port: 0,
        admin_port: 0,
        rate_limit: RateLimitPolicy {
            requests: u32::MAX,
            per_ms: 1_000,
            burst: u32::MAX,
        },
        ..demo::DemoOptions::default()
    };
    let demo = demo::start(options, Arc::new(NoAudit))
        .await
        .context("starting the demo proxy")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&demo.ca)? {
        roots.add(cert?)?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let key = demo
        .keys
        .iter()
        .find(|(scope, _)| scope == "events")
        .map(|(_, token)| token.clone())
        .context("demo has an events key")?;
    let cap = Duration::from_secs(max_seconds);
    println!(
        "quick: {connections} connections, {requests} requests per target (cap {max_seconds}s), GET /v1/events/1, loopback, HTTP/1.1 keep-alive"
    );
    let direct = run(Target::Direct(demo.echo_addr), connections, requests, cap).await?;
    let proxied = run(
        Target::Proxy {
            addr: demo.proxy.inbound_addr,
            tls: Arc::new(tls),
            key,
        },
        connections,
        requests,
        cap,
    )
    .await?;
    print("direct (plain HTTP)", &direct);
    print("proxy (TLS 1.3 + API key)", &proxied);
    println!(
        "ratio proxy/direct: throughput {:.2}x, p50 {:.2}x, p99 {:.2}x",
        rps(&proxied) / rps(&direct),
        proxied.latency.value_at_quantile(0.5) as f64
            / direct.latency.value_at_quantile(0.5).max(1) as f64,
        proxied.latency.value_at_quantile(0.99) as f64
            / direct.latency.value_at_quantile(0.99).max(1) as f64,
    );
    println!(
        "key cache hits {}, misses {}",
        demo.proxy
            .metrics
            .sample("portcullis_key_cache_hits_total")
            .unwrap_or(0.0),
        demo.proxy
            .metrics
            .sample("portcullis_key_cache_misses_total")
            .unwrap_or(0.0)
    );
    demo.proxy.shutdown_token().cancel();
    Ok(())
}
