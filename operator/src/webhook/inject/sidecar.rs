//! The containers and volumes the injector adds, as Kubernetes objects.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, ExecAction, HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector,
    Probe, ProjectedVolumeSource, ResourceRequirements, SecretVolumeSource, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use portcullis_api::identity::IDENTITY_AUDIENCE;
use portcullis_api::injection::{
    ADMIN_LIVE_PATH, ADMIN_READY_PATH, PROXY_ADMIN_PORT, PROXY_INBOUND_PORT, PROXY_OUTBOUND_PORT,
};

use portcullis_api::injection::env::{self as vars, DEFAULT_TRUST_DOMAIN};

use super::{InjectSettings, PodPlan};

/// The injected proxy container.
pub use portcullis_api::injection::PROXY_CONTAINER;
/// The injected init container.
pub const INIT_CONTAINER: &str = "portcullis-init";
/// Volume with the projected identity token.
pub const IDENTITY_TOKEN_VOLUME: &str = "portcullis-identity-token";
/// Volume with the trust bundle.
pub const TRUST_BUNDLE_VOLUME: &str = "portcullis-trust-bundle";
/// The trust-bundle ConfigMap the operator publishes in every tenant namespace.
pub use crate::ca::TRUST_BUNDLE_CONFIGMAP;
/// The proxy's writable directory (audit spool) on its read-only root.
pub const DATA_VOLUME: &str = "portcullis-data";
/// The init step's `/run` (iptables lock file) on its read-only root.
pub const XTABLES_LOCK_VOLUME: &str = "portcullis-xtables-lock";

/// The bring-your-own serving certificate Secret (only when the pod or its Tenant names
/// one).
pub const SERVING_CERT_VOLUME: &str = "portcullis-serving-certificate";
/// Where that Secret is mounted (read-only) in the proxy.
pub const SERVING_CERT_MOUNT: &str = "/var/run/portcullis.dev/serving-certificate";
/// The proxy's variable naming that directory.
pub use portcullis_api::injection::env::SERVING_CERT_DIR as SERVING_CERT_DIR_ENV;
// Where the token, the trust bundle and the data volume are mounted: the proxy's
// defaults, so one definition serves both.
pub use portcullis_api::injection::env::{
    DATA_MOUNT, IDENTITY_TOKEN_MOUNT, TRUST_BUNDLE_KEY, TRUST_BUNDLE_MOUNT,
};

/// Every volume name the injector adds.
pub(super) const VOLUME_NAMES: [&str; 5] = [
    IDENTITY_TOKEN_VOLUME,
    TRUST_BUNDLE_VOLUME,
    DATA_VOLUME,
    XTABLES_LOCK_VOLUME,
    SERVING_CERT_VOLUME,
];

const PROXY_BINARY: &str = "portcullis-proxy";
/// How long the startup probe / postStart hook wait for the proxy.
const READY_WAIT_SECONDS: i32 = 120;

fn resources(settings: &InjectSettings) -> ResourceRequirements {
    let r = &settings.resources;
    let pair = |cpu: &str, memory: &str| {
        BTreeMap::from([
            ("cpu".to_owned(), Quantity(cpu.to_owned())),
            ("memory".to_owned(), Quantity(memory.to_owned())),
        ])
    };
    ResourceRequirements {
        requests: Some(pair(&r.cpu_request, &r.memory_request)),
        limits: Some(pair(&r.cpu_limit, &r.memory_limit)),
        ..ResourceRequirements::default()
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// `portcullis-init`: programs the redirect, then exits.
pub(super) fn init_container(plan: &PodPlan, settings: &InjectSettings) -> Container {
    let mut args = strings(&["init", "--inbound-port"]);
    args.push(PROXY_INBOUND_PORT.to_string());
    args.push("--proxy-uid".into());
    args.push(settings.proxy_uid.to_string());
    if !plan.skip_inbound_ports.is_empty() {
        args.push("--skip-inbound-ports".into());
        args.push(plan.skip_inbound_ports.to_string());
    }
    if settings.redirect_outbound {
        args.push("--outbound-port".into());
        args.push(PROXY_OUTBOUND_PORT.to_string());
    }
    Container {
        name: INIT_CONTAINER.into(),
        image: Some(settings.proxy_image.clone()),
        image_pull_policy: Some(settings.image_pull_policy.clone()),
        command: Some(strings(&[PROXY_BINARY])),
        args: Some(args),
        resources: Some(resources(settings)),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(strings(&["NET_ADMIN", "NET_RAW"])),
                drop: Some(strings(&["ALL"])),
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: XTABLES_LOCK_VOLUME.into(),
            mount_path: "/run".into(),
            ..VolumeMount::default()
        }]),
        // `kubectl describe pod` then shows which rule failed and the fix.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: None,
                field_path: field_path.into(),
            }),
            ..EnvVarSource::default()
        }),
    }
}

fn http_probe(path: &str, period_seconds: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(i32::from(PROXY_ADMIN_PORT)),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period_seconds),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    }
}

/// `portcullis-proxy`: a native sidecar (`native`) or the first regular container.
pub(super) fn proxy_container(
    plan: &PodPlan,
    settings: &InjectSettings,
    native: bool,
) -> Container {
    let mut env_vars = vec![
        field_env(vars::POD_NAME, "metadata.name"),
        field_env(vars::POD_NAMESPACE, "metadata.namespace"),
        field_env(vars::SERVICE_ACCOUNT, "spec.serviceAccountName"),
    ];
    if let Some(port) = plan.app_port {
        env_vars.push(env(vars::APP_PORT, port.to_string()));
    }
    if let Some(mode) = plan.inbound_mode {
        env_vars.push(env(vars::INBOUND_MODE, mode.as_str()));
    }
    if let Some(map) = &plan.scopes_map {
        env_vars.push(env(vars::SCOPES_MAP, map.clone()));
    }
    if let Some(peers) = &plan.allowed_peers {
        env_vars.push(env(vars::ALLOWED_PEERS, peers.clone()));
    }
    if !plan.probes.originals.is_empty() {
        // A BTreeMap of plain strings and numbers always serialises.
        let probes = serde_json::to_string(&plan.probes.originals).unwrap_or_default();
        env_vars.push(env(vars::APP_PROBES, probes));
    }
    env_vars.extend([
        env(vars::IDENTITY_URL, settings.identity_url.clone()),
        env(vars::POLICY_URL, settings.policy_url.clone()),
        env(vars::TOKEN_PATH, vars::DEFAULT_TOKEN_PATH),
        env(vars::TRUST_BUNDLE, vars::DEFAULT_TRUST_BUNDLE),
        env(vars::DATA_DIR, DATA_MOUNT),
    ]);
    if let Some(url) = &settings.audit_collector_url {
        env_vars.push(env(vars::AUDIT_COLLECTOR_URL, url.clone()));
    }
    if plan.serving_certificate.is_some() {
        env_vars.push(env(SERVING_CERT_DIR_ENV, SERVING_CERT_MOUNT));
    }
    // The proxy assumes cluster.local; say so only when it differs.
    if settings.trust_domain != DEFAULT_TRUST_DOMAIN {
        env_vars.push(env(vars::TRUST_DOMAIN, settings.trust_domain.clone()));
    }
    if !native && plan.run_to_completion {
        env_vars.push(env(vars::EXIT_WHEN_APP_EXITS, "true"));
    }
    let port = |name: &str, number: u16| ContainerPort {
        name: Some(name.into()),
        container_port: i32::from(number),
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    };
    let mount = |name: &str, path: &str, read_only: bool| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    };
    let mut container = Container {
        name: PROXY_CONTAINER.into(),
        image: Some(settings.proxy_image.clone()),
        image_pull_policy: Some(settings.image_pull_policy.clone()),
        command: Some(strings(&[PROXY_BINARY])),
        args: Some(strings(&["run", "--config-from-env"])),
        env: Some(env_vars),
        ports: Some(vec![
            port("pc-inbound", PROXY_INBOUND_PORT),
            port("pc-admin", PROXY_ADMIN_PORT),
        ]),
        resources: Some(resources(settings)),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(settings.proxy_uid),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                add: None,
                drop: Some(strings(&["ALL"])),
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(
            [
                mount(IDENTITY_TOKEN_VOLUME, IDENTITY_TOKEN_MOUNT, true),
                mount(TRUST_BUNDLE_VOLUME, TRUST_BUNDLE_MOUNT, true),
                mount(DATA_VOLUME, DATA_MOUNT, false),
            ]
            .into_iter()
            .chain(
                plan.serving_certificate
                    .as_ref()
                    .map(|_| mount(SERVING_CERT_VOLUME, SERVING_CERT_MOUNT, true)),
            )
            .collect(),
        ),
        readiness_probe: Some(http_probe(ADMIN_READY_PATH, 5, 3)),
        liveness_probe: Some(http_probe(ADMIN_LIVE_PATH, 10, 3)),
        ..Container::default()
    };
    if native {
        container.restart_policy = Some("Always".into());
        container.startup_probe = Some(http_probe(ADMIN_READY_PATH, 1, READY_WAIT_SECONDS));
    } else {
        let wait = format!("{READY_WAIT_SECONDS}s");
        container.lifecycle = Some(Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(strings(&[PROXY_BINARY, "wait-ready", "--timeout", &wait])),
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        });
    }
    container
}

/// The volumes, in the order they are appended.
pub(super) fn volumes(plan: &PodPlan, settings: &InjectSettings) -> Vec<Volume> {
    let empty_dir = |name: &str| Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    };
    vec![
        Volume {
            name: IDENTITY_TOKEN_VOLUME.into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(IDENTITY_AUDIENCE.into()),
                        expiration_seconds: Some(settings.token_expiration_seconds),
                        path: "token".into(),
                    }),
                    ..VolumeProjection::default()
                }]),
                default_mode: None,
            }),
            ..Volume::default()
        },
        Volume {
            name: TRUST_BUNDLE_VOLUME.into(),
            config_map: Some(ConfigMapVolumeSource {
                name: TRUST_BUNDLE_CONFIGMAP.into(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        empty_dir(DATA_VOLUME),
        empty_dir(XTABLES_LOCK_VOLUME),
    ]
    .into_iter()
    // Optional: a missing Secret never keeps the pod from starting; the proxy then
    // serves the workload certificate and the Tenant's condition says why.
    .chain(plan.serving_certificate.as_ref().map(|secret| Volume {
        name: SERVING_CERT_VOLUME.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.clone()),
            optional: Some(true),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }))
    .collect()
}
