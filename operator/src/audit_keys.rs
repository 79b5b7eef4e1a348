//! The collector's tenant keys, from the operator's policy server
//! (`GET /v1/audit-key/<tenant>`, the endpoint proxies use), asked with the audit
//! service's own certificate, which the policy server lets read every tenant's keys.
//! Tenants the store asks for are fetched at once (and again every few seconds while
//! the operator has none); the ones held are fetched again every few minutes, so a
//! rotated DEK is in use within that. Key material is never logged.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, StatusCode, header};
use portcullis_audit::TenantKeys;
use portcullis_collector::KeyCache;
use portcullis_server::oneshot::{self, Target};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often held keys are fetched again (a rotation adds a version).
pub const REFRESH_EVERY: Duration = Duration::from_secs(300);

/// How soon a tenant the operator had no key for is asked again.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// One request's deadline.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Largest answer accepted (a ring of a few dozen versions).
const MAX_ANSWER: usize = 64 * 1024;

/// Why one tenant's keys were not fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The exchange failed.
    #[error(transparent)]
    Request(#[from] oneshot::OneshotError),
    /// The operator holds no key for the tenant (not reconciled yet, or gone).
    #[error("the operator has no key for tenant {0:?} yet")]
    NoKey(String),
    /// The policy server refused the collector's certificate.
    #[error(
        "the policy server refused the collector's certificate (HTTP {0}); the operator must run the same Portcullis version, which lets the audit service read tenant keys"
    )]
    Refused(u16),
    /// Any other answer.
    #[error("the policy server answered HTTP {0}")]
    Status(u16),
    /// The answer is not the documented shape.
    #[error("the key answer is unusable: {0}")]
    Invalid(#[from] portcullis_audit::tenant_keys::InvalidAnswer),
}

/// Fetches `tenant`'s keys from `target`.
pub async fn fetch(
    target: &Target,
    tls: Arc<rustls::ClientConfig>,
    tenant: &str,
) -> Result<TenantKeys, FetchError> {
    let mut headers = HeaderMap::new();
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    let path = portcullis_api::audit_key::path(tenant);
    let (status, body) = oneshot::get(target, tls, &path, headers, MAX_ANSWER, TIMEOUT).await?;
    match status {
        StatusCode::OK => Ok(TenantKeys::from_answer(tenant, &body)?),
        StatusCode::NOT_FOUND => Err(FetchError::NoKey(tenant.to_owned())),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            Err(FetchError::Refused(status.as_u16()))
        }
        other => Err(FetchError::Status(other.as_u16())),
    }
}

/// Keeps `cache` supplied from `target` until `shutdown`; `tls` gives the client
/// configuration at each round (the certificate is renewed under it).
pub async fn supply<F, E>(cache: Arc<KeyCache>, target: Target, tls: F, shutdown: CancellationToken)
where
    F: Fn() -> Result<Arc<rustls::ClientConfig>, E>,
    E: std::fmt::Display,
{
    let mut next_refresh = Instant::now() + REFRESH_EVERY;
    loop {
        let refresh = Instant::now() >= next_refresh;
        let mut tenants = cache.wanted();
        if refresh {
            tenants.extend(cache.held());
            next_refresh = Instant::now() + REFRESH_EVERY;
        }
        if !tenants.is_empty() {
            match tls() {
                Ok(config) => {
                    for tenant in tenants {
                        match fetch(&target, config.clone(), &tenant).await {
                            Ok(keys) => {
                                tracing::debug!(%tenant, active_version = keys.active.version(), "tenant key at hand");
                                cache.insert(keys);
                            }
                            Err(e @ FetchError::NoKey(_)) => tracing::info!(error = %e),
                            Err(e) => {
                                tracing::warn!(%tenant, error = %e, "fetching the tenant's key failed; retrying")
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no client configuration to fetch tenant keys with")
                }
            }
        }
        let wait = if cache.wanted().is_empty() {
            next_refresh.saturating_duration_since(Instant::now())
        } else {
            RETRY_AFTER
        };
        tokio::select! {
            () = cache.asked() => {}
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
