//! Leader election through a `coordination.k8s.io/v1` Lease (kube 5 ships no lock).
//!
//! A candidate takes the Lease when it is free (no holder, or the holder's
//! `renewTime + leaseDurationSeconds` has passed) and renews it every `retry_period`.
//! Every write is a replace carrying the `resourceVersion` it read, so two candidates
//! racing for the same Lease cannot both win: the loser gets 409 Conflict. A leader that
//! cannot renew within `renew_deadline` stops its work before its Lease can expire, and
//! one shutting down gracefully releases the Lease so the next replica takes over at
//! once instead of waiting out the lease duration.

use std::future::Future;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::clock;
use crate::error::{Result, is_api_code};

/// Timing and identity of one candidate.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// Lease name (`portcullis-operator`).
    pub name: String,
    /// Namespace of the Lease (the operator's).
    pub namespace: String,
    /// This replica's identity (pod name plus a random suffix).
    pub identity: String,
    /// How long a Lease stays valid without renewal.
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long steps down (shorter than the duration).
    pub renew_deadline: Duration,
    /// How often candidates try and leaders renew.
    pub retry_period: Duration,
}

impl LeaseSettings {
    /// The defaults client-go uses: 15 s lease, 10 s deadline, 2 s retry.
    pub fn new(
        name: impl Into<String>,
        namespace: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What a candidate may do with the Lease it read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseDecision {
    /// We hold it: renew.
    Renew,
    /// It is free or expired: take it over.
    Acquire,
    /// Someone else holds it until the given time.
    HeldBy {
        /// The holder.
        holder: String,
        /// When their hold runs out unless renewed.
        until: Timestamp,
    },
}

/// Decides from a Lease's spec (pure; the heart of the election).
pub fn decide(spec: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> LeaseDecision {
    let Some(spec) = spec else {
        return LeaseDecision::Acquire;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder.is_empty() {
        return LeaseDecision::Acquire;
    }
    if holder == identity {
        return LeaseDecision::Renew;
    }
    let duration =
        Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0));
    let renewed = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map_or(Timestamp::UNIX_EPOCH, |t| t.0);
    let until = clock::add(renewed, duration);
    if now >= until {
        LeaseDecision::Acquire
    } else {
        LeaseDecision::HeldBy {
            holder: holder.to_owned(),
            until,
        }
    }
}

/// One candidate for the Lease.
#[derive(Clone)]
pub struct LeaderElector {
    api: Api<Lease>,
    settings: LeaseSettings,
}

impl std::fmt::Debug for LeaderElector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderElector")
            .field("settings", &self.settings)
            .finish()
    }
}

impl LeaderElector {
    /// A candidate using `client`.
    pub fn new(client: kube::Client, settings: LeaseSettings) -> Self {
        Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
        }
    }

    /// The identity this candidate writes into the Lease.
    pub fn identity(&self) -> &str {
        &self.settings.identity
    }

    fn lease_seconds(&self) -> i32 {
        i32::try_from(self.settings.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// One round: takes or renews the Lease. `Ok(true)` when we hold it afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool> {
        let now = Timestamp::now();
        let existing = self.api.get_opt(&self.settings.name).await?;
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.settings.name.clone()),
                    namespace: Some(self.settings.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.settings.identity.clone()),
                    lease_duration_seconds: Some(self.lease_seconds()),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_api_code(&e, 409) => Ok(false),
                Err(e) => Err(e.into()),
            };
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        match decide(Some(&spec), &self.settings.identity, now) {
            LeaseDecision::HeldBy { .. } => return Ok(false),
            LeaseDecision::Renew => {
                spec.renew_time = Some(MicroTime(now));
                spec.lease_duration_seconds = Some(self.lease_seconds());
            }
            LeaseDecision::Acquire => {
                spec.holder_identity = Some(self.settings.identity.clone());
                spec.lease_duration_seconds = Some(self.lease_seconds());
                spec.acquire_time = Some(MicroTime(now));
                spec.renew_time = Some(MicroTime(now));
                spec.lease_transitions =
                    Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
            }
        }
        lease.spec = Some(spec);
        // `lease.metadata.resourceVersion` is what we read: a concurrent writer makes this 409.
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_api_code(&e, 409) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Gives the Lease up if we hold it, so another replica can take over at once.
    pub async fn release(&self) -> Result<()> {
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        lease.spec = Some(spec);
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_api_code(&e, 409) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Campaigns until `shutdown`; each time this replica wins, runs `lead` with a token
    /// that is cancelled when leadership is lost or on shutdown, and waits for it to
    /// finish before campaigning again (or releasing the Lease on shutdown).
    pub async fn run<F, Fut>(
        &self,
        shutdown: CancellationToken,
        mut lead: F,
        on_change: impl Fn(bool),
    ) where
        F: FnMut(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let period = self.settings.retry_period;
        'campaign: while !shutdown.is_cancelled() {
            match self.try_acquire_or_renew().await {
                Ok(true) => {}
                Ok(false) => {
                    if sleep_or_cancel(period, &shutdown).await {
                        break 'campaign;
                    }
                    continue;
                }
                Err(e) => {
                    warn!(error = %e, lease = %self.settings.name, "leader election: cannot reach the Lease");
                    if sleep_or_cancel(period, &shutdown).await {
                        break 'campaign;
                    }
                    continue;
                }
            }
            info!(identity = %self.settings.identity, lease = %self.settings.name, "became leader");
            on_change(true);
            let term = shutdown.child_token();
            let mut work = tokio::spawn(lead(term.clone()));
            let mut last_renewal = tokio::time::Instant::now();
            let mut finished = false;
            loop {
                tokio::select! {
                    _ = &mut work => {
                        // The work ended by itself; give others a chance.
                        finished = true;
                        break;
                    }
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(period) => {
                        match self.try_acquire_or_renew().await {
                            Ok(true) => last_renewal = tokio::time::Instant::now(),
                            Ok(false) => {
                                warn!(identity = %self.settings.identity, "leadership lost to another replica");
                                break;
                            }
                            Err(e) => {
                                warn!(error = %e, "leader election: renewal failed");
                                if last_renewal.elapsed() >= self.settings.renew_deadline {
                                    warn!("renew deadline passed: stepping down");
                                    break;
                                }
                            }
                        }
                    }
                }
            }
            term.cancel();
            if !finished {
                let _ = work.await;
            }
            on_change(false);
            info!(identity = %self.settings.identity, "stopped leading");
        }
        if let Err(e) = self.release().await {
            warn!(error = %e, "could not release the leader Lease; the next leader waits for it to expire");
        }
    }
}

/// Sleeps `d`; `true` when `shutdown` fired first.
async fn sleep_or_cancel(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = shutdown.cancelled() => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn held(holder: Option<&str>, renewed: i64, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            renew_time: Some(MicroTime(at(renewed))),
            lease_duration_seconds: Some(secs),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn missing_or_released_lease_is_acquired() {
        assert_eq!(decide(None, "a", at(0)), LeaseDecision::Acquire);
        assert_eq!(
            decide(Some(&held(None, 0, 15)), "a", at(0)),
            LeaseDecision::Acquire
        );
        assert_eq!(
            decide(Some(&held(Some(""), 0, 15)), "a", at(0)),
            LeaseDecision::Acquire
        );
    }

    #[test]
    fn own_lease_is_renewed_even_when_stale() {
        assert_eq!(
            decide(Some(&held(Some("a"), 0, 15)), "a", at(100)),
            LeaseDecision::Renew
        );
    }

    #[test]
    fn foreign_lease_is_respected_until_renew_time_plus_duration() {
        let spec = held(Some("b"), 0, 15);
        assert_eq!(
            decide(Some(&spec), "a", at(14)),
            LeaseDecision::HeldBy {
                holder: "b".into(),
                until: at(15)
            }
        );
        assert_eq!(decide(Some(&spec), "a", at(15)), LeaseDecision::Acquire);
        // A released lease has duration 1 s: taken over almost at once.
        let released = held(None, 0, 1);
        assert_eq!(decide(Some(&released), "a", at(0)), LeaseDecision::Acquire);
    }
}
