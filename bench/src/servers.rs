//! The servers under test: one ECDSA P-256 certificate for all of them, the configs
//! (proxy.yaml, nginx.conf, haproxy.cfg) rendered into a temp dir, and the processes,
//! each started under `taskset` and stopped by its own pid.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;

/// PEM files of the benchmark PKI.
#[derive(Clone, Debug)]
pub struct Pki {
    /// CA certificate.
    pub ca: PathBuf,
    /// Server certificate (SAN localhost, 127.0.0.1).
    pub server_cert: PathBuf,
    /// Server key (PKCS#8, ECDSA P-256).
    pub server_key: PathBuf,
    /// Certificate and key in one file, for HAProxy.
    pub server_combined: PathBuf,
    /// Client certificate (SPIFFE URI SAN).
    pub client_cert: PathBuf,
    /// Client key.
    pub client_key: PathBuf,
}

/// Writes a CA, a server and a client certificate (all ECDSA P-256 / SHA-256) to `dir`:
/// the demo's throwaway PKI, so every server under test presents the same kind of key.
pub fn write_pki(dir: &Path) -> anyhow::Result<Pki> {
    let pems = portcullis_sidecar::run::demo::certificates()?;
    let pki = Pki {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server-key.pem"),
        server_combined: dir.join("server-combined.pem"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client-key.pem"),
    };
    std::fs::write(&pki.ca, &pems.ca)?;
    std::fs::write(&pki.server_cert, &pems.server_cert)?;
    std::fs::write(&pki.server_key, &pems.server_key)?;
    std::fs::write(
        &pki.server_combined,
        format!("{}{}", pems.server_cert, pems.server_key),
    )?;
    std::fs::write(&pki.client_cert, &pems.client_cert)?;
    std::fs::write(&pki.client_key, &pems.client_key)?;
    Ok(pki)
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// `proxy.yaml` for `portcullis-proxy run`: mode mtls-or-apikey (API-key requests and
/// mTLS requests both pass), file policy, reloads slowed so polling stays off the
/// measured path.
pub fn proxy_yaml(
    inbound_port: u16,
    admin_port: u16,
    app_port: u16,
    pki: &Pki,
    policy: &Path,
) -> String {
    format!(
        "inbound:\n  listen: \"127.0.0.1:{inbound_port}\"\n  mode: mtls-or-apikey\n\
         admin:\n  listen: \"127.0.0.1:{admin_port}\"\n\
         upstream:\n  appPort: {app_port}\n\
         tls:\n  certificate: {cert}\n  privateKey: {key}\n  trustBundle: {ca}\n  reloadInterval: 60s\n\
         policy:\n  file: {policy}\n  pollInterval: 60s\n\
         limits:\n  maxConnections: 16384\n  maxConnectionsPerSource: 16384\n",
        cert = pki.server_cert.display(),
        key = pki.server_key.display(),
        ca = pki.ca.display(),
        policy = policy.display(),
    )
}

/// The `audit:` section for the encrypted file sink (tamper-evident trail) in `dir`,
/// with the data-encryption key in `key_file`.
pub fn audit_section(dir: &Path, key_file: &Path) -> String {
    format!(
        "audit:\n  pod: bench\n  sinks:\n    - file: {{dir: {}, keyFile: {}}}\n",
        dir.display(),
        key_file.display()
    )
}

/// Whether this build of the proxy accepts `yaml` (e.g. knows the `audit:` section).
pub fn proxy_accepts(yaml: &str) -> Result<(), String> {
    portcullis_sidecar::config::ProxyConfig::parse(yaml, "bench proxy.yaml")
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// nginx.conf: one worker, TLS 1.3 only, keep-alive pool to the app, no access log.
/// TLS 1.3 resumption uses nginx's defaults (session tickets on).
pub fn nginx_conf(dir: &Path, port: u16, app_port: u16, pki: &Pki) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\n\
         worker_rlimit_nofile 20000;\n\
         events {{ worker_connections 16384; }}\n\
         http {{\n  access_log off;\n\
         \x20 client_body_temp_path {d}/nginx-body;\n  proxy_temp_path {d}/nginx-proxy;\n\
         \x20 fastcgi_temp_path {d}/nginx-fastcgi;\n  uwsgi_temp_path {d}/nginx-uwsgi;\n  scgi_temp_path {d}/nginx-scgi;\n\
         \x20 keepalive_requests 1000000;\n  keepalive_timeout 60s;\n\
         \x20 upstream app {{ server 127.0.0.1:{app_port}; keepalive 64; keepalive_requests 1000000; }}\n\
         \x20 server {{\n    listen 127.0.0.1:{port} ssl;\n\
         \x20   ssl_certificate {cert};\n    ssl_certificate_key {key};\n\
         \x20   ssl_protocols TLSv1.3;\n    ssl_session_cache shared:SSL:10m;\n\
         \x20   location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n\
         \x20 }}\n}}\n",
        cert = pki.server_cert.display(),
        key = pki.server_key.display(),
    )
}

/// haproxy.cfg: one thread, TLS 1.3 only, connection reuse to the app, no logging.
pub fn haproxy_cfg(port: u16, app_port: u16, pki: &Pki) -> String {
    format!(
        "global\n  nbthread 1\n  maxconn 9950\n  ulimit-n 20000\n\
         defaults\n  mode http\n  timeout connect 1s\n  timeout client 60s\n  timeout server 30s\n\
         \x20 timeout http-keep-alive 60s\n  option http-keep-alive\n  http-reuse always\n\
         frontend fe\n  bind 127.0.0.1:{port} ssl crt {crt} alpn http/1.1 ssl-min-ver TLSv1.3\n\
         \x20 default_backend app\n\
         backend app\n  server app 127.0.0.1:{app_port}\n",
        crt = pki.server_combined.display(),
    )
}

static NICENESS: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Sets the niceness children start with (`nice -n`; negative needs root).
pub fn set_niceness(n: i32) {
    NICENESS.store(n, std::sync::atomic::Ordering::Relaxed);
}

fn niceness() -> i32 {
    NICENESS.load(std::sync::atomic::Ordering::Relaxed)
}

/// A child process under test; stopped (SIGTERM, then SIGKILL) by its pid on drop.
#[derive(Debug)]
pub struct Server {
    /// Its pid (nginx: the master; the worker is found through /proc).
    pub pid: u32,
    child: Child,
}

impl Server {
    /// Starts `program args` pinned to `cpus` (a `taskset -c` list) with `env`, stdout
    /// discarded and stderr to `stderr`.
    pub fn spawn(
        name: &str,
        cpus: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        stderr: &Path,
    ) -> anyhow::Result<Self> {
        let log = std::fs::File::create(stderr)?;
        let mut command = Command::new("nice");
        command
            .arg("-n")
            .arg(niceness().to_string())
            .arg("taskset")
            .arg("-c")
            .arg(cpus)
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}: taskset -c {cpus} {}", program.display()))?;
        Ok(Self {
            pid: child.id(),
            child,
        })
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.running() {
            return;
        }
        // SIGTERM first so nginx's master also stops its worker.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !self.running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `addr` accepts TCP connections or `timeout` passes.
pub async fn wait_listening(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{addr} not listening after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `GET http://addr/ready` answers 200 (the proxy has its policy).
pub async fn wait_ready(addr: SocketAddr, timeout: Duration) -> anyhow::Result<Duration> {
    use http_body_util::{BodyExt, Empty};
    let started = Instant::now();
    loop {
        let attempt = async {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake::<_, Empty<bytes::Bytes>>(
                    hyper_util::rt::TokioIo::new(tcp),
                )
                .await?;
            tokio::spawn(conn);
            let request = http::Request::get("/ready")
                .header("host", "localhost")
                .body(Empty::new())?;
            let response = sender.send_request(request).await?;
            let ok = response.status() == 200;
            response.into_body().collect().await?;
            anyhow::Ok(ok)
        };
        if let Ok(true) = attempt.await {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < timeout,
            "proxy admin {addr} not ready after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn pki(dir: &Path) -> Pki {
        Pki {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            server_combined: dir.join("server-combined.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        }
    }

    #[test]
    fn proxy_yaml_is_a_valid_proxy_config() {
        let dir = Path::new("/tmp/bench");
        let text = proxy_yaml(4143, 4191, 8080, &pki(dir), &dir.join("policy.json"));
        let config = portcullis_sidecar::config::ProxyConfig::parse(&text, "bench proxy.yaml")
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(config.inbound.listen, "127.0.0.1:4143".parse().unwrap());
        assert_eq!(config.admin.listen, "127.0.0.1:4191".parse().unwrap());
        assert_eq!(config.upstream.app_port, 8080);
        assert_eq!(
            config.inbound.mode,
            portcullis_crds::InboundMode::MtlsOrApikey
        );
        assert_eq!(config.tls.certificate, dir.join("server.pem"));
        assert!(matches!(
            config.policy,
            portcullis_sidecar::config::PolicySource::File { ref path, .. } if path == &dir.join("policy.json")
        ));
    }

    #[test]
    fn nginx_conf_is_one_worker_tls13_with_upstream_keepalive() {
        let dir = Path::new("/tmp/bench");
        let text = nginx_conf(dir, 8443, 9000, &pki(dir));
        for needle in [
            "worker_processes 1;",
            "daemon off;",
            "listen 127.0.0.1:8443 ssl;",
            "ssl_protocols TLSv1.3;",
            "server 127.0.0.1:9000; keepalive 64;",
            "proxy_http_version 1.1;",
            "ssl_certificate /tmp/bench/server.pem;",
            "ssl_certificate_key /tmp/bench/server-key.pem;",
            "access_log off;",
            "pid /tmp/bench/nginx.pid;",
        ] {
            assert!(text.contains(needle), "{needle:?} missing:\n{text}");
        }
        assert_eq!(text.matches('{').count(), text.matches('}').count());
    }

    #[test]
    fn haproxy_cfg_is_one_thread_tls13() {
        let dir = Path::new("/tmp/bench");
        let text = haproxy_cfg(8444, 9000, &pki(dir));
        for needle in [
            "nbthread 1",
            "bind 127.0.0.1:8444 ssl crt /tmp/bench/server-combined.pem alpn http/1.1 ssl-min-ver TLSv1.3",
            "server app 127.0.0.1:9000",
            "http-reuse always",
        ] {
            assert!(text.contains(needle), "{needle:?} missing:\n{text}");
        }
    }

    #[test]
    fn pki_is_ecdsa_p256_and_the_combined_file_has_both_parts() {
        let dir = std::env::temp_dir().join(format!("portcullis-bench-pki-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pki = write_pki(&dir).unwrap();
        let combined = std::fs::read_to_string(&pki.server_combined).unwrap();
        assert!(combined.contains("BEGIN CERTIFICATE") && combined.contains("BEGIN PRIVATE KEY"));
        let der = rustls::pki_types::CertificateDer::from_pem_file(&pki.server_cert).unwrap();
        // DER OIDs: prime256v1 (1.2.840.10045.3.1.7) and ecdsa-with-SHA256 (1.2.840.10045.4.3.2).
        let p256 = [0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];
        let ecdsa_sha256 = [0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03, 0x02];
        let has = |oid: &[u8]| der.windows(oid.len()).any(|w| w == oid);
        assert!(has(&p256) && has(&ecdsa_sha256));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    use rustls::pki_types::pem::PemObject;
}
