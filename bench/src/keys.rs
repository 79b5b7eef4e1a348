//! Policy bundles for the benchmark (a small one, and one with 100k keys hashed with
//! bcrypt cost 4 so generation takes seconds, not hours; the bundle is cached under the
//! target dir), and the key-check micro-benchmark, which calls the sidecar's
//! `KeyVerifier` directly.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use portcullis_crds::{
    ApiToken, DataClassification, KeyId, KeyPolicy, PolicyBundle, RateLimitPolicy,
};
use portcullis_sidecar::{inbound::authn::KeyVerifier, metrics::Metrics, policy::CompiledPolicy};

/// The address the bench's key checks come from (budgets are per client).
const CLIENT: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// bcrypt cost of generated keys (production uses `portcullis_crds::token::HASH_COST`).
pub const BENCH_COST: u32 = 4;

/// A limit no benchmark reaches.
pub fn unlimited() -> RateLimitPolicy {
    RateLimitPolicy {
        requests: u32::MAX,
        per_ms: 1_000,
        burst: u32::MAX,
    }
}

/// A key policy granting `scopes`, never rate limited in practice.
pub fn key_policy(name: &str, hash: String, scopes: &[&str]) -> KeyPolicy {
    KeyPolicy {
        name: name.to_owned(),
        hash,
        scopes: scopes
            .iter()
            .map(|s| (*s).to_owned())
            .collect::<BTreeSet<_>>(),
        rate_limit: unlimited(),
        ip_allowlist: vec![],
        expires_at: None,
        revoked: false,
    }
}

/// A bundle with the demo route catalogue and `keys`.
pub fn bundle(version: u64, keys: BTreeMap<KeyId, KeyPolicy>) -> PolicyBundle {
    PolicyBundle {
        version,
        tenant: "bench".to_owned(),
        classification: DataClassification::Internal,
        scopes: portcullis_sidecar::run::demo::demo_scopes(),
        tenant_ip_allowlist: vec![],
        keys,
        // The mTLS runs present the demo client certificate, a workload of tenant demo.
        allowed_peers: vec![portcullis_crds::AllowedPeer::tenant(
            portcullis_sidecar::run::demo::TENANT,
        )],
        ..PolicyBundle::default()
    }
}

/// `n` keys with random secrets (discarded), each with its own bcrypt hash at
/// [`BENCH_COST`], hashed on `threads` threads.
pub fn generate_keys(n: usize, threads: usize) -> anyhow::Result<BTreeMap<KeyId, KeyPolicy>> {
    let threads = threads.max(1);
    let parts: Vec<anyhow::Result<Vec<(KeyId, KeyPolicy)>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mine = n / threads + usize::from(t < n % threads);
                    let mut out = Vec::with_capacity(mine);
                    for i in 0..mine {
                        let token = ApiToken::generate();
                        let hash = token.hash(BENCH_COST)?;
                        let name = format!("bench/key-{t}-{i}");
                        out.push((token.key_id().clone(), key_policy(&name, hash, &["events"])));
                    }
                    anyhow::Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("hashing thread panicked")))
            })
            .collect()
    });
    let mut keys = BTreeMap::new();
    for part in parts {
        keys.extend(part?);
    }
    Ok(keys)
}

/// `n` generated keys, from `cache_dir/keys-<n>-cost<c>.json` when present.
pub fn cached_keys(
    n: usize,
    cache_dir: &Path,
) -> anyhow::Result<(BTreeMap<KeyId, KeyPolicy>, Option<Duration>)> {
    let path = cache_dir.join(format!("keys-{n}-cost{BENCH_COST}.json"));
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Ok(keys) = serde_json::from_str::<BTreeMap<KeyId, KeyPolicy>>(&text)
        && keys.len() == n
    {
        return Ok((keys, None));
    }
    let started = Instant::now();
    let keys = generate_keys(n, 2)?;
    let took = started.elapsed();
    std::fs::create_dir_all(cache_dir)?;
    std::fs::write(&path, serde_json::to_vec(&keys)?)?;
    Ok((keys, Some(took)))
}

/// The big bundle's keys, prepared before the run starts (generation uses both cores).
#[derive(Clone, Debug, Default)]
pub struct PreparedKeys {
    /// Keys by id.
    pub keys: BTreeMap<KeyId, KeyPolicy>,
    /// How long generating them took (`None`: read from the cache).
    pub generated_in: Option<Duration>,
}

/// Where generated keys are cached: `<target>/portcullis-bench`, next to the binary.
pub fn cache_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(Path::to_path_buf))
        .unwrap_or_else(std::env::temp_dir)
        .join("portcullis-bench")
}

/// Writes `bundle` as JSON to `path`; returns its size in bytes.
pub fn write_bundle(path: &Path, bundle: &PolicyBundle) -> anyhow::Result<u64> {
    let bytes = serde_json::to_vec(bundle)?;
    std::fs::write(path, &bytes)?;
    Ok(bytes.len() as u64)
}

/// Key-check costs, each the mean of a timed loop on one core.
#[derive(Clone, Copy, Debug, Default)]
pub struct KeyCheckCosts {
    /// `token::check` (shape, alphabets and checksum; what the proxy runs per request).
    pub check_ns: f64,
    /// The verified-key cache digest (`authn::cache::cache_key`, SHA-256).
    pub digest_ns: f64,
    /// `KeyVerifier::verify` on a cache hit, 3-key bundle.
    pub hit_ns: f64,
    /// The same with `big_keys` keys in the bundle.
    pub hit_big_ns: f64,
    /// Keys in the big bundle.
    pub big_keys: usize,
    /// `verify` on a miss, bcrypt cost [`BENCH_COST`].
    pub miss_cost4_us: f64,
    /// `verify` on a miss at the production cost.
    pub miss_prod_us: f64,
    /// The production cost.
    pub prod_cost: u32,
}

fn mean_ns(iterations: u32, f: impl FnMut()) -> f64 {
    let mut f = f;
    let started = Instant::now();
    for _ in 0..iterations {
        f();
    }
    started.elapsed().as_nanos() as f64 / f64::from(iterations)
}

async fn time_hits(
    verifier: &Arc<KeyVerifier>,
    token: &str,
    bundle: &PolicyBundle,
    iterations: u32,
) -> anyhow::Result<f64> {
    let now = jiff::Timestamp::now();
    // The form the proxy holds (compiled once per policy, outside the timed loop).
    let bundle = &CompiledPolicy::from(bundle.clone());
    verifier
        .verify(token, bundle, CLIENT, now)
        .await
        .map_err(|d| anyhow::anyhow!("bench key refused: {:?}", d.reason))?;
    let started = Instant::now();
    for _ in 0..iterations {
        let key = verifier.verify(token, bundle, CLIENT, now).await;
        std::hint::black_box(&key);
    }
    Ok(started.elapsed().as_nanos() as f64 / f64::from(iterations))
}

async fn time_misses(cost: u32, iterations: u32) -> anyhow::Result<f64> {
    let token = ApiToken::generate();
    let mut keys = BTreeMap::new();
    keys.insert(
        token.key_id().clone(),
        key_policy("bench/miss", token.hash(cost)?, &["events"]),
    );
    let bundle = CompiledPolicy::from(bundle(1, keys));
    let mut total = Duration::ZERO;
    for _ in 0..iterations {
        // A fresh verifier has an empty cache: every check is a miss.
        let verifier = Arc::new(KeyVerifier::new(
            2,
            Duration::from_secs(30),
            100,
            Metrics::new(),
        ));
        let started = Instant::now();
        verifier
            .verify(
                token.expose_secret(),
                &bundle,
                CLIENT,
                jiff::Timestamp::now(),
            )
            .await
            .map_err(|d| anyhow::anyhow!("miss refused: {:?}", d.reason))?;
        total += started.elapsed();
    }
    Ok(total.as_micros() as f64 / f64::from(iterations))
}

/// Measures key checks through the sidecar's public `KeyVerifier` (in this process).
/// `big` is a bundle with many keys, `big_token` one of its keys.
pub async fn key_check_costs(
    big: &PolicyBundle,
    big_token: &ApiToken,
    quick: bool,
) -> anyhow::Result<KeyCheckCosts> {
    let hits = if quick { 100_000 } else { 500_000 };
    let token = ApiToken::generate();
    let mut keys = BTreeMap::new();
    for scope in ["identify", "events", "signals"] {
        let t = if scope == "events" {
            token.clone()
        } else {
            ApiToken::generate()
        };
        keys.insert(
            t.key_id().clone(),
            key_policy(&format!("bench/{scope}"), t.hash(BENCH_COST)?, &[scope]),
        );
    }
    let small = bundle(1, keys);
    let check_ns = mean_ns(hits, || {
        std::hint::black_box(
            portcullis_crds::token::check(std::hint::black_box(token.expose_secret())).is_ok(),
        );
    });
    let policy_hash = &small.keys[token.key_id()].hash;
    let digest_ns = mean_ns(hits, || {
        std::hint::black_box(portcullis_sidecar::inbound::authn::cache::cache_key(
            std::hint::black_box(token.expose_secret()),
            token.key_id().as_str(),
            policy_hash,
        ));
    });
    let verifier = Arc::new(KeyVerifier::new(
        2,
        Duration::from_secs(30),
        10_000,
        Metrics::new(),
    ));
    let hit_ns = time_hits(&verifier, token.expose_secret(), &small, hits).await?;
    let verifier = Arc::new(KeyVerifier::new(
        2,
        Duration::from_secs(30),
        10_000,
        Metrics::new(),
    ));
    let hit_big_ns = time_hits(&verifier, big_token.expose_secret(), big, hits).await?;
    let prod_cost = portcullis_crds::token::HASH_COST;
    Ok(KeyCheckCosts {
        check_ns,
        digest_ns,
        hit_ns,
        hit_big_ns,
        big_keys: big.keys.len(),
        miss_cost4_us: time_misses(BENCH_COST, if quick { 50 } else { 200 }).await?,
        miss_prod_us: time_misses(prod_cost, if quick { 3 } else { 10 }).await?,
        prod_cost,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_distinct_verifiable_and_round_trip_through_json() {
        let keys = generate_keys(5, 2).unwrap();
        assert_eq!(keys.len(), 5);
        assert!(
            keys.values()
                .all(|k| k.hash.starts_with("$2") && k.hash.contains("$04$"))
        );
        let bundle = bundle(7, keys);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.json");
        write_bundle(&path, &bundle).unwrap();
        let read = portcullis_sidecar::policy::file::read_bundle(&path).unwrap();
        assert_eq!(read.version, 7);
        assert_eq!(read.keys, bundle.keys);
    }

    #[test]
    fn keys_are_cached() {
        let dir = tempfile::tempdir().unwrap();
        let (first, took) = cached_keys(3, dir.path()).unwrap();
        assert!(took.is_some());
        let (second, took) = cached_keys(3, dir.path()).unwrap();
        assert!(took.is_none());
        assert_eq!(first, second);
    }

    #[tokio::test]
    async fn the_bench_key_passes_the_sidecar_verifier() {
        let token = ApiToken::generate();
        let mut keys = BTreeMap::new();
        keys.insert(
            token.key_id().clone(),
            key_policy("bench/k", token.hash(BENCH_COST).unwrap(), &["events"]),
        );
        let bundle = CompiledPolicy::from(bundle(1, keys));
        let verifier = Arc::new(KeyVerifier::new(
            1,
            Duration::from_secs(5),
            10,
            Metrics::new(),
        ));
        let key = verifier
            .verify(
                token.expose_secret(),
                &bundle,
                CLIENT,
                jiff::Timestamp::now(),
            )
            .await
            .unwrap();
        assert!(key.policy.scopes().contains("events"));
    }
}
