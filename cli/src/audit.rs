//! `audit verify` and `audit export`.

use crate::Outcome;
use crate::check::probes::TRUST_BUNDLE;
use crate::cli::{ClusterArgs, ExportArgs, ExportFormat, KeyArgs, VerifyArgs};
use anyhow::{Context, bail};
use base64::Engine as _;
use portcullis_audit::files::{ExportFilter, export_path, verify_path};
use portcullis_audit::format::csv::CsvExport;
use portcullis_audit::keyring::parse_key_material;
use portcullis_audit::{KeyRing, TrustBundle, VerifyOptions, VerifyReport};
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

/// What to do when no signer can be trusted.
const HOW_TO_TRUST: &str = "pass --trust-bundle FILE (the ca-bundle.crt of ConfigMap portcullis-trust-bundle) for offline use, --trusted-key/--trusted-cert to pin a standalone proxy's signer, or --insecure-any-signer to skip the signer check";

/// Whether `verify` must read the trust bundle from the cluster: nothing else says
/// whom to trust.
pub fn needs_cluster_bundle(args: &VerifyArgs) -> bool {
    args.trusted_keys.is_empty()
        && args.trusted_certs.is_empty()
        && args.trust_bundle.is_none()
        && !args.insecure_any_signer
}

/// The PEM of ConfigMap `portcullis-trust-bundle` in the command's namespace.
pub async fn cluster_trust_bundle(cluster: &ClusterArgs) -> anyhow::Result<Vec<u8>> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let (name, key) = TRUST_BUNDLE;
    let cluster = crate::cluster::Cluster::connect(cluster)
        .await
        .with_context(|| {
            format!("cannot reach the cluster to read ConfigMap {name}; {HOW_TO_TRUST}")
        })?;
    let api: kube::Api<ConfigMap> = kube::Api::namespaced(cluster.client, &cluster.namespace);
    let configmap = api.get(name).await.with_context(|| {
        format!(
            "cannot read ConfigMap {name} in namespace {} (use -n with a tenant namespace); {HOW_TO_TRUST}",
            cluster.namespace
        )
    })?;
    configmap
        .data
        .and_then(|mut data| data.remove(key))
        .map(String::into_bytes)
        .with_context(|| format!("ConfigMap {name} has no {key}; {HOW_TO_TRUST}"))
}

fn trust_bundle(pem: &[u8], from: &str) -> anyhow::Result<TrustBundle> {
    TrustBundle::from_pem(pem)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("{from} is not a usable trust bundle; {HOW_TO_TRUST}"))
}

/// The verification options `args` ask for; `cluster_bundle` is the cluster's trust
/// bundle PEM when it was read. Also whether signers are checked against anything.
pub fn verify_options(
    args: &VerifyArgs,
    cluster_bundle: Option<Vec<u8>>,
    err: &mut dyn Write,
) -> anyhow::Result<(VerifyOptions, bool)> {
    let bundle = match (&args.trust_bundle, cluster_bundle) {
        (Some(path), _) => {
            let pem = std::fs::read(path).with_context(|| {
                format!(
                    "cannot read trust bundle {}: check the path",
                    path.display()
                )
            })?;
            Some(trust_bundle(&pem, &path.display().to_string())?)
        }
        (None, Some(pem)) => Some(trust_bundle(
            &pem,
            "the cluster's ConfigMap portcullis-trust-bundle",
        )?),
        (None, None) => None,
    };
    if args.insecure_any_signer {
        writeln!(
            err,
            "warning: --insecure-any-signer: checkpoint signers are not checked; a rewritten trail re-signed with any key passes"
        )?;
    }
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
    let checked = !trusted_keys.is_empty() || bundle.is_some();
    Ok((
        VerifyOptions {
            trusted_keys,
            trust_bundle: bundle,
            allow_pruned_start: args.allow_pruned_start,
            anchors: Vec::new(),
        },
        checked,
    ))
}

/// `kubectl portcullis audit verify` of files. `cluster_bundle` is the cluster's trust
/// bundle PEM, read by the caller when [`needs_cluster_bundle`].
pub fn verify(
    args: &VerifyArgs,
    cluster_bundle: Option<Vec<u8>>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    let Some(path) = &args.path else {
        bail!(
            "give a record file or directory, or --tenant and --server to verify a tenant's log in the audit collector"
        );
    };
    let keys = load_keys(&args.keys)?;
    let (options, checked) = verify_options(args, cluster_bundle, err)?;
    let result = verify_path(path, keys.as_ref(), options, |n| {
        let _ = writeln!(err, "verifying: {n} records checked...");
    })
    .map_err(|e| anyhow::anyhow!("{e}"))
    .with_context(|| format!("cannot verify {}", path.display()))?;
    report(result, &path.display().to_string(), checked, out, err)
}

/// Prints a verification's outcome: what was checked, or the first problem.
pub fn report(
    result: Result<VerifyReport, portcullis_audit::Problem>,
    source: &str,
    checked: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    match result {
        Ok(report) => {
            writeln!(
                out,
                "OK: {} records, {} checkpoints, {} chain(s) in {source}",
                report.records,
                report.checkpoints,
                report.chains.len(),
            )?;
            if let Some(last) = report.last_seal {
                writeln!(
                    out,
                    "  {} collector seal(s), the last is seal {last}; {} witnessed by the operator and matched",
                    report.seals, report.anchors
                )?;
            }
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
            } else if !checked {
                writeln!(
                    err,
                    "note: checkpoint signatures verified against their embedded keys only; {HOW_TO_TRUST}"
                )?;
            }
            Ok(Outcome::Clean)
        }
        Err(problem) => {
            writeln!(out, "FAILED: {problem}")?;
            if matches!(
                problem,
                portcullis_audit::Problem::SealSignerNotTrusted { .. }
            ) {
                writeln!(
                    err,
                    "hint: a seal is signed by something other than this cluster's audit collector; the log did not come from it unchanged"
                )?;
            }
            if matches!(
                problem,
                portcullis_audit::Problem::SignerNotInTrustBundle { .. }
                    | portcullis_audit::Problem::UntrustedSigner { .. }
            ) {
                writeln!(
                    err,
                    "hint: this trail was not signed by a workload of this cluster (or the signer you pinned); if you trust its signer anyway, {HOW_TO_TRUST}"
                )?;
            }
            Ok(Outcome::Findings)
        }
    }
}

/// Refuses a `--since` that is not before `--until`.
pub fn check_range(args: &ExportArgs) -> anyhow::Result<()> {
    if let (Some(since), Some(until)) = (args.since, args.until)
        && since >= until
    {
        bail!("--since {since} is not before --until {until}: swap them or widen the range");
    }
    Ok(())
}

/// Where an export goes: `-o FILE` or `out`.
pub fn export_sink<'a>(
    args: &ExportArgs,
    out: &'a mut dyn Write,
) -> anyhow::Result<Box<dyn Write + 'a>> {
    Ok(match &args.output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| {
                format!(
                    "cannot create {}: check the directory exists and is writable",
                    path.display()
                )
            })?,
        )),
        None => Box::new(out),
    })
}

/// `kubectl portcullis audit export` of local files.
pub fn export(
    args: &ExportArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    check_range(args)?;
    let Some(path) = &args.path else {
        bail!(
            "give a record file or directory, or --tenant and --server to read from the audit collector"
        );
    };
    if args.collector.server.is_some() {
        bail!("give either a FILE|DIR or --server, not both");
    }
    let keys = load_keys(&args.keys)?;
    let filter = ExportFilter {
        tenant: args.tenant.clone(),
        since: args.since,
        until: args.until,
        action: args.action.clone(),
        principal: args.principal.clone(),
    };
    let mut sink = export_sink(args, out)?;
    let summary = match args.format {
        ExportFormat::Json => export_path(path, keys.as_ref(), &filter, |line, _| {
            writeln!(sink, "{line}").map_err(|e| portcullis_audit::Error::io("<output>", e))
        }),
        ExportFormat::Csv => {
            let mut csv = CsvExport::new(&mut *sink).map_err(|e| anyhow::anyhow!("{e}"))?;
            let summary = export_path(path, keys.as_ref(), &filter, |_, record| csv.write(record));
            csv.finish().map_err(|e| anyhow::anyhow!("{e}"))?;
            summary
        }
    }
    .map_err(|e| anyhow::anyhow!("{e}"))
    .with_context(|| format!("cannot export {}", path.display()))?;
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
