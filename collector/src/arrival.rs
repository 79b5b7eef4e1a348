//! Verification on arrival: a shipped batch either continues each of its chains exactly
//! (or repeats what the collector already holds) or is refused whole.
//!
//! Per chain the collector keeps its tenant, the workload that started it, the next
//! `seq`, the last hash and the hashes of the last [`RECENT`] records (to tell a resend
//! from a rewrite). A batch is checked against copies of those heads, so a refusal
//! changes nothing; [`Arrivals::commit`] adopts the new heads once the store has made the
//! batch durable.

use std::collections::{BTreeMap, HashMap, VecDeque};

use portcullis_api::audit_ship::{ShipRefusal, ShipRefusalReason};
use portcullis_audit::canonical::{GENESIS_HASH, record_hash_of_value};
use portcullis_audit::checkpoint::verify_checkpoint_value;
use portcullis_audit::entry::Entry;
use serde_json::Value;

/// Hashes remembered per chain to recognise a resend. A proxy resends at most its spool,
/// which acknowledgements keep far below this.
pub const RECENT: usize = 8192;

/// Who sent a batch, from its client certificate.
#[derive(Clone, Copy, Debug)]
pub struct Sender<'a> {
    /// The tenant the workload belongs to.
    pub tenant: &'a str,
    /// The workload's SPIFFE ID.
    pub workload: &'a str,
}

/// What the collector knows of one chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainHead {
    /// The tenant whose log holds it.
    pub tenant: String,
    /// The workload that started it; only it may continue it.
    pub owner: String,
    /// The `seq` expected next.
    pub next_seq: u64,
    /// The hash of record `next_seq - 1` (the genesis hash before the first).
    pub last_hash: String,
    recent: VecDeque<(u64, String)>,
}

impl ChainHead {
    /// A chain no record of which has arrived yet.
    pub fn new(tenant: &str, owner: &str) -> Self {
        Self {
            tenant: tenant.to_owned(),
            owner: owner.to_owned(),
            next_seq: 0,
            last_hash: GENESIS_HASH.to_owned(),
            recent: VecDeque::new(),
        }
    }

    fn push(&mut self, seq: u64, hash: &str) {
        self.next_seq = seq + 1;
        hash.clone_into(&mut self.last_hash);
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back((seq, hash.to_owned()));
    }

    /// The remembered hash of record `seq`, if it is recent.
    fn hash_of(&self, seq: u64) -> Option<&str> {
        let first = self.recent.front()?.0;
        let index = usize::try_from(seq.checked_sub(first)?).ok()?;
        self.recent
            .get(index)
            .filter(|(s, _)| *s == seq)
            .map(|(_, h)| h.as_str())
    }
}

/// One entry the batch adds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fresh {
    /// Its chain.
    pub chain_id: String,
    /// The entry as one JSON line, as it arrived.
    pub line: String,
}

/// A batch that passed: what to store, and the heads to adopt once it is stored.
#[derive(Debug)]
pub struct CheckedBatch {
    /// Entries to store, in arrival order.
    pub fresh: Vec<Fresh>,
    /// Entries the collector already held.
    pub duplicates: u64,
    /// Request records among `fresh` (the rest are checkpoints).
    pub records: u64,
    /// Chains this batch starts, with their owner (stored with the entries).
    pub new_chains: Vec<(String, String)>,
    heads: HashMap<String, ChainHead>,
}

impl CheckedBatch {
    /// Per chain of the batch, the highest `seq` held once it is stored.
    pub fn durable_through(&self) -> BTreeMap<String, u64> {
        self.heads
            .iter()
            .filter_map(|(chain, head)| Some((chain.clone(), head.next_seq.checked_sub(1)?)))
            .collect()
    }
}

/// The heads of every chain the collector holds.
#[derive(Debug, Default)]
pub struct Arrivals {
    chains: HashMap<String, ChainHead>,
}

fn refusal(
    reason: ShipRefusalReason,
    error: String,
    chain_id: Option<&str>,
    expected_seq: Option<u64>,
) -> ShipRefusal {
    ShipRefusal {
        error,
        reason,
        chain_id: chain_id.map(str::to_owned),
        expected_seq,
    }
}

impl Arrivals {
    /// The head of `chain_id`, if the collector holds it.
    pub fn head(&self, chain_id: &str) -> Option<&ChainHead> {
        self.chains.get(chain_id)
    }

    /// Every chain held, with its head.
    pub fn chains(&self) -> impl Iterator<Item = (&str, &ChainHead)> {
        self.chains.iter().map(|(id, head)| (id.as_str(), head))
    }

    /// Chains held.
    pub fn len(&self) -> usize {
        self.chains.len()
    }

    /// Whether no chain is held.
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }

    /// Adopts a stored chain start (recovery after a restart).
    pub fn restore_chain(&mut self, chain_id: &str, tenant: &str, owner: &str) {
        self.chains
            .entry(chain_id.to_owned())
            .or_insert_with(|| ChainHead::new(tenant, owner));
    }

    /// Forgets what was read back of `tenant`'s records: its chains start again from
    /// their owners (a recovery that failed half-way).
    pub fn reset_tenant(&mut self, tenant: &str) {
        for head in self.chains.values_mut() {
            if head.tenant == tenant {
                *head = ChainHead::new(tenant, &head.owner);
            }
        }
    }

    /// Adopts a stored record (recovery after a restart, in stored order).
    pub fn restore_record(&mut self, value: &Value) {
        let (Some(chain), Some(seq), Some(hash)) = (
            value.get("chain_id").and_then(Value::as_str),
            value.get("seq").and_then(Value::as_u64),
            value.get("hash").and_then(Value::as_str),
        ) else {
            return;
        };
        if let Some(head) = self.chains.get_mut(chain)
            && seq >= head.next_seq
        {
            head.push(seq, hash);
        }
    }

    /// Checks a batch of NDJSON lines from `sender`; nothing changes until
    /// [`Arrivals::commit`].
    pub fn check(&self, sender: Sender<'_>, body: &str) -> Result<CheckedBatch, ShipRefusal> {
        let mut heads: HashMap<String, ChainHead> = HashMap::new();
        let mut batch = CheckedBatch {
            fresh: Vec::new(),
            duplicates: 0,
            records: 0,
            new_chains: Vec::new(),
            heads: HashMap::new(),
        };
        for (index, line) in body.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let number = index + 1;
            let value: Value = serde_json::from_str(line).map_err(|e| {
                refusal(
                    ShipRefusalReason::Malformed,
                    format!("line {number} is not JSON: {e}"),
                    None,
                    None,
                )
            })?;
            if Entry::is_checkpoint_value(&value) {
                let chain_id = self.check_checkpoint(sender, &mut heads, value, number)?;
                batch.fresh.push(Fresh {
                    chain_id,
                    line: line.to_owned(),
                });
                continue;
            }
            match self.check_record(sender, &mut heads, &mut batch.new_chains, value, number)? {
                Arrived::New(chain_id) => {
                    batch.records += 1;
                    batch.fresh.push(Fresh {
                        chain_id,
                        line: line.to_owned(),
                    });
                }
                Arrived::Duplicate => batch.duplicates += 1,
            }
        }
        batch.heads = heads;
        Ok(batch)
    }

    /// The head of `chain_id` as this batch has left it so far.
    fn working_head<'h>(
        &self,
        heads: &'h mut HashMap<String, ChainHead>,
        chain_id: &str,
    ) -> Option<&'h mut ChainHead> {
        if !heads.contains_key(chain_id) {
            let held = self.chains.get(chain_id)?.clone();
            heads.insert(chain_id.to_owned(), held);
        }
        heads.get_mut(chain_id)
    }

    fn check_record(
        &self,
        sender: Sender<'_>,
        heads: &mut HashMap<String, ChainHead>,
        new_chains: &mut Vec<(String, String)>,
        value: Value,
        number: usize,
    ) -> Result<Arrived, ShipRefusal> {
        let fields = (
            value
                .get("chain_id")
                .and_then(Value::as_str)
                .map(str::to_owned),
            value.get("seq").and_then(Value::as_u64),
            value
                .get("prev_hash")
                .and_then(Value::as_str)
                .map(str::to_owned),
            value.get("hash").and_then(Value::as_str).map(str::to_owned),
            value
                .get("tenant")
                .and_then(Value::as_str)
                .map(str::to_owned),
        );
        let (Some(chain_id), Some(seq), Some(prev_hash), Some(hash), Some(tenant)) = fields else {
            return Err(refusal(
                ShipRefusalReason::Malformed,
                format!("line {number} lacks chain_id, seq, prev_hash, hash or tenant"),
                None,
                None,
            ));
        };
        let chain = Some(chain_id.as_str());
        if tenant != sender.tenant {
            return Err(refusal(
                ShipRefusalReason::WrongTenant,
                format!(
                    "line {number} is a record of tenant {tenant:?}; {} may ship only tenant {:?}'s records",
                    sender.workload, sender.tenant
                ),
                chain,
                None,
            ));
        }
        let computed = record_hash_of_value(value).map_err(|e| {
            refusal(
                ShipRefusalReason::Malformed,
                format!("line {number}: {e}"),
                chain,
                None,
            )
        })?;
        if computed != hash {
            return Err(refusal(
                ShipRefusalReason::AlteredRecord,
                format!("record {chain_id}#{seq} does not hash to its hash: it was altered"),
                chain,
                None,
            ));
        }
        if self.working_head(heads, &chain_id).is_none() {
            heads.insert(
                chain_id.clone(),
                ChainHead::new(sender.tenant, sender.workload),
            );
            new_chains.push((chain_id.clone(), sender.workload.to_owned()));
        }
        let Some(head) = heads.get_mut(&chain_id) else {
            return Err(refusal(
                ShipRefusalReason::Malformed,
                format!("chain {chain_id} vanished while checking"),
                chain,
                None,
            ));
        };
        if head.owner != sender.workload || head.tenant != sender.tenant {
            return Err(refusal(
                ShipRefusalReason::ForeignChain,
                format!(
                    "chain {chain_id} is written by {}; {} may not continue it",
                    head.owner, sender.workload
                ),
                chain,
                None,
            ));
        }
        if seq < head.next_seq {
            return match head.hash_of(seq) {
                Some(held) if held != hash => Err(refusal(
                    ShipRefusalReason::Fork,
                    format!(
                        "record {chain_id}#{seq} differs from the one already held: the chain was rewritten"
                    ),
                    chain,
                    Some(head.next_seq),
                )),
                // Held (or older than the remembered window, and so held long since).
                _ => Ok(Arrived::Duplicate),
            };
        }
        if seq > head.next_seq {
            return Err(refusal(
                ShipRefusalReason::MissingRecords,
                format!(
                    "chain {chain_id} continues at seq {}, the batch has {seq}: resend from {}",
                    head.next_seq, head.next_seq
                ),
                chain,
                Some(head.next_seq),
            ));
        }
        if prev_hash != head.last_hash {
            return Err(refusal(
                ShipRefusalReason::BrokenLink,
                format!("record {chain_id}#{seq} does not link to the record before it"),
                chain,
                Some(head.next_seq),
            ));
        }
        head.push(seq, &hash);
        Ok(Arrived::New(chain_id))
    }

    fn check_checkpoint(
        &self,
        sender: Sender<'_>,
        heads: &mut HashMap<String, ChainHead>,
        value: Value,
        number: usize,
    ) -> Result<String, ShipRefusal> {
        let checkpoint = verify_checkpoint_value(value).map_err(|fault| {
            refusal(
                ShipRefusalReason::BadCheckpoint,
                format!("line {number}: {fault}"),
                None,
                None,
            )
        })?;
        let chain = Some(checkpoint.chain_id.as_str());
        let Some(head) = self.working_head(heads, &checkpoint.chain_id) else {
            return Err(refusal(
                ShipRefusalReason::BadCheckpoint,
                format!(
                    "line {number}: a checkpoint of chain {} before any of its records",
                    checkpoint.chain_id
                ),
                chain,
                Some(0),
            ));
        };
        if head.owner != sender.workload || head.tenant != sender.tenant {
            return Err(refusal(
                ShipRefusalReason::ForeignChain,
                format!(
                    "chain {} is written by {}; {} may not sign it",
                    checkpoint.chain_id, head.owner, sender.workload
                ),
                chain,
                None,
            ));
        }
        match head.hash_of(checkpoint.seq) {
            Some(held) if held == checkpoint.hash => Ok(checkpoint.chain_id),
            Some(_) => Err(refusal(
                ShipRefusalReason::BadCheckpoint,
                format!(
                    "line {number}: the checkpoint names record {}#{} with another hash",
                    checkpoint.chain_id, checkpoint.seq
                ),
                chain,
                None,
            )),
            None if checkpoint.seq >= head.next_seq => Err(refusal(
                ShipRefusalReason::BadCheckpoint,
                format!(
                    "line {number}: the checkpoint names record {}#{}, which has not arrived",
                    checkpoint.chain_id, checkpoint.seq
                ),
                chain,
                Some(head.next_seq),
            )),
            // Older than the remembered window: checked by `audit verify` against the store.
            None => Ok(checkpoint.chain_id),
        }
    }

    /// Adopts a checked batch's heads; call once its entries are durable.
    pub fn commit(&mut self, batch: CheckedBatch) {
        self.chains.extend(batch.heads);
    }
}

enum Arrived {
    New(String),
    Duplicate,
}
