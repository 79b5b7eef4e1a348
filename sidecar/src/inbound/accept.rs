//! Accepting inbound connections: a connection semaphore (max connections) and a cap
//! per source address, the TLS handshake under a deadline, the peer's SPIFFE ID, then
//! HTTP/1.1 or HTTP/2 by ALPN with header size, count and read limits, an idle
//! watchdog that only requests reset, and graceful drain.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::Inbound;
use crate::{
    config::Limits,
    listener::{
        idle::{self, Activity},
        per_source::SourceSlots,
        proxy_http::http_builder,
    },
    metrics::Metrics,
    tls::{
        self, ServerConfigs,
        peer::{PeerIdentity, peer_identity},
    },
};

/// What the connection tells every request on it.
#[derive(Debug)]
pub struct ConnInfo {
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The peer workload's SPIFFE ID, from a verified client certificate.
    pub peer_id: Option<String>,
    /// The peer's workload, tenant and certificate serial (`peer_id` parsed).
    pub peer_identity: Option<PeerIdentity>,
    /// Whether a (verified) client certificate was presented at all.
    pub client_cert: bool,
    /// Requests in flight, for the idle watchdog.
    pub activity: Arc<Activity>,
}

/// Accepts connections on `listener` until `shutdown`, then lets open connections
/// finish their requests for up to `limits.drain_timeout`.
pub async fn serve(
    listener: TcpListener,
    server_configs: ServerConfigs,
    inbound: Arc<Inbound>,
    limits: Limits,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let builder = Arc::new(http_builder(&limits));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let per_source = SourceSlots::new(limits.max_connections_per_source);
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => break },
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // An ingress or load balancer in trustedProxies speaks for many clients.
        let source = peer.ip().to_canonical();
        let exempt = inbound
            .settings
            .trusted_proxies
            .iter()
            .any(|net| net.contains(&source));
        let source_slot = match exempt {
            true => None,
            false => match per_source.try_take(source) {
                Some(slot) => Some(slot),
                None => {
                    tracing::debug!(%peer, "source holds its connection cap; closing");
                    metrics.connection_refused("per_source_limit");
                    continue;
                }
            },
        };
        let task = Connection {
            // The config in force now: a renewal later does not touch this connection.
            acceptor: TlsAcceptor::from(server_configs.current()),
            inbound: inbound.clone(),
            builder: builder.clone(),
            metrics: metrics.clone(),
            limits: limits.clone(),
            shutdown: shutdown.clone(),
        };
        let span = tracing::info_span!("conn", listener = "inbound", %peer);
        tokio::spawn(
            async move {
                let _slots = (permit, source_slot);
                task.run(tcp, peer).await;
            }
            .instrument(span),
        );
    }
    drop(listener);
    tracing::info!(
        deadline_s = limits.drain_timeout.as_secs(),
        "draining inbound connections"
    );
    // Every connection holds a slot until it has closed; all slots back means drained.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(limits.drain_timeout, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("drain deadline passed with requests still in flight");
    }
}

struct Connection {
    acceptor: TlsAcceptor,
    inbound: Arc<Inbound>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    metrics: Metrics,
    limits: Limits,
    shutdown: CancellationToken,
}

impl Connection {
    async fn run(self, tcp: TcpStream, peer: SocketAddr) {
        let _ = tcp.set_nodelay(true);
        let stream =
            match tokio::time::timeout(self.limits.handshake_timeout, self.acceptor.accept(tcp))
                .await
            {
                Err(_) => {
                    self.metrics.handshake_failed("timeout");
                    return;
                }
                Ok(Err(e)) => {
                    let reason = tls::handshake_failure_reason(&e);
                    tracing::debug!(%peer, reason, error = %e, "TLS handshake failed");
                    self.metrics.handshake_failed(reason);
                    return;
                }
                Ok(Ok(stream)) => stream,
            };
        self.metrics.handshake_ok();
        if self.shutdown.is_cancelled() {
            return;
        }
        let certificates = stream.get_ref().1.peer_certificates();
        let activity = Activity::new();
        // A tenant URI alone names no workload: such a certificate has no peer id.
        let peer_identity = peer_identity(certificates);
        let conn = Arc::new(ConnInfo {
            peer,
            peer_id: peer_identity.as_ref().map(|p| p.workload.to_string()),
            peer_identity,
            client_cert: certificates.is_some_and(|c| !c.is_empty()),
            activity: activity.clone(),
        });
        let inbound = self.inbound.clone();
        let service = service_fn(move |request| inbound.clone().handle(request, conn.clone()));
        let gauge = self.metrics.connections_open().clone();
        gauge.inc();
        let connection = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service);
        let limits = &self.limits;
        let closing = idle::close_signal(
            &activity,
            limits.idle_timeout,
            &self.shutdown,
            limits.drain_timeout,
        );
        let served = idle::serve_until_closed!(connection, closing);
        if let Err(e) = served {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
        gauge.dec();
    }
}
