//! envtest: a real etcd + kube-apiserver (+ kube-controller-manager) on loopback,
//! started from the binaries in `KUBEBUILDER_ASSETS` (the controller-runtime
//! convention; `eval "$(../shared/setup-tools.sh)"` or `setup-envtest use 1.20`).
//!
//! # Use
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! use portcullis_e2e::envtest;
//!
//! // One control plane per test binary, shared by its tests (startup costs seconds).
//! let Some(env) = envtest::shared().await? else { return Ok(()) }; // skipped: no assets
//! let ns = env.create_namespace("tokens").await?;                  // isolate the test
//! let admin = env.client()?;                                        // cluster-admin
//! let alice = env.client_for_user("alice", &["acme-devs"])?;        // RBAC applies
//! env.install_crds().await?;                                        // crds/*.yaml
//! # Ok(()) }
//! ```
//!
//! A test that needs its own control plane calls [`EnvTest::start`] (or
//! [`EnvTest::start_with`]); it is torn down when the value drops.
//!
//! # Public API
//!
//! - [`shared`]`() -> Result<Option<&'static EnvTest>>` — the per-binary instance.
//! - [`EnvTest::start`]`() -> Result<Option<EnvTest>>`, [`EnvTest::start_with`]`(StartOptions)`.
//!   `Ok(None)` means "skip": `KUBEBUILDER_ASSETS` is not set (the reason is printed).
//! - Clients: [`EnvTest::client`] (admin, `O=system:masters`),
//!   [`EnvTest::client_for_user`] (client certificate `CN=user`, `O=group`…, at most two
//!   groups), [`EnvTest::client_impersonating`] (admin impersonating any user/groups),
//!   [`EnvTest::admin_config`] (a `kube::Config` to adjust).
//! - Material: [`EnvTest::kubeconfig_path`] (admin kubeconfig for kubectl),
//!   [`EnvTest::kubeconfig_for_user`], [`EnvTest::server_url`],
//!   [`EnvTest::ca_cert_pem`] / [`EnvTest::ca_key_pem`] (the client CA, to mint your
//!   own certificates), [`EnvTest::issue_client_identity`], [`EnvTest::serving_ca_pem`]
//!   (the CA of the API server's self-generated serving certificate), [`EnvTest::dir`].
//! - [`EnvTest::has_controller_manager`]: namespaces then get a `default`
//!   ServiceAccount, garbage collection runs, namespace deletion completes.
//! - [`EnvTest::create_namespace`], [`EnvTest::install_crds`], [`crd_dir`].
//!
//! # The control plane
//!
//! kube-apiserver runs with the flags of `shared/envtest/start.sh`: RBAC authorization,
//! client-certificate users, a serving certificate it generates in `dir()/certs`, and
//! TokenRequest/TokenReview with issuer `https://kubernetes.default.svc` and audiences
//! [`API_AUDIENCES`] (so tokens for `portcullis.dev/identity` can be requested and
//! reviewed). The service-account signing key is ECDSA P-256.
//!
//! Children are stopped (SIGTERM, then SIGKILL) when the [`EnvTest`] drops, and — via
//! a pipe their supervisors watch — when the test process exits in any way, which is
//! what stops the never-dropped [`shared`] instance. Set `PORTCULLIS_ENVTEST_KEEP=1` to
//! keep the directory (logs, certificates, kubeconfig) after the run.

mod certs;
mod crds;
pub(crate) mod process;

use std::ffi::OsString;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};
use tempfile::TempDir;
use tokio::sync::OnceCell;

pub use certs::ClientIdentity;
use certs::Pki;
pub use crds::crd_dir;
use process::Supervised;

/// The environment variable naming the directory with `etcd` and `kube-apiserver`.
pub const ASSETS_ENV: &str = "KUBEBUILDER_ASSETS";
/// Set to keep the envtest directory after the run.
pub const KEEP_ENV: &str = "PORTCULLIS_ENVTEST_KEEP";
/// The service-account token issuer.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc";
/// The audiences the API server accepts in tokens (`--api-audiences`).
pub const API_AUDIENCES: &[&str] = &["https://kubernetes.default.svc", "portcullis.dev/identity"];
/// Field manager of the harness's server-side applies.
pub const FIELD_MANAGER: &str = "portcullis-e2e";

/// Bound on the whole API server startup (serving certificate, /readyz, `default` ns).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on the controller-manager creating the first `default` ServiceAccount.
const CONTROLLER_MANAGER_TIMEOUT: Duration = Duration::from_secs(30);
/// Startup is retried when a child exits early, e.g. because a port picked as free was
/// taken before the child bound it.
const START_ATTEMPTS: u32 = 3;
const LOG_TAIL_LINES: usize = 40;
const POLL: Duration = Duration::from_millis(200);

/// Errors of the harness; the variant names say which step failed.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// `KUBEBUILDER_ASSETS` is set but lacks a required binary.
    #[error("{ASSETS_ENV}={dir} has no {binary} binary", dir = .dir.display())]
    AssetMissing {
        /// The assets directory.
        dir: PathBuf,
        /// The missing binary.
        binary: &'static str,
    },
    /// A file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// rcgen could not make a key or certificate.
    #[error("generating certificates: {0}")]
    Certificate(#[from] rcgen::Error),
    /// A client certificate can carry at most two groups (see [`EnvTest::client_for_user`]).
    #[error(
        "user {user}: a client certificate carries at most two groups, got {count}; use client_impersonating"
    )]
    TooManyGroups {
        /// The user asked for.
        user: String,
        /// How many groups were asked for.
        count: usize,
    },
    /// A control-plane process exited while starting.
    #[error("{name} exited during startup ({status}); last log lines:\n{log_tail}")]
    ProcessExited {
        /// The binary.
        name: &'static str,
        /// Its exit status.
        status: String,
        /// The end of its log.
        log_tail: String,
    },
    /// A startup step did not finish in time.
    #[error(
        "{what} within {waited:?} (last error: {last_error}); last {log_name} log lines:\n{log_tail}"
    )]
    NotReady {
        /// The step that timed out.
        what: &'static str,
        /// How long the harness waited.
        waited: Duration,
        /// The last error seen while polling.
        last_error: String,
        /// Whose log is attached.
        log_name: &'static str,
        /// The end of that log.
        log_tail: String,
    },
    /// The kubeconfig could not be turned into a client configuration.
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    /// An API request failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A file in the CRD directory is not a CRD manifest.
    #[error("{path}: {message}", path = .path.display())]
    CrdManifest {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The API server refused a CRD.
    #[error("applying CRD {name} from {path}: {source}", path = .path.display())]
    CrdApply {
        /// The file.
        path: PathBuf,
        /// The CRD name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// A CRD was applied but never became Established.
    #[error("CRD {name} is not Established: {reason}")]
    CrdNotEstablished {
        /// The CRD name.
        name: String,
        /// Why the wait ended.
        reason: String,
    },
    /// The [`shared`] instance failed to start (once; later callers get this copy).
    #[error("the shared envtest failed to start: {0}")]
    SharedStartFailed(String),
}

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let context = context.into();
    move |source| HarnessError::Io { context, source }
}

/// How to start an [`EnvTest`].
#[derive(Clone, Debug)]
pub struct StartOptions {
    /// Start kube-controller-manager when its binary is present (default true).
    pub controller_manager: bool,
    /// Extra kube-apiserver flags, appended after the harness's own.
    pub extra_apiserver_args: Vec<String>,
}

impl Default for StartOptions {
    fn default() -> Self {
        Self {
            controller_manager: true,
            extra_apiserver_args: Vec::new(),
        }
    }
}

static SHARED: OnceCell<Result<Option<EnvTest>, String>> = OnceCell::const_new();

/// The control plane shared by every test of this test binary, started on first use.
///
/// `Ok(None)` (after printing why) when `KUBEBUILDER_ASSETS` is not set. It is never
/// dropped; its processes stop and its directory is removed when the test process
/// exits. Give each test its own namespace ([`EnvTest::create_namespace`]).
pub async fn shared() -> Result<Option<&'static EnvTest>, HarnessError> {
    if assets_dir().is_none() {
        print_skip_reason();
        return Ok(None);
    }
    let slot = SHARED
        .get_or_init(|| async { EnvTest::start().await.map_err(|e| e.to_string()) })
        .await;
    match slot {
        Ok(env) => Ok(env.as_ref()),
        Err(message) => Err(HarnessError::SharedStartFailed(message.clone())),
    }
}

fn assets_dir() -> Option<PathBuf> {
    std::env::var_os(ASSETS_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn print_skip_reason() {
    eprintln!(
        "skipping: {ASSETS_ENV} is not set; run eval \"$(../shared/setup-tools.sh)\" \
         or setup-envtest use 1.20 and export {ASSETS_ENV}"
    );
}

/// A running control plane. See the [module docs](self).
pub struct EnvTest {
    pki: Pki,
    server_url: String,
    kubeconfig: PathBuf,
    serving_ca_pem: String,
    admin_config: kube::Config,
    next_identity: AtomicU64,
    // Stopped in this order by `Drop`: dependants before etcd, etcd before the dir.
    controller_manager: Option<Supervised>,
    apiserver: Supervised,
    etcd: Supervised,
    dir_path: PathBuf,
    dir: Option<TempDir>,
    janitor: Option<process::Janitor>,
}

impl std::fmt::Debug for EnvTest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvTest")
            .field("server_url", &self.server_url)
            .field("dir", &self.dir_path)
            .field("controller_manager", &self.controller_manager.is_some())
            .finish_non_exhaustive()
    }
}

/// Paths of the files the harness writes, relative to the envtest directory.
struct Layout {
    root: PathBuf,
}

impl Layout {
    fn certs(&self) -> PathBuf {
        self.root.join("certs")
    }
    fn cert(&self, file: &str) -> PathBuf {
        self.certs().join(file)
    }
    fn pids(&self) -> PathBuf {
        self.root.join("pids")
    }
    fn log(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.log"))
    }
}

impl EnvTest {
    /// Starts a dedicated control plane with [`StartOptions::default`].
    /// `Ok(None)` (after printing why) when `KUBEBUILDER_ASSETS` is not set.
    pub async fn start() -> Result<Option<Self>, HarnessError> {
        Self::start_with(StartOptions::default()).await
    }

    /// Starts a dedicated control plane. `Ok(None)` (after printing why) when
    /// `KUBEBUILDER_ASSETS` is not set.
    pub async fn start_with(options: StartOptions) -> Result<Option<Self>, HarnessError> {
        let Some(assets) = assets_dir() else {
            print_skip_reason();
            return Ok(None);
        };
        for binary in ["etcd", "kube-apiserver"] {
            if !assets.join(binary).is_file() {
                return Err(HarnessError::AssetMissing {
                    dir: assets,
                    binary,
                });
            }
        }
        let mut attempt = 1;
        loop {
            match Self::start_once(&assets, &options).await {
                Err(e @ HarnessError::ProcessExited { .. }) if attempt < START_ATTEMPTS => {
                    eprintln!("envtest: start attempt {attempt} failed, retrying: {e}");
                    attempt += 1;
                }
                result => return result.map(Some),
            }
        }
    }

    async fn start_once(assets: &Path, options: &StartOptions) -> Result<Self, HarnessError> {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("portcullis-envtest-")
            .tempdir()
            .map_err(io_error("creating the envtest directory"))?;
        let layout = Layout {
            root: dir.path().to_path_buf(),
        };
        let keep = std::env::var_os(KEEP_ENV).is_some_and(|v| !v.is_empty());
        let janitor = if keep {
            None
        } else {
            Some(process::Janitor::spawn(&layout.root).map_err(io_error("starting the janitor"))?)
        };
        for sub in ["certs", "etcd", "users"] {
            std::fs::create_dir_all(layout.root.join(sub))
                .map_err(io_error(format!("creating {sub}/")))?;
        }

        let pki = Pki::generate()?;
        let admin = pki.client_identity("envtest-admin", &["system:masters"])?;
        write(&layout.cert("ca.crt"), pki.ca_cert_pem())?;
        write(&layout.cert("ca.key"), pki.ca_key_pem())?;
        write(&layout.cert("admin.crt"), &admin.cert_pem)?;
        write(&layout.cert("admin.key"), &admin.key_pem)?;
        write(&layout.cert("sa.key"), &pki.service_account_key_pem())?;
        write(&layout.cert("sa.pub"), &pki.service_account_public_pem())?;

        let [etcd_port, peer_port, api_port] = free_ports()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd = Supervised::spawn(
            "etcd",
            &assets.join("etcd"),
            &args(&[
                "--data-dir",
                &path_str(&layout.root.join("etcd")),
                "--listen-client-urls",
                &etcd_url,
                "--advertise-client-urls",
                &etcd_url,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &format!("default={peer_url}"),
                "--unsafe-no-fsync",
            ]),
            &layout.root,
            &layout.log("etcd"),
            &layout.pids(),
        )
        .map_err(io_error("starting etcd"))?;

        let audiences = API_AUDIENCES.join(",");
        let mut apiserver_args = args(&[
            "--etcd-servers",
            &etcd_url,
            "--bind-address",
            "127.0.0.1",
            "--advertise-address",
            "127.0.0.1",
            "--secure-port",
            &api_port.to_string(),
            "--cert-dir",
            &path_str(&layout.certs()),
            "--client-ca-file",
            &path_str(&layout.cert("ca.crt")),
            "--authorization-mode",
            "RBAC",
            "--allow-privileged=true",
            "--service-cluster-ip-range",
            "10.96.0.0/24",
            "--service-account-issuer",
            SERVICE_ACCOUNT_ISSUER,
            "--service-account-key-file",
            &path_str(&layout.cert("sa.pub")),
            "--service-account-signing-key-file",
            &path_str(&layout.cert("sa.key")),
            "--api-audiences",
            &audiences,
        ]);
        apiserver_args.extend(options.extra_apiserver_args.iter().map(OsString::from));
        let apiserver = Supervised::spawn(
            "kube-apiserver",
            &assets.join("kube-apiserver"),
            &apiserver_args,
            &layout.root,
            &layout.log("apiserver"),
            &layout.pids(),
        )
        .map_err(io_error("starting kube-apiserver"))?;

        let mut env = Self {
            pki,
            server_url: format!("https://127.0.0.1:{api_port}"),
            kubeconfig: layout.root.join("kubeconfig"),
            serving_ca_pem: String::new(),
            admin_config: kube::Config::new(http::Uri::from_static("https://127.0.0.1")),
            next_identity: AtomicU64::new(0),
            controller_manager: None,
            apiserver,
            etcd,
            dir_path: layout.root.clone(),
            dir: Some(dir),
            janitor,
        };
        let deadline = started + READY_TIMEOUT;
        env.serving_ca_pem = env.wait_for_serving_ca(&layout, deadline).await?;
        write(&layout.cert("serving-ca.crt"), &env.serving_ca_pem)?;
        write(
            &env.kubeconfig,
            &kubeconfig_yaml(
                &env.server_url,
                &layout.cert("serving-ca.crt"),
                "envtest-admin",
                &layout.cert("admin.crt"),
                &layout.cert("admin.key"),
            )?,
        )?;
        let kubeconfig = Kubeconfig::read_from(&env.kubeconfig)?;
        env.admin_config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        env.wait_until_ready(deadline).await?;

        let controller_manager = assets.join("kube-controller-manager");
        if options.controller_manager && controller_manager.is_file() {
            env.start_controller_manager(&controller_manager, &layout)
                .await?;
        }
        eprintln!(
            "envtest: {} ready in {:.1?} (dir {}, controller-manager: {})",
            env.server_url,
            started.elapsed(),
            layout.root.display(),
            env.has_controller_manager()
        );
        Ok(env)
    }

    /// Waits for the serving certificate kube-apiserver generates in `--cert-dir`
    /// (leaf followed by its self-signed CA) and returns the CA's PEM.
    async fn wait_for_serving_ca(
        &mut self,
        layout: &Layout,
        deadline: Instant,
    ) -> Result<String, HarnessError> {
        const END: &str = "-----END CERTIFICATE-----";
        let path = layout.cert("apiserver.crt");
        loop {
            self.check_running()?;
            if let Ok(chain) = std::fs::read_to_string(&path)
                && chain.matches(END).count() >= 2
                && let Some(begin) = chain.rfind("-----BEGIN CERTIFICATE-----")
            {
                return Ok(format!("{}\n", chain[begin..].trim_end()));
            }
            if Instant::now() >= deadline {
                return Err(self.not_ready(
                    "kube-apiserver wrote no serving certificate",
                    format!("{} missing or incomplete", path.display()),
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Polls `/readyz` until it answers `ok`, then waits for the `default` namespace
    /// (created by the API server shortly after it turns ready).
    async fn wait_until_ready(&mut self, deadline: Instant) -> Result<(), HarnessError> {
        let client = self.client()?;
        let mut last_error: String;
        loop {
            self.check_running()?;
            let request = http::Request::get("/readyz").body(Vec::new());
            match request {
                Ok(request) => {
                    match tokio::time::timeout(Duration::from_secs(5), client.request_text(request))
                        .await
                    {
                        Ok(Ok(body)) if body.trim() == "ok" => break,
                        Ok(Ok(body)) => last_error = body,
                        Ok(Err(e)) => last_error = e.to_string(),
                        Err(_) => last_error = "/readyz timed out".to_owned(),
                    }
                }
                Err(e) => last_error = e.to_string(),
            }
            if Instant::now() >= deadline {
                return Err(self.not_ready("kube-apiserver not ready", last_error));
            }
            tokio::time::sleep(POLL).await;
        }
        let namespaces: Api<Namespace> = Api::all(client);
        loop {
            match namespaces.get_opt("default").await {
                Ok(Some(_)) => return Ok(()),
                Ok(None) => last_error = "namespace default does not exist".to_owned(),
                Err(e) => last_error = e.to_string(),
            }
            if Instant::now() >= deadline {
                return Err(self.not_ready("namespace default not created", last_error));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn start_controller_manager(
        &mut self,
        binary: &Path,
        layout: &Layout,
    ) -> Result<(), HarnessError> {
        let process = Supervised::spawn(
            "kube-controller-manager",
            binary,
            &args(&[
                "--kubeconfig",
                &path_str(&self.kubeconfig),
                "--bind-address",
                "127.0.0.1",
                "--secure-port",
                "0",
                "--port",
                "0",
                "--leader-elect=false",
                "--use-service-account-credentials=false",
                "--service-account-private-key-file",
                &path_str(&layout.cert("sa.key")),
                // What pods get as ca.crt to verify the API server: its serving CA.
                "--root-ca-file",
                &path_str(&layout.cert("serving-ca.crt")),
                "--controllers",
                "*,-nodeipam,-nodelifecycle,-csrsigning,-cloud-node-lifecycle,-attachdetach,\
                 -persistentvolume-binder,-route,-service",
            ]),
            &layout.root,
            &layout.log("controller-manager"),
            &layout.pids(),
        )
        .map_err(io_error("starting kube-controller-manager"))?;
        self.controller_manager = Some(process);

        // The `default` ServiceAccount of namespace `default` proves its controllers run.
        let deadline = Instant::now() + CONTROLLER_MANAGER_TIMEOUT;
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client()?, "default");
        let mut last_error = String::from("no ServiceAccount default/default yet");
        loop {
            self.check_running()?;
            match accounts.get_opt("default").await {
                Ok(Some(_)) => return Ok(()),
                Ok(None) => {}
                Err(e) => last_error = e.to_string(),
            }
            if Instant::now() >= deadline {
                let log_tail = self
                    .controller_manager
                    .as_ref()
                    .map(|p| p.log_tail(LOG_TAIL_LINES))
                    .unwrap_or_default();
                return Err(HarnessError::NotReady {
                    what: "kube-controller-manager created no default ServiceAccount",
                    waited: CONTROLLER_MANAGER_TIMEOUT,
                    last_error,
                    log_name: "kube-controller-manager",
                    log_tail,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Fails with the log tail of the first child that has exited.
    fn check_running(&mut self) -> Result<(), HarnessError> {
        let children = [Some(&mut self.etcd), Some(&mut self.apiserver)]
            .into_iter()
            .chain([self.controller_manager.as_mut()])
            .flatten();
        for child in children {
            if let Some(status) = child.exited() {
                return Err(HarnessError::ProcessExited {
                    name: child.name(),
                    status: status.to_string(),
                    log_tail: child.log_tail(LOG_TAIL_LINES),
                });
            }
        }
        Ok(())
    }

    fn not_ready(&self, what: &'static str, last_error: String) -> HarnessError {
        HarnessError::NotReady {
            what,
            waited: READY_TIMEOUT,
            last_error,
            log_name: "kube-apiserver",
            log_tail: self.apiserver.log_tail(LOG_TAIL_LINES),
        }
    }

    /// A cluster-admin client (client certificate with `O=system:masters`).
    ///
    /// Each call builds a new client on the caller's tokio runtime, so clients never
    /// outlive the runtime of the test that uses them (tests of one binary run on
    /// different runtimes while sharing one [`EnvTest`]).
    pub fn client(&self) -> Result<kube::Client, HarnessError> {
        Ok(kube::Client::try_from(self.admin_config.clone())?)
    }

    /// The admin client configuration (e.g. to change timeouts or impersonate).
    pub fn admin_config(&self) -> kube::Config {
        self.admin_config.clone()
    }

    /// A client authenticated by a fresh client certificate with `CN=user` and one
    /// `O=` per group: an ordinary user, subject to RBAC (the API server adds
    /// `system:authenticated`). At most two groups; see [`Self::client_impersonating`].
    pub fn client_for_user(
        &self,
        user: &str,
        groups: &[&str],
    ) -> Result<kube::Client, HarnessError> {
        let (cert, key) = self.write_client_identity(user, groups)?;
        let mut config = self.admin_config.clone();
        config.auth_info = AuthInfo {
            client_certificate: Some(path_str(&cert)),
            client_key: Some(path_str(&key)),
            ..AuthInfo::default()
        };
        Ok(kube::Client::try_from(config)?)
    }

    /// The admin client impersonating `user` with `groups` (any number): RBAC and
    /// admission see the impersonated user.
    pub fn client_impersonating(
        &self,
        user: &str,
        groups: &[&str],
    ) -> Result<kube::Client, HarnessError> {
        let mut config = self.admin_config.clone();
        config.auth_info.impersonate = Some(user.to_owned());
        config.auth_info.impersonate_groups =
            (!groups.is_empty()).then(|| groups.iter().map(|g| (*g).to_owned()).collect());
        Ok(kube::Client::try_from(config)?)
    }

    /// Writes a kubeconfig for `user` (fresh client certificate, as
    /// [`Self::client_for_user`]) into [`Self::dir`] and returns its path, for kubectl.
    pub fn kubeconfig_for_user(
        &self,
        user: &str,
        groups: &[&str],
    ) -> Result<PathBuf, HarnessError> {
        let (cert, key) = self.write_client_identity(user, groups)?;
        let path = cert.with_extension("kubeconfig");
        let yaml = kubeconfig_yaml(
            &self.server_url,
            &self.dir_path.join("certs").join("serving-ca.crt"),
            user,
            &cert,
            &key,
        )?;
        write(&path, &yaml)?;
        Ok(path)
    }

    /// A new client certificate for `user`/`groups` signed by the client CA.
    pub fn issue_client_identity(
        &self,
        user: &str,
        groups: &[&str],
    ) -> Result<ClientIdentity, HarnessError> {
        self.pki.client_identity(user, groups)
    }

    fn write_client_identity(
        &self,
        user: &str,
        groups: &[&str],
    ) -> Result<(PathBuf, PathBuf), HarnessError> {
        let identity = self.pki.client_identity(user, groups)?;
        let seq = self.next_identity.fetch_add(1, Ordering::Relaxed);
        let safe: String = user
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let base = self.dir_path.join("users").join(format!("{seq:04}-{safe}"));
        let cert = base.with_extension("crt");
        let key = base.with_extension("key");
        write(&cert, &identity.cert_pem)?;
        write(&key, &identity.key_pem)?;
        Ok((cert, key))
    }

    /// Creates a namespace named `<prefix>-<random suffix>` and returns its name.
    pub async fn create_namespace(&self, prefix: &str) -> Result<String, HarnessError> {
        let namespaces: Api<Namespace> = Api::all(self.client()?);
        let namespace = Namespace {
            metadata: ObjectMeta {
                generate_name: Some(format!("{prefix}-")),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        let created = namespaces
            .create(&PostParams::default(), &namespace)
            .await?;
        let name = created.metadata.name.unwrap_or_default();
        if self.has_controller_manager() {
            self.wait_for_default_token(&name).await?;
        }
        Ok(name)
    }

    /// Waits until the controller-manager has given namespace `ns` its `default`
    /// ServiceAccount with a token Secret: until then the 1.20 ServiceAccount admission
    /// plugin refuses every pod there ("No API token found").
    async fn wait_for_default_token(&self, ns: &str) -> Result<(), HarnessError> {
        let deadline = Instant::now() + CONTROLLER_MANAGER_TIMEOUT;
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client()?, ns);
        let mut last_error = format!("no token Secret for {ns}/default yet");
        loop {
            match accounts.get_opt("default").await {
                Ok(Some(sa)) if sa.secrets.as_ref().is_some_and(|s| !s.is_empty()) => return Ok(()),
                Ok(_) => {}
                Err(e) => last_error = e.to_string(),
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::NotReady {
                    what: "kube-controller-manager gave the namespace no default ServiceAccount token",
                    waited: CONTROLLER_MANAGER_TIMEOUT,
                    last_error,
                    log_name: "kube-controller-manager",
                    log_tail: self
                        .controller_manager
                        .as_ref()
                        .map(|p| p.log_tail(LOG_TAIL_LINES))
                        .unwrap_or_default(),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The path of the admin kubeconfig (`KUBECONFIG=... kubectl ...` works).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// PEM of the CA the API server trusts for client certificates.
    pub fn ca_cert_pem(&self) -> &str {
        self.pki.ca_cert_pem()
    }

    /// PKCS#8 PEM of that CA's private key (ECDSA P-256).
    pub fn ca_key_pem(&self) -> &str {
        self.pki.ca_key_pem()
    }

    /// PEM of the CA of the API server's self-generated serving certificate (the
    /// certificate's SANs include 127.0.0.1 and kubernetes.default.svc).
    pub fn serving_ca_pem(&self) -> &str {
        &self.serving_ca_pem
    }

    /// True when kube-controller-manager runs (it was found and started).
    pub fn has_controller_manager(&self) -> bool {
        self.controller_manager.is_some()
    }

    /// The envtest directory: `certs/`, `kubeconfig`, `*.log`, `pids`, `users/`.
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }
}

impl Drop for EnvTest {
    fn drop(&mut self) {
        if let Some(cm) = self.controller_manager.as_mut() {
            cm.begin_stop();
        }
        self.apiserver.begin_stop();
        if let Some(cm) = self.controller_manager.as_mut() {
            cm.stop();
        }
        self.apiserver.stop();
        self.etcd.stop();
        if let Some(dir) = self.dir.take() {
            if std::env::var_os(KEEP_ENV).is_some_and(|v| !v.is_empty()) {
                eprintln!("envtest: keeping {}", dir.keep().display());
            } else {
                drop(dir);
            }
        }
        self.janitor = None;
    }
}

fn write(path: &Path, contents: &str) -> Result<(), HarnessError> {
    std::fs::write(path, contents).map_err(io_error(format!("writing {}", path.display())))
}

fn path_str(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn args(list: &[&str]) -> Vec<OsString> {
    list.iter().map(OsString::from).collect()
}

/// N distinct free loopback ports (held together while picking, so never equal).
fn free_ports<const N: usize>() -> Result<[u16; N], HarnessError> {
    let mut listeners = Vec::with_capacity(N);
    let mut ports = [0u16; N];
    for port in &mut ports {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(io_error("picking a free port"))?;
        *port = listener
            .local_addr()
            .map_err(io_error("picking a free port"))?
            .port();
        listeners.push(listener);
    }
    Ok(ports)
}

fn kubeconfig_yaml(
    server: &str,
    ca_file: &Path,
    user: &str,
    cert: &Path,
    key: &Path,
) -> Result<String, HarnessError> {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "envtest", "cluster": {
            "server": server,
            "certificate-authority": path_str(ca_file),
        }}],
        "users": [{"name": user, "user": {
            "client-certificate": path_str(cert),
            "client-key": path_str(key),
        }}],
        "contexts": [{"name": "envtest", "context": {"cluster": "envtest", "user": user}}],
        "current-context": "envtest",
    });
    serde_yaml::to_string(&config).map_err(|e| HarnessError::Io {
        context: "serializing a kubeconfig".to_owned(),
        source: std::io::Error::other(e),
    })
}
