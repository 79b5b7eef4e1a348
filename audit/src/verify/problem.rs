//! Where an entry was read and what can be wrong with an audit trail.

use std::fmt;
use std::sync::Arc;

/// Where an entry was read: source (file) name, its index in reading order, line (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// File name or other label of the source.
    pub source: Arc<str>,
    /// Position of the source in reading order (orders problems across files).
    pub source_index: usize,
    /// 1-based line within the source (decrypted text for encrypted segments).
    pub line: u64,
}

impl Location {
    /// A location.
    pub fn new(source: Arc<str>, source_index: usize, line: u64) -> Self {
        Location {
            source,
            source_index,
            line,
        }
    }

    pub(crate) fn key(&self) -> (usize, u64) {
        (self.source_index, self.line)
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.source, self.line)
    }
}

/// The first thing wrong with an audit trail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// A line is not a valid record or checkpoint.
    #[error("{location}: malformed entry: {message}")]
    Malformed {
        /// Where.
        location: Location,
        /// Why.
        message: String,
    },
    /// Part of a source could not be read (encrypted segment truncated or corrupted).
    #[error("{location}: unreadable: {message}")]
    Unreadable {
        /// Where reading stopped (the last readable line).
        location: Location,
        /// Why.
        message: String,
    },
    /// The record's content does not match its hash: it was altered.
    #[error(
        "{location}: record seq {seq} of chain {chain_id} was altered (stored hash {stored}, content hashes to {computed})"
    )]
    AlteredRecord {
        /// Chain.
        chain_id: String,
        /// The altered record.
        seq: u64,
        /// Where.
        location: Location,
        /// Hash stored in the record.
        stored: String,
        /// Hash of its content.
        computed: String,
    },
    /// The record's `prev_hash` is not the previous record's hash.
    #[error(
        "{location}: broken link at seq {seq} of chain {chain_id}: prev_hash {found} but the previous record hashes to {expected}"
    )]
    BrokenLink {
        /// Chain.
        chain_id: String,
        /// The record whose link is wrong.
        seq: u64,
        /// Where.
        location: Location,
        /// What prev_hash should be.
        expected: String,
        /// What it is.
        found: String,
    },
    /// Records are missing: seq jumped forward.
    #[error(
        "{location}: records missing from chain {chain_id}: expected seq {expected_seq}, found {found_seq}"
    )]
    MissingRecords {
        /// Chain.
        chain_id: String,
        /// First missing seq.
        expected_seq: u64,
        /// The seq found instead.
        found_seq: u64,
        /// Where the gap shows.
        location: Location,
    },
    /// Records are out of order.
    #[error(
        "{location}: chain {chain_id} out of order: seq {seq} where seq {expected_seq} belongs"
    )]
    Reordered {
        /// Chain.
        chain_id: String,
        /// The record found out of place.
        seq: u64,
        /// The seq that belongs at this position.
        expected_seq: u64,
        /// Where.
        location: Location,
    },
    /// A checkpoint's signature (or certificate) does not verify.
    #[error(
        "{location}: checkpoint for seq {seq} of chain {chain_id} has a bad signature: {detail}"
    )]
    BadCheckpointSignature {
        /// Chain.
        chain_id: String,
        /// The seq the checkpoint names.
        seq: u64,
        /// Where.
        location: Location,
        /// What failed.
        detail: String,
    },
    /// A checkpoint verifies but was signed by a key the verifier does not trust.
    #[error(
        "{location}: checkpoint for seq {seq} of chain {chain_id} is signed by an untrusted key"
    )]
    UntrustedSigner {
        /// Chain.
        chain_id: String,
        /// The seq the checkpoint names.
        seq: u64,
        /// Where.
        location: Location,
    },
    /// A checkpoint verifies but its signer's certificate does not chain to the trust
    /// bundle: anyone could have signed it.
    #[error(
        "{location}: checkpoint for seq {seq} of chain {chain_id} is not signed by a workload certificate of the trust bundle: {detail}"
    )]
    SignerNotInTrustBundle {
        /// Chain.
        chain_id: String,
        /// The seq the checkpoint names.
        seq: u64,
        /// Where.
        location: Location,
        /// Why the chain does not verify.
        detail: String,
    },
    /// A checkpoint names a record whose hash differs.
    #[error(
        "{location}: checkpoint for seq {seq} of chain {chain_id} says hash {checkpoint_hash}, the record hashes to {record_hash}"
    )]
    CheckpointMismatch {
        /// Chain.
        chain_id: String,
        /// The seq.
        seq: u64,
        /// Where the record is.
        location: Location,
        /// Hash in the checkpoint.
        checkpoint_hash: String,
        /// Hash of the record.
        record_hash: String,
    },
    /// A checkpoint names a record that is not present: the chain was cut.
    #[error("{location}: chain {chain_id} truncated: checkpoint for seq {checkpoint_seq} but the last record present is {}", last_seq.map_or_else(|| "none".to_string(), |s| format!("seq {s}")))]
    Truncated {
        /// Chain.
        chain_id: String,
        /// The seq the checkpoint names.
        checkpoint_seq: u64,
        /// The last record present, if any.
        last_seq: Option<u64>,
        /// Where the checkpoint is.
        location: Location,
    },
    /// A seal's signature does not verify, or it is malformed.
    #[error("{location}: seal {number} does not verify: {detail}")]
    BadSeal {
        /// The seal's number.
        number: u64,
        /// Where the seal is.
        location: Location,
        /// Why.
        detail: String,
    },
    /// A seal is not signed by the audit collector's certificate from the trust bundle.
    #[error("{location}: seal {number} is not signed by the audit collector: {detail}")]
    SealSignerNotTrusted {
        /// The seal's number.
        number: u64,
        /// Where the seal is.
        location: Location,
        /// Why.
        detail: String,
    },
    /// A record differs from what a seal says it was: rewritten after sealing.
    #[error(
        "{location}: record seq {seq} of chain {chain_id} hashes to {record_hash}, but seal {number} sealed it as {sealed_hash}: the log was rewritten after the collector sealed it"
    )]
    SealMismatch {
        /// The seal's number.
        number: u64,
        /// Chain.
        chain_id: String,
        /// The record.
        seq: u64,
        /// Where the record is.
        location: Location,
        /// The hash the seal names.
        sealed_hash: String,
        /// The record's hash.
        record_hash: String,
    },
    /// A seal names a record the log no longer holds: records were cut after sealing.
    #[error(
        "{location}: seal {number} names record seq {seq} of chain {chain_id}, which the log does not hold (last present: {last_seq:?}): records were removed after the collector sealed them"
    )]
    SealedRecordMissing {
        /// The seal's number.
        number: u64,
        /// Chain.
        chain_id: String,
        /// The sealed record.
        seq: u64,
        /// The last record of the chain present, if any.
        last_seq: Option<u64>,
        /// Where the seal is.
        location: Location,
    },
    /// A seal does not link to the seal before it: seals were replaced or reordered.
    #[error(
        "{location}: seal {number} names {found} as the seal before it, but seal {} has digest {expected}", number.saturating_sub(1)
    )]
    SealLinkBroken {
        /// The seal's number.
        number: u64,
        /// Where the seal is.
        location: Location,
        /// The previous seal's digest.
        expected: String,
        /// The `prev` the seal carries.
        found: String,
    },
    /// Seals are missing from the log.
    #[error("{location}: seals {expected} to {} are missing before seal {found}", found.saturating_sub(1))]
    SealsMissing {
        /// The first missing seal.
        expected: u64,
        /// The seal found after the gap.
        found: u64,
        /// Where that seal is.
        location: Location,
    },
    /// A seal differs from the one the operator witnessed: the collector's log and
    /// seals were rewritten after that.
    #[error(
        "{location}: seal {number} has digest {found}, but the operator witnessed seal {number} with digest {anchored}: the log was rewritten and sealed again after it was witnessed"
    )]
    AnchorMismatch {
        /// The seal's number.
        number: u64,
        /// Where the seal in the log is.
        location: Location,
        /// The witnessed digest.
        anchored: String,
        /// The digest of the seal in the log.
        found: String,
    },
    /// A witnessed seal is not in the log, and retention does not explain it.
    #[error(
        "seal {number}, witnessed by the operator, is not in the log (its last seal: {last_seal:?}): the log was cut or replaced after it was witnessed"
    )]
    AnchoredSealMissing {
        /// The seal's number.
        number: u64,
        /// The log's last seal, if any.
        last_seal: Option<u64>,
        /// Placed after every line of the log.
        location: Location,
    },
}

impl Problem {
    /// Where the problem is.
    pub fn location(&self) -> &Location {
        match self {
            Problem::Malformed { location, .. }
            | Problem::Unreadable { location, .. }
            | Problem::AlteredRecord { location, .. }
            | Problem::BrokenLink { location, .. }
            | Problem::MissingRecords { location, .. }
            | Problem::Reordered { location, .. }
            | Problem::BadCheckpointSignature { location, .. }
            | Problem::UntrustedSigner { location, .. }
            | Problem::SignerNotInTrustBundle { location, .. }
            | Problem::CheckpointMismatch { location, .. }
            | Problem::Truncated { location, .. }
            | Problem::BadSeal { location, .. }
            | Problem::SealSignerNotTrusted { location, .. }
            | Problem::SealMismatch { location, .. }
            | Problem::SealedRecordMissing { location, .. }
            | Problem::SealLinkBroken { location, .. }
            | Problem::SealsMissing { location, .. }
            | Problem::AnchorMismatch { location, .. }
            | Problem::AnchoredSealMissing { location, .. } => location,
        }
    }

    /// The seq the problem is about, when it is about one.
    pub fn seq(&self) -> Option<u64> {
        match self {
            Problem::Malformed { .. }
            | Problem::Unreadable { .. }
            | Problem::BadSeal { .. }
            | Problem::SealSignerNotTrusted { .. }
            | Problem::SealLinkBroken { .. }
            | Problem::SealsMissing { .. }
            | Problem::AnchorMismatch { .. }
            | Problem::AnchoredSealMissing { .. } => None,
            Problem::SealMismatch { seq, .. } | Problem::SealedRecordMissing { seq, .. } => {
                Some(*seq)
            }
            Problem::AlteredRecord { seq, .. }
            | Problem::BrokenLink { seq, .. }
            | Problem::Reordered { seq, .. }
            | Problem::BadCheckpointSignature { seq, .. }
            | Problem::UntrustedSigner { seq, .. }
            | Problem::SignerNotInTrustBundle { seq, .. }
            | Problem::CheckpointMismatch { seq, .. } => Some(*seq),
            Problem::MissingRecords { expected_seq, .. } => Some(*expected_seq),
            Problem::Truncated { checkpoint_seq, .. } => Some(*checkpoint_seq),
        }
    }
}
