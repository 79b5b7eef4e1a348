//! Why the KMS KEK cannot be used, each with what to check. Never carries key material
//! (neither the intermediate key nor its KMS ciphertext).

use std::path::PathBuf;
use std::time::Duration;

/// Why talking to the KMS plugin, or loading the KEK through it, failed.
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    /// Nothing listens at `--kms-socket` (yet).
    #[error(
        "no KMS plugin socket at {}: check that the KMS v2 plugin runs on this node and listens there \
         (--kms-socket; chart: kek.kms.socket, whose directory is mounted from the host)",
        socket.display()
    )]
    SocketMissing {
        /// The socket path.
        socket: PathBuf,
    },
    /// The socket exists but the plugin does not answer.
    #[error(
        "the KMS plugin on {} is unreachable ({reason}): check that the plugin process is running and serving gRPC on this socket",
        socket.display()
    )]
    Unreachable {
        /// The socket path.
        socket: PathBuf,
        /// What the connection said.
        reason: String,
    },
    /// The plugin did not answer within `--kms-timeout`.
    #[error(
        "the KMS plugin on {} did not answer {operation} within {} (--kms-timeout): check the plugin's logs and its KMS",
        socket.display(), humantime::format_duration(*after)
    )]
    Timeout {
        /// The socket path.
        socket: PathBuf,
        /// `Status`, `Encrypt` or `Decrypt`.
        operation: &'static str,
        /// The timeout.
        after: Duration,
    },
    /// `Status` answered, with a healthz other than `ok`.
    #[error(
        "the KMS plugin on {} reports itself unhealthy (healthz {healthz:?}): check the plugin's logs and its access to the KMS",
        socket.display()
    )]
    Unhealthy {
        /// The socket path.
        socket: PathBuf,
        /// What the plugin said.
        healthz: String,
    },
    /// The plugin speaks another API version.
    #[error(
        "the KMS plugin on {} speaks API version {version:?}; Portcullis needs a KMS v2 plugin (version \"v2\")",
        socket.display()
    )]
    Version {
        /// The socket path.
        socket: PathBuf,
        /// What the plugin said.
        version: String,
    },
    /// The plugin answered the call with an error.
    #[error("the KMS plugin on {} refused {operation} ({code}: {message})", socket.display())]
    Refused {
        /// The socket path.
        socket: PathBuf,
        /// `Status`, `Encrypt` or `Decrypt`.
        operation: &'static str,
        /// The gRPC status code.
        code: String,
        /// The plugin's message.
        message: String,
    },
    /// The plugin could not decrypt the intermediate key kept in the KEK Secret.
    #[error(
        "the KMS plugin on {} cannot decrypt the key-encryption key in Secret {secret} (KMS key id {key_id:?}; {why}): \
         the plugin's KMS key is not the one that encrypted it (another key, another KMS, or the key was deleted). \
         Point the plugin at that key again; a new KEK would leave every wrapped key unreadable",
        socket.display()
    )]
    DecryptRefused {
        /// The socket path.
        socket: PathBuf,
        /// `namespace/name` of the KEK Secret.
        secret: String,
        /// The KMS key id recorded in the Secret.
        key_id: String,
        /// What the plugin said.
        why: String,
    },
    /// The KEK Secret exists but is not a usable kms KEK.
    #[error("KEK Secret {secret}: {why}")]
    InvalidSecret {
        /// `namespace/name`.
        secret: String,
        /// What is wrong, and the fix.
        why: String,
    },
    /// The Kubernetes API failed.
    #[error("KEK Secret {secret}: {source}")]
    Kube {
        /// `namespace/name`.
        secret: String,
        /// The API error.
        source: kube::Error,
    },
}

impl KmsError {
    /// Whether waiting may help: the plugin is down, starting or slow. A plugin that
    /// refuses or a Secret that is wrong stays so.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::SocketMissing { .. }
                | Self::Unreachable { .. }
                | Self::Timeout { .. }
                | Self::Unhealthy { .. }
        )
    }
}
