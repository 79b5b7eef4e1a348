//! The verified-key cache: a set of SHA-256 digests over (presented token, key id,
//! bcrypt hash in the policy). A hit proves this exact token was bcrypt-verified
//! against this exact hash, so rotating a key (new hash) misses by construction.
//! Expiry and revocation are not cached: they are checked on every request.

use std::{collections::HashSet, sync::RwLock};

use sha2::{Digest, Sha256};

/// Digest identifying one (token, key id, hash) triple.
pub type CacheKey = [u8; 32];

/// The digest for a presented token checked against `hash` for `key_id`.
pub fn cache_key(token: &str, key_id: &str, hash: &str) -> CacheKey {
    let mut hasher = Sha256::new();
    // Length prefixes keep the three fields from running into each other.
    for part in [token, key_id, hash] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    hasher.finalize().into()
}

/// Bounded set of verified digests.
#[derive(Debug)]
pub struct VerifiedKeyCache {
    entries: RwLock<HashSet<CacheKey>>,
    capacity: usize,
}

impl VerifiedKeyCache {
    /// A cache holding at most `capacity` digests.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: RwLock::new(HashSet::new()),
            capacity: capacity.max(1),
        }
    }

    /// Whether `key` was verified before.
    pub fn contains(&self, key: &CacheKey) -> bool {
        self.entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
    }

    /// Remembers a verified digest, evicting an arbitrary one when full.
    pub fn insert(&self, key: CacheKey) {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= self.capacity
            && let Some(victim) = entries.iter().next().copied()
        {
            entries.remove(&victim);
        }
        entries.insert(key);
    }

    /// Digests held.
    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn digest_depends_on_token_key_id_and_hash() {
        let base = cache_key("ak_token", "abcdefgh2345", "$2b$04$x");
        assert_ne!(base, cache_key("ak_tokem", "abcdefgh2345", "$2b$04$x"));
        assert_ne!(base, cache_key("ak_token", "abcdefgh2346", "$2b$04$x"));
        assert_ne!(base, cache_key("ak_token", "abcdefgh2345", "$2b$04$y"));
        // Field boundaries matter.
        assert_ne!(cache_key("ab", "c", "d"), cache_key("a", "bc", "d"));
    }

    #[test]
    fn cache_is_bounded() {
        let cache = VerifiedKeyCache::new(2);
        for i in 0..5u8 {
            cache.insert([i; 32]);
        }
        assert_eq!(cache.len(), 2);
        assert!(cache.contains(&[4; 32]));
    }
}
