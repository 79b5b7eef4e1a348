//! CA settings: trust domain and the rotation schedule of each certificate kind.

use std::time::Duration;

use portcullis_api::spiffe::TrustDomain;

use super::CaError;

const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;

/// How the CA names and rotates certificates. Validated by [`CaSettings::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaSettings {
    /// SPIFFE trust domain of every issued ID.
    pub trust_domain: TrustDomain,
    /// Workloads renew their leaf this often (`identity.rotationPeriod`, 72 h).
    pub leaf_rotation_period: Duration,
    /// A leaf stays valid this long past its rotation period (24 h), so a workload that
    /// cannot reach the CA for a while keeps working.
    pub leaf_grace: Duration,
    /// A new issuing intermediate is made this often (30 d).
    pub intermediate_rotation_period: Duration,
    /// A new root is made this often (365 d).
    pub root_rotation_period: Duration,
    /// notBefore is set this far in the past to tolerate clock skew (1 min).
    pub backdate: Duration,
}

impl CaSettings {
    /// The defaults for `trust_domain`.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            leaf_rotation_period: Duration::from_secs(72 * HOUR),
            leaf_grace: Duration::from_secs(24 * HOUR),
            intermediate_rotation_period: Duration::from_secs(30 * DAY),
            root_rotation_period: Duration::from_secs(365 * DAY),
            backdate: Duration::from_secs(60),
        }
    }

    /// Checks the periods fit together.
    pub fn validate(&self) -> Result<(), CaError> {
        let positive = [
            ("leaf rotation period", self.leaf_rotation_period),
            (
                "intermediate rotation period",
                self.intermediate_rotation_period,
            ),
            ("root rotation period", self.root_rotation_period),
        ];
        for (what, d) in positive {
            if d.is_zero() {
                return Err(CaError::Settings(format!("{what} must be positive")));
            }
        }
        if self.root_rotation_period <= self.root_publish_lead() {
            return Err(CaError::Settings(format!(
                "root rotation period ({:?}) must exceed the leaf lifetime ({:?}): a new root is published one leaf lifetime before it signs",
                self.root_rotation_period,
                self.root_publish_lead()
            )));
        }
        Ok(())
    }

    /// How long a leaf is valid: rotation period + grace.
    pub fn leaf_lifetime(&self) -> Duration {
        self.leaf_rotation_period + self.leaf_grace
    }

    /// How long before it starts signing a new root is put in the trust bundle: one leaf
    /// lifetime, so every workload has renewed (and so fetched the new bundle) at least
    /// once before any peer presents a certificate under the new root.
    pub fn root_publish_lead(&self) -> Duration {
        self.leaf_lifetime()
    }

    /// How long an intermediate is valid: it must outlive the last leaf it signs, with a
    /// whole extra period of slack for a late rotation.
    pub fn intermediate_lifetime(&self) -> Duration {
        2 * self.intermediate_rotation_period + self.leaf_lifetime()
    }

    /// How long a root is valid: published early, active for a period, then needed until
    /// its last intermediate's leaves expire; doubled period as slack.
    pub fn root_lifetime(&self) -> Duration {
        self.root_publish_lead() + 2 * self.root_rotation_period + self.intermediate_lifetime()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn settings() -> CaSettings {
        CaSettings::new(TrustDomain::new("td").unwrap())
    }

    #[test]
    fn defaults_match_the_design() {
        let s = settings();
        assert_eq!(s.leaf_lifetime(), Duration::from_secs(96 * HOUR));
        assert_eq!(
            s.intermediate_rotation_period,
            Duration::from_secs(30 * DAY)
        );
        assert_eq!(s.root_rotation_period, Duration::from_secs(365 * DAY));
        s.validate().unwrap();
    }

    #[test]
    fn rejects_schedules_that_cannot_overlap() {
        let mut s = settings();
        s.root_rotation_period = Duration::from_secs(96 * HOUR);
        assert!(matches!(s.validate(), Err(CaError::Settings(_))));
        let mut s = settings();
        s.leaf_rotation_period = Duration::ZERO;
        assert!(matches!(s.validate(), Err(CaError::Settings(_))));
    }
}
