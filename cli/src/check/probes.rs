//! The verdicts of `check`, as pure functions of what the API server returned (so each
//! is testable with fixed objects and a fixed clock).

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use k8s_openapi::apimachinery::pkg::version::Info;
use kube::ResourceExt;
use portcullis_crds::Tenant;
use portcullis_crds::annotations::INJECT;
use portcullis_crds::tenant::{DataClassification, TENANT_LABEL};

use super::report::{CheckResult, bounded};

/// The condition a Restricted Tenant reports its key custody under (the operator's
/// `kek_custody::KEY_CUSTODY`).
const KEY_CUSTODY: &str = "KeyCustody";
use crate::cert::{Expiry, parse_pem_bundle};
use crate::identity::PROXY_CONTAINER;
use crate::output::{relative, short_duration, timestamp, timestamp_relative};

/// First Kubernetes minor release with native sidecars (init containers with
/// `restartPolicy: Always`) on by default.
pub const NATIVE_SIDECAR_MINOR: u32 = 29;
/// CA certificates this close to expiry are flagged.
pub const CA_EXPIRY_WARNING: SignedDuration = SignedDuration::from_hours(30 * 24);
/// Secret holding the roots.
pub const ROOT_SECRET: &str = "portcullis-ca-root";
/// Secret holding the issuing intermediate.
pub const INTERMEDIATE_SECRET: &str = "portcullis-ca-intermediate";
/// The trust-bundle ConfigMap in tenant namespaces, and its data key.
pub const TRUST_BUNDLE: (&str, &str) = ("portcullis-trust-bundle", "ca-bundle.crt");
/// Namespaces the injector never touches (besides the operator's).
pub const NEVER_INJECTED: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

/// `v1.33.1`: native sidecars or not.
pub fn judge_version(info: &Info) -> CheckResult {
    let number = |s: &str| -> Option<u32> {
        let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    let shown = if info.git_version.is_empty() {
        format!("v{}.{}", info.major, info.minor)
    } else {
        info.git_version.clone()
    };
    match (number(&info.major), number(&info.minor)) {
        (Some(1), Some(minor)) if minor < NATIVE_SIDECAR_MINOR => CheckResult::warn(
            "API server",
            format!("{shown}: before 1.{NATIVE_SIDECAR_MINOR}, no native sidecars; the proxy runs as a regular container"),
        )
        .hint(format!(
            "upgrade to Kubernetes 1.{NATIVE_SIDECAR_MINOR}+ so the proxy starts before and stops after the app (Jobs finish cleanly)"
        )),
        (Some(_), Some(_)) => {
            CheckResult::pass("API server", format!("{shown}: native sidecars supported"))
        }
        _ => CheckResult::warn("API server", format!("{shown}: version not understood")),
    }
}

/// A webhook configuration: present, with every webhook carrying a caBundle.
/// `webhooks` is `(webhook name, caBundle set)`, None when the configuration is missing.
pub fn judge_webhooks(
    kind: &str,
    name: &str,
    webhooks: Option<&[(String, bool)]>,
    operator_namespace: &str,
) -> CheckResult {
    let check = format!("Webhook {name}");
    let Some(webhooks) = webhooks else {
        return CheckResult::fail(check, format!("{kind} {name} not found")).hint(format!(
            "install Portcullis: helm install portcullis charts/portcullis -n {operator_namespace} --create-namespace"
        ));
    };
    if webhooks.is_empty() {
        return CheckResult::fail(check, format!("{kind} {name} has no webhooks"))
            .hint("reinstall or upgrade the Helm release");
    }
    let missing: Vec<String> = webhooks
        .iter()
        .filter(|(_, has_bundle)| !has_bundle)
        .map(|(n, _)| n.clone())
        .collect();
    if missing.is_empty() {
        CheckResult::pass(
            check,
            format!("{} webhook(s), caBundle set", webhooks.len()),
        )
    } else {
        CheckResult::fail(
            check,
            format!("caBundle empty: the API server cannot call {}", missing.join(", ")),
        )
        .hint(format!(
            "the operator patches caBundle when it starts; check it runs: kubectl -n {operator_namespace} logs deploy/portcullis-operator"
        ))
    }
}

/// The operator Deployment(s) and their pods.
pub fn judge_operator(namespace: &str, deployments: &[Deployment], pods: &[Pod]) -> CheckResult {
    let Some(deployment) = deployments.first() else {
        return CheckResult::warn(
            "Operator",
            format!("no operator Deployment in namespace {namespace}"),
        )
        .hint("install it with helm install portcullis charts/portcullis, or pass --operator-namespace where it runs");
    };
    let name = deployment.name_any();
    let want = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let ready = deployment
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let unready: Vec<String> = pods
        .iter()
        .filter(|p| !pod_ready(p))
        .map(|p| format!("pod {}: {}", p.name_any(), pod_problem(p)))
        .collect();
    let message = format!("deployment {name}: {ready}/{want} ready");
    let logs =
        format!("kubectl -n {namespace} logs deploy/{name}; kubectl -n {namespace} describe pods");
    if want == 0 {
        // Scaled to zero: the webhooks (failurePolicy Fail) refuse pods in opted-in
        // namespaces and sidecars get no certificates or policy updates.
        CheckResult::fail("Operator", format!("{message}: scaled to zero, so pods in opted-in namespaces are refused and sidecars get no certificates or policy updates"))
            .hint(format!("kubectl -n {namespace} scale deployment {name} --replicas=2"))
    } else if ready == 0 {
        CheckResult::fail("Operator", message)
            .details(unready)
            .hint(logs)
    } else if ready < want {
        CheckResult::warn("Operator", message)
            .details(unready)
            .hint(logs)
    } else {
        CheckResult::pass("Operator", message)
    }
}

/// The audit collector's StatefulSet, Service and the Secret the operator writes it.
pub const AUDIT_COLLECTOR: &str = "portcullis-audit";

/// Where the operator's Deployment says its key-encryption key is kept
/// (`PORTCULLIS_KEK_PROVIDER` / `--kek-provider` and the PKCS#11 or KMS settings).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KekProviderSeen {
    /// The default: a Secret in the operator's namespace.
    Secret,
    /// An HSM key.
    Pkcs11 {
        /// The token label or slot, as configured.
        token: Option<String>,
        /// The key's label.
        key_label: Option<String>,
    },
    /// A KMS v2 plugin.
    Kms {
        /// The plugin's socket, as configured.
        socket: Option<String>,
        /// The plugin's key id recorded in the KEK Secret (`kms-key-id`; never the
        /// ciphertext), once read.
        key_id: Option<String>,
    },
    /// No operator Deployment to read it from.
    Unknown,
}

/// The Secret holding the operator's key-encryption key (the operator's
/// `envelope::KEK_SECRET_NAME`).
pub const KEK_SECRET: &str = "portcullis-kek";
/// Its data key holding the KMS plugin's key id, public (the operator's
/// `envelope::kms::KMS_KEY_ID_KEY`); the ciphertext beside it is never read.
pub const KMS_KEY_ID_KEY: &str = "kms-key-id";

/// The KEK provider the operator container of `deployment` is configured with: its
/// environment (how the chart sets it), then its arguments.
pub fn kek_provider(deployment: Option<&Deployment>) -> KekProviderSeen {
    let Some(container) = deployment
        .and_then(|d| d.spec.as_ref())
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| {
            s.containers
                .iter()
                .find(|c| c.name == "operator")
                .or(s.containers.first())
        })
    else {
        return KekProviderSeen::Unknown;
    };
    let setting = |env: &str, flag: &str| -> Option<String> {
        let from_env = container
            .env
            .iter()
            .flatten()
            .find(|e| e.name == env)
            .and_then(|e| e.value.clone());
        let args = container.args.iter().flatten();
        let from_args = args.clone().zip(args.skip(1)).find_map(|(a, b)| {
            if a == flag {
                Some(b.clone())
            } else {
                a.strip_prefix(&format!("{flag}=")).map(str::to_owned)
            }
        });
        from_args.or(from_env)
    };
    match setting("PORTCULLIS_KEK_PROVIDER", "--kek-provider").as_deref() {
        Some("pkcs11") => KekProviderSeen::Pkcs11 {
            token: setting("PORTCULLIS_PKCS11_TOKEN_LABEL", "--pkcs11-token-label")
                .map(|l| format!("token {l:?}"))
                .or_else(|| {
                    setting("PORTCULLIS_PKCS11_SLOT", "--pkcs11-slot").map(|s| format!("slot {s}"))
                }),
            key_label: setting("PORTCULLIS_PKCS11_KEY_LABEL", "--pkcs11-key-label"),
        },
        Some("kms") => KekProviderSeen::Kms {
            socket: setting("PORTCULLIS_KMS_SOCKET", "--kms-socket"),
            key_id: None,
        },
        _ => KekProviderSeen::Secret,
    }
}

/// Where the key-encryption key is kept, from the operator's configuration and the
/// Restricted Tenants' `KeyCustody` conditions: a KEK in a Secret is a warning only once
/// Restricted data depends on it.
pub fn judge_key_custody(
    namespace: &str,
    provider: &KekProviderSeen,
    tenants: &[Tenant],
) -> CheckResult {
    const CHECK: &str = "Key-encryption key";
    let restricted: Vec<&Tenant> = tenants
        .iter()
        .filter(|t| t.spec.data_classification == DataClassification::Restricted)
        .collect();
    let unbacked: Vec<String> = restricted
        .iter()
        .filter(|t| {
            t.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == KEY_CUSTODY && c.status == "False")
            })
        })
        .map(|t| format!("tenant {}", t.name_any()))
        .collect();
    let kept = match provider {
        KekProviderSeen::Secret => format!("a Secret in {namespace}"),
        KekProviderSeen::Pkcs11 { token, key_label } => format!(
            "PKCS#11 (HSM) key {} in {}",
            key_label.as_deref().unwrap_or("?"),
            token.as_deref().unwrap_or("an unnamed token")
        ),
        KekProviderSeen::Kms { socket, key_id } => format!(
            "KMS v2 plugin on {} (KMS key id {})",
            socket.as_deref().unwrap_or("an unnamed socket"),
            key_id.as_deref().unwrap_or("not readable")
        ),
        KekProviderSeen::Unknown => "provider unknown (no operator Deployment)".to_owned(),
    };
    if unbacked.is_empty() {
        let message = if restricted.is_empty() {
            format!("{kept}; no Restricted tenant depends on it")
        } else {
            format!(
                "{kept}; {} Restricted tenant(s), none reporting a software KEK",
                restricted.len()
            )
        };
        return CheckResult::pass(CHECK, message);
    }
    CheckResult::warn(
        CHECK,
        format!(
            "{kept}; {} Restricted tenant(s) have their keys wrapped by a KEK kept in a Secret in {namespace} (KeyCustody=False)",
            unbacked.len()
        ),
    )
    .details(unbacked)
    .hint(format!(
        "move the KEK into an HSM or a KMS (--kek-provider pkcs11 or kms; chart: kek.provider); until then limit who may read Secrets in {namespace} and keep its backups apart from the cluster's"
    ))
}

/// The audit collector: off (records stay in pods), or its StatefulSet and whether its
/// certificate Secret exists.
pub fn judge_audit_collector(
    namespace: &str,
    collector: Option<&StatefulSet>,
    pods: &[Pod],
    certificate: bool,
) -> CheckResult {
    const CHECK: &str = "Audit collector";
    let Some(collector) = collector else {
        return CheckResult::pass(
            CHECK,
            "not installed: records stay in each pod (stdout and its encrypted file)",
        );
    };
    let name = collector.name_any();
    let ready = collector
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let message = format!("statefulset {name}: {ready}/1 ready");
    if ready >= 1 {
        return CheckResult::pass(
            CHECK,
            format!("{message}; proxies ship their records to it"),
        );
    }
    let unready: Vec<String> = pods
        .iter()
        .filter(|p| !pod_ready(p))
        .map(|p| format!("pod {}: {}", p.name_any(), pod_problem(p)))
        .collect();
    let result = CheckResult::fail(
        CHECK,
        format!("{message}: proxies keep records in their spool, and Confidential and Restricted tenants are refused once it is full"),
    )
    .details(unready);
    if certificate {
        result.hint(format!(
            "kubectl -n {namespace} logs statefulset/{name}; kubectl -n {namespace} describe pod {name}-0"
        ))
    } else {
        result.hint(format!(
            "Secret {namespace}/{name}-tls is missing: the operator writes it when it runs with PORTCULLIS_AUDIT_SERVICE={name} (the chart sets it with audit.collector.enabled); check kubectl -n {namespace} logs deploy/portcullis-operator"
        ))
    }
}

/// Whether the pod's Ready condition is True.
pub(super) fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// `CrashLoopBackOff (container operator)` or the pod phase.
fn pod_problem(pod: &Pod) -> String {
    let status = pod.status.clone().unwrap_or_default();
    for container in status.container_statuses.iter().flatten() {
        if let Some(waiting) = container.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            let reason = waiting
                .reason
                .clone()
                .unwrap_or_else(|| "Waiting".to_owned());
            return format!("{reason} (container {})", container.name);
        }
    }
    status.phase.unwrap_or_else(|| "Unknown".to_owned())
}

/// Which CA certificate a Secret holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaKind {
    /// The trust anchor, `portcullis-ca-root`.
    Root,
    /// The issuing intermediate, `portcullis-ca-intermediate`.
    Intermediate,
}

impl CaKind {
    fn secret(self) -> &'static str {
        match self {
            Self::Root => ROOT_SECRET,
            Self::Intermediate => INTERMEDIATE_SECRET,
        }
    }

    fn check(self) -> &'static str {
        match self {
            Self::Root => "CA root",
            Self::Intermediate => "CA intermediate",
        }
    }

    /// Where the operator writes the certificate; the other key is accepted too.
    fn data_keys(self) -> [&'static str; 2] {
        match self {
            Self::Root => ["ca.crt", "tls.crt"],
            Self::Intermediate => ["tls.crt", "ca.crt"],
        }
    }
}

/// A CA Secret: present, parseable, and how long until the certificate expires.
pub fn judge_ca(
    kind: CaKind,
    secret: Option<&Secret>,
    namespace: &str,
    deployment: &str,
    now: Timestamp,
) -> CheckResult {
    let check = kind.check();
    let secret_name = kind.secret();
    let Some(secret) = secret else {
        return CheckResult::fail(check, format!("Secret {namespace}/{secret_name} not found"))
            .hint(format!(
                "the operator creates its CA on first start: check it runs in {namespace} (or pass --operator-namespace)"
            ));
    };
    let data = secret.data.clone().unwrap_or_default();
    let Some((key, pem)) = kind
        .data_keys()
        .into_iter()
        .find_map(|k| data.get(k).map(|v| (k, v)))
    else {
        return CheckResult::fail(
            check,
            format!(
                "Secret {namespace}/{secret_name} has no {} entry",
                kind.data_keys().join(" or ")
            ),
        );
    };
    let cert = match parse_pem_bundle(&pem.0) {
        Ok(mut certs) => certs.swap_remove(0),
        Err(e) => {
            return CheckResult::fail(check, format!("{secret_name}/{key}: {e}"));
        }
    };
    let mut details = Vec::new();
    if kind == CaKind::Root
        && let Some(next) = data
            .get("next.crt")
            .and_then(|p| parse_pem_bundle(&p.0).ok())
        && let Some(next) = next.first()
    {
        details.push(format!(
            "next root published, valid until {}",
            timestamp_relative(next.not_after, now)
        ));
    }
    let restart = format!("kubectl -n {namespace} rollout restart deploy/{deployment}");
    let logs = format!("kubectl -n {namespace} logs deploy/{deployment}");
    let result = match (cert.expiry(now, CA_EXPIRY_WARNING), kind) {
        (Expiry::Valid { .. }, _) => {
            return CheckResult::pass(
                check,
                format!("valid until {}", timestamp_relative(cert.not_after, now)),
            )
            .details(details);
        }
        (Expiry::NotYetValid { starts_in }, _) => CheckResult::fail(
            check,
            format!("not valid for another {}", short_duration(starts_in)),
        )
        .hint("check the clocks of the nodes and of the machine that created the CA"),
        (Expiry::Expiring { left }, CaKind::Root) => CheckResult::warn(
            check,
            format!("trust anchor expires in {} ({})", short_duration(left), timestamp(cert.not_after)),
        )
        .hint(format!(
            "rotation is overdue: the operator publishes a next root long before expiry; check it runs ({logs}). \
             Last resort before expiry (workloads must restart afterwards): kubectl -n {namespace} delete secret {ROOT_SECRET} {INTERMEDIATE_SECRET} && {restart}"
        )),
        (Expiry::Expired { ago }, CaKind::Root) => CheckResult::fail(
            check,
            format!(
                "trust anchor EXPIRED {} ago ({}): mTLS between workloads fails",
                short_duration(ago),
                timestamp(cert.not_after)
            ),
        )
        .hint(format!(
            "create a new CA: kubectl -n {namespace} delete secret {ROOT_SECRET} {INTERMEDIATE_SECRET} && {restart}; \
             then restart injected workloads (kubectl rollout restart deployment -n <namespace>) so they load the new trust bundle"
        )),
        (Expiry::Expiring { left }, CaKind::Intermediate) => CheckResult::warn(
            check,
            format!("expires in {} ({})", short_duration(left), timestamp(cert.not_after)),
        )
        .hint(format!(
            "the operator replaces the intermediate every 30d and has not: check it runs ({logs}). \
             To force a new one (the root stays, workloads keep working): kubectl -n {namespace} delete secret {INTERMEDIATE_SECRET} && {restart}"
        )),
        (Expiry::Expired { ago }, CaKind::Intermediate) => CheckResult::fail(
            check,
            format!(
                "EXPIRED {} ago ({}): workloads cannot renew their certificates",
                short_duration(ago),
                timestamp(cert.not_after)
            ),
        )
        .hint(format!(
            "issue a new intermediate: kubectl -n {namespace} delete secret {INTERMEDIATE_SECRET} && {restart}"
        )),
    };
    result.details(details)
}

/// How strongly a namespace asks for injection (the operator's `InjectionLevel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectionLevel {
    /// Pods are injected unless they opt out (`portcullis.dev/inject: disabled`).
    Enabled,
    /// Every pod must carry the proxy: the injector refuses opt-outs and pods it cannot
    /// inject (label `inject=required`, or a Confidential or Restricted Tenant).
    Required,
}

/// Whether and how the injector injects pods of `namespace`, whose Tenant (by its
/// tenant label) has `classification` (mirrors the operator's rule:
/// `inject=enabled|required`, or a tenant label unless `inject=disabled`; a
/// Confidential or Restricted Tenant requires it whatever the labels say).
pub fn injection_level(
    namespace: &Namespace,
    operator_namespace: &str,
    classification: Option<DataClassification>,
) -> Option<InjectionLevel> {
    let name = namespace.name_any();
    if name == operator_namespace || NEVER_INJECTED.contains(&name.as_str()) {
        return None;
    }
    if matches!(
        classification,
        Some(DataClassification::Confidential | DataClassification::Restricted)
    ) {
        return Some(InjectionLevel::Required);
    }
    let labels = namespace.labels();
    match labels.get(INJECT).map(String::as_str) {
        Some("required") => Some(InjectionLevel::Required),
        Some("enabled") => Some(InjectionLevel::Enabled),
        Some("disabled") => None,
        _ => labels
            .contains_key(TENANT_LABEL)
            .then_some(InjectionLevel::Enabled),
    }
}

fn has_proxy(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|s| {
        s.containers.iter().any(|c| c.name == PROXY_CONTAINER)
            || s.init_containers
                .iter()
                .flatten()
                .any(|c| c.name == PROXY_CONTAINER)
    })
}

/// Pods of opted-in namespaces that run without the proxy.
///
/// A pod that opts out (`portcullis.dev/inject: disabled`) where the namespace allows
/// it is a decision its owner made, so it is only counted in the message; like
/// `istioctl analyze`, which skips pods annotated `sidecar.istio.io/inject: "false"`
/// rather than warn about them on every run. Where the namespace requires the proxy,
/// the injector refuses such pods today, so one that runs slipped in before the
/// requirement or while the webhook was down: a failure, as is any other pod without
/// the proxy (its port is served unauthenticated). A hostNetwork pod in a namespace
/// that merely enables injection cannot be injected at all: a warning.
pub fn judge_injection(opted_in: &BTreeMap<String, (InjectionLevel, Vec<Pod>)>) -> CheckResult {
    if opted_in.is_empty() {
        return CheckResult::pass(
            "Injection",
            format!("no namespace opted in yet (label {INJECT}=enabled, or one a Tenant owns)"),
        );
    }
    let (mut injected, mut opted_out) = (0usize, 0usize);
    let (mut missing, mut unsupported) = (Vec::new(), Vec::new());
    for (namespace, (level, pods)) in opted_in {
        let required = *level == InjectionLevel::Required;
        for pod in pods {
            let finished = pod
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|p| p == "Succeeded" || p == "Failed");
            if finished || pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let opts_out = pod
                .annotations()
                .get(INJECT)
                .is_some_and(|v| v == "disabled");
            let host_network = pod.spec.as_ref().and_then(|s| s.host_network) == Some(true);
            if has_proxy(pod) {
                injected += 1;
            } else if required && (opts_out || host_network) {
                missing.push(format!(
                    "{namespace}/{} ({}, but the namespace requires the proxy)",
                    pod.name_any(),
                    if opts_out {
                        format!("opts out with {INJECT}: disabled")
                    } else {
                        "hostNetwork".to_owned()
                    }
                ));
            } else if opts_out {
                opted_out += 1;
            } else if host_network {
                unsupported.push(format!(
                    "{namespace}/{} (hostNetwork: cannot be injected)",
                    pod.name_any()
                ));
            } else {
                missing.push(format!("{namespace}/{}", pod.name_any()));
            }
        }
    }
    let opted_out_note = if opted_out > 0 {
        format!("; {opted_out} opted out with {INJECT}: disabled")
    } else {
        String::new()
    };
    let unprotected = missing.len() + unsupported.len();
    if missing.is_empty() && unsupported.is_empty() {
        return CheckResult::pass(
            "Injection",
            format!(
                "{injected} pod(s) in {} opted-in namespace(s) carry the proxy{opted_out_note}",
                opted_in.len()
            ),
        );
    }
    let message = format!(
        "{unprotected} pod(s) in opted-in namespaces run without the proxy{opted_out_note}"
    );
    let namespaces: Vec<&str> = opted_in.keys().map(String::as_str).collect();
    let details = bounded(missing.iter().chain(&unsupported).cloned().collect());
    if missing.is_empty() {
        CheckResult::warn("Injection", message).details(details).hint(
            "pods with hostNetwork cannot be injected: move them out of the namespace or accept them unprotected",
        )
    } else {
        CheckResult::fail("Injection", message).details(details).hint(format!(
            "they started before injection was enabled or required, or while the webhook was down: restart them, e.g. kubectl rollout restart deployment -n {}",
            namespaces.first().copied().unwrap_or("<namespace>")
        ))
    }
}

/// The trust bundle in each tenant namespace: present and holding a valid certificate.
pub fn judge_trust_bundles(
    bundles: &BTreeMap<String, Option<ConfigMap>>,
    operator_namespace: &str,
    now: Timestamp,
) -> Option<CheckResult> {
    if bundles.is_empty() {
        return None;
    }
    let (name, key) = TRUST_BUNDLE;
    let mut problems = Vec::new();
    for (namespace, config_map) in bundles {
        let pem = config_map
            .as_ref()
            .and_then(|c| c.data.as_ref())
            .and_then(|d| d.get(key));
        let problem = match pem.map(|p| parse_pem_bundle(p.as_bytes())) {
            None => Some("missing".to_owned()),
            Some(Err(e)) => Some(e.to_string()),
            Some(Ok(certs)) => {
                let valid = certs
                    .iter()
                    .any(|c| c.not_before <= now && now < c.not_after);
                (!valid).then(|| {
                    let latest = certs.iter().map(|c| c.not_after).max();
                    format!(
                        "no certificate valid now (latest expired {})",
                        latest.map_or_else(|| "?".to_owned(), |t| relative(t, now))
                    )
                })
            }
        };
        if let Some(problem) = problem {
            problems.push(format!("{namespace}/{name}: {problem}"));
        }
    }
    Some(if problems.is_empty() {
        CheckResult::pass(
            "Trust bundle",
            format!("{name} present in {} tenant namespace(s)", bundles.len()),
        )
    } else {
        CheckResult::fail(
            "Trust bundle",
            format!("{} of {} tenant namespace(s) lack a usable {name}", problems.len(), bundles.len()),
        )
        .details(problems)
        .hint(format!(
            "the operator publishes it in every tenant namespace; check it runs: kubectl -n {operator_namespace} logs deploy/portcullis-operator"
        ))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_kek_in_a_secret_warns_once_restricted_tenants_depend_on_it() {
        let tenant = |name: &str, classification: &str, custody: Option<&str>| -> Tenant {
            let conditions: Vec<serde_json::Value> = custody
                .map(|status| {
                    serde_json::json!({"type": "KeyCustody", "status": status, "reason": "SoftwareKek",
                        "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z"})
                })
                .into_iter()
                .collect();
            serde_json::from_value(serde_json::json!({
                "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
                "metadata": {"name": name},
                "spec": {"namespaces": [name], "dataClassification": classification},
                "status": {"conditions": conditions}
            }))
            .unwrap_or_else(|e| panic!("{e}"))
        };
        let secret = KekProviderSeen::Secret;
        let quiet = judge_key_custody(
            "portcullis-system",
            &secret,
            &[tenant("shop", "Internal", None)],
        );
        assert_eq!(quiet.status, Status::Pass);
        assert!(
            quiet.message.contains("no Restricted tenant")
                && quiet.message.starts_with("a Secret in portcullis-system"),
            "{}",
            quiet.message
        );
        let told = judge_key_custody(
            "portcullis-system",
            &secret,
            &[
                tenant("shop", "Internal", None),
                tenant("vault", "Restricted", Some("False")),
            ],
        );
        assert_eq!(told.status, Status::Warn);
        assert_eq!(told.details, vec!["tenant vault".to_owned()]);
        assert!(told.hint.unwrap_or_default().contains("portcullis-system"));
    }

    #[test]
    fn the_kek_provider_is_read_from_the_operator_deployment() {
        let deployment = |env: serde_json::Value, args: serde_json::Value| -> Deployment {
            from_json(serde_json::json!({
                "metadata": {"name": "portcullis-operator"},
                "spec": {"selector": {}, "template": {"spec": {"containers": [
                    {"name": "operator", "args": args, "env": env}
                ]}}}
            }))
        };
        assert_eq!(kek_provider(None), KekProviderSeen::Unknown);
        let chart_default = deployment(serde_json::json!([]), serde_json::json!(["run"]));
        assert_eq!(kek_provider(Some(&chart_default)), KekProviderSeen::Secret);
        let hsm = deployment(
            serde_json::json!([
                {"name": "PORTCULLIS_KEK_PROVIDER", "value": "pkcs11"},
                {"name": "PORTCULLIS_PKCS11_TOKEN_LABEL", "value": "portcullis"},
                {"name": "PORTCULLIS_PKCS11_KEY_LABEL", "value": "portcullis-kek"}
            ]),
            serde_json::json!(["run"]),
        );
        let provider = kek_provider(Some(&hsm));
        assert_eq!(
            provider,
            KekProviderSeen::Pkcs11 {
                token: Some("token \"portcullis\"".into()),
                key_label: Some("portcullis-kek".into())
            }
        );
        let by_args = deployment(
            serde_json::json!([]),
            serde_json::json!(["run", "--kek-provider=pkcs11", "--pkcs11-slot", "2"]),
        );
        assert_eq!(
            kek_provider(Some(&by_args)),
            KekProviderSeen::Pkcs11 {
                token: Some("slot 2".into()),
                key_label: None
            }
        );
        let kms = deployment(
            serde_json::json!([
                {"name": "PORTCULLIS_KEK_PROVIDER", "value": "kms"},
                {"name": "PORTCULLIS_KMS_SOCKET", "value": "/var/run/kmsplugin/socket.sock"}
            ]),
            serde_json::json!(["run"]),
        );
        assert_eq!(
            kek_provider(Some(&kms)),
            KekProviderSeen::Kms {
                socket: Some("/var/run/kmsplugin/socket.sock".into()),
                key_id: None
            }
        );
        // The names the operator writes.
        assert_eq!(KEK_SECRET, portcullis_operator::envelope::KEK_SECRET_NAME);
        assert_eq!(
            KMS_KEY_ID_KEY,
            portcullis_operator::envelope::kms::KMS_KEY_ID_KEY
        );
        let with_key_id = KekProviderSeen::Kms {
            socket: Some("/var/run/kmsplugin/socket.sock".into()),
            key_id: Some("projects/p/keys/k/1".into()),
        };
        let result = judge_key_custody("portcullis-system", &with_key_id, &[]);
        assert_eq!(result.status, Status::Pass);
        assert_eq!(
            result.message,
            "KMS v2 plugin on /var/run/kmsplugin/socket.sock (KMS key id projects/p/keys/k/1); no Restricted tenant depends on it"
        );
        let restricted: Tenant = from_json(serde_json::json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
            "metadata": {"name": "vault"},
            "spec": {"namespaces": ["vault"], "dataClassification": "Restricted"},
            "status": {"conditions": [{"type": "KeyCustody", "status": "True", "reason": "HardwareKek",
                "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        }));
        let result = judge_key_custody("portcullis-system", &provider, &[restricted]);
        assert_eq!(result.status, Status::Pass);
        assert!(
            result
                .message
                .starts_with("PKCS#11 (HSM) key portcullis-kek in token \"portcullis\"")
                && result
                    .message
                    .contains("1 Restricted tenant(s), none reporting a software KEK"),
            "{}",
            result.message
        );
    }
    use crate::check::report::Status;
    use k8s_openapi::ByteString;

    fn from_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
        serde_json::from_value(value).unwrap()
    }

    fn info(major: &str, minor: &str, git: &str) -> Info {
        from_json(serde_json::json!({
            "major": major, "minor": minor, "gitVersion": git, "gitCommit": "", "gitTreeState": "",
            "buildDate": "", "goVersion": "", "compiler": "", "platform": ""
        }))
    }

    #[test]
    fn version_below_1_29_warns_about_native_sidecars() {
        let old = judge_version(&info("1", "20", "v1.20.2"));
        assert_eq!(old.status, Status::Warn);
        assert!(
            old.message.starts_with("v1.20.2: before 1.29"),
            "{}",
            old.message
        );
        assert_eq!(
            judge_version(&info("1", "29+", "v1.29.0-gke.1")).status,
            Status::Pass
        );
        assert_eq!(
            judge_version(&info("1", "33", "")).message,
            "v1.33: native sidecars supported"
        );
        assert_eq!(judge_version(&info("", "", "")).status, Status::Warn);
    }

    #[test]
    fn webhooks_need_a_ca_bundle() {
        let missing = judge_webhooks(
            "MutatingWebhookConfiguration",
            "portcullis-injector",
            None,
            "ps",
        );
        assert_eq!(missing.status, Status::Fail);
        let hooks = [
            ("inject.portcullis.dev".to_owned(), true),
            ("inject-tenant.portcullis.dev".to_owned(), false),
        ];
        let empty = judge_webhooks(
            "MutatingWebhookConfiguration",
            "portcullis-injector",
            Some(&hooks),
            "ps",
        );
        assert_eq!(empty.status, Status::Fail);
        assert!(
            empty.message.contains("inject-tenant.portcullis.dev"),
            "{}",
            empty.message
        );
        let good = judge_webhooks("x", "portcullis-validator", Some(&hooks[..1]), "ps");
        assert_eq!(
            (good.status, good.message.as_str()),
            (Status::Pass, "1 webhook(s), caBundle set")
        );
    }

    #[test]
    fn operator_readiness() {
        let deployment = |ready: i32| -> Deployment {
            from_json(serde_json::json!({
                "metadata": {"name": "portcullis-operator"},
                "spec": {"replicas": 2, "selector": {}, "template": {}},
                "status": {"readyReplicas": ready}
            }))
        };
        let crashing: Pod = from_json(serde_json::json!({
            "metadata": {"name": "portcullis-operator-abc"},
            "status": {"phase": "Running", "containerStatuses": [{"name": "operator", "ready": false, "restartCount": 5,
                "image": "x", "imageID": "", "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}
        }));
        assert_eq!(judge_operator("ps", &[], &[]).status, Status::Warn);
        let down = judge_operator("ps", &[deployment(0)], std::slice::from_ref(&crashing));
        assert_eq!(down.status, Status::Fail);
        assert_eq!(
            down.details,
            ["pod portcullis-operator-abc: CrashLoopBackOff (container operator)"]
        );
        assert_eq!(
            judge_operator("ps", &[deployment(1)], &[crashing]).status,
            Status::Warn
        );
        assert_eq!(
            judge_operator("ps", &[deployment(2)], &[]).message,
            "deployment portcullis-operator: 2/2 ready"
        );
        // Scaled to zero is not "all ready": admission refuses pods then.
        let scaled_down: Deployment = from_json(serde_json::json!({
            "metadata": {"name": "portcullis-operator"},
            "spec": {"replicas": 0, "selector": {}, "template": {}},
            "status": {}
        }));
        let zero = judge_operator("ps", &[scaled_down], &[]);
        assert_eq!(zero.status, Status::Fail, "{zero:?}");
        assert!(zero.message.contains("scaled to zero"), "{}", zero.message);
    }

    #[test]
    fn audit_collector_readiness_and_its_certificate() {
        let collector = |ready: i32| -> StatefulSet {
            from_json(serde_json::json!({
                "metadata": {"name": "portcullis-audit"},
                "spec": {"replicas": 1, "selector": {}, "template": {}, "serviceName": "portcullis-audit"},
                "status": {"replicas": 1, "readyReplicas": ready}
            }))
        };
        let off = judge_audit_collector("ps", None, &[], false);
        assert_eq!(off.status, Status::Pass);
        assert!(
            off.message.contains("records stay in each pod"),
            "{}",
            off.message
        );

        let up = judge_audit_collector("ps", Some(&collector(1)), &[], true);
        assert_eq!(
            (up.status, up.message.as_str()),
            (
                Status::Pass,
                "statefulset portcullis-audit: 1/1 ready; proxies ship their records to it"
            )
        );

        // Its certificate Secret was never written: the pod waits for the volume.
        let waiting: Pod = from_json(serde_json::json!({
            "metadata": {"name": "portcullis-audit-0"},
            "status": {"phase": "Pending", "containerStatuses": [{"name": "collector", "ready": false, "restartCount": 0,
                "image": "x", "imageID": "", "state": {"waiting": {"reason": "ContainerCreating"}}}]}
        }));
        let stuck = judge_audit_collector("ps", Some(&collector(0)), &[waiting], false);
        assert_eq!(stuck.status, Status::Fail);
        assert_eq!(
            stuck.details,
            ["pod portcullis-audit-0: ContainerCreating (container collector)"]
        );
        let hint = stuck.hint.unwrap_or_default();
        assert!(
            hint.contains("Secret ps/portcullis-audit-tls is missing")
                && hint.contains("PORTCULLIS_AUDIT_SERVICE=portcullis-audit"),
            "{hint}"
        );
    }

    fn ca_secret(key: &str, not_after: (i32, u8, u8)) -> Secret {
        let keypair = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.not_before = rcgen::date_time_ymd(2025, 1, 1);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let pem = params.self_signed(&keypair).unwrap().pem();
        Secret {
            data: Some([(key.to_owned(), ByteString(pem.into_bytes()))].into()),
            ..Secret::default()
        }
    }

    #[test]
    fn ca_expiry_is_classified_at_a_fixed_time() {
        let now: Timestamp = "2026-03-01T00:00:00Z".parse().unwrap();
        let judge = |kind, secret: Option<&Secret>| {
            judge_ca(kind, secret, "ps", "portcullis-operator", now)
        };

        let fine = judge(CaKind::Root, Some(&ca_secret("ca.crt", (2027, 3, 1))));
        assert_eq!(fine.status, Status::Pass, "{fine:?}");
        assert_eq!(fine.message, "valid until 2027-03-01T00:00:00Z (in 365d)");

        let soon = judge(CaKind::Root, Some(&ca_secret("ca.crt", (2026, 3, 11))));
        assert_eq!(soon.status, Status::Warn);
        assert_eq!(
            soon.message,
            "trust anchor expires in 10d (2026-03-11T00:00:00Z)"
        );
        assert!(
            soon.hint
                .unwrap()
                .contains("delete secret portcullis-ca-root")
        );

        let gone = judge(CaKind::Root, Some(&ca_secret("tls.crt", (2026, 2, 27))));
        assert_eq!(gone.status, Status::Fail);
        assert!(
            gone.message.starts_with("trust anchor EXPIRED 2d ago"),
            "{}",
            gone.message
        );
        assert!(gone.hint.unwrap().contains("rollout restart"));

        let intermediate = judge(
            CaKind::Intermediate,
            Some(&ca_secret("tls.crt", (2026, 3, 20))),
        );
        assert_eq!(intermediate.status, Status::Warn);
        assert!(
            intermediate
                .hint
                .unwrap()
                .contains("delete secret portcullis-ca-intermediate &&")
        );

        let missing = judge(CaKind::Intermediate, None);
        assert_eq!(missing.status, Status::Fail);
        assert_eq!(
            missing.message,
            "Secret ps/portcullis-ca-intermediate not found"
        );

        let garbage = Secret {
            data: Some([("ca.crt".to_owned(), ByteString(b"nope".to_vec()))].into()),
            ..Secret::default()
        };
        assert_eq!(judge(CaKind::Root, Some(&garbage)).status, Status::Fail);
        assert_eq!(
            judge(CaKind::Root, Some(&Secret::default())).status,
            Status::Fail
        );
    }

    #[test]
    fn opt_in_follows_the_injector_rules() {
        let ns = |name: &str, labels: serde_json::Value| -> Namespace {
            from_json(serde_json::json!({"metadata": {"name": name, "labels": labels}}))
        };
        let level =
            |name: &str, labels: serde_json::Value| injection_level(&ns(name, labels), "ps", None);
        use InjectionLevel::{Enabled, Required};
        assert_eq!(
            level("a", serde_json::json!({"portcullis.dev/inject": "enabled"})),
            Some(Enabled)
        );
        assert_eq!(
            level(
                "a",
                serde_json::json!({"portcullis.dev/inject": "required"})
            ),
            Some(Required)
        );
        assert_eq!(
            level("a", serde_json::json!({"portcullis.dev/tenant": "acme"})),
            Some(Enabled)
        );
        assert_eq!(
            level(
                "a",
                serde_json::json!({"portcullis.dev/tenant": "acme", "portcullis.dev/inject": "disabled"})
            ),
            None
        );
        assert_eq!(
            level(
                "ps",
                serde_json::json!({"portcullis.dev/inject": "enabled"})
            ),
            None
        );
        assert_eq!(
            level(
                "kube-system",
                serde_json::json!({"portcullis.dev/inject": "enabled"})
            ),
            None
        );
        assert_eq!(level("plain", serde_json::json!({})), None);
        // A Confidential or Restricted Tenant requires the proxy whatever the labels say.
        let confidential = ns(
            "a",
            serde_json::json!({"portcullis.dev/tenant": "acme", "portcullis.dev/inject": "disabled"}),
        );
        assert_eq!(
            injection_level(&confidential, "ps", Some(DataClassification::Confidential)),
            Some(Required)
        );
        assert_eq!(
            injection_level(&confidential, "ps", Some(DataClassification::Internal)),
            None
        );
    }

    #[test]
    fn pods_without_the_proxy_are_listed() {
        let pod = |name: &str, extra: serde_json::Value| -> Pod {
            let mut value = serde_json::json!({"metadata": {"name": name}, "spec": {"containers": [{"name": "app"}]}});
            if let (Some(v), Some(extra)) = (value.as_object_mut(), extra.as_object()) {
                for (k, e) in extra {
                    v.insert(k.clone(), e.clone());
                }
            }
            from_json(value)
        };
        let injected = pod(
            "api-0",
            serde_json::json!({"spec": {"containers": [{"name": "app"}], "initContainers": [{"name": "portcullis-proxy"}]}}),
        );
        let bare = pod("api-1", serde_json::json!({}));
        let done = pod(
            "job-1",
            serde_json::json!({"status": {"phase": "Succeeded"}}),
        );
        let opted_out = pod(
            "debug",
            serde_json::json!({"metadata": {"name": "debug", "annotations": {"portcullis.dev/inject": "disabled"}}}),
        );
        let host = pod(
            "agent",
            serde_json::json!({"spec": {"hostNetwork": true, "containers": [{"name": "app"}]}}),
        );

        let enabled = |pods: Vec<Pod>| (InjectionLevel::Enabled, pods);
        let all = BTreeMap::from([(
            "acme".to_owned(),
            enabled(vec![
                injected.clone(),
                bare,
                done,
                opted_out.clone(),
                host.clone(),
            ]),
        )]);
        let result = judge_injection(&all);
        assert_eq!(result.status, Status::Fail);
        assert_eq!(
            result.details,
            ["acme/api-1", "acme/agent (hostNetwork: cannot be injected)"]
        );
        assert_eq!(
            result.message,
            "2 pod(s) in opted-in namespaces run without the proxy; 1 opted out with portcullis.dev/inject: disabled"
        );

        let only_host = BTreeMap::from([(
            "acme".to_owned(),
            enabled(vec![injected.clone(), host.clone()]),
        )]);
        assert_eq!(judge_injection(&only_host).status, Status::Warn);
        let good = BTreeMap::from([(
            "acme".to_owned(),
            enabled(vec![injected.clone(), opted_out.clone()]),
        )]);
        let good = judge_injection(&good);
        assert_eq!(good.status, Status::Pass);
        assert!(
            good.message
                .ends_with("1 opted out with portcullis.dev/inject: disabled")
        );

        // Where the namespace requires the proxy, an opt-out or a hostNetwork pod that
        // runs got past the injector: a failure.
        let required = BTreeMap::from([(
            "vault".to_owned(),
            (InjectionLevel::Required, vec![injected, opted_out, host]),
        )]);
        let required = judge_injection(&required);
        assert_eq!(required.status, Status::Fail);
        assert_eq!(
            required.details,
            [
                "vault/debug (opts out with portcullis.dev/inject: disabled, but the namespace requires the proxy)",
                "vault/agent (hostNetwork, but the namespace requires the proxy)"
            ]
        );
        assert_eq!(judge_injection(&BTreeMap::new()).status, Status::Pass);
    }

    #[test]
    fn trust_bundles_must_exist_and_hold_a_valid_certificate() {
        let now: Timestamp = "2026-03-01T00:00:00Z".parse().unwrap();
        assert!(judge_trust_bundles(&BTreeMap::new(), "ps", now).is_none());
        let pem = |not_after| {
            let secret = ca_secret("ca.crt", not_after);
            String::from_utf8(secret.data.unwrap()["ca.crt"].0.clone()).unwrap()
        };
        let config_map = |pem: String| -> ConfigMap {
            from_json(
                serde_json::json!({"metadata": {"name": "portcullis-trust-bundle"}, "data": {"ca-bundle.crt": pem}}),
            )
        };
        let bundles = BTreeMap::from([
            ("a".to_owned(), Some(config_map(pem((2027, 1, 1))))),
            ("b".to_owned(), None),
            ("c".to_owned(), Some(config_map(pem((2026, 1, 1))))),
        ]);
        let result = judge_trust_bundles(&bundles, "ps", now).unwrap();
        assert_eq!(result.status, Status::Fail);
        assert_eq!(result.details.len(), 2, "{:?}", result.details);
        assert_eq!(result.details[0], "b/portcullis-trust-bundle: missing");
        assert!(
            result.details[1].starts_with("c/portcullis-trust-bundle: no certificate valid now")
        );
    }
}
