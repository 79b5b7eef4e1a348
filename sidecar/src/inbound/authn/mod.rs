//! API-key authentication: find the key in the request ([`extract`]), check it against
//! the policy ([`verify`]) with a verified-key cache ([`cache`]) so steady state costs
//! one SHA-256 and a map lookup, and bcrypt runs only on a miss, on a bounded pool,
//! within failure budgets ([`failure_budget`]) and past a cache of wrong secrets
//! ([`failed_key_cache`]).

pub mod cache;
pub mod extract;
pub mod failed_key_cache;
pub mod failure_budget;
pub mod verify;

pub use cache::VerifiedKeyCache;
pub use extract::presented_key;
pub use failure_budget::{BucketLimit, FailureLimits};
pub use verify::{KeyVerifier, MaskedKey, VerifiedKey};
