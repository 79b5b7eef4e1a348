//! The load generator: HTTP/1.1 keep-alive connections over plain TCP or TLS 1.3
//! (rustls), an open-loop constant-rate mode with coordinated-omission-corrected
//! latency, a closed-loop max-throughput mode, a TLS handshake loop (full or resumed)
//! and a connection holder. Every run is bounded by a request count and a wall time,
//! reports progress on stderr, and targets 127.0.0.1 only.

use std::{
    io::IsTerminal,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{HeaderName, HeaderValue};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        Resumption,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::stats::{self, Schedule};

/// Where and how to send requests.
#[derive(Clone, Debug)]
pub struct Target {
    /// Label in the report.
    pub name: String,
    /// A 127.0.0.1 address.
    pub addr: SocketAddr,
    /// TLS client config; `None` for plain HTTP.
    pub tls: Option<Arc<ClientConfig>>,
    /// Extra request headers (the API key).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Request path.
    pub path: String,
}

/// How a TLS client checks the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// Against the benchmark CA (request loads).
    Roots,
    /// Not at all (handshake loads: keeps the generator's cost down so the server is
    /// what saturates; the server's work is unchanged).
    Skip,
}

/// Builds a TLS 1.3 client config: ALPN http/1.1, `ca` as roots (or no verification),
/// an optional client certificate, session resumption on or off.
pub fn client_config(
    ca: &std::path::Path,
    verify: Verify,
    client_auth: Option<(&std::path::Path, &std::path::Path)>,
    resume: bool,
) -> anyhow::Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match verify {
        Verify::Roots => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("reading {}", ca.display()))?
            {
                roots.add(cert?)?;
            }
            builder.with_root_certificates(roots)
        }
        Verify::Skip => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider))),
    };
    let mut config = match client_auth {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_file(key)?;
            builder.with_client_auth_cert(chain, key)?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    if !resume {
        config.resumption = Resumption::disabled();
    }
    Ok(Arc::new(config))
}

/// Accepts any server certificate. Benchmark use only, on loopback.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// An HTTP/1.1 connection ready for requests.
pub type Sender = http1::SendRequest<Empty<Bytes>>;

/// Opens a keep-alive connection to `target`.
pub async fn connect(target: &Target) -> anyhow::Result<Sender> {
    let tcp = tokio::net::TcpStream::connect(target.addr).await?;
    tcp.set_nodelay(true)?;
    match &target.tls {
        None => {
            let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            Ok(sender)
        }
        Some(tls) => {
            let stream = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(ServerName::try_from("localhost")?, tcp)
                .await?;
            let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            Ok(sender)
        }
    }
}

/// One `GET`; fails unless the answer is 200. The whole body is read.
pub async fn request(sender: &mut Sender, target: &Target) -> anyhow::Result<()> {
    let mut builder = http::Request::get(target.path.as_str()).header("host", "localhost");
    for (name, value) in &target.headers {
        builder = builder.header(name, value);
    }
    sender.ready().await?;
    let response = sender.send_request(builder.body(Empty::new())?).await?;
    let status = response.status();
    response.into_body().collect().await?;
    anyhow::ensure!(status == 200, "{}: status {status}", target.name);
    Ok(())
}

/// Limits of one run.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// Requests (or handshakes) at most.
    pub count: u64,
    /// Wall time at most.
    pub time: Duration,
}

/// What a run measured.
#[derive(Debug)]
pub struct RunResult {
    /// Requests answered 200.
    pub ok: u64,
    /// Failed requests.
    pub errors: u64,
    /// Open loop: requests never sent because the wall-time bound hit first.
    pub missed: u64,
    /// Open loop: worst lateness of the generator's own timer when the connection
    /// was free (µs), a health check of the generator.
    pub generator_lag_us: u64,
    /// Wall time of the measured part.
    pub elapsed: Duration,
    /// Latency, µs (open loop: coordinated-omission corrected).
    pub latency: Histogram<u64>,
}

impl RunResult {
    /// Answers per second.
    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Counters shown on stderr while a run is going.
#[derive(Debug, Default)]
struct Progress {
    done: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
}

fn start_progress(label: String, progress: Arc<Progress>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let tty = std::io::stderr().is_terminal();
        let started = Instant::now();
        let mut last = 0;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tick.tick().await;
            let stopping = progress.stop.load(Ordering::Relaxed);
            let done = progress.done.load(Ordering::Relaxed);
            let line = format!(
                "  {label}: {:>5.1}s {done:>9} done {:>8}/s errors {}",
                started.elapsed().as_secs_f64(),
                done - last,
                progress.errors.load(Ordering::Relaxed)
            );
            last = done;
            if tty {
                eprint!("\r\x1b[2K{line}");
                if stopping {
                    eprintln!();
                }
            } else {
                eprintln!("{line}");
            }
            if stopping {
                return;
            }
        }
    })
}

async fn finish_progress(progress: &Progress, handle: tokio::task::JoinHandle<()>) {
    progress.stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(2), handle).await;
}

/// Opens `conns` connections and sends `warmup` requests on each.
async fn open_warm(target: &Target, conns: usize, warmup: usize) -> anyhow::Result<Vec<Sender>> {
    let mut senders = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut sender = connect(target)
            .await
            .with_context(|| format!("connecting to {} at {}", target.name, target.addr))?;
        for _ in 0..warmup {
            request(&mut sender, target).await?;
        }
        senders.push(sender);
    }
    Ok(senders)
}

/// Closed loop: `conns` connections each send the next request as soon as the last
/// one is answered, until `bounds.count` requests or `bounds.time`.
pub async fn closed_loop(
    target: &Target,
    conns: usize,
    bounds: Bounds,
    label: &str,
) -> anyhow::Result<RunResult> {
    let senders = open_warm(target, conns, 20).await?;
    let issued = Arc::new(AtomicU64::new(0));
    let progress = Arc::new(Progress::default());
    let reporter = start_progress(label.to_owned(), progress.clone());
    let started = Instant::now();
    let deadline = started + bounds.time;
    let mut tasks = Vec::new();
    for mut sender in senders {
        let (target, issued, progress) = (target.clone(), issued.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            let mut latency = stats::histogram();
            while issued.fetch_add(1, Ordering::Relaxed) < bounds.count && Instant::now() < deadline
            {
                let t = Instant::now();
                match request(&mut sender, &target).await {
                    Ok(()) => {
                        stats::record(&mut latency, t.elapsed());
                        progress.done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        progress.errors.fetch_add(1, Ordering::Relaxed);
                        if progress.errors.load(Ordering::Relaxed) > 1000 {
                            break;
                        }
                        match connect(&target).await {
                            Ok(s) => sender = s,
                            Err(_) => break,
                        }
                    }
                }
            }
            latency
        }));
    }
    let mut parts = Vec::new();
    for task in tasks {
        parts.push(task.await?);
    }
    let elapsed = started.elapsed();
    finish_progress(&progress, reporter).await;
    Ok(RunResult {
        ok: progress.done.load(Ordering::Relaxed),
        errors: progress.errors.load(Ordering::Relaxed),
        missed: 0,
        generator_lag_us: 0,
        elapsed,
        latency: stats::merge(parts),
    })
}

/// Open loop: `rate` requests per second over `conns` connections for `bounds.time`
/// (at most `bounds.count` requests). Latency is measured from each request's
/// intended send time (see [`stats::corrected_latency`]); requests still unsent when
/// the wall time plus a grace period runs out are counted as missed.
pub async fn open_loop(
    target: &Target,
    conns: usize,
    rate: f64,
    bounds: Bounds,
    label: &str,
) -> anyhow::Result<RunResult> {
    let senders = open_warm(target, conns, 20).await?;
    let total = ((rate * bounds.time.as_secs_f64()) as u64).min(bounds.count);
    let schedule = Schedule {
        rate,
        conns: conns as u64,
        total,
    };
    let progress = Arc::new(Progress::default());
    let reporter = start_progress(label.to_owned(), progress.clone());
    let grace = Duration::from_secs(5);
    let start = tokio::time::Instant::now() + Duration::from_millis(10);
    let hard_stop = start + bounds.time + grace;
    let mut tasks = Vec::new();
    for (conn, mut sender) in senders.into_iter().enumerate() {
        let (target, progress) = (target.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            let conn = conn as u64;
            let mut latency = stats::histogram();
            let mut missed = 0;
            let mut lag = Duration::ZERO;
            let mut free = Duration::ZERO;
            let n = schedule.per_conn(conn);
            for k in 0..n {
                let due = schedule.due(conn, k);
                tokio::time::sleep_until(start + due).await;
                let now = tokio::time::Instant::now();
                if now >= hard_stop {
                    missed = n - k;
                    break;
                }
                let sent = now.saturating_duration_since(start);
                if free <= due {
                    lag = lag.max(sent.saturating_sub(due));
                }
                let result = request(&mut sender, &target).await;
                let done = start.elapsed();
                match result {
                    Ok(()) => {
                        stats::record(
                            &mut latency,
                            stats::corrected_latency(due, free, sent, done),
                        );
                        progress.done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        progress.errors.fetch_add(1, Ordering::Relaxed);
                        match connect(&target).await {
                            Ok(s) => sender = s,
                            Err(_) => {
                                missed = n - k - 1;
                                break;
                            }
                        }
                    }
                }
                free = start.elapsed();
            }
            (latency, missed, lag)
        }));
    }
    let mut parts = Vec::new();
    let mut missed = 0;
    let mut lag = Duration::ZERO;
    for task in tasks {
        let (h, m, l) = task.await?;
        parts.push(h);
        missed += m;
        lag = lag.max(l);
    }
    let elapsed = start.elapsed();
    finish_progress(&progress, reporter).await;
    Ok(RunResult {
        ok: progress.done.load(Ordering::Relaxed),
        errors: progress.errors.load(Ordering::Relaxed),
        missed,
        generator_lag_us: lag.as_micros() as u64,
        elapsed,
        latency: stats::merge(parts),
    })
}

/// What a handshake loop measured.
#[derive(Debug, Default)]
pub struct HandshakeResult {
    /// Handshakes completed.
    pub ok: u64,
    /// Of which resumed (PSK).
    pub resumed: u64,
    /// Failed.
    pub errors: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl HandshakeResult {
    /// Handshakes per second of wall time.
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// One connection: TCP connect, TLS 1.3 handshake, close_notify, then read to EOF so
/// the server's session tickets (sent after the handshake) reach the client's store.
async fn handshake_once(addr: SocketAddr, tls: &Arc<ClientConfig>) -> anyhow::Result<bool> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let resumed = stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    stream.shutdown().await?;
    let mut sink = Vec::new();
    // Servers answer close_notify by closing; a missing close_notify is not an error here.
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut sink)).await;
    Ok(resumed)
}

/// Full (`tls.resumption` disabled) or resumed handshakes from `conns` concurrent
/// loops, bounded by `bounds`.
pub async fn handshakes(
    addr: SocketAddr,
    tls: Arc<ClientConfig>,
    conns: usize,
    bounds: Bounds,
    label: &str,
) -> anyhow::Result<HandshakeResult> {
    // Prime the session store (and check the server answers at all).
    handshake_once(addr, &tls)
        .await
        .with_context(|| format!("{label}: first handshake with {addr}"))?;
    let issued = Arc::new(AtomicU64::new(0));
    let resumed = Arc::new(AtomicU64::new(0));
    let progress = Arc::new(Progress::default());
    let reporter = start_progress(label.to_owned(), progress.clone());
    let started = Instant::now();
    let deadline = started + bounds.time;
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (tls, issued, resumed, progress) = (
            tls.clone(),
            issued.clone(),
            resumed.clone(),
            progress.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while issued.fetch_add(1, Ordering::Relaxed) < bounds.count && Instant::now() < deadline
            {
                match handshake_once(addr, &tls).await {
                    Ok(r) => {
                        progress.done.fetch_add(1, Ordering::Relaxed);
                        resumed.fetch_add(u64::from(r), Ordering::Relaxed);
                    }
                    Err(_) => {
                        if progress.errors.fetch_add(1, Ordering::Relaxed) > 1000 {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let elapsed = started.elapsed();
    finish_progress(&progress, reporter).await;
    Ok(HandshakeResult {
        ok: progress.done.load(Ordering::Relaxed),
        resumed: resumed.load(Ordering::Relaxed),
        errors: progress.errors.load(Ordering::Relaxed),
        elapsed,
    })
}

/// Opens `n` connections (64 at a time), sends one request on each, and returns them
/// open. Gives up after `time`.
pub async fn hold(target: &Target, n: usize, time: Duration) -> anyhow::Result<Vec<Sender>> {
    let deadline = Instant::now() + time;
    let mut held = Vec::with_capacity(n);
    while held.len() < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{}: only {} of {n} connections opened within {time:?}",
            target.name,
            held.len()
        );
        let batch = (n - held.len()).min(64);
        let opened = futures::future::join_all((0..batch).map(|_| async {
            let mut sender = connect(target).await?;
            request(&mut sender, target).await?;
            anyhow::Ok(sender)
        }))
        .await;
        let mut failed = 0;
        for result in opened {
            match result {
                Ok(sender) => held.push(sender),
                Err(_) => failed += 1,
            }
        }
        if failed > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(held)
}
