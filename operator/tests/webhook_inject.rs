//! Sidecar injection as a pure function: one test per defined outcome (DESIGN.md §4),
//! exact JSON Patches, and idempotency (a patched pod is left alone).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};
use portcullis_operator::webhook::inject::{
    Decision, INJECTED, InjectSettings, NotInjected, ServerVersion, decide,
};
use serde_json::{Value, json};

const IMAGE: &str = "ghcr.io/portcullis-dev/portcullis-proxy:test";
const OLD: ServerVersion = ServerVersion {
    major: 1,
    minor: 20,
};
const NEW: ServerVersion = ServerVersion {
    major: 1,
    minor: 29,
};

fn settings() -> InjectSettings {
    let mut settings = InjectSettings::new(IMAGE, "portcullis-system", "portcullis-operator");
    settings.version = "0.1.0-test".into();
    settings
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn enabled() -> BTreeMap<String, String> {
    labels(&[("portcullis.dev/inject", "enabled")])
}

fn required() -> BTreeMap<String, String> {
    labels(&[("portcullis.dev/inject", "required")])
}

fn pod_json(extra_spec: Value, annotations: Option<Value>) -> Value {
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "acme-prod"},
        "spec": {"containers": [{"name": "app", "image": "acme/web:1", "ports": [{"containerPort": 8080}]}]}
    });
    if let Value::Object(extra) = extra_spec {
        for (k, v) in extra {
            pod["spec"][k] = v;
        }
    }
    if let Some(annotations) = annotations {
        pod["metadata"]["annotations"] = annotations;
    }
    pod
}

fn pod(value: &Value) -> Pod {
    serde_json::from_value(value.clone()).unwrap()
}

fn decide_json(
    value: &Value,
    ns_labels: &BTreeMap<String, String>,
    server: ServerVersion,
) -> Decision {
    decide(&pod(value), "acme-prod", ns_labels, &settings(), server)
}

/// Applies an Inject decision to the pod JSON; panics on anything else.
fn patched(value: &Value, decision: &Decision) -> Value {
    let Decision::Inject { patch, .. } = decision else {
        panic!("expected Inject, got {decision:?}");
    };
    let mut doc = value.clone();
    json_patch::patch(&mut doc, patch).unwrap();
    doc
}

fn container<'a>(list: &'a [Container], name: &str) -> &'a Container {
    list.iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn env_of(container: &Container) -> BTreeMap<String, String> {
    container
        .env
        .iter()
        .flatten()
        .filter_map(|e| e.value.clone().map(|v| (e.name.clone(), v)))
        .collect()
}

fn warnings(decision: &Decision) -> Vec<String> {
    match decision {
        Decision::Inject { warnings, .. } | Decision::Admit { warnings, .. } => warnings.clone(),
        Decision::Refuse { .. } => Vec::new(),
    }
}

fn refusal(decision: &Decision) -> String {
    match decision {
        Decision::Refuse { message } => message.clone(),
        other => panic!("expected Refuse, got {other:?}"),
    }
}

fn resources() -> Value {
    json!({"requests": {"cpu": "10m", "memory": "20Mi"}, "limits": {"cpu": "500m", "memory": "128Mi"}})
}

#[test]
fn regular_container_mode_patch_is_exact() {
    let value = pod_json(json!({}), None);
    let Decision::Inject { patch, warnings } = decide_json(&value, &enabled(), OLD) else {
        panic!("not injected");
    };
    assert!(warnings.is_empty(), "{warnings:?}");
    let expected = json!([
        {"op": "add", "path": "/spec/initContainers", "value": [{
            "name": "portcullis-init",
            "image": IMAGE,
            "imagePullPolicy": "IfNotPresent",
            "command": ["portcullis-proxy"],
            "args": ["init", "--inbound-port", "4143", "--proxy-uid", "2102"],
            "resources": resources(),
            "securityContext": {
                "runAsUser": 0, "runAsNonRoot": false, "privileged": false,
                "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
            },
            "volumeMounts": [{"name": "portcullis-xtables-lock", "mountPath": "/run"}],
            "terminationMessagePolicy": "FallbackToLogsOnError"
        }]},
        {"op": "add", "path": "/spec/containers/0", "value": {
            "name": "portcullis-proxy",
            "image": IMAGE,
            "imagePullPolicy": "IfNotPresent",
            "command": ["portcullis-proxy"],
            "args": ["run", "--config-from-env"],
            "env": [
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "PORTCULLIS_SERVICE_ACCOUNT", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
                {"name": "PORTCULLIS_APP_PORT", "value": "8080"},
                {"name": "PORTCULLIS_IDENTITY_URL", "value": "https://portcullis-operator.portcullis-system.svc:8443"},
                {"name": "PORTCULLIS_POLICY_URL", "value": "https://portcullis-operator.portcullis-system.svc:8090"},
                {"name": "PORTCULLIS_TOKEN_PATH", "value": "/var/run/secrets/portcullis.dev/identity/token"},
                {"name": "PORTCULLIS_TRUST_BUNDLE", "value": "/var/run/portcullis.dev/trust-bundle/ca-bundle.crt"},
                {"name": "PORTCULLIS_DATA_DIR", "value": "/var/lib/portcullis"}
            ],
            "ports": [
                {"name": "pc-inbound", "containerPort": 4143, "protocol": "TCP"},
                {"name": "pc-admin", "containerPort": 4191, "protocol": "TCP"}
            ],
            "resources": resources(),
            "securityContext": {
                "runAsNonRoot": true, "runAsUser": 2102, "readOnlyRootFilesystem": true,
                "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}
            },
            "volumeMounts": [
                {"name": "portcullis-identity-token", "mountPath": "/var/run/secrets/portcullis.dev/identity", "readOnly": true},
                {"name": "portcullis-trust-bundle", "mountPath": "/var/run/portcullis.dev/trust-bundle", "readOnly": true},
                {"name": "portcullis-data", "mountPath": "/var/lib/portcullis"}
            ],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": 4191}, "periodSeconds": 5, "failureThreshold": 3},
            "livenessProbe": {"httpGet": {"path": "/live", "port": 4191}, "periodSeconds": 10, "failureThreshold": 3},
            "lifecycle": {"postStart": {"exec": {"command": ["portcullis-proxy", "wait-ready", "--timeout", "120s"]}}}
        }},
        {"op": "add", "path": "/spec/volumes", "value": [
            {"name": "portcullis-identity-token", "projected": {"sources": [{"serviceAccountToken": {
                "audience": "portcullis.dev/identity", "expirationSeconds": 3600, "path": "token"}}]}},
            {"name": "portcullis-trust-bundle", "configMap": {"name": "portcullis-trust-bundle"}},
            {"name": "portcullis-data", "emptyDir": {}},
            {"name": "portcullis-xtables-lock", "emptyDir": {}}
        ]},
        {"op": "add", "path": "/metadata/annotations", "value": {"portcullis.dev/injected": "0.1.0-test"}},
        {"op": "add", "path": "/metadata/labels", "value": {"portcullis.dev/injected": "true"}}
    ]);
    assert_eq!(serde_json::to_value(&patch).unwrap(), expected);

    // The proxy is the FIRST container, so the kubelet runs its postStart before the app.
    let injected = pod(&patched(&value, &decide_json(&value, &enabled(), OLD)));
    let spec = injected.spec.unwrap();
    let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["portcullis-proxy", "app"]);
    assert!(
        spec.containers[0].restart_policy.is_none(),
        "no native sidecar below 1.29"
    );
}

#[test]
fn native_sidecar_on_1_29_is_the_second_init_container_with_a_startup_probe() {
    let value = pod_json(json!({}), None);
    let decision = decide_json(&value, &enabled(), NEW);
    let Decision::Inject { patch, .. } = &decision else {
        panic!("not injected")
    };
    let paths: Vec<String> = patch.0.iter().map(|op| op.path().to_string()).collect();
    assert_eq!(
        paths,
        [
            "/spec/initContainers",
            "/spec/volumes",
            "/metadata/annotations",
            "/metadata/labels"
        ]
    );

    let spec = pod(&patched(&value, &decision)).spec.unwrap();
    let init: Vec<&str> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(init, ["portcullis-init", "portcullis-proxy"]);
    let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["app"]);
    let proxy = container(
        spec.init_containers.as_deref().unwrap_or_default(),
        "portcullis-proxy",
    );
    assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));
    let startup = proxy.startup_probe.as_ref().unwrap();
    let get = startup.http_get.as_ref().unwrap();
    assert_eq!(
        (get.path.as_deref(), &get.port),
        (
            Some("/ready"),
            &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(4191)
        )
    );
    assert!(
        proxy.lifecycle.is_none(),
        "no postStart hook for native sidecars"
    );
}

#[test]
fn existing_arrays_get_inserts_and_our_init_container_runs_first() {
    let mut value = pod_json(
        json!({
            "initContainers": [{"name": "migrate", "image": "acme/migrate:1"}],
            "volumes": [{"name": "config", "configMap": {"name": "web-config"}}]
        }),
        Some(json!({"team": "payments"})),
    );
    value["metadata"]["labels"] = json!({"app": "web"});
    let decision = decide_json(&value, &enabled(), NEW);
    let Decision::Inject { patch, .. } = &decision else {
        panic!("not injected")
    };
    let paths: Vec<String> = patch.0.iter().map(|op| op.path().to_string()).collect();
    assert_eq!(
        paths,
        [
            "/spec/initContainers/0",
            "/spec/initContainers/1",
            "/spec/volumes/-",
            "/spec/volumes/-",
            "/spec/volumes/-",
            "/spec/volumes/-",
            "/metadata/annotations/portcullis.dev~1injected",
            "/metadata/labels/portcullis.dev~1injected"
        ]
    );
    let injected = pod(&patched(&value, &decision));
    let spec = injected.spec.as_ref().unwrap();
    let init: Vec<&str> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        init,
        ["portcullis-init", "portcullis-proxy", "migrate"],
        "the redirect is in place before migrate runs"
    );
    let volumes: Vec<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(volumes[0], "config");
    assert_eq!(volumes.len(), 5);
    let annotations = injected.metadata.annotations.unwrap();
    assert_eq!(annotations["team"], "payments");
    assert_eq!(annotations[INJECTED], "0.1.0-test");
    // The pod's own labels stay; ours lets the tenant's NetworkPolicy select it.
    let labels = injected.metadata.labels.unwrap();
    assert_eq!(labels["app"], "web");
    assert_eq!(labels["portcullis.dev/injected"], "true");
}

#[test]
fn injection_is_idempotent() {
    for server in [OLD, NEW] {
        let value = pod_json(json!({}), None);
        let once = patched(&value, &decide_json(&value, &enabled(), server));
        let again = decide_json(&once, &enabled(), server);
        assert_eq!(
            again,
            Decision::Admit {
                reason: NotInjected::AlreadyInjected,
                warnings: vec![]
            }
        );
    }
}

#[test]
fn namespaces_decide_whether_pods_are_injected() {
    let value = pod_json(json!({}), None);
    let not_opted_in = Decision::Admit {
        reason: NotInjected::NamespaceNotOptedIn,
        warnings: vec![],
    };
    // No labels, or a Tenant namespace that opted out.
    assert_eq!(decide_json(&value, &labels(&[]), OLD), not_opted_in);
    let opted_out_tenant = labels(&[
        ("portcullis.dev/tenant", "acme"),
        ("portcullis.dev/inject", "disabled"),
    ]);
    assert_eq!(decide_json(&value, &opted_out_tenant, OLD), not_opted_in);
    // Namespaces without a Tenant: only with inject=enabled. Tenant namespaces: by default.
    assert!(matches!(
        decide_json(&value, &enabled(), OLD),
        Decision::Inject { .. }
    ));
    let tenant = labels(&[("portcullis.dev/tenant", "acme")]);
    assert!(matches!(
        decide_json(&value, &tenant, OLD),
        Decision::Inject { .. }
    ));
    // Never kube-system or the operator's own namespace, whatever their labels.
    for namespace in ["kube-system", "portcullis-system"] {
        assert_eq!(
            decide(&pod(&value), namespace, &required(), &settings(), OLD),
            not_opted_in
        );
    }
}

#[test]
fn pod_opt_out_is_respected_unless_the_namespace_requires_injection() {
    let value = pod_json(
        json!({}),
        Some(json!({"portcullis.dev/inject": "disabled"})),
    );
    assert_eq!(
        decide_json(&value, &enabled(), OLD),
        Decision::Admit {
            reason: NotInjected::PodOptedOut,
            warnings: vec![]
        }
    );
    assert_eq!(
        refusal(&decide_json(&value, &required(), OLD)),
        "pod acme-prod/web cannot opt out of Portcullis: namespace \"acme-prod\" requires injection \
         (label portcullis.dev/inject=required); remove the annotation portcullis.dev/inject: disabled, \
         or ask an admin to set the namespace label to enabled"
    );
}

#[test]
fn host_network_pods_are_not_injected_and_refused_where_injection_is_required() {
    let value = pod_json(json!({"hostNetwork": true}), None);
    let decision = decide_json(&value, &enabled(), OLD);
    assert!(
        matches!(
            decision,
            Decision::Admit {
                reason: NotInjected::Unsupported,
                ..
            }
        ),
        "{decision:?}"
    );
    assert_eq!(
        warnings(&decision),
        [
            "portcullis: pod acme-prod/web admitted without the proxy: it uses hostNetwork, so the init step's \
          iptables rules would redirect the node's own traffic"
        ]
    );
    assert_eq!(
        refusal(&decide_json(&value, &required(), OLD)),
        "pod acme-prod/web cannot be injected with the Portcullis proxy: it uses hostNetwork, so the init \
         step's iptables rules would redirect the node's own traffic; namespace \"acme-prod\" requires \
         injection (label portcullis.dev/inject=required)"
    );
}

#[test]
fn a_container_already_named_portcullis_proxy_is_refused() {
    let value = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "acme-prod"},
        "spec": {"containers": [{"name": "app", "image": "a"}, {"name": "portcullis-proxy", "image": "evil"}]}
    });
    let expected = "pod acme-prod/web has a container named \"portcullis-proxy\", a name Portcullis reserves for \
                    the containers it injects; rename that container, or annotate the pod \
                    portcullis.dev/inject: disabled to run it without the Portcullis proxy";
    assert_eq!(refusal(&decide_json(&value, &enabled(), OLD)), expected);
    // Even with a copied "injected" annotation, an init container named portcullis-init
    // without the proxy is not ours.
    let mut copied = value.clone();
    copied["spec"]["containers"][1]["name"] = json!("portcullis-init");
    copied["metadata"]["annotations"] = json!({INJECTED: "0.0.1"});
    assert!(refusal(&decide_json(&copied, &enabled(), OLD)).contains("\"portcullis-init\""));
}

#[test]
fn app_port_comes_from_the_annotation_by_number_or_name_else_the_first_port() {
    let app_port = |value: &Value| {
        let spec = pod(&patched(value, &decide_json(value, &enabled(), OLD)))
            .spec
            .unwrap();
        env_of(container(&spec.containers, "portcullis-proxy"))
            .get("PORTCULLIS_APP_PORT")
            .cloned()
    };
    let default = pod_json(json!({}), None);
    assert_eq!(app_port(&default).as_deref(), Some("8080"));

    let numbered = pod_json(json!({}), Some(json!({"portcullis.dev/app-port": "9000"})));
    assert_eq!(app_port(&numbered).as_deref(), Some("9000"));

    let mut named = pod_json(json!({}), Some(json!({"portcullis.dev/app-port": "http"})));
    named["spec"]["containers"] = json!([
        {"name": "metrics", "image": "m", "ports": [{"containerPort": 9100, "name": "metrics"}]},
        {"name": "app", "image": "a", "ports": [{"containerPort": 7070, "name": "http"}]}
    ]);
    assert_eq!(app_port(&named).as_deref(), Some("7070"));

    let mut unknown = named.clone();
    unknown["metadata"]["annotations"] = json!({"portcullis.dev/app-port": "grpc"});
    assert_eq!(
        warnings(&decide_json(&unknown, &enabled(), OLD)),
        [
            "portcullis: pod acme-prod/web admitted without the proxy: annotation portcullis.dev/app-port names \
          port \"grpc\", which no container declares"
        ]
    );
    let mut zero = named.clone();
    zero["metadata"]["annotations"] = json!({"portcullis.dev/app-port": "0"});
    assert!(refusal(&decide_json(&zero, &required(), OLD)).contains("\"0\" is not a port"));

    // No ports at all: injected (identity, outbound), with a warning and no app port.
    let mut portless = pod_json(json!({}), None);
    portless["spec"]["containers"] = json!([{"name": "worker", "image": "w"}]);
    let decision = decide_json(&portless, &enabled(), OLD);
    assert_eq!(
        warnings(&decision),
        [
            "portcullis: pod acme-prod/web declares no container port and no portcullis.dev/app-port; the proxy \
          will refuse inbound traffic"
        ]
    );
    assert_eq!(app_port(&portless), None);
}

#[test]
fn annotations_reach_the_init_step_and_the_proxy() {
    let value = pod_json(
        json!({}),
        Some(json!({
            "portcullis.dev/skip-inbound-ports": "22, 9000-9010",
            "portcullis.dev/inbound-mode": "mtls-and-apikey",
            "portcullis.dev/scopes-map": "{\"identify\":[{\"methods\":[\"POST\"],\"path\":\"/v1/identify\"}]}",
            "portcullis.dev/allowed-peers": "tenant:globex, namespace:batch"
        })),
    );
    let spec = pod(&patched(&value, &decide_json(&value, &enabled(), OLD)))
        .spec
        .unwrap();
    let init = container(
        spec.init_containers.as_deref().unwrap_or_default(),
        "portcullis-init",
    );
    assert_eq!(
        init.args.clone().unwrap(),
        [
            "init",
            "--inbound-port",
            "4143",
            "--proxy-uid",
            "2102",
            "--skip-inbound-ports",
            "22,9000-9010"
        ]
    );
    let env = env_of(container(&spec.containers, "portcullis-proxy"));
    assert_eq!(env["PORTCULLIS_INBOUND_MODE"], "mtls-and-apikey");
    assert!(env["PORTCULLIS_SCOPES_MAP"].contains("/v1/identify"));
    assert_eq!(
        env["PORTCULLIS_ALLOWED_PEERS"],
        "tenant:globex, namespace:batch"
    );

    for (annotation, bad, expected) in [
        (
            "portcullis.dev/skip-inbound-ports",
            "ssh",
            "annotation portcullis.dev/skip-inbound-ports: \"ssh\" is not a port",
        ),
        (
            "portcullis.dev/inbound-mode",
            "tls",
            "unknown inbound mode \"tls\"",
        ),
        (
            "portcullis.dev/scopes-map",
            "{not json",
            "is not a JSON scope map",
        ),
        (
            "portcullis.dev/allowed-peers",
            "spiffe://cluster.local/tenant/globex",
            "annotation portcullis.dev/allowed-peers: \"spiffe://cluster.local/tenant/globex\": spiffeId",
        ),
    ] {
        let value = pod_json(json!({}), Some(json!({ annotation: bad })));
        let message = refusal(&decide_json(&value, &required(), OLD));
        assert!(message.contains(expected), "{message}");
        let decision = decide_json(&value, &enabled(), OLD);
        assert!(
            matches!(
                decision,
                Decision::Admit {
                    reason: NotInjected::Unsupported,
                    ..
                }
            ),
            "{decision:?}"
        );
    }
}

#[test]
fn ports_and_volumes_the_proxy_needs_make_a_pod_unsupported() {
    let mut port_clash = pod_json(json!({}), None);
    port_clash["spec"]["containers"][0]["ports"] = json!([{"containerPort": 4143}]);
    assert!(
        refusal(&decide_json(&port_clash, &required(), OLD))
            .contains("container port 4143 is one the proxy listens on")
    );

    let volume_clash = pod_json(
        json!({"volumes": [{"name": "portcullis-data", "emptyDir": {}}]}),
        None,
    );
    assert!(
        refusal(&decide_json(&volume_clash, &required(), OLD))
            .contains("volume name \"portcullis-data\" is reserved")
    );
}

#[test]
fn job_pods_exit_with_the_app() {
    let mut job = pod_json(json!({"restartPolicy": "Never"}), None);
    job["metadata"]["ownerReferences"] =
        json!([{"apiVersion": "batch/v1", "kind": "Job", "name": "nightly", "uid": "1"}]);

    // Regular-container mode: the proxy is told, and the user is warned of the limitation.
    let decision = decide_json(&job, &enabled(), OLD);
    assert_eq!(
        warnings(&decision),
        [
            "portcullis: API server < 1.29: the proxy is a regular container and exits only once it sees the app exit"
        ]
    );
    let spec = pod(&patched(&job, &decision)).spec.unwrap();
    let env = env_of(container(&spec.containers, "portcullis-proxy"));
    assert_eq!(
        env.get("PORTCULLIS_EXIT_WHEN_APP_EXITS")
            .map(String::as_str),
        Some("true")
    );

    // Native sidecars stop by themselves once the Job's containers finish.
    let decision = decide_json(&job, &enabled(), NEW);
    assert!(warnings(&decision).is_empty());
    let spec = pod(&patched(&job, &decision)).spec.unwrap();
    let env = env_of(container(
        spec.init_containers.as_deref().unwrap_or_default(),
        "portcullis-proxy",
    ));
    assert!(!env.contains_key("PORTCULLIS_EXIT_WHEN_APP_EXITS"));
}

#[test]
fn resources_and_outbound_redirection_are_configurable() {
    let mut settings = settings();
    settings.resources.cpu_limit = "1".into();
    settings.resources.memory_request = "64Mi".into();
    settings.redirect_outbound = true;
    let value = pod_json(json!({}), None);
    let decision = decide(&pod(&value), "acme-prod", &enabled(), &settings, OLD);
    let spec = pod(&patched(&value, &decision)).spec.unwrap();
    let proxy = container(&spec.containers, "portcullis-proxy");
    let resources = serde_json::to_value(proxy.resources.as_ref().unwrap()).unwrap();
    assert_eq!(
        resources,
        json!({"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "128Mi"}})
    );
    let init = container(
        spec.init_containers.as_deref().unwrap_or_default(),
        "portcullis-init",
    );
    assert_eq!(
        init.args.as_ref().unwrap()[5..],
        ["--outbound-port".to_owned(), "4140".to_owned()]
    );
}

#[test]
fn generated_pod_names_read_well_in_messages() {
    let mut value = pod_json(json!({"hostNetwork": true}), None);
    value["metadata"] = json!({"generateName": "web-7d9c-", "namespace": "acme-prod"});
    assert!(
        refusal(&decide_json(&value, &required(), OLD))
            .starts_with("pod acme-prod/web-7d9c-<generated> cannot")
    );
}

#[test]
fn the_trust_domain_reaches_the_proxy_only_when_it_is_not_cluster_local() {
    let value = pod_json(json!({}), None);
    let proxy_env = |settings: &InjectSettings| {
        let decision = decide(&pod(&value), "acme-prod", &enabled(), settings, OLD);
        let pod: Pod = serde_json::from_value(patched(&value, &decision)).unwrap();
        env_of(container(&pod.spec.unwrap().containers, "portcullis-proxy"))
    };
    assert!(!proxy_env(&settings()).contains_key("PORTCULLIS_TRUST_DOMAIN"));
    let mut other = settings();
    other.trust_domain = "prod.acme".into();
    assert_eq!(
        proxy_env(&other)
            .get("PORTCULLIS_TRUST_DOMAIN")
            .map(String::as_str),
        Some("prod.acme")
    );
}

#[test]
fn proxies_are_told_the_audit_collector_when_one_is_configured() {
    let value = pod_json(json!({}), None);
    let proxy_env = |settings: &InjectSettings| {
        let decision = decide(&pod(&value), "acme-prod", &enabled(), settings, OLD);
        let pod: Pod = serde_json::from_value(patched(&value, &decision)).unwrap();
        env_of(container(&pod.spec.unwrap().containers, "portcullis-proxy"))
    };
    assert!(!proxy_env(&settings()).contains_key("PORTCULLIS_AUDIT_COLLECTOR_URL"));
    let mut shipping = settings();
    shipping.audit_collector_url =
        Some("https://portcullis-audit.portcullis-system.svc:8091".into());
    assert_eq!(
        proxy_env(&shipping)
            .get("PORTCULLIS_AUDIT_COLLECTOR_URL")
            .map(String::as_str),
        Some("https://portcullis-audit.portcullis-system.svc:8091")
    );
}

// ------------------------------------------------ attacks: forging or skipping the proxy

mod attacks {
    use std::sync::Arc;

    use futures::future::BoxFuture;
    use kube::core::DynamicObject;
    use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
    use portcullis_api::clock::SystemClock;
    use portcullis_crds::{Role, Tenant};
    use portcullis_operator::webhook::validate::lookup::{ClusterLookup, LookupError};
    use portcullis_operator::webhook::{
        TracingAuditSink, ValidatorSettings, WebhookState, review_pod,
    };

    use super::*;

    /// Namespace `acme-prod`, bound to Tenant `acme` of `classification`.
    struct TenantCluster {
        classification: &'static str,
        serving_certificate: Option<&'static str>,
    }

    impl ClusterLookup for TenantCluster {
        fn namespace_labels<'a>(
            &'a self,
            _: &'a str,
        ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, LookupError>> {
            Box::pin(async { Ok(Some(labels(&[("portcullis.dev/tenant", "acme")]))) })
        }
        fn roles<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Vec<Role>, LookupError>> {
            Box::pin(async { Ok(Vec::new()) })
        }
        fn tenants(&self) -> BoxFuture<'_, Result<Vec<Tenant>, LookupError>> {
            let tenant: Tenant = serde_json::from_value(json!({
                "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
                "metadata": {"name": "acme"},
                "spec": {"namespaces": ["acme-prod"], "dataClassification": self.classification,
                    "defaults": {"servingCertificateSecret": self.serving_certificate}}
            }))
            .unwrap();
            Box::pin(async move { Ok(vec![tenant]) })
        }
    }

    fn state(classification: &'static str) -> WebhookState {
        state_with(classification, None)
    }

    /// A Tenant whose `spec.defaults.servingCertificateSecret` is `serving_certificate`.
    fn state_with(
        classification: &'static str,
        serving_certificate: Option<&'static str>,
    ) -> WebhookState {
        WebhookState {
            inject: settings(),
            server_version: OLD,
            validator: ValidatorSettings::new("portcullis-system", "portcullis-operator"),
            lookup: Arc::new(TenantCluster {
                classification,
                serving_certificate,
            }),
            audit: Arc::new(TracingAuditSink),
            clock: Arc::new(SystemClock),
        }
    }

    fn review(
        operation: &str,
        sub_resource: Option<&str>,
        object: &Value,
        old: &Value,
    ) -> AdmissionRequest<DynamicObject> {
        let mut request = json!({
            "uid": "5d1c6a2e-0000-4000-8000-000000000002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "name": "web",
            "namespace": "acme-prod",
            "operation": operation,
            "userInfo": {"username": "mallory@acme", "groups": ["system:authenticated"]},
            "object": object,
            "oldObject": old,
        });
        if let Some(sub) = sub_resource {
            request["subResource"] = json!(sub);
        }
        let review: AdmissionReview<DynamicObject> = serde_json::from_value(json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request
        }))
        .unwrap();
        review.try_into().unwrap()
    }

    /// The webhook's answer to creating `value`.
    async fn create(state: &WebhookState, value: &Value) -> AdmissionResponse {
        review_pod(state, &review("CREATE", None, value, &Value::Null)).await
    }

    fn denial(response: &AdmissionResponse) -> String {
        assert!(!response.allowed, "admitted: {response:?}");
        response.result.message.clone()
    }

    /// The pod as the injector leaves it (what the API server stores).
    fn injected(server: ServerVersion) -> Value {
        let value = pod_json(json!({}), None);
        patched(&value, &decide_json(&value, &enabled(), server))
    }

    #[test]
    fn a_forged_injected_annotation_and_fake_proxy_are_not_admitted_unchanged() {
        // Anything named portcullis-proxy plus the annotation used to pass as injected.
        let forged = pod_json(
            json!({"containers": [
                {"name": "portcullis-proxy", "image": "mallory/sleep:1"},
                {"name": "app", "image": "acme/web:1", "ports": [{"containerPort": 8080}]}
            ]}),
            Some(json!({INJECTED: "0.1.0-test"})),
        );
        let message = refusal(&decide_json(&forged, &required(), OLD));
        assert!(
            message.contains("not what Portcullis injects") && message.contains("image"),
            "{message}"
        );
        // A genuine proxy with its init step dropped is no better.
        let mut no_init = injected(OLD);
        no_init["spec"]
            .as_object_mut()
            .unwrap()
            .remove("initContainers");
        let message = refusal(&decide_json(&no_init, &enabled(), OLD));
        assert!(message.contains("portcullis-init"), "{message}");
        // Nor one whose proxy was re-pointed at another image.
        let mut swapped = injected(OLD);
        swapped["spec"]["containers"][0]["image"] = json!("mallory/proxy:1");
        assert!(refusal(&decide_json(&swapped, &enabled(), OLD)).contains("mallory/proxy:1"));
    }

    #[test]
    fn a_genuinely_injected_pod_is_still_left_alone_after_api_server_defaulting() {
        for server in [OLD, NEW] {
            let mut stored = injected(server);
            // What the API server adds when it decodes the patched pod.
            let proxy = if server.supports_native_sidecars() {
                &mut stored["spec"]["initContainers"][1]
            } else {
                &mut stored["spec"]["containers"][0]
            };
            proxy["terminationMessagePath"] = json!("/dev/termination-log");
            proxy["terminationMessagePolicy"] = json!("File");
            proxy["readinessProbe"]["timeoutSeconds"] = json!(1);
            proxy["readinessProbe"]["successThreshold"] = json!(1);
            proxy["readinessProbe"]["httpGet"]["scheme"] = json!("HTTP");
            proxy["env"][0]["valueFrom"]["fieldRef"]["apiVersion"] = json!("v1");
            stored["spec"]["volumes"][1]["configMap"]["defaultMode"] = json!(420);
            stored["spec"]["volumes"][0]["projected"]["defaultMode"] = json!(420);
            assert_eq!(
                decide_json(&stored, &enabled(), server),
                Decision::Admit {
                    reason: NotInjected::AlreadyInjected,
                    warnings: vec![]
                }
            );
        }
    }

    #[tokio::test]
    async fn a_pod_cannot_opt_out_in_a_restricted_tenant_namespace() {
        let value = pod_json(
            json!({}),
            Some(json!({"portcullis.dev/inject": "disabled"})),
        );
        let response = create(&state("Restricted"), &value).await;
        let message = denial(&response);
        assert!(
            message.contains("Restricted")
                && message.contains("acme")
                && message.contains("remove the annotation"),
            "{message}"
        );
        // Public and Internal tenants still allow the opt-out.
        let response = create(&state("Internal"), &value).await;
        assert!(response.allowed && response.patch.is_none(), "{response:?}");
    }

    #[tokio::test]
    async fn skipping_the_app_port_is_refused_in_a_confidential_tenant() {
        for skipped in ["8080", "22,8000-8100"] {
            let value = pod_json(
                json!({}),
                Some(json!({"portcullis.dev/skip-inbound-ports": skipped})),
            );
            let response = create(&state("Confidential"), &value).await;
            let message = denial(&response);
            assert!(
                message.contains("8080")
                    && message.contains("Confidential")
                    && message.contains("skip-inbound-ports"),
                "{message}"
            );
        }
        // Nor may a pod arrive already "injected" with the skip (it is genuine output of
        // the injector in a namespace that allows skips).
        let skipping = pod_json(
            json!({}),
            Some(json!({"portcullis.dev/skip-inbound-ports": "8080"})),
        );
        let injected_elsewhere = patched(&skipping, &decide_json(&skipping, &enabled(), OLD));
        let message = denial(&create(&state("Confidential"), &injected_elsewhere).await);
        assert!(message.contains("skip port 8080"), "{message}");
        // Other ports may still be skipped.
        let value = pod_json(
            json!({}),
            Some(json!({"portcullis.dev/skip-inbound-ports": "22"})),
        );
        let response = create(&state("Confidential"), &value).await;
        assert!(response.allowed && response.patch.is_some(), "{response:?}");
    }

    #[tokio::test]
    async fn an_update_cannot_swap_the_proxy_image() {
        let old = injected(OLD);
        let mut new = old.clone();
        new["spec"]["containers"][0]["image"] = json!("mallory/proxy:1");
        let message =
            denial(&review_pod(&state("Internal"), &review("UPDATE", None, &new, &old)).await);
        assert!(
            message.contains("portcullis-proxy") && message.contains("cannot be changed"),
            "{message}"
        );
        let mut new = old.clone();
        new["spec"]["initContainers"][0]["image"] = json!("busybox");
        let message =
            denial(&review_pod(&state("Internal"), &review("UPDATE", None, &new, &old)).await);
        assert!(message.contains("portcullis-init"), "{message}");
        // Any other update (the app's image, a label) goes through.
        let mut new = old.clone();
        new["spec"]["containers"][1]["image"] = json!("acme/web:2");
        new["metadata"]["labels"]["tier"] = json!("front");
        let response = review_pod(&state("Internal"), &review("UPDATE", None, &new, &old)).await;
        assert!(response.allowed && response.patch.is_none(), "{response:?}");
    }

    #[tokio::test]
    async fn an_ephemeral_container_cannot_undo_the_redirect() {
        // 1.20 sends the EphemeralContainers object of the subresource.
        let debug = |capabilities: Value| {
            json!({
                "apiVersion": "v1", "kind": "EphemeralContainers",
                "metadata": {"name": "web", "namespace": "acme-prod"},
                "ephemeralContainers": [{"name": "debug", "image": "busybox",
                    "securityContext": {"capabilities": {"add": capabilities}}}]
            })
        };
        let old = json!({"apiVersion": "v1", "kind": "EphemeralContainers",
            "metadata": {"name": "web", "namespace": "acme-prod"}, "ephemeralContainers": []});
        let mut request = review(
            "UPDATE",
            Some("ephemeralcontainers"),
            &debug(json!(["NET_ADMIN"])),
            &old,
        );
        request.kind.kind = "EphemeralContainers".into();
        let message = denial(&review_pod(&state("Internal"), &request).await);
        assert!(
            message.contains("debug") && message.contains("NET_ADMIN"),
            "{message}"
        );
        let mut request = review(
            "UPDATE",
            Some("ephemeralcontainers"),
            &debug(json!([])),
            &old,
        );
        request.kind.kind = "EphemeralContainers".into();
        assert!(review_pod(&state("Internal"), &request).await.allowed);
    }

    /// The pod `value` after the webhook's answer to creating it.
    async fn created(state: &WebhookState, value: &Value) -> Value {
        let response = create(state, value).await;
        assert!(response.allowed, "{response:?}");
        let patch: json_patch::Patch =
            serde_json::from_slice(response.patch.as_deref().expect("a patch")).unwrap();
        let mut doc = value.clone();
        json_patch::patch(&mut doc, &patch).unwrap();
        doc
    }

    fn serving_volume(pod: &Value) -> Option<Value> {
        pod["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "portcullis-serving-certificate")
            .cloned()
    }

    #[tokio::test]
    async fn the_tenant_default_serving_certificate_is_mounted_unless_the_pod_names_its_own() {
        let shop = state_with("Internal", Some("shop-tls"));
        let plain = created(&shop, &pod_json(json!({}), None)).await;
        assert_eq!(
            serving_volume(&plain),
            Some(json!({"name": "portcullis-serving-certificate",
                "secret": {"secretName": "shop-tls", "optional": true}}))
        );
        let proxy = &plain["spec"]["containers"][0];
        assert!(
            proxy["env"].as_array().unwrap().contains(&json!({
                "name": "PORTCULLIS_SERVING_CERT_DIR",
                "value": "/var/run/portcullis.dev/serving-certificate"
            })),
            "{proxy}"
        );
        // The pod's annotation wins.
        let own = created(
            &shop,
            &pod_json(
                json!({}),
                Some(json!({"portcullis.dev/serving-certificate": "web-tls"})),
            ),
        )
        .await;
        assert_eq!(
            serving_volume(&own).unwrap()["secret"]["secretName"],
            "web-tls"
        );
        // A Tenant without the default: nothing added.
        let none = created(&state("Internal"), &pod_json(json!({}), None)).await;
        assert_eq!(serving_volume(&none), None);
        assert!(!none.to_string().contains("PORTCULLIS_SERVING_CERT_DIR"));

        // The pod stays genuine once the Tenant's default changes or goes away: the
        // Secret's name is read from the pod's own volume.
        assert_eq!(
            decide_json(&plain, &enabled(), OLD),
            Decision::Admit {
                reason: NotInjected::AlreadyInjected,
                warnings: vec![]
            }
        );
        let response = create(&state_with("Internal", Some("other-tls")), &plain).await;
        assert!(response.allowed && response.patch.is_none(), "{response:?}");
    }

    #[tokio::test]
    async fn an_update_cannot_change_the_serving_certificate_mount() {
        let value = pod_json(
            json!({}),
            Some(json!({"portcullis.dev/serving-certificate": "web-tls"})),
        );
        let old = patched(&value, &decide_json(&value, &enabled(), OLD));
        let state = state("Internal");
        let unchanged = review_pod(&state, &review("UPDATE", None, &old, &old)).await;
        assert!(
            unchanged.allowed && unchanged.patch.is_none(),
            "{unchanged:?}"
        );
        let mut repointed = old.clone();
        let index = repointed["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .position(|v| v["name"] == "portcullis-serving-certificate")
            .unwrap();
        repointed["spec"]["volumes"][index]["secret"]["secretName"] = json!("mallory-tls");
        let message = denial(&review_pod(&state, &review("UPDATE", None, &repointed, &old)).await);
        assert!(message.contains("portcullis-* volumes"), "{message}");
        let mut env_moved = old.clone();
        for env in env_moved["spec"]["containers"][0]["env"]
            .as_array_mut()
            .unwrap()
        {
            if env["name"] == "PORTCULLIS_SERVING_CERT_DIR" {
                env["value"] = json!("/tmp");
            }
        }
        let message = denial(&review_pod(&state, &review("UPDATE", None, &env_moved, &old)).await);
        assert!(
            message.contains("portcullis-proxy") && message.contains("cannot be changed"),
            "{message}"
        );
    }
}

/// The volume, the proxy's mount and variable that `portcullis.dev/serving-certificate`
/// adds (the Tenant default adds the same).
#[test]
fn the_serving_certificate_annotation_mounts_the_secret_read_only_into_the_proxy() {
    let annotated = pod_json(
        json!({}),
        Some(json!({"portcullis.dev/serving-certificate": "web-tls"})),
    );
    for server in [OLD, NEW] {
        let injected: Pod = serde_json::from_value(patched(
            &annotated,
            &decide_json(&annotated, &enabled(), server),
        ))
        .unwrap();
        let spec = injected.spec.unwrap();
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "portcullis-serving-certificate")
            .expect("the serving certificate volume");
        assert_eq!(
            serde_json::to_value(volume).unwrap(),
            json!({"name": "portcullis-serving-certificate",
                "secret": {"secretName": "web-tls", "optional": true}})
        );
        let all: Vec<Container> = spec
            .init_containers
            .clone()
            .unwrap_or_default()
            .into_iter()
            .chain(spec.containers.clone())
            .collect();
        let proxy = container(&all, "portcullis-proxy");
        assert_eq!(
            env_of(proxy)["PORTCULLIS_SERVING_CERT_DIR"],
            "/var/run/portcullis.dev/serving-certificate"
        );
        let mount = proxy
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "portcullis-serving-certificate")
            .unwrap();
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            ("/var/run/portcullis.dev/serving-certificate", Some(true))
        );
        // Only the proxy sees the key.
        for other in all.iter().filter(|c| c.name != "portcullis-proxy") {
            assert!(
                other
                    .volume_mounts
                    .iter()
                    .flatten()
                    .all(|m| m.name != "portcullis-serving-certificate"),
                "{}",
                other.name
            );
        }
    }
    // Without the annotation (and no Tenant default) nothing is added.
    let plain = pod_json(json!({}), None);
    let injected = patched(&plain, &decide_json(&plain, &enabled(), OLD)).to_string();
    assert!(!injected.contains("serving-certificate") && !injected.contains("SERVING_CERT"));
    // A value that is no Secret name makes the pod one the injector cannot handle.
    let bad = pod_json(
        json!({}),
        Some(json!({"portcullis.dev/serving-certificate": "Web_TLS"})),
    );
    assert!(
        refusal(&decide_json(&bad, &required(), OLD))
            .contains("portcullis.dev/serving-certificate")
    );
    assert!(
        warnings(&decide_json(&bad, &enabled(), OLD))
            .iter()
            .any(|w| w.contains("is not a Secret name"))
    );
    // The volume name is reserved.
    let squatting = pod_json(
        json!({"volumes": [{"name": "portcullis-serving-certificate", "emptyDir": {}}]}),
        None,
    );
    assert!(refusal(&decide_json(&squatting, &required(), OLD)).contains("reserved"));
}

#[test]
fn the_serving_certificate_as_injected_is_genuine_and_forgeries_are_refused() {
    let annotated = pod_json(
        json!({}),
        Some(json!({"portcullis.dev/serving-certificate": "web-tls"})),
    );
    let genuine = patched(&annotated, &decide_json(&annotated, &enabled(), OLD));
    let already = Decision::Admit {
        reason: NotInjected::AlreadyInjected,
        warnings: vec![],
    };
    assert_eq!(decide_json(&genuine, &enabled(), OLD), already);
    let index = genuine["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .position(|v| v["name"] == "portcullis-serving-certificate")
        .unwrap();
    let mut defaulted = genuine.clone();
    defaulted["spec"]["volumes"][index]["secret"]["defaultMode"] = json!(420);
    assert_eq!(decide_json(&defaulted, &enabled(), OLD), already);

    let forge = |change: &dyn Fn(&mut Value)| {
        let mut forged = genuine.clone();
        change(&mut forged);
        refusal(&decide_json(&forged, &enabled(), OLD))
    };
    // The Secret's volume swapped for the node's disk.
    let message = forge(&|pod| {
        pod["spec"]["volumes"][index] = json!({"name": "portcullis-serving-certificate",
            "hostPath": {"path": "/etc/kubernetes/pki"}});
    });
    assert!(
        message.contains("portcullis-serving-certificate"),
        "{message}"
    );
    // Not optional: a missing Secret would keep the pod from starting.
    let message = forge(&|pod| {
        pod["spec"]["volumes"][index]["secret"]["optional"] = json!(false);
    });
    assert!(message.contains("optional"), "{message}");
    // Another Secret than the annotation names.
    let message = forge(&|pod| {
        pod["spec"]["volumes"][index]["secret"]["secretName"] = json!("other-tls");
    });
    assert!(message.contains("other-tls"), "{message}");
    // The mount made writable, or the variable pointed elsewhere.
    let message = forge(&|pod| {
        for mount in pod["spec"]["containers"][0]["volumeMounts"]
            .as_array_mut()
            .unwrap()
        {
            if mount["name"] == "portcullis-serving-certificate" {
                mount.as_object_mut().unwrap().remove("readOnly");
            }
        }
    });
    assert!(message.contains("volumeMounts"), "{message}");
    let message = forge(&|pod| {
        for env in pod["spec"]["containers"][0]["env"].as_array_mut().unwrap() {
            if env["name"] == "PORTCULLIS_SERVING_CERT_DIR" {
                env["value"] = json!("/var/run/secrets/kubernetes.io/serviceaccount");
            }
        }
    });
    assert!(message.contains("env"), "{message}");
    // The variable without the volume, on a pod injected without a serving certificate.
    let plain = pod_json(json!({}), None);
    let mut sneaked = patched(&plain, &decide_json(&plain, &enabled(), OLD));
    sneaked["spec"]["containers"][0]["env"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "PORTCULLIS_SERVING_CERT_DIR", "value": "/tmp"}));
    assert!(refusal(&decide_json(&sneaked, &enabled(), OLD)).contains("env"));
}

#[test]
fn an_app_container_with_net_admin_is_refused_where_injection_is_required() {
    // NET_ADMIN in the pod's network namespace can flush the init step's redirect.
    for security in [
        json!({"capabilities": {"add": ["NET_ADMIN"]}}),
        json!({"privileged": true}),
    ] {
        let value = pod_json(
            json!({"containers": [{"name": "app", "image": "acme/web:1",
                "ports": [{"containerPort": 8080}], "securityContext": security}]}),
            None,
        );
        let message = refusal(&decide_json(&value, &required(), OLD));
        assert!(
            message.contains("\"app\"") && message.contains("undo the redirect"),
            "{message}"
        );
        // Where injection is only enabled: injected, with a warning saying so.
        let decision = decide_json(&value, &enabled(), OLD);
        assert!(
            matches!(decision, Decision::Inject { .. })
                && warnings(&decision)
                    .iter()
                    .any(|w| w.contains("undo the redirect")),
            "{decision:?}"
        );
    }
}
