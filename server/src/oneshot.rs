//! One request to another Portcullis component over TLS 1.3: connect, handshake with
//! the caller's client configuration (a client certificate when it has one), `GET`, a
//! bounded body, all under one deadline. Errors never carry the body: it may hold keys.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

/// Where to send the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Host name or address to connect to.
    pub host: String,
    /// Port.
    pub port: u16,
    /// The name the server's certificate must carry (and the Host header's).
    pub server_name: String,
}

impl Target {
    /// The target of an `https://host[:port]` URL (port 443 when none is given).
    pub fn from_url(url: &str) -> Result<Self, OneshotError> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| OneshotError::Url(format!("{url:?}: {e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(OneshotError::Url(format!("{url:?} is not an https:// URL")));
        }
        let host = uri
            .host()
            .ok_or_else(|| OneshotError::Url(format!("{url:?} names no host")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Ok(Self::new(host, uri.port_u16().unwrap_or(443)))
    }

    /// `host` on `port`, its certificate naming `host`.
    pub fn new(host: &str, port: u16) -> Self {
        Self {
            host: host.to_owned(),
            port,
            server_name: host.to_owned(),
        }
    }

    fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum OneshotError {
    /// The URL is not usable.
    #[error("not a usable URL: {0}")]
    Url(String),
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

/// `GET path` on `target` with `headers` (Host is set); the status and the body (at
/// most `max_body` bytes).
pub async fn get(
    target: &Target,
    tls: Arc<rustls::ClientConfig>,
    path: &str,
    headers: HeaderMap,
    max_body: usize,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), OneshotError> {
    tokio::time::timeout(timeout, exchange(target, tls, path, headers, max_body))
        .await
        .map_err(|_| OneshotError::Timeout(timeout))?
}

async fn exchange(
    target: &Target,
    tls: Arc<rustls::ClientConfig>,
    path: &str,
    headers: HeaderMap,
    max_body: usize,
) -> Result<(StatusCode, Bytes), OneshotError> {
    let endpoint = target.authority();
    let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|source| OneshotError::Connect {
            endpoint: endpoint.clone(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    let server_name = ServerName::try_from(target.server_name.clone())
        .map_err(|_| OneshotError::ServerName(target.server_name.clone()))?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(server_name, tcp)
        .await
        .map_err(|source| OneshotError::Tls {
            endpoint: endpoint.clone(),
            source,
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| OneshotError::Http(e.to_string()))?;
    let driver = tokio::spawn(connection);
    let result = async {
        let host = format!("{}:{}", target.server_name, target.port);
        let mut request = Request::get(path)
            .header(header::HOST, host.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|e| OneshotError::Http(e.to_string()))?;
        request.headers_mut().extend(headers);
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| OneshotError::Http(e.to_string()))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), max_body)
            .collect()
            .await
            .map_err(|e| OneshotError::Http(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_from_urls() {
        let target = Target::from_url("https://portcullis-policy.portcullis-system.svc:8090");
        assert_eq!(
            target.ok(),
            Some(Target::new("portcullis-policy.portcullis-system.svc", 8090))
        );
        assert_eq!(
            Target::from_url("https://[::1]").ok(),
            Some(Target::new("::1", 443))
        );
        for bad in ["http://policy:8090", "policy:8090", "https://"] {
            assert!(Target::from_url(bad).is_err(), "{bad}");
        }
    }
}
