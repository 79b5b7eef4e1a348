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
//!
//! This file holds the helm helpers; the checks are in `helm_chart/`: `template` (helm
//! only), `release` (install and upgrade, the release the others share), `rbac` (the
//! probes) and `operator_sa` (the real operator as the chart's ServiceAccount).

use portcullis_e2e::wait::{eventually, suffix};
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

#[path = "helm_chart/operator_sa.rs"]
mod operator_sa;
#[path = "helm_chart/rbac.rs"]
mod rbac;
#[path = "helm_chart/release.rs"]
mod release;
#[path = "helm_chart/template.rs"]
mod template;

use operator_sa::*;
use release::*;

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
