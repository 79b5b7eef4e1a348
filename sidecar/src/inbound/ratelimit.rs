//! Per-key GCRA rate limits (governor direct limiters, one per key id). A limiter is
//! rebuilt when its key's `RateLimitPolicy` changes and dropped when the key leaves the
//! policy. Lookups are lock-free; only building a limiter takes the writer lock. The
//! clock is a type parameter so tests move time by hand.
//!
//! Response headers: `RateLimit-Limit` is the burst (requests allowed at once),
//! `RateLimit-Remaining` what is left of it, `RateLimit-Reset` the seconds until it is
//! full again, and on 429 `Retry-After` the seconds until the next request may pass.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwap;
use governor::{
    Quota, RateLimiter,
    clock::{Clock, DefaultClock},
    middleware::StateInformationMiddleware,
    state::{InMemoryState, NotKeyed},
};
use http::{HeaderName, HeaderValue};
use portcullis_crds::RateLimitPolicy;

use crate::{
    listener::deny::{Denial, Reason},
    policy::CompiledPolicy,
};

type Limiter<C> = RateLimiter<NotKeyed, InMemoryState, C, StateInformationMiddleware>;

struct Entry<C: Clock> {
    policy: RateLimitPolicy,
    limiter: Option<Limiter<C>>, // None: the policy allows no requests at all
}

/// The outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the request may pass.
    pub allowed: bool,
    /// Burst size.
    pub limit: u32,
    /// Requests left in the burst.
    pub remaining: u32,
    /// Until the burst is full again.
    pub reset: Duration,
    /// Until the next request may pass (only when refused).
    pub retry_after: Option<Duration>,
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl Verdict {
    /// `RateLimit-*` headers, plus `Retry-After` when refused.
    pub fn headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        self.entries().collect()
    }

    /// Sets [`Self::headers`] on `map`, replacing any of the same names.
    pub fn insert_headers(&self, map: &mut http::HeaderMap) {
        for (name, value) in self.entries() {
            map.insert(name, value);
        }
    }

    fn entries(&self) -> impl Iterator<Item = (HeaderName, HeaderValue)> + use<> {
        let limits = [
            (
                HeaderName::from_static("ratelimit-limit"),
                HeaderValue::from(self.limit),
            ),
            (
                HeaderName::from_static("ratelimit-remaining"),
                HeaderValue::from(self.remaining),
            ),
            (
                HeaderName::from_static("ratelimit-reset"),
                HeaderValue::from(ceil_secs(self.reset)),
            ),
        ];
        let retry = self.retry_after.map(|wait| {
            (
                http::header::RETRY_AFTER,
                HeaderValue::from(ceil_secs(wait).max(1)),
            )
        });
        limits.into_iter().chain(retry)
    }
}

/// Every key's limiter.
pub struct RateLimits<C: Clock = DefaultClock> {
    clock: C,
    limiters: ArcSwap<HashMap<Box<str>, Arc<Entry<C>>>>,
    writer: Mutex<()>,
}

impl<C: Clock> std::fmt::Debug for RateLimits<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("keys", &self.limiters.load().len())
            .finish()
    }
}

impl Default for RateLimits<DefaultClock> {
    fn default() -> Self {
        Self::with_clock(DefaultClock::default())
    }
}

fn quota(policy: &RateLimitPolicy) -> Option<Quota> {
    let requests = NonZeroU32::new(policy.requests)?;
    let period = Duration::from_millis(policy.per_ms.max(1)) / requests.get();
    let burst = NonZeroU32::new(policy.burst).unwrap_or(NonZeroU32::MIN);
    Some(Quota::with_period(period.max(Duration::from_nanos(1)))?.allow_burst(burst))
}

impl<C: Clock + Clone> RateLimits<C> {
    /// Limits timed by `clock`.
    pub fn with_clock(clock: C) -> Self {
        Self {
            clock,
            limiters: ArcSwap::from_pointee(HashMap::new()),
            writer: Mutex::new(()),
        }
    }

    /// The rate-limit step: the verdict when the request may pass, a 429 denial with
    /// `Retry-After` and the `RateLimit-*` headers when it may not.
    pub fn admit(
        &self,
        key: &str,
        policy: &RateLimitPolicy,
        bundle: &CompiledPolicy,
    ) -> Result<Verdict, Denial> {
        let verdict = self.check(key, policy, bundle);
        if verdict.allowed {
            return Ok(verdict);
        }
        let mut denial = Denial::new(
            Reason::RateLimited,
            "this API key is over its rate limit; wait for the number of seconds in Retry-After",
        );
        denial.headers = verdict.headers();
        Err(denial)
    }

    /// Takes one request from the allowance of the key with id `key` under `policy`.
    pub fn check(&self, key: &str, policy: &RateLimitPolicy, bundle: &CompiledPolicy) -> Verdict {
        let entry = match self.limiters.load().get(key) {
            Some(entry) if entry.policy == *policy => entry.clone(),
            _ => self.rebuild(key, policy, bundle),
        };
        let Some(limiter) = &entry.limiter else {
            let window = Duration::from_millis(policy.per_ms);
            return Verdict {
                allowed: false,
                limit: 0,
                remaining: 0,
                reset: window,
                retry_after: Some(window),
            };
        };
        let burst = limiter_burst(policy);
        let interval = quota(policy)
            .map(|q| q.replenish_interval())
            .unwrap_or_default();
        match limiter.check() {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                Verdict {
                    allowed: true,
                    limit: burst,
                    remaining,
                    reset: interval * burst.saturating_sub(remaining),
                    retry_after: None,
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                Verdict {
                    allowed: false,
                    limit: burst,
                    remaining: 0,
                    reset: interval * burst,
                    retry_after: Some(wait),
                }
            }
        }
    }

    fn rebuild(
        &self,
        key: &str,
        policy: &RateLimitPolicy,
        bundle: &CompiledPolicy,
    ) -> Arc<Entry<C>> {
        let _guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        // Another request may have built it while we waited.
        if let Some(entry) = self.limiters.load().get(key)
            && entry.policy == *policy
        {
            return entry.clone();
        }
        let entry = Arc::new(Entry {
            policy: *policy,
            limiter: quota(policy).map(|q| {
                RateLimiter::direct_with_clock(q, self.clock.clone())
                    .with_middleware::<StateInformationMiddleware>()
            }),
        });
        let mut next: HashMap<Box<str>, Arc<Entry<C>>> = self
            .limiters
            .load()
            .iter()
            .filter(|(id, _)| bundle.contains_key(id))
            .map(|(id, e)| (id.clone(), e.clone()))
            .collect();
        next.insert(Box::from(key), entry.clone());
        self.limiters.store(Arc::new(next));
        entry
    }
}

fn limiter_burst(policy: &RateLimitPolicy) -> u32 {
    policy.burst.max(1)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn key() -> &'static str {
        "abcdefgh2345"
    }

    fn bundle() -> CompiledPolicy {
        let mut bundle = portcullis_crds::PolicyBundle::default();
        bundle.keys.insert(
            portcullis_crds::KeyId::parse(key()).unwrap(),
            portcullis_crds::KeyPolicy {
                name: "a/b".into(),
                hash: String::new(),
                scopes: Default::default(),
                rate_limit: RateLimitPolicy::default(),
                ip_allowlist: vec![],
                expires_at: None,
                revoked: false,
            },
        );
        bundle.into()
    }

    #[test]
    fn burst_then_refusal_then_refill_with_a_fake_clock() {
        let clock = FakeRelativeClock::default();
        let limits = RateLimits::with_clock(clock.clone());
        let policy = RateLimitPolicy {
            requests: 60,
            per_ms: 60_000,
            burst: 2,
        };
        let first = limits.check(key(), &policy, &bundle());
        assert!(first.allowed);
        assert_eq!((first.limit, first.remaining), (2, 1));
        assert!(limits.check(key(), &policy, &bundle()).allowed);
        let refused = limits.check(key(), &policy, &bundle());
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, Some(Duration::from_secs(1)));
        let headers = refused.headers();
        assert!(headers.iter().any(|(n, v)| n == "retry-after" && v == "1"));
        clock.advance(Duration::from_secs(1));
        assert!(limits.check(key(), &policy, &bundle()).allowed);
    }

    #[test]
    fn a_changed_policy_rebuilds_the_limiter() {
        let clock = FakeRelativeClock::default();
        let limits = RateLimits::with_clock(clock);
        let tight = RateLimitPolicy {
            requests: 1,
            per_ms: 3_600_000,
            burst: 1,
        };
        assert!(limits.check(key(), &tight, &bundle()).allowed);
        assert!(!limits.check(key(), &tight, &bundle()).allowed);
        let loose = RateLimitPolicy {
            requests: 100,
            per_ms: 1_000,
            burst: 10,
        };
        assert!(limits.check(key(), &loose, &bundle()).allowed);
        let zero = RateLimitPolicy {
            requests: 0,
            per_ms: 1_000,
            burst: 10,
        };
        assert!(!limits.check(key(), &zero, &bundle()).allowed);
    }
}
