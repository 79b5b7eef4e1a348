//! `PORTCULLIS_EXIT_WHEN_APP_EXITS`: in a run-to-completion pod (a Job) where the proxy
//! is a regular container, the pod only completes when every container has exited, so
//! the proxy must leave once the app has. Two signals, whichever comes first:
//!
//! - [`follow_operator`]: the operator, which sees the pod's container statuses, answers
//!   a held request once every app container has exited for good (contract:
//!   [`portcullis_api::app_exit`]). This works for apps without a port, the usual Job.
//! - [`watch`]: the proxy probes `127.0.0.1:<app port>`; once the app has accepted a
//!   connection, and then has stopped accepting for the grace period, it goes. This
//!   works while the operator is away.
//!
//! Either way the proxy drains and exits 0. (Native sidecars need none of this: the
//! kubelet stops them.)

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use http::StatusCode;
use portcullis_api::app_exit::{self, AppExitAnswer, HOLD_SECONDS};
use tokio::{net::TcpStream, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{identity::CertificateStore, operator_client};
use crate::{config::env::OperatorEndpoint, tls::ClientConfigSource};

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

/// Where the proxy asks the operator whether its app has exited.
#[derive(Clone)]
pub struct OperatorSignal {
    /// The policy server.
    pub endpoint: OperatorEndpoint,
    /// mTLS with the workload certificate.
    pub tls: ClientConfigSource,
    /// The workload certificate (its tenant is part of the path).
    pub store: CertificateStore,
    /// This pod's namespace.
    pub namespace: String,
    /// This pod's name.
    pub pod: String,
}

/// Asks the operator (held requests, one after the other) until it says the app has
/// exited for good, then cancels `shutdown`. Returns when `shutdown` is cancelled.
pub async fn follow_operator(signal: OperatorSignal, shutdown: CancellationToken) {
    const FIRST_RETRY: Duration = Duration::from_secs(1);
    const LAST_RETRY: Duration = Duration::from_secs(30);
    let mut retry = FIRST_RETRY;
    loop {
        let asked = async {
            let tenant = signal
                .store
                .load()
                .and_then(|c| c.tenant().map(|t| t.tenant().to_owned()));
            let Some(tenant) = tenant else {
                return Err("no workload certificate yet".to_owned());
            };
            let path = app_exit::path(&tenant, &signal.namespace, &signal.pod);
            let timeout = Duration::from_secs(HOLD_SECONDS + 15);
            match operator_client::get(&signal.endpoint, &signal.tls, &path, timeout).await {
                Ok((StatusCode::OK, body)) => serde_json::from_slice::<AppExitAnswer>(&body)
                    .map_err(|e| format!("unreadable answer: {e}")),
                Ok((status, _)) => Err(format!("the operator answered {status}")),
                Err(e) => Err(e.to_string()),
            }
        };
        let answer = tokio::select! {
            _ = shutdown.cancelled() => return,
            answer = asked => answer,
        };
        match answer {
            Ok(answer) if answer.apps_exited => {
                tracing::info!(
                    exit_codes = ?answer.exit_codes,
                    "the operator reports the app has exited for good; draining and exiting"
                );
                shutdown.cancel();
                return;
            }
            // Held for the whole hold time: ask again at once.
            Ok(_) => retry = FIRST_RETRY,
            Err(error) => {
                tracing::debug!(%error, retry_in_s = retry.as_secs(), "asking the operator whether the app exited");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(LAST_RETRY);
            }
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
