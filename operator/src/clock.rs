//! The operator's one time source, injected so tests can move time (expiry, rotation,
//! DEK schedules) without sleeping.

use std::sync::{Arc, Mutex};

use jiff::{SignedDuration, Timestamp};

/// Where "now" comes from.
#[derive(Clone, Debug, Default)]
pub enum Clock {
    /// The system clock.
    #[default]
    System,
    /// A clock that only moves when told to (tests).
    Manual(Arc<Mutex<Timestamp>>),
}

impl Clock {
    /// A manual clock starting at `at`.
    pub fn manual(at: Timestamp) -> Self {
        Self::Manual(Arc::new(Mutex::new(at)))
    }

    /// The current time.
    pub fn now(&self) -> Timestamp {
        match self {
            Self::System => Timestamp::now(),
            Self::Manual(at) => *at.lock().unwrap_or_else(|poisoned| poisoned.into_inner()),
        }
    }

    /// Moves a manual clock forward; does nothing to the system clock.
    pub fn advance(&self, by: SignedDuration) {
        if let Self::Manual(at) = self {
            let mut guard = at.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            *guard = guard.checked_add(by).unwrap_or(Timestamp::MAX);
        }
    }
}

// Timestamp arithmetic is the workspace's one definition.
pub use portcullis_api::clock::{add, until};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let start = Timestamp::from_second(1_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let clock = Clock::manual(start);
        assert_eq!(clock.now(), start);
        clock.advance(SignedDuration::from_secs(5));
        assert_eq!(clock.now().as_second(), 1_005);
        assert_eq!(until(clock.now(), start), std::time::Duration::ZERO);
        assert_eq!(until(start, clock.now()).as_secs(), 5);
        assert_eq!(
            add(start, std::time::Duration::from_secs(60)).as_second(),
            1_060
        );
    }
}
