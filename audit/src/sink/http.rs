//! A minimal HTTP(S) POST client for the network sinks: hyper 1.x over one kept-alive
//! connection, rustls (ring) for `https` URLs, a timeout on the whole exchange. The TLS
//! client config is fixed (a SIEM's CA) or taken fresh per batch ([`ClientTls::Current`]:
//! a workload certificate that rotates).
//!
//! The connection is kept between batches, since a TLS handshake per batch (a full one
//! with a client certificate) costs the proxy more than the batch itself. It is opened
//! again when the client config changed (a renewed certificate is presented from the
//! next batch on), after [`KEEP_FOR`], after any failed or non-2xx exchange, and once at
//! once when a kept connection fails, since the service may have closed it while idle.

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
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

const ERROR_BODY_LIMIT: usize = 512;

/// The most of a 2xx answer's body read so the connection can carry the next batch; a
/// longer body closes it instead.
const OK_BODY_LIMIT: usize = 64 * 1024;

/// How long one connection carries batches before a new one is opened.
pub const KEEP_FOR: Duration = Duration::from_secs(300);

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// A connection kept for the next batch.
struct Kept {
    sender: Sender,
    /// The TLS config it was opened with (`None`: plain HTTP).
    config: Option<Arc<rustls::ClientConfig>>,
    opened: Instant,
}

impl Kept {
    fn usable_with(&self, config: Option<&Arc<rustls::ClientConfig>>) -> bool {
        let same_config = match (&self.config, config) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        same_config && self.opened.elapsed() < KEEP_FOR && !self.sender.is_closed()
    }
}

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

/// Where a sink posts to: scheme, host, port and base path of its URL, and the
/// connection kept between batches (shared by clones).
#[derive(Clone)]
pub struct HttpEndpoint {
    host: String,
    port: u16,
    base_path: String,
    tls: Option<ClientTls>,
    timeout: Duration,
    kept: Arc<tokio::sync::Mutex<Option<Kept>>>,
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
            kept: Arc::new(tokio::sync::Mutex::new(None)),
        }
    }

    /// POSTs `body` to base path + `path` with `headers`; `Ok` only on 2xx.
    pub async fn post(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<(), DeliveryError> {
        let request = || {
            let mut request = Request::post(format!("{}{path}", self.base_path))
                .header(hyper::header::HOST, self.host_header())
                .header(hyper::header::CONTENT_LENGTH, body.len());
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            request
                .body(Full::new(body.clone()))
                .map_err(|_| DeliveryError::Transient("invalid request header value".into()))
        };
        match tokio::time::timeout(self.timeout, self.exchange(request)).await {
            Ok(result) => result,
            // The connection in use was taken out of `kept`, so it goes with the future.
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

    /// Sends on the kept connection when it is still usable (once more on a new one if
    /// it fails), else on a new one, and keeps the connection after a 2xx.
    async fn exchange(
        &self,
        request: impl Fn() -> Result<Request<Full<Bytes>>, DeliveryError>,
    ) -> Result<(), DeliveryError> {
        let config = match &self.tls {
            Some(tls) => Some(tls.config()?),
            None => None,
        };
        let mut kept = self.kept.lock().await;
        let reusable = kept.take().filter(|k| k.usable_with(config.as_ref()));
        let (response, sender, opened) = match reusable {
            Some(Kept {
                mut sender, opened, ..
            }) => match send(&mut sender, request()?).await {
                Ok(response) => (response, sender, opened),
                // The service may have closed it while idle: once more, on a new one.
                Err(_) => self.open_and_send(config.as_ref(), request()?).await?,
            },
            None => self.open_and_send(config.as_ref(), request()?).await?,
        };
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            // Read the answer through so the connection is free for the next batch.
            if Limited::new(response.into_body(), OK_BODY_LIMIT)
                .collect()
                .await
                .is_ok()
            {
                *kept = Some(Kept {
                    sender,
                    config,
                    opened,
                });
            }
            return Ok(());
        }
        let excerpt = Limited::new(response.into_body(), ERROR_BODY_LIMIT)
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        Err(DeliveryError::from_status(status, excerpt.trim()))
    }

    async fn open_and_send(
        &self,
        config: Option<&Arc<rustls::ClientConfig>>,
        request: Request<Full<Bytes>>,
    ) -> Result<(hyper::Response<Incoming>, Sender, Instant), DeliveryError> {
        let opened = Instant::now();
        let mut sender = self.open(config).await?;
        let response = send(&mut sender, request)
            .await
            .map_err(|e| DeliveryError::Transient(format!("HTTP request: {e}")))?;
        Ok((response, sender, opened))
    }

    async fn open(
        &self,
        config: Option<&Arc<rustls::ClientConfig>>,
    ) -> Result<Sender, DeliveryError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| {
                DeliveryError::Transient(format!("connect {}: {e}", self.host_header()))
            })?;
        match config {
            None => handshake(tcp).await,
            Some(config) => {
                let name = ServerName::try_from(self.host.clone())
                    .map_err(|_| DeliveryError::Transient("invalid TLS server name".into()))?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| DeliveryError::Transient(format!("TLS handshake: {e}")))?;
                handshake(tls).await
            }
        }
    }
}

async fn send(
    sender: &mut Sender,
    request: Request<Full<Bytes>>,
) -> Result<hyper::Response<Incoming>, hyper::Error> {
    sender.ready().await?;
    sender.send_request(request).await
}

async fn handshake<S>(io: S) -> Result<Sender, DeliveryError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| DeliveryError::Transient(format!("HTTP handshake: {e}")))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
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
