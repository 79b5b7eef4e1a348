//! The JSON Patch (RFC 6902) that adds the sidecar to a pod, written against the pod
//! exactly as the API server sent it: arrays that are absent are added whole, arrays
//! that exist get elements inserted (init containers and the regular-mode proxy at the
//! front, volumes at the end).

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, ReplaceOperation};
use k8s_openapi::api::core::v1::Pod;
use portcullis_crds::annotations::INJECTED_LABEL;
use serde::Serialize;
use serde_json::Value;

use super::{INJECTED, InjectSettings, PodPlan, sidecar};

fn add(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(tokens.iter().copied()),
        value,
    })
}

fn json(value: &impl Serialize) -> Value {
    // k8s-openapi types always serialise; Null would only make the API server refuse.
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// The patch for `pod` given its plan.
pub(super) fn build(pod: &Pod, plan: &PodPlan, settings: &InjectSettings, native: bool) -> Patch {
    let spec = pod.spec.as_ref();
    let mut ops = Vec::new();

    // Probes first, while the app containers still have the indices the API server sent.
    for rewritten in &plan.probes.rewritten {
        ops.push(PatchOperation::Replace(ReplaceOperation {
            path: PointerBuf::from_tokens([
                "spec",
                "containers",
                &rewritten.container_index.to_string(),
                rewritten.kind.field(),
            ]),
            value: json(&rewritten.probe),
        }));
    }

    let init = json(&sidecar::init_container(plan, settings));
    let proxy = json(&sidecar::proxy_container(plan, settings, native));
    let mut front_of_init = vec![init];
    if native {
        front_of_init.push(proxy.clone());
    }
    if spec.and_then(|s| s.init_containers.as_ref()).is_some() {
        for (i, container) in front_of_init.into_iter().enumerate() {
            ops.push(add(&["spec", "initContainers", &i.to_string()], container));
        }
    } else {
        ops.push(add(
            &["spec", "initContainers"],
            Value::Array(front_of_init),
        ));
    }
    if !native {
        ops.push(add(&["spec", "containers", "0"], proxy));
    }

    let volumes: Vec<Value> = sidecar::volumes(plan, settings).iter().map(json).collect();
    if spec.and_then(|s| s.volumes.as_ref()).is_some() {
        ops.extend(
            volumes
                .into_iter()
                .map(|v| add(&["spec", "volumes", "-"], v)),
        );
    } else {
        ops.push(add(&["spec", "volumes"], Value::Array(volumes)));
    }

    let version = Value::String(settings.version.clone());
    ops.push(add_entry(
        "annotations",
        pod.metadata.annotations.is_some(),
        INJECTED,
        version,
    ));
    // The label lets the tenant's NetworkPolicy select exactly the pods with the proxy.
    ops.push(add_entry(
        "labels",
        pod.metadata.labels.is_some(),
        INJECTED_LABEL,
        Value::String("true".into()),
    ));
    Patch(ops)
}

/// Adds `key: value` to the metadata map `map` (`labels`, `annotations`), creating the
/// map when the pod has none.
fn add_entry(map: &str, exists: bool, key: &str, value: Value) -> PatchOperation {
    if exists {
        add(&["metadata", map, key], value)
    } else {
        add(&["metadata", map], serde_json::json!({ key: value }))
    }
}
