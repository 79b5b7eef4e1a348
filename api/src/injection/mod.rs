//! The injection contract: what the operator's injector writes into a pod and the
//! proxy reads back (DESIGN.md §4). Both sides name these constants, so a rename on one
//! side cannot silently leave the other reading a variable nobody sets.

pub mod env;
pub mod port_list;
pub mod probes;

pub use port_list::{PortList, PortListError, PortRange};

/// Proxy inbound port: inbound TCP is redirected here.
pub const PROXY_INBOUND_PORT: u16 = 4143;
/// Proxy outbound port.
pub const PROXY_OUTBOUND_PORT: u16 = 4140;
/// Proxy admin port (`/live`, `/ready`, `/metrics`), never redirected.
pub const PROXY_ADMIN_PORT: u16 = 4191;
/// Operator identity service port.
pub const IDENTITY_PORT: u16 = 8443;
/// Operator policy server port.
pub const POLICY_PORT: u16 = 8090;
/// Operator webhook port.
pub const WEBHOOK_PORT: u16 = 9443;

/// The injected proxy container (a native-sidecar init container or a regular one).
pub const PROXY_CONTAINER: &str = "portcullis-proxy";
/// Pod annotation the injector sets to its version on every pod it injects.
pub const INJECTED_ANNOTATION: &str = "portcullis.dev/injected";

/// The proxy's liveness endpoint on the admin port.
pub const ADMIN_LIVE_PATH: &str = "/live";
/// The proxy's readiness endpoint on the admin port.
pub const ADMIN_READY_PATH: &str = "/ready";
/// The proxy's certificate chain (PEM) on the admin port.
pub const ADMIN_IDENTITY_PATH: &str = "/identity";

/// The uid the injected proxy runs as; the init step exempts its traffic from the
/// redirect, so the two must agree.
pub const PROXY_UID: u32 = 2102;
