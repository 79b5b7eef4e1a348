//! The Portcullis audit collector: the per-tenant audit log that outlives pods.
//!
//! Proxies ship their hash chains to it (the contract is
//! [`portcullis_api::audit_ship`]); it checks every batch on arrival
//! ([`arrival`]: each chain continued exactly, resends recognised, rewrites, gaps,
//! altered records, foreign tenants and foreign chains refused whole), makes the new
//! entries durable in the tenant's log ([`store`]) before acknowledging them, rebuilds
//! its view of every chain from the store after a restart, and prunes days past a
//! tenant's retention ([`collector`]).
//!
//! Batches arrive over mutual TLS ([`server`]): the tenant is the one the shipping
//! workload's certificate names. `portcullis-operator audit-server` runs it.
//!
//! The same listener serves a tenant's log back ([`export`]) to whoever the API server
//! says may read it.
//!
//! Each tenant's log goes on to the SIEM sinks its Tenant names ([`forward`]), every
//! sink from its own cursor in the stored log.
//!
//! Every little while the collector seals each tenant log that grew ([`sealing`],
//! [`portcullis_audit::seal`]): a signed statement of every chain's head, linked to
//! the seal before it, which no workload can make.
//!
//! The newest seal of each log is served to the same readers as the export
//! (`GET /v1/tenants/{t}/seal`); the operator witnesses it into the Tenant's status,
//! where the collector cannot rewrite it.
//!
//! Each tenant's days rest encrypted under the tenant's DEK ([`keys`], [`store`]); a
//! tenant whose key is not at hand yet is read back, and takes batches, once it is.

#![warn(missing_docs)]

pub mod arrival;
pub mod collector;
pub mod export;
pub mod forward;
pub mod keys;
pub mod metrics;
pub mod retention;
pub mod sealing;
pub mod server;
pub mod store;

pub use arrival::{Arrivals, ChainHead, Sender};
pub use collector::{Collector, Found, IngestError, Ingested, MAX_RETENTION_DAYS, SealError};
pub use export::{Export, ExportAuthorizer, ExportDenial, ExportMetrics, NoExport, Reader};
pub use forward::{
    AppendSignal, ForwardMetrics, Forwarding, NoSinks, SinkDirectory, SinkObserver, SinkTarget,
};
pub use keys::KeyCache;
pub use metrics::IngestMetrics;
pub use retention::{FixedRetention, Pruned, RetentionPolicy, prune_all};
pub use sealing::{seal_all, seal_grown};
pub use server::{Ingest, MAX_BATCH_BYTES, RefusalObserver, route, server_config};
pub use store::{DayOffset, DayPiece, FileStore, Position, RecordStore, StoreError};
