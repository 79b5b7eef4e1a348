//! Bring-your-own serving certificate (issue 20): clients outside the mesh see the
//! certificate mounted at `PORTCULLIS_SERVING_CERT_DIR` (e.g. one cert-manager renews),
//! mesh peers (which send the reserved server name) keep getting the workload
//! certificate, the directory is followed across the kubelet's `..data` swaps, and a
//! bad certificate is refused with a counted reason while the proxy keeps serving.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use portcullis_crds::DataClassification;
use portcullis_sidecar::{
    run::{echo, proxy::RunningProxy},
    tls::{PEER_SERVER_NAME, peer::leaf_facts},
};
use rustls::{
    ClientConfig, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
};
use support::{
    admin_get,
    ca::{Issued, TestCa},
    client::{request, send_on},
    cluster::{self, TENANT, bundle, environment, mesh_client_config, outbound_request},
    logs,
    operator::FakeOperator,
};
use tokio_util::sync::CancellationToken;

const HOST: &str = "web.shop.svc";
const WORKLOAD: &str = "spiffe://cluster.local/ns/shop/sa/web";

/// A Secret volume as the kubelet writes it: each version in a `..<version>` directory,
/// `..data` a symlink to it replaced by one rename, `tls.crt`/`tls.key` symlinks
/// through `..data`.
struct SecretVolume {
    dir: PathBuf,
    version: u32,
}

impl SecretVolume {
    fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        Self {
            dir: dir.to_owned(),
            version: 0,
        }
    }

    fn publish(&mut self, files: &[(&str, &str)]) {
        self.version += 1;
        let name = format!("..2026_01_01_00_00_{:02}.{}", self.version, self.version);
        std::fs::create_dir(self.dir.join(&name)).unwrap();
        for (file, contents) in files {
            std::fs::write(self.dir.join(&name).join(file), contents).unwrap();
        }
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&name, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        for file in ["tls.crt", "tls.key"] {
            let link = self.dir.join(file);
            if link.symlink_metadata().is_err() {
                std::os::unix::fs::symlink(format!("..data/{file}"), link).unwrap();
            }
        }
    }

    fn publish_tls(&mut self, cert_pem: &str, key_pem: &str) {
        self.publish(&[("tls.crt", cert_pem), ("tls.key", key_pem)]);
    }
}

fn leaf_of(issued: &Issued) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap()
}

/// Accepts any server certificate and remembers the leaf: to see what was presented.
#[derive(Debug, Default)]
struct Recorder(Mutex<Option<CertificateDer<'static>>>);

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.0.lock().unwrap() = Some(end_entity.clone().into_owned());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn server_name(sni: Option<&str>) -> ServerName<'static> {
    match sni {
        Some(name) => ServerName::try_from(name.to_owned()).unwrap(),
        // rustls sends no SNI for an IP address.
        None => ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into()),
    }
}

/// The leaf the proxy presents to a client sending `sni` (none: connect by address).
async fn presented(addr: SocketAddr, sni: Option<&str>) -> CertificateDer<'static> {
    let recorder = Arc::new(Recorder::default());
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(recorder.clone())
            .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name(sni), tcp)
        .await
        .unwrap();
    recorder.0.lock().unwrap().clone().unwrap()
}

fn is_workload(leaf: &CertificateDer<'_>) -> bool {
    leaf_facts(leaf)
        .ok()
        .and_then(|f| f.workload)
        .is_some_and(|w| w.to_string() == WORKLOAD)
}

/// Polls until `sni` is presented `expected`, for up to 10 s.
async fn wait_presented(addr: SocketAddr, sni: Option<&str>, expected: &CertificateDer<'_>) {
    for _ in 0..200 {
        if presented(addr, sni).await == *expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the proxy never presented the expected certificate");
}

fn refusals(proxy: &RunningProxy, reason: &str) -> f64 {
    proxy
        .metrics
        .sample(&format!(
            "portcullis_serving_certificate_refusals_total{{reason=\"{reason}\"}}"
        ))
        .unwrap_or(0.0)
}

async fn wait_refusals(proxy: &RunningProxy, reason: &str, count: f64) {
    support::wait_until(|| refusals(proxy, reason) >= count).await;
    // A few more polls of the same files: still counted once.
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(refusals(proxy, reason), count, "{reason}");
}

struct Pod {
    proxy: RunningProxy,
    volume: SecretVolume,
    _dir: tempfile::TempDir,
    _app: CancellationToken,
}

/// An injected pod `shop/web-0` whose proxy reads its serving certificate from a Secret
/// volume, polled every 50 ms; returns once the workload certificate is in.
async fn start_pod(op: &FakeOperator) -> Pod {
    let stop = CancellationToken::new();
    let app = echo::start("127.0.0.1:0".parse().unwrap(), stop.clone())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let volume = SecretVolume::new(&dir.path().join("serving-certificate"));
    let mut vars = environment(op, dir.path(), "web-0", "shop", "web", Some(app.port()));
    vars.insert(
        "PORTCULLIS_SERVING_CERT_DIR".into(),
        volume.dir.display().to_string(),
    );
    let mut config = cluster::config(&vars);
    config.serving_cert_poll = Duration::from_millis(50);
    let (proxy, _) = cluster::start(config).await;
    let store = proxy.certificates.clone().unwrap();
    support::wait_until(|| store.is_ready()).await;
    Pod {
        proxy,
        volume,
        _dir: dir,
        _app: stop,
    }
}

#[tokio::test]
async fn clients_outside_the_mesh_see_the_serving_certificate_and_peers_the_workload_one() {
    let op = FakeOperator::start("cluster.local", TENANT).await;
    let (policy, tokens) = bundle(1, DataClassification::Internal);
    op.publish(policy);
    let public_ca = TestCa::new("corporate");
    let issued = public_ca.dns_server(HOST, false);
    let mut pod = start_pod(&op).await;
    pod.volume.publish_tls(&issued.cert_pem, &issued.key_pem);
    let addr = pod.proxy.inbound_addr;
    wait_presented(addr, Some(HOST), &leaf_of(&issued)).await;

    // An API-key client with no client certificate verifies the proxy by its own CA
    // and the Service name, then is served.
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(public_ca.root_store())
            .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(HOST).unwrap(), tcp)
        .await
        .expect("the serving certificate verifies against the client's own CA");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(connection);
    let key = tokens["events"].expose_secret();
    let reply = send_on(
        &mut sender,
        request("GET", "/v1/events/1", &[("x-api-key", key)], ""),
    )
    .await
    .unwrap();
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );

    // No server name at all (a client dialling the pod IP): the serving certificate too.
    assert_eq!(presented(addr, None).await, leaf_of(&issued));

    // A mesh peer sends the reserved name and gets the workload certificate, which its
    // verifier accepts by SPIFFE ID.
    let peer = presented(addr, Some(PEER_SERVER_NAME)).await;
    assert!(
        is_workload(&peer),
        "a mesh peer gets the workload certificate"
    );
    let mesh = mesh_client_config(&op);
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(mesh)
        .connect(ServerName::try_from(PEER_SERVER_NAME).unwrap(), tcp)
        .await
        .expect("the workload certificate verifies as a peer");

    // Another pod's proxy calls through its outbound listener: mTLS and peer
    // authorisation work as before.
    let client_dir = tempfile::tempdir().unwrap();
    let mut vars = environment(&op, client_dir.path(), "job-0", "shop-jobs", "client", None);
    vars.insert("PORTCULLIS_OUTBOUND_KEEP_PORT".into(), "true".into());
    let (client, _) = cluster::start(cluster::config(&vars)).await;
    let store = client.certificates.clone().unwrap();
    support::wait_until(|| store.is_ready()).await;
    let mut reply =
        outbound_request(client.outbound_addr.unwrap(), addr, "/v1/events/1", &[]).await;
    for _ in 0..100 {
        if reply.status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        reply = outbound_request(client.outbound_addr.unwrap(), addr, "/v1/events/1", &[]).await;
    }
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(
        reply.echoed_header("x-portcullis-principal").as_deref(),
        Some("spiffe://cluster.local/ns/shop-jobs/sa/client")
    );
    assert_eq!(
        pod.proxy
            .metrics
            .sample("portcullis_serving_certificate_in_force"),
        Some(1.0)
    );
    logs::assert_not_logged(&issued.key_pem);
}

#[tokio::test]
async fn a_renewed_certificate_is_presented_after_the_kubelet_swaps_the_volume() {
    let op = FakeOperator::start("cluster.local", TENANT).await;
    let public_ca = TestCa::new("corporate");
    let first = public_ca.dns_server(HOST, false);
    let second = public_ca.dns_server(HOST, false);
    let mut pod = start_pod(&op).await;
    pod.volume.publish_tls(&first.cert_pem, &first.key_pem);
    let addr = pod.proxy.inbound_addr;
    wait_presented(addr, Some(HOST), &leaf_of(&first)).await;

    pod.volume.publish_tls(&second.cert_pem, &second.key_pem);
    wait_presented(addr, Some(HOST), &leaf_of(&second)).await;
    assert_eq!(presented(addr, None).await, leaf_of(&second));
    assert!(is_workload(&presented(addr, Some(PEER_SERVER_NAME)).await));
    // (The first poll may have found the volume still empty: "missing" is not checked.)
    for reason in ["unparseable", "key_mismatch", "expired", "not_yet_valid"] {
        assert_eq!(refusals(&pod.proxy, reason), 0.0, "{reason}");
    }
}

#[tokio::test]
async fn bad_certificates_are_refused_with_a_reason_and_the_proxy_keeps_serving() {
    let op = FakeOperator::start("cluster.local", TENANT).await;
    let (policy, _tokens) = bundle(1, DataClassification::Internal);
    op.publish(policy);
    let public_ca = TestCa::new("corporate");
    let mut pod = start_pod(&op).await;
    let addr = pod.proxy.inbound_addr;

    // The optional Secret does not exist: an empty directory.
    wait_refusals(&pod.proxy, "missing", 1.0).await;
    assert!(is_workload(&presented(addr, Some(HOST)).await));

    let expired = public_ca.dns_server(HOST, true);
    pod.volume.publish_tls(&expired.cert_pem, &expired.key_pem);
    wait_refusals(&pod.proxy, "expired", 1.0).await;
    assert!(is_workload(&presented(addr, Some(HOST)).await));
    assert!(is_workload(&presented(addr, None).await));

    let good = public_ca.dns_server(HOST, false);
    let other = public_ca.dns_server(HOST, false);
    pod.volume.publish_tls(&good.cert_pem, &other.key_pem);
    wait_refusals(&pod.proxy, "key_mismatch", 1.0).await;
    assert!(is_workload(&presented(addr, Some(HOST)).await));

    pod.volume
        .publish(&[("tls.crt", "not a certificate"), ("tls.key", &good.key_pem)]);
    wait_refusals(&pod.proxy, "unparseable", 1.0).await;

    // The pod stays ready whatever its serving certificate; /ready says why it is
    // not in force.
    let mut ready = String::new();
    for _ in 0..500 {
        ready = admin_get(pod.proxy.admin_addr, "/ready").await;
        if ready.starts_with("HTTP/1.1 200") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert!(ready.contains(r#""refused":"unparseable""#), "{ready}");
    assert!(ready.contains(r#""inForce":false"#), "{ready}");

    // A good certificate goes in force; a bad renewal, or the Secret's keys going
    // away, keeps it.
    pod.volume.publish_tls(&good.cert_pem, &good.key_pem);
    wait_presented(addr, Some(HOST), &leaf_of(&good)).await;
    pod.volume.publish_tls(&other.cert_pem, &good.key_pem);
    wait_refusals(&pod.proxy, "key_mismatch", 2.0).await;
    assert_eq!(presented(addr, Some(HOST)).await, leaf_of(&good));
    pod.volume.publish(&[]);
    wait_refusals(&pod.proxy, "missing", 2.0).await;
    assert_eq!(presented(addr, Some(HOST)).await, leaf_of(&good));
    assert!(is_workload(&presented(addr, Some(PEER_SERVER_NAME)).await));
    let ready = admin_get(pod.proxy.admin_addr, "/ready").await;
    assert!(ready.contains(r#""inForce":true"#), "{ready}");
    assert!(ready.contains(r#""refused":"missing""#), "{ready}");
    for secret in [&good.key_pem, &other.key_pem, &expired.key_pem] {
        logs::assert_not_logged(secret);
    }
}
