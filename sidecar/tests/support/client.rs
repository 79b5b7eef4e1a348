//! A rustls + hyper test client (TLS 1.3, optional client certificate, h1 or h2).

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::ca::{Issued, TestCa};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Who the client is at the TLS level.
#[derive(Clone)]
pub enum Identity {
    Anonymous,
    Certificate(Issued),
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }

    /// The `reason` of a denial body.
    pub fn reason(&self) -> String {
        self.json()["reason"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// A header the echo app received.
    pub fn echoed_header(&self, name: &str) -> Option<String> {
        self.json()["headers"][name].as_str().map(str::to_owned)
    }
}

pub fn roots(ca_pem: &str) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    roots
}

/// A client config for `versions`, trusting `ca_pem`, presenting `identity`.
pub fn client_config(
    ca_pem: &str,
    identity: &Identity,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots(ca_pem));
    let mut config = match identity {
        Identity::Anonymous => builder.with_no_client_auth(),
        Identity::Certificate(issued) => {
            let chain = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
                .map(|c| c.unwrap())
                .collect();
            let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

#[derive(Clone)]
pub struct TestClient {
    pub addr: SocketAddr,
    h1: Arc<ClientConfig>,
    h2: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

/// A request with a Host header.
pub fn request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

pub async fn send_on(
    sender: &mut http1::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Result<Reply, BoxError> {
    sender.ready().await?;
    let response = sender.send_request(req).await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await?.to_bytes();
    Ok(Reply {
        status,
        headers,
        body,
    })
}

impl TestClient {
    pub fn new(addr: SocketAddr, ca: &TestCa, identity: Identity) -> Self {
        let tls13 = &[&rustls::version::TLS13];
        Self {
            addr,
            h1: Arc::new(client_config(&ca.pem, &identity, tls13, &[b"http/1.1"])),
            h2: Arc::new(client_config(&ca.pem, &identity, tls13, &[b"h2"])),
            server_name: ServerName::try_from("localhost").unwrap(),
        }
    }

    /// Trusts `ca_pem` instead of the harness CA.
    pub fn with_ca(mut self, ca_pem: &str, identity: &Identity) -> Self {
        let tls13 = &[&rustls::version::TLS13];
        self.h1 = Arc::new(client_config(ca_pem, identity, tls13, &[b"http/1.1"]));
        self.h2 = Arc::new(client_config(ca_pem, identity, tls13, &[b"h2"]));
        self
    }

    /// Connects by IP address: rustls sends no SNI for an IP server name.
    pub fn by_ip(mut self) -> Self {
        self.server_name = ServerName::from(self.addr.ip());
        self
    }

    pub async fn tls(&self, h2: bool) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.addr).await?;
        self.handshake(tcp, h2).await
    }

    /// A TLS connection whose TCP socket is bound to `source` first (Linux routes all
    /// of 127.0.0.0/8 to the loopback interface, so 127.0.0.2 is a second client).
    pub async fn tls_from(
        &self,
        source: std::net::IpAddr,
        h2: bool,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let tcp = socket.connect(self.addr).await?;
        self.handshake(tcp, h2).await
    }

    async fn handshake(&self, tcp: TcpStream, h2: bool) -> std::io::Result<TlsStream<TcpStream>> {
        let config = if h2 { self.h2.clone() } else { self.h1.clone() };
        tokio_rustls::TlsConnector::from(config)
            .connect(self.server_name.clone(), tcp)
            .await
    }

    /// An HTTP/1.1 keep-alive connection.
    pub async fn h1(&self) -> Result<http1::SendRequest<Full<Bytes>>, BoxError> {
        let stream = self.tls(false).await?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn.with_upgrades());
        Ok(sender)
    }

    /// An HTTP/2 connection.
    pub async fn h2(&self) -> Result<http2::SendRequest<Full<Bytes>>, BoxError> {
        let stream = self.tls(true).await?;
        let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        assert_eq!(
            alpn.as_deref(),
            Some(&b"h2"[..]),
            "server did not negotiate h2"
        );
        let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(sender)
    }

    /// An HTTP/2 connection that sends a PING every `interval`, even with no request
    /// open: the traffic of a client that only keeps its connection warm.
    pub async fn h2_pinging(
        &self,
        interval: std::time::Duration,
    ) -> Result<http2::SendRequest<Full<Bytes>>, BoxError> {
        let stream = self.tls(true).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(interval)
            .keep_alive_timeout(interval * 10)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(conn);
        Ok(sender)
    }

    /// One request on a fresh connection.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Result<Reply, BoxError> {
        let mut sender = self.h1().await?;
        send_on(&mut sender, req).await
    }

    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.send(request("GET", path, headers, "")).await.unwrap()
    }

    pub async fn post(&self, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
        self.send(request("POST", path, headers, body))
            .await
            .unwrap()
    }
}
