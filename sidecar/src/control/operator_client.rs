//! One-shot requests to the operator's policy server over mTLS (the policy stream has
//! its own long-lived client in [`super::policy_stream`]): connect, TLS 1.3 with the
//! workload certificate, `GET`, a bounded body, all under one deadline.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

use crate::{config::env::OperatorEndpoint, tls::ClientConfigSource};

/// Largest answer accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Why a request to the operator failed. Never carries the response body (it may hold
/// key material).
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// No client certificate to present yet.
    #[error("no workload certificate to present yet: {0}")]
    NoIdentity(String),
    /// TCP connect failed.
    #[error("connecting to {endpoint}: {source}")]
    Connect {
        /// `host:port`.
        endpoint: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The host is not a usable TLS server name.
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
    /// The TLS handshake failed.
    #[error("TLS handshake with {endpoint}: {source}")]
    Tls {
        /// `host:port`.
        endpoint: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("HTTP: {0}")]
    Http(String),
    /// The whole exchange took too long.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// `GET path` on `endpoint`; the status and body (at most [`MAX_BODY_BYTES`]).
pub async fn get(
    endpoint: &OperatorEndpoint,
    tls: &ClientConfigSource,
    path: &str,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), OperatorError> {
    tokio::time::timeout(timeout, exchange(endpoint, tls, path))
        .await
        .map_err(|_| OperatorError::Timeout(timeout))?
}

async fn exchange(
    endpoint: &OperatorEndpoint,
    tls: &ClientConfigSource,
    path: &str,
) -> Result<(StatusCode, Bytes), OperatorError> {
    let authority = format!("{}:{}", endpoint.host, endpoint.port);
    let config = tls().map_err(|e| OperatorError::NoIdentity(e.to_string()))?;
    let tcp = tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port))
        .await
        .map_err(|source| OperatorError::Connect {
            endpoint: authority.clone(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    let server_name = ServerName::try_from(endpoint.host.clone())
        .map_err(|_| OperatorError::ServerName(endpoint.host.clone()))?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(server_name, tcp)
        .await
        .map_err(|source| OperatorError::Tls {
            endpoint: authority.clone(),
            source,
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| OperatorError::Http(e.to_string()))?;
    let driver = tokio::spawn(connection);
    let result = async {
        let request = Request::get(path)
            .header(header::HOST, authority.as_str())
            .header(header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| OperatorError::Http(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| OperatorError::Http(e.to_string()))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| OperatorError::Http(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    }
    .await;
    driver.abort();
    result
}
