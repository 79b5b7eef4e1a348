//! Shared test support: a test CA, a proxy harness around the echo app, a rustls +
//! hyper client, a policy stream server, and log capture to check no secret is logged.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod ca;
pub mod client;
pub mod cluster;
pub mod demo_process;
pub mod logs;
pub mod operator;
pub mod policy_server;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use portcullis_crds::{
    ApiToken, DataClassification, InboundMode, KeyPolicy, PolicyBundle, RateLimitPolicy,
};
use portcullis_sidecar::{
    audit::{AuditHook, TracingAudit},
    config::{
        AdminConfig, InboundConfig, KeySettings, Limits, PolicySource, ProxyConfig, StreamSource,
        TlsFiles, UpstreamConfig,
    },
    run::{
        demo::demo_scopes,
        echo,
        proxy::{self, RunningProxy},
    },
};
use tokio_util::sync::CancellationToken;

pub use ca::TestCa;
#[allow(unused_imports)]
pub use client::{Identity, Reply, TestClient};

/// Every test is bounded in time.
pub const TEST_DEADLINE: Duration = Duration::from_secs(60);

/// Named test keys.
pub const KEY_NAMES: [&str; 8] = [
    "identify",
    "events",
    "signals",
    "expired",
    "revoked",
    "allowlisted",
    "limited",
    "all",
];

/// How to start a harness.
pub struct Options {
    pub mode: InboundMode,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub limits: Limits,
    pub audit: Arc<dyn AuditHook>,
    pub classification: DataClassification,
    /// Serve policy from an in-process policy stream server instead of a file.
    pub policy_stream: bool,
    /// With `policy_stream`: start with the server down.
    pub stream_server_down: bool,
    /// Forward to this port instead of the built-in echo app.
    pub app_port: Option<u16>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            mode: InboundMode::MtlsOrApikey,
            trusted_proxies: vec![],
            limits: Limits::default(),
            audit: Arc::new(TracingAudit),
            classification: DataClassification::Internal,
            policy_stream: false,
            stream_server_down: false,
            app_port: None,
        }
    }
}

/// A proxy in front of the echo app, with a test CA, named keys and a policy file.
pub struct Harness {
    pub proxy: RunningProxy,
    pub ca: TestCa,
    pub dir: tempfile::TempDir,
    pub tokens: BTreeMap<&'static str, ApiToken>,
    pub bundle: PolicyBundle,
    pub echo: SocketAddr,
    pub policy_server: Option<policy_server::PolicyServer>,
    echo_shutdown: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.proxy.shutdown_token().cancel();
        self.echo_shutdown.cancel();
    }
}

fn key_policy(token: &ApiToken, name: &str) -> KeyPolicy {
    let scopes: BTreeSet<String> = match name {
        "identify" | "events" | "signals" => BTreeSet::from([name.to_owned()]),
        "all" => ["identify", "events", "signals"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        _ => BTreeSet::from(["events".to_owned()]),
    };
    KeyPolicy {
        name: format!("acme/{name}"),
        hash: token.hash(4).unwrap(),
        scopes,
        rate_limit: if name == "limited" {
            RateLimitPolicy {
                requests: 1,
                per_ms: 3_600_000,
                burst: 2,
            }
        } else {
            RateLimitPolicy {
                requests: 1_000_000,
                per_ms: 1_000,
                burst: 100_000,
            }
        },
        ip_allowlist: if name == "allowlisted" {
            vec!["10.0.0.0/8".parse().unwrap()]
        } else {
            vec![]
        },
        expires_at: (name == "expired")
            .then(|| jiff::Timestamp::from_second(1_000_000_000).unwrap()),
        revoked: name == "revoked",
    }
}

impl Harness {
    pub async fn start(options: Options) -> Self {
        logs::install();
        let ca = TestCa::new("test");
        let dir = tempfile::tempdir().unwrap();
        ca.write_server_files(dir.path());
        let mut tokens = BTreeMap::new();
        let mut keys = BTreeMap::new();
        for name in KEY_NAMES {
            let token = ApiToken::generate();
            keys.insert(token.key_id().clone(), key_policy(&token, name));
            tokens.insert(name, token);
        }
        let bundle = PolicyBundle {
            version: 1,
            tenant: "acme".into(),
            classification: options.classification,
            scopes: demo_scopes(),
            tenant_ip_allowlist: vec![],
            keys,
            ..PolicyBundle::default()
        };
        let policy_path = dir.path().join("policy.json");
        std::fs::write(&policy_path, serde_json::to_string(&bundle).unwrap()).unwrap();
        let echo_shutdown = CancellationToken::new();
        let echo = echo::start("127.0.0.1:0".parse().unwrap(), echo_shutdown.clone())
            .await
            .unwrap();
        let mut policy_server = None;
        let policy = if options.policy_stream {
            let mut server = policy_server::PolicyServer::start(&ca, bundle.clone()).await;
            if options.stream_server_down {
                server.stop().await;
            }
            let port = server.addr.port();
            policy_server = Some(server);
            PolicySource::Stream(StreamSource {
                host: "localhost".into(),
                port,
                tenant: "acme".into(),
                min_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_millis(400),
            })
        } else {
            PolicySource::File {
                path: policy_path,
                poll_interval: Duration::from_millis(50),
            }
        };
        let config = ProxyConfig {
            inbound: InboundConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                mode: options.mode,
                peers_need_mapped_route: false,
                trust_domain: None,
                allowed_peers: vec![],
            },
            admin: AdminConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
            },
            upstream: UpstreamConfig {
                app_port: options.app_port.unwrap_or(echo.port()),
                connect_timeout: Duration::from_secs(1),
                pool_idle_timeout: Duration::from_secs(30),
            },
            tls: TlsFiles {
                certificate: dir.path().join("server.pem"),
                private_key: dir.path().join("server-key.pem"),
                trust_bundle: dir.path().join("ca.pem"),
                reload_interval: Duration::from_millis(50),
            },
            policy,
            scopes_map: None,
            trusted_proxies: options.trusted_proxies,
            limits: options.limits,
            keys: KeySettings::default(),
            audit: None,
            outbound: None,
        };
        let proxy = proxy::start(config, options.audit).await.unwrap();
        Self {
            proxy,
            ca,
            dir,
            tokens,
            bundle,
            echo,
            policy_server,
            echo_shutdown,
        }
    }

    pub fn token(&self, name: &str) -> &str {
        self.tokens[name].expose_secret()
    }

    pub fn policy_path(&self) -> PathBuf {
        self.dir.path().join("policy.json")
    }

    /// Writes a changed bundle with the next version and waits until it is in force.
    pub async fn update_policy(&mut self, change: impl FnOnce(&mut PolicyBundle)) {
        change(&mut self.bundle);
        self.bundle.version += 1;
        if let Some(server) = &self.policy_server {
            server.publish(self.bundle.clone());
        }
        let tmp = self.dir.path().join("policy.json.tmp");
        std::fs::write(&tmp, serde_json::to_string(&self.bundle).unwrap()).unwrap();
        std::fs::rename(&tmp, self.policy_path()).unwrap();
        let want = self.bundle.version;
        wait_until(|| self.proxy.policy.load().is_some_and(|b| b.version == want)).await;
    }

    pub fn client(&self, identity: Identity) -> TestClient {
        TestClient::new(self.proxy.inbound_addr, &self.ca, identity)
    }

    pub fn metric(&self, sample: &str) -> f64 {
        self.proxy.metrics.sample(sample).unwrap_or(0.0)
    }

    pub fn denials(&self, reason: &str, status: u16) -> f64 {
        self.metric(&format!(
            "portcullis_requests_total{{decision=\"deny\",reason=\"{reason}\",status=\"{status}\"}}"
        ))
    }

    pub fn handshake_failures(&self, reason: &str) -> f64 {
        self.metric(&format!(
            "portcullis_tls_handshake_failures_total{{reason=\"{reason}\"}}"
        ))
    }
}

/// A GET over plain TCP to the admin port, returning the raw answer.
pub async fn admin_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// Polls `condition` every 20 ms for up to 10 s.
pub async fn wait_until(mut condition: impl FnMut() -> bool) {
    for _ in 0..500 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logs = logs::captured();
    let tail = &logs[logs.len().saturating_sub(4000)..];
    panic!("condition not met within 10s; last logs:\n{tail}");
}

/// A checksum-valid token under `real`'s key id with a fresh random secret: a wrong
/// guess the format check cannot tell from the real key.
pub fn forged_key(real: &str) -> String {
    let other = ApiToken::generate();
    let body = format!(
        "ak_{}_{}",
        &real[3..15],
        &other.expose_secret()[16..16 + 43]
    );
    fix_checksum(&body)
}

pub fn fix_checksum(body: &str) -> String {
    // Generate tokens until one has this exact body is impossible; instead recompute the
    // CRC the way the token module does (CRC32 as 6 base62 digits).
    const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut value = u64::from(crc32(body.as_bytes()));
    let mut digits = [b'0'; 6];
    for slot in digits.iter_mut().rev() {
        *slot = BASE62[(value % 62) as usize];
        value /= 62;
    }
    format!("{body}{}", String::from_utf8(digits.to_vec()).unwrap())
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
