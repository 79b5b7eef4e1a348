//! How many uncached key checks a key id and a client address may spend: token buckets
//! charged before bcrypt runs and refunded when the key turns out right, so only
//! failures (and checks still running) count. Over budget, the request is refused
//! without bcrypt, so guessing costs the guesser time instead of the proxy CPU.
//!
//! Hand-written rather than governor: a governor cell cannot be given back, and the
//! budget must count failures, not attempts.

use std::{
    collections::HashMap,
    hash::Hash,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

/// One bucket: `burst` failures at once, one more every `refill`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketLimit {
    /// Failures allowed at once.
    pub burst: u32,
    /// Time for one failure to be forgiven.
    pub refill: Duration,
}

/// The failure budgets and the negative cache of a [`super::KeyVerifier`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailureLimits {
    /// Per key id (known or not: an unknown id is charged the same, so the budget
    /// does not tell which ids exist).
    pub per_key: BucketLimit,
    /// Per client address (IPv6 by /64).
    pub per_client: BucketLimit,
    /// How long a wrong secret is remembered as wrong.
    pub negative_ttl: Duration,
    /// Wrong secrets remembered at most.
    pub negative_capacity: usize,
    /// Buckets kept per map at most.
    pub tracked: usize,
}

impl Default for FailureLimits {
    fn default() -> Self {
        Self {
            per_key: BucketLimit {
                burst: 10,
                refill: Duration::from_secs(6),
            },
            per_client: BucketLimit {
                burst: 20,
                refill: Duration::from_secs(3),
            },
            negative_ttl: Duration::from_secs(60),
            negative_capacity: 10_000,
            tracked: 100_000,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Token buckets by key; a missing entry is a full bucket.
#[derive(Debug)]
pub struct Buckets<K> {
    limit: BucketLimit,
    capacity: usize,
    map: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    /// Buckets of `limit`, at most `capacity` tracked.
    pub fn new(limit: BucketLimit, capacity: usize) -> Self {
        Self {
            limit,
            capacity: capacity.max(1),
            map: Mutex::new(HashMap::new()),
        }
    }

    fn burst(&self) -> f64 {
        f64::from(self.limit.burst.max(1))
    }

    fn refilled(&self, bucket: Bucket, now: Instant) -> f64 {
        let per = self.limit.refill.as_secs_f64().max(1e-3);
        let gained = now.saturating_duration_since(bucket.updated).as_secs_f64() / per;
        (bucket.tokens + gained).min(self.burst())
    }

    /// Takes one token, or says how long until one is back. `Ok(true)` when nothing
    /// was charged before (no recent failure, no check running): a first-seen key.
    /// One lock for both, so concurrent first attempts cannot all count as first.
    pub fn take(&self, key: &K, now: Instant) -> Result<bool, Duration> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let tokens = map
            .get(key)
            .map_or(self.burst(), |bucket| self.refilled(*bucket, now));
        if tokens < 1.0 {
            return Err(self.limit.refill.mul_f64(1.0 - tokens));
        }
        let first = tokens >= self.burst();
        if map.len() >= self.capacity && !map.contains_key(key) {
            // Full buckets carry no information; drop them first, then anyone.
            map.retain(|_, bucket| self.refilled(*bucket, now) < self.burst());
            if map.len() >= self.capacity
                && let Some(victim) = map.keys().next().cloned()
            {
                map.remove(&victim);
            }
        }
        map.insert(
            key.clone(),
            Bucket {
                tokens: tokens - 1.0,
                updated: now,
            },
        );
        Ok(first)
    }

    /// Gives back a token taken for a check that did not fail.
    pub fn refund(&self, key: &K, now: Instant) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bucket) = map.get(key).copied() {
            let tokens = self.refilled(bucket, now) + 1.0;
            if tokens >= self.burst() {
                map.remove(key);
            } else {
                map.insert(
                    key.clone(),
                    Bucket {
                        tokens,
                        updated: now,
                    },
                );
            }
        }
    }
}

/// The client bucket an address falls in: the address itself for IPv4, its /64 for
/// IPv6 (one host usually holds a whole /64).
pub fn client_bucket(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn buckets() -> Buckets<&'static str> {
        Buckets::new(
            BucketLimit {
                burst: 2,
                refill: Duration::from_secs(10),
            },
            2,
        )
    }

    #[test]
    fn burst_then_refused_until_refilled() {
        let b = buckets();
        let t0 = Instant::now();
        assert!(b.take(&"k", t0).unwrap(), "first seen");
        assert!(!b.take(&"k", t0).unwrap(), "charged now");
        let wait = b.take(&"k", t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(10));
        b.take(&"k", t0 + Duration::from_secs(10)).unwrap();
    }

    #[test]
    fn refunds_forgive_checks_that_did_not_fail() {
        let b = buckets();
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(b.take(&"k", t0).unwrap(), "each check starts clear");
            b.refund(&"k", t0);
        }
    }

    #[test]
    fn tracking_is_bounded() {
        let b = buckets();
        let t0 = Instant::now();
        for key in ["a", "b", "c", "d"] {
            b.take(&key, t0).unwrap();
        }
        assert!(b.map.lock().unwrap().len() <= 2);
    }

    #[test]
    fn ipv6_clients_are_bucketed_by_slash_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_bucket(a), client_bucket(b));
        assert_ne!(client_bucket(a), client_bucket(c));
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(client_bucket(v4), v4);
    }
}
