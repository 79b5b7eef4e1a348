//! The collector's core, in-process, over real hash chains and signed checkpoints from
//! `portcullis-audit` and a real directory: a proxy's resend is stored once, a rewrite,
//! a gap, an altered record, another tenant's record and another workload's chain are
//! refused whole, a restarted collector continues every chain, and retention removes
//! whole days while what remains still verifies.

use portcullis_api::audit_ship::ShipRefusalReason;
use portcullis_api::clock::ManualClock;
use portcullis_audit::checkpoint::{CheckpointSigner, SignerIdentity};
use portcullis_audit::entry::Entry;
use portcullis_audit::segment::{self, SegmentError};
use portcullis_audit::verify::{VerifyOptions, verify_jsonl};
use portcullis_collector::{
    Collector, DayOffset, FileStore, IngestError, KeyCache, Sender, StoreError,
};
use std::sync::Arc;

mod support;
use support::{Proxy, batch, start};

const SHOP: Sender<'static> = Sender {
    tenant: "shop",
    workload: "spiffe://cluster.local/ns/shop/sa/web",
};

fn refused(
    result: Result<portcullis_api::audit_ship::ShipAck, IngestError>,
) -> portcullis_api::audit_ship::ShipRefusal {
    match result {
        Err(IngestError::Refused(refusal)) => refusal,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn open(dir: &std::path::Path, clock: &Arc<ManualClock>) -> Collector<FileStore> {
    Collector::open(
        FileStore::open(dir, support::keys()).unwrap_or_else(|e| panic!("{e}")),
        clock.clone() as Arc<dyn portcullis_api::clock::Clock>,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_resend_is_acknowledged_and_stored_once() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let clock = Arc::new(ManualClock::new(start()));
    let mut collector = open(dir.path(), &clock);
    let mut proxy = Proxy::new("web-7d9f-1", "shop");

    let first = proxy.requests(3);
    let ack = collector
        .ingest(SHOP, &batch(&first))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((ack.stored, ack.duplicates), (3, 0));
    assert_eq!(ack.durable_through.get("web-7d9f-1"), Some(&2));

    // The answer was lost: the proxy sends everything unacknowledged again, plus more.
    let mut again = first.clone();
    again.extend(proxy.requests(2));
    let ack = collector
        .ingest(SHOP, &batch(&again))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((ack.stored, ack.duplicates), (2, 3));
    assert_eq!(ack.durable_through.get("web-7d9f-1"), Some(&4));

    let stored = collector.entries("shop").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stored, proxy.lines, "exactly one line per record, in order");
    let report = verify_jsonl(&stored.join("\n"), "collector", VerifyOptions::default())
        .unwrap_or_else(|p| panic!("{p}"));
    assert_eq!(report.records, 5);
}

#[test]
fn rewrites_gaps_and_altered_records_are_refused_whole() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let clock = Arc::new(ManualClock::new(start()));
    let mut collector = open(dir.path(), &clock);
    let mut proxy = Proxy::new("web-7d9f-1", "shop");
    let first = proxy.requests(3);
    collector
        .ingest(SHOP, &batch(&first))
        .unwrap_or_else(|e| panic!("{e}"));

    // A gap: records 3 and 4 are skipped.
    let later = proxy.requests(3);
    let refusal = refused(collector.ingest(SHOP, &batch(&later[2..])));
    assert_eq!(refusal.reason, ShipRefusalReason::MissingRecords);
    assert_eq!(refusal.expected_seq, Some(3), "{}", refusal.error);

    // An altered record: its hash no longer matches (a valid record before it in the
    // same batch must not be stored either).
    let tampered = later[1].replace("\"status\":200", "\"status\":403");
    let refusal = refused(collector.ingest(SHOP, &batch(&[later[0].clone(), tampered])));
    assert_eq!(refusal.reason, ShipRefusalReason::AlteredRecord);

    // A rewrite: a workload that rebuilt its chain from seq 0 with other content.
    let mut forger = Proxy::new("web-7d9f-1", "shop");
    let rewritten = forger.requests(1)[0].replace("/v1/identify/0", "/v1/nothing-to-see");
    let mut rehashed: serde_json::Value =
        serde_json::from_str(&rewritten).unwrap_or_else(|e| panic!("{e}"));
    rehashed["hash"] = serde_json::json!(
        portcullis_audit::canonical::record_hash_of_value(rehashed.clone())
            .unwrap_or_else(|e| panic!("{e}"))
    );
    let refusal = refused(collector.ingest(SHOP, &batch(&[rehashed.to_string()])));
    assert_eq!(refusal.reason, ShipRefusalReason::Fork);

    // None of it landed; the honest continuation still fits.
    assert_eq!(
        collector.entries("shop").unwrap_or_else(|e| panic!("{e}")),
        first
    );
    let ack = collector
        .ingest(SHOP, &batch(&later))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ack.stored, 3);
}

#[test]
fn a_workload_writes_only_its_own_tenant_and_its_own_chains() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let clock = Arc::new(ManualClock::new(start()));
    let mut collector = open(dir.path(), &clock);
    let mut web = Proxy::new("web-7d9f-1", "shop");
    collector
        .ingest(SHOP, &batch(&web.requests(2)))
        .unwrap_or_else(|e| panic!("{e}"));

    // Records naming another tenant, from a shop workload.
    let mut other = Proxy::new("bank-1", "bank");
    let refusal = refused(collector.ingest(SHOP, &batch(&other.requests(1))));
    assert_eq!(refusal.reason, ShipRefusalReason::WrongTenant);
    assert!(refusal.error.contains("\"bank\""), "{}", refusal.error);

    // Another shop workload continuing web's chain.
    let cart = Sender {
        tenant: "shop",
        workload: "spiffe://cluster.local/ns/shop/sa/cart",
    };
    let refusal = refused(collector.ingest(cart, &batch(&web.requests(1))));
    assert_eq!(refusal.reason, ShipRefusalReason::ForeignChain);
    assert!(refusal.error.contains("sa/web"), "{}", refusal.error);
}

#[test]
fn checkpoints_must_sign_what_arrived() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let clock = Arc::new(ManualClock::new(start()));
    let mut collector = open(dir.path(), &clock);
    let signer = CheckpointSigner::from_pkcs8(
        &CheckpointSigner::generate_pkcs8().unwrap_or_else(|e| panic!("{e}")),
        SignerIdentity::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut proxy = Proxy::new("web-7d9f-1", "shop");
    let records = proxy.requests(3);
    let head: serde_json::Value =
        serde_json::from_str(&records[2]).unwrap_or_else(|e| panic!("{e}"));
    let hash = head["hash"].as_str().unwrap_or_default();
    let checkpoint = |seq: u64, hash: &str| {
        Entry::Checkpoint(
            signer
                .sign("web-7d9f-1", seq, hash, start())
                .unwrap_or_else(|e| panic!("{e}")),
        )
        .to_json_line()
        .unwrap_or_else(|e| panic!("{e}"))
    };

    // A checkpoint over a record that has not arrived.
    let mut early = records[..2].to_vec();
    early.push(checkpoint(2, hash));
    let refusal = refused(collector.ingest(SHOP, &batch(&early)));
    assert_eq!(refusal.reason, ShipRefusalReason::BadCheckpoint);

    // A forged signature.
    let forged = checkpoint(2, hash).replacen("\"signature\":\"", "\"signature\":\"AAAA", 1);
    let mut with_forged = records.clone();
    with_forged.push(forged);
    let refusal = refused(collector.ingest(SHOP, &batch(&with_forged)));
    assert_eq!(refusal.reason, ShipRefusalReason::BadCheckpoint);

    // The real one, after its record: stored, and the stored log verifies with it.
    let mut good = records.clone();
    good.push(checkpoint(2, hash));
    let ack = collector
        .ingest(SHOP, &batch(&good))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ack.stored, 4);
    let stored = collector.entries("shop").unwrap_or_else(|e| panic!("{e}"));
    let report = verify_jsonl(&stored.join("\n"), "collector", VerifyOptions::default())
        .unwrap_or_else(|p| panic!("{p}"));
    assert_eq!((report.records, report.checkpoints), (3, 1));
}

/// Tenant shop's log in a fresh directory after `batches` batches of `per_batch`
/// records of chain web-7d9f-1, the collector that wrote it closed again.
fn stored_shop_log(
    batches: usize,
    per_batch: usize,
) -> (tempfile::TempDir, Arc<ManualClock>, Proxy) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let clock = Arc::new(ManualClock::new(start()));
    let mut proxy = Proxy::new("web-7d9f-1", "shop");
    let mut collector = open(dir.path(), &clock);
    for _ in 0..batches {
        collector
            .ingest(SHOP, &batch(&proxy.requests(per_batch)))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    (dir, clock, proxy)
}

fn day_file(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("shop").join("2027-01-15.seg")
}

/// Stores four records, leaves `tail` after them as a crash would, and checks that a
/// restarted collector continues the chain and stores exactly what follows.
fn restart_after_a_torn_append(tail: &[u8]) {
    let (dir, clock, mut proxy) = stored_shop_log(1, 4);
    let mut bytes = std::fs::read(day_file(dir.path())).unwrap_or_else(|e| panic!("{e}"));
    bytes.extend_from_slice(tail);
    std::fs::write(day_file(dir.path()), bytes).unwrap_or_else(|e| panic!("{e}"));

    let mut collector = open(dir.path(), &clock);
    let head = collector
        .arrivals()
        .head("web-7d9f-1")
        .unwrap_or_else(|| panic!("the chain was forgotten"));
    assert_eq!(head.next_seq, 4);
    assert_eq!(head.owner, SHOP.workload);

    // The proxy resends what was never acknowledged, then carries on.
    let ack = collector
        .ingest(SHOP, &batch(&proxy.requests(2)))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (ack.stored, ack.durable_through.get("web-7d9f-1").copied()),
        (2, Some(5))
    );
    let stored = collector.entries("shop").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stored, proxy.lines);
    verify_jsonl(&stored.join("\n"), "collector", VerifyOptions::default())
        .unwrap_or_else(|p| panic!("{p}"));

    // The owner survives the restart too.
    let cart = Sender {
        tenant: "shop",
        workload: "spiffe://cluster.local/ns/shop/sa/cart",
    };
    let refusal = refused(collector.ingest(cart, &batch(&proxy.requests(1))));
    assert_eq!(refusal.reason, ShipRefusalReason::ForeignChain);
}

#[test]
fn a_restarted_collector_cuts_a_frame_torn_mid_write() {
    // A length prefix saying 300 bytes, and only a few of them.
    let mut tail = 300u32.to_be_bytes().to_vec();
    tail.extend_from_slice(&[7; 40]);
    restart_after_a_torn_append(&tail);
}

#[test]
fn a_restarted_collector_cuts_zeros_the_disk_never_filled() {
    restart_after_a_torn_append(&[0; 700]);
}

#[test]
fn a_restarted_collector_cuts_a_whole_length_frame_that_does_not_open() {
    let mut tail = 64u32.to_be_bytes().to_vec();
    tail.extend_from_slice(&[9; 12 + 64]);
    restart_after_a_torn_append(&tail);
}

#[test]
fn records_rest_encrypted_under_the_tenant_key() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let clock = Arc::new(ManualClock::new(start()));
    let mut collector = open(dir.path(), &clock);
    let mut proxy = Proxy::new("web-7d9f-1", "shop");
    collector
        .ingest(SHOP, &batch(&proxy.requests(3)))
        .unwrap_or_else(|e| panic!("{e}"));
    let bytes = std::fs::read(day_file(dir.path())).unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8_lossy(&bytes);
    for visible in ["/v1/identify", "web-7d9f", "api.identify", "key:ak_"] {
        assert!(!text.contains(visible), "{visible:?} is readable on disk");
    }
    // The day is an audit segment: `audit verify` opens it with the tenant's key ...
    let key = support::keys()
        .get("shop")
        .unwrap_or_else(|| panic!("no test key"));
    let opened = segment::open_segment(&bytes, &key.ring);
    assert_eq!(opened.error, None);
    assert_eq!(opened.plaintext.lines().count(), 3);
    // ... and with another tenant's key it opens nothing.
    let other = support::keys()
        .get("bank")
        .unwrap_or_else(|| panic!("no test key"));
    let wrong = segment::open_segment(&bytes, &other.ring);
    assert!(
        matches!(wrong.error, Some(SegmentError::WrongKey { .. })),
        "{:?}",
        wrong.error
    );
}

#[test]
fn without_the_tenant_key_nothing_is_stored_until_it_arrives() {
    let (dir, clock, mut proxy) = stored_shop_log(1, 4);
    // A restart before the operator answered: the cache holds no key yet.
    let keys = Arc::new(KeyCache::new());
    let mut collector = Collector::open(
        FileStore::open(dir.path(), keys.clone()).unwrap_or_else(|e| panic!("{e}")),
        clock.clone() as Arc<dyn portcullis_api::clock::Clock>,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(keys.wanted(), vec!["shop".to_owned()]);
    let next = batch(&proxy.requests(2));
    match collector.ingest(SHOP, &next) {
        Err(IngestError::Store(StoreError::NoKey { tenant })) => assert_eq!(tenant, "shop"),
        other => panic!("expected NoKey, got {other:?}"),
    }
    // The key arrives: the log is read back first, so the chain goes on from seq 4.
    let shop_key = support::keys()
        .get("shop")
        .unwrap_or_else(|| panic!("no test key"));
    keys.insert((*shop_key).clone());
    let ack = collector
        .ingest(SHOP, &next)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (ack.stored, ack.durable_through.get("web-7d9f-1").copied()),
        (2, Some(5))
    );
    assert_eq!(
        collector.entries("shop").unwrap_or_else(|e| panic!("{e}")),
        proxy.lines
    );
}

#[test]
fn a_damaged_frame_with_records_after_it_is_refused_not_cut() {
    let (dir, clock, _proxy) = stored_shop_log(3, 2);
    // One byte of the first frame's ciphertext flipped: damage, not a crash.
    let mut bytes = std::fs::read(day_file(dir.path())).unwrap_or_else(|e| panic!("{e}"));
    let size = bytes.len();
    bytes[segment::HEADER_LEN + 4 + 12 + 5] ^= 1;
    std::fs::write(day_file(dir.path()), &bytes).unwrap_or_else(|e| panic!("{e}"));
    let opened = Collector::open(
        FileStore::open(dir.path(), support::keys()).unwrap_or_else(|e| panic!("{e}")),
        clock.clone() as Arc<dyn portcullis_api::clock::Clock>,
    );
    match opened {
        Err(StoreError::Damaged { frame: 0, .. }) => {}
        other => panic!("expected the damage named, got {other:?}"),
    }
    let after = std::fs::read(day_file(dir.path())).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(after.len(), size, "records after the damage were cut");
}

#[test]
fn retention_removes_whole_days_and_the_rest_still_verifies() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let clock = Arc::new(ManualClock::new(start()));
    let mut collector = open(dir.path(), &clock);
    let mut proxy = Proxy::new("web-7d9f-1", "shop");
    for _ in 0..5 {
        collector
            .ingest(SHOP, &batch(&proxy.requests(2)))
            .unwrap_or_else(|e| panic!("{e}"));
        clock.advance(jiff::SignedDuration::from_hours(24));
    }
    // Now the 20th; a 3-day retention keeps the 18th, 19th and 20th (empty).
    let removed = collector.prune("shop", 3).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(removed, 3, "the 15th, 16th and 17th go");
    let stored = collector.entries("shop").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stored, proxy.lines[6..].to_vec());
    let pruned_start = VerifyOptions {
        allow_pruned_start: true,
        ..VerifyOptions::default()
    };
    verify_jsonl(&stored.join("\n"), "collector", pruned_start).unwrap_or_else(|p| panic!("{p}"));
    // Without the allowance, the missing start is visible.
    assert!(verify_jsonl(&stored.join("\n"), "collector", VerifyOptions::default()).is_err());

    // The chain carries on after pruning.
    let ack = collector
        .ingest(SHOP, &batch(&proxy.requests(1)))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ack.durable_through.get("web-7d9f-1"), Some(&10));
}

/// Retention as the Tenants say: shop keeps 2 days, bank's cannot be learnt right now.
struct PerTenant;

impl portcullis_collector::RetentionPolicy for PerTenant {
    async fn days(&self, tenant: &str) -> Option<u32> {
        (tenant == "shop").then_some(2)
    }
}

#[tokio::test]
async fn each_tenant_keeps_its_own_retention_and_an_unknown_one_prunes_nothing() {
    use portcullis_collector::{Pruned, prune_all};
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let clock = Arc::new(ManualClock::new(start()));
    let collector = Arc::new(std::sync::Mutex::new(open(dir.path(), &clock)));
    let bank_sender = Sender {
        tenant: "bank",
        workload: "spiffe://cluster.local/ns/bank/sa/web",
    };
    let mut shop = Proxy::new("shop-1", "shop");
    let mut bank = Proxy::new("bank-1", "bank");
    for _ in 0..4 {
        let mut c = collector.lock().unwrap_or_else(|e| panic!("{e}"));
        c.ingest(SHOP, &batch(&shop.requests(1)))
            .unwrap_or_else(|e| panic!("{e}"));
        c.ingest(bank_sender, &batch(&bank.requests(1)))
            .unwrap_or_else(|e| panic!("{e}"));
        drop(c);
        clock.advance(jiff::SignedDuration::from_hours(24));
    }
    let rounds = prune_all(&collector, &PerTenant)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        rounds,
        [
            ("bank".to_owned(), Pruned::Skipped),
            (
                "shop".to_owned(),
                Pruned::Days {
                    retention_days: 2,
                    removed: 3
                }
            ),
        ]
    );
    let c = collector.lock().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        c.entries("bank").unwrap_or_else(|e| panic!("{e}")),
        bank.lines
    );
    assert_eq!(
        c.entries("shop").unwrap_or_else(|e| panic!("{e}")),
        shop.lines[3..].to_vec()
    );
}

#[test]
fn a_day_reads_in_whole_batch_pieces_that_add_up_to_the_day() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let clock = Arc::new(ManualClock::new(start()));
    let mut collector = open(dir.path(), &clock);
    let mut proxy = Proxy::new("web-7d9f-1", "shop");
    for _ in 0..10 {
        collector
            .ingest(SHOP, &batch(&proxy.requests(3)))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let day = collector.days("shop").unwrap_or_else(|e| panic!("{e}"))[0];
    // One day holds the whole log here.
    let whole = collector.entries("shop").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(whole.len(), 30);
    // Pieces of about 1 000 bytes: a few stored batches each, never a batch cut in two.
    let (mut at, mut pieces, mut lines) = (DayOffset::START, 0, Vec::new());
    loop {
        let piece = collector
            .read_day_piece("shop", day, at, 1_000)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(piece.next > at || piece.end, "no progress at {at:?}");
        assert_eq!(piece.lines.len() % 3, 0, "a batch was cut");
        at = piece.next;
        pieces += 1;
        lines.extend(piece.lines);
        if piece.end {
            break;
        }
    }
    assert_eq!(lines, whole);
    assert!(pieces > 3, "{pieces} pieces");
    // A batch longer than the piece size still comes whole.
    let first = collector
        .read_day_piece("shop", day, DayOffset::START, 10)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first.lines, whole[..3].to_vec());
}
