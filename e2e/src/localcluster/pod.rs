//! Running one admitted Pod as processes: its volumes become directories, its
//! containers become processes inside the pod's network namespace, in kubelet order.
//!
//! What is translated: `projected` service-account tokens (through the real
//! TokenRequest API, bound to the Pod), `configMap`, `secret` and `emptyDir` volumes;
//! env values and `fieldRef`s; `runAsUser`; init containers (run to completion, or kept
//! running when `restartPolicy: Always`); `postStart` exec hooks, which hold back the
//! next container as the kubelet does. Commands are looked up in the cluster's bin
//! directory, so images are names only. Anything else is ignored, not emulated.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
        core::v1::{ConfigMap, Container, Pod, Secret, ServiceAccount, Volume},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;

use super::{LocalClusterError, network::PodNetns};
use crate::envtest::process::{Supervised, log_tail};

/// How long an init container or postStart hook may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// A pod running as processes. Dropping it stops the processes (SIGTERM, then SIGKILL)
/// and removes its network namespace.
pub struct RunningPod {
    /// `namespace/name`.
    pub key: String,
    // Field order is drop order: processes before the namespace they live in.
    processes: Vec<Supervised>,
    netns: PodNetns,
    dir: PathBuf,
    path_env: OsString,
}

impl RunningPod {
    /// The pod's IP address.
    pub fn ip(&self) -> std::net::Ipv4Addr {
        self.netns.address()
    }

    /// The network namespace, for commands run "inside the pod".
    pub fn netns(&self) -> &str {
        self.netns.name()
    }

    /// The last lines a container wrote.
    pub fn logs(&self, container: &str, lines: usize) -> String {
        log_tail(&self.dir.join(format!("{container}.log")), lines)
    }

    /// Host directory backing a volume.
    pub fn volume_dir(&self, volume: &str) -> PathBuf {
        self.dir.join("volumes").join(volume)
    }

    /// Runs `program args` in the pod's network namespace as `uid` and returns its output.
    pub async fn exec(
        &self,
        uid: u32,
        program: &str,
        args: &[&str],
    ) -> Result<std::process::Output, LocalClusterError> {
        let mut command = tokio::process::Command::new("ip");
        command.args(["netns", "exec", self.netns.name()]);
        if uid != 0 {
            command.args([
                "setpriv",
                "--reuid",
                &uid.to_string(),
                "--regid",
                &uid.to_string(),
                "--clear-groups",
            ]);
        }
        command
            .arg(program)
            .args(args)
            .env("PATH", &self.path_env)
            .kill_on_drop(true);
        let output = tokio::time::timeout(STEP_TIMEOUT, command.output())
            .await
            .map_err(|_| LocalClusterError::Timeout(format!("exec {program} in {}", self.key)))??;
        Ok(output)
    }
}

/// Everything needed to start a pod.
pub(crate) struct PodStart<'a> {
    pub client: kube::Client,
    pub pod: Pod,
    pub netns: Option<PodNetns>,
    pub dir: PathBuf,
    pub bin_dir: &'a Path,
}

impl PodStart<'_> {
    /// Materialises volumes, runs init containers, starts containers and marks the pod
    /// Running with its IP.
    pub(crate) async fn run(mut self) -> Result<RunningPod, LocalClusterError> {
        let ns = self.pod.metadata.namespace.clone().unwrap_or_default();
        let name = self.pod.metadata.name.clone().unwrap_or_default();
        let key = format!("{ns}/{name}");
        let spec = self
            .pod
            .spec
            .clone()
            .ok_or_else(|| LocalClusterError::Unsupported(format!("pod {key} has no spec")))?;
        fs::create_dir_all(&self.dir)?;
        let path_env = OsString::from(format!(
            "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            self.bin_dir.display()
        ));
        let mut pod = RunningPod {
            key: key.clone(),
            processes: Vec::new(),
            netns: self.netns.take().ok_or_else(|| {
                LocalClusterError::Unsupported(format!("pod {key} was already started"))
            })?,
            dir: self.dir.clone(),
            path_env,
        };
        let volumes = self
            .materialise_volumes(&spec.volumes.clone().unwrap_or_default(), &ns)
            .await?;
        let pod_uid_default = spec.security_context.as_ref().and_then(|s| s.run_as_user);
        let fields = FieldValues {
            name: name.clone(),
            namespace: ns.clone(),
            service_account: spec
                .service_account_name
                .clone()
                .unwrap_or_else(|| "default".into()),
            pod_ip: pod.ip().to_string(),
        };

        for container in spec.init_containers.iter().flatten() {
            let plan = ProcessPlan::new(container, &volumes, &fields, pod_uid_default)?;
            let native_sidecar = container.restart_policy.as_deref() == Some("Always");
            if native_sidecar {
                pod.processes.push(plan.spawn(&pod, &container.name)?);
                self.wait_post_start(&pod, container, &volumes, &fields)
                    .await?;
            } else {
                let output = plan.run_to_completion(&pod).await.map_err(|e| {
                    LocalClusterError::InitFailed {
                        pod: key.clone(),
                        container: container.name.clone(),
                        output: e.to_string(),
                    }
                })?;
                fs::write(
                    pod.dir.join(format!("{}.log", container.name)),
                    [&output.stdout[..], &output.stderr[..]].concat(),
                )?;
                if !output.status.success() {
                    return Err(LocalClusterError::InitFailed {
                        pod: key,
                        container: container.name.clone(),
                        output: String::from_utf8_lossy(&output.stderr).into_owned(),
                    });
                }
            }
        }
        for container in &spec.containers {
            let plan = ProcessPlan::new(container, &volumes, &fields, pod_uid_default)?;
            pod.processes.push(plan.spawn(&pod, &container.name)?);
            self.wait_post_start(&pod, container, &volumes, &fields)
                .await?;
        }

        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let status = json!({"status": {"phase": "Running", "podIP": pod.ip().to_string(),
            "podIPs": [{"ip": pod.ip().to_string()}], "hostIP": "127.0.0.1"}});
        pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        Ok(pod)
    }

    /// Runs a container's `postStart` exec hook, if any, until it succeeds.
    async fn wait_post_start(
        &self,
        pod: &RunningPod,
        container: &Container,
        volumes: &BTreeMap<String, PathBuf>,
        fields: &FieldValues,
    ) -> Result<(), LocalClusterError> {
        let Some(command) = container
            .lifecycle
            .as_ref()
            .and_then(|l| l.post_start.as_ref())
            .and_then(|h| h.exec.as_ref())
            .and_then(|e| e.command.clone())
        else {
            return Ok(());
        };
        let Some((program, args)) = command.split_first() else {
            return Ok(());
        };
        let args: Vec<String> = args
            .iter()
            .map(|a| fields.rewrite(a, volumes, container))
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let started = Instant::now();
        let output = pod.exec(0, program, &args).await?;
        if output.status.success() {
            return Ok(());
        }
        Err(LocalClusterError::InitFailed {
            pod: pod.key.clone(),
            container: format!("{} postStart after {:?}", container.name, started.elapsed()),
            output: format!(
                "{}\n--- container log ---\n{}",
                String::from_utf8_lossy(&output.stderr),
                pod.logs(&container.name, 30)
            ),
        })
    }

    /// Writes each volume into a directory and returns volume name → directory.
    async fn materialise_volumes(
        &self,
        volumes: &[Volume],
        ns: &str,
    ) -> Result<BTreeMap<String, PathBuf>, LocalClusterError> {
        let mut dirs = BTreeMap::new();
        for volume in volumes {
            let dir = self.dir.join("volumes").join(&volume.name);
            fs::create_dir_all(&dir)?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o777))?;
            if let Some(projected) = &volume.projected {
                for source in projected.sources.iter().flatten() {
                    if let Some(token) = &source.service_account_token {
                        let jwt = self
                            .request_token(ns, token.audience.clone(), token.expiration_seconds)
                            .await?;
                        write_file(&dir.join(&token.path), jwt.as_bytes())?;
                    }
                    if let Some(cm) = &source.config_map {
                        self.write_config_map(ns, &cm.name, cm.items.as_deref(), &dir)
                            .await?;
                    }
                }
            } else if let Some(cm) = &volume.config_map {
                self.write_config_map(ns, &cm.name, cm.items.as_deref(), &dir)
                    .await?;
            } else if let Some(secret) = &volume.secret {
                let name = secret.secret_name.clone().unwrap_or_default();
                let secret: Secret = Api::namespaced(self.client.clone(), ns).get(&name).await?;
                for (key, value) in secret.data.unwrap_or_default() {
                    write_file(&dir.join(key), &value.0)?;
                }
            }
            dirs.insert(volume.name.clone(), dir);
        }
        Ok(dirs)
    }

    async fn write_config_map(
        &self,
        ns: &str,
        name: &str,
        items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
        dir: &Path,
    ) -> Result<(), LocalClusterError> {
        let cm: ConfigMap = Api::namespaced(self.client.clone(), ns).get(name).await?;
        let data = cm.data.unwrap_or_default();
        match items {
            Some(items) => {
                for item in items {
                    if let Some(value) = data.get(&item.key) {
                        write_file(&dir.join(&item.path), value.as_bytes())?;
                    }
                }
            }
            None => {
                for (key, value) in data {
                    write_file(&dir.join(key), value.as_bytes())?;
                }
            }
        }
        Ok(())
    }

    /// A projected token from the real TokenRequest API, bound to this Pod.
    async fn request_token(
        &self,
        ns: &str,
        audience: Option<String>,
        expiration: Option<i64>,
    ) -> Result<String, LocalClusterError> {
        let spec = self.pod.spec.as_ref();
        let sa = spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let request = TokenRequest {
            metadata: ObjectMeta::default(),
            spec: TokenRequestSpec {
                audiences: audience.into_iter().collect(),
                // The API server refuses less than ten minutes.
                expiration_seconds: Some(expiration.unwrap_or(3600).max(600)),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: self.pod.metadata.name.clone(),
                    uid: self.pod.metadata.uid.clone(),
                }),
            },
            status: None,
        };
        let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
        let response = sas
            .create_token_request(&sa, &PostParams::default(), &request)
            .await?;
        response.status.map(|s| s.token).ok_or_else(|| {
            LocalClusterError::Unsupported(format!("TokenRequest for {ns}/{sa} returned no token"))
        })
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), LocalClusterError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(path, bytes)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))?;
    Ok(())
}

/// Values of the downward-API fields the runner supports.
struct FieldValues {
    name: String,
    namespace: String,
    service_account: String,
    pod_ip: String,
}

impl FieldValues {
    fn get(&self, path: &str) -> Option<&str> {
        Some(match path {
            "metadata.name" => &self.name,
            "metadata.namespace" => &self.namespace,
            "spec.serviceAccountName" => &self.service_account,
            "status.podIP" => &self.pod_ip,
            _ => return None,
        })
    }

    /// Rewrites container paths under a volume mount to the host directory behind it.
    fn rewrite(
        &self,
        value: &str,
        volumes: &BTreeMap<String, PathBuf>,
        container: &Container,
    ) -> String {
        let mut mounts: Vec<_> = container.volume_mounts.iter().flatten().collect();
        // Longest mount path first so nested mounts win.
        mounts.sort_by_key(|m| std::cmp::Reverse(m.mount_path.len()));
        for mount in mounts {
            if let Some(rest) = value.strip_prefix(&mount.mount_path)
                && (rest.is_empty() || rest.starts_with('/'))
                && let Some(dir) = volumes.get(&mount.name)
            {
                let dir = match &mount.sub_path {
                    Some(sub) if !sub.is_empty() => dir.join(sub),
                    _ => dir.clone(),
                };
                return format!("{}{rest}", dir.display());
            }
        }
        value.to_owned()
    }
}

/// A container turned into a command line.
struct ProcessPlan {
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    uid: u32,
}

impl ProcessPlan {
    fn new(
        container: &Container,
        volumes: &BTreeMap<String, PathBuf>,
        fields: &FieldValues,
        pod_uid: Option<i64>,
    ) -> Result<Self, LocalClusterError> {
        let mut words: Vec<String> = container.command.clone().unwrap_or_default();
        words.extend(container.args.clone().unwrap_or_default());
        let Some((program, args)) = words.split_first() else {
            return Err(LocalClusterError::Unsupported(format!(
                "container {} has no command: the local cluster runs commands, not image entrypoints",
                container.name
            )));
        };
        let mut env = Vec::new();
        for var in container.env.iter().flatten() {
            let value = match (&var.value, &var.value_from) {
                (Some(v), _) => fields.rewrite(v, volumes, container),
                (None, Some(from)) => match from
                    .field_ref
                    .as_ref()
                    .and_then(|f| fields.get(&f.field_path))
                {
                    Some(v) => v.to_owned(),
                    None => continue,
                },
                (None, None) => String::new(),
            };
            env.push((var.name.clone(), value));
        }
        let uid = container
            .security_context
            .as_ref()
            .and_then(|s| s.run_as_user)
            .or(pod_uid)
            .unwrap_or(0);
        Ok(Self {
            program: program.clone(),
            args: args
                .iter()
                .map(|a| fields.rewrite(a, volumes, container))
                .collect(),
            env,
            uid: u32::try_from(uid).unwrap_or(0),
        })
    }

    /// `ip` arguments that run the container in the pod's namespace with exactly its
    /// environment, as its user.
    fn ip_args(&self, pod: &RunningPod) -> Vec<OsString> {
        let mut args: Vec<OsString> = ["netns", "exec", pod.netns(), "env", "-i"]
            .iter()
            .map(OsString::from)
            .collect();
        let mut path = OsString::from("PATH=");
        path.push(&pod.path_env);
        args.push(path);
        args.push("HOME=/tmp".into());
        for (k, v) in &self.env {
            args.push(format!("{k}={v}").into());
        }
        if self.uid != 0 {
            let uid = self.uid.to_string();
            for a in [
                "setpriv",
                "--reuid",
                &uid,
                "--regid",
                &uid,
                "--clear-groups",
            ] {
                args.push(a.into());
            }
        }
        args.push(self.program.clone().into());
        args.extend(self.args.iter().map(OsString::from));
        args
    }

    /// Runs an init container to completion (bounded).
    async fn run_to_completion(
        &self,
        pod: &RunningPod,
    ) -> Result<std::process::Output, LocalClusterError> {
        let mut command = tokio::process::Command::new("ip");
        command.args(self.ip_args(pod)).kill_on_drop(true);
        tokio::time::timeout(STEP_TIMEOUT, command.output())
            .await
            .map_err(|_| LocalClusterError::Timeout(format!("{} in {}", self.program, pod.key)))?
            .map_err(LocalClusterError::from)
    }

    /// Starts the container as a supervised process in the pod's namespace.
    fn spawn(&self, pod: &RunningPod, container: &str) -> Result<Supervised, LocalClusterError> {
        let args = self.ip_args(pod);
        let log = pod.dir.join(format!("{container}.log"));
        let pids = pod.dir.join("pids");
        Ok(Supervised::spawn(
            "pod-container",
            Path::new("ip"),
            &args,
            &pod.dir,
            &log,
            &pids,
        )?)
    }
}
