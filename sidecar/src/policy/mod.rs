//! The policy in force: one atomic pointer to the current [`PolicyBundle`], fed from a
//! file (standalone) or the operator's streaming endpoint.
//!
//! [`PolicyBundle`]: portcullis_crds::PolicyBundle

pub mod file;
pub mod store;
pub mod stream;

pub use store::{Install, PolicyStore};
