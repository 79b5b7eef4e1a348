//! `PORTCULLIS_EXIT_WHEN_APP_EXITS`: in a run-to-completion pod (a Job) where the proxy
//! is a regular container, the pod only completes when every container has exited, so
//! the proxy must leave once the app has. The proxy probes `127.0.0.1:<app port>`:
//! once the app has accepted a connection, and then has stopped accepting for the
//! grace period, the proxy drains and exits 0. (Native sidecars need none of this: the
//! kubelet stops them.) A pod without an app port cannot be watched this way; the proxy
//! says so at start.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use tokio::{net::TcpStream, time::Instant};
use tokio_util::sync::CancellationToken;

/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

async fn accepting(address: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, TcpStream::connect(address)).await,
        Ok(Ok(_))
    )
}

/// Probes the app port every `interval`; cancels `shutdown` once the app, having
/// accepted before, has refused for `grace`. Returns when `shutdown` is cancelled.
pub async fn watch(
    app_port: u16,
    interval: Duration,
    grace: Duration,
    shutdown: CancellationToken,
) {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, app_port));
    let mut seen_up = false;
    let mut down_since: Option<Instant> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if accepting(address).await {
            if !seen_up {
                tracing::info!(
                    app_port,
                    "app is accepting; the proxy exits once it stops (PORTCULLIS_EXIT_WHEN_APP_EXITS)"
                );
            }
            seen_up = true;
            down_since = None;
            continue;
        }
        if !seen_up {
            continue;
        }
        let since = *down_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= grace {
            tracing::info!(
                app_port,
                grace_s = grace.as_secs_f64(),
                "the app stopped accepting; draining and exiting"
            );
            shutdown.cancel();
            return;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn exits_after_the_app_stops_but_not_before_it_started() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(watch(
            port,
            Duration::from_millis(20),
            Duration::from_millis(150),
            shutdown.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!shutdown.is_cancelled(), "the app is up");
        drop(listener);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the watcher ends after the grace period")
            .unwrap();
        assert!(shutdown.is_cancelled());
    }

    #[tokio::test]
    async fn an_app_that_never_listened_keeps_the_proxy() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(watch(
            port,
            Duration::from_millis(20),
            Duration::from_millis(50),
            shutdown.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!shutdown.is_cancelled());
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}
