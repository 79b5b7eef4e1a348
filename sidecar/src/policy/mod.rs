//! The policy in force: one atomic pointer to the current bundle, compiled
//! ([`CompiledPolicy`]) from a [`PolicyBundle`] read from a file (standalone) or the
//! operator's streaming endpoint.
//!
//! [`PolicyBundle`]: portcullis_crds::PolicyBundle

pub mod compiled;
pub mod file;
pub mod store;
pub mod stream;

pub use compiled::{CompiledPolicy, KeyRef, ScopeSet};
pub use store::{Install, PolicyStore};
