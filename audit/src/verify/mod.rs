//! Chain and checkpoint verification.
//!
//! A [`Verifier`] is fed checkpoints first ([`Verifier::add_checkpoint`]), then records in
//! stream order ([`Verifier::push_record`]); [`Verifier::finish`] gives a report or the
//! first problem by position (source order, then line). Records of several chains may be
//! interleaved; each `chain_id` is checked on its own.
//!
//! Per record, in this order: the stored `hash` must equal the recomputed one (else
//! [`Problem::AlteredRecord`]); the first record of a chain must be seq 0 with the genesis
//! `prev_hash` (unless [`VerifyOptions::allow_pruned_start`]); each next record must have
//! the next seq ([`Problem::MissingRecords`] for a gap, [`Problem::Reordered`] when a seq
//! comes after a higher one) and `prev_hash` equal to the previous hash
//! ([`Problem::BrokenLink`]). Each checkpoint must verify ([`Problem::BadCheckpointSignature`]),
//! be signed by a trusted key when keys are pinned, chain to the trust bundle when one is
//! given ([`Problem::SignerNotInTrustBundle`]), match the record it names
//! ([`Problem::CheckpointMismatch`]) and name a record that is present
//! ([`Problem::Truncated`]).
//!
//! Seals, the audit collector's signatures over a tenant log ([`crate::seal`]), are
//! fed with the checkpoints ([`Verifier::add_seal`]): each must verify, be signed by the
//! collector's certificate when a trust bundle is given, link to the seal before it, and
//! every head it names must match the record present ([`Problem::SealMismatch`]) or be
//! present at all ([`Problem::SealedRecordMissing`]).

mod problem;
mod signer_trust;

pub use problem::{Location, Problem};
pub use signer_trust::TrustBundle;

use crate::canonical::{GENESIS_HASH, record_hash_of_value};
use crate::checkpoint::{CheckpointFault, verify_checkpoint_value};
use crate::seal::{Seal, verify_seal_value};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// What the verifier accepts.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Public keys (uncompressed SEC1 points) allowed to sign checkpoints. Empty: any key
    /// whose signature verifies (the checkpoint is then only self-consistent).
    pub trusted_keys: Vec<Vec<u8>>,
    /// When set, every checkpoint must be signed by a certificate chaining to this
    /// bundle ([`Problem::SignerNotInTrustBundle`] otherwise).
    pub trust_bundle: Option<TrustBundle>,
    /// Accept chains whose first present record is not seq 0 (older segments removed by
    /// retention). The first present record's `prev_hash` is then taken on trust.
    pub allow_pruned_start: bool,
    /// Seals someone other than the collector saw it make (the operator, in the
    /// Tenant's status): each must be in the log with that digest
    /// ([`Problem::AnchorMismatch`], [`Problem::AnchoredSealMissing`]).
    pub anchors: Vec<Anchor>,
}

/// A seal witnessed outside the collector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// The seal's number.
    pub number: u64,
    /// Its digest ([`crate::seal::seal_digest`]).
    pub digest: String,
}

/// Counts for one verified chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainSummary {
    /// First seq present.
    pub first_seq: Option<u64>,
    /// Last seq present.
    pub last_seq: Option<u64>,
    /// Records checked.
    pub records: u64,
    /// Checkpoints checked.
    pub checkpoints: u64,
}

/// A clean verification.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Per chain id.
    pub chains: BTreeMap<String, ChainSummary>,
    /// Records checked, all chains.
    pub records: u64,
    /// Checkpoints checked, all chains.
    pub checkpoints: u64,
    /// Collector seals checked.
    pub seals: u64,
    /// The last seal's number, if any.
    pub last_seal: Option<u64>,
    /// Anchors matched by the seal in the log.
    pub anchors: u64,
}

struct Gap {
    expected: u64,
    found: u64,
    location: Location,
}

struct ChainState {
    next_seq: u64,
    last_hash: String,
    started: bool,
    broken: bool,
    gap: Option<Gap>,
    summary: ChainSummary,
}

impl ChainState {
    fn new() -> Self {
        ChainState {
            next_seq: 0,
            last_hash: GENESIS_HASH.to_string(),
            started: false,
            broken: false,
            gap: None,
            summary: ChainSummary::default(),
        }
    }
}

struct PendingCheckpoint {
    hash: String,
    location: Location,
    /// The seal that names the record, when this is a seal's head.
    seal: Option<u64>,
}

struct SealSeen {
    digest: String,
    prev: String,
    location: Location,
}

/// Streaming verifier; see the module docs for the order of calls.
pub struct Verifier {
    options: VerifyOptions,
    chains: HashMap<String, ChainState>,
    checkpoints: HashMap<String, BTreeMap<u64, Vec<PendingCheckpoint>>>,
    seals: BTreeMap<u64, SealSeen>,
    first_record: Option<Location>,
    first_problem: Option<Problem>,
    records: u64,
    checkpoint_count: u64,
}

impl Verifier {
    /// A verifier with the given options.
    pub fn new(options: VerifyOptions) -> Self {
        Verifier {
            options,
            chains: HashMap::new(),
            checkpoints: HashMap::new(),
            seals: BTreeMap::new(),
            first_record: None,
            first_problem: None,
            records: 0,
            checkpoint_count: 0,
        }
    }

    /// Records checked so far.
    pub fn records_seen(&self) -> u64 {
        self.records
    }

    /// Notes a problem found outside the verifier (unreadable data); the earliest by
    /// position is reported.
    pub fn report(&mut self, problem: Problem) {
        let earlier = match &self.first_problem {
            None => true,
            Some(current) => problem.location().key() < current.location().key(),
        };
        if earlier {
            self.first_problem = Some(problem);
        }
    }

    /// Checks a checkpoint's signature and remembers it for the records to come.
    pub fn add_checkpoint(&mut self, value: Value, location: Location) {
        let chain_id = value
            .get("chain_id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let seq = value.get("seq").and_then(Value::as_u64).unwrap_or_default();
        let checkpoint = match verify_checkpoint_value(value) {
            Ok(c) => c,
            Err(CheckpointFault::Malformed(message)) => {
                return self.report(Problem::Malformed { location, message });
            }
            Err(fault) => {
                return self.report(Problem::BadCheckpointSignature {
                    chain_id,
                    seq,
                    location,
                    detail: fault.to_string(),
                });
            }
        };
        if !self.options.trusted_keys.is_empty() {
            let key = B64
                .decode(&checkpoint.signer.public_key)
                .unwrap_or_default();
            if !self.options.trusted_keys.contains(&key) {
                self.report(Problem::UntrustedSigner {
                    chain_id: checkpoint.chain_id.clone(),
                    seq: checkpoint.seq,
                    location: location.clone(),
                });
            }
        }
        if let Some(bundle) = &self.options.trust_bundle
            && let Err(detail) = bundle.check(&checkpoint.signer, checkpoint.timestamp)
        {
            self.report(Problem::SignerNotInTrustBundle {
                chain_id: checkpoint.chain_id.clone(),
                seq: checkpoint.seq,
                location: location.clone(),
                detail,
            });
        }
        self.checkpoint_count += 1;
        self.chains
            .entry(checkpoint.chain_id.clone())
            .or_insert_with(ChainState::new)
            .summary
            .checkpoints += 1;
        self.checkpoints
            .entry(checkpoint.chain_id)
            .or_default()
            .entry(checkpoint.seq)
            .or_default()
            .push(PendingCheckpoint {
                hash: checkpoint.hash,
                location,
                seal: None,
            });
    }

    /// Checks a collector seal's signature and signer and remembers its heads for the
    /// records to come.
    pub fn add_seal(&mut self, value: Value, location: Location) {
        let number = value
            .get("number")
            .and_then(Value::as_u64)
            .unwrap_or_default();
        let (seal, digest) = match verify_seal_value(value) {
            Ok(seal) => seal,
            Err(fault) => {
                return self.report(Problem::BadSeal {
                    number,
                    location,
                    detail: fault.to_string(),
                });
            }
        };
        if let Some(bundle) = &self.options.trust_bundle
            && let Err(detail) = bundle.check_service(&seal.signer, seal.timestamp)
        {
            self.report(Problem::SealSignerNotTrusted {
                number,
                location: location.clone(),
                detail,
            });
        }
        for (chain_id, head) in seal.heads {
            self.checkpoints
                .entry(chain_id)
                .or_default()
                .entry(head.seq)
                .or_default()
                .push(PendingCheckpoint {
                    hash: head.hash,
                    location: location.clone(),
                    seal: Some(number),
                });
        }
        self.seals.insert(
            number,
            SealSeen {
                digest,
                prev: seal.prev,
                location,
            },
        );
    }

    /// Checks one record (a stored JSON object) against its chain so far.
    pub fn push_record(&mut self, value: Value, location: Location) {
        self.records += 1;
        if self.first_record.is_none() {
            self.first_record = Some(location.clone());
        }
        let fields = (
            value
                .get("chain_id")
                .and_then(Value::as_str)
                .map(str::to_string),
            value.get("seq").and_then(Value::as_u64),
            value
                .get("prev_hash")
                .and_then(Value::as_str)
                .map(str::to_string),
            value
                .get("hash")
                .and_then(Value::as_str)
                .map(str::to_string),
        );
        let (Some(chain_id), Some(seq), Some(prev_hash), Some(stored)) = fields else {
            return self.report(Problem::Malformed {
                location,
                message: "record lacks chain_id, seq, prev_hash or hash".into(),
            });
        };
        let computed = match record_hash_of_value(value) {
            Ok(h) => h,
            Err(e) => {
                return self.report(Problem::Malformed {
                    location,
                    message: e.to_string(),
                });
            }
        };
        let problem = self.link(&chain_id, seq, &prev_hash, &stored, &computed, &location);
        if let Some(problem) = problem {
            if let Some(state) = self.chains.get_mut(&chain_id) {
                state.broken = true;
            }
            self.report(problem);
        }
        if let Some(problem) = self.match_checkpoints(&chain_id, seq, &stored, &location) {
            self.report(problem);
        }
    }

    fn link(
        &mut self,
        chain_id: &str,
        seq: u64,
        prev_hash: &str,
        stored: &str,
        computed: &str,
        location: &Location,
    ) -> Option<Problem> {
        let allow_pruned_start = self.options.allow_pruned_start;
        let state = self
            .chains
            .entry(chain_id.to_string())
            .or_insert_with(ChainState::new);
        let summary = &mut state.summary;
        summary.records += 1;
        summary.first_seq.get_or_insert(seq);
        summary.last_seq = Some(summary.last_seq.map_or(seq, |s| s.max(seq)));
        if state.broken {
            return None;
        }
        if stored != computed {
            return Some(Problem::AlteredRecord {
                chain_id: chain_id.to_string(),
                seq,
                location: location.clone(),
                stored: stored.to_string(),
                computed: computed.to_string(),
            });
        }
        let problem = if !state.started {
            state.started = true;
            if seq == 0 && prev_hash != GENESIS_HASH {
                Some(broken_link(
                    chain_id,
                    seq,
                    location,
                    GENESIS_HASH,
                    prev_hash,
                ))
            } else if seq != 0 && !allow_pruned_start {
                Some(Problem::MissingRecords {
                    chain_id: chain_id.to_string(),
                    expected_seq: 0,
                    found_seq: seq,
                    location: location.clone(),
                })
            } else {
                None
            }
        } else if seq == state.next_seq {
            (prev_hash != state.last_hash)
                .then(|| broken_link(chain_id, seq, location, &state.last_hash, prev_hash))
        } else if seq > state.next_seq {
            // Maybe missing, maybe the first of a swap: decided when the rest is seen.
            if state.gap.is_none() {
                state.gap = Some(Gap {
                    expected: state.next_seq,
                    found: seq,
                    location: location.clone(),
                });
            }
            None
        } else {
            Some(match state.gap.take() {
                Some(gap) if seq >= gap.expected && seq < gap.found => Problem::Reordered {
                    chain_id: chain_id.to_string(),
                    seq: gap.found,
                    expected_seq: gap.expected,
                    location: gap.location,
                },
                _ => Problem::Reordered {
                    chain_id: chain_id.to_string(),
                    seq,
                    expected_seq: state.next_seq,
                    location: location.clone(),
                },
            })
        };
        state.next_seq = seq.saturating_add(1);
        state.last_hash = stored.to_string();
        problem
    }

    fn match_checkpoints(
        &self,
        chain_id: &str,
        seq: u64,
        hash: &str,
        location: &Location,
    ) -> Option<Problem> {
        let pending = self.checkpoints.get(chain_id)?.get(&seq)?;
        pending
            .iter()
            .find(|cp| cp.hash != hash)
            .map(|cp| match cp.seal {
                Some(number) => Problem::SealMismatch {
                    number,
                    chain_id: chain_id.to_string(),
                    seq,
                    location: location.clone(),
                    sealed_hash: cp.hash.clone(),
                    record_hash: hash.to_string(),
                },
                None => Problem::CheckpointMismatch {
                    chain_id: chain_id.to_string(),
                    seq,
                    location: location.clone(),
                    checkpoint_hash: cp.hash.clone(),
                    record_hash: hash.to_string(),
                },
            })
    }

    /// Ends verification: gaps never filled become [`Problem::MissingRecords`],
    /// checkpoints past the last record become [`Problem::Truncated`]; the earliest
    /// problem by position is returned.
    pub fn finish(mut self) -> Result<VerifyReport, Problem> {
        let mut late = Vec::new();
        for (chain_id, state) in &self.chains {
            if let Some(gap) = &state.gap {
                late.push(Problem::MissingRecords {
                    chain_id: chain_id.clone(),
                    expected_seq: gap.expected,
                    found_seq: gap.found,
                    location: gap.location.clone(),
                });
            }
        }
        for (chain_id, by_seq) in &self.checkpoints {
            let last_seq = self.chains.get(chain_id).and_then(|s| s.summary.last_seq);
            for (seq, pending) in by_seq {
                if last_seq.is_none_or(|last| *seq > last) {
                    for cp in pending {
                        late.extend(self.absent(chain_id, *seq, last_seq, cp));
                    }
                }
            }
        }
        late.extend(self.seal_links());
        let (anchors, problems) = self.anchors();
        late.extend(problems);
        for problem in late {
            self.report(problem);
        }
        if let Some(problem) = self.first_problem {
            return Err(problem);
        }
        Ok(VerifyReport {
            chains: self
                .chains
                .into_iter()
                .map(|(id, state)| (id, state.summary))
                .collect(),
            records: self.records,
            checkpoints: self.checkpoint_count,
            seals: self.seals.len() as u64,
            last_seal: self.seals.last_key_value().map(|(number, _)| *number),
            anchors,
        })
    }

    /// The problem with a checkpoint or seal naming a record past the chain's last.
    fn absent(
        &self,
        chain_id: &str,
        seq: u64,
        last_seq: Option<u64>,
        pending: &PendingCheckpoint,
    ) -> Option<Problem> {
        let Some(number) = pending.seal else {
            return Some(Problem::Truncated {
                chain_id: chain_id.to_owned(),
                checkpoint_seq: seq,
                last_seq,
                location: pending.location.clone(),
            });
        };
        // Retention removes whole days, oldest first: a seal before every record left
        // may name a chain whose records all went with an earlier day.
        let before_every_record = self
            .first_record
            .as_ref()
            .is_none_or(|first| pending.location.key() < first.key());
        let pruned = self.options.allow_pruned_start && last_seq.is_none() && before_every_record;
        (!pruned).then(|| Problem::SealedRecordMissing {
            number,
            chain_id: chain_id.to_owned(),
            seq,
            last_seq,
            location: pending.location.clone(),
        })
    }

    /// How many anchors the log's seals match, and the problem with each that none does.
    fn anchors(&self) -> (u64, Vec<Problem>) {
        let first_seal = self.seals.first_key_value().map(|(number, _)| *number);
        let mut matched = 0;
        let mut problems = Vec::new();
        for anchor in &self.options.anchors {
            match self.seals.get(&anchor.number) {
                Some(seal) if seal.digest == anchor.digest => matched += 1,
                Some(seal) => problems.push(Problem::AnchorMismatch {
                    number: anchor.number,
                    location: seal.location.clone(),
                    anchored: anchor.digest.clone(),
                    found: seal.digest.clone(),
                }),
                // Retention removed the day that held it.
                None if self.options.allow_pruned_start
                    && first_seal.is_some_and(|first| anchor.number < first) => {}
                None => problems.push(Problem::AnchoredSealMissing {
                    number: anchor.number,
                    last_seal: self.seals.last_key_value().map(|(number, _)| *number),
                    location: Location::new(Arc::from("the witnessed anchors"), usize::MAX, 0),
                }),
            }
        }
        (matched, problems)
    }

    /// Problems with the order of the seals: each links to the one before; the first
    /// is seal 0 unless retention may have removed older ones.
    fn seal_links(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut previous: Option<(u64, &SealSeen)> = None;
        for (number, seal) in &self.seals {
            match previous {
                None if *number > 0 && !self.options.allow_pruned_start => {
                    problems.push(Problem::SealsMissing {
                        expected: 0,
                        found: *number,
                        location: seal.location.clone(),
                    });
                }
                None if *number == 0 && seal.prev != GENESIS_HASH => {
                    problems.push(Problem::SealLinkBroken {
                        number: *number,
                        location: seal.location.clone(),
                        expected: GENESIS_HASH.to_owned(),
                        found: seal.prev.clone(),
                    });
                }
                None => {}
                Some((before, _)) if *number != before + 1 => {
                    problems.push(Problem::SealsMissing {
                        expected: before + 1,
                        found: *number,
                        location: seal.location.clone(),
                    });
                }
                Some((_, before)) if seal.prev != before.digest => {
                    problems.push(Problem::SealLinkBroken {
                        number: *number,
                        location: seal.location.clone(),
                        expected: before.digest.clone(),
                        found: seal.prev.clone(),
                    });
                }
                Some(_) => {}
            }
            previous = Some((*number, seal));
        }
        problems
    }
}

fn broken_link(
    chain_id: &str,
    seq: u64,
    location: &Location,
    expected: &str,
    found: &str,
) -> Problem {
    Problem::BrokenLink {
        chain_id: chain_id.to_string(),
        seq,
        location: location.clone(),
        expected: expected.to_string(),
        found: found.to_string(),
    }
}

/// Verifies JSON-lines text from one source (checkpoints may be anywhere in it).
/// Blank lines are skipped; line numbers are 1-based.
pub fn verify_jsonl(
    text: &str,
    source: &str,
    options: VerifyOptions,
) -> Result<VerifyReport, Problem> {
    let source: Arc<str> = Arc::from(source);
    let mut verifier = Verifier::new(options);
    let mut records = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let location = Location::new(source.clone(), 0, index as u64 + 1);
        match serde_json::from_str::<Value>(line) {
            Ok(value) if crate::Entry::is_checkpoint_value(&value) => {
                verifier.add_checkpoint(value, location)
            }
            Ok(value) if Seal::is_seal_value(&value) => verifier.add_seal(value, location),
            Ok(value) => records.push((value, location)),
            Err(e) => verifier.report(Problem::Malformed {
                location,
                message: e.to_string(),
            }),
        }
    }
    for (value, location) in records {
        verifier.push_record(value, location);
    }
    verifier.finish()
}

/// Verifies entries held in memory (e.g. a sink's copy); line numbers are 1-based
/// positions in `entries`.
pub fn verify_entries(
    entries: &[crate::Entry],
    options: VerifyOptions,
) -> Result<VerifyReport, Problem> {
    let mut text = String::new();
    for entry in entries {
        match entry.to_json_line() {
            Ok(line) => text.push_str(&line),
            Err(e) => text.push_str(&format!("{{\"unserialisable\":{:?}}}", e.to_string())),
        }
        text.push('\n');
    }
    verify_jsonl(&text, "<memory>", options)
}
