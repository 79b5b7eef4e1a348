//! A KMS v2 client on a Unix socket: tonic's `Grpc` with the prost codec over a channel
//! whose connector dials the socket. The channel connects lazily and reconnects after
//! a plugin restart; every call has its own timeout.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::PathAndQuery;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};
use tonic_prost::ProstCodec;

use super::KmsError;
use super::proto::{
    DECRYPT_PATH, DecryptRequest, DecryptResponse, ENCRYPT_PATH, EncryptRequest, EncryptResponse,
    STATUS_PATH, StatusRequest, StatusResponse,
};

/// The API version a KMS v2 plugin reports.
pub const API_VERSION: &str = "v2";
/// What plugins written against the beta API report; the messages are the same.
const API_VERSION_BETA: &str = "v2beta1";

/// Where the plugin listens and how long one call may take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KmsConfig {
    /// The plugin's Unix socket (`--kms-socket`).
    pub socket: PathBuf,
    /// The limit of one call (`--kms-timeout`).
    pub timeout: Duration,
}

impl KmsConfig {
    /// The default timeout: 3 s.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

    /// A config for `socket` with the default timeout.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }
}

/// A client of one KMS v2 plugin. Cheap to clone (one shared channel).
#[derive(Clone, Debug)]
pub struct KmsClient {
    channel: Channel,
    config: KmsConfig,
}

impl KmsClient {
    /// A client of the plugin at `config.socket`; connects on the first call. Must be
    /// called inside a Tokio runtime.
    pub fn new(config: KmsConfig) -> Self {
        let socket = config.socket.clone();
        let connector = tower::service_fn(move |_: http::Uri| {
            let socket = socket.clone();
            async move { UnixStream::connect(socket).await.map(TokioIo::new) }
        });
        // The authority is unused: the connector dials the socket.
        let channel = Endpoint::from_static("http://kms-plugin.invalid")
            .connect_timeout(config.timeout)
            .timeout(config.timeout)
            .connect_with_connector_lazy(connector);
        Self { channel, config }
    }

    /// The plugin's socket.
    pub fn socket(&self) -> &Path {
        &self.config.socket
    }

    /// `Status`, checked: healthz `ok` and API version `v2`.
    pub async fn status(&self) -> Result<StatusResponse, KmsError> {
        let status: StatusResponse = self.call("Status", STATUS_PATH, StatusRequest {}).await?;
        if status.version != API_VERSION && status.version != API_VERSION_BETA {
            return Err(KmsError::Version {
                socket: self.config.socket.clone(),
                version: status.version,
            });
        }
        if status.healthz != "ok" {
            return Err(KmsError::Unhealthy {
                socket: self.config.socket.clone(),
                healthz: status.healthz,
            });
        }
        Ok(status)
    }

    /// `Encrypt`.
    pub async fn encrypt(&self, plaintext: Vec<u8>) -> Result<EncryptResponse, KmsError> {
        let request = EncryptRequest {
            plaintext,
            uid: request_uid(),
        };
        self.call("Encrypt", ENCRYPT_PATH, request).await
    }

    /// `Decrypt` with the key id and annotations `Encrypt` returned.
    pub async fn decrypt(
        &self,
        ciphertext: Vec<u8>,
        key_id: String,
        annotations: HashMap<String, Vec<u8>>,
    ) -> Result<DecryptResponse, KmsError> {
        let request = DecryptRequest {
            ciphertext,
            uid: request_uid(),
            key_id,
            annotations,
        };
        self.call("Decrypt", DECRYPT_PATH, request).await
    }

    async fn call<Req, Resp>(
        &self,
        operation: &'static str,
        path: &'static str,
        request: Req,
    ) -> Result<Resp, KmsError>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let exchange = async {
            let mut grpc = tonic::client::Grpc::new(self.channel.clone());
            grpc.ready()
                .await
                .map_err(|e| self.unreachable(&describe_transport(&e)))?;
            grpc.unary(
                tonic::Request::new(request),
                PathAndQuery::from_static(path),
                ProstCodec::<Req, Resp>::default(),
            )
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| self.status_error(operation, &status))
        };
        match tokio::time::timeout(self.config.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(KmsError::Timeout {
                socket: self.config.socket.clone(),
                operation,
                after: self.config.timeout,
            }),
        }
    }

    fn unreachable(&self, reason: &str) -> KmsError {
        if !self.config.socket.exists() {
            return KmsError::SocketMissing {
                socket: self.config.socket.clone(),
            };
        }
        KmsError::Unreachable {
            socket: self.config.socket.clone(),
            reason: reason.to_owned(),
        }
    }

    fn status_error(&self, operation: &'static str, status: &tonic::Status) -> KmsError {
        match status.code() {
            // tonic reports a failed connection as Unavailable, and a call cut by the
            // connection closing (a plugin stopping) as Cancelled.
            tonic::Code::Unavailable | tonic::Code::Cancelled => {
                self.unreachable(&describe_status(status))
            }
            tonic::Code::DeadlineExceeded => KmsError::Timeout {
                socket: self.config.socket.clone(),
                operation,
                after: self.config.timeout,
            },
            code => KmsError::Refused {
                socket: self.config.socket.clone(),
                operation,
                code: format!("{code:?}"),
                message: status.message().to_owned(),
            },
        }
    }
}

/// A status message with its source chain (tonic puts the connect error there).
fn describe_status(status: &tonic::Status) -> String {
    let mut text = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn describe_transport(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A random request id: the plugin's logs can tell calls apart.
fn request_uid() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}
