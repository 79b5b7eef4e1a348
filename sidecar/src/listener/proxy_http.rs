//! HTTP that every proxied listener (inbound, outbound) shares: the server settings and
//! the hop-by-hop headers that never cross the proxy.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderMap, HeaderName, HeaderValue, header};
use http_body::Body;
use hyper::{
    body::Incoming,
    rt::{Read, Write},
    server::conn::{http1, http2},
    service::HttpService,
};
use hyper_util::{
    rt::{TokioExecutor, TokioTimer},
    server::conn::auto,
};

use crate::config::Limits;

const HOP_BY_HOP: [&str; 7] = [
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

/// HTTP/1.1 settings every proxied listener shares: header size, count and read time
/// limits. A macro because hyper's and hyper-util's HTTP/1.1 builders are different
/// types with the same methods.
macro_rules! http1_settings {
    ($builder:expr, $limits:expr) => {
        $builder
            .timer(TokioTimer::new())
            .header_read_timeout($limits.header_read_timeout)
            .max_buf_size($limits.max_header_bytes)
            .max_headers($limits.max_headers)
            .keep_alive(true)
    };
}

/// HTTP/2 settings every proxied listener shares: the header list limit and keep-alive
/// PINGs to find dead peers.
macro_rules! http2_settings {
    ($builder:expr, $limits:expr) => {
        $builder
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from($limits.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(Some(Duration::from_secs(20)))
            .keep_alive_timeout(Duration::from_secs(20))
    };
}

/// The server for plaintext connections (the outbound listener): it reads the first
/// bytes to tell HTTP/1.1 from HTTP/2 with prior knowledge (h2c).
pub fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    http1_settings!(builder.http1(), limits);
    http2_settings!(builder.http2(), limits);
    builder
}

/// The servers for TLS connections (the inbound listener), where ALPN has already
/// named the protocol. Each connection holds only its own protocol's state on the heap,
/// where the sniffing server holds room for both in every connection's task (an idle
/// HTTP/1.1 connection cost ~12 KiB of task alone; bench/RESULTS.md, #21 item 6).
pub struct TlsHttpServers {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl TlsHttpServers {
    /// The servers, with the settings every proxied listener shares.
    pub fn new(limits: &Limits) -> Self {
        let mut http1 = http1::Builder::new();
        http1_settings!(http1, limits);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2_settings!(http2, limits);
        Self { http1, http2 }
    }

    /// Serves `io` with `protocol`; HTTP/1.1 connections may be upgraded.
    pub fn serve<I, S, B>(&self, io: I, service: S, protocol: Protocol) -> ServedConnection<I, S>
    where
        S: HttpService<Incoming, ResBody = B>,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        I: Read + Write + Unpin + Send + 'static,
    {
        match protocol {
            Protocol::Http2 => {
                ServedConnection::Http2(Box::pin(self.http2.serve_connection(io, service)))
            }
            Protocol::Http1 => ServedConnection::Http1(Box::pin(
                self.http1.serve_connection(io, service).with_upgrades(),
            )),
        }
    }
}

/// The HTTP version of a TLS connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1: ALPN `http/1.1`, or no ALPN at all.
    Http1,
    /// HTTP/2: ALPN `h2`.
    Http2,
}

impl Protocol {
    /// The protocol ALPN agreed on. Over TLS, HTTP/2 is only ever chosen by ALPN (RFC
    /// 9113 §3.2), so a client that named none speaks HTTP/1.1.
    pub fn from_alpn(alpn: Option<&[u8]>) -> Self {
        if alpn == Some(b"h2") {
            Self::Http2
        } else {
            Self::Http1
        }
    }
}

/// One TLS connection being served, by the protocol ALPN picked.
pub enum ServedConnection<I, S>
where
    S: HttpService<Incoming>,
{
    /// HTTP/1.1, upgrades allowed.
    Http1(Pin<Box<http1::UpgradeableConnection<I, S>>>),
    /// HTTP/2.
    Http2(Pin<Box<http2::Connection<I, S, TokioExecutor>>>),
}

impl<I, S, B> ServedConnection<I, S>
where
    S: HttpService<Incoming, ResBody = B>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: Read + Write + Unpin + Send + 'static,
{
    /// Finishes the requests in flight and then closes (see `idle::serve_until_closed`).
    pub fn graceful_shutdown(self: Pin<&mut Self>) {
        match self.get_mut() {
            Self::Http1(connection) => connection.as_mut().graceful_shutdown(),
            Self::Http2(connection) => connection.as_mut().graceful_shutdown(),
        }
    }
}

impl<I, S, B> Future for ServedConnection<I, S>
where
    S: HttpService<Incoming, ResBody = B>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: Read + Write + Unpin + Send + 'static,
{
    type Output = Result<(), hyper::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Self::Http1(connection) => connection.as_mut().poll(cx),
            Self::Http2(connection) => connection.as_mut().poll(cx),
        }
    }
}

/// Removes hop-by-hop headers, keeping `Connection: upgrade` + `Upgrade` when
/// `keep_upgrade` (a WebSocket handshake must reach the other side).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| !(keep_upgrade && name == header::UPGRADE))
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    } else {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}
