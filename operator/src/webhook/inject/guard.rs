//! After creation: what the API server still lets change on a pod must not swap the
//! proxy or undo its init step. On 1.20 a pod UPDATE may change any container's image
//! (and labels, annotations); the `pods/ephemeralcontainers` subresource (alpha) adds
//! containers that share the pod's network namespace, so one with NET_ADMIN could flush
//! the redirect the init step installed.

use k8s_openapi::api::core::v1::{Container, EphemeralContainer, Pod, SecurityContext, Volume};
use portcullis_crds::annotations::INJECTED_LABEL;
use serde_json::Value;

use super::{Decision, INIT_CONTAINER, INJECTED, NotInjected, PROXY_CONTAINER, admit, sidecar};

/// Capabilities that let a container rewrite the pod's iptables rules (or do anything).
const REDIRECT_CAPABILITIES: [&str; 3] = ["NET_ADMIN", "SYS_ADMIN", "ALL"];

/// How a container with `security` could undo the init step's redirect from inside the
/// pod's network namespace (completes "container \"x\" …"), if it could.
pub(super) fn redirect_risk(security: Option<&SecurityContext>, proxy_uid: i64) -> Option<String> {
    let security = security?;
    let capabilities: Vec<&str> = security
        .capabilities
        .iter()
        .flat_map(|c| c.add.iter().flatten())
        .map(|c| c.trim_start_matches("CAP_"))
        .filter(|c| REDIRECT_CAPABILITIES.contains(c))
        .collect();
    if security.privileged == Some(true) {
        Some("is privileged".to_owned())
    } else if !capabilities.is_empty() {
        Some(format!("adds {}", capabilities.join(", ")))
    } else if security.run_as_user == Some(proxy_uid) {
        Some(format!(
            "runs as uid {proxy_uid}, the proxy's, whose traffic is not redirected"
        ))
    } else {
        None
    }
}

fn container<'a>(pod: &'a Pod, name: &str) -> Option<&'a Container> {
    let spec = pod.spec.as_ref()?;
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .find(|c| c.name == name)
}

/// A pod UPDATE in an injected namespace: refused when it changes (or drops) the proxy
/// or the init step, the volumes the injector added (the serving certificate's among
/// them), or the marks the NetworkPolicy and the tooling select on.
pub fn decide_update(old: &Pod, new: &Pod, namespace: &str) -> Decision {
    let who = super::pod_display_name(new, namespace);
    for name in [PROXY_CONTAINER, INIT_CONTAINER] {
        if container(old, name) != container(new, name) {
            let image = |pod: &Pod| {
                container(pod, name)
                    .and_then(|c| c.image.clone())
                    .unwrap_or_else(|| "<none>".into())
            };
            return Decision::Refuse {
                message: format!(
                    "{who}: container {name:?} cannot be changed after injection (image {:?} -> {:?}); \
                     Portcullis refuses updates to its proxy and init step; delete the pod so it is \
                     re-created with the current proxy",
                    image(old),
                    image(new)
                ),
            };
        }
    }
    // The API server keeps volumes as they are on an UPDATE; the injected ones are
    // checked here too, so no later rule of the API server is relied on.
    let injected_volumes = |pod: &Pod| -> Vec<Volume> {
        pod.spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
            .filter(|v| sidecar::VOLUME_NAMES.contains(&v.name.as_str()))
            .cloned()
            .collect()
    };
    if injected_volumes(old) != injected_volumes(new) {
        return Decision::Refuse {
            message: format!(
                "{who}: the portcullis-* volumes cannot be changed after injection; delete the \
                 pod so it is re-created with what the injector adds"
            ),
        };
    }
    let label = |pod: &Pod| {
        pod.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(INJECTED_LABEL).cloned())
    };
    let annotation = |pod: &Pod| {
        pod.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(INJECTED).cloned())
    };
    let kept = |old: Option<String>, new: Option<String>| old.is_none() || old == new;
    if !kept(label(old), label(new)) || !kept(annotation(old), annotation(new)) {
        return Decision::Refuse {
            message: format!(
                "{who}: the label and annotation {INJECTED_LABEL} mark the pod's proxy (its \
                 NetworkPolicy selects on them) and cannot be removed or changed; leave them as \
                 the injector set them"
            ),
        };
    }
    admit(NotInjected::NotACreation, None)
}

/// The ephemeral containers in an `ephemeralcontainers` object: the 1.20
/// `EphemeralContainers` kind lists them at the top, a Pod (1.22+) in its spec.
fn ephemeral_containers(object: &Value) -> Result<Vec<EphemeralContainer>, serde_json::Error> {
    let list = object
        .get("ephemeralContainers")
        .or_else(|| {
            object
                .get("spec")
                .and_then(|s| s.get("ephemeralContainers"))
        })
        .cloned()
        .unwrap_or(Value::Array(Vec::new()));
    serde_json::from_value(list)
}

/// An UPDATE of `pods/ephemeralcontainers` in an injected namespace: new ephemeral
/// containers may not take a reserved name, be privileged, run as the proxy's uid
/// (whose traffic the redirect exempts) or add capabilities that rewrite iptables.
pub fn decide_ephemeral(object: &Value, old: &Value, who: &str, proxy_uid: i64) -> Decision {
    let (new, old) = match (ephemeral_containers(object), ephemeral_containers(old)) {
        (Ok(new), Ok(old)) => (new, old),
        (Err(e), _) | (_, Err(e)) => {
            return Decision::Refuse {
                message: format!("{who}: ephemeral containers cannot be read: {e}"),
            };
        }
    };
    for added in new.iter().filter(|c| !old.iter().any(|o| o.name == c.name)) {
        let problem = if added.name == PROXY_CONTAINER || added.name == INIT_CONTAINER {
            format!("takes the name {:?}, which Portcullis reserves", added.name)
        } else if let Some(risk) = redirect_risk(added.security_context.as_ref(), proxy_uid) {
            risk
        } else {
            continue;
        };
        return Decision::Refuse {
            message: format!(
                "{who}: ephemeral container {:?} {problem}, which could undo the redirect to the \
                 Portcullis proxy; debug without privileges, NET_ADMIN or SYS_ADMIN",
                added.name
            ),
        };
    }
    admit(NotInjected::NotACreation, None)
}
