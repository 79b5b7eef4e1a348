//! `audit export --tenant T --server URL`: a tenant's log read from the audit collector
//! (the contract is [`portcullis_api::audit_export`]).
//!
//! The collector's certificate is checked against the cluster's trust bundle under the
//! collector's Service name, whatever address reaches it (a port-forward, an Ingress),
//! and the request carries a bearer token the API server will vouch for: the
//! kubeconfig user's, or `--token-file`. The answer is written as it arrives; an export
//! the collector cuts off part-way is an error, never a short file that looks whole.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use portcullis_api::audit_export::{
    ACTION, CHAIN_FORMAT, FORMAT, PRINCIPAL, SINCE, UNTIL, records_path,
};
use rustls::pki_types::ServerName;
use secrecy::ExposeSecret;

use crate::Outcome;
use crate::audit::{check_range, export_sink};
use crate::cli::{ClusterArgs, CollectorArgs, ExportArgs, ExportFormat, VerifyArgs};
use crate::cluster::Cluster;

/// How long connecting and the first answer may take; the stream itself has no limit.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The collector's Service (chart default).
const SERVICE: &str = "portcullis-audit";

/// The path and query asked for.
fn path_and_query(tenant: &str, args: &ExportArgs) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    if let Some(since) = args.since {
        query.append_pair(SINCE, &since.to_string());
    }
    if let Some(until) = args.until {
        query.append_pair(UNTIL, &until.to_string());
    }
    if let Some(action) = &args.action {
        query.append_pair(ACTION, action);
    }
    if let Some(principal) = &args.principal {
        query.append_pair(PRINCIPAL, principal);
    }
    query.append_pair(
        FORMAT,
        match args.format {
            ExportFormat::Json => "json",
            ExportFormat::Csv => "csv",
        },
    );
    format!("{}?{}", records_path(tenant), query.finish())
}

/// The bearer token: `--token-file`, else the kubeconfig user's.
async fn token(cluster: &ClusterArgs, args: &CollectorArgs) -> anyhow::Result<String> {
    const HOW: &str = "pass --token-file FILE with a token the API server accepts (kubectl create token <serviceaccount> > FILE)";
    let from_file = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --token-file {}", path.display()))
            .map(|t| t.trim().to_owned())
    };
    let token = match &args.token_file {
        Some(path) => from_file(path)?,
        None => {
            let config = Cluster::config(cluster).await?;
            match (&config.auth_info.token, &config.auth_info.token_file) {
                (Some(token), _) => token.expose_secret().trim().to_owned(),
                (None, Some(path)) => from_file(std::path::Path::new(path))?,
                (None, None) => bail!(
                    "your kubeconfig user signs in without a bearer token (a client certificate or an exec plugin), and the collector needs one; {HOW}"
                ),
            }
        }
    };
    if token.is_empty() {
        bail!("the token is empty; {HOW}");
    }
    Ok(token)
}

/// The roots the collector's certificate must chain to.
async fn roots(
    cluster: &ClusterArgs,
    args: &CollectorArgs,
) -> anyhow::Result<rustls::RootCertStore> {
    let (pem, from) = match &args.ca_file {
        Some(path) => (
            std::fs::read(path)
                .with_context(|| format!("cannot read --ca-file {}", path.display()))?,
            path.display().to_string(),
        ),
        None => (
            crate::audit::cluster_trust_bundle(cluster).await?,
            "ConfigMap portcullis-trust-bundle".to_owned(),
        ),
    };
    let text = String::from_utf8(pem).with_context(|| format!("{from} is not PEM text"))?;
    let certs =
        portcullis_tls::parse_pem_certs(&text, &from).map_err(|e| anyhow::anyhow!("{e}"))?;
    portcullis_tls::root_store(&certs)
        .map_err(|e| anyhow::anyhow!("{from} holds no usable root: {e}"))
}

/// What the collector said when it refused, with what to do about it.
fn refusal(status: http::StatusCode, body: &[u8]) -> anyhow::Error {
    let said = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(300).collect());
    let hint = match status.as_u16() {
        401 => "; pass --token-file with a token the API server accepts",
        403 => {
            "; a tenant role with the audit:read permission (analyst, admin, owner) grants the export"
        }
        503 => "; the collector could not ask the API server, try again",
        _ => "",
    };
    anyhow::anyhow!("the collector answered {status}: {said}{hint}")
}

/// GETs `path_and_query` from the collector; the answer when it is 200, else what the
/// collector said and what to do.
async fn get(
    cluster: &ClusterArgs,
    args: &CollectorArgs,
    path_and_query: &str,
) -> anyhow::Result<hyper::body::Incoming> {
    let Some(server) = args.server.as_deref() else {
        bail!(
            "give --server URL: for example run kubectl -n {ns} port-forward svc/{SERVICE} 8091 and pass --server https://127.0.0.1:8091",
            ns = cluster.operator_namespace
        );
    };
    let uri: http::Uri = server.parse().with_context(|| {
        format!("--server {server:?} is not a URL; write it like https://127.0.0.1:8091")
    })?;
    let (Some("https"), Some(host)) = (uri.scheme_str(), uri.host()) else {
        bail!(
            "--server {server:?}: the collector speaks HTTPS only; write it like https://127.0.0.1:8091"
        );
    };
    let port = uri.port_u16().unwrap_or(443);
    let name = args
        .server_name
        .clone()
        .unwrap_or_else(|| format!("{SERVICE}.{}.svc", cluster.operator_namespace));
    let server_name = ServerName::try_from(name.clone())
        .with_context(|| format!("--server-name {name:?} is not a DNS name"))?;

    let token = token(cluster, args).await?;
    let roots = roots(cluster, args).await?;
    let mut tls = rustls::ClientConfig::builder_with_provider(portcullis_tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];

    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let connect = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .with_context(|| format!("cannot connect to {server}; is the port-forward running?"))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(server_name, tcp)
            .await
            .with_context(|| {
                format!("TLS with {server} failed: the collector must present a certificate for {name} from the cluster's trust bundle")
            })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = http::Request::get(path_and_query)
            .header(http::header::HOST, name.as_str())
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Empty::<Bytes>::new())?;
        anyhow::Ok(sender.send_request(request).await?)
    };
    let response = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "{server} did not answer within {}s",
                CONNECT_TIMEOUT.as_secs()
            )
        })??;
    let status = response.status();
    let body = response.into_body();
    if status != http::StatusCode::OK {
        let text = tokio::time::timeout(CONNECT_TIMEOUT, body.collect())
            .await
            .ok()
            .and_then(Result::ok)
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(refusal(status, &text));
    }
    Ok(body)
}

/// Writes the answer to `sink` as it arrives; returns how many lines it held. An answer
/// cut off by the collector is an error.
async fn drain(mut body: hyper::body::Incoming, sink: &mut dyn Write) -> anyhow::Result<u64> {
    let mut lines: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            anyhow::anyhow!("the collector cut the answer off part-way ({e}); what arrived is incomplete, run the command again")
        })?;
        if let Ok(data) = frame.into_data() {
            lines += data.iter().filter(|b| **b == b'\n').count() as u64;
            sink.write_all(&data)?;
        }
    }
    sink.flush()?;
    Ok(lines)
}

/// `kubectl portcullis audit export --tenant T --server URL`.
pub async fn export(
    cluster: &ClusterArgs,
    args: &ExportArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    check_range(args)?;
    let Some(tenant) = args.tenant.as_deref() else {
        bail!(
            "give --tenant NAME: the collector keeps one log per tenant (or give a FILE|DIR to export local records)"
        );
    };
    if args.keys.dek_file.is_some() || args.keys.key_ring.is_some() {
        bail!("--dek-file and --key-ring decrypt local segments; the collector decrypts its own");
    }
    let body = get(cluster, &args.collector, &path_and_query(tenant, args)).await?;
    let mut sink = export_sink(args, out)?;
    let lines = drain(body, &mut sink).await?;
    let records = match args.format {
        ExportFormat::Json => lines,
        ExportFormat::Csv => lines.saturating_sub(1),
    };
    writeln!(
        err,
        "exported {records} records of tenant {tenant} from the collector"
    )?;
    Ok(Outcome::Clean)
}

/// Calls `line` with each line of the answer (1-based numbers) as it arrives; an answer
/// cut off by the collector is an error.
async fn for_each_line(
    mut body: hyper::body::Incoming,
    mut line: impl FnMut(u64, &str),
) -> anyhow::Result<()> {
    let mut pending: Vec<u8> = Vec::new();
    let mut number = 0;
    let mut emit = |bytes: &[u8], number: &mut u64| {
        *number += 1;
        line(*number, &String::from_utf8_lossy(bytes));
    };
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            anyhow::anyhow!(
                "the collector cut the answer off part-way ({e}); run the command again"
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        let mut start = 0;
        while let Some(end) = pending[start..].iter().position(|b| *b == b'\n') {
            emit(&pending[start..start + end], &mut number);
            start += end + 1;
        }
        pending.drain(..start);
    }
    if !pending.is_empty() {
        emit(&pending, &mut number);
    }
    Ok(())
}

/// The seals of `tenant`'s log the operator witnessed (`status.auditAnchors`); none,
/// with a warning saying what is then not checked, when the Tenant cannot be read.
async fn anchors(
    cluster: &ClusterArgs,
    tenant: &str,
    err: &mut dyn Write,
) -> anyhow::Result<Vec<portcullis_audit::Anchor>> {
    let api: kube::Api<portcullis_crds::Tenant> =
        kube::Api::all(Cluster::connect(cluster).await?.client);
    let anchors = match api.get_opt(tenant).await {
        Ok(Some(found)) => found.status.map(|s| s.audit_anchors).unwrap_or_default(),
        Ok(None) => {
            writeln!(
                err,
                "warning: there is no Tenant {tenant:?}, so no seals witnessed by the operator to check the log against"
            )?;
            return Ok(Vec::new());
        }
        Err(e) => {
            writeln!(
                err,
                "warning: cannot read Tenant {tenant:?} ({e}): the log's seals are checked, but not against the ones the operator witnessed; that needs get on tenants.portcullis.dev"
            )?;
            return Ok(Vec::new());
        }
    };
    if anchors.is_empty() {
        writeln!(
            err,
            "note: the operator has witnessed no seal of this log yet (status.auditAnchors is empty)"
        )?;
    }
    Ok(anchors
        .into_iter()
        .map(|anchor| portcullis_audit::Anchor {
            number: anchor.number,
            digest: anchor.digest,
        })
        .collect())
}

/// `kubectl portcullis audit verify --tenant T --server URL`: the tenant's whole log,
/// every pod chain with its checkpoints and the collector's seals, checked like a file. `cluster_bundle` is the
/// cluster's trust bundle PEM when the signers are checked against it.
///
/// Like files, the log is read twice (checkpoints, then records), so the CLI holds one
/// line and each chain's head, never the whole log.
pub async fn verify(
    cluster: &ClusterArgs,
    args: &VerifyArgs,
    tenant: &str,
    cluster_bundle: Option<Vec<u8>>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    use portcullis_audit::{Entry, Location, Problem, Seal, Verifier};
    let path = format!("{}?{FORMAT}={CHAIN_FORMAT}", records_path(tenant));
    let (mut options, checked) = crate::audit::verify_options(args, cluster_bundle, err)?;
    // Retention removes a log's oldest days, so a chain may start after seq 0.
    options.allow_pruned_start = true;
    options.anchors = anchors(cluster, tenant, err).await?;
    let source = format!("tenant {tenant} in the collector");
    let label: std::sync::Arc<str> = std::sync::Arc::from(source.as_str());
    let mut verifier = Verifier::new(options);
    let parse = |line: &str| serde_json::from_str::<serde_json::Value>(line);

    let checkpoints = get(cluster, &args.collector, &path).await?;
    for_each_line(checkpoints, |number, line| {
        let Ok(value) = parse(line) else {
            return;
        };
        let location = Location::new(label.clone(), 0, number);
        if Entry::is_checkpoint_value(&value) {
            verifier.add_checkpoint(value, location);
        } else if Seal::is_seal_value(&value) {
            verifier.add_seal(value, location);
        }
    })
    .await?;
    let records = get(cluster, &args.collector, &path).await?;
    for_each_line(records, |number, line| {
        if line.trim().is_empty() {
            return;
        }
        let location = Location::new(label.clone(), 0, number);
        match parse(line) {
            Ok(value) if Entry::is_checkpoint_value(&value) || Seal::is_seal_value(&value) => {}
            Ok(value) => verifier.push_record(value, location),
            Err(e) => verifier.report(Problem::Malformed {
                location,
                message: e.to_string(),
            }),
        }
    })
    .await?;
    crate::audit::report(verifier.finish(), &source, checked, out, err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn the_query_carries_every_filter_encoded() {
        let cli = crate::cli::Cli::try_parse_from([
            "kubectl-portcullis",
            "audit",
            "export",
            "--tenant",
            "acme",
            "--since",
            "2026-03-16T00:00:00Z",
            "--principal",
            "key:ak_***7f2",
            "--action",
            "admin.*",
            "--format",
            "csv",
            "--server",
            "https://127.0.0.1:8091",
        ]);
        let Ok(crate::cli::Cli {
            command: crate::cli::Command::Audit(crate::cli::AuditCommand::Export(args)),
            ..
        }) = cli
        else {
            panic!("{cli:?}");
        };
        assert_eq!(
            path_and_query("acme", &args),
            "/v1/tenants/acme/records?since=2026-03-16T00%3A00%3A00Z&action=admin.*&principal=key%3Aak_***7f2&format=csv"
        );
    }
}
