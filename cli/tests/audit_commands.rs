//! `audit verify` and `audit export`, through the library functions and the binary.

use clap::Parser;
use jiff::{SignedDuration, Timestamp};
use portcullis_audit::format::json::write_lines;
use portcullis_audit::sink::file::{FileSink, FileSinkConfig};
use portcullis_audit::{
    AuditRecord, Chain, CheckpointSigner, DataKey, Entry, KeyRing, ManualClock, SignerIdentity,
};
use portcullis_cli::{Cli, Outcome, run};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn t0() -> Timestamp {
    Timestamp::from_second(1_773_670_921).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// 10 records (tenant acme, one per minute from t0) with checkpoints after seq 4 and 9.
fn trail(signer: &CheckpointSigner) -> Result<Vec<Entry>, portcullis_audit::Error> {
    let mut chain = Chain::new("api-0-chain");
    let mut out = Vec::new();
    for i in 0..10i64 {
        let tenant = if i == 7 { "globex" } else { "acme" };
        let mut r = AuditRecord::new(
            t0() + SignedDuration::from_mins(i),
            tenant,
            "api-0",
            "api.identify",
            "key:ak_***7f2",
        );
        r.status = 200;
        r.latency_ms = 12;
        let r = chain.append(r)?;
        let (seq, hash) = (r.seq, r.hash.clone());
        out.push(Entry::Record(r));
        if i % 5 == 4 {
            out.push(Entry::Checkpoint(signer.sign(
                "api-0-chain",
                seq,
                &hash,
                t0(),
            )?));
        }
    }
    Ok(out)
}

fn signer() -> Result<CheckpointSigner, portcullis_audit::Error> {
    CheckpointSigner::from_pkcs8(
        &CheckpointSigner::generate_pkcs8()?,
        SignerIdentity::default(),
    )
}

fn write_jsonl(path: &Path, entries: &[Entry]) -> TestResult {
    let mut bytes = Vec::new();
    write_lines(entries, &mut bytes)?;
    std::fs::write(path, bytes)?;
    Ok(())
}

fn run_args(args: &[&str]) -> Result<(Outcome, String, String), Box<dyn std::error::Error>> {
    let cli =
        Cli::try_parse_from(std::iter::once("kubectl-portcullis").chain(args.iter().copied()))?;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let outcome = run(cli, &mut out, &mut err).map_err(|e| format!("{e:#}"))?;
    Ok((outcome, String::from_utf8(out)?, String::from_utf8(err)?))
}

#[test]
fn verify_reports_ok_with_counts() -> TestResult {
    let dir = tempfile::tempdir()?;
    write_jsonl(&dir.path().join("audit.jsonl"), &trail(&signer()?)?)?;
    let path = dir.path().to_string_lossy().into_owned();
    let (outcome, out, err) = run_args(&["audit", "verify", "--insecure-any-signer", &path])?;
    assert_eq!(outcome, Outcome::Clean);
    assert!(
        out.starts_with("OK: 10 records, 2 checkpoints, 1 chain(s)"),
        "{out}"
    );
    assert!(out.contains("chain api-0-chain: seq 0..=9"), "{out}");
    assert!(err.contains("warning: --insecure-any-signer"), "{err}");
    Ok(())
}

#[test]
fn verify_names_file_line_and_seq_of_the_first_problem() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut entries = trail(&signer()?)?;
    if let Entry::Record(r) = &mut entries[3] {
        r.status = 503; // altered without rehashing
    }
    let file = dir.path().join("audit.jsonl");
    write_jsonl(&file, &entries)?;
    let (outcome, out, _) = run_args(&[
        "audit",
        "verify",
        "--insecure-any-signer",
        &file.to_string_lossy(),
    ])?;
    assert_eq!(outcome, Outcome::Findings);
    assert!(
        out.starts_with("FAILED: ") && out.contains("audit.jsonl:4") && out.contains("seq 3"),
        "{out}"
    );
    Ok(())
}

#[test]
fn verify_pins_the_signer() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (honest, other) = (signer()?, signer()?);
    write_jsonl(&dir.path().join("a.jsonl"), &trail(&honest)?)?;
    let path = dir.path().to_string_lossy().into_owned();
    use base64::Engine as _;
    let b64 =
        |s: &CheckpointSigner| base64::engine::general_purpose::STANDARD.encode(s.public_key());
    let (ok, _, _) = run_args(&["audit", "verify", "--trusted-key", &b64(&honest), &path])?;
    assert_eq!(ok, Outcome::Clean);
    let (bad, out, _) = run_args(&["audit", "verify", "--trusted-key", &b64(&other), &path])?;
    assert_eq!(bad, Outcome::Findings);
    assert!(out.contains("untrusted key"), "{out}");
    Ok(())
}

/// A root, an intermediate and a workload leaf (client auth, SPIFFE URI SAN) whose key
/// signs checkpoints the way an in-cluster proxy does.
struct TestPki {
    root_pem: String,
    signer: CheckpointSigner,
}

fn pki(name: &str) -> Result<TestPki, Box<dyn std::error::Error>> {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    };
    let ca = |cn: String, depth: u8| {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(depth));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.use_authority_key_identifier_extension = true;
        params
    };
    let root_key = KeyPair::generate()?;
    let root = ca(format!("{name} root"), 1);
    let root_cert = root.self_signed(&root_key)?;
    let root_issuer = Issuer::new(root, root_key);
    let int_key = KeyPair::generate()?;
    let int = ca(format!("{name} intermediate"), 0);
    let int_cert = int.signed_by(&int_key, &root_issuer)?;
    let int_issuer = Issuer::new(int, int_key);
    let leaf_key = KeyPair::generate()?;
    let spiffe = "spiffe://cluster.local/ns/acme-prod/sa/api";
    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = vec![SanType::URI(spiffe.try_into()?)];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.use_authority_key_identifier_extension = true;
    leaf.not_before = rcgen::date_time_ymd(2026, 1, 1);
    leaf.not_after = rcgen::date_time_ymd(2027, 1, 1);
    let leaf_cert = leaf.signed_by(&leaf_key, &int_issuer)?;
    let signer = CheckpointSigner::from_pkcs8(
        &leaf_key.serialize_der(),
        SignerIdentity {
            spiffe_id: Some(spiffe.into()),
            certificate_der: Some(leaf_cert.der().to_vec()),
            intermediates_der: vec![int_cert.der().to_vec()],
        },
    )?;
    Ok(TestPki {
        root_pem: root_cert.pem(),
        signer,
    })
}

#[test]
fn checkpoints_signed_outside_the_trust_bundle_fail_verify() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (cluster, forger) = (pki("cluster")?, pki("self-made")?);
    let bundle = dir.path().join("ca-bundle.crt");
    std::fs::write(&bundle, &cluster.root_pem)?;
    let bundle = bundle.to_string_lossy().into_owned();
    let honest = dir.path().join("honest");
    let forged = dir.path().join("forged");
    std::fs::create_dir_all(&honest)?;
    std::fs::create_dir_all(&forged)?;
    write_jsonl(&honest.join("a.jsonl"), &trail(&cluster.signer)?)?;
    write_jsonl(&forged.join("a.jsonl"), &trail(&forger.signer)?)?;

    let (ok, out, err) = run_args(&[
        "audit",
        "verify",
        "--trust-bundle",
        &bundle,
        &honest.to_string_lossy(),
    ])?;
    assert_eq!(ok, Outcome::Clean, "{out}{err}");
    assert!(!err.contains("embedded keys only"), "{err}");

    let (bad, out, err) = run_args(&[
        "audit",
        "verify",
        "--trust-bundle",
        &bundle,
        &forged.to_string_lossy(),
    ])?;
    assert_eq!(bad, Outcome::Findings);
    assert!(
        out.contains("not signed by a workload certificate of the trust bundle"),
        "{out}"
    );
    assert!(
        err.contains("--trust-bundle FILE"),
        "the fix is named: {err}"
    );

    // A bare key (no certificate) is not trusted either.
    let bare = dir.path().join("bare");
    std::fs::create_dir_all(&bare)?;
    write_jsonl(&bare.join("a.jsonl"), &trail(&signer()?)?)?;
    let (bare, out, _) = run_args(&[
        "audit",
        "verify",
        "--trust-bundle",
        &bundle,
        &bare.to_string_lossy(),
    ])?;
    assert_eq!(bare, Outcome::Findings, "{out}");
    Ok(())
}

#[test]
fn verify_without_a_trust_anchor_refuses_instead_of_accepting_any_signer() -> TestResult {
    let dir = tempfile::tempdir()?;
    write_jsonl(
        &dir.path().join("a.jsonl"),
        &trail(&pki("self-made")?.signer)?,
    )?;
    let path = dir.path().to_string_lossy().into_owned();
    let missing = dir.path().join("no-kubeconfig");
    // No cluster to read the trust bundle from, no bundle, no pinned key: refused,
    // saying how to fix it (the old code said OK for any signer).
    let refused = run_args(&[
        "audit",
        "verify",
        "--kubeconfig",
        &missing.to_string_lossy(),
        &path,
    ]);
    let message = match refused {
        Ok((outcome, out, _)) => {
            panic!("verify must not pass without a trust anchor: {outcome:?} {out}")
        }
        Err(e) => e.to_string(),
    };
    assert!(
        message.contains("portcullis-trust-bundle") && message.contains("--trust-bundle FILE"),
        "{message}"
    );
    Ok(())
}

#[test]
fn export_csv_filters_by_time_and_tenant() -> TestResult {
    let dir = tempfile::tempdir()?;
    write_jsonl(&dir.path().join("audit.jsonl"), &trail(&signer()?)?)?;
    let path = dir.path().to_string_lossy().into_owned();
    let since = (t0() + SignedDuration::from_mins(2)).to_string();
    let until = (t0() + SignedDuration::from_mins(8)).to_string();
    let (outcome, out, err) = run_args(&[
        "audit", "export", "--format", "csv", "--since", &since, "--until", &until, "--tenant",
        "acme", &path,
    ])?;
    assert_eq!(outcome, Outcome::Clean);
    let mut rdr = csv::Reader::from_reader(out.as_bytes());
    assert_eq!(rdr.headers()?.get(0), Some("timestamp"));
    let seqs: Vec<String> = rdr
        .records()
        .filter_map(|r| r.ok())
        .filter_map(|r| r.get(2).map(String::from))
        .collect();
    assert_eq!(
        seqs,
        vec!["2", "3", "4", "5", "6"],
        "seq 7 is globex, 8 is at --until"
    );
    assert!(err.contains("exported 5 records"), "{err}");
    Ok(())
}

#[test]
fn export_json_keeps_records_verbatim() -> TestResult {
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("audit.jsonl");
    write_jsonl(&src, &trail(&signer()?)?)?;
    let dest = dir.path().join("out").join("export.jsonl");
    std::fs::create_dir_all(dest.parent().ok_or("no parent")?)?;
    let (outcome, out, _) = run_args(&[
        "audit",
        "export",
        "--format",
        "json",
        "-o",
        &dest.to_string_lossy(),
        &src.to_string_lossy(),
    ])?;
    assert_eq!(outcome, Outcome::Clean);
    assert!(out.is_empty());
    let exported = std::fs::read_to_string(&dest)?;
    let original = std::fs::read_to_string(&src)?;
    let records_only: Vec<&str> = original
        .lines()
        .filter(|l| !l.contains("\"type\":\"checkpoint\""))
        .collect();
    assert_eq!(exported.lines().collect::<Vec<_>>(), records_only);
    let (verified, _, _) = run_args(&[
        "audit",
        "verify",
        "--insecure-any-signer",
        &dest.to_string_lossy(),
    ])?;
    assert_eq!(verified, Outcome::Clean);
    Ok(())
}

#[test]
fn bad_key_ring_says_what_to_do() -> TestResult {
    let dir = tempfile::tempdir()?;
    let ring = dir.path().join("ring.json");
    std::fs::write(&ring, "not json")?;
    let err = run_args(&[
        "audit",
        "verify",
        "--key-ring",
        &ring.to_string_lossy(),
        &dir.path().to_string_lossy(),
    ])
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(err.contains("must be JSON like"), "{err}");
    Ok(())
}

/// Encrypted segments written by the file sink, across a DEK rotation.
fn encrypted_dir(dir: &Path) -> Result<KeyRing, Box<dyn std::error::Error>> {
    let (v1, v2) = (DataKey::generate(1), DataKey::generate(2));
    let sink = FileSink::open(
        FileSinkConfig::new(dir),
        v1.clone(),
        Arc::new(ManualClock::new(t0())),
    )?;
    let entries = trail(&signer()?)?;
    let mut bytes = Vec::new();
    write_lines(&entries[..6], &mut bytes)?;
    sink.write_plaintext(&bytes)?;
    sink.rotate_key(v2.clone())?;
    bytes.clear();
    write_lines(&entries[6..], &mut bytes)?;
    sink.write_plaintext(&bytes)?;
    sink.close_segment()?;
    Ok(KeyRing::from_keys([v1, v2]))
}

#[test]
fn binary_verifies_encrypted_segments_and_exits_by_outcome() -> TestResult {
    let bin = env!("CARGO_BIN_EXE_kubectl-portcullis");
    let dir = tempfile::tempdir()?;
    let segs = dir.path().join("segments");
    let ring = encrypted_dir(&segs)?;
    let ring_file = dir.path().join("ring.json");
    std::fs::write(&ring_file, ring.to_json())?;

    let ok = Command::new(bin)
        .args(["audit", "verify", "--insecure-any-signer", "--key-ring"])
        .arg(&ring_file)
        .arg(&segs)
        .output()?;
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("OK: 10 records, 2 checkpoints"));

    let no_keys = Command::new(bin)
        .args(["audit", "verify", "--insecure-any-signer"])
        .arg(&segs)
        .output()?;
    assert_eq!(no_keys.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&no_keys.stderr).contains("--dek-file or --key-ring"));

    let wrong = dir.path().join("wrong.key");
    std::fs::write(&wrong, [9u8; 32])?;
    let bad = Command::new(bin)
        .args(["audit", "verify", "--insecure-any-signer", "--dek-file"])
        .arg(&wrong)
        .arg(&segs)
        .output()?;
    assert_eq!(bad.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&bad.stdout);
    assert!(
        stdout.contains("FAILED") && stdout.contains("wrong key") && stdout.contains(".pcseg:1"),
        "{stdout}"
    );

    let csv = Command::new(bin)
        .args(["audit", "export", "--format", "csv", "--key-ring"])
        .arg(&ring_file)
        .arg(&segs)
        .output()?;
    assert_eq!(csv.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&csv.stdout).lines().count(),
        11,
        "header + 10 rows"
    );
    Ok(())
}
