//! Labels and annotations that are part of the contract (DESIGN.md §4). Ports and the
//! identity audience are wire contracts: see `portcullis_api::injection` and
//! `portcullis_api::identity`.

/// Namespace label that opts a namespace into injection (`enabled`).
pub const INJECT: &str = "portcullis.dev/inject";
/// Pod annotation: `mtls` | `apikey` | `mtls-or-apikey` | `mtls-and-apikey`.
pub const INBOUND_MODE: &str = "portcullis.dev/inbound-mode";
/// Pod annotation: the port the application listens on.
pub const APP_PORT: &str = "portcullis.dev/app-port";
/// Pod annotation: a scope map overriding the tenant's (JSON, scope → routes).
pub const SCOPES_MAP: &str = "portcullis.dev/scopes-map";
/// Pod annotation: mTLS peers this pod admits besides its tenant's own workloads and
/// the Tenant's `spec.allowedPeers`: comma-separated `spiffe://<td>/ns/<ns>/sa/<sa>`,
/// `namespace:<ns>` and `tenant:<name>` entries.
pub const ALLOWED_PEERS: &str = "portcullis.dev/allowed-peers";
/// Pod annotation: a `kubernetes.io/tls` Secret in the pod's namespace whose
/// certificate the proxy presents to clients outside the mesh (mesh peers keep getting
/// the workload certificate); overrides the Tenant's
/// `spec.defaults.servingCertificateSecret`.
pub const SERVING_CERTIFICATE: &str = "portcullis.dev/serving-certificate";
/// Pod annotation: comma-separated inbound ports that bypass the proxy.
pub const SKIP_INBOUND_PORTS: &str = "portcullis.dev/skip-inbound-ports";
/// Pod label the injector sets (`"true"`) on every pod it injects, so NetworkPolicies
/// can select the pods that run the proxy.
pub const INJECTED_LABEL: &str = "portcullis.dev/injected";

/// Field manager for every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "portcullis-operator";
