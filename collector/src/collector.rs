//! The collector: checks each batch on arrival, makes it durable, then acknowledges it;
//! rebuilds what it knows of every chain from the store after a restart; prunes days
//! past a tenant's retention.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};

use jiff::civil::Date;
use jiff::tz::TimeZone;
use portcullis_api::audit_ship::{ShipAck, ShipRefusal};
use portcullis_api::clock::Clock;
use portcullis_audit::checkpoint::CheckpointSigner;
use portcullis_audit::entry::Entry;
use portcullis_audit::seal::Seal;
use serde_json::Value;

use crate::arrival::{Arrivals, Fresh, Sender};
use crate::forward::AppendSignal;
use crate::sealing::Sealing;
use crate::store::{DayOffset, DayPiece, Position, RecordStore, StoreError};

/// Longest retention a tenant may set: seven years.
pub const MAX_RETENTION_DAYS: u32 = 2555;

/// Why a batch was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The batch does not fit what the collector holds; nothing was stored.
    #[error("{}", .0.error)]
    Refused(ShipRefusal),
    /// The store failed; nothing was acknowledged, so the proxy resends.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why tenant logs were not sealed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The seal could not be signed (the key is unusable).
    #[error("signing a seal: {0}")]
    Sign(#[from] portcullis_audit::Error),
    /// The seal could not be stored; the next round seals the same heads again.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A stored batch.
#[derive(Debug)]
pub struct Ingested {
    /// The answer to the proxy.
    pub ack: ShipAck,
    /// Request records stored (the other stored entries are checkpoints).
    pub records: u64,
}

/// Tenant logs, checked on arrival.
#[derive(Debug)]
pub struct Collector<S> {
    store: S,
    arrivals: Arrivals,
    /// Tenants whose records could not be read back yet (their keys were not at
    /// hand): recovered before their next batch is taken.
    unrecovered: BTreeSet<String>,
    sealing: Sealing,
    clock: Arc<dyn Clock>,
    appended: AppendSignal,
}

/// What a reader finds from a place in a tenant's log on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Stored entries, one JSON line each, and where the reader stands after them.
    Lines {
        /// The entries.
        lines: Vec<String>,
        /// The place after them.
        next: Position,
    },
    /// Nothing stored past the place yet.
    Nothing,
}

impl<S: RecordStore> Collector<S> {
    /// The collector over `store`, knowing every chain the store holds; days are
    /// `clock`'s, in UTC. A tenant whose days cannot be opened yet (its key is not at
    /// hand) is recovered before its next batch is taken.
    pub fn open(store: S, clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        let mut collector = Self {
            store,
            arrivals: Arrivals::default(),
            unrecovered: BTreeSet::new(),
            sealing: Sealing::default(),
            clock,
            appended: AppendSignal::default(),
        };
        for tenant in collector.store.tenants()? {
            // Chain owners are readable without a key: no other tenant can claim them.
            for (chain_id, owner) in collector.store.chains(&tenant)? {
                collector.arrivals.restore_chain(&chain_id, &tenant, &owner);
            }
            match collector.recover(&tenant) {
                Ok(()) => {}
                Err(StoreError::NoKey { .. }) => {
                    tracing::info!(%tenant, "tenant log read back once its data-encryption key is at hand");
                    collector.unrecovered.insert(tenant);
                }
                Err(e) => return Err(e),
            }
        }
        tracing::info!(
            chains = collector.arrivals.len(),
            waiting = collector.unrecovered.len(),
            "collector opened"
        );
        Ok(collector)
    }

    /// Reads `tenant`'s stored records and seals back into what the collector knows;
    /// on failure the tenant's heads are as if nothing was read.
    fn recover(&mut self, tenant: &str) -> Result<(), StoreError> {
        let result = self.replay(tenant);
        if result.is_err() {
            self.arrivals.reset_tenant(tenant);
            self.sealing.forget(tenant);
        }
        result
    }

    fn replay(&mut self, tenant: &str) -> Result<(), StoreError> {
        for day in self.store.days(tenant)? {
            for line in self.store.read_day(tenant, day)? {
                let Ok(value) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if Seal::is_seal_value(&value) {
                    self.sealing.restore(&line, value);
                } else if !Entry::is_checkpoint_value(&value) {
                    self.arrivals.restore_record(&value);
                }
            }
        }
        Ok(())
    }

    /// Recovers `tenant` if it still waits for its key.
    fn ensure_recovered(&mut self, tenant: &str) -> Result<(), StoreError> {
        if self.unrecovered.contains(tenant) {
            self.recover(tenant)?;
            self.unrecovered.remove(tenant);
            tracing::info!(%tenant, "tenant log read back");
        }
        Ok(())
    }

    fn today(&self) -> Date {
        self.clock.now().to_zoned(TimeZone::UTC).date()
    }

    /// The start of yesterday's part of every log (UTC): where a new reader begins, so
    /// it misses nothing of a log that began moments before it, whatever the hour.
    pub fn start_of_yesterday(&self) -> Position {
        let today = self.today();
        Position::start_of(today.yesterday().unwrap_or(today))
    }

    /// Told of every append, per tenant.
    pub fn append_signal(&self) -> AppendSignal {
        self.appended.clone()
    }

    /// Checks `body` (NDJSON) from `sender`, stores what is new, and acknowledges it.
    pub fn ingest(&mut self, sender: Sender<'_>, body: &str) -> Result<ShipAck, IngestError> {
        self.ingest_counted(sender, body)
            .map(|ingested| ingested.ack)
    }

    /// [`Collector::ingest`], also saying how many request records were stored.
    pub fn ingest_counted(
        &mut self,
        sender: Sender<'_>,
        body: &str,
    ) -> Result<Ingested, IngestError> {
        self.ensure_recovered(sender.tenant)?;
        let batch = self
            .arrivals
            .check(sender, body)
            .map_err(IngestError::Refused)?;
        if !batch.fresh.is_empty() || !batch.new_chains.is_empty() {
            let day = self.today();
            self.store
                .append(sender.tenant, day, &batch.new_chains, &batch.fresh)?;
        }
        let ack = ShipAck {
            durable_through: batch.durable_through(),
            stored: batch.fresh.len() as u64,
            duplicates: batch.duplicates,
        };
        let records = batch.records;
        let stored = !batch.fresh.is_empty();
        self.arrivals.commit(batch);
        if stored {
            self.appended.appended(sender.tenant);
            self.sealing.grew(sender.tenant, records);
        }
        Ok(Ingested { ack, records })
    }

    /// Seals every tenant log with records the last seal did not name, signed by
    /// `signer`; returns the tenants sealed, with their new seal's number. Each seal is
    /// durable in its log before the next names it as `prev`.
    pub fn seal(&mut self, signer: &CheckpointSigner) -> Result<Vec<(String, u64)>, SealError> {
        self.seal_grown(signer, 0)
    }

    /// [`Collector::seal`], only for the tenants that stored at least `records` request
    /// records since their last seal (0: every tenant log that grew at all): a busy log
    /// is sealed every so many records, not only every so many seconds.
    pub fn seal_grown(
        &mut self,
        signer: &CheckpointSigner,
        records: u64,
    ) -> Result<Vec<(String, u64)>, SealError> {
        let mut sealed = Vec::new();
        for (tenant, heads) in self.sealing.due(&self.arrivals) {
            if self.sealing.unsealed(&tenant) < records {
                continue;
            }
            let seal = Seal::sign(
                signer,
                &tenant,
                self.sealing.last(&tenant),
                heads,
                self.clock.now(),
            )?;
            let line = serde_json::to_string(&seal)
                .map_err(|e| portcullis_audit::Error::Serialize(e.to_string()))?;
            let digest = seal.digest()?;
            let day = self.today();
            // A seal belongs to no chain.
            let fresh = Fresh {
                chain_id: String::new(),
                line,
            };
            self.store
                .append(&tenant, day, &[], std::slice::from_ref(&fresh))?;
            self.sealing.adopt(&seal, digest, fresh.line);
            sealed.push((tenant, seal.number));
        }
        Ok(sealed)
    }

    /// `tenant`'s newest seal as stored, if it has one.
    pub fn last_seal(&self, tenant: &str) -> Option<String> {
        self.sealing.last_line(tenant).map(str::to_owned)
    }

    /// Removes `tenant`'s days older than `retention_days` (capped at
    /// [`MAX_RETENTION_DAYS`]); returns how many went. A chain whose start was pruned
    /// verifies with pruned starts allowed.
    pub fn prune(&mut self, tenant: &str, retention_days: u32) -> Result<usize, StoreError> {
        let keep = i32::try_from(retention_days.clamp(1, MAX_RETENTION_DAYS)).unwrap_or(2555);
        let before = self
            .today()
            .checked_sub(jiff::Span::new().days(keep - 1))
            .unwrap_or(Date::MIN);
        self.store.prune(tenant, before)
    }

    /// The tenants with a log.
    pub fn tenants(&self) -> Result<Vec<String>, StoreError> {
        self.store.tenants()
    }

    /// Every entry of `tenant`'s log, oldest first, one JSON line each.
    pub fn entries(&self, tenant: &str) -> Result<Vec<String>, StoreError> {
        let mut lines = Vec::new();
        for day in self.store.days(tenant)? {
            lines.extend(self.store.read_day(tenant, day)?);
        }
        Ok(lines)
    }

    /// The days `tenant`'s log holds, oldest first.
    pub fn days(&self, tenant: &str) -> Result<Vec<Date>, StoreError> {
        self.store.days(tenant)
    }

    /// A piece of `tenant`'s entries of `day` from `from` on (see
    /// [`RecordStore::read_day_piece`]).
    pub fn read_day_piece(
        &self,
        tenant: &str,
        day: Date,
        from: DayOffset,
        max_bytes: usize,
    ) -> Result<DayPiece, StoreError> {
        self.store.read_day_piece(tenant, day, from, max_bytes)
    }

    /// About `max_bytes` of `tenant`'s entries from `at` on, crossing into later days
    /// when `at`'s day has no more; a day pruned from under a reader is skipped.
    pub fn read_from(
        &self,
        tenant: &str,
        at: Position,
        max_bytes: usize,
    ) -> Result<Found, StoreError> {
        let days = self.store.days(tenant)?;
        let first = at.day;
        let mut at = at;
        for day in days.into_iter().filter(|day| *day >= first) {
            if day != at.day {
                at = Position::start_of(day);
            }
            let piece = self.store.read_day_piece(tenant, day, at.at, max_bytes)?;
            if !piece.lines.is_empty() {
                return Ok(Found::Lines {
                    lines: piece.lines,
                    next: Position {
                        day,
                        at: piece.next,
                    },
                });
            }
        }
        Ok(Found::Nothing)
    }

    /// Where the reader `name` stands in `tenant`'s log.
    pub fn cursor(&self, tenant: &str, name: &str) -> Result<Option<Position>, StoreError> {
        self.store.cursor(tenant, name)
    }

    /// Saves (or forgets, with `None`) where the reader `name` stands in `tenant`'s log.
    pub fn save_cursor(
        &self,
        tenant: &str,
        name: &str,
        position: Option<Position>,
    ) -> Result<(), StoreError> {
        self.store.save_cursor(tenant, name, position)
    }

    /// What the collector knows of each chain.
    pub fn arrivals(&self) -> &Arrivals {
        &self.arrivals
    }
}

/// Runs `work` on the shared collector on a blocking thread (store work ends in file
/// I/O and fsync), holding its lock only for that. A task that dies is a store failure.
pub(crate) async fn blocking<S, T, E>(
    collector: &Arc<Mutex<Collector<S>>>,
    work: impl FnOnce(&mut Collector<S>) -> Result<T, E> + Send + 'static,
) -> Result<T, E>
where
    S: RecordStore + Send + 'static,
    T: Send + 'static,
    E: From<StoreError> + Send + 'static,
{
    let collector = collector.clone();
    tokio::task::spawn_blocking(move || {
        let mut collector = collector.lock().unwrap_or_else(PoisonError::into_inner);
        work(&mut collector)
    })
    .await
    .map_err(|e| {
        E::from(StoreError::Io {
            action: "working on",
            path: "the tenant logs".into(),
            source: std::io::Error::other(e.to_string()),
        })
    })?
}
