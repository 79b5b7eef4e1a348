//! The proxy shipping its audit chain to a collector: an audit collector in this
//! process (so on the generator's core, not the proxy's), reached over mutual TLS with
//! the demo client certificate, a workload of tenant demo. The proxy's records must
//! name the tenant its certificate does, so its policy is the bench policy under
//! tenant demo.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex, PoisonError},
};

use anyhow::Context;
use portcullis_collector::{Collector, FileStore, Ingest, IngestMetrics, KeyCache};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_util::sync::CancellationToken;

use crate::servers::Pki;

/// A running in-process collector; stops when dropped.
pub struct RunningCollector {
    /// Where it listens (its certificate names localhost).
    pub addr: SocketAddr,
    collector: Arc<Mutex<Collector<FileStore>>>,
    stop: CancellationToken,
}

impl Drop for RunningCollector {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl RunningCollector {
    /// Records (and checkpoints) stored for the demo tenant so far.
    pub fn stored(&self) -> anyhow::Result<usize> {
        let collector = self
            .collector
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(collector
            .entries(portcullis_sidecar::run::demo::TENANT)
            .context("reading the collector's log")?
            .len())
    }
}

/// Starts a collector on 127.0.0.1 storing under `dir`, serving the PKI's localhost
/// certificate and accepting its client certificates of trust domain demo.local.
pub async fn start_collector(pki: &Pki, dir: &Path) -> anyhow::Result<RunningCollector> {
    let keys = KeyCache::new();
    keys.insert(portcullis_audit::TenantKeys::generate(
        portcullis_sidecar::run::demo::TENANT,
    ));
    let collector = Arc::new(Mutex::new(Collector::open(
        FileStore::open(dir, Arc::new(keys))?,
        Arc::new(portcullis_api::clock::SystemClock),
    )?));
    let ingest = Ingest::new(
        collector.clone(),
        portcullis_api::spiffe::TrustDomain::new("demo.local")?,
        IngestMetrics::default(),
    );
    let chain = CertificateDer::pem_file_iter(&pki.server_cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&pki.server_key)?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&pki.ca)? {
        roots.add(ca?)?;
    }
    let tls = portcullis_collector::server_config(chain, key, roots)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    tokio::spawn(portcullis_server::serve(
        listener,
        Some(Arc::new(tls).into()),
        move |request| ingest.clone().handle(request),
        stop.clone(),
    ));
    Ok(RunningCollector {
        addr,
        collector,
        stop,
    })
}

/// The `audit:` section shipping to the collector at `addr`, spooled in `spool`, the
/// chain named after `pod`.
pub fn collector_section(addr: SocketAddr, pki: &Pki, spool: &Path, pod: &str) -> String {
    format!(
        "audit:\n  pod: {pod}\n  sinks:\n    - collector: {{url: \"https://localhost:{port}\", caFile: {ca}, certFile: {cert}, keyFile: {key}, spoolDir: {spool}}}\n",
        port = addr.port(),
        ca = pki.ca.display(),
        cert = pki.client_cert.display(),
        key = pki.client_key.display(),
        spool = spool.display(),
    )
}
