//! Labels and annotations that are part of the contract (DESIGN.md §4).

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

/// Proxy inbound port.
pub const PROXY_INBOUND_PORT: u16 = 4143;
/// Proxy outbound port.
pub const PROXY_OUTBOUND_PORT: u16 = 4140;
/// Proxy admin port (`/live`, `/ready`, `/metrics`).
pub const PROXY_ADMIN_PORT: u16 = 4191;
/// Operator identity service port.
pub const IDENTITY_PORT: u16 = 8443;
/// Operator policy server port.
pub const POLICY_PORT: u16 = 8090;
/// Operator webhook port.
pub const WEBHOOK_PORT: u16 = 9443;
/// Audience of the projected ServiceAccount token sidecars present.
pub const IDENTITY_AUDIENCE: &str = "portcullis.dev/identity";
/// Field manager for every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "portcullis-operator";
