//! Chain verification: an intact chain passes, and each kind of tampering is pinpointed.

mod common;

use base64::Engine as _;
use common::*;
use portcullis_audit::canonical::GENESIS_HASH;
use portcullis_audit::verify::{verify_entries, verify_jsonl};
use portcullis_audit::{Chain, Entry, Problem, VerifyOptions};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// r0..r4 (lines 1-5), cp4 (line 6), r5..r9 (lines 7-11), cp9 (line 12).
fn trail() -> Result<(Vec<String>, portcullis_audit::CheckpointSigner), portcullis_audit::Error> {
    let signer = signer()?;
    let lines = to_lines(&chain_entries("chain-a", 10, 5, &signer)?)?;
    Ok((lines, signer))
}

fn verify(lines: &[String]) -> Result<portcullis_audit::VerifyReport, Problem> {
    verify_jsonl(&lines.join("\n"), "audit.jsonl", VerifyOptions::default())
}

fn edit(line: &str, f: impl FnOnce(&mut Value)) -> Result<String, serde_json::Error> {
    let mut v: Value = serde_json::from_str(line)?;
    f(&mut v);
    serde_json::to_string(&v)
}

#[test]
fn intact_chain_verifies() -> TestResult {
    let (lines, _) = trail()?;
    let report = verify(&lines)?;
    assert_eq!((report.records, report.checkpoints), (10, 2));
    let chain = &report.chains["chain-a"];
    assert_eq!((chain.first_seq, chain.last_seq), (Some(0), Some(9)));
    Ok(())
}

#[test]
fn hash_recomputed_independently_matches() -> TestResult {
    let mut chain = Chain::new("chain-x");
    let rec = chain.append(record(0, t0()))?;
    let expected_canonical = serde_jcs::to_string(&json!({
        "timestamp": "2026-03-16T14:22:01Z",
        "chain_id": "chain-x",
        "seq": 0,
        "tenant": "acme",
        "pod": "api-7d9f",
        "action": "api.identify",
        "principal": "key:ak_***7f2",
        "client_ip": "10.0.0.7",
        "method": "POST",
        "path": "/v1/identify/0",
        "status": 200,
        "latency_ms": 12,
        "bytes": {"in": 512, "out": 90},
        "decision": "allow",
        "reason": "",
        "prev_hash": GENESIS_HASH,
    }))?;
    assert!(
        expected_canonical
            .starts_with(r#"{"action":"api.identify","bytes":{"in":512,"out":90},"chain_id""#)
    );
    assert_eq!(
        rec.hash,
        hex::encode(Sha256::digest(expected_canonical.as_bytes()))
    );
    let next = chain.append(record(1, t0()))?;
    assert_eq!(next.prev_hash, rec.hash);
    Ok(())
}

#[test]
fn altered_field_is_pinpointed() -> TestResult {
    let (mut lines, _) = trail()?;
    lines[3] = edit(&lines[3], |v| v["status"] = json!(500))?;
    match verify(&lines) {
        Err(Problem::AlteredRecord {
            seq: 3, location, ..
        }) => {
            assert_eq!(location.to_string(), "audit.jsonl:4")
        }
        other => panic!("expected AlteredRecord at seq 3, got {other:?}"),
    }
    Ok(())
}

#[test]
fn rehashed_alteration_breaks_the_next_link() -> TestResult {
    let (mut lines, _) = trail()?;
    lines[2] = edit(&lines[2], |v| {
        v["principal"] = json!("user:mallory");
        v["hash"] = Value::Null;
    })?;
    let v: Value = serde_json::from_str(&lines[2])?;
    let rehashed = portcullis_audit::canonical::record_hash_of_value(v.clone())?;
    lines[2] = edit(&lines[2], |v| v["hash"] = json!(rehashed))?;
    match verify(&lines) {
        Err(Problem::BrokenLink {
            seq: 3, location, ..
        }) => assert_eq!(location.line, 4),
        other => panic!("expected BrokenLink at seq 3, got {other:?}"),
    }
    Ok(())
}

#[test]
fn deleted_record_is_pinpointed() -> TestResult {
    let (mut lines, _) = trail()?;
    lines.remove(7); // r6
    match verify(&lines) {
        Err(Problem::MissingRecords {
            expected_seq: 6,
            found_seq: 7,
            location,
            ..
        }) => {
            assert_eq!(location.line, 8)
        }
        other => panic!("expected MissingRecords at seq 6, got {other:?}"),
    }
    Ok(())
}

#[test]
fn deleted_first_record_is_reported_unless_pruning_allowed() -> TestResult {
    let (mut lines, _) = trail()?;
    lines.remove(0);
    assert!(matches!(
        verify(&lines),
        Err(Problem::MissingRecords {
            expected_seq: 0,
            found_seq: 1,
            ..
        })
    ));
    let options = VerifyOptions {
        allow_pruned_start: true,
        ..VerifyOptions::default()
    };
    assert!(verify_jsonl(&lines.join("\n"), "a", options).is_ok());
    Ok(())
}

#[test]
fn swapped_records_are_pinpointed() -> TestResult {
    let (mut lines, _) = trail()?;
    lines.swap(7, 8); // r6 <-> r7
    match verify(&lines) {
        Err(Problem::Reordered {
            seq: 7,
            expected_seq: 6,
            location,
            ..
        }) => {
            assert_eq!(location.line, 8)
        }
        other => panic!("expected Reordered at seq 7, got {other:?}"),
    }
    Ok(())
}

#[test]
fn truncation_after_checkpoint_is_detected() -> TestResult {
    let (lines, _) = trail()?;
    // The chain is cut after r7; the sink's copy of checkpoint 9 survives.
    let mut kept: Vec<String> = lines[..9].to_vec();
    kept.push(lines[11].clone());
    match verify(&kept) {
        Err(Problem::Truncated {
            checkpoint_seq: 9,
            last_seq: Some(7),
            location,
            ..
        }) => {
            assert_eq!(location.line, 10)
        }
        other => panic!("expected Truncated at checkpoint 9, got {other:?}"),
    }
    Ok(())
}

#[test]
fn forged_checkpoint_signature_is_pinpointed() -> TestResult {
    let (mut lines, _) = trail()?;
    lines[5] = edit(&lines[5], |v| v["hash"] = json!("ab".repeat(32)))?;
    match verify(&lines) {
        Err(Problem::BadCheckpointSignature {
            seq: 4, location, ..
        }) => {
            assert_eq!(location.line, 6)
        }
        other => panic!("expected BadCheckpointSignature at seq 4, got {other:?}"),
    }
    // A signature made by another key over the same content does not verify either.
    let (lines2, _) = trail()?;
    let (mut lines, _) = trail()?;
    lines[5] = edit(&lines[5], |v| {
        let other: Value = serde_json::from_str(&lines2[5]).unwrap_or_default();
        v["signature"] = other["signature"].clone();
    })?;
    assert!(matches!(
        verify(&lines),
        Err(Problem::BadCheckpointSignature { seq: 4, .. })
    ));
    Ok(())
}

#[test]
fn resigned_rewrite_needs_a_pinned_key_to_be_caught() -> TestResult {
    // An attacker rewrites the whole trail and signs with their own key.
    let honest = signer()?;
    let attacker = signer()?;
    let forged = chain_entries("chain-a", 10, 5, &attacker)?;
    assert!(verify_entries(&forged, VerifyOptions::default()).is_ok());
    let pinned = VerifyOptions {
        trusted_keys: vec![honest.public_key().to_vec()],
        ..VerifyOptions::default()
    };
    assert!(matches!(
        verify_entries(&forged, pinned.clone()),
        Err(Problem::UntrustedSigner { seq: 4, .. })
    ));
    let genuine = chain_entries("chain-a", 10, 5, &honest)?;
    assert!(verify_entries(&genuine, pinned).is_ok());
    Ok(())
}

#[test]
fn checkpoint_catches_a_consistently_rehashed_rewrite() -> TestResult {
    let signer = signer()?;
    let entries = chain_entries("chain-a", 10, 5, &signer)?;
    // Rebuild the chain with record 2 changed, keeping the original signed checkpoints.
    let mut chain = Chain::new("chain-a");
    let mut rewritten = Vec::new();
    for entry in &entries {
        match entry {
            Entry::Record(r) => {
                let mut r = r.clone();
                if r.seq == 2 {
                    r.status = 403;
                }
                rewritten.push(Entry::Record(chain.append(r)?));
            }
            Entry::Checkpoint(c) => rewritten.push(Entry::Checkpoint(c.clone())),
        }
    }
    match verify_entries(&rewritten, VerifyOptions::default()) {
        Err(Problem::CheckpointMismatch {
            seq: 4, location, ..
        }) => assert_eq!(location.line, 5),
        other => panic!("expected CheckpointMismatch at seq 4, got {other:?}"),
    }
    Ok(())
}

#[test]
fn clock_going_backwards_does_not_break_the_chain() -> TestResult {
    let signer = signer()?;
    let mut chain = Chain::new("chain-b");
    let mut entries = Vec::new();
    for (i, offset) in [0i64, 10, -3600, -86_400, 5].into_iter().enumerate() {
        let ts = t0() + jiff::SignedDuration::from_secs(offset);
        entries.push(Entry::Record(chain.append(record(i as u64, ts))?));
    }
    let (seq, hash) = chain.head().ok_or("empty chain")?;
    entries.push(Entry::Checkpoint(signer.sign(
        "chain-b",
        seq,
        hash,
        t0(),
    )?));
    let report = verify_entries(&entries, VerifyOptions::default())?;
    assert_eq!(report.chains["chain-b"].last_seq, Some(4));
    Ok(())
}

#[test]
fn interleaved_chains_are_checked_separately() -> TestResult {
    let signer = signer()?;
    let a = chain_entries("pod-a", 6, 3, &signer)?;
    let b = chain_entries("pod-b", 6, 3, &signer)?;
    let mixed: Vec<Entry> = a
        .iter()
        .zip(b.iter())
        .flat_map(|(x, y)| [x.clone(), y.clone()])
        .collect();
    let report = verify_entries(&mixed, VerifyOptions::default())?;
    assert_eq!(report.chains.len(), 2);
    assert_eq!(report.records, 12);
    Ok(())
}

#[test]
fn malformed_line_is_reported_with_its_line() -> TestResult {
    let (mut lines, _) = trail()?;
    lines[4] = "{not json".into();
    match verify(&lines) {
        Err(Problem::Malformed { location, .. }) => assert_eq!(location.line, 5),
        other => panic!("expected Malformed, got {other:?}"),
    }
    Ok(())
}

#[test]
fn checkpoint_public_key_is_standard_base64_sec1() -> TestResult {
    let signer = signer()?;
    let cp = signer.sign("c", 0, GENESIS_HASH, t0())?;
    let key = base64::engine::general_purpose::STANDARD.decode(&cp.signer.public_key)?;
    assert_eq!(key.len(), 65);
    assert_eq!(key, signer.public_key());
    Ok(())
}
