//! Checking a presented key against the policy in force: format (checksum first, no
//! hashing), key id lookup, the verified-key cache, then — only on a miss — the failure
//! budgets, the failed-key cache and bcrypt; expiry and revocation on every request,
//! cache or not.
//!
//! A wrong guess must cost the guesser, not the proxy. Every uncached check is charged
//! to its key id and to its client address before bcrypt runs and refunded when the key
//! is right ([`super::failure_budget`]); over budget it is refused with 429 and
//! `Retry-After`, without bcrypt. A secret that failed lately is refused from the
//! failed-key cache. An unknown key id is charged and answered exactly like a wrong
//! secret (same status, body and reason), so answers do not tell which ids exist.
//!
//! bcrypt runs on tokio's blocking pool behind `bcrypt_workers` permits, a share of
//! which is reserved for key ids with nothing charged (first-seen keys): a flood
//! against one key id cannot take every worker. A request waits at most
//! `bcrypt_wait` for a permit, then gets 503 `busy`. Concurrent misses for the same
//! token share one verification.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http::{HeaderValue, header};
use jiff::Timestamp;
use portcullis_crds::{ApiToken, token};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::{
    cache::{CacheKey, VerifiedKeyCache, cache_key},
    failed_key_cache::FailedKeyCache,
    failure_budget::{Buckets, FailureLimits, client_bucket},
};
use crate::{
    listener::deny::{Denial, Reason},
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

/// Which bcrypt permits a check may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lane {
    /// A key id with nothing charged: the shared permits or the reserved ones.
    FirstSeen,
    /// A key id that failed lately or has a check running: the shared permits only.
    Charged,
}

/// The bcrypt permits: `shared` for any check, `reserved` only for first-seen key ids.
#[derive(Debug)]
struct Workers {
    shared: Arc<Semaphore>,
    reserved: Arc<Semaphore>,
}

impl Workers {
    /// A quarter of the pool (at least one, when there are two or more) is reserved.
    fn new(workers: usize) -> Self {
        let workers = workers.max(1);
        let reserved = if workers >= 2 {
            (workers / 4).max(1)
        } else {
            0
        };
        Self {
            shared: Arc::new(Semaphore::new(workers - reserved)),
            reserved: Arc::new(Semaphore::new(reserved)),
        }
    }

    async fn acquire(&self, lane: Lane) -> Option<OwnedSemaphorePermit> {
        let shared = self.shared.clone().acquire_owned();
        match lane {
            Lane::Charged => shared.await.ok(),
            // Shared first: the reserve is kept for when the shared permits are taken.
            Lane::FirstSeen => tokio::select! {
                biased;
                permit = shared => permit.ok(),
                permit = self.reserved.clone().acquire_owned() => permit.ok(),
            },
        }
    }
}

type KeyIdBytes = [u8; token::KEY_ID_LEN];

/// Verifies keys; shared by every connection.
#[derive(Debug)]
pub struct KeyVerifier {
    cache: VerifiedKeyCache,
    failed: FailedKeyCache,
    per_key: Buckets<KeyIdBytes>,
    per_client: Buckets<IpAddr>,
    workers: Workers,
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

/// The one answer for an unknown key id and a wrong secret: nothing in it says which.
fn wrong_key() -> Denial {
    Denial::new(
        Reason::InvalidKey,
        "this API key is not valid for this service; send the full key from its Secret, check you are calling the right tenant, or ask for a new key",
    )
}

fn too_many_failures(wait: Duration) -> Denial {
    let mut denial = Denial::new(
        Reason::TooManyFailedKeys,
        "too many wrong API keys from this client or for this key id; wait for the number of seconds in Retry-After, then send the full key from its Secret",
    );
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    denial
        .headers
        .push((header::RETRY_AFTER, HeaderValue::from(seconds.max(1))));
    denial
}

/// A revoked key past its grace: the tombstone no longer says "revoked", the key is
/// simply unknown and never bcrypt-checked again.
fn lapsed_tombstone(key: &KeyRef<'_>, now: Timestamp) -> bool {
    key.revoked() && key.expires_at().is_some_and(|at| at <= now)
}

impl KeyVerifier {
    /// A verifier with `workers` concurrent bcrypt checks, each request waiting at most
    /// `wait` for one, a cache of `cache_capacity` verified keys, and the default
    /// failure budgets.
    pub fn new(workers: usize, wait: Duration, cache_capacity: usize, metrics: Metrics) -> Self {
        Self::with_failure_limits(
            workers,
            wait,
            cache_capacity,
            FailureLimits::default(),
            metrics,
        )
    }

    /// [`KeyVerifier::new`] with explicit failure budgets.
    pub fn with_failure_limits(
        workers: usize,
        wait: Duration,
        cache_capacity: usize,
        limits: FailureLimits,
        metrics: Metrics,
    ) -> Self {
        Self {
            cache: VerifiedKeyCache::new(cache_capacity),
            failed: FailedKeyCache::new(limits.negative_ttl, limits.negative_capacity),
            per_key: Buckets::new(limits.per_key, limits.tracked),
            per_client: Buckets::new(limits.per_client, limits.tracked),
            workers: Workers::new(workers),
            wait,
            metrics,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Checks `presented`, sent from `client_ip`, against `policy` at time `now`. A
    /// cache hit allocates nothing.
    pub async fn verify<'p>(
        self: &Arc<Self>,
        presented: &str,
        policy: &'p CompiledPolicy,
        client_ip: IpAddr,
        now: Timestamp,
    ) -> Result<VerifiedKey<'p>, Denial> {
        let key_id = token::check(presented).map_err(malformed)?;
        let key = policy.key(key_id).filter(|key| !lapsed_tombstone(key, now));
        let known = key.map(|key| (key, cache_key(presented, key_id, key.hash())));
        let hit = known.is_some_and(|(_, digest)| self.cache.contains(&digest));
        if known.is_some() {
            self.metrics.key_cache(hit);
        }
        if !hit {
            self.check_uncached(presented, key_id, known, client_ip)
                .await?;
        }
        let Some((key, _)) = known else {
            return Err(wrong_key());
        };
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

    /// The path of a key not in the verified-key cache: charge the budgets (unknown
    /// ids alike), then the failed-key cache, then bcrypt. Ok means bcrypt said valid.
    async fn check_uncached(
        self: &Arc<Self>,
        presented: &str,
        key_id: &str,
        known: Option<(KeyRef<'_>, CacheKey)>,
        client_ip: IpAddr,
    ) -> Result<(), Denial> {
        let now = Instant::now();
        let id = KeyIdBytes::try_from(key_id.as_bytes()).unwrap_or([0; token::KEY_ID_LEN]);
        let client = client_bucket(client_ip);
        self.per_client
            .take(&client, now)
            .map_err(too_many_failures)?;
        let lane = match self.per_key.take(&id, now) {
            Ok(true) => Lane::FirstSeen,
            Ok(false) => Lane::Charged,
            Err(wait) => {
                self.per_client.refund(&client, now);
                return Err(too_many_failures(wait));
            }
        };
        let Some((key, digest)) = known else {
            return Err(wrong_key());
        };
        let failed = self.failed.digest(presented, key_id, key.hash());
        if self.failed.failed_recently(&failed, now) {
            return Err(wrong_key());
        }
        // Owned copies only for the bcrypt task, which may outlive this request.
        let token = ApiToken::parse(presented).map_err(malformed)?;
        let outcome = self
            .verify_once(digest, token, key.hash().to_owned(), lane)
            .await;
        let settled = Instant::now();
        if outcome == Outcome::Invalid {
            self.failed.insert(failed, settled);
            return Err(wrong_key());
        }
        self.per_key.refund(&id, settled);
        self.per_client.refund(&client, settled);
        if outcome == Outcome::Busy {
            self.metrics.bcrypt_busy();
            return Err(Denial::new(
                Reason::Busy,
                "too many new API keys are being checked right now; retry in a moment",
            ));
        }
        Ok(())
    }

    /// Runs (or joins) the bcrypt check for `digest`. The work runs in its own task so
    /// a caller that goes away does not strand the others waiting on it.
    async fn verify_once(
        self: &Arc<Self>,
        digest: CacheKey,
        token: ApiToken,
        hash: String,
        lane: Lane,
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
                        let outcome = this.run_bcrypt(token, hash, lane).await;
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

    async fn run_bcrypt(&self, token: ApiToken, hash: String, lane: Lane) -> Outcome {
        let Ok(Some(permit)) = tokio::time::timeout(self.wait, self.workers.acquire(lane)).await
        else {
            return Outcome::Busy;
        };
        self.metrics.key_verification();
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

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 7));

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
            .verify(token.expose_secret(), &bundle, CLIENT, now)
            .await
            .unwrap();
        assert_eq!(key.masked.as_str(), token.masked());
        let key = verifier
            .verify(token.expose_secret(), &bundle, CLIENT, now)
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
            reason(
                verifier
                    .verify("ak_short", &compiled(&bundle), CLIENT, now)
                    .await
            ),
            Reason::MalformedKey
        );
        let stranger = ApiToken::generate();
        assert_eq!(
            reason(
                verifier
                    .verify(stranger.expose_secret(), &compiled(&bundle), CLIENT, now)
                    .await
            ),
            Reason::InvalidKey
        );
        // Same key id, different secret: checksum-valid forgery must fail bcrypt.
        let mut forged_bundle = bundle.clone();
        let policy = forged_bundle.keys.remove(token.key_id()).unwrap();
        forged_bundle.keys.insert(stranger.key_id().clone(), policy);
        assert_eq!(
            reason(
                verifier
                    .verify(
                        stranger.expose_secret(),
                        &compiled(&forged_bundle),
                        CLIENT,
                        now
                    )
                    .await
            ),
            Reason::InvalidKey
        );
        // Cached, then revoked: refused on the next request.
        verifier
            .verify(token.expose_secret(), &compiled(&bundle), CLIENT, now)
            .await
            .unwrap();
        let mut revoked = bundle.clone();
        revoked.keys.values_mut().for_each(|k| k.revoked = true);
        assert_eq!(
            reason(
                verifier
                    .verify(token.expose_secret(), &compiled(&revoked), CLIENT, now)
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
                    .verify(token.expose_secret(), &compiled(&expired), CLIENT, now)
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
        let _held = verifier
            .workers
            .shared
            .clone()
            .acquire_owned()
            .await
            .unwrap();
        let token = ApiToken::generate();
        let bundle = compiled(&bundle_with(&token, false, None));
        let denial = verifier
            .verify(token.expose_secret(), &bundle, CLIENT, Timestamp::now())
            .await
            .unwrap_err();
        assert_eq!(denial.reason, Reason::Busy);
        assert_eq!(metrics.sample("portcullis_bcrypt_busy_total"), Some(1.0));
    }

    fn bcrypt_runs(metrics: &Metrics) -> f64 {
        metrics
            .sample("portcullis_key_verifications_total")
            .unwrap_or(0.0)
    }

    #[tokio::test]
    async fn repeating_a_wrong_secret_runs_bcrypt_once() {
        let metrics = Metrics::new();
        let verifier = verifier(&metrics);
        let (real, guess) = (ApiToken::generate(), ApiToken::generate());
        let mut bundle = bundle_with(&real, false, None);
        let policy = bundle.keys.remove(real.key_id()).unwrap();
        bundle.keys.insert(guess.key_id().clone(), policy);
        let bundle = compiled(&bundle);
        for _ in 0..3 {
            let denial = verifier
                .verify(guess.expose_secret(), &bundle, CLIENT, Timestamp::now())
                .await
                .unwrap_err();
            assert_eq!(denial.reason, Reason::InvalidKey);
        }
        assert_eq!(bcrypt_runs(&metrics), 1.0);
    }

    #[tokio::test]
    async fn over_the_failure_budget_is_429_with_retry_after_and_no_bcrypt() {
        let metrics = Metrics::new();
        let limits = FailureLimits {
            per_key: super::super::BucketLimit {
                burst: 2,
                refill: Duration::from_secs(60),
            },
            ..FailureLimits::default()
        };
        let verifier = Arc::new(KeyVerifier::with_failure_limits(
            2,
            Duration::from_secs(5),
            100,
            limits,
            metrics.clone(),
        ));
        let stranger = ApiToken::generate();
        let bundle = compiled(&bundle_with(&ApiToken::generate(), false, None));
        // Unknown ids are charged like wrong secrets: the budget tells nothing either.
        for _ in 0..2 {
            let denial = verifier
                .verify(stranger.expose_secret(), &bundle, CLIENT, Timestamp::now())
                .await
                .unwrap_err();
            assert_eq!(denial.reason, Reason::InvalidKey);
        }
        let denial = verifier
            .verify(stranger.expose_secret(), &bundle, CLIENT, Timestamp::now())
            .await
            .unwrap_err();
        assert_eq!(denial.reason, Reason::TooManyFailedKeys);
        assert_eq!(denial.status(), http::StatusCode::TOO_MANY_REQUESTS);
        assert!(
            denial
                .headers
                .iter()
                .any(|(name, value)| name == header::RETRY_AFTER && value == "60")
        );
        assert_eq!(bcrypt_runs(&metrics), 0.0);
    }

    #[tokio::test]
    async fn a_tombstone_past_its_grace_is_unknown_and_never_bcrypt_checked() {
        let metrics = Metrics::new();
        let verifier = verifier(&metrics);
        let token = ApiToken::generate();
        let now = Timestamp::now();
        let in_grace = compiled(&bundle_with(
            &token,
            true,
            Some(now + jiff::SignedDuration::from_hours(1)),
        ));
        let denial = verifier
            .verify(token.expose_secret(), &in_grace, CLIENT, now)
            .await
            .unwrap_err();
        assert_eq!(denial.reason, Reason::KeyRevoked, "revoked during grace");
        let lapsed = compiled(&bundle_with(&token, true, Some(now)));
        let fresh = Arc::new(KeyVerifier::new(
            2,
            Duration::from_secs(5),
            100,
            metrics.clone(),
        ));
        let denial = fresh
            .verify(token.expose_secret(), &lapsed, CLIENT, now)
            .await
            .unwrap_err();
        assert_eq!(denial.reason, Reason::InvalidKey, "then just unknown");
        assert_eq!(
            bcrypt_runs(&metrics),
            1.0,
            "only the check during grace ran bcrypt"
        );
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
