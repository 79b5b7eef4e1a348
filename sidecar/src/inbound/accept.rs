//! Accepting inbound connections: a connection semaphore (max connections) and a cap
//! per source address, the TLS handshake under a deadline, the peer's SPIFFE ID, then
//! HTTP/1.1 or HTTP/2 by ALPN with header size, count and read limits, an idle
//! watchdog that only requests reset, and graceful drain.

use std::{net::SocketAddr, sync::Arc};

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::{Inbound, credentials::ClientCertificate};
use crate::{
    config::Limits,
    listener::{
        accept::{Bounds, PerSource, accept_loop},
        idle::{self, Activity},
        proxy_http::{Protocol, TlsHttpServers},
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
    let servers = Arc::new(TlsHttpServers::new(&limits));
    let bounds = Bounds {
        name: "inbound",
        max_connections: limits.max_connections,
        per_source: Some(PerSource {
            cap: limits.max_connections_per_source,
            exempt: inbound.settings.trusted_proxies.clone(),
            refusal: "per_source_limit",
        }),
        drain_timeout: limits.drain_timeout,
    };
    let serve = {
        let (metrics, shutdown) = (metrics.clone(), shutdown.clone());
        move |tcp, peer| {
            let connection = Connection {
                // The config in force now: a renewal later does not touch this connection.
                acceptor: TlsAcceptor::from(server_configs.current()),
                inbound: inbound.clone(),
                servers: servers.clone(),
                metrics: metrics.clone(),
                limits: limits.clone(),
                shutdown: shutdown.clone(),
            };
            connection.run(tcp, peer)
        }
    };
    accept_loop(listener, bounds, metrics, shutdown, serve).await;
}

impl ConnInfo {
    /// What the client's certificate gave the connection, for the credentials step.
    pub fn certificate(&self) -> ClientCertificate {
        match (self.client_cert, self.peer_id.is_some()) {
            (_, true) => ClientCertificate::Workload,
            (true, false) => ClientCertificate::NoWorkload,
            (false, false) => ClientCertificate::Absent,
        }
    }
}

struct Connection {
    acceptor: TlsAcceptor,
    inbound: Arc<Inbound>,
    servers: Arc<TlsHttpServers>,
    metrics: Metrics,
    limits: Limits,
    shutdown: CancellationToken,
}

impl Connection {
    async fn run(self, tcp: TcpStream, peer: SocketAddr) {
        // Boxed: the handshake's state (the TLS session inline) is larger than the
        // serving state, and the task would otherwise keep room for it for its life.
        let handshake = Box::pin(tokio::time::timeout(
            self.limits.handshake_timeout,
            self.acceptor.accept(tcp),
        ));
        let stream = match handshake.await {
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
        let alpn = stream.get_ref().1.alpn_protocol();
        let protocol = Protocol::from_alpn(alpn);
        let connection = self.servers.serve(TokioIo::new(stream), service, protocol);
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
