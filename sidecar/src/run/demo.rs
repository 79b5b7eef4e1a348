//! `portcullis-proxy demo`: a throwaway CA, server and client certificates, an echo
//! app, a policy with one key per scope, and the proxy in front, with nothing to set
//! up. The lines it prints are a contract (DESIGN.md §5).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use portcullis_crds::{
    ApiToken, DataClassification, InboundMode, KeyPolicy, PolicyBundle, RateLimitPolicy,
    scope::{HttpMethod, RouteRule, ScopeMap},
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use tokio_util::sync::CancellationToken;

use super::{
    echo,
    proxy::{self, RunningProxy, StartError},
};
use crate::{
    audit::{
        AuditHook,
        sinks::{process_signer, writer_config},
        trail::{AuditTrail, failure_mode},
    },
    config::{
        AdminConfig, InboundConfig, KeySettings, Limits, PolicySource, ProxyConfig, TlsFiles,
        UpstreamConfig,
    },
};

/// The client's SPIFFE ID.
pub const CLIENT_SPIFFE_ID: &str = "spiffe://demo.local/ns/demo/sa/client";
/// The demo tenant.
pub const TENANT: &str = "demo";
/// The demo tenant's URI SAN: both demo certificates belong to it.
pub const TENANT_SPIFFE_ID: &str = "spiffe://demo.local/tenant/demo";
/// Demo scopes in the order their keys are printed.
pub const SCOPES: [&str; 3] = ["identify", "events", "signals"];

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Certificate generation failed.
    #[error("generating demo certificates: {0}")]
    Certificates(#[from] rcgen::Error),
    /// A file could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Hashing a demo key failed.
    #[error("hashing a demo key: {0}")]
    Hash(String),
    /// The echo app could not start.
    #[error("starting the echo app: {0}")]
    Echo(std::io::Error),
    /// The proxy could not start.
    #[error(transparent)]
    Proxy(#[from] StartError),
    /// The audit file could not be set up.
    #[error("setting up the demo audit file: {0}")]
    Audit(String),
}

/// The demo's audit trail: hash-chained JSON lines with signed checkpoints, appended to
/// `<dir>/audit.jsonl` (stdout stays reserved for the contract lines). Verify it with
/// `kubectl portcullis audit verify <dir>/audit.jsonl`. Must run inside a tokio runtime;
/// shut the trail down after the proxy to write the final checkpoint.
pub fn file_audit(dir: &Path) -> Result<Arc<AuditTrail>, DemoError> {
    std::fs::create_dir_all(dir).map_err(|source| DemoError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let path = dir.join("audit.jsonl");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|source| DemoError::Write {
            path: path.clone(),
            source,
        })?;
    let trail = AuditTrail::new(TENANT);
    let signer = process_signer(portcullis_audit::SignerIdentity::default())
        .map_err(|e| DemoError::Audit(e.to_string()))?;
    let sink = trail.watch(Arc::new(
        portcullis_audit::sink::stdout::StdoutSink::to_writer(Box::new(file)),
    ));
    let writer = portcullis_audit::AuditWriter::start(
        writer_config(
            TENANT,
            portcullis_audit::CheckpointPolicy::default(),
            failure_mode(DataClassification::Internal),
        ),
        signer,
        vec![sink],
    );
    trail.start(writer);
    Ok(trail)
}

/// How to run the demo.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Where to write PEM files (a temp dir kept until exit when `None`).
    pub dir: Option<PathBuf>,
    /// Inbound port on 127.0.0.1 (0: ephemeral).
    pub inbound_port: u16,
    /// Admin port on 127.0.0.1 (0: ephemeral).
    pub admin_port: u16,
    /// bcrypt cost for the demo keys (4 starts fast).
    pub bcrypt_cost: u32,
    /// Rate limit of every demo key.
    pub rate_limit: RateLimitPolicy,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            dir: None,
            inbound_port: portcullis_api::injection::PROXY_INBOUND_PORT,
            admin_port: portcullis_api::injection::PROXY_ADMIN_PORT,
            bcrypt_cost: 4,
            rate_limit: RateLimitPolicy::default(),
        }
    }
}

/// A running demo.
#[derive(Debug)]
pub struct Demo {
    /// The CA certificate (trust it to reach the proxy).
    pub ca: PathBuf,
    /// The client certificate (SPIFFE ID [`CLIENT_SPIFFE_ID`]).
    pub client_cert: PathBuf,
    /// The client key.
    pub client_key: PathBuf,
    /// `(scope, token)` per demo key, in [`SCOPES`] order.
    pub keys: Vec<(String, String)>,
    /// The echo app's address.
    pub echo_addr: SocketAddr,
    /// The proxy.
    pub proxy: RunningProxy,
    _tempdir: Option<tempfile::TempDir>,
}

impl Demo {
    /// The contract lines: `ca:`, `client-cert:`, `client-key:`, `key <scope>:` each.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = vec![
            format!("ca: {}", self.ca.display()),
            format!("client-cert: {}", self.client_cert.display()),
            format!("client-key: {}", self.client_key.display()),
        ];
        lines.extend(
            self.keys
                .iter()
                .map(|(scope, token)| format!("key {scope}: {token}")),
        );
        lines
    }
}

fn write(path: &Path, contents: &str) -> Result<(), DemoError> {
    std::fs::write(path, contents).map_err(|source| DemoError::Write {
        path: path.to_owned(),
        source,
    })
}

fn validity(params: &mut CertificateParams) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + now.saturating_sub(Duration::from_secs(3600));
    params.not_after = epoch + now + Duration::from_secs(30 * 24 * 3600);
}

/// A throwaway PKI as PEM: an ECDSA P-256 CA, a server certificate for localhost and
/// 127.0.0.1, and a client certificate with a SPIFFE ID. Used by the demo and the
/// benchmarks.
pub struct DemoPki {
    /// CA certificate.
    pub ca: String,
    /// Server certificate (localhost, 127.0.0.1, spiffe://demo.local/ns/demo/sa/server).
    pub server_cert: String,
    /// Server key, PKCS#8.
    pub server_key: String,
    /// Client certificate (`spiffe://demo.local/ns/demo/sa/client`).
    pub client_cert: String,
    /// Client key, PKCS#8.
    pub client_key: String,
}

/// Makes a fresh [`DemoPki`], valid from an hour ago for a week.
pub fn certificates() -> Result<DemoPki, rcgen::Error> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name
        .push(DnType::CommonName, "Portcullis demo CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::default();
    server.distinguished_name = DistinguishedName::new();
    server
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    server.subject_alt_names = vec![
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::URI("spiffe://demo.local/ns/demo/sa/server".try_into()?),
        SanType::URI(TENANT_SPIFFE_ID.try_into()?),
    ];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut server);
    let server_cert = server.signed_by(&server_key, &issuer)?;

    let client_key = KeyPair::generate()?;
    let mut client = CertificateParams::default();
    client.distinguished_name = DistinguishedName::new();
    client
        .distinguished_name
        .push(DnType::CommonName, "demo client");
    client.subject_alt_names = vec![
        SanType::URI(CLIENT_SPIFFE_ID.try_into()?),
        SanType::URI(TENANT_SPIFFE_ID.try_into()?),
    ];
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    client.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut client);
    let client_cert = client.signed_by(&client_key, &issuer)?;

    Ok(DemoPki {
        ca: ca_cert.pem(),
        server_cert: server_cert.pem(),
        server_key: server_key.serialize_pem(),
        client_cert: client_cert.pem(),
        client_key: client_key.serialize_pem(),
    })
}

/// The demo route catalogue.
pub fn demo_scopes() -> ScopeMap {
    use HttpMethod::{GET, POST};
    ScopeMap::from([
        (
            "identify".to_owned(),
            vec![RouteRule::new(&[POST], "/v1/identify")],
        ),
        (
            "events".to_owned(),
            vec![RouteRule::new(&[GET, POST], "/v1/events/*")],
        ),
        (
            "signals".to_owned(),
            vec![RouteRule::new(&[GET], "/v1/signals*")],
        ),
    ])
}

/// Starts the demo with `audit` as the audit hook.
pub async fn start(options: DemoOptions, audit: Arc<dyn AuditHook>) -> Result<Demo, DemoError> {
    let (dir, tempdir) = match &options.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|source| DemoError::Write {
                path: dir.clone(),
                source,
            })?;
            (dir.clone(), None)
        }
        None => {
            let temp = tempfile::Builder::new()
                .prefix("portcullis-demo-")
                .tempdir()
                .map_err(|source| DemoError::Write {
                    path: std::env::temp_dir(),
                    source,
                })?;
            (temp.path().to_owned(), Some(temp))
        }
    };
    let pems = certificates()?;
    let path = |name: &str| dir.join(name);
    write(&path("ca.pem"), &pems.ca)?;
    write(&path("server.pem"), &pems.server_cert)?;
    write(&path("server-key.pem"), &pems.server_key)?;
    write(&path("client.pem"), &pems.client_cert)?;
    write(&path("client-key.pem"), &pems.client_key)?;

    let mut keys = Vec::new();
    let mut policies = BTreeMap::new();
    for scope in SCOPES {
        let token = ApiToken::generate();
        let hash = token
            .hash(options.bcrypt_cost)
            .map_err(|e| DemoError::Hash(e.to_string()))?;
        policies.insert(
            token.key_id().clone(),
            KeyPolicy {
                name: format!("{TENANT}/{scope}"),
                hash,
                scopes: BTreeSet::from([scope.to_owned()]),
                rate_limit: options.rate_limit,
                ip_allowlist: vec![],
                expires_at: None,
                revoked: false,
            },
        );
        keys.push((scope.to_owned(), token.expose_secret().to_owned()));
    }
    let bundle = PolicyBundle {
        version: 1,
        tenant: TENANT.to_owned(),
        classification: DataClassification::Internal,
        scopes: demo_scopes(),
        tenant_ip_allowlist: vec![],
        keys: policies,
        ..PolicyBundle::default()
    };
    let policy_path = path("policy.json");
    let policy_json =
        serde_json::to_string_pretty(&bundle).map_err(|e| DemoError::Hash(e.to_string()))?;
    write(&policy_path, &policy_json)?;

    let shutdown = CancellationToken::new();
    let echo_addr = echo::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), shutdown.clone())
        .await
        .map_err(DemoError::Echo)?;
    let config = ProxyConfig {
        inbound: InboundConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, options.inbound_port)),
            mode: InboundMode::MtlsOrApikey,
            // The demo shows mTLS reaching any route of the echo app.
            peers_need_mapped_route: false,
            trust_domain: None,
            allowed_peers: vec![],
        },
        admin: AdminConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, options.admin_port)),
        },
        upstream: UpstreamConfig {
            app_port: echo_addr.port(),
            connect_timeout: Duration::from_secs(1),
            pool_idle_timeout: Duration::from_secs(90),
        },
        tls: TlsFiles {
            certificate: path("server.pem"),
            private_key: path("server-key.pem"),
            trust_bundle: path("ca.pem"),
            reload_interval: Duration::from_secs(1),
        },
        policy: PolicySource::File {
            path: policy_path,
            poll_interval: Duration::from_secs(1),
        },
        scopes_map: None,
        trusted_proxies: vec![],
        limits: Limits::default(),
        keys: KeySettings::default(),
        audit: None,
        outbound: None,
    };
    let proxy = proxy::start(config, audit).await?;
    // The echo app stops with the proxy.
    let proxy_token = proxy.shutdown_token();
    tokio::spawn(async move {
        proxy_token.cancelled().await;
        shutdown.cancel();
    });
    Ok(Demo {
        ca: path("ca.pem"),
        client_cert: path("client.pem"),
        client_key: path("client-key.pem"),
        keys,
        echo_addr,
        proxy,
        _tempdir: tempdir,
    })
}
