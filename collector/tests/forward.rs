//! SIEM forwarding from the collector, in-process over a real directory: every stored
//! entry reaches each of a tenant's sinks once and in order, through a sink's outage,
//! its refusals, a day boundary and a collector restart; a sink seen for the first time
//! starts at yesterday's log; a changed token keeps the sink's place; a removed sink
//! forgets it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis_api::clock::{Clock, ManualClock};
use portcullis_audit::entry::Entry;
use portcullis_audit::retry::RetryPolicy;
use portcullis_audit::sink::{Deliver, DeliveryError, SinkFuture};
use portcullis_collector::{
    Collector, FileStore, ForwardMetrics, Forwarding, Sender, SinkDirectory, SinkTarget,
};

mod support;
use support::{Proxy, batch, start};

const SHOP: Sender<'static> = Sender {
    tenant: "shop",
    workload: "spiffe://cluster.local/ns/shop/sa/web",
};

const FAST: RetryPolicy = RetryPolicy {
    initial: Duration::from_millis(10),
    max: Duration::from_millis(50),
};

const ACCEPTING: u8 = 0;
const DOWN: u8 = 1;
const REFUSING: u8 = 2;

/// A SIEM stand-in: keeps what it accepted; can be down (transient) or refuse (403).
#[derive(Clone, Default)]
struct Siem {
    accepted: Arc<Mutex<Vec<String>>>,
    mode: Arc<AtomicU8>,
}

impl Siem {
    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    fn lines(&self) -> Vec<String> {
        self.accepted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Deliver for Siem {
    fn name(&self) -> &str {
        "siem"
    }

    fn deliver<'a>(&'a self, entries: &'a [Entry]) -> SinkFuture<'a, Result<(), DeliveryError>> {
        Box::pin(async move {
            match self.mode.load(Ordering::SeqCst) {
                DOWN => Err(DeliveryError::Transient("connection refused".into())),
                REFUSING => Err(DeliveryError::Permanent {
                    status: 403,
                    message: "invalid token".into(),
                }),
                _ => {
                    let mut accepted = self.accepted.lock().unwrap_or_else(|p| p.into_inner());
                    for entry in entries {
                        accepted.push(entry.to_json_line().unwrap_or_else(|e| panic!("{e}")));
                    }
                    Ok(())
                }
            }
        })
    }
}

/// One sink as the test describes it: id, fingerprint byte, the SIEM or a problem.
type Described = (String, u8, Result<Siem, String>);

/// The cluster as the test says, per tenant.
#[derive(Clone, Default)]
struct Directory {
    sinks: Arc<Mutex<HashMap<String, Vec<Described>>>>,
}

impl Directory {
    fn set(&self, tenant: &str, sinks: Vec<(&str, u8, Result<Siem, String>)>) {
        let sinks = sinks
            .into_iter()
            .map(|(id, f, s)| (id.to_owned(), f, s))
            .collect();
        self.sinks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.to_owned(), sinks);
    }
}

impl SinkDirectory for Directory {
    async fn sinks(&self, tenant: &str) -> Result<Vec<SinkTarget>, String> {
        let sinks = self.sinks.lock().unwrap_or_else(|p| p.into_inner());
        Ok(sinks
            .get(tenant)
            .into_iter()
            .flatten()
            .map(|(id, fingerprint, siem)| SinkTarget {
                id: id.clone(),
                fingerprint: [*fingerprint; 32],
                deliver: siem.clone().map(|s| Arc::new(s) as Arc<dyn Deliver>),
            })
            .collect())
    }
}

type Shared = Arc<Mutex<Collector<FileStore>>>;

fn open(dir: &std::path::Path, clock: &Arc<ManualClock>) -> Shared {
    let store = FileStore::open(dir, support::keys()).unwrap_or_else(|e| panic!("{e}"));
    let collector =
        Collector::open(store, clock.clone() as Arc<dyn Clock>).unwrap_or_else(|e| panic!("{e}"));
    Arc::new(Mutex::new(collector))
}

fn ingest(collector: &Shared, lines: &[String]) {
    collector
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .ingest(SHOP, &batch(lines))
        .unwrap_or_else(|e| panic!("{e}"));
}

fn forwarding(collector: &Shared, directory: &Directory) -> Forwarding<FileStore, Directory> {
    Forwarding::new(
        collector.clone(),
        directory.clone(),
        ForwardMetrics::default(),
        FAST,
    )
}

/// Waits (at most 10 s) until `siem` holds exactly `want`.
async fn holds(siem: &Siem, want: &[String]) {
    for _ in 0..500 {
        if siem.lines() == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = siem.lines();
    panic!(
        "the SIEM holds {} entries, want {}:\n{:#?}",
        got.len(),
        want.len(),
        got
    );
}

#[tokio::test]
async fn every_entry_reaches_each_sink_once_in_order_through_outages_refusals_and_a_restart() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let clock = Arc::new(ManualClock::new(start()));
    let collector = open(dir.path(), &clock);
    let mut proxy = Proxy::new("web-7d9f-1", "shop");
    let (splunk, datadog) = (Siem::default(), Siem::default());
    datadog.set(DOWN);
    let directory = Directory::default();
    directory.set(
        "shop",
        vec![
            ("splunk-hec-1", 1, Ok(splunk.clone())),
            ("datadog-1", 1, Ok(datadog.clone())),
        ],
    );

    // Stored before any forwarder runs: a new sink starts at yesterday's log.
    ingest(&collector, &proxy.requests(4));
    let mut forwarding = forwarding(&collector, &directory);
    forwarding.sync().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(forwarding.running(), 2);
    ingest(&collector, &proxy.requests(3));
    holds(&splunk, &proxy.lines).await;
    assert!(
        datadog.lines().is_empty(),
        "the down sink holds back nothing else"
    );

    // Datadog refuses (a bad key) for a while, then accepts: nothing is skipped.
    datadog.set(REFUSING);
    ingest(&collector, &proxy.requests(2));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        datadog.lines().is_empty(),
        "a refused batch is kept, not dropped"
    );
    datadog.set(ACCEPTING);
    holds(&datadog, &proxy.lines).await;
    holds(&splunk, &proxy.lines).await;

    // Past midnight, and across a collector restart with Splunk down meanwhile: each
    // sink resumes from its own saved place.
    forwarding.stop().await;
    splunk.set(DOWN);
    clock.advance(jiff::SignedDuration::from_hours(24));
    let collector = open(dir.path(), &clock);
    ingest(&collector, &proxy.requests(3));
    let mut forwarding = self::forwarding(&collector, &directory);
    forwarding.sync().await.unwrap_or_else(|e| panic!("{e}"));
    holds(&datadog, &proxy.lines).await;
    splunk.set(ACCEPTING);
    holds(&splunk, &proxy.lines).await;
    assert_eq!(splunk.lines().len(), 12);
    forwarding.stop().await;
}

#[tokio::test]
async fn a_new_sink_starts_yesterday_a_changed_token_keeps_its_place_and_a_removed_sink_forgets_it()
{
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let clock = Arc::new(ManualClock::new(start()));
    let collector = open(dir.path(), &clock);
    let mut proxy = Proxy::new("web-7d9f-1", "shop");
    ingest(&collector, &proxy.requests(3));
    clock.advance(jiff::SignedDuration::from_hours(48));
    ingest(&collector, &proxy.requests(2));
    let today = proxy.lines[3..].to_vec();

    // The day before yesterday is not replayed into a sink added today.
    let first = Siem::default();
    let directory = Directory::default();
    directory.set("shop", vec![("splunk-hec-1", 1, Ok(first.clone()))]);
    let mut forwarding = forwarding(&collector, &directory);
    forwarding.sync().await.unwrap_or_else(|e| panic!("{e}"));
    holds(&first, &today).await;

    // A rotated token: a new client from the sink's place on, nothing sent twice.
    let rotated = Siem::default();
    directory.set("shop", vec![("splunk-hec-1", 2, Ok(rotated.clone()))]);
    forwarding.sync().await.unwrap_or_else(|e| panic!("{e}"));
    ingest(&collector, &proxy.requests(2));
    holds(&rotated, &proxy.lines[5..]).await;
    assert_eq!(first.lines(), today, "the old client sends nothing more");

    // A sink whose Secret went missing keeps its running forwarder and its settings.
    directory.set(
        "shop",
        vec![(
            "splunk-hec-1",
            3,
            Err("Secret portcullis-system/hec not found".into()),
        )],
    );
    forwarding.sync().await.unwrap_or_else(|e| panic!("{e}"));
    ingest(&collector, &proxy.requests(1));
    holds(&rotated, &proxy.lines[5..]).await;

    // Removed, then added again: it starts over at yesterday's log, not where it left off.
    directory.set("shop", Vec::new());
    forwarding.sync().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(forwarding.running(), 0);
    ingest(&collector, &proxy.requests(1));
    let again = Siem::default();
    directory.set("shop", vec![("splunk-hec-1", 1, Ok(again.clone()))]);
    forwarding.sync().await.unwrap_or_else(|e| panic!("{e}"));
    holds(&again, &proxy.lines[3..]).await;
    forwarding.stop().await;
}
