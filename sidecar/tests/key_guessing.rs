//! Key guessing must cost the attacker, not the proxy: wrong secrets for a known key id
//! run bcrypt only within a failure budget, a first-seen key still verifies during a
//! flood, and an unknown key is answered exactly like a wrong secret.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use portcullis_crds::{ApiToken, KeyPolicy, PolicyBundle, RateLimitPolicy};
use portcullis_sidecar::{inbound::authn::KeyVerifier, metrics::Metrics, policy::CompiledPolicy};
use support::{Harness, Identity, Options};

const ATTACKER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 9));
const HONEST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 7));

fn key(token: &ApiToken, cost: u32) -> KeyPolicy {
    KeyPolicy {
        name: "acme/k".into(),
        hash: token.hash(cost).unwrap(),
        scopes: BTreeSet::from(["events".to_owned()]),
        rate_limit: RateLimitPolicy::default(),
        ip_allowlist: vec![],
        expires_at: None,
        revoked: false,
    }
}

fn bcrypt_runs(metrics: &Metrics) -> f64 {
    metrics
        .sample("portcullis_key_verifications_total")
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_secret_flood_stays_within_the_failure_budget_and_new_keys_still_verify() {
    let metrics = Metrics::new();
    // Two bcrypt workers; a request waits at most 300 ms for one.
    let verifier = Arc::new(KeyVerifier::new(
        2,
        Duration::from_millis(300),
        100,
        metrics.clone(),
    ));
    let target = ApiToken::generate();
    let newcomer = ApiToken::generate();
    // The attacked key costs what a real key costs; the newcomer is cheap so the test
    // is quick once it gets a worker.
    let policy = Arc::new(CompiledPolicy::from(PolicyBundle {
        version: 1,
        tenant: "acme".into(),
        keys: BTreeMap::from([
            (target.key_id().clone(), key(&target, 8)),
            (newcomer.key_id().clone(), key(&newcomer, 4)),
        ]),
        ..PolicyBundle::default()
    }));

    // 16 attackers, 20 guesses each, each guess a different wrong secret.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (verifier, policy, real) = (
            verifier.clone(),
            policy.clone(),
            target.expose_secret().to_owned(),
        );
        flood.spawn(async move {
            for _ in 0..20 {
                if tokio::time::Instant::now() > deadline {
                    break;
                }
                let guess = support::forged_key(&real);
                let refused = verifier
                    .verify(&guess, &policy, ATTACKER, jiff::Timestamp::now())
                    .await
                    .is_err();
                assert!(refused, "a wrong secret must never verify");
            }
        });
    }
    // Once the flood keeps the workers busy, the newcomer shows up.
    support::wait_until(|| bcrypt_runs(&metrics) >= 2.0).await;
    let newcomer_result = verifier
        .verify(
            newcomer.expose_secret(),
            &policy,
            HONEST,
            jiff::Timestamp::now(),
        )
        .await;
    while flood.join_next().await.is_some() {}
    assert!(
        newcomer_result.is_ok(),
        "a first-seen key must verify during the flood, got {:?}",
        newcomer_result.err().map(|d| d.reason)
    );
    let runs = bcrypt_runs(&metrics);
    assert!(
        runs <= 12.0,
        "320 wrong guesses ran bcrypt {runs} times; the failure budget allows 10 plus the newcomer"
    );
}

#[tokio::test]
async fn unknown_keys_and_wrong_secrets_get_byte_identical_answers() {
    let h = Harness::start(Options::default()).await;
    let client = h.client(Identity::Anonymous);
    let unknown = ApiToken::generate();
    let wrong = support::forged_key(h.token("events"));
    let a = client
        .get("/v1/events/1", &[("x-api-key", unknown.expose_secret())])
        .await;
    let b = client.get("/v1/events/1", &[("x-api-key", &wrong)]).await;
    assert_eq!(a.status, 401);
    assert_eq!(
        (a.status, &a.body),
        (b.status, &b.body),
        "same status and body"
    );
    let headers = |r: &support::Reply| {
        let mut h: Vec<(String, Vec<u8>)> = r
            .headers
            .iter()
            .filter(|(name, _)| *name != http::header::DATE)
            .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
            .collect();
        h.sort();
        h
    };
    assert_eq!(headers(&a), headers(&b), "same headers (the date aside)");
    assert_eq!(a.reason(), "invalid_key");
}
