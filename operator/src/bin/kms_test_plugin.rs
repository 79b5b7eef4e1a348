//! `portcullis-kms-test-plugin`: the KMS v2 test plugin as a process, for the node tier
//! (the operator's tests start it in process). AES-256-GCM under a key that lives and
//! dies with the process (or is given in hex): never for production.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use portcullis_operator::envelope::kms::test_plugin::TestKmsPlugin;

/// A KMS v2 plugin for tests, on a Unix socket.
#[derive(Parser, Debug)]
struct Args {
    /// The Unix socket to listen on (replaced if stale).
    #[arg(long, default_value = "/var/run/kmsplugin/socket.sock")]
    socket: PathBuf,
    /// The key id the plugin reports.
    #[arg(long, default_value = "test-key-1")]
    key_id: String,
    /// A file holding the 32-byte AES key in hex (else a random key per process).
    #[arg(long)]
    key_file: Option<PathBuf>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().init();
    let args = Args::parse();
    let mut plugin = match &args.key_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let key: [u8; 32] = hex::decode(text.trim())
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
                .with_context(|| format!("{} must hold 64 hex digits", path.display()))?;
            TestKmsPlugin::with_key(&args.socket, &args.key_id, key)
        }
        None => TestKmsPlugin::new(&args.socket, &args.key_id),
    };
    plugin.start().await?;
    // The operator runs as another user (65532) and connecting needs write access.
    std::fs::set_permissions(&args.socket, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("opening {} to other users", args.socket.display()))?;
    tracing::info!(socket = %args.socket.display(), key_id = %args.key_id, "KMS test plugin listening");
    tokio::signal::ctrl_c()
        .await
        .context("waiting for a signal")?;
    plugin.stop().await;
    Ok(())
}
