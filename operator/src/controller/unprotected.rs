//! Pods of a tenant's namespaces that run without the proxy: the gap a sidecar mesh must
//! report rather than hide (created before the namespace was bound, while the webhook
//! was unreachable, or edited afterwards).

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use portcullis_crds::annotations::INJECT;

/// Name of the injected proxy container.
pub const PROXY_CONTAINER: &str = "portcullis-proxy";
/// Most pods named in a Tenant's status.
pub const MAX_LISTED: usize = 20;

/// Whether `pod` should run the proxy but does not: not opted out, not host-network
/// (never injected), not finished, and no `portcullis-proxy` container.
pub fn lacks_proxy(pod: &Pod) -> bool {
    let opted_out = pod.annotations().get(INJECT).map(String::as_str) == Some("disabled");
    let Some(spec) = &pod.spec else {
        return false;
    };
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    let has_proxy = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == PROXY_CONTAINER);
    !opted_out && spec.host_network != Some(true) && !finished && !has_proxy
}

/// `namespace/name` of every pod that lacks the proxy, sorted, at most [`MAX_LISTED`].
pub fn unprotected<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> Vec<String> {
    let mut names: Vec<String> = pods
        .into_iter()
        .filter(|p| lacks_proxy(p))
        .map(|p| format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()))
        .collect();
    names.sort();
    names.truncate(MAX_LISTED);
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(
        name: &str,
        containers: &[&str],
        annotations: &[(&str, &str)],
        extra: serde_json::Value,
    ) -> Pod {
        let mut value = serde_json::json!({
            "metadata": {"name": name, "namespace": "acme",
                "annotations": annotations.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<std::collections::BTreeMap<_, _>>()},
            "spec": {"containers": containers.iter().map(|c| serde_json::json!({"name": c})).collect::<Vec<_>>()},
        });
        if let (Some(spec), Some(more)) = (
            value["spec"].as_object_mut(),
            extra.get("spec").and_then(|s| s.as_object()),
        ) {
            spec.extend(more.clone());
        }
        if let Some(status) = extra.get("status") {
            value["status"] = status.clone();
        }
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn only_pods_that_should_have_the_proxy_are_listed() {
        let none = serde_json::json!({});
        let pods = [
            pod("injected", &["portcullis-proxy", "app"], &[], none.clone()),
            pod("bare", &["app"], &[], none.clone()),
            pod(
                "opted-out",
                &["app"],
                &[("portcullis.dev/inject", "disabled")],
                none.clone(),
            ),
            pod(
                "host",
                &["app"],
                &[],
                serde_json::json!({"spec": {"hostNetwork": true}}),
            ),
            pod(
                "done",
                &["app"],
                &[],
                serde_json::json!({"status": {"phase": "Succeeded"}}),
            ),
            pod(
                "native",
                &["app"],
                &[],
                serde_json::json!({"spec": {"initContainers": [{"name": "portcullis-proxy", "restartPolicy": "Always"}]}}),
            ),
        ];
        assert_eq!(unprotected(&pods), ["acme/bare"]);
    }

    #[test]
    fn the_list_is_bounded_and_sorted() {
        let pods: Vec<Pod> = (0..30)
            .rev()
            .map(|i| pod(&format!("p{i:02}"), &["app"], &[], serde_json::json!({})))
            .collect();
        let listed = unprotected(&pods);
        assert_eq!(listed.len(), MAX_LISTED);
        assert_eq!(listed[0], "acme/p00");
    }
}
