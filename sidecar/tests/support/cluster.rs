//! Injected-pod proxies for tests: the configuration `run --config-from-env` would read
//! (built from an environment map, listeners moved to 127.0.0.1:0), a stdout capture
//! that can be told to fail, a policy bundle with named keys, and a client that checks
//! the proxy's workload certificate the way a mesh peer does.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::Write,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use portcullis_crds::{ApiToken, DataClassification, KeyPolicy, PolicyBundle, RateLimitPolicy};
use portcullis_sidecar::{
    config::env::ClusterConfig,
    control::identity::TrustDomain,
    run::{cluster, demo::demo_scopes, echo, proxy::RunningProxy},
    tls::verify::PeerServerVerifier,
};
use rustls::{ClientConfig, pki_types::ServerName};
use tokio_util::sync::CancellationToken;

use super::{
    admin_get,
    client::{Reply, request, send_on},
    operator::{FakeOperator, TOKEN},
};

pub const TRUST_DOMAIN: &str = "cluster.local";
pub const TENANT: &str = "acme";

/// Collects what the proxy writes to "stdout"; `failing` makes writes fail.
#[derive(Clone, Default)]
pub struct Capture {
    pub bytes: Arc<Mutex<Vec<u8>>>,
    pub failing: Arc<AtomicBool>,
}

impl Capture {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().unwrap()).into_owned()
    }

    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }
}

impl Write for Capture {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("stdout is gone"));
        }
        self.bytes.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("stdout is gone"));
        }
        Ok(())
    }
}

/// A bundle for [`TENANT`] with one key per demo scope.
pub fn bundle(
    version: u64,
    classification: DataClassification,
) -> (PolicyBundle, BTreeMap<&'static str, ApiToken>) {
    let mut tokens = BTreeMap::new();
    let mut keys = BTreeMap::new();
    for scope in ["identify", "events", "signals"] {
        let token = ApiToken::generate();
        keys.insert(
            token.key_id().clone(),
            KeyPolicy {
                name: format!("{TENANT}/{scope}"),
                hash: token.hash(4).unwrap(),
                scopes: BTreeSet::from([scope.to_owned()]),
                rate_limit: RateLimitPolicy {
                    requests: 1_000_000,
                    per_ms: 1_000,
                    burst: 100_000,
                },
                ip_allowlist: vec![],
                expires_at: None,
                revoked: false,
            },
        );
        tokens.insert(scope, token);
    }
    let bundle = PolicyBundle {
        version,
        tenant: TENANT.into(),
        classification,
        scopes: demo_scopes(),
        tenant_ip_allowlist: vec![],
        keys,
        ..PolicyBundle::default()
    };
    (bundle, tokens)
}

/// The environment the injector would set for a pod `pod` in `namespace` running as
/// `service_account`, files under `dir`.
pub fn environment(
    operator: &FakeOperator,
    dir: &Path,
    pod: &str,
    namespace: &str,
    service_account: &str,
    app_port: Option<u16>,
) -> HashMap<String, String> {
    std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(dir.join("ca-bundle.crt"), &operator.ca.root_pem).unwrap();
    let mut vars = HashMap::from([
        ("POD_NAME", pod.to_owned()),
        ("POD_NAMESPACE", namespace.to_owned()),
        ("PORTCULLIS_SERVICE_ACCOUNT", service_account.to_owned()),
        ("PORTCULLIS_IDENTITY_URL", operator.identity_url()),
        ("PORTCULLIS_POLICY_URL", operator.policy_url()),
        (
            "PORTCULLIS_TOKEN_PATH",
            dir.join("token").display().to_string(),
        ),
        (
            "PORTCULLIS_TRUST_BUNDLE",
            dir.join("ca-bundle.crt").display().to_string(),
        ),
        (
            "PORTCULLIS_DATA_DIR",
            dir.join("data").display().to_string(),
        ),
    ]);
    if let Some(port) = app_port {
        vars.insert("PORTCULLIS_APP_PORT", port.to_string());
    }
    vars.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// Parses `vars` the way `run --config-from-env` does, then moves every listener to an
/// ephemeral loopback port and shortens the timings.
pub fn config(vars: &HashMap<String, String>) -> ClusterConfig {
    let mut config = ClusterConfig::from_lookup(|name| vars.get(name).cloned()).unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    config.inbound.listen = any;
    config.admin.listen = any;
    config.outbound.listen = any;
    config.policy_min_backoff = Duration::from_millis(50);
    config.policy_max_backoff = Duration::from_millis(400);
    config.renewal.backoff_initial = Duration::from_millis(100);
    config.renewal.backoff_max = Duration::from_millis(400);
    config.audit.key_wait = Duration::from_secs(2);
    config
}

/// Starts a proxy exactly as `run --config-from-env` does, with audit going to a capture.
pub async fn start(config: ClusterConfig) -> (RunningProxy, Capture) {
    super::logs::install();
    let capture = Capture::default();
    let proxy = cluster::start(config, Box::new(capture.clone()))
        .await
        .unwrap();
    (proxy, capture)
}

/// A TLS client that accepts any workload certificate of our trust bundle (as a peer
/// proxy would), presenting none.
pub fn mesh_client_config(operator: &FakeOperator) -> Arc<ClientConfig> {
    let verifier = PeerServerVerifier::new(
        Arc::new(operator.ca.roots()),
        TrustDomain::new(TRUST_DOMAIN).unwrap(),
    );
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// One request to a proxy's inbound listener on a fresh connection.
pub async fn inbound_request(
    config: &Arc<ClientConfig>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, Box<dyn std::error::Error + Send + Sync>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(ServerName::from(addr.ip()), tcp)
        .await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(connection);
    send_on(&mut sender, request(method, path, headers, "")).await
}

/// A plain-HTTP request to an outbound listener, naming `destination` in the Host header.
pub async fn outbound_request(
    outbound: SocketAddr,
    destination: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let tcp = tokio::net::TcpStream::connect(outbound).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut builder = http::Request::builder()
        .method("GET")
        .uri(path)
        .header("host", destination.to_string());
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let req = builder.body(Full::new(Bytes::new())).unwrap();
    send_on(&mut sender, req).await.unwrap()
}

/// The echo app on an ephemeral loopback port.
pub async fn echo_app() -> (SocketAddr, CancellationToken) {
    let stop = CancellationToken::new();
    let addr = echo::start("127.0.0.1:0".parse().unwrap(), stop.clone())
        .await
        .unwrap();
    (addr, stop)
}

/// Waits until the proxy's `/ready` answers 200.
pub async fn wait_ready(proxy: &RunningProxy) {
    for _ in 0..500 {
        if admin_get(proxy.admin_addr, "/ready")
            .await
            .starts_with("HTTP/1.1 200")
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let last = admin_get(proxy.admin_addr, "/ready").await;
    panic!("proxy not ready within 10s: {last}");
}

/// Stops the proxy and waits for it to drain.
pub async fn stop(proxy: RunningProxy) {
    proxy.shutdown_token().cancel();
    tokio::time::timeout(Duration::from_secs(30), proxy.wait())
        .await
        .expect("the proxy drains");
}
