#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};

use super::*;
use crate::check::report::Status;

const NOW: &str = "2026-03-01T12:00:00Z";
const LOGS: &str = "kubectl -n ps logs deploy/portcullis-operator";

fn now() -> Timestamp {
    NOW.parse().unwrap()
}

/// `minutes` before [`NOW`], as the API server writes it.
fn ago(minutes: i64) -> String {
    (now() - SignedDuration::from_mins(minutes)).to_string()
}

fn running(name: &str, ready: bool) -> Value {
    json!({"name": name, "ready": ready, "restartCount": 0, "image": "x", "imageID": "",
        "state": {"running": {"startedAt": ago(10)}}})
}

fn waiting(name: &str, reason: &str, message: &str) -> Value {
    json!({"name": name, "ready": false, "restartCount": 3, "image": "x", "imageID": "",
        "state": {"waiting": {"reason": reason, "message": message}}})
}

fn terminated(name: &str, minutes_ago: i64) -> Value {
    json!({"name": name, "ready": false, "restartCount": 0, "image": "x", "imageID": "",
        "state": {"terminated": {"exitCode": 0, "reason": "Completed", "finishedAt": ago(minutes_ago)}}})
}

/// An injected pod (proxy as a regular container) created 10 minutes ago, Ready or not
/// since `since_minutes`, with these container statuses.
fn pod(name: &str, ready: bool, since_minutes: i64, containers: Vec<Value>) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "acme", "uid": format!("uid-{name}"),
            "creationTimestamp": ago(10), "labels": {"portcullis.dev/injected": "true"}},
        "spec": {"containers": [{"name": "portcullis-proxy"}, {"name": "app"}]},
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" },
                "lastTransitionTime": ago(since_minutes)}],
            "containerStatuses": containers
        }
    }))
    .unwrap()
}

fn with(mut pod: Pod, patch: Value) -> Pod {
    let mut value = serde_json::to_value(&pod).unwrap();
    merge(&mut value, patch);
    pod = serde_json::from_value(value).unwrap();
    pod
}

fn merge(into: &mut Value, patch: Value) {
    match (into, patch) {
        (Value::Object(into), Value::Object(patch)) => {
            for (k, v) in patch {
                merge(into.entry(k).or_insert(Value::Null), v);
            }
        }
        (into, patch) => *into = patch,
    }
}

fn unhealthy(pod: &str, container: &str, minutes_ago: i64, message: &str) -> Event {
    serde_json::from_value(json!({
        "metadata": {"name": format!("{pod}.{minutes_ago}"), "namespace": "acme"},
        "involvedObject": {"kind": "Pod", "name": pod, "uid": format!("uid-{pod}"),
            "fieldPath": format!("spec.containers{{{container}}}")},
        "reason": "Unhealthy", "message": message, "type": "Warning",
        "lastTimestamp": ago(minutes_ago)
    }))
    .unwrap()
}

fn verdict(pods: Vec<(Pod, Vec<Event>)>) -> CheckResult {
    judge(&pods, now(), LOGS)
}

#[test]
fn a_ready_pod_gives_no_line() {
    let healthy = pod(
        "api-0",
        true,
        9,
        vec![running("portcullis-proxy", true), running("app", true)],
    );
    assert_eq!(diagnose(&healthy, &[]), None);
    assert!(!needs_events(&healthy));
    let result = verdict(vec![(healthy, Vec::new())]);
    assert_eq!(
        (result.status, result.message.as_str()),
        (Status::Pass, "1 injected pod(s) Ready")
    );
    assert!(result.details.is_empty());
}

#[test]
fn a_proxy_without_certificate_or_policy_is_named() {
    // Regular-container mode: the app is held back until the proxy is ready.
    let stuck = pod(
        "api-0",
        false,
        6,
        vec![
            running("portcullis-proxy", false),
            waiting("app", "ContainerCreating", ""),
        ],
    );
    let events = vec![unhealthy(
        "api-0",
        "portcullis-proxy",
        1,
        "Readiness probe failed: HTTP probe failed with statuscode: 503",
    )];
    let found = diagnose(&stuck, &events).unwrap();
    assert_eq!(
        found.cause,
        Cause::ProxyNotReady {
            probe: Some("HTTP probe failed with statuscode: 503".into())
        }
    );
    let result = verdict(vec![(stuck, events)]);
    assert_eq!(result.status, Status::Fail, "{result:?}");
    assert_eq!(
        result.message,
        "1 of 1 injected pod(s) not Ready for over 2m"
    );
    assert_eq!(
        result.details,
        [
            "acme/api-0 (6m): proxy not ready: it has no certificate or no policy yet \
          (HTTP probe failed with statuscode: 503) → kubectl -n acme logs api-0 -c portcullis-proxy, \
          then the operator that issues both: kubectl -n ps logs deploy/portcullis-operator"
        ]
    );
}

#[test]
fn a_failing_app_probe_is_quoted_from_the_latest_event() {
    let stuck = pod(
        "api-0",
        false,
        6,
        vec![running("portcullis-proxy", true), running("app", false)],
    );
    let events = vec![
        unhealthy(
            "api-0",
            "app",
            5,
            "Readiness probe failed: connection refused",
        ),
        unhealthy(
            "api-0",
            "app",
            1,
            "Readiness probe failed: HTTP probe failed with statuscode: 500",
        ),
        unhealthy("api-0", "portcullis-proxy", 0, "Liveness probe failed: x"),
    ];
    let found = diagnose(&stuck, &events).unwrap();
    assert_eq!(
        found.cause,
        Cause::AppProbeFailing {
            container: "app".into(),
            kind: Some(ProbeKind::Readiness),
            message: Some("HTTP probe failed with statuscode: 500".into()),
        }
    );
    let line = found.line(now(), LOGS);
    assert!(
        line.starts_with(
            "acme/api-0 (6m): container app fails its readiness probe: \"HTTP probe failed with statuscode: 500\" → "
        ),
        "{line}"
    );
    assert!(
        line.ends_with("kubectl -n acme logs api-0 -c app"),
        "{line}"
    );
    // Events of an earlier pod of the same name do not count.
    let other_uid = with(stuck, json!({"metadata": {"uid": "uid-before"}}));
    assert_eq!(
        diagnose(&other_uid, &events).unwrap().cause,
        Cause::AppProbeFailing {
            container: "app".into(),
            kind: None,
            message: None
        }
    );
}

#[test]
fn a_job_whose_app_finished_while_the_proxy_runs_cannot_complete() {
    let job = |finished_minutes_ago: i64, env: Value| {
        with(
            pod(
                "migrate-x1",
                false,
                4,
                vec![
                    running("portcullis-proxy", true),
                    terminated("app", finished_minutes_ago),
                ],
            ),
            json!({"spec": {"restartPolicy": "Never",
                "containers": [{"name": "portcullis-proxy", "env": env}, {"name": "app"}]}}),
        )
    };
    let watched = json!([
        {"name": "PORTCULLIS_EXIT_WHEN_APP_EXITS", "value": "true"},
        {"name": "PORTCULLIS_APP_PORT", "value": "8080"}
    ]);
    let stuck = job(5, watched.clone());
    let found = diagnose(&stuck, &[]).unwrap();
    assert_eq!(
        found.cause,
        Cause::ProxyOutlivesApp(ExitWatch::AppPort("8080".into()))
    );
    assert!(found.is_stuck(now()));
    let line = found.line(now(), LOGS);
    assert!(
        line.starts_with(
            "acme/migrate-x1 (5m): the app finished but the proxy still runs; the Job cannot complete → the operator tells the proxy once the app has exited, and the proxy also leaves when app port 8080 stops accepting"
        ),
        "{line}"
    );
    assert_eq!(verdict(vec![(stuck, Vec::new())]).status, Status::Fail);

    let portless = job(
        5,
        json!([{"name": "PORTCULLIS_EXIT_WHEN_APP_EXITS", "value": "true"}]),
    );
    let found = diagnose(&portless, &[]).unwrap();
    assert_eq!(found.cause, Cause::ProxyOutlivesApp(ExitWatch::NoAppPort));
    assert!(
        found
            .line(now(), LOGS)
            .contains("declares no app port, so only the operator can tell the proxy")
    );
    assert_eq!(
        diagnose(&job(5, json!([])), &[]).unwrap().cause,
        Cause::ProxyOutlivesApp(ExitWatch::NotAsked)
    );

    // The proxy gets a few seconds to notice: counted from when the app finished.
    let just_finished = job(1, watched);
    assert_eq!(
        verdict(vec![(just_finished, Vec::new())]).status,
        Status::Warn
    );

    // A long-running pod whose app exited is restarted by the kubelet, not a Job case.
    let deployment = pod(
        "api-0",
        false,
        6,
        vec![running("portcullis-proxy", true), terminated("app", 5)],
    );
    assert!(matches!(
        diagnose(&deployment, &[]).unwrap().cause,
        Cause::Unknown { .. }
    ));
}

#[test]
fn waiting_containers_are_named_with_their_reason() {
    let crashing = pod(
        "api-0",
        false,
        6,
        vec![
            running("portcullis-proxy", true),
            waiting(
                "app",
                "CrashLoopBackOff",
                "back-off 5m0s restarting failed container",
            ),
        ],
    );
    let found = diagnose(&crashing, &[]).unwrap();
    assert!(matches!(
        &found.cause,
        Cause::ContainerWaiting { container, kind: WaitKind::CrashLoop, .. } if container == "app"
    ));
    assert_eq!(
        found.line(now(), LOGS),
        "acme/api-0 (6m): container app: CrashLoopBackOff: back-off 5m0s restarting failed container \
         → kubectl -n acme logs api-0 -c app --previous"
    );
    let no_image = pod(
        "api-1",
        false,
        6,
        vec![
            waiting(
                "portcullis-proxy",
                "ImagePullBackOff",
                "Back-off pulling image",
            ),
            waiting("app", "ContainerCreating", ""),
        ],
    );
    let found = diagnose(&no_image, &[]).unwrap();
    assert!(matches!(
        &found.cause,
        Cause::ContainerWaiting { container, kind: WaitKind::ImagePull, .. } if container == "portcullis-proxy"
    ));
    assert!(
        found
            .line(now(), LOGS)
            .contains("check the image name and the pull secret")
    );
}

#[test]
fn an_unknown_cause_quotes_the_failing_condition() {
    let unschedulable: Pod = serde_json::from_value(json!({
        "metadata": {"name": "api-2", "namespace": "acme", "creationTimestamp": ago(6)},
        "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
            "reason": "Unschedulable", "message": "0/3 nodes are available: 3 Insufficient cpu.",
            "lastTransitionTime": ago(6)}]}
    }))
    .unwrap();
    let found = diagnose(&unschedulable, &[]).unwrap();
    assert_eq!(
        found.line(now(), LOGS),
        "acme/api-2 (6m): PodScheduled: Unschedulable: 0/3 nodes are available: 3 Insufficient cpu. \
         → kubectl -n acme describe pod api-2"
    );
    assert!(found.is_stuck(now()));
}

#[test]
fn starting_pods_are_a_warning_and_finished_pods_nothing() {
    let starting = || {
        with(
            pod(
                "api-3",
                false,
                0,
                vec![
                    running("portcullis-proxy", false),
                    waiting("app", "ContainerCreating", ""),
                ],
            ),
            json!({"metadata": {"creationTimestamp": (now() - SignedDuration::from_secs(30)).to_string()}}),
        )
    };
    let result = verdict(vec![(starting(), Vec::new())]);
    assert_eq!(result.status, Status::Warn, "{result:?}");
    assert_eq!(
        result.message,
        "1 of 1 injected pod(s) starting (not Ready for under 2m)"
    );
    assert!(
        result.details[0].starts_with("acme/api-3 (0s): proxy not ready"),
        "{result:?}"
    );
    for phase in ["Succeeded", "Failed"] {
        let done = with(starting(), json!({"status": {"phase": phase}}));
        assert_eq!(diagnose(&done, &[]), None, "{phase}");
    }
    let done = with(starting(), json!({"status": {"phase": "Succeeded"}}));
    let stuck = pod("api-4", false, 6, vec![running("portcullis-proxy", false)]);
    let result = verdict(vec![
        (starting(), Vec::new()),
        (stuck, Vec::new()),
        (done, Vec::new()),
    ]);
    assert_eq!(result.status, Status::Fail);
    assert_eq!(
        result.message,
        "1 of 2 injected pod(s) not Ready for over 2m, 1 more starting"
    );
    assert!(
        result.details[0].starts_with("acme/api-4"),
        "stuck first: {result:?}"
    );
}

#[test]
fn many_stuck_pods_are_bounded() {
    let pods = (0..13)
        .map(|i| {
            (
                pod(
                    &format!("api-{i}"),
                    false,
                    6,
                    vec![running("portcullis-proxy", false)],
                ),
                Vec::new(),
            )
        })
        .collect();
    let result = verdict(pods);
    assert_eq!(result.details.len(), 11);
    assert_eq!(result.details[10], "and 3 more");
}
