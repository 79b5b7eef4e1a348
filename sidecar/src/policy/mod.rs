//! The policy in force: one atomic pointer to the current bundle, compiled
//! ([`CompiledPolicy`]) from a [`PolicyBundle`] read from a file ([`mod@file`], standalone)
//! or the operator's streaming endpoint ([`crate::control::policy_stream`]).
//!
//! [`PolicyBundle`]: portcullis_crds::PolicyBundle

pub mod compiled;
pub mod file;
pub mod store;

pub use compiled::{CompiledPolicy, KeyRef, ScopeSet};
pub use store::{Install, PolicyStore};
