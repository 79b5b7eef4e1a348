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

/// The longest wait between asks while the policy server cannot be reached.
const UNREACHABLE_CAP: Duration = Duration::from_secs(30);

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
    /// No certificate to present.
    #[error("no client certificate to present: {0}")]
    NoIdentity(String),
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
/// configuration at each ask (the certificate is renewed under it).
pub async fn supply<F, E>(cache: Arc<KeyCache>, target: Target, tls: F, shutdown: CancellationToken)
where
    F: Fn() -> Result<Arc<rustls::ClientConfig>, E>,
    E: std::fmt::Display,
{
    let target = &target;
    let tls = &tls;
    supply_with(
        cache,
        |tenant: String| async move {
            let config = tls().map_err(|e| FetchError::NoIdentity(e.to_string()))?;
            fetch(target, config, &tenant).await
        },
        shutdown,
    )
    .await;
}

/// Keeps `cache` supplied by `fetch` until `shutdown`. A tenant the operator has no
/// key for is asked again after 5 s, then twice as long each time up to
/// [`REFRESH_EVERY`] (a new Tenant's key comes within seconds; a deleted Tenant's
/// never does); while the policy server cannot be reached, up to 30 s.
pub async fn supply_with<F, Fut>(cache: Arc<KeyCache>, fetch: F, shutdown: CancellationToken)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<TenantKeys, FetchError>>,
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
        for tenant in tenants {
            match fetch(tenant.clone()).await {
                Ok(keys) => {
                    tracing::debug!(%tenant, active_version = keys.active.version(), "tenant key at hand");
                    later.remove(&tenant);
                    cache.insert(keys);
                }
                Err(e) => {
                    // No key: a deleted Tenant's never comes, so ask less and less
                    // often; the operator unreachable: it is back soon.
                    let cap = if matches!(e, FetchError::NoKey(_)) {
                        REFRESH_EVERY
                    } else {
                        UNREACHABLE_CAP
                    };
                    let wait = later
                        .get(&tenant)
                        .map_or(RETRY_AFTER, |(_, wait)| (*wait * 2).min(cap));
                    if matches!(e, FetchError::NoKey(_)) {
                        tracing::info!(error = %e, retry_in = ?wait);
                    } else {
                        tracing::warn!(%tenant, error = %e, retry_in = ?wait, "fetching the tenant's key failed");
                    }
                    later.insert(tenant, (Instant::now() + wait, wait));
                }
            }
        }
        let wanted = cache.wanted();
        later.retain(|tenant, _| wanted.contains(tenant));
        let next_ask = later.values().map(|(at, _)| *at).min();
        let until = next_ask.map_or(next_refresh, |at| at.min(next_refresh));
        tokio::select! {
            () = cache.asked() => {}
            () = tokio::time::sleep_until(until) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A new Tenant's key is not there at first: it is asked for after 5, 10 and 20 s
    /// and taken when it comes, not every few milliseconds and not minutes later.
    #[tokio::test(start_paused = true)]
    async fn a_missing_key_is_asked_for_again_less_and_less_often() {
        let cache = Arc::new(KeyCache::new());
        assert!(cache.get("shop").is_none());
        let asks = Arc::new(AtomicUsize::new(0));
        let counted = asks.clone();
        let fetch = move |tenant: String| {
            let asked = counted.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if asked < 4 {
                    Err(FetchError::NoKey(tenant))
                } else {
                    Ok(TenantKeys::generate(&tenant))
                }
            }
        };
        let stop = CancellationToken::new();
        let start = Instant::now();
        let supplier = tokio::spawn(supply_with(cache.clone(), fetch, stop.clone()));
        let at = |seconds: u64, expected: usize| {
            let (asks, cache) = (asks.clone(), cache.clone());
            async move {
                tokio::time::sleep_until(start + Duration::from_secs(seconds)).await;
                assert_eq!(asks.load(Ordering::SeqCst), expected, "at {seconds} s");
                cache.get("shop").is_some()
            }
        };
        assert!(!at(1, 1).await);
        assert!(!at(6, 2).await);
        assert!(!at(16, 3).await);
        assert!(!at(34, 3).await);
        assert!(at(36, 4).await, "the key is taken on the fourth ask");
        assert!(at(200, 4).await, "nothing more is asked until the refresh");
        stop.cancel();
        let _ = supplier.await;
    }
}
