//! Keep-alive HTTP/1.1 connections to the app, without a general-purpose pool: one
//! app, one address, so the idle connections are a stack. A request pops the most
//! recently used one (or opens one), and its response body pushes it back once the app
//! has sent all of it; each connection's I/O runs in its own task. A body dropped
//! before its end closes its connection (the rest of the response is still on the
//! wire). Connections idle longer than the keep-idle time are closed as the stack is
//! used, and at most [`MAX_IDLE`] are kept.
//!
//! Measured against hyper-util's pooled client (bench/RESULTS.md, #21): 7–9% less CPU
//! per request. Connections owned by each inbound connection and driven from its task
//! bought nothing more and held an app connection, ~19 KiB, per open client
//! connection.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::{body::Incoming, client::conn::http1::SendRequest};

use crate::listener::body::{BoxError, ProxyBody};

/// Idle connections kept; more (after a burst) close when their exchange ends.
const MAX_IDLE: usize = 256;

/// One open connection to the app.
pub type AppConnection = SendRequest<ProxyBody>;

/// The idle connections to the app, most recently used last.
pub struct AppConnections {
    idle: Mutex<VecDeque<(AppConnection, Instant)>>,
    keep_idle: Duration,
}

impl std::fmt::Debug for AppConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppConnections")
            .field("idle", &self.idle().len())
            .field("keep_idle", &self.keep_idle)
            .finish()
    }
}

impl AppConnections {
    /// No connections yet; idle ones are kept for `keep_idle`.
    pub fn new(keep_idle: Duration) -> Self {
        Self {
            idle: Mutex::new(VecDeque::new()),
            keep_idle,
        }
    }

    fn idle(&self) -> MutexGuard<'_, VecDeque<(AppConnection, Instant)>> {
        // A panic while holding the lock leaves only a list of connections behind.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The most recently used idle connection that is still open and fresh.
    pub fn take(&self) -> Option<AppConnection> {
        let mut idle = self.idle();
        while let Some((connection, since)) = idle.pop_back() {
            if !connection.is_closed() && since.elapsed() < self.keep_idle {
                return Some(connection);
            }
        }
        None
    }

    /// A connection whose exchange ended cleanly, kept for the next request; the
    /// oldest idle one goes if it has been idle too long.
    fn give_back(&self, connection: AppConnection) {
        let now = Instant::now();
        let mut idle = self.idle();
        if idle
            .front()
            .is_some_and(|(_, since)| now.duration_since(*since) >= self.keep_idle)
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE && !connection.is_closed() {
            idle.push_back((connection, now));
        }
    }
}

/// The app's response body: gives its connection back when the app has sent all of
/// it, closes the connection otherwise.
pub struct Returning {
    body: Incoming,
    home: Option<(AppConnection, Arc<AppConnections>)>,
    ended: bool,
}

impl Returning {
    /// `body`, returning `connection` to `home` at its end.
    pub fn wrap(body: Incoming, connection: AppConnection, home: Arc<AppConnections>) -> Self {
        Self {
            body,
            home: Some((connection, home)),
            ended: false,
        }
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        if let Some((connection, home)) = self.home.take()
            && (self.ended || self.body.is_end_stream())
        {
            home.give_back(connection);
        }
    }
}

impl Body for Returning {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.ended = true,
            // A broken body leaves the connection in an unknown state: it closes.
            Poll::Ready(Some(Err(_))) => self.home = None,
            _ => {}
        }
        polled.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
