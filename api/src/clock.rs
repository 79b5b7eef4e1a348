//! The one wall-clock source, injected wherever tests move time (certificate rotation,
//! key expiry, audit segment rotation and retention). Runtime-specific clocks (the
//! proxy's tokio-driven one) implement [`Clock`] in their own crates.

use std::fmt;
use std::sync::Mutex;

use jiff::{SignedDuration, Timestamp};

/// A source of the current time.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that only moves when told to (forwards or backwards), for tests.
#[derive(Debug)]
pub struct ManualClock(Mutex<Timestamp>);

impl ManualClock {
    /// A clock stopped at `start`.
    pub fn new(start: Timestamp) -> Self {
        Self(Mutex::new(start))
    }

    /// Moves the clock to `to`.
    pub fn set(&self, to: Timestamp) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = to;
    }

    /// Moves the clock by `by`: a `std::time::Duration` (forwards) or a
    /// [`SignedDuration`] (either way). Saturates at the ends of jiff's range.
    pub fn advance(&self, by: impl TryInto<SignedDuration>) {
        let mut now = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *now = match by.try_into() {
            Ok(by) => now.checked_add(by).unwrap_or(if by.is_negative() {
                Timestamp::MIN
            } else {
                Timestamp::MAX
            }),
            // Only a std duration beyond jiff's range fails to convert.
            Err(_) => Timestamp::MAX,
        };
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `ts + by`, saturating at the end of jiff's range.
pub fn add(ts: Timestamp, by: std::time::Duration) -> Timestamp {
    SignedDuration::try_from(by)
        .ok()
        .and_then(|d| ts.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

/// `ts - by`, saturating at the start of jiff's range.
pub fn sub(ts: Timestamp, by: std::time::Duration) -> Timestamp {
    SignedDuration::try_from(by)
        .ok()
        .and_then(|d| ts.checked_sub(d).ok())
        .unwrap_or(Timestamp::MIN)
}

/// How long from `from` until `to`; zero when `to` is not after `from`.
pub fn until(from: Timestamp, to: Timestamp) -> std::time::Duration {
    std::time::Duration::try_from(to.duration_since(from)).unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let start = Timestamp::from_second(1_000).unwrap();
        let clock = ManualClock::new(start);
        assert_eq!(clock.now(), start);
        clock.advance(Duration::from_secs(5));
        assert_eq!(clock.now().as_second(), 1_005);
        clock.advance(SignedDuration::from_secs(-10));
        assert_eq!(clock.now().as_second(), 995);
        clock.advance(Duration::MAX);
        assert_eq!(clock.now(), Timestamp::MAX);
    }

    #[test]
    fn arithmetic_saturates_and_clamps() {
        let t = Timestamp::from_second(10).unwrap();
        assert_eq!(until(t, Timestamp::from_second(5).unwrap()), Duration::ZERO);
        assert_eq!(
            until(t, Timestamp::from_second(12).unwrap()),
            Duration::from_secs(2)
        );
        assert_eq!(add(Timestamp::MAX, Duration::from_secs(1)), Timestamp::MAX);
        assert_eq!(sub(t, Duration::from_secs(3)).as_second(), 7);
    }
}
