//! A minimal HTTP(S) POST client for the network sinks: hyper 1.x over one connection
//! per batch, rustls (ring) for `https` URLs, a timeout on the whole exchange. The TLS
//! client config is fixed (a SIEM's CA) or taken fresh per batch ([`ClientTls::Current`]:
//! a workload certificate that rotates).

use super::DeliveryError;
use crate::error::Error;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

const ERROR_BODY_LIMIT: usize = 512;

/// The client config in force when a batch starts; `Err` says why there is none yet.
pub type CurrentClientConfig =
    Arc<dyn Fn() -> Result<Arc<rustls::ClientConfig>, String> + Send + Sync>;

/// How an `https` endpoint's TLS client is configured.
#[derive(Clone)]
pub enum ClientTls {
    /// One config for the life of the sink.
    Fixed(Arc<rustls::ClientConfig>),
    /// Asked for per batch, so a renewed client certificate is used at once.
    Current(CurrentClientConfig),
}

impl ClientTls {
    fn config(&self) -> Result<Arc<rustls::ClientConfig>, DeliveryError> {
        match self {
            ClientTls::Fixed(config) => Ok(config.clone()),
            ClientTls::Current(current) => current()
                .map_err(|e| DeliveryError::Transient(format!("no TLS client config yet: {e}"))),
        }
    }
}

/// Where a sink posts to: scheme, host, port and base path of its URL.
#[derive(Clone)]
pub struct HttpEndpoint {
    host: String,
    port: u16,
    base_path: String,
    tls: Option<ClientTls>,
    timeout: Duration,
}

/// A parsed sink URL.
struct Url {
    https: bool,
    host: String,
    port: u16,
    base_path: String,
}

fn parse_url(url: &str) -> Result<Url, Error> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|_| Error::Config(format!("sink URL {url:?} is not a valid URL")))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => {
            return Err(Error::Config(format!(
                "sink URL {url:?} must start with http:// or https://"
            )));
        }
    };
    let host = uri
        .host()
        .ok_or_else(|| Error::Config(format!("sink URL {url:?} has no host")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok(Url {
        https,
        host,
        port: uri.port_u16().unwrap_or(if https { 443 } else { 80 }),
        base_path: uri.path().trim_end_matches('/').to_string(),
    })
}

impl fmt::Debug for HttpEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpEndpoint")
            .field("https", &self.tls.is_some())
            .field("host", &self.host)
            .field("port", &self.port)
            .field("base_path", &self.base_path)
            .finish()
    }
}

impl HttpEndpoint {
    /// Parses `url` (`http://` or `https://`). `https` needs `roots`, the CAs that may
    /// sign the service's certificate.
    pub fn new(
        url: &str,
        roots: Option<rustls::RootCertStore>,
        timeout: Duration,
    ) -> Result<Self, Error> {
        let parsed = parse_url(url)?;
        let tls = if parsed.https {
            let roots = roots.ok_or_else(|| {
                Error::Config(format!(
                    "sink URL {url:?} is https: give the CA bundle that signs it"
                ))
            })?;
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("TLS setup: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
            Some(ClientTls::Fixed(Arc::new(config)))
        } else {
            None
        };
        Ok(Self::from_parts(parsed, tls, timeout))
    }

    /// An `https` endpoint whose client config is asked for per batch (mutual TLS with
    /// a certificate that rotates).
    pub fn with_client_tls(
        url: &str,
        tls: CurrentClientConfig,
        timeout: Duration,
    ) -> Result<Self, Error> {
        let parsed = parse_url(url)?;
        if !parsed.https {
            return Err(Error::Config(format!(
                "sink URL {url:?} must be https:// (records travel over mutual TLS)"
            )));
        }
        Ok(Self::from_parts(
            parsed,
            Some(ClientTls::Current(tls)),
            timeout,
        ))
    }

    fn from_parts(url: Url, tls: Option<ClientTls>, timeout: Duration) -> Self {
        HttpEndpoint {
            host: url.host,
            port: url.port,
            base_path: url.base_path,
            tls,
            timeout,
        }
    }

    /// POSTs `body` to base path + `path` with `headers`; `Ok` only on 2xx.
    pub async fn post(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<(), DeliveryError> {
        let mut request = Request::post(format!("{}{path}", self.base_path))
            .header(hyper::header::HOST, self.host_header())
            .header(hyper::header::CONTENT_LENGTH, body.len());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(body))
            .map_err(|_| DeliveryError::Transient("invalid request header value".into()))?;
        match tokio::time::timeout(self.timeout, self.exchange(request)).await {
            Ok(result) => result,
            Err(_) => Err(DeliveryError::Transient(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        }
    }

    fn host_header(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    async fn exchange(&self, request: Request<Full<Bytes>>) -> Result<(), DeliveryError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| {
                DeliveryError::Transient(format!("connect {}: {e}", self.host_header()))
            })?;
        let response = match &self.tls {
            None => send(tcp, request).await?,
            Some(tls) => {
                let config = tls.config()?;
                let name = ServerName::try_from(self.host.clone())
                    .map_err(|_| DeliveryError::Transient("invalid TLS server name".into()))?;
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| DeliveryError::Transient(format!("TLS handshake: {e}")))?;
                send(tls, request).await?
            }
        };
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(());
        }
        let excerpt = Limited::new(response.into_body(), ERROR_BODY_LIMIT)
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        Err(DeliveryError::from_status(status, excerpt.trim()))
    }
}

async fn send<S>(
    io: S,
    request: Request<Full<Bytes>>,
) -> Result<hyper::Response<Incoming>, DeliveryError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| DeliveryError::Transient(format!("HTTP handshake: {e}")))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender
        .send_request(request)
        .await
        .map_err(|e| DeliveryError::Transient(format!("HTTP request: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parsing() -> Result<(), Error> {
        let e = HttpEndpoint::new("http://127.0.0.1:8088/base/", None, Duration::from_secs(1))?;
        assert_eq!(
            (e.host.as_str(), e.port, e.base_path.as_str()),
            ("127.0.0.1", 8088, "/base")
        );
        assert!(HttpEndpoint::new("https://splunk:8088", None, Duration::from_secs(1)).is_err());
        assert!(HttpEndpoint::new("ftp://x", None, Duration::from_secs(1)).is_err());
        Ok(())
    }
}
