//! Encrypted rotating file sink: round trip, wrong key, damage, DEK rotation, retention.

mod common;

use common::*;
use jiff::SignedDuration;
use portcullis_audit::files::{ExportFilter, export_path, verify_path};
use portcullis_audit::format::json::write_lines;
use portcullis_audit::sink::Sink;
use portcullis_audit::sink::file::{FileSink, FileSinkConfig};
use portcullis_audit::{DataKey, Entry, KeyRing, ManualClock, Problem, VerifyOptions};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

fn config(dir: &Path) -> FileSinkConfig {
    FileSinkConfig {
        dir: dir.to_path_buf(),
        max_segment_bytes: 1 << 20,
        max_segment_age: Duration::from_secs(3600),
        retention_days: 1,
    }
}

/// Writes `entries` as batches of `batch` entries (one frame each).
fn write_batches(sink: &FileSink, entries: &[Entry], batch: usize) -> TestResult {
    for chunk in entries.chunks(batch) {
        let mut bytes = Vec::new();
        write_lines(chunk, &mut bytes)?;
        sink.write_plaintext(&bytes)?;
    }
    Ok(())
}

fn exported_seqs(dir: &Path, keys: &KeyRing) -> Result<(Vec<u64>, usize), portcullis_audit::Error> {
    let mut seqs = Vec::new();
    let summary = export_path(dir, Some(keys), &ExportFilter::default(), |_, r| {
        seqs.push(r.seq);
        Ok(())
    })?;
    Ok((seqs, summary.unreadable.len()))
}

#[test]
fn encrypted_segments_round_trip_and_verify() -> TestResult {
    let dir = tempfile::tempdir()?;
    let key = DataKey::generate(1);
    let clock = Arc::new(ManualClock::new(t0()));
    let sink = FileSink::open(config(dir.path()), key.clone(), clock)?;
    let entries = chain_entries("chain-f", 12, 4, &signer()?)?;
    write_batches(&sink, &entries, 5)?;
    sink.close_segment()?;
    let segments = sink.segments()?;
    assert_eq!(segments.len(), 1);
    let raw = std::fs::read(&segments[0].path)?;
    assert!(
        !String::from_utf8_lossy(&raw).contains("api.identify"),
        "segment must be encrypted"
    );
    let keys = KeyRing::from_keys([key]);
    let report = verify_path(dir.path(), Some(&keys), VerifyOptions::default(), |_| {})??;
    assert_eq!((report.records, report.checkpoints), (12, 3));
    assert_eq!(exported_seqs(dir.path(), &keys)?, ((0..12).collect(), 0));
    Ok(())
}

#[test]
fn wrong_dek_gives_a_clear_error() -> TestResult {
    let dir = tempfile::tempdir()?;
    let sink = FileSink::open(
        config(dir.path()),
        DataKey::generate(1),
        Arc::new(ManualClock::new(t0())),
    )?;
    write_batches(&sink, &chain_entries("c", 3, 3, &signer()?)?, 3)?;
    sink.close_segment()?;
    let wrong = KeyRing::from_keys([DataKey::generate(1)]);
    match verify_path(dir.path(), Some(&wrong), VerifyOptions::default(), |_| {})? {
        Err(Problem::Unreadable { message, .. }) => {
            assert!(
                message.contains("wrong key") && message.contains("DEK version 1"),
                "{message}"
            )
        }
        other => panic!("expected Unreadable, got {other:?}"),
    }
    let missing = verify_path(dir.path(), None, VerifyOptions::default(), |_| {});
    let msg = missing.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        msg.contains("--dek-file") && msg.contains("--key-ring"),
        "{msg}"
    );
    Ok(())
}

fn damaged_segment(
    damage: impl FnOnce(&mut Vec<u8>),
) -> Result<(tempfile::TempDir, KeyRing, u64), Box<dyn std::error::Error + Send + Sync>> {
    let dir = tempfile::tempdir()?;
    let key = DataKey::generate(1);
    let sink = FileSink::open(
        config(dir.path()),
        key.clone(),
        Arc::new(ManualClock::new(t0())),
    )?;
    let entries = chain_entries("c", 9, 100, &signer()?)?;
    write_batches(&sink, &entries, 3)?;
    sink.close_segment()?;
    let path = sink.segments()?.remove(0).path;
    let mut bytes = std::fs::read(&path)?;
    let len = bytes.len() as u64;
    damage(&mut bytes);
    std::fs::write(&path, bytes)?;
    Ok((dir, KeyRing::from_keys([key]), len))
}

#[test]
fn truncated_segment_keeps_earlier_records() -> TestResult {
    let (dir, keys, _) = damaged_segment(|b| {
        let cut = b.len() - 20;
        b.truncate(cut);
    })?;
    assert_eq!(exported_seqs(dir.path(), &keys)?, ((0..6).collect(), 1));
    match verify_path(dir.path(), Some(&keys), VerifyOptions::default(), |_| {})? {
        Err(Problem::Unreadable { message, location }) => {
            assert!(message.contains("truncated inside frame 2"), "{message}");
            assert_eq!(location.line, 7);
        }
        other => panic!("expected Unreadable, got {other:?}"),
    }
    Ok(())
}

#[test]
fn corrupted_frame_keeps_earlier_records() -> TestResult {
    let (dir, keys, _) = damaged_segment(|b| {
        let at = b.len() - 30;
        b[at] ^= 0x01;
    })?;
    assert_eq!(exported_seqs(dir.path(), &keys)?, ((0..6).collect(), 1));
    match verify_path(dir.path(), Some(&keys), VerifyOptions::default(), |_| {})? {
        Err(Problem::Unreadable { message, .. }) => {
            assert!(
                message.contains("frame 2") && message.contains("authentication"),
                "{message}"
            )
        }
        other => panic!("expected Unreadable, got {other:?}"),
    }
    Ok(())
}

#[test]
fn dek_rotation_keeps_old_segments_readable() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (v1, v2) = (DataKey::generate(1), DataKey::generate(2));
    let sink = FileSink::open(
        config(dir.path()),
        v1.clone(),
        Arc::new(ManualClock::new(t0())),
    )?;
    let entries = chain_entries("c", 10, 5, &signer()?)?;
    write_batches(&sink, &entries[..6], 6)?;
    sink.rotate_key(v2.clone())?;
    write_batches(&sink, &entries[6..], 6)?;
    sink.close_segment()?;
    assert_eq!(sink.segments()?.len(), 2);
    let both = KeyRing::from_keys([v1, v2.clone()]);
    let report = verify_path(dir.path(), Some(&both), VerifyOptions::default(), |_| {})??;
    assert_eq!(report.records, 10);
    let only_new = KeyRing::from_keys([v2]);
    match verify_path(
        dir.path(),
        Some(&only_new),
        VerifyOptions::default(),
        |_| {},
    )? {
        Err(Problem::Unreadable { message, .. }) => {
            assert!(message.contains("DEK version 1"), "{message}")
        }
        other => panic!("expected Unreadable for missing v1, got {other:?}"),
    }
    Ok(())
}

#[test]
fn segments_rotate_by_size_and_age() -> TestResult {
    let dir = tempfile::tempdir()?;
    let clock = Arc::new(ManualClock::new(t0()));
    let mut cfg = config(dir.path());
    cfg.max_segment_bytes = 100;
    let sink = FileSink::open(cfg, DataKey::generate(1), clock.clone())?;
    let entries = chain_entries("c", 4, 100, &signer()?)?;
    write_batches(&sink, &entries, 1)?; // every frame exceeds 100 bytes: one segment each
    assert_eq!(sink.segments()?.len(), 4);
    assert!(sink.segments()?.iter().all(|s| s.end_ms.is_some()));

    let dir2 = tempfile::tempdir()?;
    let sink = FileSink::open(config(dir2.path()), DataKey::generate(1), clock.clone())?;
    write_batches(&sink, &entries[..2], 1)?;
    clock.advance(SignedDuration::from_hours(2));
    write_batches(&sink, &entries[2..], 1)?;
    let segs = sink.segments()?;
    assert_eq!(segs.len(), 2);
    assert_eq!((segs[0].end_ms.is_some(), segs[1].end_ms), (true, None));
    Ok(())
}

#[test]
fn retention_deletes_only_segments_past_it() -> TestResult {
    let dir = tempfile::tempdir()?;
    let clock = Arc::new(ManualClock::new(t0()));
    let sink = FileSink::open(config(dir.path()), DataKey::generate(1), clock.clone())?;
    let entries = chain_entries("c", 3, 100, &signer()?)?;
    write_batches(&sink, &entries[..1], 1)?;
    sink.close_segment()?; // A: ends at t0
    clock.advance(SignedDuration::from_hours(12));
    write_batches(&sink, &entries[1..2], 1)?;
    sink.close_segment()?; // B: ends at t0 + 12h
    clock.advance(SignedDuration::from_hours(12) - SignedDuration::from_millis(1));
    write_batches(&sink, &entries[2..], 1)?; // C: open
    assert!(
        sink.enforce_retention()?.is_empty(),
        "1 ms before A's retention ends"
    );
    assert_eq!(sink.segments()?.len(), 3);
    clock.advance(SignedDuration::from_millis(1));
    let deleted = sink.enforce_retention()?;
    assert_eq!(deleted.len(), 1);
    let left = sink.segments()?;
    assert_eq!(left.iter().map(|s| s.index).collect::<Vec<_>>(), vec![1, 2]);
    // The open segment is never deleted, however old.
    clock.advance(SignedDuration::from_hours(24 * 30));
    sink.enforce_retention()?;
    assert_eq!(
        sink.segments()?.iter().map(|s| s.index).collect::<Vec<_>>(),
        vec![2]
    );
    // A clock stepping back deletes nothing and breaks nothing.
    clock.advance(SignedDuration::from_hours(-24 * 60));
    write_batches(&sink, &entries[..1], 1)?;
    assert!(sink.enforce_retention()?.is_empty());
    Ok(())
}

#[test]
fn segment_left_open_by_a_crash_is_closed_on_restart() -> TestResult {
    let dir = tempfile::tempdir()?;
    let key = DataKey::generate(1);
    let clock = Arc::new(ManualClock::new(t0()));
    let entries = chain_entries("c", 4, 2, &signer()?)?;
    {
        let sink = FileSink::open(config(dir.path()), key.clone(), clock.clone())?;
        write_batches(&sink, &entries[..3], 3)?;
    } // dropped without closing
    clock.advance(SignedDuration::from_mins(5));
    let sink = FileSink::open(config(dir.path()), key.clone(), clock.clone())?;
    let segs = sink.segments()?;
    assert_eq!(segs.len(), 1);
    assert_eq!(
        segs[0].end_ms,
        Some((t0() + SignedDuration::from_mins(5)).as_millisecond())
    );
    write_batches(&sink, &entries[3..], 3)?;
    assert_eq!(sink.segments()?.len(), 2);
    let keys = KeyRing::from_keys([key]);
    assert_eq!(
        verify_path(dir.path(), Some(&keys), VerifyOptions::default(), |_| {})??.records,
        4
    );
    Ok(())
}

#[tokio::test]
async fn sink_trait_writes_through_blocking_pool() -> TestResult {
    let dir = tempfile::tempdir()?;
    let key = DataKey::generate(7);
    let sink = FileSink::open(
        config(dir.path()),
        key.clone(),
        Arc::new(ManualClock::new(t0())),
    )?;
    let entries = chain_entries("c", 5, 5, &signer()?)?;
    sink.write(&entries).await?;
    sink.close(std::time::Instant::now()).await?;
    let keys = KeyRing::single_for_any_version(key);
    assert_eq!(
        verify_path(dir.path(), Some(&keys), VerifyOptions::default(), |_| {})??.checkpoints,
        1
    );
    Ok(())
}
