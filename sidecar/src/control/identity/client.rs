//! The HTTPS client of the operator's identity service.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::IdentityError;
use crate::tls::provider;
use portcullis_api::identity::{CERTIFICATE_PATH, ErrorBody, IssueRequest, IssueResponse};

/// Largest response body accepted from the identity service.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// Something that turns a CSR into a signed certificate: the identity service in
/// production, a scripted fake in tests.
pub trait IssueCertificate: Send + Sync {
    /// Asks for a certificate for `csr_pem`, trusting `roots` for the service's TLS.
    fn issue<'a>(
        &'a self,
        csr_pem: &'a str,
        roots: &'a RootCertStore,
    ) -> BoxFuture<'a, Result<IssueResponse, IdentityError>>;
}

/// Where the identity service listens: `https://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityEndpoint {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
}

impl IdentityEndpoint {
    /// Parses an `https://host[:port]` URL (port defaults to 8443).
    pub fn parse(url: &str) -> Result<Self, IdentityError> {
        let uri: Uri = url
            .parse()
            .map_err(|e| IdentityError::Config(format!("identity endpoint {url:?}: {e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(IdentityError::Config(format!(
                "identity endpoint {url:?} must use https"
            )));
        }
        let host = uri
            .host()
            .ok_or_else(|| IdentityError::Config(format!("identity endpoint {url:?} has no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let server_name = ServerName::try_from(host.clone())
            .map_err(|e| IdentityError::Config(format!("identity endpoint host {host:?}: {e}")))?;
        Ok(Self {
            host,
            port: uri.port_u16().unwrap_or(8443),
            server_name,
        })
    }

    /// Overrides the name checked against the service's certificate (for example the
    /// Service DNS name while connecting to an IP address).
    pub fn with_server_name(mut self, name: &str) -> Result<Self, IdentityError> {
        self.server_name = ServerName::try_from(name.to_string())
            .map_err(|e| IdentityError::Config(format!("server name {name:?}: {e}")))?;
        Ok(self)
    }
}

/// Calls `POST /v1/certificate` over TLS 1.3 with the projected token read from disk.
#[derive(Clone)]
pub struct IdentityClient {
    endpoint: IdentityEndpoint,
    token_path: PathBuf,
    timeout: Duration,
}

impl IdentityClient {
    /// A client for `endpoint` reading the token from `token_path` before each request
    /// (the kubelet rewrites the projected token file as it refreshes it).
    pub fn new(endpoint: IdentityEndpoint, token_path: impl Into<PathBuf>) -> Self {
        Self {
            endpoint,
            token_path: token_path.into(),
            timeout: Duration::from_secs(30),
        }
    }

    /// Sets the timeout for one request (connect to response).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn read_token(&self) -> Result<String, IdentityError> {
        let token = tokio::fs::read_to_string(&self.token_path)
            .await
            .map_err(|source| IdentityError::Token {
                path: self.token_path.clone(),
                source,
            })?;
        Ok(token.trim().to_string())
    }

    async fn post(
        &self,
        csr_pem: &str,
        roots: &RootCertStore,
    ) -> Result<IssueResponse, IdentityError> {
        let token = self.read_token().await?;
        let body = serde_json::to_vec(&IssueRequest {
            csr: csr_pem.to_string(),
            token,
        })
        .map_err(|e| IdentityError::Http(e.to_string()))?;

        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError::Tls(e.to_string()))?
            .with_root_certificates(Arc::new(roots.clone()))
            .with_no_client_auth();
        let tcp = TcpStream::connect((self.endpoint.host.as_str(), self.endpoint.port))
            .await
            .map_err(IdentityError::Connect)?;
        let tls = TlsConnector::from(Arc::new(config))
            .connect(self.endpoint.server_name.clone(), tcp)
            .await
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| IdentityError::Http(e.to_string()))?;
        let driver = tokio::spawn(connection);

        let authority = format!("{}:{}", self.endpoint.host, self.endpoint.port);
        let request = Request::post(CERTIFICATE_PATH)
            .header(header::HOST, authority)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| IdentityError::Http(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| IdentityError::Http(e.to_string()))?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| IdentityError::Http(e.to_string()))?
            .to_bytes();
        driver.abort();

        if status == StatusCode::OK {
            return serde_json::from_slice(&bytes)
                .map_err(|e| IdentityError::InvalidResponse(e.to_string()));
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Err(IdentityError::Refused {
                status: status.as_u16(),
                reason: Some(body.reason),
                message: body.error,
            }),
            Err(_) => Err(IdentityError::Refused {
                status: status.as_u16(),
                reason: None,
                message: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
            }),
        }
    }
}

impl IssueCertificate for IdentityClient {
    fn issue<'a>(
        &'a self,
        csr_pem: &'a str,
        roots: &'a RootCertStore,
    ) -> BoxFuture<'a, Result<IssueResponse, IdentityError>> {
        Box::pin(async move {
            tokio::time::timeout(self.timeout, self.post(csr_pem, roots))
                .await
                .map_err(|_| IdentityError::Timeout(self.timeout))?
        })
    }
}

impl fmt::Debug for IdentityClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityClient")
            .field("endpoint", &self.endpoint)
            .field("token_path", &self.token_path)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_parsing() {
        let e =
            IdentityEndpoint::parse("https://portcullis-identity.portcullis-system.svc").unwrap();
        assert_eq!(e.port, 8443);
        assert_eq!(e.host, "portcullis-identity.portcullis-system.svc");
        let e = IdentityEndpoint::parse("https://127.0.0.1:9000").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("127.0.0.1", 9000));
        assert!(matches!(
            IdentityEndpoint::parse("http://x:1"),
            Err(IdentityError::Config(_))
        ));
        assert!(matches!(
            IdentityEndpoint::parse("not a url"),
            Err(IdentityError::Config(_))
        ));
    }
}
