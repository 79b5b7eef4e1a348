//! Connection floods for the server-bounds attack tests: idle TCP that never starts a
//! TLS handshake, idle HTTP/1.1 over TLS, idle HTTP/2 over TLS (pinging), all from one
//! source; and a bound on how long a test waits for the server to act.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use portcullis_server::ConnectionLimits;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The attacker's source address.
pub const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
/// Another client's source address (Linux routes all of 127/8 to lo).
pub const BYSTANDER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// How long a test waits for something the server must do before calling it a hang.
pub const HANG: Duration = Duration::from_secs(10);

/// Caps of 8 connections (8 from one source), idle after 300 ms, and a TLS handshake
/// timeout (60 s) long enough that it never closes a connection during a test.
pub fn tight_limits() -> ConnectionLimits {
    ConnectionLimits {
        max_connections: 8,
        max_connections_per_source: 8,
        idle_timeout: Duration::from_millis(300),
        handshake_timeout: Duration::from_secs(60),
        ..ConnectionLimits::default()
    }
}

/// A TCP connection to `addr` from `source`.
pub async fn connect_from(source: IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    socket.connect(addr).await.unwrap()
}

/// A TLS session to `addr` from `source`, offering `alpn`.
pub async fn tls_from(
    source: IpAddr,
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    server_name: &str,
    alpn: &[u8],
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut config = (**config).clone();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = connect_from(source, addr).await;
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(server_name.to_owned()).unwrap(), tcp)
        .await
}

/// An HTTP/2 connection from `source` that sends nothing but PINGs (every 100 ms);
/// the task ends when the server closes the connection.
pub async fn pinging_h2(
    source: IpAddr,
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    server_name: &str,
) -> Result<
    (
        hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
        JoinHandle<()>,
    ),
    String,
> {
    let tls = tls_from(source, addr, config, server_name, b"h2")
        .await
        .map_err(|e| e.to_string())?;
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(100))
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((sender, driver))
}

/// Idle connections held open by the attacker.
#[derive(Default)]
pub struct Flood {
    /// TCP connections that never send a ClientHello.
    pub silent: Vec<TcpStream>,
    /// TLS sessions that never send a request (HTTP/1.1 negotiated).
    pub idle_h1: Vec<TlsStream<TcpStream>>,
    /// HTTP/2 connections that only ping.
    pub idle_h2: Vec<JoinHandle<()>>,
    senders: Vec<hyper::client::conn::http2::SendRequest<Empty<Bytes>>>,
}

/// How long the flood waits for one of its handshakes.
const FLOOD_HANDSHAKE: Duration = Duration::from_secs(1);

/// Opens `each` connections of every kind from [`ATTACKER`]. Sessions the server
/// refuses or leaves waiting are not kept.
pub async fn flood(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    server_name: &str,
    each: usize,
) -> Flood {
    let mut flood = Flood::default();
    for _ in 0..each {
        flood.silent.push(connect_from(ATTACKER, addr).await);
    }
    for _ in 0..each {
        let tls = tls_from(ATTACKER, addr, config, server_name, b"http/1.1");
        if let Ok(Ok(tls)) = tokio::time::timeout(FLOOD_HANDSHAKE, tls).await {
            flood.idle_h1.push(tls);
        }
    }
    for _ in 0..each {
        let h2 = pinging_h2(ATTACKER, addr, config, server_name);
        if let Ok(Ok((sender, driver))) = tokio::time::timeout(FLOOD_HANDSHAKE, h2).await {
            flood.senders.push(sender);
            flood.idle_h2.push(driver);
        }
    }
    flood
}

/// How long a refused connection may stay open: well under the default TLS handshake
/// timeout (10 s), so a close by that timer does not pass for a refusal.
pub const REFUSED_WITHIN: Duration = Duration::from_secs(5);

/// Whether the server closes `stream` (EOF or reset) within [`REFUSED_WITHIN`].
pub async fn closed_by_server<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(REFUSED_WITHIN, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Whether an HTTP/2 connection's driver ends (the server closed it) within [`HANG`].
pub async fn h2_closed_by_server(driver: JoinHandle<()>) -> bool {
    tokio::time::timeout(HANG, driver).await.is_ok()
}

/// One HTTP/1.1 request over TLS from `source`: the status and body.
pub async fn request_from(
    source: IpAddr,
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    server_name: &str,
    request: http::Request<http_body_util::Full<Bytes>>,
) -> Result<(u16, Vec<u8>), String> {
    let tls = tls_from(source, addr, config, server_name, b"http/1.1")
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    send_h1(tls, request).await
}

/// One HTTP/1.1 request on `tls`: the status and body.
pub async fn send_h1(
    tls: TlsStream<TcpStream>,
    request: http::Request<http_body_util::Full<Bytes>>,
) -> Result<(u16, Vec<u8>), String> {
    use http_body_util::BodyExt as _;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes()
        .to_vec();
    Ok((status, body))
}

/// Whether the server closes an HTTP/2 connection that only pings (every 100 ms)
/// within [`HANG`].
pub async fn pinging_h2_is_closed(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    server_name: &str,
) -> bool {
    let (_sender, driver) = pinging_h2(ATTACKER, addr, config, server_name)
        .await
        .unwrap();
    h2_closed_by_server(driver).await
}
