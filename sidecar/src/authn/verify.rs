//! Checking a presented key against the policy in force: format (checksum first, no
//! hashing), key id lookup, the verified-key cache, bcrypt on a miss, then expiry and
//! revocation on every request, cache or not.
//!
//! bcrypt runs on tokio's blocking pool behind a semaphore of `bcrypt_workers`
//! permits. A request waits at most `bcrypt_wait` for a permit, then gets 503 `busy`:
//! a flood of wrong keys cannot queue without bound. Concurrent misses for the same
//! token share one verification.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use jiff::Timestamp;
use portcullis_crds::{ApiToken, token};
use tokio::sync::{Semaphore, watch};

use super::cache::{CacheKey, VerifiedKeyCache, cache_key};
use crate::{
    deny::{Denial, Reason},
    metrics::Metrics,
    policy::{CompiledPolicy, KeyRef},
};

/// `ak_***` and the last 3 characters of a presented key, inline (no allocation);
/// the form for headers, logs and audit, same as `portcullis_crds::token::mask`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct MaskedKey {
    text: [u8; 9],
    len: u8,
}

impl MaskedKey {
    /// The mask of `presented` (a checked key: ASCII).
    pub fn of(presented: &str) -> Self {
        let mut text = *b"ak_******";
        let tail = presented.as_bytes().last_chunk::<3>();
        match tail {
            // Too short to hide anything, or a tail that is not plain ASCII (never the
            // case for a checked key): masked whole, like `token::mask`.
            Some(tail) if presented.len() >= 12 && tail.is_ascii() => {
                text[6..].copy_from_slice(tail);
                Self { text, len: 9 }
            }
            _ => Self { text, len: 6 },
        }
    }

    /// As text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.text[..usize::from(self.len)]).unwrap_or("ak_***")
    }
}

impl std::fmt::Display for MaskedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for MaskedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

/// A key that passed every check, borrowed from the policy it was checked against.
#[derive(Clone, Copy, Debug)]
pub struct VerifiedKey<'a> {
    /// Its public id.
    pub key_id: &'a str,
    /// `ak_***xyz`, for headers, logs and audit.
    pub masked: MaskedKey,
    /// Its policy at the time of the check.
    pub policy: KeyRef<'a>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Valid,
    Invalid,
    Busy,
}

/// Verifies keys; shared by every connection.
#[derive(Debug)]
pub struct KeyVerifier {
    cache: VerifiedKeyCache,
    workers: Arc<Semaphore>,
    wait: Duration,
    metrics: Metrics,
    pending: Mutex<HashMap<CacheKey, watch::Receiver<Option<Outcome>>>>,
}

fn malformed(e: token::TokenError) -> Denial {
    Denial::new(
        Reason::MalformedKey,
        format!("{e}; send the key exactly as issued (ak_...)"),
    )
}

impl KeyVerifier {
    /// A verifier with `workers` concurrent bcrypt checks, each request waiting at most
    /// `wait` for one, and a cache of `cache_capacity` verified keys.
    pub fn new(workers: usize, wait: Duration, cache_capacity: usize, metrics: Metrics) -> Self {
        Self {
            cache: VerifiedKeyCache::new(cache_capacity),
            workers: Arc::new(Semaphore::new(workers.max(1))),
            wait,
            metrics,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Checks `presented` against `policy` at time `now`. A cache hit allocates nothing.
    pub async fn verify<'p>(
        self: &Arc<Self>,
        presented: &str,
        policy: &'p CompiledPolicy,
        now: Timestamp,
    ) -> Result<VerifiedKey<'p>, Denial> {
        let key_id = token::check(presented).map_err(malformed)?;
        let Some(key) = policy.key(key_id) else {
            return Err(Denial::new(
                Reason::UnknownKey,
                "this API key is not known to this service; check you are calling the right tenant or ask for a new key",
            ));
        };
        let digest = cache_key(presented, key_id, key.hash());
        let hit = self.cache.contains(&digest);
        self.metrics.key_cache(hit);
        if !hit {
            // Owned copies only for the bcrypt task, which may outlive this request.
            let token = ApiToken::parse(presented).map_err(malformed)?;
            match self.verify_once(digest, token, key.hash().to_owned()).await {
                Outcome::Valid => {}
                Outcome::Invalid => {
                    return Err(Denial::new(
                        Reason::InvalidKey,
                        "this API key does not match the one issued; send the full key from the Secret",
                    ));
                }
                Outcome::Busy => {
                    self.metrics.bcrypt_busy();
                    return Err(Denial::new(
                        Reason::Busy,
                        "too many new API keys are being checked right now; retry in a moment",
                    ));
                }
            }
        }
        // Only the holder of the secret learns the key's state.
        if key.revoked() {
            return Err(Denial::new(
                Reason::KeyRevoked,
                "this API key was revoked; ask a key admin for a new one",
            ));
        }
        if key.expires_at().is_some_and(|at| at <= now) {
            return Err(Denial::new(
                Reason::KeyExpired,
                "this API key has expired; rotate it or ask for a new one",
            ));
        }
        Ok(VerifiedKey {
            key_id: key.key_id(),
            masked: MaskedKey::of(presented),
            policy: key,
        })
    }

    /// Runs (or joins) the bcrypt check for `digest`. The work runs in its own task so
    /// a caller that goes away does not strand the others waiting on it.
    async fn verify_once(
        self: &Arc<Self>,
        digest: CacheKey,
        token: ApiToken,
        hash: String,
    ) -> Outcome {
        let mut receiver = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            match pending.get(&digest) {
                Some(receiver) => receiver.clone(),
                None => {
                    let (sender, receiver) = watch::channel(None);
                    pending.insert(digest, receiver.clone());
                    let this = self.clone();
                    tokio::spawn(async move {
                        let outcome = this.run_bcrypt(token, hash).await;
                        if outcome == Outcome::Valid {
                            this.cache.insert(digest);
                        }
                        this.pending
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&digest);
                        let _ = sender.send(Some(outcome));
                    });
                    receiver
                }
            }
        };
        match receiver.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.unwrap_or(Outcome::Busy),
            Err(_) => Outcome::Busy,
        }
    }

    async fn run_bcrypt(&self, token: ApiToken, hash: String) -> Outcome {
        let Ok(Ok(permit)) =
            tokio::time::timeout(self.wait, self.workers.clone().acquire_owned()).await
        else {
            return Outcome::Busy;
        };
        let gauge = self.metrics.bcrypt_in_flight().clone();
        gauge.inc();
        let result = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            token.verify(&hash)
        })
        .await;
        gauge.dec();
        match result {
            Ok(true) => Outcome::Valid,
            Ok(false) => Outcome::Invalid,
            Err(_) => Outcome::Busy,
        }
    }

    /// Verified digests cached.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use portcullis_crds::{KeyPolicy, PolicyBundle, RateLimitPolicy};

    use super::*;

    fn bundle_with(token: &ApiToken, revoked: bool, expires_at: Option<Timestamp>) -> PolicyBundle {
        PolicyBundle {
            version: 1,
            tenant: "acme".into(),
            keys: BTreeMap::from([(
                token.key_id().clone(),
                KeyPolicy {
                    name: "acme/k".into(),
                    hash: token.hash(4).unwrap(),
                    scopes: BTreeSet::from(["events".to_owned()]),
                    rate_limit: RateLimitPolicy::default(),
                    ip_allowlist: vec![],
                    expires_at,
                    revoked,
                },
            )]),
            ..PolicyBundle::default()
        }
    }

    fn compiled(bundle: &PolicyBundle) -> CompiledPolicy {
        CompiledPolicy::from(bundle.clone())
    }

    fn verifier(metrics: &Metrics) -> Arc<KeyVerifier> {
        Arc::new(KeyVerifier::new(
            2,
            Duration::from_secs(5),
            100,
            metrics.clone(),
        ))
    }

    #[tokio::test]
    async fn second_use_hits_the_cache() {
        let metrics = Metrics::new();
        let verifier = verifier(&metrics);
        let token = ApiToken::generate();
        let bundle = compiled(&bundle_with(&token, false, None));
        let now = Timestamp::now();
        let key = verifier
            .verify(token.expose_secret(), &bundle, now)
            .await
            .unwrap();
        assert_eq!(key.masked.as_str(), token.masked());
        let key = verifier
            .verify(token.expose_secret(), &bundle, now)
            .await
            .unwrap();
        assert_eq!(key.masked.as_str(), token.masked());
        assert_eq!(key.key_id, token.key_id().as_str());
        assert_eq!(key.policy.name(), "acme/k");
        assert!(key.policy.scopes().contains("events"));
        assert_eq!(metrics.sample("portcullis_key_cache_hits_total"), Some(1.0));
        assert_eq!(
            metrics.sample("portcullis_key_cache_misses_total"),
            Some(1.0)
        );
    }

    #[tokio::test]
    async fn malformed_unknown_wrong_revoked_and_expired_keys_are_refused() {
        let metrics = Metrics::new();
        let verifier = verifier(&metrics);
        let token = ApiToken::generate();
        let now = Timestamp::now();
        let bundle = bundle_with(&token, false, None);
        fn reason(r: Result<VerifiedKey<'_>, Denial>) -> Reason {
            r.unwrap_err().reason
        }
        assert_eq!(
            reason(verifier.verify("ak_short", &compiled(&bundle), now).await),
            Reason::MalformedKey
        );
        let stranger = ApiToken::generate();
        assert_eq!(
            reason(
                verifier
                    .verify(stranger.expose_secret(), &compiled(&bundle), now)
                    .await
            ),
            Reason::UnknownKey
        );
        // Same key id, different secret: checksum-valid forgery must fail bcrypt.
        let mut forged_bundle = bundle.clone();
        let policy = forged_bundle.keys.remove(token.key_id()).unwrap();
        forged_bundle.keys.insert(stranger.key_id().clone(), policy);
        assert_eq!(
            reason(
                verifier
                    .verify(stranger.expose_secret(), &compiled(&forged_bundle), now)
                    .await
            ),
            Reason::InvalidKey
        );
        // Cached, then revoked: refused on the next request.
        verifier
            .verify(token.expose_secret(), &compiled(&bundle), now)
            .await
            .unwrap();
        let mut revoked = bundle.clone();
        revoked.keys.values_mut().for_each(|k| k.revoked = true);
        assert_eq!(
            reason(
                verifier
                    .verify(token.expose_secret(), &compiled(&revoked), now)
                    .await
            ),
            Reason::KeyRevoked
        );
        let mut expired = bundle.clone();
        expired
            .keys
            .values_mut()
            .for_each(|k| k.expires_at = Some(now));
        assert_eq!(
            reason(
                verifier
                    .verify(token.expose_secret(), &compiled(&expired), now)
                    .await
            ),
            Reason::KeyExpired
        );
    }

    #[tokio::test]
    async fn no_worker_within_the_wait_means_busy() {
        let metrics = Metrics::new();
        let verifier = Arc::new(KeyVerifier::new(
            1,
            Duration::from_millis(20),
            100,
            metrics.clone(),
        ));
        let _held = verifier.workers.clone().acquire_owned().await.unwrap();
        let token = ApiToken::generate();
        let bundle = compiled(&bundle_with(&token, false, None));
        let denial = verifier
            .verify(token.expose_secret(), &bundle, Timestamp::now())
            .await
            .unwrap_err();
        assert_eq!(denial.reason, Reason::Busy);
        assert_eq!(metrics.sample("portcullis_bcrypt_busy_total"), Some(1.0));
    }

    #[test]
    fn masked_keys_match_the_token_mask() {
        let token = ApiToken::generate();
        for text in [token.expose_secret(), "ak_short", "", "ak_0123456789xyz"] {
            assert_eq!(
                MaskedKey::of(text).as_str(),
                portcullis_crds::token::mask(text),
                "{text:?}"
            );
        }
        // Never reached for a checked key; hides everything rather than split a char.
        assert_eq!(MaskedKey::of("ak_0123456789é").as_str(), "ak_***");
        assert_eq!(
            format!("{}", MaskedKey::of(token.expose_secret())),
            token.masked()
        );
    }
}
