//! Portcullis audit: a tamper-evident record of every request and every admin action.
//!
//! The pieces, in the order a record meets them:
//!
//! - [`record`]: the [`AuditRecord`] the proxy and the operator build, one per request or
//!   admin action.
//! - [`canonical`]: how a record is hashed (RFC 8785 JSON without `hash`, SHA-256, hex),
//!   written down so any tool can recompute it.
//! - [`chain`]: [`Chain`] gives each record its `seq`, `prev_hash` and `hash`.
//! - [`checkpoint`]: [`Checkpoint`]s signed with the workload's ECDSA P-256 key every N
//!   records or T seconds, so a chain is verifiable end to end.
//! - [`writer`]: the [`AuditWriter`] pipeline the proxy submits records to (bounded
//!   channel, batching, fail-closed or fail-open).
//! - [`sink`]: where records go: stdout, encrypted rotating files, Splunk HEC, Datadog,
//!   the network ones behind a bounded on-disk spool.
//! - [`verify`] and [`files`]: checking chains and signatures, from memory or from a
//!   file or directory (plain JSON lines or encrypted segments).
//! - [`format`]: JSON lines, the human line and CSV export.
//! - [`tenant_keys`]: a tenant's data-encryption keys as the operator hands them out.

#![warn(missing_docs)]

pub mod canonical;
pub mod chain;
pub mod checkpoint;
pub mod clock;
pub mod entry;
pub mod error;
pub mod files;
pub mod format;
pub mod keyring;
pub mod record;
pub mod retry;
pub mod seal;
pub mod secret;
pub mod segment;
pub mod sink;
pub mod tenant_keys;
pub mod verify;
pub mod writer;

pub use chain::Chain;
pub use checkpoint::{Checkpoint, CheckpointPolicy, CheckpointSigner, SignerIdentity};
pub use clock::{Clock, ManualClock, SystemClock};
pub use entry::Entry;
pub use error::Error;
pub use keyring::{DataKey, KeyRing};
pub use record::{AuditRecord, ByteCounts, Decision};
pub use seal::{Seal, SealedHead};
pub use secret::Secret;
pub use tenant_keys::TenantKeys;
pub use verify::{Anchor, Location, Problem, TrustBundle, Verifier, VerifyOptions, VerifyReport};
pub use writer::{
    Accepted, AuditWriter, FailureMode, RecordSlot, SubmitError, WriterConfig, WriterStats,
};
