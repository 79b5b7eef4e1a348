//! One bounded HTTP server (hyper 1, HTTP/1.1 and HTTP/2, optional rustls) used by
//! every control-plane listener: the operator's admission webhooks, identity service,
//! policy server and metrics/health endpoint, and the audit collector. Handlers see the client's
//! certificate chain as a [`PeerCertificates`] request extension.
//!
//! Bounded ([`ConnectionLimits`]): TLS handshake time, header read time, time to the
//! response head, idle time (no request in flight, whatever HTTP/2 pings say),
//! HTTP/2 keep-alive and streams, and connections in all and per source IP, where a
//! full server closes its longest-idle connection rather than stop accepting
//! ([`connections`]). On shutdown it stops accepting, lets open connections finish
//! (bounded), and returns.

#![warn(missing_docs)]

pub mod connections;
pub mod oneshot;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument as _;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use connections::{Connection, Registry, Slot};

/// Why a streamed response body stopped early. The connection then ends the response
/// without its terminator (HTTP/1.1) or resets the stream (HTTP/2), so the client sees
/// a failure rather than a complete-looking body.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// Response body type of every handler: a whole body or a stream.
pub type Body = UnsyncBoxBody<Bytes, BodyError>;

/// A body that cannot fail, as a [`Body`].
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes, Error = Infallible> + Send + 'static,
{
    body.map_err(|never| match never {}).boxed_unsync()
}

/// How long a closed-for-idleness or evicted connection gets to say goodbye
/// (HTTP/2 GOAWAY, TLS close_notify).
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The bounds of one server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Time allowed for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time allowed to read a request's headers (HTTP/1.1).
    pub header_read_timeout: Duration,
    /// Time from a request to its response head, request body included; a streamed
    /// response body (the policy watch) is not bounded by it.
    pub response_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// HTTP/2 PING interval that finds dead peers.
    pub keep_alive_interval: Duration,
    /// Time a PING may go unanswered before the connection is closed.
    pub keep_alive_timeout: Duration,
    /// HTTP/2 streams at once on one connection.
    pub max_concurrent_streams: u32,
    /// Connections held at once; a full server closes its longest-idle connection to
    /// admit a new one, and refuses only when all are busy.
    pub max_connections: usize,
    /// Connections held at once from one source IP address.
    pub max_connections_per_source: usize,
    /// Time open connections get to finish on shutdown.
    pub drain_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(90),
            keep_alive_interval: Duration::from_secs(30),
            keep_alive_timeout: Duration::from_secs(10),
            max_concurrent_streams: 100,
            max_connections: 1024,
            max_connections_per_source: 256,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Where a TLS server gets its config: one for its life, or the one in force when each
/// connection arrives (a certificate renewed on disk or by a CA is served from the next
/// handshake on; open connections keep theirs).
#[derive(Clone)]
pub enum ServerTls {
    /// One config.
    Fixed(Arc<rustls::ServerConfig>),
    /// Asked for per connection.
    Current(Arc<dyn Fn() -> Arc<rustls::ServerConfig> + Send + Sync>),
}

impl ServerTls {
    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        match self {
            ServerTls::Fixed(config) => tokio_rustls::TlsAcceptor::from(config.clone()),
            ServerTls::Current(current) => tokio_rustls::TlsAcceptor::from(current()),
        }
    }
}

impl From<Arc<rustls::ServerConfig>> for ServerTls {
    fn from(config: Arc<rustls::ServerConfig>) -> Self {
        ServerTls::Fixed(config)
    }
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ServerTls::Fixed(_) => "ServerTls::Fixed",
            ServerTls::Current(_) => "ServerTls::Current",
        })
    }
}

/// The certificate chain a TLS client presented (leaf first), in the extensions of
/// every request on that connection; absent on plain HTTP and when none was presented.
#[derive(Clone, Debug)]
pub struct PeerCertificates(pub Arc<[CertificateDer<'static>]>);

/// A whole response.
pub fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(boxed(Full::new(body.into())));
    *response.status_mut() = status;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

/// A JSON error body `{"error": ...}`.
pub fn error(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({"error": message}).to_string();
    full(status, "application/json", body)
}

/// Serves `handler` on `listener` with the default limits until `shutdown`; TLS when
/// `tls` is given.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    tls: Option<ServerTls>,
    handler: F,
    shutdown: CancellationToken,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    serve_with(
        listener,
        tls,
        handler,
        ConnectionLimits::default(),
        shutdown,
    )
    .await;
}

/// Serves `handler` on `listener` within `limits` until `shutdown`; TLS when `tls` is
/// given.
pub async fn serve_with<F, Fut>(
    listener: TcpListener,
    tls: Option<ServerTls>,
    handler: F,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let registry = Registry::new(limits.max_connections, limits.max_connections_per_source);
    let limits = Arc::new(limits);
    let mut tasks = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        while tasks.try_join_next().is_some() {}
        // Refused connections are closed at once: never left waiting in the backlog.
        let slot = match registry.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                tracing::debug!(%peer, ?refusal, "connection refused");
                continue;
            }
        };
        let accepted = Accepted {
            stream,
            http: Http {
                peer,
                connection: slot.connection.clone(),
                limits: limits.clone(),
                shutdown: shutdown.clone(),
            },
            slot,
            acceptor: tls.as_ref().map(ServerTls::acceptor),
        };
        // A span per connection: every log line of it names the peer.
        tasks.spawn(
            accepted
                .serve(handler.clone())
                .instrument(tracing::debug_span!("conn", %peer)),
        );
    }
    drop(listener);
    let drained = tokio::time::timeout(limits.drain_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("connections still open after the drain period");
    }
}

/// One admitted connection, before the handshake.
struct Accepted {
    stream: TcpStream,
    http: Http,
    /// Its place in the registry, held until the connection ends.
    slot: Slot,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
}

impl Accepted {
    async fn serve<F, Fut>(self, handler: F)
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let Self {
            stream,
            http,
            slot,
            acceptor,
        } = self;
        let Some(acceptor) = acceptor else {
            http.serve(stream, None, handler).await;
            drop(slot);
            return;
        };
        let peer = http.peer;
        let handshake =
            tokio::time::timeout(http.limits.handshake_timeout, acceptor.accept(stream));
        let tls = tokio::select! {
            done = handshake => match done {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            },
            () = http.connection.evicted() => {
                tracing::debug!(%peer, "connection evicted during the TLS handshake");
                return;
            }
            () = http.shutdown.cancelled() => return,
        };
        let certificates = tls
            .get_ref()
            .1
            .peer_certificates()
            .filter(|chain| !chain.is_empty())
            .map(|chain| PeerCertificates(chain.to_vec().into()));
        http.serve(tls, certificates, handler).await;
        drop(slot);
    }
}

/// HTTP on one established connection.
struct Http {
    peer: SocketAddr,
    connection: Arc<Connection>,
    limits: Arc<ConnectionLimits>,
    shutdown: CancellationToken,
}

impl Http {
    async fn serve<I, F, Fut>(self, io: I, certificates: Option<PeerCertificates>, handler: F)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let Self {
            peer,
            connection,
            limits,
            shutdown,
        } = self;
        let response_timeout = limits.response_timeout;
        let service = {
            let connection = connection.clone();
            service_fn(move |mut req: Request<Incoming>| {
                let in_flight = connection.begin_request();
                if let Some(certificates) = &certificates {
                    req.extensions_mut().insert(certificates.clone());
                }
                let answer = tokio::time::timeout(response_timeout, handler(req));
                async move {
                    let response = answer.await.unwrap_or_else(|_| timed_out(response_timeout));
                    // The request stays in flight until its body is sent (or dropped).
                    Ok::<_, Infallible>(response.map(|body| {
                        body.map_frame(move |frame| {
                            let _ = &in_flight;
                            frame
                        })
                        .boxed_unsync()
                    }))
                }
            })
        };
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(limits.keep_alive_interval)
            .keep_alive_timeout(limits.keep_alive_timeout)
            .max_concurrent_streams(limits.max_concurrent_streams);
        let conn = builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let (why, grace) = tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            () = connection.idle_for(limits.idle_timeout) => ("idle", CLOSE_GRACE),
            () = connection.evicted() => ("evicted to make room", CLOSE_GRACE),
            () = shutdown.cancelled() => ("shutting down", limits.drain_timeout),
        };
        tracing::debug!(%peer, why, "closing the connection");
        conn.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(grace, conn).await;
    }
}

/// The answer when the handler did not produce a response head in time.
fn timed_out(limit: Duration) -> Response<Body> {
    let body = serde_json::json!({
        "error": format!("no response within {} s; the request body may have been sent too slowly", limit.as_secs()),
        "reason": "RequestTimeout",
    });
    full(
        StatusCode::REQUEST_TIMEOUT,
        "application/json",
        body.to_string(),
    )
}
