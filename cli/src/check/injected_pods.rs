//! Injected pods that are not Ready, and why: pure verdicts from a Pod's status and
//! its Events, one line per pod with what to do.
//!
//! A pod that is merely starting is not a failure: the kubelet pulls images and the
//! proxy fetches its certificate and policy first, so `check` right after an install
//! or a rollout stays green. Only a pod not Ready for longer than [`GRACE`] fails.

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::{ContainerStatus, Event, Pod};
use kube::ResourceExt;
use portcullis_api::injection::probes::ProbeKind;

use super::probes::pod_ready;
use super::report::{CheckResult, bounded};
use crate::identity::PROXY_CONTAINER;
use crate::output::short_duration;

/// How long a pod may be not Ready (since its creation or its last Ready transition,
/// or since its app finished) before it counts as stuck.
pub const GRACE: SignedDuration = SignedDuration::from_mins(2);
/// The Event reason the kubelet gives failed probes.
pub const UNHEALTHY: &str = "Unhealthy";

/// Why a container is waiting, as far as the fix differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitKind {
    /// `CrashLoopBackOff`: it starts and exits.
    CrashLoop,
    /// `ImagePullBackOff`, `ErrImagePull`, `InvalidImageName`.
    ImagePull,
    /// `CreateContainerConfigError`: a Secret, ConfigMap or key it names is missing.
    Config,
    /// Anything else (`RunContainerError`, ...).
    Other,
}

impl WaitKind {
    /// None for the reasons of a container that is simply being started.
    fn of(reason: &str) -> Option<Self> {
        match reason {
            "ContainerCreating" | "PodInitializing" => None,
            "CrashLoopBackOff" => Some(Self::CrashLoop),
            "ImagePullBackOff" | "ErrImagePull" | "InvalidImageName" => Some(Self::ImagePull),
            "CreateContainerConfigError" => Some(Self::Config),
            _ => Some(Self::Other),
        }
    }
}

/// How the proxy of a run-to-completion pod learns that the app has finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitWatch {
    /// A native sidecar: the kubelet stops it once the app containers have exited.
    Kubelet,
    /// Told by the operator, or by watching this app port
    /// (`PORTCULLIS_EXIT_WHEN_APP_EXITS` with an app port).
    AppPort(String),
    /// Told by the operator only: the pod declares no app port to watch.
    NoAppPort,
    /// Not told to exit with the app (injected as a long-running pod).
    NotAsked,
}

/// Why an injected pod is not Ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// The proxy runs but is not ready: it has no certificate or no policy yet.
    ProxyNotReady {
        /// The latest failed-probe message of the proxy, if any.
        probe: Option<String>,
    },
    /// An app container runs but fails its probe (which the proxy answers on the app's
    /// behalf at `:4191/app-health/<container>/<kind>`).
    AppProbeFailing {
        /// The container.
        container: String,
        /// Which probe, from the latest `Unhealthy` Event.
        kind: Option<ProbeKind>,
        /// What the probe said, from the same Event.
        message: Option<String>,
    },
    /// A run-to-completion pod whose app containers have all exited while the proxy
    /// still runs: the Job cannot complete.
    ProxyOutlivesApp(ExitWatch),
    /// A container waits to (re)start.
    ContainerWaiting {
        /// The container (the proxy, the init step or an app container).
        container: String,
        /// What kind of wait.
        kind: WaitKind,
        /// The kubelet's reason (`CrashLoopBackOff`).
        reason: String,
        /// The kubelet's message, if any.
        message: Option<String>,
    },
    /// Not Ready for no reason recognised here: the first condition that is not True.
    Unknown {
        /// `Ready: ContainersNotReady: containers with unready status: [app]`.
        condition: Option<String>,
    },
}

/// An injected pod that is not Ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotReady {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Why.
    pub cause: Cause,
    /// Since when (its creation, its last Ready transition, or when its app finished).
    pub since: Option<Timestamp>,
}

fn parse_time(
    t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
) -> Option<Timestamp> {
    t.map(|t| t.0)
}

fn is_run_to_completion(pod: &Pod) -> bool {
    matches!(
        pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()),
        Some("Never" | "OnFailure")
    )
}

fn is_running(status: &ContainerStatus) -> bool {
    status.state.as_ref().is_some_and(|s| s.running.is_some())
}

/// How the proxy of `pod` would notice its app leaving (from the injected spec).
fn exit_watch(pod: &Pod) -> ExitWatch {
    let Some(spec) = pod.spec.as_ref() else {
        return ExitWatch::NotAsked;
    };
    if spec
        .init_containers
        .iter()
        .flatten()
        .any(|c| c.name == PROXY_CONTAINER)
    {
        return ExitWatch::Kubelet;
    }
    let env: Vec<(&str, Option<&str>)> = spec
        .containers
        .iter()
        .filter(|c| c.name == PROXY_CONTAINER)
        .flat_map(|c| c.env.iter().flatten())
        .map(|e| (e.name.as_str(), e.value.as_deref()))
        .collect();
    let value = |name: &str| env.iter().find(|(n, _)| *n == name).and_then(|(_, v)| *v);
    match (
        value(portcullis_api::injection::env::EXIT_WHEN_APP_EXITS),
        value(portcullis_api::injection::env::APP_PORT),
    ) {
        (Some("true"), Some(port)) => ExitWatch::AppPort(port.to_owned()),
        (Some("true"), None) => ExitWatch::NoAppPort,
        _ => ExitWatch::NotAsked,
    }
}

/// `spec.containers{app}` → `app`.
fn event_container(event: &Event) -> Option<&str> {
    let path = event.involved_object.field_path.as_deref()?;
    let (_, rest) = path.split_once('{')?;
    rest.strip_suffix('}')
}

fn event_time(event: &Event) -> Option<Timestamp> {
    parse_time(event.last_timestamp.as_ref())
        .or_else(|| event.event_time.as_ref().map(|t| t.0))
        .or_else(|| parse_time(event.metadata.creation_timestamp.as_ref()))
}

/// The latest failed probe of `container`: its kind and message
/// (`Readiness probe failed: HTTP probe failed with statuscode: 503`).
fn latest_probe_failure(
    pod: &Pod,
    events: &[Event],
    container: &str,
) -> Option<(Option<ProbeKind>, String)> {
    let uid = pod.uid();
    let event = events
        .iter()
        .filter(|e| e.reason.as_deref() == Some(UNHEALTHY))
        .filter(|e| event_container(e) == Some(container))
        .filter(|e| match (&uid, &e.involved_object.uid) {
            (Some(pod), Some(event)) => pod == event,
            _ => true,
        })
        .max_by_key(|e| event_time(e))?;
    let message = event.message.clone().unwrap_or_default();
    let kind = [
        (ProbeKind::Readiness, "Readiness probe failed:"),
        (ProbeKind::Liveness, "Liveness probe failed:"),
        (ProbeKind::Startup, "Startup probe failed:"),
    ]
    .into_iter()
    .find_map(|(kind, prefix)| message.strip_prefix(prefix).map(|rest| (kind, rest)));
    Some(match kind {
        Some((kind, rest)) => (Some(kind), rest.trim().to_owned()),
        None => (None, message),
    })
}

/// The first condition that is not True, in the order a pod goes through them.
fn failing_condition(pod: &Pod) -> Option<String> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    ["PodScheduled", "Initialized", "ContainersReady", "Ready"]
        .iter()
        .find_map(|t| {
            conditions
                .iter()
                .find(|c| c.type_ == *t && c.status != "True")
        })
        .map(|c| {
            [
                Some(c.type_.as_str()),
                c.reason.as_deref(),
                c.message.as_deref(),
            ]
            .into_iter()
            .flatten()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(": ")
        })
}

/// Since when the pod is not Ready: its Ready condition's last transition, else its
/// creation.
fn not_ready_since(pod: &Pod) -> Option<Timestamp> {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .and_then(|c| parse_time(c.last_transition_time.as_ref()))
        .or_else(|| parse_time(pod.metadata.creation_timestamp.as_ref()))
}

/// Whether the pod is done or going: neither is "not Ready".
fn is_finished(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
        || pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Succeeded" || p == "Failed")
}

/// Whether [`diagnose`] may need the pod's Events (so the caller reads them only then).
pub fn needs_events(pod: &Pod) -> bool {
    !is_finished(pod) && !pod_ready(pod)
}

/// What is wrong with an injected pod, None when nothing is.
pub fn diagnose(pod: &Pod, events: &[Event]) -> Option<NotReady> {
    if is_finished(pod) {
        return None;
    }
    let status = pod.status.clone().unwrap_or_default();
    let inits = status.init_container_statuses.unwrap_or_default();
    let containers = status.container_statuses.unwrap_or_default();
    let proxy = inits
        .iter()
        .chain(&containers)
        .find(|c| c.name == PROXY_CONTAINER);
    let apps: Vec<&ContainerStatus> = containers
        .iter()
        .filter(|c| c.name != PROXY_CONTAINER)
        .collect();
    let found = |cause, since| {
        Some(NotReady {
            namespace: pod.namespace().unwrap_or_default(),
            name: pod.name_any(),
            cause,
            since,
        })
    };

    let finished_at = |c: &&ContainerStatus| {
        c.state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .map(|t| parse_time(t.finished_at.as_ref()))
    };
    if is_run_to_completion(pod)
        && !apps.is_empty()
        && proxy.is_some_and(is_running)
        && apps.iter().all(|c| finished_at(c).is_some())
    {
        let last = apps.iter().filter_map(|c| finished_at(c).flatten()).max();
        return found(Cause::ProxyOutlivesApp(exit_watch(pod)), last);
    }
    if pod_ready(pod) {
        return None;
    }
    let since = not_ready_since(pod);
    for container in inits.iter().chain(&containers) {
        let Some(waiting) = container.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
            continue;
        };
        let reason = waiting.reason.clone().unwrap_or_default();
        if let Some(kind) = WaitKind::of(&reason) {
            let cause = Cause::ContainerWaiting {
                container: container.name.clone(),
                kind,
                reason,
                message: waiting.message.clone().filter(|m| !m.is_empty()),
            };
            return found(cause, since);
        }
    }
    if let Some(proxy) = proxy.filter(|p| is_running(p) && !p.ready) {
        let probe = latest_probe_failure(pod, events, &proxy.name).map(|(_, m)| m);
        return found(Cause::ProxyNotReady { probe }, since);
    }
    if let Some(app) = apps.iter().find(|c| is_running(c) && !c.ready) {
        let (kind, message) = match latest_probe_failure(pod, events, &app.name) {
            Some((kind, message)) => (kind, Some(message)),
            None => (None, None),
        };
        let cause = Cause::AppProbeFailing {
            container: app.name.clone(),
            kind,
            message,
        };
        return found(cause, since);
    }
    found(
        Cause::Unknown {
            condition: failing_condition(pod),
        },
        since,
    )
}

impl NotReady {
    /// Whether it has been so for longer than [`GRACE`] (unknown age counts as long).
    pub fn is_stuck(&self, now: Timestamp) -> bool {
        self.since.is_none_or(|t| now.duration_since(t) >= GRACE)
    }

    /// `acme/api-0 (6m): <what> → <what to do>`.
    pub fn line(&self, now: Timestamp, operator_logs: &str) -> String {
        let (ns, pod) = (&self.namespace, &self.name);
        let describe = format!("kubectl -n {ns} describe pod {pod}");
        let logs = |c: &str| format!("kubectl -n {ns} logs {pod} -c {c}");
        let (what, fix) = match &self.cause {
            Cause::ProxyNotReady { probe } => (
                format!(
                    "proxy not ready: it has no certificate or no policy yet{}",
                    probe
                        .as_ref()
                        .map(|m| format!(" ({m})"))
                        .unwrap_or_default()
                ),
                format!(
                    "{}, then the operator that issues both: {operator_logs}",
                    logs(PROXY_CONTAINER)
                ),
            ),
            Cause::AppProbeFailing {
                container,
                kind,
                message,
            } => {
                let probe = kind.map_or("probe", probe_name);
                let what = match message {
                    Some(m) => format!("container {container} fails its {probe}: {m:?}"),
                    None => format!("container {container} is running but not ready"),
                };
                (
                    what,
                    format!(
                        "the proxy runs the app's own probe on 127.0.0.1 and reports its answer, so look at the app: {}",
                        logs(container)
                    ),
                )
            }
            Cause::ProxyOutlivesApp(watch) => (
                "the app finished but the proxy still runs; the Job cannot complete".to_owned(),
                match watch {
                    ExitWatch::AppPort(port) => format!(
                        "the operator tells the proxy once the app has exited, and the proxy also leaves \
                         when app port {port} stops accepting: is the operator running (the Operator line \
                         above)? then {}",
                        logs(PROXY_CONTAINER)
                    ),
                    ExitWatch::NoAppPort => format!(
                        "the pod declares no app port, so only the operator can tell the proxy the app \
                         has exited: is the operator running (the Operator line above)? then {}",
                        logs(PROXY_CONTAINER)
                    ),
                    ExitWatch::NotAsked => format!(
                        "the proxy was not injected as part of a run-to-completion pod, so it does not \
                         watch the app; recreate the pod (the injector sets it up for Jobs): {describe}"
                    ),
                    ExitWatch::Kubelet => format!(
                        "the proxy is a native sidecar, which the kubelet stops once the app has exited: {describe}"
                    ),
                },
            ),
            Cause::ContainerWaiting {
                container,
                kind,
                reason,
                message,
            } => (
                format!(
                    "container {container}: {reason}{}",
                    message
                        .as_ref()
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default()
                ),
                match kind {
                    WaitKind::CrashLoop => format!("{} --previous", logs(container)),
                    WaitKind::ImagePull => {
                        format!("check the image name and the pull secret: {describe}")
                    }
                    WaitKind::Config => {
                        format!("create the Secret, ConfigMap or key the message names: {describe}")
                    }
                    WaitKind::Other => describe.clone(),
                },
            ),
            Cause::Unknown { condition } => (
                condition
                    .clone()
                    .unwrap_or_else(|| "not Ready, no condition reported".to_owned()),
                describe.clone(),
            ),
        };
        let age = self
            .since
            .map(|t| format!(" ({})", short_duration(now.duration_since(t))))
            .unwrap_or_default();
        format!("{ns}/{pod}{age}: {what} → {fix}")
    }
}

fn probe_name(kind: ProbeKind) -> &'static str {
    match kind {
        ProbeKind::Readiness => "readiness probe",
        ProbeKind::Liveness => "liveness probe",
        ProbeKind::Startup => "startup probe",
    }
}

/// The injected pods, each with its Events (read where [`needs_events`] said so):
/// Ready, starting (a warning) or stuck (a failure), one line per pod not Ready.
pub fn judge(pods: &[(Pod, Vec<Event>)], now: Timestamp, operator_logs: &str) -> CheckResult {
    const CHECK: &str = "Injected pods";
    let live = pods.iter().filter(|(p, _)| !is_finished(p)).count();
    let not_ready: Vec<NotReady> = pods.iter().filter_map(|(p, e)| diagnose(p, e)).collect();
    let (stuck, starting): (Vec<&NotReady>, Vec<&NotReady>) =
        not_ready.iter().partition(|p| p.is_stuck(now));
    let lines = stuck
        .iter()
        .chain(&starting)
        .map(|p| p.line(now, operator_logs))
        .collect();
    if !stuck.is_empty() {
        let starting_note = if starting.is_empty() {
            String::new()
        } else {
            format!(", {} more starting", starting.len())
        };
        CheckResult::fail(
            CHECK,
            format!(
                "{} of {live} injected pod(s) not Ready for over {}m{starting_note}",
                stuck.len(),
                GRACE.as_mins()
            ),
        )
        .details(bounded(lines))
    } else if !starting.is_empty() {
        CheckResult::warn(
            CHECK,
            format!(
                "{} of {live} injected pod(s) starting (not Ready for under {}m)",
                starting.len(),
                GRACE.as_mins()
            ),
        )
        .details(bounded(lines))
    } else {
        CheckResult::pass(CHECK, format!("{live} injected pod(s) Ready"))
    }
}

#[cfg(test)]
#[path = "injected_pods_tests.rs"]
mod tests;
