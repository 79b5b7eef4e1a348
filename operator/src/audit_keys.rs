//! The collector's tenant keys, from the operator's policy server
//! (`GET /v1/audit-key/<tenant>`, the endpoint proxies use), asked with the audit
//! service's own certificate, which the policy server lets read every tenant's keys.
//! Tenants the store asks for are fetched at once (and again, less and less often,
//! while the operator has none); the ones held are fetched again every few minutes, so
//! a rotated DEK is in use within that. Key material is never logged.

use std::collections::HashMap;
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
/// configuration at each round (the certificate is renewed under it). A tenant the
/// operator has no key for is asked again after 5 s, then twice as long each time up
/// to [`REFRESH_EVERY`] (a new Tenant's key comes within seconds; a deleted Tenant's
/// never does).
pub async fn supply<F, E>(cache: Arc<KeyCache>, target: Target, tls: F, shutdown: CancellationToken)
where
    F: Fn() -> Result<Arc<rustls::ClientConfig>, E>,
    E: std::fmt::Display,
{
    let mut next_refresh = Instant::now() + REFRESH_EVERY;
    // Per tenant without a key: when to ask again, and the wait after that.
    let mut later: HashMap<String, (Instant, Duration)> = HashMap::new();
    loop {
        let now = Instant::now();
        let mut tenants: Vec<String> = cache
            .wanted()
            .into_iter()
            .filter(|t| later.get(t).is_none_or(|(at, _)| *at <= now))
            .collect();
        if now >= next_refresh {
            tenants.extend(cache.held());
            next_refresh = now + REFRESH_EVERY;
        }
        let mut retry_soon = false;
        if !tenants.is_empty() {
            match tls() {
                Ok(config) => {
                    for tenant in tenants {
                        match fetch(&target, config.clone(), &tenant).await {
                            Ok(keys) => {
                                tracing::debug!(%tenant, active_version = keys.active.version(), "tenant key at hand");
                                later.remove(&tenant);
                                cache.insert(keys);
                            }
                            Err(e) => {
                                let wait = later.get(&tenant).map_or(RETRY_AFTER, |(_, wait)| {
                                    (*wait * 2).min(REFRESH_EVERY)
                                });
                                if matches!(e, FetchError::NoKey(_)) {
                                    tracing::info!(error = %e, retry_in = ?wait);
                                } else {
                                    tracing::warn!(%tenant, error = %e, retry_in = ?wait, "fetching the tenant's key failed");
                                }
                                later.insert(tenant, (Instant::now() + wait, wait));
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no client configuration to fetch tenant keys with");
                    retry_soon = true;
                }
            }
        }
        let wanted = cache.wanted();
        later.retain(|tenant, _| wanted.contains(tenant));
        let next_ask = later.values().map(|(at, _)| *at).min();
        let mut until = next_ask.map_or(next_refresh, |at| at.min(next_refresh));
        if retry_soon {
            until = until.min(Instant::now() + RETRY_AFTER);
        }
        tokio::select! {
            () = cache.asked() => {}
            () = tokio::time::sleep_until(until) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
