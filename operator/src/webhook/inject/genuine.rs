//! "Already injected" means the pod carries exactly what the injector would add for it
//! (DESIGN.md §4): the init step first, the proxy (as a native sidecar or the first
//! container), both with this operator's image, command, args, env, ports, security
//! context and mounts, and the four volumes (five with a serving certificate) — not
//! merely something named `portcullis-proxy` next to a copied annotation.
//!
//! The comparison tolerates what the API server adds when it decodes a pod
//! ([`API_SERVER_DEFAULTS`]): a pod the injector patched, re-sent on reinvocation or
//! stored and read back, still matches. Any other extra field, a missing one, another
//! value or another list length is a mismatch, named in the refusal.

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use serde_json::Value;

use super::{INIT_CONTAINER, InjectSettings, PROXY_CONTAINER, plan, sidecar};

/// A literal field value.
enum Literal {
    Text(&'static str),
    Number(i64),
}

/// Fields the API server fills in with these values when they are absent; the injector
/// leaves them out, so they may appear on a genuine pod (only with exactly this value).
const API_SERVER_DEFAULTS: [(&str, Literal); 8] = [
    (
        "terminationMessagePath",
        Literal::Text("/dev/termination-log"),
    ),
    ("terminationMessagePolicy", Literal::Text("File")),
    ("timeoutSeconds", Literal::Number(1)),
    ("successThreshold", Literal::Number(1)),
    ("scheme", Literal::Text("HTTP")),
    ("defaultMode", Literal::Number(420)),
    ("apiVersion", Literal::Text("v1")),
    ("protocol", Literal::Text("TCP")),
];

fn is_api_server_default(key: &str, value: &Value) -> bool {
    API_SERVER_DEFAULTS.iter().any(|(k, v)| {
        *k == key
            && match v {
                Literal::Text(text) => value.as_str() == Some(*text),
                Literal::Number(n) => value.as_i64() == Some(*n),
            }
    })
}

/// Where a pod differs from what the injector adds; completes "its … ".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch(pub String);

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `Ok` when `pod` carries exactly what the injector adds with `settings` (in either
/// sidecar mode: a pod injected before an API server upgrade stays genuine).
pub fn check(pod: &Pod, settings: &InjectSettings) -> Result<(), Mismatch> {
    let spec = pod.spec.clone().unwrap_or_default();
    let plan = plan(
        &without_injected_parts(pod),
        &pod.metadata.annotations.clone().unwrap_or_default(),
    )
    .map_err(|e| Mismatch(format!("pod cannot be injected at all: {}", e.0)))?;
    let native = spec.init_containers.as_deref().unwrap_or_default().get(1);
    let proxy = match native.filter(|c| c.name == PROXY_CONTAINER) {
        Some(proxy) => (proxy, true),
        None => (
            spec.containers
                .first()
                .filter(|c| c.name == PROXY_CONTAINER)
                .ok_or_else(|| {
                    Mismatch(format!(
                        "{PROXY_CONTAINER:?} is neither the second init container nor the first container"
                    ))
                })?,
            false,
        ),
    };
    // The app probes the injector rewrote point at the admin port now, so their
    // originals live only in the proxy's environment; they are taken from there (they
    // only tell the proxy what to check on 127.0.0.1, nothing a forgery gains from).
    let mut plan = plan;
    if let Some(originals) = proxy
        .0
        .env
        .iter()
        .flatten()
        .find(|e| e.name == portcullis_api::injection::probes::APP_PROBES_ENV)
        .and_then(|e| e.value.as_deref())
        .and_then(|v| serde_json::from_str(v).ok())
    {
        plan.probes.originals = originals;
    }
    // Without the annotation the serving certificate came from the Tenant's default,
    // which may have changed since: the Secret's name is read from the volume, whose
    // shape (an optional Secret, mounted read-only at the fixed path) is still checked.
    if plan.serving_certificate.is_none() {
        plan.serving_certificate = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == sidecar::SERVING_CERT_VOLUME)
            .map(|v| {
                v.secret
                    .as_ref()
                    .and_then(|s| s.secret_name.clone())
                    .unwrap_or_default()
            });
    }
    let expected = sidecar::proxy_container(&plan, settings, proxy.1);
    // The image first: it is what a forgery changes, and says so most plainly.
    compare(
        &json(&expected.image),
        &json(&proxy.0.image),
        &format!("{PROXY_CONTAINER}.image"),
    )?;
    compare(
        &json(&expected),
        &without_token_mount(json(proxy.0)),
        PROXY_CONTAINER,
    )?;
    let init = spec
        .init_containers
        .as_deref()
        .unwrap_or_default()
        .first()
        .filter(|c| c.name == INIT_CONTAINER)
        .ok_or_else(|| Mismatch(format!("first init container is not {INIT_CONTAINER:?}")))?;
    compare(
        &json(&sidecar::init_container(&plan, settings)),
        &without_token_mount(json(init)),
        INIT_CONTAINER,
    )?;
    let reserved = all_containers(&spec)
        .filter(|c| c.name == PROXY_CONTAINER || c.name == INIT_CONTAINER)
        .count();
    if reserved != 2 {
        return Err(Mismatch(format!(
            "containers named {PROXY_CONTAINER:?} or {INIT_CONTAINER:?} number {reserved}, not one each"
        )));
    }
    let volumes = spec.volumes.as_deref().unwrap_or_default();
    for expected in sidecar::volumes(&plan, settings) {
        let mut named = volumes.iter().filter(|v| v.name == expected.name);
        match (named.next(), named.next()) {
            (Some(actual), None) => compare(&json(&expected), &json(actual), &expected.name)?,
            _ => {
                return Err(Mismatch(format!(
                    "volume {:?} is missing or repeated",
                    expected.name
                )));
            }
        }
    }
    Ok(())
}

/// The pod without the containers and volumes the injector adds: what it looked like
/// before injection, whose plan decides what the injector adds.
pub(super) fn without_injected_parts(pod: &Pod) -> Pod {
    let mut pod = pod.clone();
    if let Some(spec) = pod.spec.as_mut() {
        let ours = |c: &Container| c.name == PROXY_CONTAINER || c.name == INIT_CONTAINER;
        if let Some(init) = spec.init_containers.as_mut() {
            init.retain(|c| !ours(c));
        }
        spec.containers.retain(|c| !ours(c));
        if let Some(volumes) = spec.volumes.as_mut() {
            volumes.retain(|v| !sidecar::VOLUME_NAMES.contains(&v.name.as_str()));
        }
    }
    pod
}

/// Where the API server's ServiceAccount admission mounts the pod's API token into
/// every container (unless the pod opts out of automounting).
const SERVICE_ACCOUNT_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// `container` without the API server's token mount, which a stored pod carries in
/// every container, ours included.
fn without_token_mount(mut container: Value) -> Value {
    if let Some(mounts) = container
        .get_mut("volumeMounts")
        .and_then(Value::as_array_mut)
    {
        mounts
            .retain(|m| m.get("mountPath").and_then(Value::as_str) != Some(SERVICE_ACCOUNT_MOUNT));
    }
    container
}

fn all_containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
}

fn json(value: &impl serde::Serialize) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// Whether `actual` is `expected` plus at most API server defaults; the first
/// difference, with its path under `at`, otherwise.
fn compare(expected: &Value, actual: &Value, at: &str) -> Result<(), Mismatch> {
    match (expected, actual) {
        (Value::Object(want), Value::Object(have)) => {
            for (key, value) in want {
                let here = format!("{at}.{key}");
                match have.get(key) {
                    Some(found) => compare(value, found, &here)?,
                    None => return Err(Mismatch(format!("{here} is missing"))),
                }
            }
            match have
                .iter()
                .find(|(k, v)| !want.contains_key(*k) && !is_api_server_default(k, v))
            {
                Some((key, value)) => Err(Mismatch(format!(
                    "{at}.{key} is {value}, which Portcullis does not set"
                ))),
                None => Ok(()),
            }
        }
        (Value::Array(want), Value::Array(have)) if want.len() == have.len() => want
            .iter()
            .zip(have)
            .enumerate()
            .try_for_each(|(i, (w, h))| compare(w, h, &format!("{at}[{i}]"))),
        _ if expected == actual => Ok(()),
        _ => Err(Mismatch(format!("{at} is {actual}, not {expected}"))),
    }
}
