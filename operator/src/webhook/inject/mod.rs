//! Sidecar injection (DESIGN.md §4): a pure function from a Pod, its namespace's labels,
//! the injector settings and the API server version to a [`Decision`] — a JSON Patch,
//! an unchanged admission (with a reason and maybe a warning), or a refusal.
//!
//! # When a pod is injected
//!
//! The namespace sets the [`InjectionLevel`]: label `portcullis.dev/inject=enabled` or
//! the `portcullis.dev/tenant` label (a namespace a Tenant owns) inject every pod that
//! does not opt out with the annotation `portcullis.dev/inject: disabled`;
//! `portcullis.dev/inject=required` injects every pod and refuses the ones it cannot
//! inject, the opt-out, and a `portcullis.dev/skip-inbound-ports` that lists an app
//! port. A namespace of a Confidential or Restricted Tenant is required whatever its
//! labels say; otherwise `portcullis.dev/inject=disabled` on the namespace wins over the
//! tenant label. `kube-system`, `kube-public`, `kube-node-lease` and the operator's
//! namespace are never injected.
//!
//! # What is added
//!
//! - init container `portcullis-init` (`portcullis-proxy init --inbound-port 4143
//!   --proxy-uid 2102 [--skip-inbound-ports …]`), first of all init containers so the
//!   redirect is in place before anything else in the pod runs; uid 0 with only
//!   NET_ADMIN and NET_RAW, not privileged, and an emptyDir on `/run` for the iptables
//!   lock file (its root filesystem is read-only);
//! - the proxy `portcullis-proxy` (`run --config-from-env`, configured by the
//!   `PORTCULLIS_*` variables below): on API servers ≥ 1.29 a native sidecar (the second
//!   init container, `restartPolicy: Always`, a startup probe on `:4191/ready`, so later
//!   init containers and the app start once it is ready, and it stops by itself when a
//!   Job's containers finish); below 1.29 the first regular container, with a
//!   `postStart` hook (`portcullis-proxy wait-ready`) that holds back the app containers
//!   until the proxy is ready;
//! - volumes: the projected ServiceAccount token with audience `portcullis.dev/identity`
//!   (1 h), the `portcullis-trust-bundle` ConfigMap, an emptyDir for the proxy's spool
//!   (its root filesystem is read-only) and the init step's lock-file emptyDir; and when
//!   the pod's `portcullis.dev/serving-certificate` annotation or its Tenant's
//!   `spec.defaults.servingCertificateSecret` names a `kubernetes.io/tls` Secret,
//!   `portcullis-serving-certificate`: that Secret with `optional: true` (a missing
//!   Secret never keeps the pod from starting), mounted read-only into the proxy only at
//!   `/var/run/portcullis.dev/serving-certificate`;
//! - the annotation `portcullis.dev/injected: "<version>"`.
//!
//! # Defined outcomes
//!
//! - Already injected — the annotation, and exactly what the injector adds ([`genuine`]:
//!   image, command, args, env, ports, security context, mounts, the init step first,
//!   the volumes; API-server defaults tolerated): admitted unchanged, no patch.
//! - The annotation with anything else (another image, no init step, extra env...):
//!   refused, naming the first difference.
//! - A container named `portcullis-proxy`/`portcullis-init` that Portcullis did not
//!   inject: refused — the name is reserved.
//! - Afterwards ([`guard`]): a pod UPDATE may not change or drop the proxy or the init
//!   step, nor the `portcullis.dev/injected` label and annotation; an ephemeral container
//!   may not be privileged, add NET_ADMIN/NET_RAW/SYS_ADMIN or run as the proxy's uid.
//! - Pods the injector cannot understand ([`Unsupported`]: hostNetwork, an app port or
//!   annotation that does not parse, a port or volume name the proxy needs) are admitted
//!   unchanged with a warning, and refused with the reason where the namespace requires
//!   injection.
//! - Init containers that need the network: ours runs first, so the redirect is active
//!   while they run. Outbound traffic is not redirected (unless the operator enables
//!   outbound redirection), so their outbound calls work; an init container that must
//!   *accept* connections before the proxy runs lists its port in
//!   `portcullis.dev/skip-inbound-ports`, or the pod opts out.
//! - Run-to-completion pods (Jobs, `restartPolicy` Never/OnFailure) in regular-container
//!   mode: the proxy gets `PORTCULLIS_EXIT_WHEN_APP_EXITS=true` and must notice the app
//!   leaving on its own (it watches the app port); until it does, the pod keeps running.
//!   Native sidecars have no such limitation.
//!
//! # Proxy environment (contract with `portcullis-proxy run --config-from-env`)
//!
//! `POD_NAME`, `POD_NAMESPACE`, `PORTCULLIS_SERVICE_ACCOUNT` (downward API),
//! `PORTCULLIS_APP_PORT` (annotation `portcullis.dev/app-port`, a number or a container
//! port name, else the first container's first TCP port; absent when the pod has none),
//! `PORTCULLIS_INBOUND_MODE`, `PORTCULLIS_SCOPES_MAP` and `PORTCULLIS_ALLOWED_PEERS`
//! (from their annotations, when set), `PORTCULLIS_IDENTITY_URL`, `PORTCULLIS_POLICY_URL`, `PORTCULLIS_AUDIT_COLLECTOR_URL` (when
//! a collector is configured), `PORTCULLIS_TOKEN_PATH`,
//! `PORTCULLIS_TRUST_BUNDLE`, `PORTCULLIS_DATA_DIR`, `PORTCULLIS_SERVING_CERT_DIR` (the
//! serving certificate's mount, only when the pod has one), `PORTCULLIS_TRUST_DOMAIN`
//! (only when the trust domain is not `cluster.local`), and in regular-container mode
//! for run-to-completion pods `PORTCULLIS_EXIT_WHEN_APP_EXITS`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::version::Info;
use portcullis_api::injection::PortList;
use portcullis_crds::annotations::{
    ALLOWED_PEERS, APP_PORT, INBOUND_MODE, INJECT, SCOPES_MAP, SERVING_CERTIFICATE,
    SKIP_INBOUND_PORTS,
};
use portcullis_crds::policy::InboundMode;
use portcullis_crds::scope::ScopeMap;
use portcullis_crds::tenant::{DataClassification, TENANT_LABEL};

pub mod genuine;
mod guard;
mod patch;
mod probes;
mod sidecar;

pub use guard::{decide_ephemeral, decide_update};

pub use sidecar::{
    DATA_MOUNT, DATA_VOLUME, IDENTITY_TOKEN_MOUNT, IDENTITY_TOKEN_VOLUME, INIT_CONTAINER,
    PROXY_CONTAINER, SERVING_CERT_DIR_ENV, SERVING_CERT_MOUNT, SERVING_CERT_VOLUME,
    TRUST_BUNDLE_CONFIGMAP, TRUST_BUNDLE_KEY, TRUST_BUNDLE_MOUNT, TRUST_BUNDLE_VOLUME,
    XTABLES_LOCK_VOLUME,
};

/// Pod annotation the injector sets to its version on every pod it injects.
pub use portcullis_api::injection::INJECTED_ANNOTATION as INJECTED;

/// What the namespace's Tenant sets for the pods it injects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantPodDefaults {
    /// `spec.defaults.servingCertificateSecret`: the serving certificate Secret of pods
    /// without the `portcullis.dev/serving-certificate` annotation.
    pub serving_certificate_secret: Option<String>,
}

/// How strongly a namespace asks for injection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InjectionLevel {
    /// Not injected.
    Off,
    /// Pods are injected unless they opt out; pods the injector cannot inject are
    /// admitted unchanged with a warning.
    Enabled,
    /// Every pod must be injected: opt-outs, pods the injector cannot inject and pods
    /// skipping an app port are refused.
    Required(RequiredBy),
}

/// Why a namespace requires injection; the refusals say it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequiredBy {
    /// The label `portcullis.dev/inject=required`.
    NamespaceLabel,
    /// The namespace belongs to a Confidential or Restricted Tenant.
    Classification(TenantClassification),
}

/// The Tenant a namespace belongs to and its data classification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantClassification {
    /// The Tenant's name.
    pub tenant: String,
    /// Its `spec.dataClassification`.
    pub classification: DataClassification,
}

impl TenantClassification {
    /// Confidential and Restricted data may not bypass the proxy (DESIGN.md §6).
    fn requires_injection(&self) -> bool {
        matches!(
            self.classification,
            DataClassification::Confidential | DataClassification::Restricted
        )
    }
}

impl RequiredBy {
    /// Completes "…; " in a refusal: what requires injection.
    fn describe(&self, namespace: &str) -> String {
        match self {
            Self::NamespaceLabel => {
                format!("namespace {namespace:?} requires injection (label {INJECT}=required)")
            }
            Self::Classification(t) => format!(
                "namespace {namespace:?} belongs to Tenant {:?}, whose data classification {:?} requires \
                 the proxy on every pod",
                t.tenant, t.classification
            ),
        }
    }

    /// What a pod that opts out can do instead.
    fn opt_out_remedy(&self) -> &'static str {
        match self {
            Self::NamespaceLabel => "or ask an admin to set the namespace label to enabled",
            Self::Classification(_) => {
                "only pods of Public and Internal tenants may run without the proxy"
            }
        }
    }
}

impl InjectionLevel {
    /// The level of `namespace` with `labels`, whose Tenant (by the namespace's tenant
    /// label) is `tenant`. A Confidential or Restricted Tenant makes it required, whatever
    /// the namespace's own `portcullis.dev/inject` label says.
    pub fn of(
        namespace: &str,
        labels: &BTreeMap<String, String>,
        tenant: Option<TenantClassification>,
        settings: &InjectSettings,
    ) -> Self {
        if settings.excluded_namespaces.iter().any(|n| n == namespace)
            || namespace == settings.operator_namespace
        {
            return Self::Off;
        }
        if let Some(tenant) = tenant.filter(TenantClassification::requires_injection) {
            return Self::Required(RequiredBy::Classification(tenant));
        }
        match labels.get(INJECT).map(String::as_str) {
            Some("required") => Self::Required(RequiredBy::NamespaceLabel),
            Some("enabled") => Self::Enabled,
            Some("disabled") => Self::Off,
            _ if labels.contains_key(TENANT_LABEL) => Self::Enabled,
            _ => Self::Off,
        }
    }
}

/// Resource requests and limits of the injected containers (Kubernetes quantities).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyResources {
    /// CPU request (`10m`).
    pub cpu_request: String,
    /// Memory request (`20Mi`).
    pub memory_request: String,
    /// CPU limit (`500m`).
    pub cpu_limit: String,
    /// Memory limit (`128Mi`).
    pub memory_limit: String,
}

impl Default for ProxyResources {
    fn default() -> Self {
        Self {
            cpu_request: "10m".into(),
            memory_request: "20Mi".into(),
            cpu_limit: "500m".into(),
            memory_limit: "128Mi".into(),
        }
    }
}

/// What the injector adds, fixed for the operator's lifetime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectSettings {
    /// The proxy image (also runs the init step).
    pub proxy_image: String,
    /// `imagePullPolicy` of the injected containers (`IfNotPresent`).
    pub image_pull_policy: String,
    /// Value of the `portcullis.dev/injected` annotation.
    pub version: String,
    /// The uid the proxy runs as (2102).
    pub proxy_uid: i64,
    /// Requests and limits of the injected containers.
    pub resources: ProxyResources,
    /// The operator's identity service, e.g. `https://portcullis-operator.portcullis-system.svc:8443`.
    pub identity_url: String,
    /// The operator's policy server, e.g. `https://portcullis-operator.portcullis-system.svc:8090`.
    pub policy_url: String,
    /// The operator's namespace (never injected).
    pub operator_namespace: String,
    /// Other namespaces never injected.
    pub excluded_namespaces: Vec<String>,
    /// Lifetime of the projected identity token, in seconds (3600).
    pub token_expiration_seconds: i64,
    /// Redirect outbound TCP to the proxy's outbound port too (off: only inbound).
    pub redirect_outbound: bool,
    /// The SPIFFE trust domain (`cluster.local`); pods get `PORTCULLIS_TRUST_DOMAIN`
    /// when it is another.
    pub trust_domain: String,
    /// The audit collector proxies ship their records to
    /// (`PORTCULLIS_AUDIT_COLLECTOR_URL`); `None`: records stay in the pod.
    pub audit_collector_url: Option<String>,
}

/// The trust domain the proxy assumes when `PORTCULLIS_TRUST_DOMAIN` is not set.
pub use portcullis_api::injection::env::DEFAULT_TRUST_DOMAIN;

impl InjectSettings {
    /// Defaults for an operator in `operator_namespace` whose Service is `service`.
    pub fn new(proxy_image: impl Into<String>, operator_namespace: &str, service: &str) -> Self {
        use portcullis_api::injection::{IDENTITY_PORT, POLICY_PORT};
        Self {
            proxy_image: proxy_image.into(),
            image_pull_policy: "IfNotPresent".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            proxy_uid: i64::from(portcullis_api::injection::PROXY_UID),
            resources: ProxyResources::default(),
            identity_url: format!("https://{service}.{operator_namespace}.svc:{IDENTITY_PORT}"),
            policy_url: format!("https://{service}.{operator_namespace}.svc:{POLICY_PORT}"),
            operator_namespace: operator_namespace.into(),
            excluded_namespaces: vec![
                "kube-system".into(),
                "kube-public".into(),
                "kube-node-lease".into(),
            ],
            token_expiration_seconds: 3600,
            redirect_outbound: false,
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            audit_collector_url: None,
        }
    }
}

/// The API server's version, which decides native sidecar or regular container.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion {
    /// Major version (1).
    pub major: u32,
    /// Minor version (20, 29, ...).
    pub minor: u32,
}

impl ServerVersion {
    /// The first version whose API server keeps `restartPolicy: Always` on init containers.
    pub const NATIVE_SIDECARS: Self = Self {
        major: 1,
        minor: 29,
    };

    /// From `/version`; minors such as `"27+"` (managed clusters) are read by their
    /// digits. `None` when the fields are not numbers.
    pub fn from_info(info: &Info) -> Option<Self> {
        let digits = |s: &str| -> Option<u32> {
            let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
            s[..end].parse().ok()
        };
        Some(Self {
            major: digits(&info.major)?,
            minor: digits(&info.minor)?,
        })
    }

    /// Asks the API server. An unreadable version counts as 1.0: regular containers,
    /// which work everywhere.
    pub async fn detect(client: &kube::Client) -> Result<Self, kube::Error> {
        let info = client.apiserver_version().await?;
        Ok(Self::from_info(&info).unwrap_or(Self { major: 1, minor: 0 }))
    }

    /// Whether the proxy runs as a native sidecar.
    pub fn supports_native_sidecars(self) -> bool {
        self >= Self::NATIVE_SIDECARS
    }
}

/// Why a pod was admitted without a patch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotInjected {
    /// The namespace does not ask for injection.
    NamespaceNotOptedIn,
    /// The pod says `portcullis.dev/inject: disabled`.
    PodOptedOut,
    /// The pod already carries the proxy.
    AlreadyInjected,
    /// The injector cannot inject this pod (see the warning).
    Unsupported,
    /// An update that leaves the proxy as it is: only creations are injected.
    NotACreation,
}

/// What the webhook answers for a pod.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Admit with this patch.
    Inject {
        /// The JSON Patch adding the sidecar.
        patch: json_patch::Patch,
        /// Warnings for the client.
        warnings: Vec<String>,
    },
    /// Admit unchanged.
    Admit {
        /// Why nothing was added.
        reason: NotInjected,
        /// Warnings for the client.
        warnings: Vec<String>,
    },
    /// Refuse the pod with this message.
    Refuse {
        /// What the user sees.
        message: String,
    },
}

/// Why the injector cannot inject a pod: the text completes "cannot be injected: ".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsupported(pub String);

/// The facts about a pod the sidecar depends on, read once.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PodPlan {
    pub app_port: Option<u16>,
    pub inbound_mode: Option<InboundMode>,
    pub scopes_map: Option<String>,
    /// The `portcullis.dev/allowed-peers` annotation, checked.
    pub allowed_peers: Option<String>,
    pub skip_inbound_ports: PortList,
    /// The `kubernetes.io/tls` Secret the proxy serves clients outside the mesh with.
    pub serving_certificate: Option<String>,
    pub run_to_completion: bool,
    /// App probes that must go through the proxy's admin port.
    pub probes: probes::ProbePlan,
}

/// Decides what to do with `pod` in `namespace` (whose labels are `namespace_labels`),
/// not knowing its Tenant's classification (see [`decide_at`]).
pub fn decide(
    pod: &Pod,
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    settings: &InjectSettings,
    server: ServerVersion,
) -> Decision {
    let level = InjectionLevel::of(namespace, namespace_labels, None, settings);
    decide_at(pod, namespace, &level, settings, server)
}

/// Decides what to do with a new `pod` in `namespace`, which asks for `level`, when
/// its Tenant sets no pod defaults (see [`decide_with_defaults`]).
pub fn decide_at(
    pod: &Pod,
    namespace: &str,
    level: &InjectionLevel,
    settings: &InjectSettings,
    server: ServerVersion,
) -> Decision {
    decide_with_defaults(
        pod,
        namespace,
        level,
        &TenantPodDefaults::default(),
        settings,
        server,
    )
}

/// Decides what to do with a new `pod` in `namespace`, which asks for `level`; its
/// Tenant's `defaults` apply where the pod's annotations say nothing.
pub fn decide_with_defaults(
    pod: &Pod,
    namespace: &str,
    level: &InjectionLevel,
    defaults: &TenantPodDefaults,
    settings: &InjectSettings,
    server: ServerVersion,
) -> Decision {
    let required = match level {
        InjectionLevel::Off => return admit(NotInjected::NamespaceNotOptedIn, None),
        InjectionLevel::Enabled => None,
        InjectionLevel::Required(by) => Some(by),
    };
    let who = pod_display_name(pod, namespace);
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();

    if annotations.get(INJECT).map(String::as_str) == Some("disabled") {
        return match required {
            Some(by) => Decision::Refuse {
                message: format!(
                    "{who} cannot opt out of Portcullis: {}; remove the annotation {INJECT}: disabled, {}",
                    by.describe(namespace),
                    by.opt_out_remedy()
                ),
            },
            None => admit(NotInjected::PodOptedOut, None),
        };
    }

    let spec = pod.spec.clone().unwrap_or_default();
    let init_names = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str());
    let names: Vec<&str> = init_names
        .chain(spec.containers.iter().map(|c| c.name.as_str()))
        .collect();
    let reserved = names
        .iter()
        .find(|n| **n == PROXY_CONTAINER || **n == INIT_CONTAINER);
    if let (Some(_), Some(version)) = (reserved, annotations.get(INJECTED)) {
        // The annotation is a claim anyone can copy; only the containers themselves count.
        return match genuine::check(pod, settings) {
            // Genuine, but what it was injected with must still hold here.
            Ok(()) => {
                let before = genuine::without_injected_parts(pod);
                let bypass = plan(&before, &annotations).ok().and_then(|plan| {
                    bypass(
                        &who,
                        &before.spec.clone().unwrap_or_default(),
                        &plan,
                        settings,
                    )
                });
                match (required, bypass) {
                    (Some(by), Some(bypass)) => bypass.refusal(namespace, by),
                    _ => admit(NotInjected::AlreadyInjected, None),
                }
            }
            Err(mismatch) => Decision::Refuse {
                message: format!(
                    "{who} carries the annotation {INJECTED}: {version:?} but not what Portcullis injects: \
                     its {mismatch}; remove the {PROXY_CONTAINER:?} and {INIT_CONTAINER:?} containers, the \
                     portcullis-* volumes and the annotation, and the webhook injects the real proxy"
                ),
            },
        };
    }
    if let Some(reserved) = reserved {
        return Decision::Refuse {
            message: format!(
                "{who} has a container named {reserved:?}, a name Portcullis reserves for the containers \
                 it injects; rename that container, or annotate the pod {INJECT}: disabled to run it \
                 without the Portcullis proxy"
            ),
        };
    }

    match plan(pod, &annotations) {
        Ok(mut plan) => {
            if plan.serving_certificate.is_none() {
                plan.serving_certificate = defaults.serving_certificate_secret.clone();
            }
            let mut warnings = plan.probes.warnings.clone();
            match (required, bypass(&who, &spec, &plan, settings)) {
                (Some(by), Some(bypass)) => return bypass.refusal(namespace, by),
                (None, Some(bypass)) => warnings.push(format!("portcullis: {}", bypass.0)),
                _ => {}
            }
            if plan.app_port.is_none() {
                warnings.push(format!(
                    "portcullis: {who} declares no container port and no {APP_PORT}; the proxy will refuse inbound traffic"
                ));
            }
            let native = server.supports_native_sidecars();
            if plan.run_to_completion && !native {
                warnings.push(
                    "portcullis: API server < 1.29: the proxy is a regular container and exits only once it sees the app exit"
                        .to_owned(),
                );
            }
            Decision::Inject {
                patch: patch::build(pod, &plan, settings, native),
                warnings,
            }
        }
        Err(Unsupported(reason)) => match required {
            Some(by) => Decision::Refuse {
                message: format!(
                    "{who} cannot be injected with the Portcullis proxy: {reason}; {}",
                    by.describe(namespace)
                ),
            },
            None => admit(
                NotInjected::Unsupported,
                Some(format!(
                    "portcullis: {who} admitted without the proxy: {reason}"
                )),
            ),
        },
    }
}

/// A way an injectable pod would still let traffic around the proxy (a sentence).
struct Bypass(String);

impl Bypass {
    /// The refusal where injection is required.
    fn refusal(self, namespace: &str, by: &RequiredBy) -> Decision {
        Decision::Refuse {
            message: format!("{}; {}", self.0, by.describe(namespace)),
        }
    }
}

/// Skipping an app port, or an app container able to undo the redirect (NET_ADMIN in
/// the pod's network namespace can flush the init step's rules).
fn bypass(
    who: &str,
    spec: &k8s_openapi::api::core::v1::PodSpec,
    plan: &PodPlan,
    settings: &InjectSettings,
) -> Option<Bypass> {
    if let Some(port) = skipped_app_port(spec, plan) {
        return Some(Bypass(format!(
            "{who} asks the proxy to skip port {port} ({SKIP_INBOUND_PORTS}: {:?}), which its app \
             serves, so that traffic would bypass the proxy; remove {port} from the annotation (it \
             may list only ports no app container serves, such as an init container's)",
            plan.skip_inbound_ports.to_string()
        )));
    }
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers);
    containers
        .filter(|c| c.name != PROXY_CONTAINER && c.name != INIT_CONTAINER)
        .find_map(|c| {
            guard::redirect_risk(c.security_context.as_ref(), settings.proxy_uid).map(|risk| {
                Bypass(format!(
                    "{who}: container {:?} {risk}, which could undo the redirect to the Portcullis \
                     proxy; drop that privilege",
                    c.name
                ))
            })
        })
}

/// The app port, or a TCP port an app (regular) container declares, that the
/// skip list exempts from the redirect.
fn skipped_app_port(spec: &k8s_openapi::api::core::v1::PodSpec, plan: &PodPlan) -> Option<u16> {
    let declared = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
        .filter_map(|p| u16::try_from(p.container_port).ok());
    plan.app_port
        .into_iter()
        .chain(declared)
        .find(|port| plan.skip_inbound_ports.contains(*port))
}

fn admit(reason: NotInjected, warning: Option<String>) -> Decision {
    Decision::Admit {
        reason,
        warnings: warning.into_iter().collect(),
    }
}

pub(crate) fn pod_display_name(pod: &Pod, namespace: &str) -> String {
    let name = match (&pod.metadata.name, &pod.metadata.generate_name) {
        (Some(name), _) if !name.is_empty() => name.clone(),
        (_, Some(prefix)) => format!("{prefix}<generated>"),
        _ => "<unnamed>".to_owned(),
    };
    format!("pod {namespace}/{name}")
}

/// Reads what the sidecar depends on, or says why the pod cannot be injected.
fn plan(pod: &Pod, annotations: &BTreeMap<String, String>) -> Result<PodPlan, Unsupported> {
    use portcullis_api::injection::{PROXY_ADMIN_PORT, PROXY_INBOUND_PORT, PROXY_OUTBOUND_PORT};
    let spec = pod.spec.clone().unwrap_or_default();
    if spec.host_network == Some(true) {
        return Err(Unsupported(
            "it uses hostNetwork, so the init step's iptables rules would redirect the node's own traffic".into(),
        ));
    }
    if spec.containers.is_empty() {
        return Err(Unsupported("it has no containers".into()));
    }
    let all_containers = || {
        spec.init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
    };
    let declared_ports = || all_containers().flat_map(|c| c.ports.iter().flatten());
    for port in declared_ports() {
        if [PROXY_INBOUND_PORT, PROXY_OUTBOUND_PORT, PROXY_ADMIN_PORT]
            .iter()
            .any(|p| i32::from(*p) == port.container_port)
        {
            return Err(Unsupported(format!(
                "container port {} is one the proxy listens on (4143, 4140, 4191)",
                port.container_port
            )));
        }
    }
    for volume in spec.volumes.iter().flatten() {
        if sidecar::VOLUME_NAMES.contains(&volume.name.as_str()) {
            return Err(Unsupported(format!(
                "volume name {:?} is reserved for Portcullis",
                volume.name
            )));
        }
    }

    let app_port = match annotations.get(APP_PORT) {
        Some(value) => Some(resolve_app_port(value, declared_ports())?),
        None => spec.containers[0]
            .ports
            .iter()
            .flatten()
            .find(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    };
    let inbound_mode = match annotations.get(INBOUND_MODE) {
        Some(value) => Some(
            value
                .parse::<InboundMode>()
                .map_err(|e| Unsupported(format!("annotation {INBOUND_MODE}: {e}")))?,
        ),
        None => None,
    };
    let scopes_map = match annotations.get(SCOPES_MAP) {
        Some(value) => {
            let map: ScopeMap = serde_json::from_str(value).map_err(|e| {
                Unsupported(format!(
                    "annotation {SCOPES_MAP} is not a JSON scope map: {e}"
                ))
            })?;
            for (scope, rules) in &map {
                for rule in rules {
                    rule.validate().map_err(|e| {
                        Unsupported(format!("annotation {SCOPES_MAP}, scope {scope:?}: {e}"))
                    })?;
                }
            }
            Some(value.clone())
        }
        None => None,
    };
    let allowed_peers = match annotations.get(ALLOWED_PEERS) {
        Some(value) => {
            portcullis_crds::AllowedPeer::parse_list(value)
                .map_err(|e| Unsupported(format!("annotation {ALLOWED_PEERS}: {e}")))?;
            Some(value.clone())
        }
        None => None,
    };
    let skip_inbound_ports = match annotations.get(SKIP_INBOUND_PORTS) {
        Some(value) => value
            .parse::<PortList>()
            .map_err(|e| Unsupported(format!("annotation {SKIP_INBOUND_PORTS}: {e}")))?,
        None => PortList::default(),
    };
    let serving_certificate = match annotations.get(SERVING_CERTIFICATE) {
        Some(value) if portcullis_api::names::is_dns_subdomain(value.trim()) => {
            Some(value.trim().to_owned())
        }
        Some(value) => {
            return Err(Unsupported(format!(
                "annotation {SERVING_CERTIFICATE}: {value:?} is not a Secret name (lowercase letters, digits, '-' and '.')"
            )));
        }
        None => None,
    };
    let owned_by_job = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "Job" && o.api_version.starts_with("batch/"));
    let run_to_completion = owned_by_job
        || matches!(
            spec.restart_policy.as_deref(),
            Some("Never") | Some("OnFailure")
        );
    let probes = probes::plan(&spec.containers, &skip_inbound_ports);
    Ok(PodPlan {
        app_port,
        inbound_mode,
        scopes_map,
        allowed_peers,
        skip_inbound_ports,
        serving_certificate,
        run_to_completion,
        probes,
    })
}

/// `8080` or a port name declared by a container.
fn resolve_app_port<'a>(
    value: &str,
    mut declared: impl Iterator<Item = &'a k8s_openapi::api::core::v1::ContainerPort>,
) -> Result<u16, Unsupported> {
    let value = value.trim();
    if value.chars().all(|c| c.is_ascii_digit()) {
        return match value.parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(Unsupported(format!(
                "annotation {APP_PORT}: {value:?} is not a port (1-65535)"
            ))),
        };
    }
    declared
        .find(|p| p.name.as_deref() == Some(value))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .ok_or_else(|| {
            Unsupported(format!(
                "annotation {APP_PORT} names port {value:?}, which no container declares"
            ))
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn server_versions_parse_with_vendor_suffixes() {
        let info = |major: &str, minor: &str| Info {
            major: major.into(),
            minor: minor.into(),
            ..Info::default()
        };
        assert_eq!(
            ServerVersion::from_info(&info("1", "20")),
            Some(ServerVersion {
                major: 1,
                minor: 20
            })
        );
        assert_eq!(
            ServerVersion::from_info(&info("1", "29+")),
            Some(ServerVersion {
                major: 1,
                minor: 29
            })
        );
        assert_eq!(ServerVersion::from_info(&info("", "")), None);
        assert!(
            !ServerVersion {
                major: 1,
                minor: 28
            }
            .supports_native_sidecars()
        );
        assert!(
            ServerVersion {
                major: 1,
                minor: 29
            }
            .supports_native_sidecars()
        );
        assert!(ServerVersion { major: 2, minor: 0 }.supports_native_sidecars());
    }
}
