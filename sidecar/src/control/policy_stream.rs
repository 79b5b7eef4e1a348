//! Policy from the operator: `GET https://<operator>:8090/v1/policy/<tenant>/watch`
//! over mTLS answers newline-delimited JSON `PolicyBundle`s (the current one first,
//! then one per change). The client reconnects with capped, jittered exponential
//! backoff and is fail-static: while the server is away the last good bundle stays in
//! force.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rand::Rng;
use rustls::pki_types::ServerName;
use tokio_util::sync::CancellationToken;

use crate::{
    config::StreamSource,
    metrics::Metrics,
    policy::{CompiledPolicy, Install, PolicyStore},
    tls::ClientConfigSource,
};

/// A bundle larger than this is refused (and the connection dropped).
pub const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why one watch session ended.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// No client TLS configuration yet (no certificate).
    #[error("no client certificate to present yet: {0}")]
    NoIdentity(String),
    /// TCP connect failed or timed out.
    #[error("connecting to the policy server: {0}")]
    Connect(std::io::Error),
    /// The host is not a valid TLS server name.
    #[error("policy server host is not a valid TLS server name")]
    ServerName,
    /// TLS handshake failed.
    #[error("TLS handshake with the policy server: {0}")]
    Tls(std::io::Error),
    /// The HTTP exchange failed.
    #[error("policy stream HTTP: {0}")]
    Http(#[from] hyper::Error),
    /// The server refused.
    #[error("policy server answered {0}")]
    Status(StatusCode),
    /// A line longer than [`MAX_LINE_BYTES`].
    #[error("policy bundle line longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong,
    /// The server closed the stream.
    #[error("policy server closed the stream")]
    Ended,
}

/// Follows the policy stream until `shutdown`, installing every newer bundle.
pub async fn follow(
    source: StreamSource,
    tls: ClientConfigSource,
    store: PolicyStore,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut backoff = source.min_backoff;
    loop {
        let mut received = 0usize;
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return,
            outcome = session(&source, &tls, &store, &metrics, &mut received) => outcome,
        };
        if received > 0 {
            backoff = source.min_backoff;
        }
        if let Err(e) = outcome {
            tracing::warn!(
                error = %e,
                retry_in_ms = backoff.as_millis() as u64,
                policy_version = store.load().map(|b| b.version),
                "policy stream interrupted; keeping the last good policy"
            );
        }
        let jitter = rand::rng().random_range(0.5..1.0);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
        }
        backoff = (backoff * 2).min(source.max_backoff);
    }
}

async fn session(
    source: &StreamSource,
    tls: &ClientConfigSource,
    store: &PolicyStore,
    metrics: &Metrics,
    received: &mut usize,
) -> Result<(), StreamError> {
    let config = tls().map_err(|e| StreamError::NoIdentity(e.to_string()))?;
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect((source.host.as_str(), source.port)),
    )
    .await
    .map_err(|_| StreamError::Connect(std::io::ErrorKind::TimedOut.into()))?
    .map_err(StreamError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let server_name =
        ServerName::try_from(source.host.clone()).map_err(|_| StreamError::ServerName)?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(server_name, tcp)
        .await
        .map_err(StreamError::Tls)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(connection);
    let request = Request::get(portcullis_api::policy::watch_path(&source.tenant))
        .header(header::HOST, format!("{}:{}", source.host, source.port))
        .header(header::ACCEPT, "application/x-ndjson")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|_| StreamError::ServerName)?;
    let result = async {
        let response = sender.send_request(request).await?;
        if response.status() != StatusCode::OK {
            return Err(StreamError::Status(response.status()));
        }
        let mut body = response.into_body();
        let mut buffer = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            buffer.extend_from_slice(&data);
            while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
                let line = buffer.split_to(end + 1);
                if apply_line(&line[..end], &source.tenant, store, metrics) {
                    *received += 1;
                }
            }
            if buffer.len() > MAX_LINE_BYTES {
                buffer.advance(buffer.len());
                return Err(StreamError::LineTooLong);
            }
        }
        Err(StreamError::Ended)
    }
    .await;
    driver.abort();
    result
}

/// Parses and installs one line; true when it held a usable bundle.
fn apply_line(line: &[u8], tenant: &str, store: &PolicyStore, metrics: &Metrics) -> bool {
    let line = line.trim_ascii();
    if line.is_empty() {
        return false; // keep-alive
    }
    let bundle: CompiledPolicy = match serde_json::from_slice(line) {
        Ok(bundle) => bundle,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring a policy stream line that is not a PolicyBundle");
            metrics.policy_update("stream", "invalid", None);
            return false;
        }
    };
    if bundle.tenant != tenant {
        tracing::warn!(expected = tenant, got = %bundle.tenant, "ignoring a policy bundle for another tenant");
        metrics.policy_update("stream", "wrong_tenant", None);
        return false;
    }
    match store.install(bundle) {
        Install::Installed { version } => {
            tracing::info!(version, "policy updated from the operator");
            metrics.policy_update("stream", "installed", Some(version));
        }
        Install::Stale { current, offered } => {
            tracing::debug!(
                current,
                offered,
                "ignoring a policy bundle that is not newer"
            );
            metrics.policy_update("stream", "stale", None);
        }
    }
    true
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use portcullis_crds::PolicyBundle;

    use super::*;

    #[test]
    fn lines_for_other_tenants_or_garbage_are_ignored() {
        let store = PolicyStore::new();
        let metrics = Metrics::new();
        assert!(!apply_line(b"   ", "acme", &store, &metrics));
        assert!(!apply_line(b"{oops", "acme", &store, &metrics));
        let other = serde_json::to_vec(&PolicyBundle {
            version: 1,
            tenant: "globex".into(),
            ..Default::default()
        })
        .unwrap();
        assert!(!apply_line(&other, "acme", &store, &metrics));
        assert!(!store.is_ready());
        let ours = serde_json::to_vec(&PolicyBundle {
            version: 1,
            tenant: "acme".into(),
            ..Default::default()
        })
        .unwrap();
        assert!(apply_line(&ours, "acme", &store, &metrics));
        assert_eq!(store.load().unwrap().version, 1);
    }
}
