//! `audit verify` and `audit export`.

use crate::Outcome;
use crate::cli::{ExportArgs, ExportFormat, KeyArgs, VerifyArgs};
use anyhow::{Context, bail};
use base64::Engine as _;
use portcullis_audit::files::{ExportFilter, export_path, verify_path};
use portcullis_audit::format::csv::CsvExport;
use portcullis_audit::keyring::parse_key_material;
use portcullis_audit::{KeyRing, VerifyOptions};
use std::io::Write;
use std::path::Path;

/// Reads the key options into a key ring (None when no keys were given).
pub fn load_keys(args: &KeyArgs) -> anyhow::Result<Option<KeyRing>> {
    if let Some(path) = &args.dek_file {
        let raw = std::fs::read(path)
            .with_context(|| format!("cannot read DEK file {}: check the path", path.display()))?;
        let key = parse_key_material(0, &raw).with_context(|| {
            format!(
                "DEK file {} must hold 32 bytes (raw, base64 or hex)",
                path.display()
            )
        })?;
        return Ok(Some(KeyRing::single_for_any_version(key)));
    }
    if let Some(path) = &args.key_ring {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read key ring {}: check the path", path.display()))?;
        let ring = KeyRing::from_json(&text).with_context(|| {
            format!(
                "key ring {} must be JSON like {{\"1\": \"<base64 32-byte key>\"}}",
                path.display()
            )
        })?;
        return Ok(Some(ring));
    }
    Ok(None)
}

fn trusted_key_from_cert(path: &Path) -> anyhow::Result<Vec<u8>> {
    let raw = std::fs::read(path)
        .with_context(|| format!("cannot read certificate {}: check the path", path.display()))?;
    let der = if raw.starts_with(b"-----BEGIN") {
        let (_, pem) = x509_parser::pem::parse_x509_pem(&raw)
            .map_err(|e| anyhow::anyhow!("{} is not a PEM certificate: {e}", path.display()))?;
        pem.contents
    } else {
        raw
    };
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| anyhow::anyhow!("{} is not an X.509 certificate: {e}", path.display()))?;
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

/// `kubectl portcullis audit verify`.
pub fn verify(
    args: &VerifyArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    let keys = load_keys(&args.keys)?;
    let mut trusted_keys = Vec::new();
    for key in &args.trusted_keys {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(key.trim())
            .with_context(|| format!("--trusted-key {key:?} is not base64: pass the signer's public key as printed in a checkpoint's signer.public_key"))?;
        trusted_keys.push(bytes);
    }
    for path in &args.trusted_certs {
        trusted_keys.push(trusted_key_from_cert(path)?);
    }
    let pinned = !trusted_keys.is_empty();
    let options = VerifyOptions {
        trusted_keys,
        allow_pruned_start: args.allow_pruned_start,
    };
    let result = verify_path(&args.path, keys.as_ref(), options, |n| {
        let _ = writeln!(err, "verifying: {n} records checked...");
    })
    .map_err(|e| anyhow::anyhow!("{e}"))
    .with_context(|| format!("cannot verify {}", args.path.display()))?;
    match result {
        Ok(report) => {
            writeln!(
                out,
                "OK: {} records, {} checkpoints, {} chain(s) in {}",
                report.records,
                report.checkpoints,
                report.chains.len(),
                args.path.display()
            )?;
            for (id, chain) in &report.chains {
                let range = match (chain.first_seq, chain.last_seq) {
                    (Some(a), Some(b)) => format!("seq {a}..={b}"),
                    _ => "no records".to_string(),
                };
                writeln!(
                    out,
                    "  chain {id}: {range}, {} records, {} checkpoints",
                    chain.records, chain.checkpoints
                )?;
            }
            if report.checkpoints == 0 {
                writeln!(
                    err,
                    "warning: no checkpoints found; records after the last one are not protected against truncation"
                )?;
            } else if !pinned {
                writeln!(
                    err,
                    "note: checkpoint signatures verified against their embedded keys; pass --trusted-cert or --trusted-key to check who signed"
                )?;
            }
            Ok(Outcome::Clean)
        }
        Err(problem) => {
            writeln!(out, "FAILED: {problem}")?;
            Ok(Outcome::Findings)
        }
    }
}

/// `kubectl portcullis audit export`.
pub fn export(
    args: &ExportArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    if let (Some(since), Some(until)) = (args.since, args.until)
        && since >= until
    {
        bail!("--since {since} is not before --until {until}: swap them or widen the range");
    }
    let keys = load_keys(&args.keys)?;
    let filter = ExportFilter {
        tenant: args.tenant.clone(),
        since: args.since,
        until: args.until,
    };
    let mut file_out;
    let sink: &mut dyn Write = match &args.output {
        Some(path) => {
            file_out = std::io::BufWriter::new(std::fs::File::create(path).with_context(|| {
                format!(
                    "cannot create {}: check the directory exists and is writable",
                    path.display()
                )
            })?);
            &mut file_out
        }
        None => out,
    };
    let summary = match args.format {
        ExportFormat::Json => export_path(&args.path, keys.as_ref(), &filter, |line, _| {
            writeln!(sink, "{line}").map_err(|e| portcullis_audit::Error::io("<output>", e))
        }),
        ExportFormat::Csv => {
            let mut csv = CsvExport::new(&mut *sink).map_err(|e| anyhow::anyhow!("{e}"))?;
            let summary = export_path(&args.path, keys.as_ref(), &filter, |_, record| {
                csv.write(record)
            });
            csv.finish().map_err(|e| anyhow::anyhow!("{e}"))?;
            summary
        }
    }
    .map_err(|e| anyhow::anyhow!("{e}"))
    .with_context(|| format!("cannot export {}", args.path.display()))?;
    sink.flush()?;
    writeln!(
        err,
        "exported {} records ({} outside the filter)",
        summary.exported, summary.filtered
    )?;
    for location in &summary.malformed {
        writeln!(
            err,
            "warning: {location}: not a valid audit record, skipped"
        )?;
    }
    for (location, error) in &summary.unreadable {
        writeln!(
            err,
            "warning: {location}: {error}; records after this point in that file were not exported"
        )?;
    }
    if summary.malformed.is_empty() && summary.unreadable.is_empty() {
        Ok(Outcome::Clean)
    } else {
        Ok(Outcome::Findings)
    }
}
