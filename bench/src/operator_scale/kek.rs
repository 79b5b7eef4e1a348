//! The KEK provider an operator under measurement runs with (`--kek-providers`): the
//! embedded Secret, a SoftHSM token through PKCS#11, or the KMS v2 test plugin on a
//! Unix socket. Each setup lives as long as its [`KekSetup`].

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use portcullis_e2e::softhsm;

/// A KEK provider of the operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Provider {
    /// The Secret `portcullis-kek` (the embedded default).
    Secret,
    /// A key in a SoftHSM token (`softhsm2` package), through PKCS#11.
    Pkcs11,
    /// The KMS v2 test plugin (`portcullis-kms-test-plugin`, next to the operator binary).
    Kms,
}

impl Provider {
    /// The name `--kek-provider` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Secret => "secret",
            Self::Pkcs11 => "pkcs11",
            Self::Kms => "kms",
        }
    }
}

const TOKEN: &str = "portcullis-bench";
const KEY_LABEL: &str = "portcullis-kek";
const PIN: &str = "bench-pin-4711";

/// A provider ready for an operator: its flags and environment, and what keeps it up.
pub struct KekSetup {
    /// `run` flags with their values.
    pub args: Vec<(String, String)>,
    /// Environment variables of the operator.
    pub env: Vec<(String, String)>,
    plugin: Option<Child>,
}

impl Drop for KekSetup {
    fn drop(&mut self) {
        if let Some(mut plugin) = self.plugin.take() {
            let _ = plugin.kill();
            let _ = plugin.wait();
        }
    }
}

/// Prepares `provider` in `dir` for the operator `binary`.
pub fn prepare(provider: Provider, binary: &Path, dir: &Path) -> anyhow::Result<KekSetup> {
    std::fs::create_dir_all(dir)?;
    let mut args = vec![("--kek-provider".to_owned(), provider.name().to_owned())];
    let mut env = Vec::new();
    let mut plugin = None;
    match provider {
        Provider::Secret => {}
        Provider::Pkcs11 => {
            let module = softhsm::module().context(
                "libsofthsm2.so not found: apt-get install softhsm2 to measure the pkcs11 provider",
            )?;
            let conf = softhsm_token(dir)?;
            let pin = dir.join("pin");
            std::fs::write(&pin, PIN)?;
            let module = module.display().to_string();
            let pkcs11 = [
                ("--pkcs11-module", module),
                ("--pkcs11-token-label", TOKEN.to_owned()),
                ("--pkcs11-key-label", KEY_LABEL.to_owned()),
                ("--pkcs11-pin-file", pin.display().to_string()),
            ];
            let created = Command::new(binary)
                .arg("pkcs11-create-key")
                .args(pkcs11.iter().flat_map(|(f, v)| [*f, v.as_str()]))
                .env("SOFTHSM2_CONF", &conf)
                .output()
                .context("running portcullis-operator pkcs11-create-key")?;
            anyhow::ensure!(
                created.status.success(),
                "pkcs11-create-key: {}",
                String::from_utf8_lossy(&created.stderr)
            );
            args.extend(pkcs11.map(|(f, v)| (f.to_owned(), v)));
            env.push(("SOFTHSM2_CONF".to_owned(), conf.display().to_string()));
        }
        Provider::Kms => {
            let bin = binary.with_file_name("portcullis-kms-test-plugin");
            anyhow::ensure!(
                bin.is_file(),
                "{} not found: cargo build --release -p portcullis-operator --features kms-test-plugin --bin portcullis-kms-test-plugin",
                bin.display()
            );
            let socket = dir.join("kms.sock");
            let log = std::fs::File::create(dir.join("kms-plugin.log"))?;
            let child = Command::new(&bin)
                .arg("--socket")
                .arg(&socket)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            plugin = Some(child);
            let deadline = Instant::now() + Duration::from_secs(10);
            while !socket.exists() {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "the KMS test plugin did not open {} within 10 s",
                    socket.display()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            args.push(("--kms-socket".to_owned(), socket.display().to_string()));
        }
    }
    Ok(KekSetup { args, env, plugin })
}

/// A fresh SoftHSM token directory in `dir` with one initialised token; returns the
/// `SOFTHSM2_CONF` file.
fn softhsm_token(dir: &Path) -> anyhow::Result<PathBuf> {
    let conf = softhsm::write_conf(dir)?;
    let out = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", TOKEN])
        .args(["--pin", PIN, "--so-pin", "bench-so-pin-0815"])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .context("running softhsm2-util (apt-get install softhsm2)")?;
    anyhow::ensure!(
        out.status.success(),
        "softhsm2-util --init-token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(conf)
}
