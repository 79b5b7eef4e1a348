//! `pod-app`: the application the local-cluster tier runs inside pods.
//!
//! - `pod-app serve --port P`: the echo app (method, path, headers and body as JSON).
//! - `pod-app hec --port P` (token in `HEC_TOKEN`): a Splunk HEC stand-in
//!   ([`portcullis_e2e::hec`]); `GET /received` lists what it accepted.
//! - `pod-app request URL [-X METHOD] [-H 'Name: value']... [--cacert F] [--cert F --key F]`:
//!   one HTTP(S) request; prints `{"status":..,"headers":{..},"body":".."}` on stdout, or
//!   `{"error":".."}` and exits 2 when no response came back (refused, reset, TLS error).
//!   `--via HOST:PORT` sends it through an HTTP proxy (absolute-form request), as an app
//!   uses its sidecar's outbound port; `--skip-hostname-check` verifies the server's
//!   chain but not its name, for workload certificates that carry only SPIFFE IDs.
//!   `--until-status 401,403` repeats the request every `--every-ms` until one of those
//!   statuses comes back (for at most `--for-seconds`); the answer then also holds
//!   `at_ms` (Unix milliseconds, taken in the pod when that answer arrived) and
//!   `before` (the statuses or errors seen first), so a test can time a change from
//!   inside the cluster.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "pod-app")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the echo app on 0.0.0.0:PORT.
    Serve {
        #[arg(long)]
        port: u16,
    },
    /// Receive Splunk HEC events on 0.0.0.0:PORT, accepting the token in `HEC_TOKEN`.
    Hec {
        #[arg(long)]
        port: u16,
        #[arg(long, env = "HEC_TOKEN", hide_env_values = true)]
        token: String,
    },
    /// Send one request and print the response as JSON.
    Request(Box<RequestArgs>),
}

#[derive(clap::Args)]
struct RequestArgs {
    url: String,
    #[arg(short = 'X', long, default_value = "GET")]
    method: String,
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    #[arg(long)]
    cacert: Option<PathBuf>,
    #[arg(long)]
    cert: Option<PathBuf>,
    #[arg(long)]
    key: Option<PathBuf>,
    #[arg(long)]
    via: Option<String>,
    #[arg(long)]
    skip_hostname_check: bool,
    #[arg(long, default_value = "5")]
    timeout_seconds: u64,
    #[arg(long, value_delimiter = ',')]
    until_status: Vec<u16>,
    #[arg(long, default_value = "50")]
    every_ms: u64,
    #[arg(long, default_value = "10")]
    for_seconds: u64,
}

/// Waits for SIGTERM or Ctrl-C: as PID 1 in a container, SIGTERM (kubelet, Job end)
/// must stop it.
async fn terminated() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        interrupted = tokio::signal::ctrl_c() => interrupted?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve { port } => {
            let shutdown = CancellationToken::new();
            let bound = portcullis_sidecar::run::echo::start(
                SocketAddr::from(([0, 0, 0, 0], port)),
                shutdown.clone(),
            )
            .await?;
            eprintln!("pod-app: echo listening on {bound}");
            terminated().await?;
            shutdown.cancel();
            Ok(())
        }
        Command::Hec { port, token } => {
            let receiver = portcullis_e2e::hec::Receiver::start(
                SocketAddr::from(([0, 0, 0, 0], port)),
                &token,
            )
            .await?;
            eprintln!(
                "pod-app: Splunk HEC stand-in listening on {}",
                receiver.addr
            );
            terminated().await
        }
        Command::Request(args) => {
            let RequestArgs {
                url,
                method,
                headers,
                cacert,
                cert,
                key,
                via,
                skip_hostname_check,
                timeout_seconds,
                until_status,
                every_ms,
                for_seconds,
            } = *args;
            let tls = Tls {
                cacert,
                cert,
                key,
                skip_hostname_check,
            };
            let once = || async {
                let outcome = tokio::time::timeout(
                    Duration::from_secs(timeout_seconds),
                    request(&url, &method, &headers, &tls, via.as_deref()),
                )
                .await;
                match outcome {
                    Ok(Ok(json)) => json,
                    Ok(Err(e)) => serde_json::json!({"error": format!("{e:#}")}),
                    Err(_) => serde_json::json!({"error": "timed out"}),
                }
            };
            let mut answer = once().await;
            if !until_status.is_empty() {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(for_seconds);
                let mut before = Vec::new();
                let wanted = |a: &serde_json::Value| {
                    a["status"]
                        .as_u64()
                        .is_some_and(|s| until_status.iter().any(|w| u64::from(*w) == s))
                };
                while !wanted(&answer) && tokio::time::Instant::now() < deadline {
                    let seen = answer
                        .get("status")
                        .or_else(|| answer.get("error"))
                        .cloned()
                        .unwrap_or_default();
                    if before.last() != Some(&seen) {
                        before.push(seen);
                    }
                    tokio::time::sleep(Duration::from_millis(every_ms)).await;
                    answer = once().await;
                }
                answer["at_ms"] = serde_json::json!(jiff::Timestamp::now().as_millisecond());
                answer["before"] = serde_json::Value::Array(before);
            }
            println!("{answer}");
            if answer.get("error").is_some() {
                std::process::exit(2)
            }
            Ok(())
        }
    }
}

struct Tls {
    cacert: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    skip_hostname_check: bool,
}

async fn request(
    url: &str,
    method: &str,
    headers: &[String],
    tls: &Tls,
    via: Option<&str>,
) -> anyhow::Result<serde_json::Value> {
    let uri: http::Uri = url.parse().context("bad URL")?;
    let host = uri.host().context("URL has no host")?.to_owned();
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = match via {
        Some(proxy) => tokio::net::TcpStream::connect(proxy)
            .await
            .context("connect to --via")?,
        None => tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .context("connect")?,
    };
    // Through a proxy the request line carries the whole URL (absolute form).
    let target = match via {
        Some(_) => url.to_owned(),
        None => uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
    };
    let mut builder = http::Request::builder()
        .method(method)
        .uri(target)
        .header(http::header::HOST, format!("{host}:{port}"));
    for header in headers {
        let (name, value) = header
            .split_once(':')
            .context("headers are 'Name: value'")?;
        builder = builder.header(name.trim(), value.trim());
    }
    let request = builder.body(Full::new(Bytes::new()))?;
    let response = if https {
        let config = client_config(tls)?;
        let name = ServerName::try_from(host.clone())?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .context("TLS handshake")?;
        send(TokioIo::new(stream), request).await?
    } else {
        send(TokioIo::new(tcp), request).await?
    };
    Ok(response)
}

async fn send<I>(io: I, request: http::Request<Full<Bytes>>) -> anyhow::Result<serde_json::Value>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .context("HTTP handshake")?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await.context("no response")?;
    let status = response.status().as_u16();
    let mut headers = BTreeMap::new();
    for (name, value) in response.headers() {
        headers.insert(
            name.to_string(),
            String::from_utf8_lossy(value.as_bytes()).into_owned(),
        );
    }
    let body = response
        .into_body()
        .collect()
        .await
        .context("reading body")?
        .to_bytes();
    Ok(
        serde_json::json!({"status": status, "headers": headers, "body": String::from_utf8_lossy(&body)}),
    )
}

fn client_config(tls: &Tls) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = &tls.cacert {
        for cert in CertificateDer::pem_file_iter(path).context("reading --cacert")? {
            roots.add(cert?)?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = if tls.skip_hostname_check {
        let inner =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()?;
        versions
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly(inner)))
    } else {
        versions.with_root_certificates(roots)
    };
    Ok(match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
            builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(key)?)?
        }
        _ => builder.with_no_client_auth(),
    })
}

/// Verifies the chain and signatures but accepts any name: workload certificates name
/// a SPIFFE ID, not the address the test dials.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
