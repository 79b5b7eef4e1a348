//! Shutdown: SIGTERM or ctrl-c cancels one token; listeners stop accepting and give
//! in-flight requests until the drain deadline (see [`crate::inbound::accept::serve`]).

use tokio_util::sync::CancellationToken;

/// Cancels `token` on SIGTERM or ctrl-c.
pub async fn on_signal(token: CancellationToken) {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("interrupted; draining"),
        _ = term => tracing::info!("SIGTERM; draining"),
        _ = token.cancelled() => return,
    }
    token.cancel();
}
