//! Wrong secrets seen lately, so repeating one costs a lookup instead of a bcrypt run.
//! Entries are digests keyed with a per-process random salt: the cache holds nothing a
//! memory dump could test guesses against offline, and entries live `ttl` at most, so a
//! key re-issued with the same id is not refused for long.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};

use super::cache::{CacheKey, cache_key};

/// Bounded, expiring set of failed (token, key id, hash) digests.
#[derive(Debug)]
pub struct FailedKeyCache {
    salt: [u8; 32],
    ttl: Duration,
    capacity: usize,
    entries: Mutex<HashMap<CacheKey, Instant>>,
}

impl FailedKeyCache {
    /// A cache remembering up to `capacity` failures for `ttl` each.
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            salt: rand::random(),
            ttl,
            capacity: capacity.max(1),
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The keyed digest of a presented token checked against `hash` for `key_id`.
    pub fn digest(&self, token: &str, key_id: &str, hash: &str) -> CacheKey {
        let mut hasher = Sha256::new();
        hasher.update(self.salt);
        hasher.update(cache_key(token, key_id, hash));
        hasher.finalize().into()
    }

    /// Whether `digest` failed within the last `ttl`.
    pub fn failed_recently(&self, digest: &CacheKey, now: Instant) -> bool {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.get(digest).is_some_and(|until| *until > now)
    }

    /// Remembers a failure.
    pub fn insert(&self, digest: CacheKey, now: Instant) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= self.capacity {
            entries.retain(|_, until| *until > now);
            if entries.len() >= self.capacity
                && let Some(victim) = entries.keys().next().copied()
            {
                entries.remove(&victim);
            }
        }
        entries.insert(digest, now + self.ttl);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn failures_expire_and_the_digest_is_salted() {
        let cache = FailedKeyCache::new(Duration::from_secs(60), 2);
        let t0 = Instant::now();
        let d = cache.digest("ak_x", "id", "$2b$");
        assert_ne!(
            d,
            cache_key("ak_x", "id", "$2b$"),
            "keyed, not the plain digest"
        );
        assert_ne!(
            d,
            FailedKeyCache::new(Duration::from_secs(1), 1).digest("ak_x", "id", "$2b$"),
            "each process has its own salt"
        );
        assert!(!cache.failed_recently(&d, t0));
        cache.insert(d, t0);
        assert!(cache.failed_recently(&d, t0 + Duration::from_secs(59)));
        assert!(!cache.failed_recently(&d, t0 + Duration::from_secs(60)));
        for i in 0..5u8 {
            cache.insert([i; 32], t0);
        }
        assert!(cache.entries.lock().unwrap().len() <= 2);
    }
}
