//! One-shot requests to the operator's policy server over mTLS (the policy stream has
//! its own long-lived client in [`super::policy_stream`]): the workload certificate,
//! through [`portcullis_server::oneshot`].

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use portcullis_server::oneshot::{self, OneshotError, Target};

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
    /// The exchange failed.
    #[error(transparent)]
    Request(#[from] OneshotError),
}

/// `GET path` on `endpoint`; the status and body (at most [`MAX_BODY_BYTES`]).
pub async fn get(
    endpoint: &OperatorEndpoint,
    tls: &ClientConfigSource,
    path: &str,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), OperatorError> {
    let config = tls().map_err(|e| OperatorError::NoIdentity(e.to_string()))?;
    let target = Target::new(&endpoint.host, endpoint.port);
    let mut headers = HeaderMap::new();
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    Ok(oneshot::get(&target, config, path, headers, MAX_BODY_BYTES, timeout).await?)
}
