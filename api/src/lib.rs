//! The Portcullis wire contracts: one definition of everything that crosses a process
//! boundary between the operator, the proxy, the audit service and the CLI. No runtime
//! and no Kubernetes client, so every crate may depend on it (the control plane never
//! needs the data plane's crate, or the other way round, to agree on a contract).
//!
//! - [`spiffe`]: trust domains and the workload and tenant SPIFFE IDs.
//! - [`names`]: the one check of Kubernetes object names (DNS labels and subdomains).
//! - [`identity`]: the identity service's request, answer and refusal reasons.
//! - [`policy`]: the policy server's paths.
//! - [`audit_key`]: the tenant audit-key answer and its path.
//! - [`audit_ship`]: how a proxy ships its audit records to the collector, and the
//!   collector's acknowledgement or refusal.
//! - [`audit_export`]: how people and tools read a tenant's log back from the collector.
//! - [`app_exit`]: how a run-to-completion pod's proxy learns that its app has exited.
//! - [`injection`]: ports, environment variables, mounts, the proxy uid, the skip-port
//!   list and the app probes the injector hands the proxy.
//! - [`clock`]: the one [`clock::Clock`] trait and its system and manual clocks.

#![warn(missing_docs)]

pub mod app_exit;
pub mod audit_export;
pub mod audit_key;
pub mod audit_ship;
pub mod clock;
pub mod identity;
pub mod injection;
pub mod names;
pub mod policy;
pub mod spiffe;

pub use clock::{Clock, ManualClock, SystemClock};
pub use spiffe::{SpiffeId, SpiffeIdError, TenantId, TrustDomain, WorkloadId};
