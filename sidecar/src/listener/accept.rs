//! The one accept loop of the proxy's listeners (inbound, outbound, admin): at most
//! `max_connections` open, optionally a cap per source address, each connection in
//! its own task and `conn` span, and on shutdown a bounded wait for open connections
//! to finish. What happens on a connection is the caller's.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use ipnet::IpNet;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::per_source::SourceSlots;
use crate::metrics::Metrics;

/// The cap on open connections from one source address.
#[derive(Clone, Debug)]
pub struct PerSource {
    /// Open connections one address may hold.
    pub cap: usize,
    /// Sources without a cap: an ingress or load balancer speaks for many clients.
    pub exempt: Vec<IpNet>,
    /// The `reason` label counted when a source is over its cap.
    pub refusal: &'static str,
}

/// The bounds of one listener.
#[derive(Clone, Debug)]
pub struct Bounds {
    /// The listener's name in spans and logs.
    pub name: &'static str,
    /// Open connections at most; the next waits in the kernel's backlog.
    pub max_connections: usize,
    /// The per-source cap, if any.
    pub per_source: Option<PerSource>,
    /// How long open connections get to finish after shutdown.
    pub drain_timeout: Duration,
}

/// Accepts connections on `listener` until `shutdown` and runs `serve` on each, then
/// waits up to `bounds.drain_timeout` for them to finish.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    bounds: Bounds,
    metrics: Metrics,
    shutdown: CancellationToken,
    mut serve: F,
) where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(bounds.max_connections));
    let per_source = bounds
        .per_source
        .as_ref()
        .map(|p| (SourceSlots::new(p.cap), p));
    let name = bounds.name;
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
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let source = peer.ip().to_canonical();
        let source_slot = match &per_source {
            Some((slots, rule)) if !rule.exempt.iter().any(|net| net.contains(&source)) => {
                match slots.try_take(source) {
                    Some(slot) => Some(slot),
                    None => {
                        tracing::debug!(listener = name, %peer, "source holds its connection cap; closing");
                        metrics.connection_refused(rule.refusal);
                        continue;
                    }
                }
            }
            _ => None,
        };
        let _ = tcp.set_nodelay(true);
        let connection = serve(tcp, peer);
        let span = tracing::info_span!("conn", listener = name, %peer);
        tokio::spawn(
            async move {
                let _slots = (permit, source_slot);
                connection.await;
            }
            .instrument(span),
        );
    }
    drop(listener);
    if bounds.drain_timeout.is_zero() {
        return;
    }
    tracing::info!(
        listener = name,
        deadline_s = bounds.drain_timeout.as_secs(),
        "draining connections"
    );
    // Every connection holds a slot until it has closed; all slots back means drained.
    let all = u32::try_from(bounds.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(bounds.drain_timeout, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            "drain deadline passed with requests still in flight"
        );
    }
}
