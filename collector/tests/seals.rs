//! The collector's seals over a tenant log, in-process over a real directory, signed
//! with a serving certificate from a test CA shaped like the operator's and checked
//! with `portcullis-audit`'s verifier against that CA as the trust bundle.
//!
//! The attack they stop: a pod's checkpoints are signed with the pod's own key, so a
//! compromised workload (or whoever can write the collector's volume) could rewrite
//! or cut a chain and sign it again, and the chain alone would still verify. A seal is
//! signed by the collector and names every chain's head, so the rewrite shows.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use portcullis_api::clock::ManualClock;
use portcullis_audit::checkpoint::{CheckpointSigner, SignerIdentity};
use portcullis_audit::seal::{Seal, seal_digest};
use portcullis_audit::segment;
use portcullis_audit::verify::{
    Anchor, Problem, TrustBundle, VerifyOptions, VerifyReport, verify_jsonl,
};
use portcullis_collector::{Collector, FileStore, IngestError, Sender};

mod support;
use support::{Proxy, batch, start};
#[path = "support/ca.rs"]
mod ca;
use ca::{Leaf, TestCa, ok};

const SHOP: Sender<'static> = Sender {
    tenant: "shop",
    workload: "spiffe://cluster.local/ns/shop/sa/web",
};

fn open(dir: &Path, clock: &Arc<ManualClock>) -> Collector<FileStore> {
    ok(Collector::open(
        ok(FileStore::open(dir, support::keys())),
        clock.clone() as Arc<dyn portcullis_api::clock::Clock>,
    ))
}

/// A signer for `leaf`'s key, carrying `leaf`'s certificate.
fn signer(leaf: &Leaf) -> CheckpointSigner {
    let identity = SignerIdentity {
        spiffe_id: None,
        certificate_der: Some(leaf.chain[0].to_vec()),
        intermediates_der: Vec::new(),
    };
    ok(CheckpointSigner::from_pkcs8(
        leaf.key.secret_der(),
        identity,
    ))
}

/// `audit verify --tenant` as the CLI runs it: signers against the cluster's trust
/// bundle, pruned starts allowed.
fn verify(ca: &TestCa, lines: &[String]) -> Result<VerifyReport, Problem> {
    verify_anchored(ca, lines, Vec::new())
}

/// [`verify`], with the seals the operator witnessed.
fn verify_anchored(
    ca: &TestCa,
    lines: &[String],
    anchors: Vec<Anchor>,
) -> Result<VerifyReport, Problem> {
    let options = VerifyOptions {
        trust_bundle: Some(ok(TrustBundle::from_pem(ca.root_pem().as_bytes()))),
        allow_pruned_start: true,
        anchors,
        ..VerifyOptions::default()
    };
    verify_jsonl(&lines.join("\n"), "collector", options)
}

/// The newest seal of `collector`'s tenant shop, as the operator witnesses it.
fn witness(collector: &Collector<FileStore>) -> Anchor {
    let line = collector.last_seal("shop").unwrap_or_default();
    let value: serde_json::Value = ok(serde_json::from_str(&line));
    Anchor {
        number: value["number"].as_u64().unwrap_or_default(),
        digest: ok(seal_digest(&value)),
    }
}

fn is_seal(line: &str) -> bool {
    serde_json::from_str(line).is_ok_and(|value| Seal::is_seal_value(&value))
}

/// The stored day file of tenant shop (every test's records are of one day).
fn day_file(dir: &Path) -> PathBuf {
    let day = start().to_zoned(jiff::tz::TimeZone::UTC).date();
    dir.join("shop").join(format!("{day}.seg"))
}

/// Tenant shop's stored day, decrypted with its key.
fn read_stored(dir: &Path) -> String {
    let keys = support::keys()
        .get("shop")
        .unwrap_or_else(|| panic!("no test key"));
    let opened = segment::open_segment(&ok(std::fs::read(day_file(dir))), &keys.ring);
    assert_eq!(opened.error, None);
    opened.plaintext
}

/// Rewrites tenant shop's stored day as whoever holds its key could.
fn rewrite_stored(dir: &Path, edit: impl FnOnce(Vec<String>) -> Vec<String>) {
    let lines = edit(read_stored(dir).lines().map(str::to_owned).collect());
    let keys = support::keys()
        .get("shop")
        .unwrap_or_else(|| panic!("no test key"));
    let header = segment::new_header(&keys.active);
    let mut bytes = header.to_vec();
    bytes.extend(ok(segment::seal_frame(
        &keys.active,
        &header,
        0,
        batch(&lines).as_bytes(),
    )));
    ok(std::fs::write(day_file(dir), bytes));
}

/// Tenant shop's log in a fresh directory, holding `n` records of chain web-7d9f-1.
struct ShopLog {
    dir: tempfile::TempDir,
    collector: Collector<FileStore>,
    web: Proxy,
}

fn shop_log(n: usize) -> ShopLog {
    let dir = ok(tempfile::tempdir());
    let clock = Arc::new(ManualClock::new(start()));
    let mut collector = open(dir.path(), &clock);
    let mut web = Proxy::new("web-7d9f-1", "shop");
    if n > 0 {
        ok(collector.ingest(SHOP, &batch(&web.requests(n))));
    }
    ShopLog {
        dir,
        collector,
        web,
    }
}

/// Tenant shop's log with `n` records, sealed by the collector, which then stops.
fn sealed_shop_log(ca: &TestCa, n: usize) -> tempfile::TempDir {
    let ShopLog {
        dir, mut collector, ..
    } = shop_log(n);
    ok(collector.seal(&signer(&ca.collector())));
    dir
}

#[test]
fn a_sealed_log_verifies_and_each_seal_names_only_what_grew() {
    let ca = TestCa::new();
    let collector_key = signer(&ca.collector());
    let ShopLog {
        dir,
        mut collector,
        mut web,
    } = shop_log(0);
    let mut api = Proxy::new("api-5c4b-1", "shop");

    ok(collector.ingest(SHOP, &batch(&web.requests(3))));
    ok(collector.ingest(SHOP, &batch(&api.requests(2))));
    assert_eq!(ok(collector.seal(&collector_key)), [("shop".to_owned(), 0)]);
    assert!(
        ok(collector.seal(&collector_key)).is_empty(),
        "nothing new, no seal"
    );

    ok(collector.ingest(SHOP, &batch(&web.requests(2))));
    assert_eq!(ok(collector.seal(&collector_key)), [("shop".to_owned(), 1)]);
    let lines = ok(collector.entries("shop"));
    let second: Seal = ok(serde_json::from_str(&lines[lines.len() - 1]));
    assert_eq!(
        second.heads.keys().collect::<Vec<_>>(),
        ["web-7d9f-1"],
        "only the chain that grew"
    );
    assert_eq!(second.heads["web-7d9f-1"].seq, 4);

    // A restarted collector continues the seal chain where it stood.
    drop(collector);
    let mut collector = open(dir.path(), &Arc::new(ManualClock::new(start())));
    ok(collector.ingest(SHOP, &batch(&api.requests(1))));
    assert_eq!(ok(collector.seal(&collector_key)), [("shop".to_owned(), 2)]);

    let report = verify(&ca, &ok(collector.entries("shop"))).unwrap_or_else(|p| panic!("{p}"));
    assert_eq!(
        (report.records, report.seals, report.last_seal),
        (8, 3, Some(2))
    );
}

#[test]
fn a_chain_rewritten_and_signed_again_by_its_workload_fails_the_seal() {
    let ca = TestCa::new();
    let dir = sealed_shop_log(&ca, 5);

    // The same chain id, made again from scratch with other requests: every hash and
    // link is consistent, so the chain alone verifies.
    let mut forged = Proxy::new("web-7d9f-1", "shop");
    let forged_lines: Vec<String> = (0..5)
        .map(|i| {
            forged.request(
                start(),
                "api.identify",
                "key:ak_***000",
                &format!("/v1/forged/{i}"),
            )
        })
        .collect();
    rewrite_stored(dir.path(), |lines| {
        let seals = lines.into_iter().filter(|line| is_seal(line));
        forged_lines.iter().cloned().chain(seals).collect()
    });
    let stored = read_stored(dir.path());
    let records: Vec<String> = stored
        .lines()
        .filter(|line| !is_seal(line))
        .map(str::to_owned)
        .collect();
    assert!(
        verify(&ca, &records).is_ok(),
        "without the seal the rewrite goes unnoticed"
    );

    let lines: Vec<String> = stored.lines().map(str::to_owned).collect();
    match verify(&ca, &lines) {
        Err(Problem::SealMismatch {
            number: 0,
            chain_id,
            seq: 4,
            ..
        }) => assert_eq!(chain_id, "web-7d9f-1"),
        other => panic!("expected the seal to name the rewritten head, got {other:?}"),
    }
}

#[test]
fn records_cut_after_sealing_fail_the_seal() {
    let ca = TestCa::new();
    let dir = sealed_shop_log(&ca, 5);

    // The last two records go; the seal stays.
    rewrite_stored(dir.path(), |lines| {
        lines
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !(3..5).contains(i))
            .map(|(_, line)| line)
            .collect()
    });
    let lines: Vec<String> = read_stored(dir.path()).lines().map(str::to_owned).collect();
    match verify(&ca, &lines) {
        Err(Problem::SealedRecordMissing {
            number: 0,
            seq: 4,
            last_seq: Some(2),
            ..
        }) => {}
        other => panic!("expected the cut to show, got {other:?}"),
    }
}

#[test]
fn a_seal_replaced_or_removed_breaks_the_seal_chain() {
    let ca = TestCa::new();
    let key = signer(&ca.collector());
    // The directory stays bound: it must outlive the collector writing to it.
    let ShopLog {
        dir: _dir,
        mut collector,
        mut web,
    } = shop_log(0);
    for _ in 0..3 {
        ok(collector.ingest(SHOP, &batch(&web.requests(2))));
        ok(collector.seal(&key));
    }
    let lines = ok(collector.entries("shop"));

    let without_the_middle_seal: Vec<String> = lines
        .iter()
        .filter(|line| !(is_seal(line) && line.contains("\"number\":1")))
        .cloned()
        .collect();
    match verify(&ca, &without_the_middle_seal) {
        Err(Problem::SealsMissing {
            expected: 1,
            found: 2,
            ..
        }) => {}
        other => panic!("expected the missing seal to show, got {other:?}"),
    }
}

#[test]
fn a_seal_signed_by_a_workload_or_another_ca_is_not_the_collectors() {
    let ca = TestCa::new();

    // A workload leaf of the same CA is a server certificate too, but it names a
    // SPIFFE id: it must not pass for the collector.
    let mut log = shop_log(2);
    ok(log
        .collector
        .seal(&signer(&ca.workload("shop", "web", "shop"))));
    match verify(&ca, &ok(log.collector.entries("shop"))) {
        Err(Problem::SealSignerNotTrusted {
            number: 0, detail, ..
        }) => {
            assert!(detail.contains("workload"), "{detail}");
        }
        other => panic!("expected the workload's seal to be refused, got {other:?}"),
    }

    let mut log = shop_log(2);
    ok(log.collector.seal(&signer(&TestCa::new().collector())));
    assert!(matches!(
        verify(&ca, &ok(log.collector.entries("shop"))),
        Err(Problem::SealSignerNotTrusted { number: 0, .. })
    ));
}

#[test]
fn a_workload_cannot_ship_a_seal_into_its_log() {
    let ca = TestCa::new();
    let mut log = shop_log(2);

    // A genuine seal of the same chain, from another collector's log.
    let mut elsewhere = shop_log(2);
    ok(elsewhere.collector.seal(&signer(&ca.collector())));
    let seal = ok(elsewhere.collector.entries("shop"))
        .pop()
        .unwrap_or_default();
    assert!(is_seal(&seal));

    match log.collector.ingest(SHOP, &batch(&[seal])) {
        Err(IngestError::Refused(_)) => {}
        other => panic!("a seal shipped by a workload must be refused, got {other:?}"),
    }
    assert!(
        !ok(log.collector.entries("shop"))
            .iter()
            .any(|line| is_seal(line)),
        "nothing of it stored"
    );
}

#[test]
fn a_log_rewritten_and_sealed_again_by_the_collector_fails_the_operators_anchor() {
    let ca = TestCa::new();
    let key = signer(&ca.collector());
    let mut genuine = shop_log(5);
    ok(genuine.collector.seal(&key));
    let anchors = vec![witness(&genuine.collector)];
    ok(genuine
        .collector
        .ingest(SHOP, &batch(&genuine.web.requests(2))));
    ok(genuine.collector.seal(&key));
    let report = verify_anchored(&ca, &ok(genuine.collector.entries("shop")), anchors.clone())
        .unwrap_or_else(|p| panic!("{p}"));
    assert_eq!((report.seals, report.anchors), (2, 1));

    // Whoever holds the collector's key rebuilds the log from scratch and seals it
    // again: every hash, link, seal and signature is consistent.
    let mut forged = shop_log(0);
    let mut chain = Proxy::new("web-7d9f-1", "shop");
    let lines: Vec<String> = (0..7)
        .map(|i| {
            chain.request(
                start(),
                "api.identify",
                "key:ak_***000",
                &format!("/v1/forged/{i}"),
            )
        })
        .collect();
    ok(forged.collector.ingest(SHOP, &batch(&lines)));
    ok(forged.collector.seal(&key));
    let forged_log = ok(forged.collector.entries("shop"));
    assert!(
        verify(&ca, &forged_log).is_ok(),
        "without the operator's anchor the forgery verifies"
    );
    match verify_anchored(&ca, &forged_log, anchors) {
        Err(Problem::AnchorMismatch { number: 0, .. }) => {}
        other => panic!("expected the witnessed seal to differ, got {other:?}"),
    }

    // A log cut back to before the witnessed seal is missing it.
    let mut cut = shop_log(3);
    let anchors = vec![Anchor {
        number: 4,
        digest: "0".repeat(64),
    }];
    ok(cut.collector.seal(&key));
    match verify_anchored(&ca, &ok(cut.collector.entries("shop")), anchors) {
        Err(Problem::AnchoredSealMissing {
            number: 4,
            last_seal: Some(0),
            ..
        }) => {}
        other => panic!("expected the witnessed seal to be missing, got {other:?}"),
    }
}

#[test]
fn a_busy_log_is_sealed_every_so_many_records_a_quiet_one_waits_for_the_round() {
    let ca = TestCa::new();
    let key = signer(&ca.collector());
    let ShopLog {
        dir: _dir,
        mut collector,
        mut web,
    } = shop_log(0);

    ok(collector.ingest(SHOP, &batch(&web.requests(3))));
    assert!(
        ok(collector.seal_grown(&key, 5)).is_empty(),
        "3 records are not yet 5"
    );
    ok(collector.ingest(SHOP, &batch(&web.requests(2))));
    assert_eq!(ok(collector.seal_grown(&key, 5)), [("shop".to_owned(), 0)]);

    // The count starts again after a seal; the periodic round seals whatever grew.
    ok(collector.ingest(SHOP, &batch(&web.requests(1))));
    assert!(ok(collector.seal_grown(&key, 5)).is_empty());
    assert_eq!(ok(collector.seal(&key)), [("shop".to_owned(), 1)]);
}
