//! The app's `httpGet` and `tcpSocket` probes, pointed at the proxy's admin port.
//!
//! Every inbound connection to an app port is redirected to the proxy, so the kubelet's
//! probes would meet the proxy instead of the app (see `portcullis_api::injection::probes`). Each
//! such probe becomes `GET :4191/app-health/<container>/<kind>` with its timings kept,
//! and the proxy runs the original check against the app. Probes the redirect does not
//! touch stay as they are: `exec` and `grpc` probes, probes of another host, of a
//! skipped port or of the admin port itself (so a pod injected twice is unchanged), and
//! HTTPS probes, which the proxy cannot yet repeat (the pod gets a warning).

use k8s_openapi::api::core::v1::{Container, HTTPGetAction, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use portcullis_api::injection::PROXY_ADMIN_PORT;
use portcullis_api::injection::PortList;
use portcullis_api::injection::probes::{
    AppProbe, AppProbes, ProbeCheck, ProbeHeader, ProbeKind, health_path,
};

/// One probe to replace.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct RewrittenProbe {
    /// Index of the container in `spec.containers` as the API server sent it.
    pub container_index: usize,
    /// Which probe.
    pub kind: ProbeKind,
    /// The probe the container gets instead.
    pub probe: Probe,
}

/// The probes to replace, the originals the proxy must run, and warnings.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct ProbePlan {
    pub rewritten: Vec<RewrittenProbe>,
    pub originals: AppProbes,
    pub warnings: Vec<String>,
}

fn probe_of(container: &Container, kind: ProbeKind) -> Option<&Probe> {
    match kind {
        ProbeKind::Liveness => container.liveness_probe.as_ref(),
        ProbeKind::Readiness => container.readiness_probe.as_ref(),
        ProbeKind::Startup => container.startup_probe.as_ref(),
    }
}

/// A probe's port as a number: named ports come from the container's own ports.
fn port_number(container: &Container, port: &IntOrString) -> Option<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

fn redirected(port: u16, skipped: &PortList) -> bool {
    port != PROXY_ADMIN_PORT && !skipped.ranges().iter().any(|r| r.contains(port))
}

/// What the proxy must check for `probe`, or `None` when the probe stays as it is.
fn original(
    container: &Container,
    probe: &Probe,
    skipped: &PortList,
    warnings: &mut Vec<String>,
) -> Option<AppProbe> {
    let timeout_seconds = probe
        .timeout_seconds
        .and_then(|t| u32::try_from(t).ok())
        .unwrap_or(1);
    if let Some(http) = &probe.http_get {
        let port = port_number(container, &http.port)?;
        if http.host.is_some() || !redirected(port, skipped) {
            return None;
        }
        if http
            .scheme
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"))
        {
            warnings.push(format!(
                "portcullis: container {:?} has an HTTPS probe on port {port}, which reaches the proxy, not the app; \
                 probe over HTTP or list the port in portcullis.dev/skip-inbound-ports",
                container.name
            ));
            return None;
        }
        let headers = http
            .http_headers
            .iter()
            .flatten()
            .map(|h| ProbeHeader {
                name: h.name.clone(),
                value: h.value.clone(),
            })
            .collect();
        let path = http
            .path
            .clone()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/".into());
        return Some(AppProbe {
            port,
            check: ProbeCheck::Http { path, headers },
            timeout_seconds,
        });
    }
    let tcp = probe.tcp_socket.as_ref()?;
    let port = port_number(container, &tcp.port)?;
    if tcp.host.is_some() || !redirected(port, skipped) {
        return None;
    }
    Some(AppProbe {
        port,
        check: ProbeCheck::Tcp,
        timeout_seconds,
    })
}

/// The probes of `containers` (the pod's regular containers) that must go through the
/// proxy's admin port.
pub(crate) fn plan(containers: &[Container], skipped: &PortList) -> ProbePlan {
    let mut plan = ProbePlan::default();
    for (container_index, container) in containers.iter().enumerate() {
        for kind in ProbeKind::ALL {
            let Some(probe) = probe_of(container, kind) else {
                continue;
            };
            let Some(check) = original(container, probe, skipped, &mut plan.warnings) else {
                continue;
            };
            let path = health_path(&container.name, kind);
            let rewritten = Probe {
                http_get: Some(HTTPGetAction {
                    path: Some(path.clone()),
                    port: IntOrString::Int(i32::from(PROXY_ADMIN_PORT)),
                    scheme: Some("HTTP".into()),
                    ..HTTPGetAction::default()
                }),
                tcp_socket: None,
                ..probe.clone()
            };
            plan.originals.insert(path, check);
            plan.rewritten.push(RewrittenProbe {
                container_index,
                kind,
                probe: rewritten,
            });
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn container(value: serde_json::Value) -> Container {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn http_and_tcp_probes_on_app_ports_go_through_the_admin_port() {
        let app = container(json!({
            "name": "app",
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http",
                "httpHeaders": [{"name": "X-Probe", "value": "1"}]}, "periodSeconds": 2, "timeoutSeconds": 3},
            "livenessProbe": {"tcpSocket": {"port": 8080}, "failureThreshold": 5}
        }));
        let plan = plan(&[app], &PortList::default());
        assert_eq!(plan.rewritten.len(), 2);
        let readiness = &plan
            .rewritten
            .iter()
            .find(|r| r.kind == ProbeKind::Readiness)
            .unwrap()
            .probe;
        let http = readiness.http_get.as_ref().unwrap();
        assert_eq!(http.port, IntOrString::Int(4191));
        assert_eq!(http.path.as_deref(), Some("/app-health/app/readyz"));
        assert_eq!(readiness.period_seconds, Some(2), "timings are kept");
        let liveness = &plan
            .rewritten
            .iter()
            .find(|r| r.kind == ProbeKind::Liveness)
            .unwrap()
            .probe;
        assert!(liveness.tcp_socket.is_none());
        assert_eq!(liveness.failure_threshold, Some(5));
        assert_eq!(
            plan.originals["/app-health/app/readyz"],
            AppProbe {
                port: 8080,
                check: ProbeCheck::Http {
                    path: "/healthz".into(),
                    headers: vec![ProbeHeader {
                        name: "X-Probe".into(),
                        value: "1".into()
                    }]
                },
                timeout_seconds: 3
            }
        );
        assert_eq!(
            plan.originals["/app-health/app/livez"].check,
            ProbeCheck::Tcp
        );
    }

    #[test]
    fn probes_the_redirect_does_not_touch_stay_as_they_are() {
        let app = container(json!({
            "name": "app",
            "readinessProbe": {"httpGet": {"path": "/", "port": 9090}},
            "livenessProbe": {"exec": {"command": ["true"]}},
            "startupProbe": {"httpGet": {"path": "/app-health/app/startupz", "port": 4191}}
        }));
        let plan = plan(&[app], &"9090".parse().unwrap());
        assert!(plan.rewritten.is_empty(), "{plan:?}");
        assert!(plan.originals.is_empty());
    }

    #[test]
    fn https_probes_are_left_alone_with_a_warning() {
        let app = container(json!({
            "name": "app",
            "readinessProbe": {"httpGet": {"path": "/", "port": 8443, "scheme": "HTTPS"}}
        }));
        let plan = plan(&[app], &PortList::default());
        assert!(plan.rewritten.is_empty());
        assert!(
            plan.warnings[0].contains("HTTPS probe on port 8443"),
            "{:?}",
            plan.warnings
        );
    }
}
