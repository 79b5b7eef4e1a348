//! The Helm chart (charts/portcullis) checked with helm and a real API server:
//!
//! - the chart's CRDs are the generated ones (crds/*.yaml);
//! - `helm lint` passes with the default values and with non-default values files;
//! - `helm template` renders the contract (webhook names, paths, ports, failurePolicy,
//!   namespace selectors, no Secret for the operator's CA or keys) and the schema
//!   refuses bad values with a message naming the field;
//! - `helm install` into envtest (every object validated by kube-apiserver 1.20), then
//!   `helm upgrade` (server-side and client-side) keeps the operator's CA Secret and
//!   the caBundle it patched into the webhooks;
//! - the chart's RBAC is sufficient (every API call the operator makes succeeds as its
//!   ServiceAccount) and each rule is necessary (without it, some call gets 403);
//! - the real `portcullis-operator run`, as the chart's ServiceAccount, reconciles a
//!   Tenant and an ApiKey with no RBAC denial.
//!
//! Skips (prints why, passes) only when helm or `KUBEBUILDER_ASSETS` is missing
//! (`eval "$(../shared/setup-tools.sh)"` provides both).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use futures::StreamExt as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, ObjectReference, Pod, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role as RbacRole, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference};
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, ObjectMeta, Patch, PatchParams, PostParams,
    WatchParams,
};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, Resource, ResourceExt};
use portcullis_crds::{ApiKey, Permission, Role, Tenant};
use portcullis_e2e::envtest::{self, EnvTest};
use portcullis_operator::webhook::WebhookError;
use portcullis_operator::webhook::config::{
    WebhookConfigSettings, mutating as operator_mutating, validating as operator_validating,
};
use portcullis_operator::webhook::tls::{WebhookTlsSettings, rotation};
use serde_json::{Value, json};
use tokio::sync::{Mutex, OnceCell};

// ---------------------------------------------------------------------------------
// helm
// ---------------------------------------------------------------------------------

const RELEASE: &str = "portcullis";
const TEMPLATE_NAMESPACE: &str = "portcullis-system";
const OPERATOR_FIELD_MANAGER: &str = "portcullis-operator";
/// The chart's ClusterRole for ApiKey Secrets, bound only per tenant namespace.
const TENANT_SECRETS_ROLE: &str = "portcullis-operator-tenant-secrets";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

fn chart_dir() -> PathBuf {
    repo_root().join("charts").join("portcullis")
}

/// helm, run with its config/cache/data in a private directory (nothing under $HOME).
struct Helm {
    bin: PathBuf,
    home: tempfile::TempDir,
}

impl Helm {
    /// `None` (after printing why) when helm is not installed.
    fn find() -> Option<Self> {
        let bin = std::env::var_os("HELM").map(PathBuf::from).or_else(|| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join("helm"))
                    .find(|candidate| candidate.is_file())
            })
        });
        let Some(bin) = bin else {
            eprintln!(
                "skipping: helm is not installed (eval \"$(../shared/setup-tools.sh)\" puts helm \
                 v4 on PATH; or see https://helm.sh/docs/intro/install/)"
            );
            return None;
        };
        let home = match tempfile::Builder::new()
            .prefix("portcullis-helm-")
            .tempdir()
        {
            Ok(home) => home,
            Err(e) => {
                eprintln!("skipping: cannot create a helm home directory: {e}");
                return None;
            }
        };
        Some(Self { bin, home })
    }

    fn command(&self, kubeconfig: Option<&Path>) -> Command {
        let mut command = Command::new(&self.bin);
        let home = self.home.path();
        command
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_DATA_HOME", home.join("data"))
            .current_dir(repo_root());
        match kubeconfig {
            Some(path) => command.env("KUBECONFIG", path),
            None => command.env_remove("KUBECONFIG"),
        };
        command
    }

    fn run(&self, args: &[&str], kubeconfig: Option<&Path>) -> Result<HelmOutput> {
        let output: Output = self
            .command(kubeconfig)
            .args(args)
            .output()
            .with_context(|| format!("running helm {}", args.join(" ")))?;
        Ok(HelmOutput {
            args: args.join(" "),
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: without_symlink_notes(&String::from_utf8_lossy(&output.stderr)),
        })
    }

    /// `run` off the async runtime's threads.
    async fn run_async(&self, args: Vec<String>, kubeconfig: PathBuf) -> Result<HelmOutput> {
        let bin = self.bin.clone();
        let home = self.home.path().to_path_buf();
        tokio::task::spawn_blocking(move || {
            let helm = HelmRef { bin, home };
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            helm.run(&args, &kubeconfig)
        })
        .await?
    }

    /// `helm template` of the chart into [`TEMPLATE_NAMESPACE`], parsed into objects.
    fn render(&self, extra: &[&str]) -> Result<Vec<Value>> {
        let chart = chart_dir();
        let chart = chart.to_string_lossy();
        let mut args = vec![
            "template",
            RELEASE,
            &chart,
            "--namespace",
            TEMPLATE_NAMESPACE,
        ];
        args.extend_from_slice(extra);
        let out = self.run(&args, None)?;
        out.ok()?;
        parse_documents(&out.stdout)
    }
}

/// What [`Helm::run_async`] moves to the blocking pool.
struct HelmRef {
    bin: PathBuf,
    home: PathBuf,
}

impl HelmRef {
    fn run(&self, args: &[&str], kubeconfig: &Path) -> Result<HelmOutput> {
        let output = Command::new(&self.bin)
            .env("HELM_CONFIG_HOME", self.home.join("config"))
            .env("HELM_CACHE_HOME", self.home.join("cache"))
            .env("HELM_DATA_HOME", self.home.join("data"))
            .env("KUBECONFIG", kubeconfig)
            .current_dir(repo_root())
            .args(args)
            .output()
            .with_context(|| format!("running helm {}", args.join(" ")))?;
        Ok(HelmOutput {
            args: args.join(" "),
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: without_symlink_notes(&String::from_utf8_lossy(&output.stderr)),
        })
    }
}

#[derive(Debug)]
struct HelmOutput {
    args: String,
    success: bool,
    stdout: String,
    stderr: String,
}

impl HelmOutput {
    fn ok(&self) -> Result<()> {
        ensure!(
            self.success,
            "helm {} failed:\n{}\n{}",
            self.args,
            self.stderr,
            self.stdout
        );
        Ok(())
    }
}

/// helm notes every symlink it follows (the chart's crds/ are symlinks to crds/).
fn without_symlink_notes(stderr: &str) -> String {
    stderr
        .lines()
        .filter(|line| !line.contains("found symbolic link in path"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn parse_documents(yaml: &str) -> Result<Vec<Value>> {
    let mut objects = Vec::new();
    for document in serde_yaml::Deserializer::from_str(yaml) {
        let value: Value = serde::Deserialize::deserialize(document)?;
        if !value.is_null() {
            objects.push(value);
        }
    }
    Ok(objects)
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .with_context(|| {
            let present: Vec<String> = objects
                .iter()
                .map(|o| format!("{}/{}", o["kind"], o["metadata"]["name"]))
                .collect();
            format!("no {kind} {name} rendered; rendered: {present:?}")
        })
}

fn kinds(objects: &[Value], kind: &str) -> usize {
    objects.iter().filter(|o| o["kind"] == kind).count()
}

fn str_list(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
}

// ---------------------------------------------------------------------------------
// Chart files, lint, template, schema (helm only)
// ---------------------------------------------------------------------------------

#[test]
fn chart_crds_are_the_generated_crds() -> Result<()> {
    let generated = repo_root().join("crds");
    let chart = chart_dir().join("crds");
    let yaml_files = |dir: &Path| -> Result<BTreeSet<String>> {
        let mut names = BTreeSet::new();
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.ends_with(".yaml") || name.ends_with(".yml") {
                names.insert(name);
            }
        }
        Ok(names)
    };
    let generated_files = yaml_files(&generated)?;
    let chart_files = yaml_files(&chart)?;
    ensure!(
        generated_files.len() >= 3,
        "expected the tenants, roles and apikeys CRDs in {}",
        generated.display()
    );
    ensure!(
        generated_files == chart_files,
        "charts/portcullis/crds/ must hold exactly the CRDs of crds/ (as symlinks: \
         cd charts/portcullis/crds && ln -s ../../../crds/<file> .)\n  crds/: {generated_files:?}\n  \
         chart: {chart_files:?}"
    );
    for file in &chart_files {
        let link = chart.join(file);
        let target = std::fs::read_link(&link).with_context(|| {
            format!(
                "{} is not a symlink; replace it with one to ../../../crds/{file} so the chart \
                 can never drift from the generated CRDs",
                link.display()
            )
        })?;
        ensure!(
            target == Path::new("../../../crds").join(file),
            "{} points at {}, expected ../../../crds/{file}",
            link.display(),
            target.display()
        );
        ensure!(
            std::fs::read(&link)? == std::fs::read(generated.join(file))?,
            "{} differs from crds/{file}",
            link.display()
        );
    }
    Ok(())
}

#[test]
fn helm_lint_passes_with_default_and_non_default_values() -> Result<()> {
    let Some(helm) = Helm::find() else {
        return Ok(());
    };
    let chart = chart_dir();
    let chart = chart.to_string_lossy();
    let out = helm.run(&["lint", "--strict", &chart], None)?;
    out.ok()?;
    assert!(
        out.stdout.contains("1 chart(s) linted, 0 chart(s) failed"),
        "{}",
        out.stdout
    );

    let mut values_files: Vec<PathBuf> = std::fs::read_dir(chart_dir().join("ci"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with("-values.yaml"))
        .collect();
    values_files.push(repo_root().join("e2e").join("kind").join("values.yaml"));
    ensure!(values_files.len() >= 2, "no ci/*-values.yaml in the chart");
    for values in &values_files {
        let values = values.to_string_lossy();
        let out = helm.run(&["lint", "--strict", &chart, "-f", &values], None)?;
        out.ok()?;
    }
    Ok(())
}

#[test]
fn helm_template_renders_the_contract() -> Result<()> {
    let Some(helm) = Helm::find() else {
        return Ok(());
    };
    let objects = helm.render(&[])?;

    // The operator's Secrets are the operator's: the chart renders no Secret at all.
    assert_eq!(
        kinds(&objects, "Secret"),
        0,
        "the chart must not render Secrets"
    );
    for object in &objects {
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        assert!(
            !matches!(
                name,
                "portcullis-ca-root"
                    | "portcullis-ca-intermediate"
                    | "portcullis-kek"
                    | "portcullis-webhook-ca"
            ),
            "the chart renders {}/{name}",
            object["kind"]
        );
        // Standard labels everywhere.
        let labels = &object["metadata"]["labels"];
        assert_eq!(labels["app.kubernetes.io/name"], "portcullis", "{name}");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "Helm", "{name}");
        assert!(
            labels["helm.sh/chart"]
                .as_str()
                .is_some_and(|c| c.starts_with("portcullis-"))
        );
    }

    // Deployment: 2 replicas, hardened, probes, POD_NAMESPACE, ports.
    let deployment = find(&objects, "Deployment", "portcullis-operator")?;
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "portcullis-operator");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
            ["topologyKey"],
        "kubernetes.io/hostname"
    );
    let container = &pod["containers"][0];
    assert_eq!(container["args"], json!(["run"]));
    assert_eq!(
        container["image"],
        "ghcr.io/portcullis-dev/portcullis-operator:0.1.0"
    );
    let security = &container["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["port"], "metrics");
    assert_eq!(
        env_value(container, "POD_NAMESPACE").map(|e| &e["valueFrom"]["fieldRef"]["fieldPath"]),
        Some(&json!("metadata.namespace"))
    );
    let ports: BTreeMap<String, i64> = container["ports"]
        .as_array()
        .context("container ports")?
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_owned(),
                p["containerPort"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        ports,
        BTreeMap::from([
            ("metrics".to_owned(), 8080),
            ("identity".to_owned(), 8443),
            ("policy".to_owned(), 8090),
            ("webhook".to_owned(), 9443),
        ])
    );
    let setting = |name: &str| {
        env_value(container, name)
            .and_then(|e| e["value"].as_str())
            .map(str::to_owned)
    };
    assert_eq!(
        setting("PORTCULLIS_TRUST_DOMAIN").as_deref(),
        Some("cluster.local")
    );
    assert_eq!(
        setting("PORTCULLIS_ROTATION_PERIOD").as_deref(),
        Some("72h")
    );
    assert_eq!(
        setting("PORTCULLIS_INTERMEDIATE_ROTATION_PERIOD").as_deref(),
        Some("720h")
    );
    assert_eq!(
        setting("PORTCULLIS_ROOT_ROTATION_PERIOD").as_deref(),
        Some("8760h")
    );
    assert_eq!(
        setting("PORTCULLIS_KEY_ROTATION_OVERLAP").as_deref(),
        Some("1h")
    );
    assert_eq!(
        setting("PORTCULLIS_LEADER_ELECTION").as_deref(),
        Some("true")
    );
    assert_eq!(
        setting("PORTCULLIS_LEASE_NAME").as_deref(),
        Some("portcullis-operator")
    );
    assert_eq!(
        setting("PORTCULLIS_PROXY_IMAGE").as_deref(),
        Some("ghcr.io/portcullis-dev/portcullis-proxy:0.1.0")
    );

    // Services: one name for what sidecars and the API server call (identity 8443,
    // policy 8090, webhook 443 → 9443), and metrics 8080.
    let service_ports = |name: &str| -> Result<Vec<(i64, String)>> {
        let service = find(&objects, "Service", name)?;
        Ok(service["spec"]["ports"]
            .as_array()
            .context("service ports")?
            .iter()
            .map(|p| {
                (
                    p["port"].as_i64().unwrap_or(0),
                    p["targetPort"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect())
    };
    assert_eq!(
        service_ports("portcullis-operator")?,
        [
            (8443, "identity".to_owned()),
            (8090, "policy".to_owned()),
            (443, "webhook".to_owned()),
            (9443, "webhook".to_owned()),
        ]
    );
    assert_eq!(
        service_ports("portcullis-operator-metrics")?,
        [(8080, "metrics".to_owned())]
    );

    // The webhook configurations have the shape the operator builds
    // (portcullis_operator::webhook::config), apart from the Service port (443 here) and
    // a longer list of excluded namespaces; no caBundle (the operator owns it).
    let settings = WebhookConfigSettings::in_cluster(TEMPLATE_NAMESPACE, "portcullis-operator");
    let expected_injector = serde_json::to_value(operator_mutating(&settings))?;
    let expected_validator = serde_json::to_value(operator_validating(&settings))?;
    let injector = find(
        &objects,
        "MutatingWebhookConfiguration",
        "portcullis-injector",
    )?;
    let validator = find(
        &objects,
        "ValidatingWebhookConfiguration",
        "portcullis-validator",
    )?;
    for (rendered, expected) in [
        (injector, &expected_injector),
        (validator, &expected_validator),
    ] {
        let rendered_hooks = rendered["webhooks"].as_array().context("webhooks")?;
        let expected_hooks = expected["webhooks"]
            .as_array()
            .context("operator webhooks")?;
        let names = |hooks: &[Value]| hooks.iter().map(|h| h["name"].clone()).collect::<Vec<_>>();
        assert_eq!(names(rendered_hooks), names(expected_hooks));
        for (hook, want) in rendered_hooks.iter().zip(expected_hooks) {
            let name = &hook["name"];
            for field in [
                "admissionReviewVersions",
                "failurePolicy",
                "matchPolicy",
                "reinvocationPolicy",
                "rules",
                "sideEffects",
                "timeoutSeconds",
            ] {
                assert_eq!(hook.get(field), want.get(field), "{name}: {field}");
            }
            let service = &hook["clientConfig"]["service"];
            assert_eq!(service["name"], "portcullis-operator", "{name}");
            assert_eq!(service["namespace"], TEMPLATE_NAMESPACE, "{name}");
            assert_eq!(
                service["path"], want["clientConfig"]["service"]["path"],
                "{name}"
            );
            assert_eq!(service["port"], 443, "{name}");
            assert!(
                hook["clientConfig"].get("caBundle").is_none(),
                "{name}: the chart must not set caBundle"
            );
            // Same selector, except that the chart excludes more namespaces.
            let split = |hook: &Value| -> (Vec<Value>, Vec<String>) {
                let expressions = hook["namespaceSelector"]["matchExpressions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let excluded = expressions
                    .iter()
                    .find(|e| e["key"] == "kubernetes.io/metadata.name" && e["operator"] == "NotIn")
                    .map(|e| str_list(&e["values"]))
                    .unwrap_or_default();
                let rest = expressions
                    .into_iter()
                    .filter(|e| e["key"] != "kubernetes.io/metadata.name")
                    .collect();
                (rest, excluded)
            };
            let (rendered_selector, rendered_excluded) = split(hook);
            let (expected_selector, expected_excluded) = split(want);
            assert_eq!(
                rendered_selector, expected_selector,
                "{name}: namespaceSelector"
            );
            // Where the operator excludes namespaces (the injector), the chart excludes
            // at least those, kube-system and the release namespace.
            let required: &[&str] = if expected_excluded.is_empty() {
                &[]
            } else {
                &["kube-system", TEMPLATE_NAMESPACE]
            };
            for namespace in expected_excluded
                .iter()
                .map(String::as_str)
                .chain(required.iter().copied())
            {
                assert!(
                    rendered_excluded.iter().any(|n| n == namespace),
                    "{name}: {namespace} not excluded"
                );
            }
        }
    }
    // And the contract itself, spelled out.
    let hooks = injector["webhooks"].as_array().context("webhooks")?;
    assert_eq!(
        hooks.len(),
        2,
        "label opt-in and tenant opt-in are two entries"
    );
    assert_eq!(hooks[0]["name"], "inject.portcullis.dev");
    assert_eq!(hooks[1]["name"], "tenant-inject.portcullis.dev");
    for hook in hooks {
        assert_eq!(hook["failurePolicy"], "Fail");
        assert_eq!(hook["clientConfig"]["service"]["path"], "/inject");
        assert_eq!(hook["rules"][0]["operations"], json!(["CREATE", "UPDATE"]));
        assert_eq!(
            hook["rules"][0]["resources"],
            json!(["pods", "pods/ephemeralcontainers"])
        );
    }
    let hook = &validator["webhooks"][0];
    assert_eq!(hook["name"], "validate.portcullis.dev");
    assert_eq!(hook["failurePolicy"], "Fail");
    assert_eq!(hook["clientConfig"]["service"]["path"], "/validate");
    let mut resources: Vec<String> = hook["rules"]
        .as_array()
        .context("rules")?
        .iter()
        .flat_map(|r| str_list(&r["resources"]))
        .collect();
    resources.sort();
    assert_eq!(resources, ["apikeys", "roles", "tenants"]);
    for rule in hook["rules"].as_array().context("rules")? {
        assert_eq!(rule["apiGroups"], json!(["portcullis.dev"]));
        assert_eq!(rule["operations"], json!(["CREATE", "UPDATE", "DELETE"]));
    }

    // RBAC: least privilege, no wildcards, no escalate/impersonate, and `bind` only on
    // the tenant-secrets ClusterRole (which the operator binds per tenant namespace).
    for (kind, name) in [
        ("ClusterRole", "portcullis-operator"),
        ("Role", "portcullis-operator"),
        ("ClusterRole", TENANT_SECRETS_ROLE),
    ] {
        for rule in find(&objects, kind, name)?["rules"]
            .as_array()
            .context("rules")?
        {
            for field in ["apiGroups", "resources", "verbs"] {
                assert!(
                    !str_list(&rule[field]).iter().any(|v| v == "*"),
                    "{kind} wildcard: {rule}"
                );
            }
            for verb in str_list(&rule["verbs"]) {
                assert!(
                    !matches!(verb.as_str(), "escalate" | "impersonate"),
                    "{kind} grants {verb}"
                );
                if verb == "bind" {
                    assert_eq!(
                        (
                            str_list(&rule["resources"]),
                            str_list(&rule["resourceNames"])
                        ),
                        (
                            vec!["clusterroles".to_owned()],
                            vec![TENANT_SECRETS_ROLE.to_owned()]
                        ),
                        "{kind} grants bind beyond the tenant-secrets ClusterRole: {rule}"
                    );
                }
            }
        }
    }
    // Secrets: never in the cluster-wide ClusterRole, and the ClusterRole that grants
    // them in tenant namespaces is bound by nothing in the chart.
    let cluster_rules = find(&objects, "ClusterRole", "portcullis-operator")?["rules"].clone();
    for rule in cluster_rules.as_array().context("rules")? {
        assert!(
            !str_list(&rule["resources"]).iter().any(|r| r == "secrets"),
            "Secrets granted cluster-wide: {rule}"
        );
    }
    for object in &objects {
        if matches!(
            object["kind"].as_str(),
            Some("ClusterRoleBinding" | "RoleBinding")
        ) {
            assert_ne!(
                object["roleRef"]["name"], TENANT_SECRETS_ROLE,
                "the chart binds the tenant-secrets ClusterRole: {object}"
            );
        }
    }
    let binding = find(&objects, "ClusterRoleBinding", "portcullis-operator")?;
    assert_eq!(binding["subjects"][0]["name"], "portcullis-operator");
    assert_eq!(binding["subjects"][0]["namespace"], TEMPLATE_NAMESPACE);

    // PDB with 2 replicas (policy/v1 for the default 1.21+ capabilities); none with 1.
    let pdb = find(&objects, "PodDisruptionBudget", "portcullis-operator")?;
    assert_eq!(pdb["apiVersion"], "policy/v1");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    let single = helm.render(&["--set", "replicas=1"])?;
    assert_eq!(
        kinds(&single, "PodDisruptionBudget"),
        0,
        "no PDB for one replica"
    );
    let old = helm.render(&["--kube-version", "1.20.2"])?;
    assert_eq!(
        find(&old, "PodDisruptionBudget", "portcullis-operator")?["apiVersion"],
        "policy/v1beta1"
    );

    // ServiceMonitor: never by default; when enabled only where the CRD is served.
    assert_eq!(kinds(&objects, "ServiceMonitor"), 0);
    let without_crd = helm.render(&["--set", "metrics.serviceMonitor.enabled=true"])?;
    assert_eq!(
        kinds(&without_crd, "ServiceMonitor"),
        0,
        "no ServiceMonitor without its CRD"
    );
    let with_crd = helm.render(&[
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--api-versions",
        "monitoring.coreos.com/v1/ServiceMonitor",
    ])?;
    assert_eq!(kinds(&with_crd, "ServiceMonitor"), 1);

    // CRDs come with the chart (crds/, installed by helm install, never templated).
    assert_eq!(kinds(&objects, "CustomResourceDefinition"), 0);
    let with_crds = helm.render(&["--include-crds"])?;
    let crds: BTreeSet<String> = with_crds
        .iter()
        .filter(|o| o["kind"] == "CustomResourceDefinition")
        .filter_map(|o| o["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        crds,
        BTreeSet::from([
            "apikeys.portcullis.dev".to_owned(),
            "roles.portcullis.dev".to_owned(),
            "tenants.portcullis.dev".to_owned()
        ])
    );
    Ok(())
}

/// The rendered NetworkPolicy's ingress rules as (ports, peers).
fn network_policy_rules(objects: &[Value], name: &str) -> Result<Vec<(Vec<String>, Vec<Value>)>> {
    let policy = find(objects, "NetworkPolicy", name)?;
    Ok(policy["spec"]["ingress"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|rule| {
            let ports = rule["ports"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|p| p["port"].as_str().unwrap_or_default().to_owned())
                .collect();
            let peers = rule["from"].as_array().cloned().unwrap_or_default();
            (ports, peers)
        })
        .collect())
}

#[test]
fn only_the_api_server_and_meshed_pods_reach_the_operator_ports() -> Result<()> {
    let Some(helm) = Helm::find() else {
        return Ok(());
    };
    let objects = helm.render(&[])?;
    let policy = find(&objects, "NetworkPolicy", "portcullis-operator")?;
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
        "operator"
    );
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress"]));
    let rules = network_policy_rules(&objects, "portcullis-operator")?;
    assert_eq!(rules.len(), 3, "{rules:?}");
    // Every container port is covered by exactly one rule; nothing else gets in.
    let deployment = find(&objects, "Deployment", "portcullis-operator")?;
    let mut named: Vec<String> = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|p| p["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    named.sort();
    let mut covered: Vec<String> = rules.iter().flat_map(|(p, _)| p.clone()).collect();
    covered.sort();
    assert_eq!(covered, named);
    // The webhooks: by default every address (the API server's is not known in
    // general), as ipBlocks only — so `except` can carve out pod CIDRs.
    let (ports, peers) = &rules[0];
    assert_eq!(ports, &["webhook"]);
    assert_eq!(
        peers,
        &[
            json!({"ipBlock": {"cidr": "0.0.0.0/0"}}),
            json!({"ipBlock": {"cidr": "::/0"}})
        ]
    );
    // Identity and policy: only injected pods, in any namespace.
    let (ports, peers) = &rules[1];
    assert_eq!(ports, &["identity", "policy"]);
    assert_eq!(
        peers,
        &[
            json!({"namespaceSelector": {}, "podSelector": {"matchLabels": {"portcullis.dev/injected": "true"}}})
        ]
    );
    // Metrics and health: anyone by default (kubelet probes, Prometheus anywhere).
    let (ports, peers) = &rules[2];
    assert_eq!(ports, &["metrics"]);
    assert!(peers.is_empty());

    // Pod CIDRs carved out per address family; the policy can be turned off.
    let carved = helm.render(&[
        "--set",
        "networkPolicy.webhook.except={10.244.0.0/16,fd00:10:244::/56}",
    ])?;
    let (_, peers) = &network_policy_rules(&carved, "portcullis-operator")?[0];
    assert_eq!(
        peers,
        &[
            json!({"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.244.0.0/16"]}}),
            json!({"ipBlock": {"cidr": "::/0", "except": ["fd00:10:244::/56"]}})
        ]
    );
    let off = helm.render(&["--set", "networkPolicy.enabled=false"])?;
    assert_eq!(kinds(&off, "NetworkPolicy"), 0);
    Ok(())
}

#[test]
fn helm_template_follows_non_default_values() -> Result<()> {
    let Some(helm) = Helm::find() else {
        return Ok(());
    };
    let values = chart_dir().join("ci").join("non-default-values.yaml");
    let values = values.to_string_lossy();
    let objects = helm.render(&[
        "-f",
        &values,
        "--api-versions",
        "monitoring.coreos.com/v1/ServiceMonitor",
    ])?;
    let deployment = find(&objects, "Deployment", "pc-operator")?;
    assert_eq!(deployment["spec"]["replicas"], 3);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "portcullis");
    assert!(
        pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            .is_array()
    );
    let container = &pod["containers"][0];
    assert_eq!(
        container["image"],
        "registry.example.com/portcullis/portcullis-operator@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    );
    let setting = |name: &str| {
        env_value(container, name)
            .and_then(|e| e["value"].as_str())
            .map(str::to_owned)
    };
    assert_eq!(
        setting("PORTCULLIS_TRUST_DOMAIN").as_deref(),
        Some("prod.example.com")
    );
    assert_eq!(
        setting("PORTCULLIS_ROTATION_PERIOD").as_deref(),
        Some("24h")
    );
    assert_eq!(setting("PORTCULLIS_KEY_HASH_COST").as_deref(), Some("11"));
    assert_eq!(
        setting("PORTCULLIS_KEK_SECRET").as_deref(),
        Some("portcullis-kek-from-kms")
    );
    assert_eq!(setting("PORTCULLIS_LOG_JSON").as_deref(), Some("false"));
    assert_eq!(
        setting("PORTCULLIS_PROXY_IMAGE").as_deref(),
        Some("registry.example.com/portcullis/portcullis-proxy:0.1.0-rc.1")
    );
    assert_eq!(
        setting("PORTCULLIS_EXCLUDED_NAMESPACES").as_deref(),
        Some("kube-system,monitoring,portcullis-system"),
        "kube-system and the release namespace are excluded whatever the list says"
    );
    assert_eq!(
        find(&objects, "PodDisruptionBudget", "pc-operator")?["spec"]["minAvailable"],
        2
    );
    let injector = find(
        &objects,
        "MutatingWebhookConfiguration",
        "portcullis-injector",
    )?;
    for hook in injector["webhooks"].as_array().context("webhooks")? {
        assert_eq!(hook["failurePolicy"], "Ignore");
        assert_eq!(hook["timeoutSeconds"], 5);
        assert_eq!(hook["clientConfig"]["service"]["name"], "pc-operator");
    }
    let rules = network_policy_rules(&objects, "pc-operator")?;
    assert_eq!(
        rules[0].1,
        [
            json!({"ipBlock": {"cidr": "10.0.0.0/24", "except": ["10.0.0.128/25"]}}),
            json!({"ipBlock": {"cidr": "fd00:10::/64"}})
        ]
    );
    assert_eq!(
        rules[2].1,
        [json!({"namespaceSelector": {"matchLabels": {"team": "monitoring"}}})]
    );
    let monitor = find(&objects, "ServiceMonitor", "pc-operator")?;
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(monitor["spec"]["endpoints"][0]["interval"], "15s");
    let binding = find(&objects, "ClusterRoleBinding", "pc-operator")?;
    assert_eq!(binding["subjects"][0]["name"], "portcullis");
    Ok(())
}

#[test]
fn schema_refuses_bad_values_naming_the_field() -> Result<()> {
    let Some(helm) = Helm::find() else {
        return Ok(());
    };
    let chart = chart_dir();
    let chart = chart.to_string_lossy();
    let cases: [(&str, &[&str]); 7] = [
        ("replicas=-1", &["/replicas", "minimum"]),
        (
            "identity.rotationPeriod=3days",
            &[
                "/identity/rotationPeriod",
                "3days",
                "does not match pattern",
            ],
        ),
        ("replicaCount=3", &["replicaCount", "not allowed"]),
        (
            "webhook.failurePolicy=Sometimes",
            &["/webhook/failurePolicy", "one of 'Fail', 'Ignore'"],
        ),
        (
            "audit.retentionDays=3000",
            &["/audit/retentionDays", "maximum"],
        ),
        (
            "apiKeys.defaultRateLimit.per=soon",
            &["/apiKeys/defaultRateLimit/per", "does not match pattern"],
        ),
        (
            "networkPolicy.webhook.apiServerCIDRs={apiserver.example.com}",
            &[
                "/networkPolicy/webhook/apiServerCIDRs/0",
                "does not match pattern",
            ],
        ),
    ];
    for (set, expected) in cases {
        let out = helm.run(&["template", RELEASE, &chart, "--set", set], None)?;
        assert!(!out.success, "helm accepted --set {set}");
        assert!(
            out.stderr
                .contains("values don't meet the specifications of the schema"),
            "--set {set}: {}",
            out.stderr
        );
        for needle in expected {
            assert!(
                out.stderr.contains(needle),
                "--set {set}: stderr lacks {needle:?}:\n{}",
                out.stderr
            );
        }
    }
    // The same refusal from a values file, as users meet it.
    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "replicaCount: 3\nidentity:\n  rotationPeriod: 3days\n",
    )?;
    let out = helm.run(&["lint", &chart, "-f", &bad.to_string_lossy()], None)?;
    assert!(!out.success);
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(
        all.contains("replicaCount") && all.contains("/identity/rotationPeriod"),
        "{all}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------
// envtest: install, upgrade, RBAC, the operator
// ---------------------------------------------------------------------------------

/// The chart installed into the shared envtest, then upgraded; see [`install_and_upgrade`].
struct Release {
    namespace: String,
    service_account: String,
}

impl Release {
    fn user(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }

    fn groups(&self) -> Vec<String> {
        vec![
            "system:serviceaccounts".to_owned(),
            format!("system:serviceaccounts:{}", self.namespace),
            "system:authenticated".to_owned(),
        ]
    }

    fn client(&self, env: &EnvTest) -> Result<Client> {
        let groups = self.groups();
        let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
        Ok(env.client_impersonating(&self.user(), &groups)?)
    }
}

static RELEASE_ONCE: OnceCell<Result<Release, String>> = OnceCell::const_new();
/// The envtest tests change cluster-wide objects (the ClusterRole, webhooks): one at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// The shared envtest and the installed release; `None` when skipping.
async fn release() -> Result<Option<(&'static EnvTest, &'static Release)>> {
    let Some(env) = envtest::shared().await? else {
        return Ok(None);
    };
    let result = RELEASE_ONCE
        .get_or_init(|| async {
            match Helm::find() {
                None => Err("helm is not installed".to_owned()),
                Some(helm) => install_and_upgrade(env, &helm)
                    .await
                    .map_err(|e| format!("{e:#}")),
            }
        })
        .await;
    match result {
        Ok(release) => Ok(Some((env, release))),
        Err(message) if message == "helm is not installed" => Ok(None),
        Err(message) => bail!("installing the chart failed: {message}"),
    }
}

async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    portcullis_e2e::wait::until(what, timeout, Duration::from_millis(100), check).await
}

fn secret_rv_and_data(secret: &Secret) -> (Option<String>, Option<BTreeMap<String, ByteString>>) {
    (
        secret.metadata.resource_version.clone(),
        secret.data.clone(),
    )
}

fn ca_bundles_mutating(config: &MutatingWebhookConfiguration) -> Vec<Option<ByteString>> {
    config
        .webhooks
        .iter()
        .flatten()
        .map(|w| w.client_config.ca_bundle.clone())
        .collect()
}

fn ca_bundles_validating(config: &ValidatingWebhookConfiguration) -> Vec<Option<ByteString>> {
    config
        .webhooks
        .iter()
        .flatten()
        .map(|w| w.client_config.ca_bundle.clone())
        .collect()
}

/// What the operator does at runtime (its own function): server-side apply of each
/// webhook's caBundle, owned by field manager portcullis-operator.
async fn patch_ca_bundles(
    client: &Client,
    namespace: &str,
    ca_pem: &str,
) -> Result<(), WebhookError> {
    let settings = WebhookTlsSettings::new(namespace, "portcullis-operator");
    rotation::patch_ca_bundles(client, &settings, ca_pem).await
}

/// helm install (defaults), checks, the operator's caBundle, helm upgrade server-side
/// and client-side with changed values, checks. Leaves the release with
/// failurePolicy=Ignore so later tests can write Portcullis objects without a running
/// webhook server.
async fn install_and_upgrade(env: &'static EnvTest, helm: &Helm) -> Result<Release> {
    let admin = env.client()?;
    let namespace = env.create_namespace("portcullis").await?;
    let kubeconfig = env.kubeconfig_path().to_path_buf();
    let chart = chart_dir().to_string_lossy().into_owned();

    // The operator's CA exists before the chart is installed (a reinstall) and must
    // survive install and upgrades untouched.
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &namespace);
    let ca_root = secrets
        .create(
            &PostParams::default(),
            &Secret {
                metadata: ObjectMeta {
                    name: Some("portcullis-ca-root".into()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/managed-by".into(),
                        "portcullis-operator".into(),
                    )])),
                    ..ObjectMeta::default()
                },
                data: Some(BTreeMap::from([(
                    "ca.crt".into(),
                    ByteString(b"pre-existing root".to_vec()),
                )])),
                ..Secret::default()
            },
        )
        .await?;
    let ca_root_before = secret_rv_and_data(&ca_root);

    // 1. helm install with the default values; helm installs the CRDs from crds/.
    let install = helm
        .run_async(
            vec![
                "install".into(),
                RELEASE.into(),
                chart.clone(),
                "--namespace".into(),
                namespace.clone(),
            ],
            kubeconfig.clone(),
        )
        .await?;
    install.ok()?;
    ensure!(
        install.stdout.contains("kubectl portcullis check"),
        "NOTES: {}",
        install.stdout
    );
    ensure!(
        install.stdout.contains("kubectl apply --server-side"),
        "NOTES must say how to upgrade CRDs"
    );

    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    for name in [
        "tenants.portcullis.dev",
        "roles.portcullis.dev",
        "apikeys.portcullis.dev",
    ] {
        let crd = crds
            .get(name)
            .await
            .with_context(|| format!("CRD {name} not installed"))?;
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        ensure!(established, "CRD {name} not Established");
    }
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &namespace);
    let deployment = deployments.get("portcullis-operator").await?;
    ensure!(
        deployment.spec.as_ref().and_then(|s| s.replicas) == Some(2),
        "replicas"
    );
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), &namespace);
    accounts.get("portcullis-operator").await?;
    let services: Api<Service> = Api::namespaced(admin.clone(), &namespace);
    for name in ["portcullis-operator", "portcullis-operator-metrics"] {
        services
            .get(name)
            .await
            .with_context(|| format!("Service {name}"))?;
    }
    // 1.20 serves PodDisruptionBudget only as policy/v1beta1: the chart picked it.
    let pdb_resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("policy", "v1beta1", "PodDisruptionBudget"),
        "poddisruptionbudgets",
    );
    let pdbs: Api<DynamicObject> = Api::namespaced_with(admin.clone(), &namespace, &pdb_resource);
    let pdb = pdbs
        .get("portcullis-operator")
        .await
        .context("PodDisruptionBudget")?;
    ensure!(pdb.data["spec"]["minAvailable"] == 1, "PDB {:?}", pdb.data);
    // The API server accepted the chart's NetworkPolicy as rendered.
    let policies: Api<NetworkPolicy> = Api::namespaced(admin.clone(), &namespace);
    let policy = policies
        .get("portcullis-operator")
        .await
        .context("the operator's NetworkPolicy")?;
    let ingress = policy
        .spec
        .as_ref()
        .and_then(|s| s.ingress.clone())
        .unwrap_or_default();
    ensure!(ingress.len() == 3, "NetworkPolicy ingress {ingress:?}");
    let cluster_roles: Api<ClusterRole> = Api::all(admin.clone());
    cluster_roles.get("portcullis-operator").await?;
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(admin.clone());
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(admin.clone());
    let injector = mutating.get("portcullis-injector").await?;
    ensure!(
        ca_bundles_mutating(&injector).iter().all(Option::is_none),
        "caBundle set by the chart"
    );
    for hook in injector.webhooks.iter().flatten() {
        ensure!(
            hook.failure_policy.as_deref() == Some("Fail"),
            "{} failurePolicy",
            hook.name
        );
    }
    validating.get("portcullis-validator").await?;

    // Helm created no Secret: only its release records, ServiceAccount tokens (1.20)
    // and the operator's pre-existing CA.
    for secret in secrets.list(&ListParams::default()).await? {
        let name = secret.name_any();
        let is_release = name.starts_with("sh.helm.release.v1.");
        let is_token = secret.type_.as_deref() == Some("kubernetes.io/service-account-token");
        ensure!(
            is_release || is_token || name == "portcullis-ca-root",
            "unexpected Secret {name}"
        );
    }
    ensure!(
        secret_rv_and_data(&secrets.get("portcullis-ca-root").await?) == ca_root_before,
        "helm install changed portcullis-ca-root"
    );

    // 2. Fail closed: with no operator serving, the API server refuses Portcullis
    // objects and pods in opted-in namespaces, naming the webhook.
    let tenants: Api<Tenant> = Api::all(admin.clone());
    let tenant: Tenant = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
        "metadata": {"name": "fail-closed"}, "spec": {}
    }))?;
    match tenants.create(&PostParams::default(), &tenant).await {
        Ok(_) => bail!("a Tenant was admitted although the validating webhook is unreachable"),
        Err(e) => ensure!(
            e.to_string().contains("validate.portcullis.dev"),
            "unexpected refusal: {e}"
        ),
    }
    let opted_in = env.create_namespace("opted-in").await?;
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    namespaces
        .patch(
            &opted_in,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"portcullis.dev/inject": "enabled"}}})),
        )
        .await?;
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "app"},
        "spec": {"automountServiceAccountToken": false,
                 "containers": [{"name": "app", "image": "example.com/app:1"}]}
    }))?;
    match Api::<Pod>::namespaced(admin.clone(), &opted_in)
        .create(&PostParams::default(), &pod)
        .await
    {
        Ok(_) => bail!("a pod in an opted-in namespace was admitted without the injector"),
        Err(e) => ensure!(
            e.to_string().contains("inject.portcullis.dev"),
            "unexpected refusal: {e}"
        ),
    }
    let tenant_ns = env.create_namespace("tenant-owned").await?;
    namespaces
        .patch(
            &tenant_ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"portcullis.dev/tenant": "acme"}}})),
        )
        .await?;
    match Api::<Pod>::namespaced(admin.clone(), &tenant_ns)
        .create(&PostParams::default(), &pod)
        .await
    {
        Ok(_) => bail!("a pod in a tenant namespace was admitted without the injector"),
        Err(e) => ensure!(
            e.to_string().contains("tenant-inject.portcullis.dev"),
            "unexpected refusal: {e}"
        ),
    }
    // Not opted in: the injector is never called.
    let plain = env.create_namespace("plain").await?;
    Api::<Pod>::namespaced(admin.clone(), &plain)
        .create(&PostParams::default(), &pod)
        .await
        .context("a pod in a namespace that did not opt in must not reach the injector")?;

    // 3. The operator patches its caBundle (field manager portcullis-operator).
    patch_ca_bundles(&admin, &namespace, env.serving_ca_pem()).await?;
    let bundles_before = (
        ca_bundles_mutating(&mutating.get("portcullis-injector").await?),
        ca_bundles_validating(&validating.get("portcullis-validator").await?),
    );
    ensure!(
        bundles_before
            .0
            .iter()
            .chain(&bundles_before.1)
            .all(Option::is_some)
    );

    // 4. helm upgrade with changed values: server-side (helm 4's default), then
    // client-side (helm 3's three-way merge).
    let upgrades: [(&str, &[&str]); 2] = [
        (
            "true",
            &[
                "--set",
                "replicas=3",
                "--set",
                "identity.rotationPeriod=48h",
                "--set",
                "webhook.failurePolicy=Ignore",
            ],
        ),
        (
            "false",
            &[
                "--set",
                "replicas=2",
                "--set",
                "identity.rotationPeriod=36h",
                "--set",
                "webhook.failurePolicy=Ignore",
            ],
        ),
    ];
    for (server_side, sets) in upgrades {
        let mut args: Vec<String> = vec![
            "upgrade".into(),
            RELEASE.into(),
            chart.clone(),
            "--namespace".into(),
            namespace.clone(),
            format!("--server-side={server_side}"),
            "--set".into(),
            "webhook.timeoutSeconds=1".into(),
        ];
        args.extend(sets.iter().map(|s| (*s).to_owned()));
        helm.run_async(args, kubeconfig.clone()).await?.ok()?;

        let deployment = deployments.get("portcullis-operator").await?;
        let replicas = deployment.spec.as_ref().and_then(|s| s.replicas);
        let expected_replicas = if server_side == "true" { 3 } else { 2 };
        ensure!(
            replicas == Some(expected_replicas),
            "server-side={server_side}: replicas {replicas:?}"
        );
        let period = deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.containers.first())
            .and_then(|c| c.env.as_ref())
            .and_then(|env| env.iter().find(|e| e.name == "PORTCULLIS_ROTATION_PERIOD"))
            .and_then(|e| e.value.clone());
        let expected_period = if server_side == "true" { "48h" } else { "36h" };
        ensure!(
            period.as_deref() == Some(expected_period),
            "rotation period {period:?}"
        );

        let injector = mutating.get("portcullis-injector").await?;
        let validator = validating.get("portcullis-validator").await?;
        for hook in injector.webhooks.iter().flatten() {
            ensure!(
                hook.failure_policy.as_deref() == Some("Ignore"),
                "upgrade did not set failurePolicy"
            );
        }
        ensure!(
            (
                ca_bundles_mutating(&injector),
                ca_bundles_validating(&validator)
            ) == bundles_before,
            "helm upgrade (server-side={server_side}) changed the caBundle the operator set"
        );
        ensure!(
            secret_rv_and_data(&secrets.get("portcullis-ca-root").await?) == ca_root_before,
            "helm upgrade (server-side={server_side}) changed portcullis-ca-root"
        );
    }

    Ok(Release {
        namespace,
        service_account: "portcullis-operator".to_owned(),
    })
}

#[tokio::test]
async fn helm_install_and_upgrade_keep_the_operator_state() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let Some((env, release)) = release().await? else {
        return Ok(());
    };
    // install_and_upgrade checked everything; confirm the release is what helm reports.
    let helm = Helm::find().context("helm")?;
    let status = helm
        .run_async(
            vec![
                "status".into(),
                RELEASE.into(),
                "--namespace".into(),
                release.namespace.clone(),
                "-o".into(),
                "json".into(),
            ],
            env.kubeconfig_path().to_path_buf(),
        )
        .await?;
    status.ok()?;
    let status: Value = serde_json::from_str(&status.stdout)?;
    assert_eq!(status["info"]["status"], "deployed");
    assert_eq!(status["version"], 3, "install + two upgrades");
    Ok(())
}

// ---------------------------------------------------------------------------------
// RBAC probes: every API call the operator makes, as its ServiceAccount
// ---------------------------------------------------------------------------------

/// (API group, resource, verb).
type Need = (String, String, String);

fn need(group: &str, resource: &str, verb: &str) -> Need {
    (group.to_owned(), resource.to_owned(), verb.to_owned())
}

/// The permissions of the RBAC Roles the operator generates for Portcullis Roles, at
/// most every permission (Owner): the operator must hold all of them itself.
fn generated_rules() -> Vec<PolicyRule> {
    let all: BTreeSet<Permission> = Permission::ALL.into_iter().collect();
    portcullis_operator::rbac::rules_for(&all)
}

fn rule_needs(rules: &[PolicyRule]) -> Vec<Need> {
    let mut needs = Vec::new();
    for rule in rules {
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    needs.push(need(group, resource, verb));
                }
            }
        }
    }
    needs
}

#[derive(Debug)]
struct ProbeError {
    forbidden: bool,
    message: String,
}

impl From<kube::Error> for ProbeError {
    fn from(e: kube::Error) -> Self {
        let forbidden = matches!(&e, kube::Error::Api(status) if status.code == 403);
        Self {
            forbidden,
            message: e.to_string(),
        }
    }
}

impl From<anyhow::Error> for ProbeError {
    fn from(e: anyhow::Error) -> Self {
        Self {
            forbidden: false,
            message: format!("{e:#}"),
        }
    }
}

type ProbeResult = std::result::Result<(), ProbeError>;

/// Objects and clients the probes use.
struct Cx {
    admin: Client,
    sa: Client,
    sa_user: String,
    sa_groups: Vec<String>,
    release_ns: String,
    tenant_ns: String,
    /// A namespace no Tenant holds: the operator has no Secret access there.
    unbound_ns: String,
    tenant: String,
    apikey: String,
    /// A RBAC Role holding every generated permission (target of binding probes).
    all_permissions_role: String,
    empty_role: String,
    ca_pem: String,
}

fn suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

async fn list_one<K>(api: Api<K>) -> ProbeResult
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.list(&ListParams::default().limit(1)).await?;
    Ok(())
}

async fn watch_once<K>(api: Api<K>, fields: Option<&str>) -> ProbeResult
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut params = WatchParams::default().timeout(1);
    if let Some(fields) = fields {
        params = params.fields(fields);
    }
    let stream = api.watch(&params, "0").await?;
    // The request was authorized once the stream opened; read at most one event.
    let mut stream = Box::pin(stream);
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
    Ok(())
}

/// A NetworkPolicy like the operator's `portcullis-inbound`.
fn probe_network_policy(name: &str, ns: &str) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"podSelector": {"matchExpressions": [
                        {"key": "portcullis.dev/injected", "operator": "Exists"}]},
                    "policyTypes": ["Ingress"],
                    "ingress": [{"ports": [{"protocol": "TCP"}]}]}})
}

fn merge_annotation() -> Patch<Value> {
    Patch::Merge(json!({"metadata": {"annotations": {"portcullis.dev/probe": suffix()}}}))
}

/// One API call of the operator (or, for finalizers, an authorization the API server
/// checks on the operator's behalf).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Probe {
    ListTenants,
    WatchTenants,
    GetTenant,
    PatchTenantFinalizers,
    ApplyTenantStatus,
    ListRoles,
    WatchRoles,
    GetRole,
    ApplyBuiltinRole,
    DeleteRole,
    ApplyRoleStatus,
    ListApiKeys,
    WatchApiKeys,
    GetApiKey,
    MarkApiKey,
    ApplyApiKeyStatus,
    OwnerRefTenant,
    OwnerRefRole,
    OwnerRefApiKey,
    GetNamespace,
    ListNamespaces,
    WatchNamespaces,
    LabelNamespace,
    GetApiKeySecret,
    ListSecrets,
    WatchSecrets,
    CreateApiKeySecret,
    ReplaceApiKeySecret,
    DeleteApiKeySecret,
    GetCaSecret,
    CreateOwnSecret,
    ReplaceOwnSecret,
    BindTenantSecrets,
    ApplyTrustBundle,
    GetConfigMap,
    ListConfigMaps,
    WatchConfigMaps,
    ApplyNetworkPolicy,
    GetNetworkPolicy,
    ListNetworkPolicies,
    WatchNetworkPolicies,
    DeleteNetworkPolicy,
    GetPod,
    ListPods,
    WatchPods,
    ListServices,
    WatchServices,
    ApplyGeneratedRole,
    ApplyGeneratedRoleBinding,
    ListRbacRoles,
    WatchRbacRoles,
    DeleteRbacRole,
    ListRoleBindings,
    WatchRoleBindings,
    DeleteRoleBinding,
    CreateTokenReview,
    CreateSubjectAccessReview,
    CreateEvent,
    PatchEventSeries,
    CreateLease,
    GetLease,
    RenewLease,
    PatchWebhookCaBundles,
    GetCrd,
    ListCrds,
}

impl Probe {
    const ALL: [Probe; 65] = [
        Self::ListTenants,
        Self::WatchTenants,
        Self::GetTenant,
        Self::PatchTenantFinalizers,
        Self::ApplyTenantStatus,
        Self::ListRoles,
        Self::WatchRoles,
        Self::GetRole,
        Self::ApplyBuiltinRole,
        Self::DeleteRole,
        Self::ApplyRoleStatus,
        Self::ListApiKeys,
        Self::WatchApiKeys,
        Self::GetApiKey,
        Self::MarkApiKey,
        Self::ApplyApiKeyStatus,
        Self::OwnerRefTenant,
        Self::OwnerRefRole,
        Self::OwnerRefApiKey,
        Self::GetNamespace,
        Self::ListNamespaces,
        Self::WatchNamespaces,
        Self::LabelNamespace,
        Self::GetApiKeySecret,
        Self::ListSecrets,
        Self::WatchSecrets,
        Self::CreateApiKeySecret,
        Self::ReplaceApiKeySecret,
        Self::DeleteApiKeySecret,
        Self::GetCaSecret,
        Self::CreateOwnSecret,
        Self::ReplaceOwnSecret,
        Self::BindTenantSecrets,
        Self::ApplyTrustBundle,
        Self::GetConfigMap,
        Self::ListConfigMaps,
        Self::WatchConfigMaps,
        Self::ApplyNetworkPolicy,
        Self::GetNetworkPolicy,
        Self::ListNetworkPolicies,
        Self::WatchNetworkPolicies,
        Self::DeleteNetworkPolicy,
        Self::GetPod,
        Self::ListPods,
        Self::WatchPods,
        Self::ListServices,
        Self::WatchServices,
        Self::ApplyGeneratedRole,
        Self::ApplyGeneratedRoleBinding,
        Self::ListRbacRoles,
        Self::WatchRbacRoles,
        Self::DeleteRbacRole,
        Self::ListRoleBindings,
        Self::WatchRoleBindings,
        Self::DeleteRoleBinding,
        Self::CreateTokenReview,
        Self::CreateSubjectAccessReview,
        Self::CreateEvent,
        Self::PatchEventSeries,
        Self::CreateLease,
        Self::GetLease,
        Self::RenewLease,
        Self::PatchWebhookCaBundles,
        Self::GetCrd,
        Self::ListCrds,
    ];

    /// The permissions this call needs.
    fn needs(self) -> Vec<Need> {
        const PC: &str = "portcullis.dev";
        const RBAC: &str = "rbac.authorization.k8s.io";
        const WEBHOOKS: &str = "admissionregistration.k8s.io";
        const NET: &str = "networking.k8s.io";
        use Probe::*;
        match self {
            ListTenants => vec![need(PC, "tenants", "list")],
            WatchTenants => vec![need(PC, "tenants", "watch")],
            GetTenant => vec![need(PC, "tenants", "get")],
            PatchTenantFinalizers => vec![need(PC, "tenants", "patch")],
            ApplyTenantStatus => vec![need(PC, "tenants/status", "patch")],
            ListRoles => vec![need(PC, "roles", "list")],
            WatchRoles => vec![need(PC, "roles", "watch")],
            GetRole => vec![need(PC, "roles", "get")],
            // Server-side apply that creates the object needs create as well as patch.
            ApplyBuiltinRole => vec![need(PC, "roles", "patch"), need(PC, "roles", "create")],
            DeleteRole => vec![need(PC, "roles", "delete")],
            ApplyRoleStatus => vec![need(PC, "roles/status", "patch")],
            ListApiKeys => vec![need(PC, "apikeys", "list")],
            WatchApiKeys => vec![need(PC, "apikeys", "watch")],
            GetApiKey => vec![need(PC, "apikeys", "get")],
            MarkApiKey => vec![need(PC, "apikeys", "patch")],
            ApplyApiKeyStatus => vec![need(PC, "apikeys/status", "patch")],
            OwnerRefTenant => vec![need(PC, "tenants/finalizers", "update")],
            OwnerRefRole => vec![need(PC, "roles/finalizers", "update")],
            OwnerRefApiKey => vec![need(PC, "apikeys/finalizers", "update")],
            GetNamespace => vec![need("", "namespaces", "get")],
            ListNamespaces => vec![need("", "namespaces", "list")],
            WatchNamespaces => vec![need("", "namespaces", "watch")],
            LabelNamespace => vec![need("", "namespaces", "patch")],
            GetApiKeySecret | GetCaSecret => vec![need("", "secrets", "get")],
            ListSecrets => vec![need("", "secrets", "list")],
            WatchSecrets => vec![need("", "secrets", "watch")],
            CreateApiKeySecret | CreateOwnSecret => vec![need("", "secrets", "create")],
            ReplaceApiKeySecret | ReplaceOwnSecret => vec![need("", "secrets", "update")],
            // The escalation check: the operator holds no Secret access in a namespace
            // it has not bound yet, so only `bind` lets it reference the ClusterRole.
            BindTenantSecrets => vec![
                need(RBAC, "rolebindings", "create"),
                need(RBAC, "clusterroles", "bind"),
            ],
            DeleteApiKeySecret => vec![need("", "secrets", "delete")],
            ApplyTrustBundle => vec![
                need("", "configmaps", "patch"),
                need("", "configmaps", "create"),
            ],
            GetConfigMap => vec![need("", "configmaps", "get")],
            ListConfigMaps => vec![need("", "configmaps", "list")],
            WatchConfigMaps => vec![need("", "configmaps", "watch")],
            ApplyNetworkPolicy => vec![
                need(NET, "networkpolicies", "patch"),
                need(NET, "networkpolicies", "create"),
            ],
            GetNetworkPolicy => vec![need(NET, "networkpolicies", "get")],
            ListNetworkPolicies => vec![need(NET, "networkpolicies", "list")],
            WatchNetworkPolicies => vec![need(NET, "networkpolicies", "watch")],
            DeleteNetworkPolicy => vec![need(NET, "networkpolicies", "delete")],
            GetPod => vec![need("", "pods", "get")],
            ListPods => vec![need("", "pods", "list")],
            WatchPods => vec![need("", "pods", "watch")],
            ListServices => vec![need("", "services", "list")],
            WatchServices => vec![need("", "services", "watch")],
            ApplyGeneratedRole => {
                let mut needs = rule_needs(&generated_rules());
                needs.extend([need(RBAC, "roles", "patch"), need(RBAC, "roles", "create")]);
                needs
            }
            ApplyGeneratedRoleBinding => {
                let mut needs = rule_needs(&generated_rules());
                needs.extend([
                    need(RBAC, "rolebindings", "patch"),
                    need(RBAC, "rolebindings", "create"),
                ]);
                needs
            }
            ListRbacRoles => vec![need(RBAC, "roles", "list")],
            WatchRbacRoles => vec![need(RBAC, "roles", "watch")],
            DeleteRbacRole => vec![need(RBAC, "roles", "delete")],
            ListRoleBindings => vec![need(RBAC, "rolebindings", "list")],
            WatchRoleBindings => vec![need(RBAC, "rolebindings", "watch")],
            DeleteRoleBinding => vec![need(RBAC, "rolebindings", "delete")],
            CreateTokenReview => vec![need("authentication.k8s.io", "tokenreviews", "create")],
            // The validating webhook asks whether a requester is a cluster admin.
            CreateSubjectAccessReview => vec![need(
                "authorization.k8s.io",
                "subjectaccessreviews",
                "create",
            )],
            CreateEvent => vec![need("events.k8s.io", "events", "create")],
            PatchEventSeries => vec![need("events.k8s.io", "events", "patch")],
            CreateLease => vec![need("coordination.k8s.io", "leases", "create")],
            GetLease => vec![need("coordination.k8s.io", "leases", "get")],
            RenewLease => vec![need("coordination.k8s.io", "leases", "update")],
            // Read each configuration, then apply its caBundle (the operator's
            // webhook::tls::rotation::patch_ca_bundles).
            PatchWebhookCaBundles => vec![
                need(WEBHOOKS, "mutatingwebhookconfigurations", "get"),
                need(WEBHOOKS, "mutatingwebhookconfigurations", "patch"),
                need(WEBHOOKS, "validatingwebhookconfigurations", "get"),
                need(WEBHOOKS, "validatingwebhookconfigurations", "patch"),
            ],
            GetCrd => vec![need(
                "apiextensions.k8s.io",
                "customresourcedefinitions",
                "get",
            )],
            ListCrds => vec![need(
                "apiextensions.k8s.io",
                "customresourcedefinitions",
                "list",
            )],
        }
    }

    /// Where the call happens: which chart roles can grant it.
    fn scope(self) -> Scope {
        use Probe::*;
        match self {
            GetApiKeySecret | ListSecrets | WatchSecrets | CreateApiKeySecret
            | ReplaceApiKeySecret | DeleteApiKeySecret => Scope::TenantNamespace,
            GetCaSecret | CreateOwnSecret | ReplaceOwnSecret | CreateLease | GetLease
            | RenewLease => Scope::ReleaseNamespace,
            _ => Scope::Anywhere,
        }
    }

    /// The permissions this call needs, where it needs them.
    fn scoped_needs(self) -> Vec<(Scope, Need)> {
        self.needs()
            .into_iter()
            .map(|n| (self.scope(), n))
            .collect()
    }

    async fn run(self, cx: &Cx) -> ProbeResult {
        use Probe::*;
        let sa = cx.sa.clone();
        let admin = cx.admin.clone();
        let ns = cx.tenant_ns.as_str();
        let apply = PatchParams::apply("portcullis-e2e-probe").force();
        match self {
            ListTenants => list_one(Api::<Tenant>::all(sa)).await,
            WatchTenants => watch_once(Api::<Tenant>::all(sa), None).await,
            GetTenant => Api::<Tenant>::all(sa)
                .get(&cx.tenant)
                .await
                .map(drop)
                .map_err(Into::into),
            PatchTenantFinalizers => {
                // kube's finalizer helper: a JSON patch on metadata.finalizers. An
                // annotation keeps the Tenant deletable.
                Api::<Tenant>::all(sa)
                    .patch(&cx.tenant, &PatchParams::default(), &merge_annotation())
                    .await?;
                Ok(())
            }
            ApplyTenantStatus => {
                let status = json!({"apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
                                    "metadata": {"name": cx.tenant},
                                    "status": {"observedGeneration": 1}});
                Api::<Tenant>::all(sa)
                    .patch_status(&cx.tenant, &apply, &Patch::Apply(status))
                    .await?;
                Ok(())
            }
            ListRoles => list_one(Api::<Role>::all(sa)).await,
            WatchRoles => watch_once(Api::<Role>::all(sa), None).await,
            GetRole => Api::<Role>::namespaced(sa, ns)
                .get("probe")
                .await
                .map(drop)
                .map_err(Into::into),
            ApplyBuiltinRole => {
                let name = format!("builtin-{}", suffix());
                let role = json!({"apiVersion": "portcullis.dev/v1alpha1", "kind": "Role",
                                  "metadata": {"name": name, "namespace": ns},
                                  "spec": {"permissions": ["keys:read"]}});
                Api::<Role>::namespaced(sa, ns)
                    .patch(&name, &apply, &Patch::Apply(role))
                    .await?;
                Ok(())
            }
            DeleteRole => {
                let role: Role = serde_json::from_value(json!({
                    "apiVersion": "portcullis.dev/v1alpha1", "kind": "Role",
                    "metadata": {"generateName": "doomed-", "namespace": ns}, "spec": {}}))
                .map_err(anyhow::Error::from)?;
                let created = Api::<Role>::namespaced(admin, ns)
                    .create(&PostParams::default(), &role)
                    .await?;
                Api::<Role>::namespaced(sa, ns)
                    .delete(&created.name_any(), &DeleteParams::default())
                    .await?;
                Ok(())
            }
            ApplyRoleStatus => {
                let status = json!({"apiVersion": "portcullis.dev/v1alpha1", "kind": "Role",
                                    "metadata": {"name": "probe", "namespace": ns},
                                    "status": {"observedGeneration": 1}});
                Api::<Role>::namespaced(sa, ns)
                    .patch_status("probe", &apply, &Patch::Apply(status))
                    .await?;
                Ok(())
            }
            ListApiKeys => list_one(Api::<ApiKey>::all(sa)).await,
            WatchApiKeys => watch_once(Api::<ApiKey>::all(sa), None).await,
            GetApiKey => Api::<ApiKey>::namespaced(sa, ns)
                .get(&cx.apikey)
                .await
                .map(drop)
                .map_err(Into::into),
            MarkApiKey => {
                Api::<ApiKey>::namespaced(sa, ns)
                    .patch(&cx.apikey, &PatchParams::default(), &merge_annotation())
                    .await?;
                Ok(())
            }
            ApplyApiKeyStatus => {
                let status = json!({"apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiKey",
                                    "metadata": {"name": cx.apikey, "namespace": ns},
                                    "status": {"observedGeneration": 1}});
                Api::<ApiKey>::namespaced(sa, ns)
                    .patch_status(&cx.apikey, &apply, &Patch::Apply(status))
                    .await?;
                Ok(())
            }
            // Owner references with blockOwnerDeletion need update on <owner>/finalizers
            // where OwnerReferencesPermissionEnforcement runs (not in envtest's default
            // plugin set), so ask the authorizer what that plugin would.
            OwnerRefTenant => self.access_review(cx, "tenants", None).await,
            OwnerRefRole => self.access_review(cx, "roles", Some(ns)).await,
            OwnerRefApiKey => self.access_review(cx, "apikeys", Some(ns)).await,
            GetNamespace => Api::<Namespace>::all(sa)
                .get(ns)
                .await
                .map(drop)
                .map_err(Into::into),
            ListNamespaces => list_one(Api::<Namespace>::all(sa)).await,
            WatchNamespaces => watch_once(Api::<Namespace>::all(sa), None).await,
            LabelNamespace => {
                let patch = json!({"metadata": {"labels": {"portcullis.dev/tenant": cx.tenant}}});
                Api::<Namespace>::all(sa)
                    .patch(ns, &PatchParams::default(), &Patch::Merge(patch))
                    .await?;
                Ok(())
            }
            GetApiKeySecret => {
                Api::<Secret>::namespaced(sa, ns)
                    .get_opt(&format!("{}-key", cx.apikey))
                    .await?;
                Ok(())
            }
            ListSecrets => list_one(Api::<Secret>::namespaced(sa, ns)).await,
            WatchSecrets => watch_once(Api::<Secret>::namespaced(sa, ns), None).await,
            CreateApiKeySecret => {
                let secret = self.apikey_secret(cx, "probe-key-").await?;
                Api::<Secret>::namespaced(sa, ns)
                    .create(&PostParams::default(), &secret)
                    .await?;
                Ok(())
            }
            ReplaceApiKeySecret => {
                let secrets = Api::<Secret>::namespaced(admin, ns);
                let created = secrets
                    .create(
                        &PostParams::default(),
                        &self.apikey_secret(cx, "probe-key-").await?,
                    )
                    .await?;
                let mut replaced = created.clone();
                replaced.data = Some(BTreeMap::from([(
                    "token".into(),
                    ByteString(b"ak_rotated".to_vec()),
                )]));
                Api::<Secret>::namespaced(sa, ns)
                    .replace(&created.name_any(), &PostParams::default(), &replaced)
                    .await?;
                Ok(())
            }
            DeleteApiKeySecret => {
                let secrets = Api::<Secret>::namespaced(admin, ns);
                let created = secrets
                    .create(
                        &PostParams::default(),
                        &self.apikey_secret(cx, "probe-key-").await?,
                    )
                    .await?;
                Api::<Secret>::namespaced(sa, ns)
                    .delete(&created.name_any(), &DeleteParams::default())
                    .await?;
                Ok(())
            }
            GetCaSecret => {
                Api::<Secret>::namespaced(sa, &cx.release_ns)
                    .get("portcullis-ca-root")
                    .await?;
                Ok(())
            }
            CreateOwnSecret => {
                let created = Api::<Secret>::namespaced(sa, &cx.release_ns)
                    .create(&PostParams::default(), &own_secret())
                    .await?;
                Api::<Secret>::namespaced(admin, &cx.release_ns)
                    .delete(&created.name_any(), &DeleteParams::default())
                    .await?;
                Ok(())
            }
            ReplaceOwnSecret => {
                let secrets = Api::<Secret>::namespaced(admin, &cx.release_ns);
                let created = secrets
                    .create(&PostParams::default(), &own_secret())
                    .await?;
                let mut replaced = created.clone();
                replaced.data = Some(BTreeMap::from([(
                    "key".into(),
                    ByteString(b"rotated".to_vec()),
                )]));
                let result = Api::<Secret>::namespaced(sa, &cx.release_ns)
                    .replace(&created.name_any(), &PostParams::default(), &replaced)
                    .await;
                secrets
                    .delete(&created.name_any(), &DeleteParams::default())
                    .await?;
                result?;
                Ok(())
            }
            BindTenantSecrets => {
                let created = Api::<RoleBinding>::namespaced(sa, &cx.unbound_ns)
                    .create(&PostParams::default(), &secrets_binding(cx))
                    .await?;
                Api::<RoleBinding>::namespaced(admin, &cx.unbound_ns)
                    .delete(&created.name_any(), &DeleteParams::default())
                    .await?;
                Ok(())
            }
            ApplyTrustBundle => {
                // A fresh name each time: the apply creates the ConfigMap, as in a new
                // tenant namespace.
                let name = format!("portcullis-trust-bundle-{}", suffix());
                let configmap = json!({"apiVersion": "v1", "kind": "ConfigMap",
                                       "metadata": {"name": name, "namespace": ns},
                                       "data": {"ca-bundle.crt": cx.ca_pem}});
                Api::<ConfigMap>::namespaced(sa, ns)
                    .patch(
                        &name,
                        &PatchParams::apply(OPERATOR_FIELD_MANAGER),
                        &Patch::Apply(configmap),
                    )
                    .await?;
                Ok(())
            }
            GetConfigMap => {
                Api::<ConfigMap>::namespaced(sa, ns)
                    .get_opt("portcullis-trust-bundle")
                    .await?;
                Ok(())
            }
            ListConfigMaps => list_one(Api::<ConfigMap>::all(sa)).await,
            WatchConfigMaps => watch_once(Api::<ConfigMap>::all(sa), None).await,
            ApplyNetworkPolicy => {
                // A fresh name each time: the apply creates it, as in a new namespace.
                let name = format!("portcullis-inbound-{}", suffix());
                Api::<NetworkPolicy>::namespaced(sa, ns)
                    .patch(
                        &name,
                        &PatchParams::apply(OPERATOR_FIELD_MANAGER),
                        &Patch::Apply(probe_network_policy(&name, ns)),
                    )
                    .await?;
                Ok(())
            }
            GetNetworkPolicy => {
                Api::<NetworkPolicy>::namespaced(sa, ns)
                    .get_opt("portcullis-inbound")
                    .await?;
                Ok(())
            }
            ListNetworkPolicies => list_one(Api::<NetworkPolicy>::all(sa)).await,
            WatchNetworkPolicies => watch_once(Api::<NetworkPolicy>::all(sa), None).await,
            DeleteNetworkPolicy => {
                let name = format!("doomed-{}", suffix());
                Api::<NetworkPolicy>::namespaced(admin, ns)
                    .patch(
                        &name,
                        &PatchParams::apply("portcullis-e2e-admin"),
                        &Patch::Apply(probe_network_policy(&name, ns)),
                    )
                    .await?;
                Api::<NetworkPolicy>::namespaced(sa, ns)
                    .delete(&name, &DeleteParams::default())
                    .await?;
                Ok(())
            }
            GetPod => {
                Api::<Pod>::namespaced(sa, ns)
                    .get_opt("no-such-pod")
                    .await?;
                Ok(())
            }
            ListPods => list_one(Api::<Pod>::all(sa)).await,
            WatchPods => watch_once(Api::<Pod>::all(sa), None).await,
            ListServices => list_one(Api::<k8s_openapi::api::core::v1::Service>::all(sa)).await,
            WatchServices => {
                watch_once(Api::<k8s_openapi::api::core::v1::Service>::all(sa), None).await
            }
            ApplyGeneratedRole => {
                let name = format!("portcullis:probe-{}", suffix());
                let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                                  "metadata": {"name": name, "namespace": ns},
                                  "rules": generated_rules()});
                Api::<RbacRole>::namespaced(sa, ns)
                    .patch(
                        &name,
                        &PatchParams::apply(OPERATOR_FIELD_MANAGER).force(),
                        &Patch::Apply(role),
                    )
                    .await?;
                Ok(())
            }
            ApplyGeneratedRoleBinding => {
                let name = format!("portcullis:probe-{}", suffix());
                let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                                     "metadata": {"name": name, "namespace": ns},
                                     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                                 "name": cx.all_permissions_role},
                                     "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                                                   "name": "david@acme.com"}]});
                Api::<RoleBinding>::namespaced(sa, ns)
                    .patch(
                        &name,
                        &PatchParams::apply(OPERATOR_FIELD_MANAGER).force(),
                        &Patch::Apply(binding),
                    )
                    .await?;
                Ok(())
            }
            ListRbacRoles => list_one(Api::<RbacRole>::all(sa)).await,
            WatchRbacRoles => watch_once(Api::<RbacRole>::all(sa), None).await,
            DeleteRbacRole => {
                let roles = Api::<RbacRole>::namespaced(admin, ns);
                let created = roles
                    .create(&PostParams::default(), &empty_rbac_role())
                    .await?;
                Api::<RbacRole>::namespaced(sa, ns)
                    .delete(&created.name_any(), &DeleteParams::default())
                    .await?;
                Ok(())
            }
            ListRoleBindings => list_one(Api::<RoleBinding>::all(sa)).await,
            WatchRoleBindings => watch_once(Api::<RoleBinding>::all(sa), None).await,
            DeleteRoleBinding => {
                let bindings = Api::<RoleBinding>::namespaced(admin, ns);
                let created = bindings
                    .create(&PostParams::default(), &empty_binding(&cx.empty_role))
                    .await?;
                Api::<RoleBinding>::namespaced(sa, ns)
                    .delete(&created.name_any(), &DeleteParams::default())
                    .await?;
                Ok(())
            }
            CreateTokenReview => {
                let review = TokenReview {
                    spec: TokenReviewSpec {
                        token: Some("not-a-token".into()),
                        audiences: Some(vec!["portcullis.dev/identity".into()]),
                    },
                    ..TokenReview::default()
                };
                Api::<TokenReview>::all(sa)
                    .create(&PostParams::default(), &review)
                    .await?;
                Ok(())
            }
            CreateSubjectAccessReview => {
                let user = k8s_openapi::api::authentication::v1::UserInfo {
                    username: Some("kubernetes-admin".into()),
                    groups: Some(vec!["kubeadm:cluster-admins".into()]),
                    ..Default::default()
                };
                let review =
                    portcullis_operator::webhook::validate::lookup::portcullis_admin_review(&user);
                Api::<SubjectAccessReview>::all(sa)
                    .create(&PostParams::default(), &review)
                    .await?;
                Ok(())
            }
            CreateEvent => {
                Api::<Event>::namespaced(sa, ns)
                    .create(&PostParams::default(), &new_event(cx))
                    .await?;
                Ok(())
            }
            PatchEventSeries => {
                let created = Api::<Event>::namespaced(admin, ns)
                    .create(&PostParams::default(), &new_event(cx))
                    .await?;
                let series = json!({"series": {"count": 2, "lastObservedTime": now_micro()}});
                Api::<Event>::namespaced(sa, ns)
                    .patch(
                        &created.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(series),
                    )
                    .await?;
                Ok(())
            }
            CreateLease => {
                let lease: Lease = serde_json::from_value(json!({
                    "metadata": {"generateName": "portcullis-operator-probe-"},
                    "spec": {"holderIdentity": "probe", "leaseDurationSeconds": 15}}))
                .map_err(anyhow::Error::from)?;
                Api::<Lease>::namespaced(sa, &cx.release_ns)
                    .create(&PostParams::default(), &lease)
                    .await?;
                Ok(())
            }
            GetLease => {
                Api::<Lease>::namespaced(sa, &cx.release_ns)
                    .get("portcullis-operator")
                    .await?;
                Ok(())
            }
            RenewLease => {
                let current = Api::<Lease>::namespaced(admin, &cx.release_ns)
                    .get("portcullis-operator")
                    .await?;
                let mut renewed = current.clone();
                if let Some(spec) = renewed.spec.as_mut() {
                    spec.renew_time = Some(MicroTime(now()));
                }
                Api::<Lease>::namespaced(sa, &cx.release_ns)
                    .replace("portcullis-operator", &PostParams::default(), &renewed)
                    .await?;
                Ok(())
            }
            PatchWebhookCaBundles => patch_ca_bundles(&sa, &cx.release_ns, &cx.ca_pem)
                .await
                .map_err(|e| match e {
                    WebhookError::Kube(e) => e.into(),
                    other => ProbeError {
                        forbidden: false,
                        message: other.to_string(),
                    },
                }),
            GetCrd => {
                Api::<CustomResourceDefinition>::all(sa)
                    .get("tenants.portcullis.dev")
                    .await?;
                Ok(())
            }
            ListCrds => list_one(Api::<CustomResourceDefinition>::all(sa)).await,
        }
    }

    async fn access_review(self, cx: &Cx, resource: &str, namespace: Option<&str>) -> ProbeResult {
        let attributes = ResourceAttributes {
            group: Some("portcullis.dev".into()),
            resource: Some(resource.into()),
            subresource: Some("finalizers".into()),
            verb: Some("update".into()),
            namespace: namespace.map(str::to_owned),
            ..ResourceAttributes::default()
        };
        let allowed = authorizer_allows(&cx.admin, &cx.sa_user, &cx.sa_groups, attributes)
            .await
            .map_err(ProbeError::from)?;
        if allowed {
            Ok(())
        } else {
            Err(ProbeError {
                forbidden: true,
                message: format!("update {resource}/finalizers is not allowed"),
            })
        }
    }

    /// An ApiKey Secret as the operator writes it: owned by the ApiKey.
    async fn apikey_secret(self, cx: &Cx, prefix: &str) -> Result<Secret> {
        let key = Api::<ApiKey>::namespaced(cx.admin.clone(), &cx.tenant_ns)
            .get(&cx.apikey)
            .await?;
        let owner = OwnerReference {
            api_version: "portcullis.dev/v1alpha1".into(),
            kind: "ApiKey".into(),
            name: key.name_any(),
            uid: key.uid().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
        Ok(Secret {
            metadata: ObjectMeta {
                generate_name: Some(prefix.into()),
                owner_references: Some(vec![owner]),
                ..ObjectMeta::default()
            },
            type_: Some("portcullis.dev/api-key".into()),
            data: Some(BTreeMap::from([(
                "token".into(),
                ByteString(b"ak_probe".to_vec()),
            )])),
            ..Secret::default()
        })
    }
}

fn now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}

fn now_micro() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

fn empty_rbac_role() -> RbacRole {
    RbacRole {
        metadata: ObjectMeta {
            generate_name: Some("portcullis:probe-".into()),
            ..ObjectMeta::default()
        },
        rules: Some(Vec::new()),
    }
}

fn empty_binding(role: &str) -> RoleBinding {
    probe_binding(
        "portcullis:probe-",
        "Role",
        role,
        k8s_openapi::api::rbac::v1::Subject {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "User".into(),
            name: "david@acme.com".into(),
            namespace: None,
        },
    )
}

/// A RoleBinding (name generated from `prefix`) of `role_kind` `role` to `subject`.
fn probe_binding(
    prefix: &str,
    role_kind: &str,
    role: &str,
    subject: k8s_openapi::api::rbac::v1::Subject,
) -> RoleBinding {
    RoleBinding {
        metadata: ObjectMeta {
            generate_name: Some(prefix.into()),
            ..ObjectMeta::default()
        },
        role_ref: k8s_openapi::api::rbac::v1::RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: role_kind.into(),
            name: role.into(),
        },
        subjects: Some(vec![subject]),
    }
}

/// A Secret in the operator's namespace, like its CA, KEK and DEK Secrets.
fn own_secret() -> Secret {
    Secret {
        metadata: ObjectMeta {
            generate_name: Some("portcullis-probe-".into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            "key".into(),
            ByteString(b"probe".to_vec()),
        )])),
        ..Secret::default()
    }
}

/// A RoleBinding like the one the operator writes in a namespace a Tenant binds, for
/// another subject: the probe's bindings must not give the operator's account access
/// to the namespace (it would then pass the escalation check without `bind`).
fn secrets_binding(cx: &Cx) -> RoleBinding {
    probe_binding(
        "portcullis-operator-secrets-",
        "ClusterRole",
        TENANT_SECRETS_ROLE,
        k8s_openapi::api::rbac::v1::Subject {
            api_group: None,
            kind: "ServiceAccount".into(),
            name: "portcullis-probe".into(),
            namespace: Some(cx.release_ns.clone()),
        },
    )
}

fn regarding(cx: &Cx) -> ObjectReference {
    ObjectReference {
        api_version: Some("portcullis.dev/v1alpha1".into()),
        kind: Some("ApiKey".into()),
        name: Some(cx.apikey.clone()),
        namespace: Some(cx.tenant_ns.clone()),
        ..ObjectReference::default()
    }
}

fn new_event(cx: &Cx) -> Event {
    Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", cx.apikey)),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now())),
        regarding: Some(regarding(cx)),
        reason: Some("Issued".into()),
        action: Some("Issued".into()),
        note: Some("probe".into()),
        type_: Some("Normal".into()),
        reporting_controller: Some("portcullis-operator".into()),
        reporting_instance: Some("probe".into()),
        ..Event::default()
    }
}

/// Admin-side setup of the probes' objects: a tenant namespace, a Tenant, a Role and
/// an ApiKey in it, the Lease, an all-permissions and an empty RBAC Role.
async fn probe_context(env: &EnvTest, release: &Release) -> Result<Cx> {
    let admin = env.client()?;
    let tenant_ns = env.create_namespace("rbac-tenant").await?;
    let unbound_ns = env.create_namespace("rbac-unbound").await?;
    let tenant = format!("rbac-{}", suffix());
    let tenant_object: Tenant = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
        "metadata": {"name": tenant}, "spec": {"namespaces": [tenant_ns],
        "scopes": {"identify": [{"methods": ["POST"], "path": "/v1/identify"}]}}}))?;
    Api::<Tenant>::all(admin.clone())
        .create(&PostParams::default(), &tenant_object)
        .await?;
    let role: Role = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "Role",
        "metadata": {"name": "probe", "namespace": tenant_ns}, "spec": {"permissions": ["keys:read"]}}))?;
    Api::<Role>::namespaced(admin.clone(), &tenant_ns)
        .create(&PostParams::default(), &role)
        .await?;
    let key: ApiKey = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiKey",
        "metadata": {"name": "probe", "namespace": tenant_ns},
        "spec": {"role": "Developer", "scopes": ["identify"]}}))?;
    Api::<ApiKey>::namespaced(admin.clone(), &tenant_ns)
        .create(&PostParams::default(), &key)
        .await?;

    let leases: Api<Lease> = Api::namespaced(admin.clone(), &release.namespace);
    if leases.get_opt("portcullis-operator").await?.is_none() {
        let lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": "portcullis-operator"},
            "spec": {"holderIdentity": "", "leaseDurationSeconds": 15}}))?;
        leases.create(&PostParams::default(), &lease).await?;
    }
    // What the operator binds once the Tenant holds the namespace (no operator runs here).
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "portcullis-operator-secrets", "namespace": tenant_ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": TENANT_SECRETS_ROLE},
        "subjects": [{"kind": "ServiceAccount", "name": release.service_account,
                      "namespace": release.namespace}]});
    Api::<RoleBinding>::namespaced(admin.clone(), &tenant_ns)
        .create(&PostParams::default(), &serde_json::from_value(binding)?)
        .await?;
    let roles: Api<RbacRole> = Api::namespaced(admin.clone(), &tenant_ns);
    let all = roles
        .create(
            &PostParams::default(),
            &RbacRole {
                metadata: ObjectMeta {
                    generate_name: Some("portcullis:all-".into()),
                    ..ObjectMeta::default()
                },
                rules: Some(generated_rules()),
            },
        )
        .await?;
    let empty = roles
        .create(&PostParams::default(), &empty_rbac_role())
        .await?;
    Ok(Cx {
        admin,
        sa: release.client(env)?,
        sa_user: release.user(),
        sa_groups: release.groups(),
        release_ns: release.namespace.clone(),
        tenant_ns,
        unbound_ns,
        tenant,
        apikey: "probe".into(),
        all_permissions_role: all.name_any(),
        empty_role: empty.name_any(),
        ca_pem: env.serving_ca_pem().to_owned(),
    })
}

/// Whether `rule` grants `need` (resourceNames aside: the probes use the names allowed).
fn grants(rule: &PolicyRule, (group, resource, verb): &Need) -> bool {
    rule.api_groups.iter().flatten().any(|g| g == group)
        && rule.resources.iter().flatten().any(|r| r == resource)
        && rule.verbs.iter().any(|v| v == verb)
}

/// Where a call happens, as far as the chart's roles are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scope {
    /// Cluster-scoped, or in any namespace: only the cluster-wide binding grants it.
    Anywhere,
    /// The release namespace (the operator's own Secrets, its Lease).
    ReleaseNamespace,
    /// A namespace a Tenant holds (ApiKey Secrets).
    TenantNamespace,
}

/// Where a chart role is bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reach {
    /// The ClusterRole, bound cluster-wide by the chart.
    Everywhere,
    /// The Role in the release namespace.
    ReleaseNamespace,
    /// The tenant-secrets ClusterRole, bound by the operator per tenant namespace.
    TenantNamespaces,
}

impl Reach {
    fn reaches(self, scope: Scope) -> bool {
        match self {
            Self::Everywhere => true,
            Self::ReleaseNamespace => scope == Scope::ReleaseNamespace,
            Self::TenantNamespaces => scope == Scope::TenantNamespace,
        }
    }
}

/// One of the chart's roles as installed.
#[derive(Clone, Debug)]
struct ChartRole {
    name: String,
    /// `None` for a ClusterRole.
    namespace: Option<String>,
    reach: Reach,
    rules: Vec<PolicyRule>,
}

impl ChartRole {
    fn label(&self) -> String {
        match &self.namespace {
            None => format!("ClusterRole {}", self.name),
            Some(ns) => format!("Role {ns}/{}", self.name),
        }
    }

    /// Replaces the role's rules, as `kubectl apply` of an edited rendering would.
    async fn set_rules(&self, admin: &Client, rules: Vec<PolicyRule>) -> Result<()> {
        let params = PostParams::default();
        match &self.namespace {
            None => {
                let api: Api<ClusterRole> = Api::all(admin.clone());
                let mut edited = api.get(&self.name).await?;
                edited.rules = Some(rules);
                api.replace(&self.name, &params, &edited).await?;
            }
            Some(ns) => {
                let api: Api<RbacRole> = Api::namespaced(admin.clone(), ns);
                let mut edited = api.get(&self.name).await?;
                edited.rules = Some(rules);
                api.replace(&self.name, &params, &edited).await?;
            }
        }
        Ok(())
    }
}

/// Whether `rule` of a role bound as `reach` grants `need` where the call happens.
fn covers(reach: Reach, rule: &PolicyRule, (scope, need): &(Scope, Need)) -> bool {
    reach.reaches(*scope) && grants(rule, need)
}

/// The chart's roles as installed: the cluster-wide ClusterRole, the release
/// namespace's Role, and the tenant-secrets ClusterRole.
async fn installed_roles(admin: &Client, release: &Release) -> Result<Vec<ChartRole>> {
    let cluster_roles: Api<ClusterRole> = Api::all(admin.clone());
    let cluster_role = cluster_roles.get("portcullis-operator").await?;
    let tenant_secrets = cluster_roles.get(TENANT_SECRETS_ROLE).await?;
    let role = Api::<RbacRole>::namespaced(admin.clone(), &release.namespace)
        .get("portcullis-operator")
        .await?;
    Ok(vec![
        ChartRole {
            name: cluster_role.name_any(),
            namespace: None,
            reach: Reach::Everywhere,
            rules: cluster_role.rules.unwrap_or_default(),
        },
        ChartRole {
            name: role.name_any(),
            namespace: Some(release.namespace.clone()),
            reach: Reach::ReleaseNamespace,
            rules: role.rules.unwrap_or_default(),
        },
        ChartRole {
            name: tenant_secrets.name_any(),
            namespace: None,
            reach: Reach::TenantNamespaces,
            rules: tenant_secrets.rules.unwrap_or_default(),
        },
    ])
}

#[tokio::test]
async fn chart_rbac_allows_every_operator_call() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let Some((env, release)) = release().await? else {
        return Ok(());
    };
    let cx = probe_context(env, release).await?;

    let mut failures = Vec::new();
    for probe in Probe::ALL {
        if let Err(e) = probe.run(&cx).await {
            failures.push(format!("{probe:?}: {}", e.message));
        }
    }
    assert!(
        failures.is_empty(),
        "the chart's RBAC refuses operator calls:\n  {}",
        failures.join("\n  ")
    );

    // Least privilege at the verb level: every verb the chart grants is used by a call
    // where the role is bound.
    let roles = installed_roles(&cx.admin, release).await?;
    let used: BTreeSet<(Scope, Need)> = Probe::ALL.iter().flat_map(|p| p.scoped_needs()).collect();
    let mut unused = Vec::new();
    for role in &roles {
        for n in rule_needs(&role.rules) {
            if !used
                .iter()
                .any(|(scope, u)| *u == n && role.reach.reaches(*scope))
            {
                unused.push(format!("{}: {n:?}", role.label()));
            }
        }
    }
    assert!(
        unused.is_empty(),
        "the chart grants verbs no operator call uses: {unused:?}"
    );
    let ungranted: Vec<&(Scope, Need)> = used
        .iter()
        .filter(|n| {
            !roles
                .iter()
                .any(|role| role.rules.iter().any(|r| covers(role.reach, r, n)))
        })
        .collect();
    assert!(
        ungranted.is_empty(),
        "calls need permissions the chart does not grant: {ungranted:?}"
    );

    // Names restrict the webhook rules: another configuration is out of reach.
    let other: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": format!("someone-else-{}", suffix())}, "webhooks": []}))?;
    let other = Api::<MutatingWebhookConfiguration>::all(cx.admin.clone())
        .create(&PostParams::default(), &other)
        .await?;
    let denied = Api::<MutatingWebhookConfiguration>::all(cx.sa.clone())
        .patch(
            &other.name_any(),
            &PatchParams::default(),
            &merge_annotation(),
        )
        .await;
    assert!(
        matches!(&denied, Err(kube::Error::Api(s)) if s.code == 403),
        "the operator may patch a webhook configuration that is not its own: {denied:?}"
    );
    Api::<MutatingWebhookConfiguration>::all(cx.admin.clone())
        .delete(&other.name_any(), &DeleteParams::default())
        .await?;
    Ok(())
}

/// Runs `probe` until it is refused with 403 (RBAC caches update within moments).
async fn until_forbidden(probe: Probe, cx: &Cx) -> std::result::Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match probe.run(cx).await {
            Err(e) if e.forbidden => return Ok(()),
            other => {
                if Instant::now() >= deadline {
                    return Err(format!("{probe:?} still not refused: {other:?}"));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn until_allowed(probe: Probe, cx: &Cx) -> Result<()> {
    wait_for(
        &format!("{probe:?} allowed again"),
        Duration::from_secs(10),
        || async {
            match probe.run(cx).await {
                Ok(()) => Ok(Some(())),
                Err(e) => bail!("{}", e.message),
            }
        },
    )
    .await
}

#[tokio::test]
async fn removing_any_chart_rbac_rule_denies_an_operator_call() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let Some((env, release)) = release().await? else {
        return Ok(());
    };
    let cx = probe_context(env, release).await?;
    let roles = installed_roles(&cx.admin, release).await?;

    let result = async {
        let mut report = Vec::new();
        for (role_index, role) in roles.iter().enumerate() {
            for index in 0..role.rules.len() {
                let mut rest = role.rules.clone();
                let removed = rest.remove(index);
                // Every rule still in place, with where its role is bound.
                let remaining: Vec<(Reach, &PolicyRule)> = roles
                    .iter()
                    .enumerate()
                    .flat_map(|(i, r)| {
                        r.rules
                            .iter()
                            .enumerate()
                            .filter(move |(j, _)| (i, *j) != (role_index, index))
                            .map(move |(_, rule)| (r.reach, rule))
                    })
                    .collect();
                // The calls that have lost a permission no other rule grants there.
                let affected: Vec<Probe> = Probe::ALL
                    .into_iter()
                    .filter(|p| {
                        p.scoped_needs().iter().any(|n| {
                            covers(role.reach, &removed, n)
                                && !remaining.iter().any(|(reach, r)| covers(*reach, r, n))
                        })
                    })
                    .collect();
                let label = format!(
                    "{} rule {:?} {:?} {:?}",
                    role.label(),
                    removed.api_groups.clone().unwrap_or_default(),
                    removed.resources.clone().unwrap_or_default(),
                    removed.verbs
                );
                ensure!(
                    !affected.is_empty(),
                    "{label} is not needed by any operator call"
                );

                role.set_rules(&cx.admin, rest).await?;
                for probe in &affected {
                    if let Err(e) = until_forbidden(*probe, &cx).await {
                        bail!("without {label}: {e}");
                    }
                }
                // Restore and wait until the calls are allowed again.
                role.set_rules(&cx.admin, role.rules.clone()).await?;
                for probe in &affected {
                    until_allowed(*probe, &cx).await?;
                }
                report.push(format!("{label}: 403 for {affected:?}"));
            }
        }
        Ok(report)
    }
    .await;

    // Whatever happened, leave the chart's RBAC as installed.
    for role in &roles {
        role.set_rules(&cx.admin, role.rules.clone()).await?;
    }

    for line in result? {
        eprintln!("{line}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// The operator itself, as the chart's ServiceAccount
// ---------------------------------------------------------------------------------

/// `portcullis-operator` built next to this test binary (target/<profile>/), as
/// `cargo test --workspace` and `cargo build -p portcullis-operator` leave it, or
/// `PORTCULLIS_OPERATOR_BIN`.
fn operator_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("PORTCULLIS_OPERATOR_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/helm_chart-<hash> → target/<profile>/portcullis-operator
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("locating the target directory")?;
    let binary = profile_dir.join("portcullis-operator");
    ensure!(
        binary.is_file(),
        "{} does not exist: build it first (cargo build -p portcullis-operator; cargo test \
         --workspace builds it too) or set PORTCULLIS_OPERATOR_BIN",
        binary.display()
    );
    Ok(binary)
}

/// A kubeconfig whose user is the envtest admin certificate impersonating the chart's
/// ServiceAccount (`as`/`as-groups`), so the API server applies exactly its RBAC.
fn impersonating_kubeconfig(env: &EnvTest, release: &Release, path: &Path) -> Result<()> {
    let certs = env.dir().join("certs");
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "envtest", "cluster": {
            "server": env.server_url(),
            "certificate-authority": certs.join("serving-ca.crt"),
        }}],
        "users": [{"name": "operator", "user": {
            "client-certificate": certs.join("admin.crt"),
            "client-key": certs.join("admin.key"),
            "as": release.user(),
            "as-groups": release.groups(),
        }}],
        "contexts": [{"name": "envtest", "context": {"cluster": "envtest", "user": "operator"}}],
        "current-context": "envtest",
    });
    std::fs::write(path, serde_yaml::to_string(&config)?)?;
    Ok(())
}

/// The operator child process; killed (SIGTERM, then SIGKILL) when dropped.
struct OperatorProcess {
    child: tokio::process::Child,
    log: PathBuf,
}

impl OperatorProcess {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn stop(mut self) -> String {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
        self.log()
    }
}

/// Starts the real operator as the chart's ServiceAccount, configured as the chart's
/// Deployment configures it, with a fresh Lease and its own CA.
async fn start_operator(
    env: &EnvTest,
    release: &Release,
    work: &tempfile::TempDir,
) -> Result<OperatorProcess> {
    let binary = operator_binary()?;
    let admin = env.client()?;
    let kubeconfig = work.path().join("kubeconfig");
    impersonating_kubeconfig(env, release, &kubeconfig)?;
    let log = work.path().join("operator.log");
    let log_file = std::fs::File::create(&log)?;

    // A fresh Lease so this run's election starts clean.
    let leases: Api<Lease> = Api::namespaced(admin.clone(), &release.namespace);
    let _ = leases
        .delete("portcullis-operator", &DeleteParams::default())
        .await;
    // install_and_upgrade left a placeholder root CA Secret (to show helm keeps it); a
    // real operator refuses to start on a CA it cannot read, so let it make its own.
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &release.namespace);
    for name in ["portcullis-ca-root", "portcullis-ca-intermediate"] {
        let _ = secrets.delete(name, &DeleteParams::default()).await;
    }

    let child = tokio::process::Command::new(&binary)
        .arg("run")
        .env("KUBECONFIG", &kubeconfig)
        .env("POD_NAMESPACE", &release.namespace)
        .env("POD_NAME", "portcullis-operator-e2e")
        .env("PORTCULLIS_METRICS_ADDR", "127.0.0.1:0")
        .env("PORTCULLIS_POLICY_ADDR", "127.0.0.1:0")
        .env("PORTCULLIS_IDENTITY_ADDR", "127.0.0.1:0")
        .env("PORTCULLIS_WEBHOOK_ADDR", "127.0.0.1:0")
        .env("PORTCULLIS_LEADER_ELECTION", "true")
        .env("PORTCULLIS_LEASE_NAME", "portcullis-operator")
        .env("PORTCULLIS_KEY_HASH_COST", "4")
        .env("PORTCULLIS_SERVICE_ACCOUNT", &release.service_account)
        .env("PORTCULLIS_TENANT_SECRETS_ROLE", TENANT_SECRETS_ROLE)
        .env("RUST_LOG", "info,portcullis_operator=debug,kube=warn")
        .env_remove("PORTCULLIS_KEK_SECRET")
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    Ok(OperatorProcess { child, log })
}

/// A Tenant (named `prefix`-<random>) holding `namespaces`, with an ApiKey `ingest`
/// (`key_spec`) in the first of them; returns the Tenant's name.
async fn tenant_with_ingest_key(
    admin: &Client,
    prefix: &str,
    namespaces: &[&String],
    key_spec: Value,
) -> Result<String> {
    let tenant = format!("{prefix}-{}", suffix());
    let object: Tenant = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
        "metadata": {"name": tenant},
        "spec": {"namespaces": namespaces,
                 "scopes": {"identify": [{"methods": ["POST"], "path": "/v1/identify"}]}}}))?;
    Api::<Tenant>::all(admin.clone())
        .create(&PostParams::default(), &object)
        .await?;
    let key_ns = namespaces.first().context("no namespace for the key")?;
    let key: ApiKey = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiKey",
        "metadata": {"name": "ingest", "namespace": key_ns}, "spec": key_spec}))?;
    Api::<ApiKey>::namespaced(admin.clone(), key_ns)
        .create(&PostParams::default(), &key)
        .await?;
    Ok(tenant)
}

/// Waits until `tenant` is Ready.
async fn tenant_ready(admin: &Client, tenant: &str) -> Result<()> {
    let tenants: Api<Tenant> = Api::all(admin.clone());
    wait_for("Tenant Ready", Duration::from_secs(60), || async {
        let tenant = tenants.get(tenant).await?;
        let ready = tenant
            .status
            .as_ref()
            .map(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
            .unwrap_or(false);
        Ok(ready.then_some(()))
    })
    .await
}

impl OperatorProcess {
    /// Stops the operator; fails with its log if `result` (what the test checked while
    /// it ran) failed, and on any RBAC denial (403, "forbidden") in its log. Returns
    /// the log.
    async fn finish(self, result: Result<()>) -> Result<String> {
        let log = self.stop().await;
        if let Err(e) = result {
            bail!("{e:#}\n--- operator log ---\n{log}");
        }
        let denials: Vec<&str> = log
            .lines()
            .filter(|line| {
                let lower = line.to_ascii_lowercase();
                lower.contains("forbidden") || lower.contains(" 403") || lower.contains("code: 403")
            })
            .collect();
        assert!(
            denials.is_empty(),
            "RBAC denials in the operator log:\n{}",
            denials.join("\n")
        );
        Ok(log)
    }
}

#[tokio::test]
async fn operator_reconciles_with_only_the_chart_service_account() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let Some((env, release)) = release().await? else {
        return Ok(());
    };
    let admin = env.client()?;
    let work = tempfile::Builder::new()
        .prefix("portcullis-operator-run-")
        .tempdir()?;
    let operator = start_operator(env, release, &work).await?;
    let leases: Api<Lease> = Api::namespaced(admin.clone(), &release.namespace);

    let result = async {
        let tenant_ns = env.create_namespace("operator-tenant").await?;
        let key = json!({"role": "Developer", "scopes": ["identify"],
                         "rateLimit": {"requests": 1000, "per": "1m"}});
        let tenant = tenant_with_ingest_key(&admin, "op", &[&tenant_ns], key).await?;

        // The leader took the Lease.
        wait_for(
            "the operator holds the Lease",
            Duration::from_secs(60),
            || async {
                let lease = leases.get_opt("portcullis-operator").await?;
                Ok(lease
                    .and_then(|l| l.spec)
                    .and_then(|s| s.holder_identity)
                    .filter(|h| h.starts_with("portcullis-operator-e2e")))
            },
        )
        .await?;
        // The Tenant is Ready and labelled its namespace.
        tenant_ready(&admin, &tenant).await?;
        let namespace = Api::<Namespace>::all(admin.clone()).get(&tenant_ns).await?;
        ensure!(
            namespace.labels().get("portcullis.dev/tenant") == Some(&tenant),
            "namespace not labelled: {:?}",
            namespace.labels()
        );
        // The ApiKey's Secret holds the token, and its status the hash.
        let secret = wait_for(
            "ApiKey Secret ingest-key",
            Duration::from_secs(60),
            || async {
                Ok(Api::<Secret>::namespaced(admin.clone(), &tenant_ns)
                    .get_opt("ingest-key")
                    .await?)
            },
        )
        .await?;
        let token = secret
            .data
            .as_ref()
            .and_then(|d| d.get("token"))
            .map(|t| String::from_utf8_lossy(&t.0).into_owned())
            .context("Secret ingest-key has no token")?;
        ensure!(
            token.starts_with("ak_"),
            "token format: {}",
            &token[..token.len().min(3)]
        );
        ensure!(
            secret.type_.as_deref() == Some("portcullis.dev/api-key"),
            "Secret type {:?}",
            secret.type_
        );
        wait_for("ApiKey status hash", Duration::from_secs(30), || async {
            let key = Api::<ApiKey>::namespaced(admin.clone(), &tenant_ns)
                .get("ingest")
                .await?;
            Ok(key.status.and_then(|s| s.hash).map(drop))
        })
        .await?;
        // The built-in Roles and their RBAC exist (the operator wrote RBAC it holds).
        wait_for(
            "generated RBAC Role portcullis:developer",
            Duration::from_secs(30),
            || async {
                Ok(Api::<RbacRole>::namespaced(admin.clone(), &tenant_ns)
                    .get_opt("portcullis:developer")
                    .await?)
            },
        )
        .await?;
        // The KEK it created on first start, in its namespace.
        Api::<Secret>::namespaced(admin.clone(), &release.namespace)
            .get("portcullis-kek")
            .await?;
        // Its CA, and the trust bundle it published into the tenant namespace.
        for name in [
            "portcullis-ca-root",
            "portcullis-ca-intermediate",
            "portcullis-webhook-ca",
        ] {
            Api::<Secret>::namespaced(admin.clone(), &release.namespace)
                .get(name)
                .await?;
        }
        wait_for(
            "the trust-bundle ConfigMap",
            Duration::from_secs(30),
            || async {
                Ok(Api::<ConfigMap>::namespaced(admin.clone(), &tenant_ns)
                    .get_opt("portcullis-trust-bundle")
                    .await?)
            },
        )
        .await?;
        Ok::<(), anyhow::Error>(())
    }
    .await;

    let log = operator.finish(result).await?;
    let lines: Vec<&str> = log.lines().collect();
    eprintln!(
        "operator log: {} lines; last ones:\n{}",
        lines.len(),
        lines[lines.len().saturating_sub(12)..].join("\n")
    );
    Ok(())
}

/// Whether the API server's authorizer lets the chart's ServiceAccount `verb` Secrets
/// in `namespace`.
async fn sa_may_secrets(
    admin: &Client,
    release: &Release,
    verb: &str,
    namespace: &str,
) -> Result<bool> {
    let attributes = ResourceAttributes {
        resource: Some("secrets".into()),
        verb: Some(verb.into()),
        namespace: Some(namespace.into()),
        ..ResourceAttributes::default()
    };
    authorizer_allows(admin, &release.user(), &release.groups(), attributes).await
}

/// Whether the API server's authorizer allows `user` in `groups` the request described
/// by `attributes` (a SubjectAccessReview, asked as `admin`).
async fn authorizer_allows(
    admin: &Client,
    user: &str,
    groups: &[String],
    attributes: ResourceAttributes,
) -> Result<bool> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_owned()),
            groups: Some(groups.to_vec()),
            resource_attributes: Some(attributes),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let reviewed = Api::<SubjectAccessReview>::all(admin.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(reviewed.status.is_some_and(|s| s.allowed))
}

/// Waits until the ServiceAccount's access to `verb` Secrets in `namespace` is `allowed`.
async fn until_sa_may_secrets(
    admin: &Client,
    release: &Release,
    verb: &str,
    namespace: &str,
    allowed: bool,
) -> Result<()> {
    let what = format!(
        "{verb} secrets in {namespace} {}",
        if allowed { "allowed" } else { "refused" }
    );
    wait_for(&what, Duration::from_secs(30), || async {
        let may = sa_may_secrets(admin, release, verb, namespace).await?;
        Ok((may == allowed).then_some(()))
    })
    .await
}

#[tokio::test]
async fn operator_cannot_read_secrets_outside_tenant_namespaces() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let Some((env, release)) = release().await? else {
        return Ok(());
    };
    let admin = env.client()?;
    let outside = env.create_namespace("no-tenant").await?;
    // No standing access to Secrets anywhere else: a stolen operator token reads
    // nothing in a namespace no Tenant holds.
    for verb in ["get", "list", "watch"] {
        ensure!(
            !sa_may_secrets(&admin, release, verb, &outside).await?,
            "the chart lets the operator {verb} Secrets in {outside}, a namespace no Tenant holds"
        );
    }
    // Its own namespace: read and write its own Secrets by name, never list them.
    ensure!(sa_may_secrets(&admin, release, "get", &release.namespace).await?);
    ensure!(!sa_may_secrets(&admin, release, "list", &release.namespace).await?);

    let work = tempfile::Builder::new()
        .prefix("portcullis-operator-secrets-")
        .tempdir()?;
    let operator = start_operator(env, release, &work).await?;
    let result = async {
        let kept = env.create_namespace("secrets-kept").await?;
        let released = env.create_namespace("secrets-released").await?;
        let key = json!({"role": "Developer", "scopes": ["identify"]});
        let tenant = tenant_with_ingest_key(&admin, "sec", &[&kept, &released], key).await?;
        let tenants: Api<Tenant> = Api::all(admin.clone());
        tenant_ready(&admin, &tenant).await?;

        // Bound namespaces: the operator bound itself the tenant-secrets ClusterRole.
        for ns in [&kept, &released] {
            for verb in ["get", "list", "watch", "create", "update", "delete"] {
                until_sa_may_secrets(&admin, release, verb, ns, true).await?;
            }
        }
        for verb in ["get", "list"] {
            ensure!(
                !sa_may_secrets(&admin, release, verb, &outside).await?,
                "binding a tenant's namespaces gave the operator {verb} on Secrets in {outside}"
            );
        }

        // Its per-namespace watch still sees a deleted key Secret: the key is re-issued.
        let secrets: Api<Secret> = Api::namespaced(admin.clone(), &kept);
        let first = wait_for(
            "ApiKey Secret ingest-key",
            Duration::from_secs(60),
            || async { Ok(secrets.get_opt("ingest-key").await?) },
        )
        .await?;
        secrets
            .delete("ingest-key", &DeleteParams::default())
            .await?;
        wait_for(
            "ingest-key re-issued after deletion",
            Duration::from_secs(60),
            || async {
                let secret = secrets.get_opt("ingest-key").await?;
                Ok(secret.filter(|s| s.uid() != first.uid()).map(drop))
            },
        )
        .await?;

        // A released namespace loses the access again.
        let patch = json!({"spec": {"namespaces": [kept]}});
        tenants
            .patch(&tenant, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
        for verb in ["get", "list"] {
            until_sa_may_secrets(&admin, release, verb, &released, false).await?;
        }
        until_sa_may_secrets(&admin, release, "get", &kept, true).await?;
        Ok::<(), anyhow::Error>(())
    }
    .await;

    operator.finish(result).await?;
    Ok(())
}
