//! Accepting inbound connections: a connection semaphore (max connections), the TLS
//! handshake under a deadline, the peer's SPIFFE ID, then HTTP/1.1 or HTTP/2 by ALPN
//! with header size and header read limits, an idle watchdog, and graceful drain.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Limits,
    identity::{PeerIdentity, tls::peer_identity},
    inbound::Inbound,
    metrics::Metrics,
    tls,
};

/// What the connection tells every request on it.
#[derive(Debug)]
pub struct ConnInfo {
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The peer workload's SPIFFE ID, from a verified client certificate.
    pub peer_id: Option<String>,
    /// The peer's workload, tenant and certificate serial (`peer_id` parsed).
    pub peer_identity: Option<PeerIdentity>,
    /// Whether a (verified) client certificate was presented at all.
    pub client_cert: bool,
    /// Traffic and in-flight requests, for the idle watchdog.
    pub activity: Arc<Activity>,
}

/// Last traffic and requests in flight on one connection.
#[derive(Debug)]
pub struct Activity {
    origin: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

/// Decrements the in-flight count when a request's handling ends.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        })
    }

    fn touch(&self) {
        let now = self.origin.elapsed().as_millis() as u64;
        self.last_ms.store(now, Ordering::Relaxed);
    }

    /// Marks a request as in flight until the guard drops.
    pub fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        InFlight(self.clone())
    }

    /// Resolves once the connection has had no traffic and no request for `idle`.
    async fn idle(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let quiet_for = self.origin.elapsed().saturating_sub(last);
            if quiet_for >= idle && self.in_flight.load(Ordering::Relaxed) == 0 {
                return;
            }
            tokio::time::sleep(
                idle.saturating_sub(quiet_for)
                    .max(Duration::from_millis(50)),
            )
            .await;
        }
    }
}

/// Records traffic on the wrapped stream.
struct ActivityIo<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// Accepts connections on `listener` until `shutdown`, then lets open connections
/// finish their requests for up to `limits.drain_timeout`.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    inbound: Arc<Inbound>,
    limits: Limits,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let builder = Arc::new(http_builder(&limits));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => break },
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let watcher = graceful.watcher();
        let task = Connection {
            acceptor: acceptor.clone(),
            inbound: inbound.clone(),
            builder: builder.clone(),
            metrics: metrics.clone(),
            limits: limits.clone(),
            shutdown: shutdown.clone(),
        };
        tokio::spawn(async move {
            let _permit = permit;
            task.run(tcp, peer, watcher).await;
        });
    }
    drop(listener);
    tracing::info!(
        deadline_s = limits.drain_timeout.as_secs(),
        "draining inbound connections"
    );
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain deadline passed with requests still in flight");
    }
}

struct Connection {
    acceptor: TlsAcceptor,
    inbound: Arc<Inbound>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    metrics: Metrics,
    limits: Limits,
    shutdown: CancellationToken,
}

impl Connection {
    async fn run(
        self,
        tcp: TcpStream,
        peer: SocketAddr,
        watcher: hyper_util::server::graceful::Watcher,
    ) {
        let _ = tcp.set_nodelay(true);
        let stream =
            match tokio::time::timeout(self.limits.handshake_timeout, self.acceptor.accept(tcp))
                .await
            {
                Err(_) => {
                    self.metrics.handshake_failed("timeout");
                    return;
                }
                Ok(Err(e)) => {
                    let reason = tls::handshake_failure_reason(&e);
                    tracing::debug!(%peer, reason, error = %e, "TLS handshake failed");
                    self.metrics.handshake_failed(reason);
                    return;
                }
                Ok(Ok(stream)) => stream,
            };
        self.metrics.handshake_ok();
        if self.shutdown.is_cancelled() {
            return;
        }
        let certificates = stream.get_ref().1.peer_certificates();
        let activity = Activity::new();
        // A tenant URI alone names no workload: such a certificate has no peer id.
        let peer_identity = peer_identity(certificates);
        let conn = Arc::new(ConnInfo {
            peer,
            peer_id: peer_identity.as_ref().map(|p| p.workload.to_string()),
            peer_identity,
            client_cert: certificates.is_some_and(|c| !c.is_empty()),
            activity: activity.clone(),
        });
        let inbound = self.inbound.clone();
        let service = service_fn(move |request| inbound.clone().handle(request, conn.clone()));
        let io = TokioIo::new(ActivityIo {
            inner: stream,
            activity: activity.clone(),
        });
        let gauge = self.metrics.connections_open().clone();
        gauge.inc();
        let connection = watcher.watch(self.builder.serve_connection_with_upgrades(io, service));
        tokio::select! {
            result = connection => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            }
            _ = activity.idle(self.limits.idle_timeout) => {
                tracing::debug!(%peer, "closing idle connection");
            }
        }
        gauge.dec();
    }
}
