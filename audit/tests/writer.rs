//! The writer pipeline: chaining, checkpoints, fail-closed and fail-open behaviour.

mod common;

use common::*;
use jiff::SignedDuration;
use portcullis_audit::retry::RetryPolicy;
use portcullis_audit::sink::Sink;
use portcullis_audit::sink::memory::MemorySink;
use portcullis_audit::sink::splunk_hec::{SplunkHec, SplunkHecConfig};
use portcullis_audit::sink::spool::Spool;
use portcullis_audit::sink::spooled::SpooledSink;
use portcullis_audit::verify::verify_entries;
use portcullis_audit::{
    Accepted, AuditWriter, CheckpointPolicy, Entry, FailureMode, ManualClock, Secret, SubmitError,
    VerifyOptions, WriterConfig,
};
use std::sync::Arc;
use std::time::Duration;

fn config(mode: FailureMode, every_records: u64, every: Duration) -> WriterConfig {
    let mut c = WriterConfig::new("chain-w");
    c.failure_mode = mode;
    c.channel_capacity = 2;
    c.batch_max = 1;
    c.batch_linger = Duration::ZERO;
    c.checkpoint = CheckpointPolicy {
        every_records,
        every,
    };
    c.sink_retry = RetryPolicy {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(50),
    };
    c.clock = Arc::new(ManualClock::new(t0()));
    c
}

#[tokio::test]
async fn records_are_chained_with_checkpoints_even_when_the_clock_goes_back() -> TestResult {
    let memory = MemorySink::new();
    let mut cfg = config(FailureMode::FailClosed, 3, Duration::from_secs(3600));
    cfg.channel_capacity = 100;
    cfg.batch_max = 4;
    let writer = AuditWriter::start(cfg, signer()?, vec![Arc::new(memory.clone())]);
    for i in 0..10u64 {
        // Wall clock jumps back an hour every other record.
        let ts =
            t0() - SignedDuration::from_hours((i % 2) as i64) + SignedDuration::from_secs(i as i64);
        assert_eq!(writer.try_submit(record(i, ts))?, Accepted::Queued);
    }
    writer.shutdown(Duration::from_secs(2)).await;
    let entries = memory.entries();
    let report = verify_entries(&entries, VerifyOptions::default())?;
    assert_eq!(
        (report.records, report.checkpoints),
        (10, 4),
        "after 3, 6, 9 and a final one"
    );
    let seqs: Vec<u64> = entries
        .iter()
        .filter_map(|e| e.as_record())
        .map(|r| r.seq)
        .collect();
    assert_eq!(seqs, (0..10).collect::<Vec<_>>());
    let stats = writer.stats();
    assert_eq!(
        (
            stats.submitted,
            stats.records_written,
            stats.checkpoints_written
        ),
        (10, 10, 4)
    );
    assert!(matches!(
        writer.try_submit(record(11, t0())),
        Err(SubmitError::Closed)
    ));
    Ok(())
}

#[tokio::test]
async fn checkpoints_also_come_on_a_timer() -> TestResult {
    let memory = MemorySink::new();
    let cfg = config(FailureMode::FailClosed, 1000, Duration::from_millis(100));
    let writer = AuditWriter::start(cfg, signer()?, vec![Arc::new(memory.clone())]);
    writer.try_submit(record(0, t0()))?;
    writer.try_submit(record(1, t0()))?;
    let has_checkpoint = || {
        memory
            .entries()
            .iter()
            .any(|e| matches!(e, Entry::Checkpoint(c) if c.seq == 1))
    };
    assert!(wait_for(Duration::from_secs(3), has_checkpoint).await);
    writer.shutdown(Duration::from_secs(1)).await;
    assert_eq!(
        writer.stats().checkpoints_written,
        1,
        "no extra checkpoint without new records"
    );
    Ok(())
}

/// A Splunk sink whose service is down and whose spool cannot hold a batch.
fn blocked_sink(
    spool_dir: &std::path::Path,
) -> Result<Arc<dyn Sink>, Box<dyn std::error::Error + Send + Sync>> {
    let hec = SplunkHec::new(SplunkHecConfig {
        url: format!("http://{}", unused_port()?),
        token: Secret::new("t"),
        host: "h".into(),
        index: None,
        tls_roots: None,
        timeout: Duration::from_millis(500),
    })?;
    let retry = RetryPolicy {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(50),
    };
    Ok(Arc::new(SpooledSink::start(
        Spool::open(spool_dir, 16)?,
        hec,
        retry,
    )))
}

#[tokio::test]
async fn fail_closed_refuses_when_sink_and_spool_cannot_take_records() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cfg = config(FailureMode::FailClosed, 1000, Duration::from_secs(3600));
    let writer = AuditWriter::start(cfg, signer()?, vec![blocked_sink(dir.path())?]);
    let mut refused = None;
    for i in 0..200u64 {
        match writer.try_submit(record(i, t0())) {
            Ok(Accepted::Queued) => tokio::time::sleep(Duration::from_millis(5)).await,
            Ok(Accepted::Dropped) => return Err("fail-closed must never drop".into()),
            Err(e) => {
                refused = Some((i, e));
                break;
            }
        }
    }
    let (at, error) = refused.ok_or("never refused")?;
    assert_eq!(error, SubmitError::Unavailable);
    assert!(
        at <= 4,
        "refused once the 2-slot queue and the 1 in-flight record are taken (at {at})"
    );
    let stats = writer.stats();
    assert!(
        stats.refused >= 1 && stats.sinks_blocked && stats.sink_write_errors > 0,
        "{stats:?}"
    );
    assert_eq!(stats.records_written, 0);
    writer.shutdown(Duration::from_millis(50)).await;
    Ok(())
}

#[tokio::test]
async fn fail_open_drops_and_counts() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cfg = config(FailureMode::FailOpen, 1000, Duration::from_secs(3600));
    let writer = AuditWriter::start(cfg, signer()?, vec![blocked_sink(dir.path())?]);
    let mut outcomes = Vec::new();
    for i in 0..20u64 {
        outcomes.push(writer.try_submit(record(i, t0()))?);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let dropped = outcomes.iter().filter(|o| **o == Accepted::Dropped).count() as u64;
    assert!(dropped >= 15, "{outcomes:?}");
    assert_eq!(writer.stats().dropped, dropped);
    assert_eq!(writer.stats().refused, 0);
    writer.shutdown(Duration::from_millis(50)).await;
    Ok(())
}

#[tokio::test]
async fn a_failing_sink_recovers_without_gaps() -> TestResult {
    let memory = MemorySink::new();
    memory.set_failing(true);
    let mut cfg = config(FailureMode::FailClosed, 5, Duration::from_secs(3600));
    cfg.channel_capacity = 100;
    let writer = AuditWriter::start(cfg, signer()?, vec![Arc::new(memory.clone())]);
    for i in 0..6u64 {
        writer.try_submit(record(i, t0()))?;
    }
    assert!(
        wait_for(Duration::from_secs(3), || writer.stats().sink_write_errors
            >= 3)
        .await
    );
    memory.set_failing(false);
    writer.shutdown(Duration::from_secs(2)).await;
    let report = verify_entries(&memory.entries(), VerifyOptions::default())?;
    assert_eq!(report.records, 6);
    assert!(!writer.stats().sinks_blocked);
    Ok(())
}

/// A sink whose spool holds at most `max_entries` entries at once (a byte per entry):
/// a larger batch is refused as never fitting, a smaller one is delivered.
struct SmallSpool {
    inner: MemorySink,
    max_entries: u64,
}

impl Sink for SmallSpool {
    fn name(&self) -> &str {
        "small-spool"
    }

    fn write<'a>(
        &'a self,
        entries: &'a [Entry],
    ) -> portcullis_audit::sink::SinkFuture<'a, Result<(), portcullis_audit::Error>> {
        let needed = entries.len() as u64;
        if needed > self.max_entries {
            return Box::pin(async move {
                Err(portcullis_audit::Error::SpoolFull {
                    used: 0,
                    max: self.max_entries,
                    needed,
                })
            });
        }
        self.inner.write(entries)
    }
}

#[tokio::test]
async fn a_batch_larger_than_the_whole_spool_is_delivered_in_parts() -> TestResult {
    let memory = MemorySink::new();
    let mut cfg = config(FailureMode::FailClosed, 1000, Duration::from_secs(3600));
    cfg.channel_capacity = 100;
    cfg.batch_max = 64;
    cfg.batch_linger = Duration::from_millis(300);
    let sink = SmallSpool {
        inner: memory.clone(),
        max_entries: 5,
    };
    let writer = AuditWriter::start(cfg, signer()?, vec![Arc::new(sink)]);
    for i in 0..23u64 {
        writer.try_submit(record(i, t0()))?;
    }
    assert!(
        wait_for(Duration::from_secs(5), || writer.stats().records_written
            == 23)
        .await,
        "a batch the spool can never hold must not stop the trail: {:?}",
        writer.stats()
    );
    assert!(!writer.stats().sinks_blocked);
    writer.shutdown(Duration::from_secs(2)).await;
    let report = verify_entries(&memory.entries(), VerifyOptions::default())?;
    assert_eq!(report.records, 23);
    Ok(())
}
