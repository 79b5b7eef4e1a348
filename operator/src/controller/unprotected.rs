//! Pods of a tenant's namespaces that run without a genuine proxy: the gap a sidecar
//! mesh must report rather than hide (created before the namespace was bound, while the
//! webhook was unreachable, opted out, or carrying containers merely named like ours).
//! "Genuine" is the injector's own test ([`genuine::check`]), never a container name or
//! an annotation.

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use portcullis_crds::annotations::INJECT;

use crate::webhook::inject::{INIT_CONTAINER, InjectSettings, PROXY_CONTAINER, genuine};

/// Most pods named in a Tenant's status.
pub const MAX_LISTED: usize = 20;

/// Why a running pod of a tenant namespace is not behind the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Exposure {
    /// No proxy at all (created before the namespace was bound, or while the webhook
    /// was unreachable).
    NoProxy,
    /// Containers named like the proxy that are not what the injector adds.
    ProxyNotGenuine,
    /// The pod says `portcullis.dev/inject: disabled`: allowed, but still exposed.
    OptedOut,
}

impl Exposure {
    /// How the Tenant's status says it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::NoProxy => "no proxy",
            Self::ProxyNotGenuine => "proxy not as injected",
            Self::OptedOut => "opted out",
        }
    }
}

/// Why `pod` runs without a genuine proxy (what `settings` injects), or `None` when it
/// is protected or needs no proxy: host-network (never injected) or finished.
pub fn exposure(pod: &Pod, settings: &InjectSettings) -> Option<Exposure> {
    let spec = pod.spec.as_ref()?;
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    if spec.host_network == Some(true) || finished {
        return None;
    }
    if genuine::check(pod, settings).is_ok() {
        return None;
    }
    let opted_out = pod.annotations().get(INJECT).map(String::as_str) == Some("disabled");
    let named_like_ours = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == PROXY_CONTAINER || c.name == INIT_CONTAINER);
    Some(if named_like_ours {
        Exposure::ProxyNotGenuine
    } else if opted_out {
        Exposure::OptedOut
    } else {
        Exposure::NoProxy
    })
}

/// A pod of the tenant that runs exposed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExposedPod {
    /// `namespace/name`.
    pub name: String,
    /// Why.
    pub exposure: Exposure,
}

/// Every exposed pod, sorted by name, at most [`MAX_LISTED`].
pub fn unprotected<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    settings: &InjectSettings,
) -> Vec<ExposedPod> {
    let mut exposed: Vec<ExposedPod> = pods
        .into_iter()
        .filter_map(|p| {
            exposure(p, settings).map(|exposure| ExposedPod {
                name: format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()),
                exposure,
            })
        })
        .collect();
    exposed.sort();
    exposed.truncate(MAX_LISTED);
    exposed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> InjectSettings {
        InjectSettings::new("proxy:test", "portcullis-system", "portcullis-operator")
    }

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

    /// `app` as the webhook injects it with `settings()`.
    fn injected(name: &str) -> Pod {
        let bare = pod(name, &["app"], &[], serde_json::json!({}));
        let level = crate::webhook::inject::InjectionLevel::Enabled;
        let server = crate::webhook::inject::ServerVersion {
            major: 1,
            minor: 20,
        };
        let crate::webhook::inject::Decision::Inject { patch, .. } =
            crate::webhook::inject::decide_at(&bare, "acme", &level, &settings(), server)
        else {
            panic!("not injected");
        };
        let mut value = serde_json::to_value(&bare).unwrap();
        json_patch::patch(&mut value, &patch).unwrap();
        serde_json::from_value(value).unwrap()
    }

    fn names(exposed: &[ExposedPod]) -> Vec<(&str, Exposure)> {
        exposed
            .iter()
            .map(|e| (e.name.as_str(), e.exposure))
            .collect()
    }

    #[test]
    fn only_pods_without_a_genuine_proxy_are_listed() {
        let none = serde_json::json!({});
        let pods = [
            injected("injected"),
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
        ];
        assert_eq!(
            names(&unprotected(&pods, &settings())),
            [
                ("acme/bare", Exposure::NoProxy),
                ("acme/opted-out", Exposure::OptedOut)
            ]
        );
    }

    #[test]
    fn a_container_merely_named_portcullis_proxy_is_reported_unprotected() {
        let pods = [
            pod(
                "forged",
                &["portcullis-proxy", "app"],
                &[("portcullis.dev/injected", "0.1.0")],
                serde_json::json!({}),
            ),
            pod(
                "native",
                &["app"],
                &[],
                serde_json::json!({"spec": {"initContainers": [{"name": "portcullis-proxy", "restartPolicy": "Always"}]}}),
            ),
        ];
        assert_eq!(
            names(&unprotected(&pods, &settings())),
            [
                ("acme/forged", Exposure::ProxyNotGenuine),
                ("acme/native", Exposure::ProxyNotGenuine)
            ]
        );
    }

    #[test]
    fn the_list_is_bounded_and_sorted() {
        let pods: Vec<Pod> = (0..30)
            .rev()
            .map(|i| pod(&format!("p{i:02}"), &["app"], &[], serde_json::json!({})))
            .collect();
        let listed = unprotected(&pods, &settings());
        assert_eq!(listed.len(), MAX_LISTED);
        assert_eq!(listed[0].name, "acme/p00");
    }
}
