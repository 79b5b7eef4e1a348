//! The proxy's clients of the operator: the workload certificate ([`identity`]), the
//! tenant's policy stream ([`policy_stream`]), the tenant's audit data key
//! ([`audit_key`]) and, in a run-to-completion pod, when to exit ([`app_exit`]). The
//! one-shot requests share [`operator_client`].

pub mod app_exit;
pub mod audit_key;
pub mod identity;
pub mod operator_client;
pub mod policy_stream;
