//! The Portcullis sidecar proxy: TLS 1.3 in front of an app, mTLS peers and scoped API
//! keys, IP allowlists, per-key rate limits, audit of every request, hot-swapped
//! certificates and policy.
//!
//! - [`inbound`]: the inbound request path, one module per step.
//! - [`outbound`]: the outbound listener (the app's calls to other workloads, over mTLS).
//! - [`admin`]: the admin listener (liveness, readiness, metrics, the app's probes).
//! - [`listener`]: what every listener shares: the body type, denials, per-source
//!   connection slots, idle tracking.
//! - [`tls`]: credentials, verifiers, server and client configs, the peer's identity,
//!   the bring-your-own serving certificate.
//! - [`policy`]: the policy in force. [`audit`]: the audit trail.
//! - [`control`]: the proxy's clients of the operator (identity, policy stream, audit
//!   key, app exit).
//! - [`run`]: process wiring (standalone, in an injected pod, the demo, shutdown) and
//!   the pod init steps.
//! - [`config`], [`metrics`].

pub mod admin;
pub mod audit;
pub mod config;
pub mod control;
pub mod inbound;
pub mod listener;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod run;
pub mod tls;
