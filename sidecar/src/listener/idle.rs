//! When a connection is idle, and closing it then. Idle means no request in flight and
//! none started or finished for the idle timeout; bytes on the wire do not count, so
//! HTTP/2 PINGs (ours or the client's) cannot keep a connection, and its slot, alive.
//! Used by every listener (inbound, outbound, admin).

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use tokio_util::sync::CancellationToken;

use super::body::{BoxError, ProxyBody};

/// The last request start or end, and requests in flight, on one connection.
#[derive(Debug)]
pub struct Activity {
    origin: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

/// Decrements the in-flight count when a request's handling ends.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    /// A connection that has just opened (the idle clock starts now).
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        })
    }

    fn touch(&self) {
        let now = self.origin.elapsed().as_millis() as u64;
        self.last_ms.store(now, Ordering::Relaxed);
    }

    /// Marks a request as in flight until the guard drops.
    pub fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        InFlight(self.clone())
    }

    /// Resolves once the connection has had no request in flight, and none started or
    /// finished, for `idle`.
    pub async fn idle(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let quiet_for = self.origin.elapsed().saturating_sub(last);
            if quiet_for >= idle && self.in_flight.load(Ordering::Relaxed) == 0 {
                return;
            }
            tokio::time::sleep(
                idle.saturating_sub(quiet_for)
                    .max(Duration::from_millis(50)),
            )
            .await;
        }
    }
}

/// How long a connection told to close (idle, or draining after the last request)
/// gets to say goodbye (HTTP/2 GOAWAY and its PING round trip) before it is dropped.
pub const GOODBYE: Duration = Duration::from_secs(2);

/// Resolves when a connection should be told to close, with the time it gets to close
/// gracefully: after `idle` without a request ([`GOODBYE`]), or on `shutdown` (`drain`,
/// for its requests in flight). The caller then calls `graceful_shutdown` (HTTP/2:
/// GOAWAY; HTTP/1: close after the request in flight) and awaits the connection that
/// long; [`serve_until_closed!`] does both.
pub async fn close_signal(
    activity: &Activity,
    idle: Duration,
    shutdown: &CancellationToken,
    drain: Duration,
) -> Duration {
    tokio::select! {
        _ = activity.idle(idle) => {
            tracing::debug!("closing idle connection");
            GOODBYE
        }
        _ = shutdown.cancelled() => drain,
    }
}

/// Serves a hyper connection until it ends, or until `$closing` (a
/// [`close_signal`]) resolves: then closes it gracefully (HTTP/2: GOAWAY) and waits
/// the grace period it gave. A macro, not a function generic over
/// `GracefulConnection`: that trips rustc's higher-ranked `Send` check in
/// `tokio::spawn`.
macro_rules! serve_until_closed {
    ($connection:expr, $closing:expr) => {{
        let mut connection = std::pin::pin!($connection);
        tokio::select! {
            served = connection.as_mut() => served,
            grace = $closing => {
                connection.as_mut().graceful_shutdown();
                tokio::time::timeout(grace, connection).await.unwrap_or(Ok(()))
            }
        }
    }};
}
pub(crate) use serve_until_closed;

/// A response body that keeps its request in flight until it is fully sent, so a
/// long download or event stream is not taken for an idle connection.
pub struct InFlightBody {
    body: ProxyBody,
    _in_flight: InFlight,
}

impl InFlightBody {
    /// `body`, holding `in_flight` until it ends or is dropped.
    pub fn wrap(body: ProxyBody, in_flight: InFlight) -> ProxyBody {
        if body.is_end_stream() {
            return body;
        }
        BodyExt::boxed(Self {
            body,
            _in_flight: in_flight,
        })
    }
}

impl Body for InFlightBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn in_flight(activity: &Activity) -> usize {
        activity.in_flight.load(Ordering::Relaxed)
    }

    #[tokio::test]
    async fn a_response_body_keeps_its_request_in_flight_until_it_is_sent() {
        let activity = Activity::new();
        let body = InFlightBody::wrap(
            crate::listener::body::full("streamed"),
            activity.request_started(),
        );
        assert_eq!(
            in_flight(&activity),
            1,
            "the handler returned, the body did not"
        );
        let sent = body.collect().await.unwrap().to_bytes();
        assert_eq!(&sent[..], b"streamed");
        assert_eq!(in_flight(&activity), 0);
        // An empty body ends with its response head.
        let empty = InFlightBody::wrap(crate::listener::body::empty(), activity.request_started());
        assert_eq!(in_flight(&activity), 0);
        drop(empty);
    }
}
