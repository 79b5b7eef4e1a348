//! The proxy's tokio-driven wall clock. The [`Clock`] trait and the system and manual
//! clocks are the workspace's one definition in `portcullis_api::clock`.

use jiff::Timestamp;
use portcullis_api::clock::{Clock, add};

/// A wall clock driven by tokio's clock: starts at the system time and advances with
/// `tokio::time`, so paused-time tests (`tokio::time::advance`) move it too.
#[derive(Debug)]
pub struct TokioClock {
    origin: Timestamp,
    started: tokio::time::Instant,
}

impl TokioClock {
    /// A clock reading the system time now and following tokio's clock from here.
    pub fn new() -> Self {
        Self {
            origin: Timestamp::now(),
            started: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        add(self.origin, self.started.elapsed())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let clock = TokioClock::new();
        let before = clock.now();
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(clock.now().duration_since(before).as_secs(), 3600);
    }
}
