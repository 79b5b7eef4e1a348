//! `kubectl portcullis check`: preflight and health, one line per check.
//!
//! Reading is done here; the verdicts are pure functions in [`probes`], [`crds`],
//! [`injected_pods`] and [`api_keys`]. A check that cannot read what it needs (RBAC) is
//! a warning, never a crash.

pub mod api_keys;
pub mod crds;
pub mod injected_pods;
pub mod probes;
pub mod report;

use std::collections::BTreeMap;
use std::io::Write;

use jiff::Timestamp;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Event, Namespace, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use portcullis_crds::annotations::INJECTED_LABEL;
use portcullis_crds::tenant::TENANT_LABEL;
use portcullis_crds::{ApiKey, Tenant};

use crate::Outcome;
use crate::cli::{CheckArgs, OutputFormat};
use crate::cluster::Cluster;
use crate::error::CliError;
use crate::output::write_structured;
use probes::CaKind;
pub use report::{CheckReport, CheckResult, Status};

/// Names of the webhook configurations (contract with the chart and operator).
pub const INJECTOR: &str = "portcullis-injector";
/// See [`INJECTOR`].
pub const VALIDATOR: &str = "portcullis-validator";
/// Labels that select the operator's Deployment and pods (the chart's selector labels).
pub const OPERATOR_SELECTOR: &str =
    "app.kubernetes.io/name=portcullis,app.kubernetes.io/component=operator";
/// The chart's default Deployment name.
pub const OPERATOR_DEPLOYMENT: &str = "portcullis-operator";

/// `check`.
pub async fn run(
    cluster: &Cluster,
    args: &CheckArgs,
    out: &mut dyn Write,
    _err: &mut dyn Write,
) -> Result<Outcome, CliError> {
    let report = collect(cluster, Timestamp::now()).await;
    match args.output.format {
        OutputFormat::Table => out.write_all(report.render().as_bytes())?,
        format => write_structured(format, &report, out)?,
    }
    Ok(report.outcome())
}

/// Runs every check against the cluster, judging times at `now`.
pub async fn collect(cluster: &Cluster, now: Timestamp) -> CheckReport {
    let client = &cluster.client;
    let mut checks = Vec::new();
    match client.apiserver_version().await {
        Ok(info) => checks.push(probes::judge_version(&info)),
        Err(e) => {
            checks.push(
                CheckResult::fail("API server", format!("unreachable: {}", CliError::from(e)))
                    .hint("check --kubeconfig/--context; kubectl cluster-info shows what kubectl reaches"),
            );
            return CheckReport::new(checks);
        }
    }
    checks.extend(check_crds(client).await);
    checks.push(check_mutating(cluster).await);
    checks.push(check_validating(cluster).await);
    let (deployment, kek_provider) = match check_operator(cluster).await {
        Ok((result, name, provider)) => {
            checks.push(result);
            (name, provider)
        }
        Err(result) => {
            checks.push(result);
            (
                OPERATOR_DEPLOYMENT.to_owned(),
                probes::KekProviderSeen::Unknown,
            )
        }
    };
    for kind in [CaKind::Root, CaKind::Intermediate] {
        checks.push(check_ca(cluster, kind, &deployment, now).await);
    }
    checks.push(check_audit_collector(cluster).await);
    checks.push(check_key_custody(cluster, &kek_provider).await);
    checks.push(crate::kek::check(cluster, now).await);
    checks.extend(check_namespaces(cluster, now).await);
    let operator_logs = format!(
        "kubectl -n {} logs deploy/{deployment}",
        cluster.operator_namespace
    );
    checks.extend(check_injected_pods(cluster, now, &operator_logs).await);
    checks.extend(check_api_keys(cluster, now, &operator_logs).await);
    CheckReport::new(checks)
}

/// A warning for a read the user may not make, a failure otherwise.
fn unreadable(check: &str, what: &str, error: kube::Error) -> CheckResult {
    let error = CliError::from(error);
    if error.is_forbidden() {
        CheckResult::warn(check, format!("cannot read {what}: {error}"))
            .hint("run check with a user who may read it (cluster-admin or the chart's admin role)")
    } else {
        CheckResult::fail(check, format!("cannot read {what}: {error}"))
    }
}

async fn check_crds(client: &kube::Client) -> Vec<CheckResult> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut results = Vec::new();
    for (name, yaml) in crds::EMBEDDED {
        results.push(match api.get_opt(name).await {
            Ok(served) => crds::judge(name, yaml, served.as_ref()),
            Err(e) => unreadable(&format!("CRD {name}"), "CustomResourceDefinitions", e),
        });
    }
    results
}

async fn check_mutating(cluster: &Cluster) -> CheckResult {
    let api: Api<MutatingWebhookConfiguration> = Api::all(cluster.client.clone());
    match api.get_opt(INJECTOR).await {
        Ok(config) => {
            let hooks: Option<Vec<(String, bool)>> = config.map(|c| {
                c.webhooks
                    .unwrap_or_default()
                    .into_iter()
                    .map(|w| {
                        (
                            w.name,
                            w.client_config.ca_bundle.is_some_and(|b| !b.0.is_empty()),
                        )
                    })
                    .collect()
            });
            probes::judge_webhooks(
                "MutatingWebhookConfiguration",
                INJECTOR,
                hooks.as_deref(),
                &cluster.operator_namespace,
            )
        }
        Err(e) => unreadable(&format!("Webhook {INJECTOR}"), "webhook configurations", e),
    }
}

async fn check_validating(cluster: &Cluster) -> CheckResult {
    let api: Api<ValidatingWebhookConfiguration> = Api::all(cluster.client.clone());
    match api.get_opt(VALIDATOR).await {
        Ok(config) => {
            let hooks: Option<Vec<(String, bool)>> = config.map(|c| {
                c.webhooks
                    .unwrap_or_default()
                    .into_iter()
                    .map(|w| {
                        (
                            w.name,
                            w.client_config.ca_bundle.is_some_and(|b| !b.0.is_empty()),
                        )
                    })
                    .collect()
            });
            probes::judge_webhooks(
                "ValidatingWebhookConfiguration",
                VALIDATOR,
                hooks.as_deref(),
                &cluster.operator_namespace,
            )
        }
        Err(e) => unreadable(&format!("Webhook {VALIDATOR}"), "webhook configurations", e),
    }
}

/// The operator check, the Deployment's name (for hints) and the KEK provider it sets.
async fn check_operator(
    cluster: &Cluster,
) -> Result<(CheckResult, String, probes::KekProviderSeen), CheckResult> {
    let ns = &cluster.operator_namespace;
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), ns);
    let selected = ListParams::default().labels(OPERATOR_SELECTOR);
    let mut found = deployments
        .list(&selected)
        .await
        .map_err(|e| unreadable("Operator", "Deployments", e))?
        .items;
    if found.is_empty()
        && let Ok(Some(by_name)) = deployments.get_opt(OPERATOR_DEPLOYMENT).await
    {
        found.push(by_name);
    }
    let name = found
        .first()
        .map_or_else(|| OPERATOR_DEPLOYMENT.to_owned(), |d| d.name_any());
    let pods = match found.first().and_then(|d| d.spec.as_ref()) {
        Some(spec) => {
            let selector = spec
                .selector
                .match_labels
                .iter()
                .flatten()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
            pods.list(&ListParams::default().labels(&selector))
                .await
                .map(|l| l.items)
                .unwrap_or_default()
        }
        None => Vec::new(),
    };
    let provider = probes::kek_provider(found.first());
    Ok((probes::judge_operator(ns, &found, &pods), name, provider))
}

async fn check_audit_collector(cluster: &Cluster) -> CheckResult {
    const CHECK: &str = "Audit collector";
    let ns = &cluster.operator_namespace;
    let name = probes::AUDIT_COLLECTOR;
    let collector = match Api::<StatefulSet>::namespaced(cluster.client.clone(), ns)
        .get_opt(name)
        .await
    {
        Ok(collector) => collector,
        Err(e) => return unreadable(CHECK, "StatefulSets", e),
    };
    let Some(collector) = collector else {
        return probes::judge_audit_collector(ns, None, &[], false);
    };
    let pods = Api::<Pod>::namespaced(cluster.client.clone(), ns)
        .list(&ListParams::default().labels("app.kubernetes.io/component=audit"))
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    let certificate = Api::<Secret>::namespaced(cluster.client.clone(), ns)
        .get_opt(&format!("{name}-tls"))
        .await
        .is_ok_and(|s| s.is_some());
    probes::judge_audit_collector(ns, Some(&collector), &pods, certificate)
}

async fn check_key_custody(cluster: &Cluster, provider: &probes::KekProviderSeen) -> CheckResult {
    let ns = &cluster.operator_namespace;
    let provider = &kms_key_id(cluster, provider).await;
    match Api::<Tenant>::all(cluster.client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(list) => probes::judge_key_custody(ns, provider, &list.items),
        Err(kube::Error::Api(status)) if status.code == 404 => {
            probes::judge_key_custody(ns, provider, &[])
        }
        Err(e) => unreadable("Key-encryption key", "Tenants", e),
    }
}

/// A kms provider with the plugin key id read from the KEK Secret's `kms-key-id` (the
/// public id, never the ciphertext); unchanged when it cannot be read.
async fn kms_key_id(
    cluster: &Cluster,
    provider: &probes::KekProviderSeen,
) -> probes::KekProviderSeen {
    let probes::KekProviderSeen::Kms { socket, .. } = provider else {
        return provider.clone();
    };
    let key_id = Api::<Secret>::namespaced(cluster.client.clone(), &cluster.operator_namespace)
        .get_opt(probes::KEK_SECRET)
        .await
        .ok()
        .flatten()
        .and_then(|secret| secret.data?.remove(probes::KMS_KEY_ID_KEY))
        .and_then(|id| String::from_utf8(id.0).ok());
    probes::KekProviderSeen::Kms {
        socket: socket.clone(),
        key_id,
    }
}

async fn check_ca(
    cluster: &Cluster,
    kind: CaKind,
    deployment: &str,
    now: Timestamp,
) -> CheckResult {
    let ns = &cluster.operator_namespace;
    let secrets: Api<Secret> = Api::namespaced(cluster.client.clone(), ns);
    let name = match kind {
        CaKind::Root => probes::ROOT_SECRET,
        CaKind::Intermediate => probes::INTERMEDIATE_SECRET,
    };
    match secrets.get_opt(name).await {
        Ok(secret) => probes::judge_ca(kind, secret.as_ref(), ns, deployment, now),
        Err(e) => unreadable(
            match kind {
                CaKind::Root => "CA root",
                CaKind::Intermediate => "CA intermediate",
            },
            &format!("Secret {ns}/{name}"),
            e,
        ),
    }
}

/// Injection coverage and trust bundles, from the namespaces that opted in.
async fn check_namespaces(cluster: &Cluster, now: Timestamp) -> Vec<CheckResult> {
    let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
    let all = match namespaces.list(&ListParams::default()).await {
        Ok(list) => list.items,
        Err(e) => return vec![unreadable("Injection", "namespaces", e)],
    };
    let mut results = Vec::new();
    // A Confidential or Restricted Tenant requires the proxy in its namespaces.
    let tenants: Api<Tenant> = Api::all(cluster.client.clone());
    let classification: BTreeMap<String, _> = match tenants.list(&ListParams::default()).await {
        Ok(list) => list
            .items
            .into_iter()
            .map(|t| (t.name_any(), t.spec.data_classification))
            .collect(),
        Err(kube::Error::Api(status)) if status.code == 404 => BTreeMap::new(),
        Err(e) => {
            results.push(unreadable("Injection", "Tenants", e));
            BTreeMap::new()
        }
    };
    let opted: Vec<(&Namespace, probes::InjectionLevel)> = all
        .iter()
        .filter_map(|ns| {
            let tenant = ns
                .labels()
                .get(TENANT_LABEL)
                .and_then(|t| classification.get(t))
                .copied();
            probes::injection_level(ns, &cluster.operator_namespace, tenant).map(|l| (ns, l))
        })
        .collect();
    let mut pods_by_namespace = BTreeMap::new();
    for (ns, level) in &opted {
        let name = ns.name_any();
        let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &name);
        match pods.list(&ListParams::default()).await {
            Ok(list) => {
                pods_by_namespace.insert(name, (*level, list.items));
            }
            Err(e) => results.push(unreadable("Injection", &format!("pods of {name}"), e)),
        }
    }
    results.insert(0, probes::judge_injection(&pods_by_namespace));
    let mut bundles = BTreeMap::new();
    for ns in all.iter().filter(|ns| {
        ns.labels().contains_key(TENANT_LABEL) && ns.name_any() != cluster.operator_namespace
    }) {
        let name = ns.name_any();
        let config_maps: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), &name);
        match config_maps.get_opt(probes::TRUST_BUNDLE.0).await {
            Ok(found) => {
                bundles.insert(name, found);
            }
            Err(e) => results.push(unreadable(
                "Trust bundle",
                &format!("ConfigMaps of {name}"),
                e,
            )),
        }
    }
    results.extend(probes::judge_trust_bundles(
        &bundles,
        &cluster.operator_namespace,
        now,
    ));
    results
}

/// Injected pods (by the injector's label, in every namespace) that are not Ready,
/// with the Events of those that are not.
async fn check_injected_pods(
    cluster: &Cluster,
    now: Timestamp,
    operator_logs: &str,
) -> Vec<CheckResult> {
    let pods: Api<Pod> = Api::all(cluster.client.clone());
    let injected = ListParams::default().labels(&format!("{INJECTED_LABEL}=true"));
    let pods = match pods.list(&injected).await {
        Ok(list) => list.items,
        Err(e) => return vec![unreadable("Injected pods", "pods", e)],
    };
    let mut with_events = Vec::with_capacity(pods.len());
    let mut events_unreadable = None;
    for pod in pods {
        // Without Events a probe failure is still found, just without its message.
        let events = if injected_pods::needs_events(&pod) && events_unreadable.is_none() {
            let events: Api<Event> =
                Api::namespaced(cluster.client.clone(), &pod.namespace().unwrap_or_default());
            let about_pod = ListParams::default().fields(&format!(
                "involvedObject.kind=Pod,involvedObject.name={}",
                pod.name_any()
            ));
            match events.list(&about_pod).await {
                Ok(list) => list.items,
                Err(e) => {
                    events_unreadable = Some(unreadable("Injected pods", "Events", e));
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        with_events.push((pod, events));
    }
    let mut results = vec![injected_pods::judge(&with_events, now, operator_logs)];
    results.extend(events_unreadable);
    results
}

/// ApiKeys of every namespace; nothing when the CRD is missing (its own check fails).
async fn check_api_keys(
    cluster: &Cluster,
    now: Timestamp,
    operator_logs: &str,
) -> Option<CheckResult> {
    let keys: Api<ApiKey> = Api::all(cluster.client.clone());
    match keys.list(&ListParams::default()).await {
        Ok(list) => Some(api_keys::judge(&list.items, now, operator_logs)),
        Err(kube::Error::Api(status)) if status.code == 404 => None,
        Err(e) => Some(unreadable("ApiKeys", "ApiKeys", e)),
    }
}
