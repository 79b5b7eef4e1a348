//! Tells the proxy of a run-to-completion pod when its app has exited for good
//! (contract: [`portcullis_api::app_exit`]).
//!
//! Every replica caches the injected pods whose `restartPolicy` is not `Always` (label
//! and field selectors keep the cache to Jobs and bare pods) and holds each proxy's
//! request until the pod's app containers have all terminated for good, or for the
//! hold time. Native sidecars never ask: the kubelet stops them.

use std::sync::Arc;

use futures::StreamExt;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use portcullis_api::app_exit::AppExitAnswer;
use portcullis_crds::annotations::INJECTED_LABEL;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::webhook::inject::PROXY_CONTAINER;

/// Whether every app container of `pod` has exited for good: terminated, and, under
/// `restartPolicy: OnFailure`, with exit code 0 (otherwise the kubelet restarts it).
/// `None` while one may still run, and always for `restartPolicy: Always`.
pub fn apps_exited(pod: &Pod) -> Option<AppExitAnswer> {
    let spec = pod.spec.as_ref()?;
    let on_failure = match spec.restart_policy.as_deref() {
        Some("Never") => false,
        Some("OnFailure") => true,
        _ => return None,
    };
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_deref())
        .unwrap_or_default();
    let mut exit_codes = Vec::new();
    for container in spec.containers.iter().filter(|c| c.name != PROXY_CONTAINER) {
        let terminated = statuses
            .iter()
            .find(|s| s.name == container.name)
            .and_then(|s| s.state.as_ref())
            .and_then(|state| state.terminated.as_ref())?;
        if on_failure && terminated.exit_code != 0 {
            return None;
        }
        exit_codes.push((container.name.clone(), terminated.exit_code));
    }
    (!exit_codes.is_empty()).then_some(AppExitAnswer {
        apps_exited: true,
        exit_codes,
    })
}

/// The cache of run-to-completion injected pods and a signal on every change.
#[derive(Clone)]
pub struct AppExits {
    pods: Store<Pod>,
    changes: Arc<watch::Sender<()>>,
}

impl std::fmt::Debug for AppExits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppExits")
            .field("pods", &self.pods.len())
            .finish()
    }
}

impl AppExits {
    /// Starts the cache (all namespaces).
    pub fn start(client: &Client, shutdown: &CancellationToken) -> (Self, JoinHandle<()>) {
        let (pods, writer) = reflector::store();
        let changes = Arc::new(watch::Sender::new(()));
        let config = watcher::Config::default()
            .labels(&format!("{INJECTED_LABEL}=true"))
            .fields("spec.restartPolicy!=Always");
        let events = watcher::watcher(Api::<Pod>::all(client.clone()), config);
        let task = {
            let changes = changes.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                reflector::reflector(writer, events.default_backoff())
                    .take_until(shutdown.cancelled_owned())
                    .for_each(|event| {
                        match event {
                            Ok(_) => {
                                changes.send_replace(());
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "watch of run-to-completion pods failed; retrying")
                            }
                        }
                        futures::future::ready(())
                    })
                    .await;
            })
        };
        (Self { pods, changes }, task)
    }

    /// A cache holding `pods` and never changing (tests and demos).
    pub fn fixed(pods: impl IntoIterator<Item = Pod>) -> Self {
        let (store, mut writer) = reflector::store();
        for pod in pods {
            writer.apply_watcher_event(&watcher::Event::Apply(pod));
        }
        Self {
            pods: store,
            changes: Arc::new(watch::Sender::new(())),
        }
    }

    /// The answer for `namespace/name`, waiting up to `hold` for the app to exit.
    pub async fn answer(
        &self,
        namespace: &str,
        name: &str,
        hold: Duration,
        shutdown: &CancellationToken,
    ) -> AppExitAnswer {
        let key = ObjectRef::new(name).within(namespace);
        let mut changes = self.changes.subscribe();
        let deadline = tokio::time::Instant::now() + hold;
        loop {
            if let Some(answer) = self.pods.get(&key).and_then(|pod| apps_exited(&pod)) {
                return answer;
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                () = tokio::time::sleep_until(deadline) => break,
                () = shutdown.cancelled() => break,
            }
        }
        AppExitAnswer::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(restart: &str, app: serde_json::Value) -> Pod {
        let parsed = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "report", "namespace": "batch"},
            "spec": {
                "restartPolicy": restart,
                "containers": [{"name": "report"}, {"name": PROXY_CONTAINER}],
            },
            "status": {"containerStatuses": [
                {"name": "report", "image": "", "imageID": "", "ready": false,
                 "restartCount": 0, "state": app},
                {"name": PROXY_CONTAINER, "image": "", "imageID": "", "ready": true,
                 "restartCount": 0, "state": {"running": {}}},
            ]},
        }));
        parsed.unwrap_or_default()
    }

    fn terminated(code: i32) -> serde_json::Value {
        serde_json::json!({"terminated": {"exitCode": code}})
    }

    #[test]
    fn a_job_app_that_finished_lets_the_proxy_go() {
        let answer = apps_exited(&pod("Never", terminated(0)));
        assert_eq!(
            answer.map(|a| a.exit_codes),
            Some(vec![("report".to_owned(), 0)])
        );
        // Under Never a failure is final too: the Job counts it and the pod must end.
        assert!(apps_exited(&pod("Never", terminated(3))).is_some());
    }

    #[test]
    fn the_proxy_stays_while_the_app_runs_or_will_be_restarted() {
        assert_eq!(
            apps_exited(&pod("Never", serde_json::json!({"running": {}}))),
            None
        );
        assert_eq!(apps_exited(&pod("OnFailure", terminated(1))), None);
        assert!(apps_exited(&pod("OnFailure", terminated(0))).is_some());
        assert_eq!(apps_exited(&pod("Always", terminated(0))), None);
        let mut no_status = pod("Never", terminated(0));
        no_status.status = None;
        assert_eq!(apps_exited(&no_status), None);
    }
}
