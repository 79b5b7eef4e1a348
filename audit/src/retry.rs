//! Exponential backoff for sink retries.

use std::time::Duration;

/// Backoff between retries: `initial`, doubled after each failure, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// First delay.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
        }
    }
}

/// The running state of one backoff sequence.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: RetryPolicy,
    next: Duration,
}

impl Backoff {
    /// Starts at `policy.initial`.
    pub fn new(policy: RetryPolicy) -> Self {
        Backoff {
            policy,
            next: policy.initial,
        }
    }

    /// The delay to wait now; the following one is doubled (up to the cap).
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.policy.max);
        delay
    }

    /// The longest delay (used after permanent errors).
    pub fn max_delay(&self) -> Duration {
        self.policy.max
    }

    /// Back to the first delay after a success.
    pub fn reset(&mut self) {
        self.next = self.policy.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_cap_and_resets() {
        let mut b = Backoff::new(RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(350),
        });
        let delays: Vec<u128> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 100);
    }
}
