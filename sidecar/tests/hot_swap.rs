//! Policy and certificates swapped under continuous traffic with zero failed requests;
//! revocation of a cached key; rate limits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use portcullis_crds::ApiToken;
use rustls::pki_types::{CertificateDer, pem::PemObject};
use support::{Harness, Identity, Options, TestCa, client, logs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_and_certificates_swap_under_traffic_without_failures() {
    let mut h = Harness::start(Options::default()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for worker in 0..3 {
        let client = h.client(Identity::Anonymous);
        let key = h.token("events").to_owned();
        let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
        workers.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut keep_alive = None;
            // Bounded: at most 3000 requests per worker or 30 s.
            for i in 0..3000 {
                if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let request = client::request("GET", "/v1/events/1", &[("x-api-key", &key)], "");
                // Worker 0 opens a new connection every time (new handshakes see new
                // certificates); the others reuse keep-alive connections.
                let reuse = if worker == 0 || i % 50 == 0 {
                    None
                } else {
                    keep_alive.as_mut()
                };
                let result = match reuse {
                    Some(sender) => client::send_on(sender, request).await,
                    None => match client.h1().await {
                        Ok(mut sender) => {
                            let r = client::send_on(&mut sender, request).await;
                            if worker != 0 {
                                keep_alive = Some(sender);
                            }
                            r
                        }
                        Err(e) => Err(e),
                    },
                };
                match result {
                    Ok(reply) if reply.status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(reply) => failures
                        .lock()
                        .unwrap()
                        .push(format!("status {} {:?}", reply.status, reply.body)),
                    Err(e) => failures.lock().unwrap().push(format!("error {e}")),
                }
            }
        }));
    }

    let second_ca = TestCa::new("second");
    let mut served_certs = Vec::new();
    for round in 0..3u32 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let token = ApiToken::generate();
        let policy = h.bundle.keys.values().next().unwrap().clone();
        h.update_policy(|b| {
            b.keys.insert(token.key_id().clone(), policy);
        })
        .await;
        // New serving certificate from the same CA; trust bundle gains a second root.
        let issued = h.ca.server();
        support::ca::write_atomic(&h.dir.path().join("server-key.pem"), &issued.key_pem);
        support::ca::write_atomic(&h.dir.path().join("server.pem"), &issued.cert_pem);
        support::ca::write_atomic(
            &h.dir.path().join("ca.pem"),
            &format!("{}{}", h.ca.pem, second_ca.pem),
        );
        let expected = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        let client = h.client(Identity::Anonymous);
        support::wait_until(|| {
            h.metric("portcullis_cert_reloads_total{source=\"file\",result=\"reloaded\"}")
                >= f64::from(round + 1)
        })
        .await;
        let stream = client.tls(false).await.unwrap();
        let presented = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
        assert_eq!(
            presented, expected,
            "new handshakes present the new certificate"
        );
        served_certs.push(presented);
    }
    // A client of the second CA is trusted now.
    let second = h.client(Identity::Certificate(
        second_ca.client("spiffe://test.local/ns/a/sa/second"),
    ));
    assert_eq!(second.get("/", &[]).await.status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "failed requests during swaps: {:?}",
        &failures[..failures.len().min(5)]
    );
    assert!(
        ok.load(Ordering::Relaxed) > 50,
        "too little traffic to prove anything: {}",
        ok.load(Ordering::Relaxed)
    );
    assert_eq!(h.proxy.policy.load().unwrap().version, 4);
    assert_eq!(served_certs.len(), 3);
    logs::assert_not_logged(h.token("events"));
}

#[tokio::test]
async fn revoking_a_cached_key_refuses_its_next_request() {
    let mut h = Harness::start(Options::default()).await;
    let client = h.client(Identity::Anonymous);
    let mut connection = client.h1().await.unwrap();
    let key = h.token("events").to_owned();
    for _ in 0..3 {
        let reply = client::send_on(
            &mut connection,
            client::request("GET", "/v1/events/1", &[("x-api-key", &key)], ""),
        )
        .await
        .unwrap();
        assert_eq!(reply.status, 200);
    }
    assert!(
        h.metric("portcullis_key_cache_hits_total") >= 2.0,
        "the key must be served from the cache"
    );
    let id = h.tokens["events"].key_id().clone();
    h.update_policy(|b| b.keys.get_mut(&id).unwrap().revoked = true)
        .await;
    let reply = client::send_on(
        &mut connection,
        client::request("GET", "/v1/events/1", &[("x-api-key", &key)], ""),
    )
    .await
    .unwrap();
    assert_eq!(
        (reply.status, reply.reason().as_str()),
        (401, "key_revoked")
    );
    assert_eq!(h.denials("key_revoked", 401), 1.0);
    // Expiry too is checked against the bundle on every request.
    let signals = h.token("signals").to_owned();
    assert_eq!(
        client
            .get("/v1/signals", &[("x-api-key", &signals)])
            .await
            .status,
        200
    );
    let id = h.tokens["signals"].key_id().clone();
    h.update_policy(|b| b.keys.get_mut(&id).unwrap().expires_at = Some(jiff::Timestamp::now()))
        .await;
    assert_eq!(
        client
            .get("/v1/signals", &[("x-api-key", &signals)])
            .await
            .reason(),
        "key_expired"
    );
}

#[tokio::test]
async fn rate_limit_answers_429_with_headers() {
    let h = Harness::start(Options::default()).await;
    let client = h.client(Identity::Anonymous);
    let key = h.token("limited");
    let first = client.get("/v1/events/1", &[("x-api-key", key)]).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.headers["ratelimit-limit"], "2");
    assert_eq!(first.headers["ratelimit-remaining"], "1");
    let second = client.get("/v1/events/1", &[("x-api-key", key)]).await;
    assert_eq!(second.headers["ratelimit-remaining"], "0");
    let third = client.get("/v1/events/1", &[("x-api-key", key)]).await;
    assert_eq!(
        (third.status, third.reason().as_str()),
        (429, "rate_limited")
    );
    let retry: u64 = third.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        retry > 1000 && retry <= 3600,
        "one request per hour: retry after {retry}s"
    );
    assert_eq!(third.headers["ratelimit-remaining"], "0");
    assert!(third.headers.contains_key("ratelimit-reset"));
    assert_eq!(h.denials("rate_limited", 429), 1.0);
    // Other keys are unaffected.
    assert_eq!(
        client
            .get("/v1/events/1", &[("x-api-key", h.token("events"))])
            .await
            .status,
        200
    );
}
