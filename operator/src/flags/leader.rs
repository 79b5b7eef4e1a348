//! Leader election: the controllers and CA rotation run only while holding the Lease.

use clap::Args;
use portcullis_crds::DurationSpec;
use portcullis_operator::run::{self, OperatorSettings};

use super::values::positive_duration;

/// The Lease and its timings.
#[derive(Args, Debug)]
#[command(next_help_heading = "Leader election")]
pub(super) struct LeaderFlags {
    /// Run the controllers only while holding the Lease (--leader-election=false to disable).
    #[arg(long, env = "PORTCULLIS_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub(super) leader_election: bool,
    /// Name of the leader-election Lease.
    #[arg(long, env = "PORTCULLIS_LEASE_NAME", default_value = run::LEASE_NAME)]
    pub(super) lease_name: String,
    /// How long a Lease holds without renewal.
    #[arg(long, env = "PORTCULLIS_LEASE_DURATION", default_value = "15s", value_parser = positive_duration)]
    pub(super) lease_duration: DurationSpec,
    /// The leader gives up leading when it cannot renew within this.
    #[arg(long, env = "PORTCULLIS_RENEW_DEADLINE", default_value = "10s", value_parser = positive_duration)]
    pub(super) renew_deadline: DurationSpec,
    /// How often candidates retry and the leader renews.
    #[arg(long, env = "PORTCULLIS_RETRY_PERIOD", default_value = "2s", value_parser = positive_duration)]
    pub(super) retry_period: DurationSpec,
    /// This replica's identity in the Lease (default: pod name plus a random suffix).
    #[arg(long, env = "POD_NAME")]
    pub(super) identity: Option<String>,
}

impl LeaderFlags {
    /// This replica's identity in the Lease: the pod name (or a default) plus a random
    /// suffix, so a restarted pod never resumes its predecessor's lease.
    pub(super) fn identity(&self) -> String {
        match &self.identity {
            Some(pod) => format!("{pod}-{:08x}", rand::random::<u32>()),
            None => run::default_identity(),
        }
    }

    pub(super) fn apply(&self, settings: &mut OperatorSettings) -> anyhow::Result<()> {
        settings.leader_election = self.leader_election;
        settings.lease.name.clone_from(&self.lease_name);
        settings.lease.lease_duration = self.lease_duration.get();
        settings.lease.renew_deadline = self.renew_deadline.get();
        settings.lease.retry_period = self.retry_period.get();
        if settings.lease.renew_deadline >= settings.lease.lease_duration {
            anyhow::bail!(
                "--renew-deadline (PORTCULLIS_RENEW_DEADLINE) must be shorter than --lease-duration (PORTCULLIS_LEASE_DURATION)"
            );
        }
        if settings.lease.retry_period >= settings.lease.renew_deadline {
            anyhow::bail!(
                "--retry-period (PORTCULLIS_RETRY_PERIOD) must be shorter than --renew-deadline (PORTCULLIS_RENEW_DEADLINE)"
            );
        }
        Ok(())
    }
}
