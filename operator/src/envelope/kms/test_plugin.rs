//! A KMS v2 plugin for tests (feature `kms-test-plugin`): AES-256-GCM under an
//! in-memory key, served with tonic on a Unix socket. Switches make it unhealthy, change
//! its key id, stop it and start it again on the same socket. Not for production: the
//! key lives and dies with the process.
//!
//! Ciphertext: `[nonce 12][ct + tag]`. `Encrypt` returns the annotation
//! [`ANNOTATION`], which `Decrypt` requires back, so a client that drops annotations
//! fails.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic_prost::ProstCodec;

use super::proto::{
    DECRYPT_PATH, DecryptRequest, DecryptResponse, ENCRYPT_PATH, EncryptRequest, EncryptResponse,
    STATUS_PATH, StatusRequest, StatusResponse,
};

/// The annotation `Encrypt` adds and `Decrypt` requires.
pub const ANNOTATION: &str = "version.kms.test.portcullis.dev";

/// Why the plugin could not start.
#[derive(Debug, thiserror::Error)]
#[error("KMS test plugin on {}: {source}", socket.display())]
pub struct PluginError {
    socket: PathBuf,
    source: std::io::Error,
}

struct State {
    key: [u8; 32],
    key_id: String,
    healthz: String,
    /// Every plaintext encrypted, so tests can find the intermediate key.
    encrypted: Vec<Vec<u8>>,
}

type Shared = Arc<Mutex<State>>;

fn lock(state: &Shared) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running (or stopped) test plugin. Stops when dropped.
pub struct TestKmsPlugin {
    socket: PathBuf,
    state: Shared,
    running: Option<(CancellationToken, JoinHandle<()>)>,
}

impl std::fmt::Debug for TestKmsPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestKmsPlugin")
            .field("socket", &self.socket)
            .field("running", &self.running.is_some())
            .finish_non_exhaustive()
    }
}

impl TestKmsPlugin {
    /// A plugin with a random key reporting `key_id`, not yet listening.
    pub fn new(socket: impl Into<PathBuf>, key_id: &str) -> Self {
        Self::with_key(socket, key_id, rand::random())
    }

    /// A plugin with `key`, reporting `key_id`, not yet listening.
    pub fn with_key(socket: impl Into<PathBuf>, key_id: &str, key: [u8; 32]) -> Self {
        Self {
            socket: socket.into(),
            state: Arc::new(Mutex::new(State {
                key,
                key_id: key_id.to_owned(),
                healthz: "ok".to_owned(),
                encrypted: Vec::new(),
            })),
            running: None,
        }
    }

    /// Binds the socket (removing a stale one) and serves until [`TestKmsPlugin::stop`].
    pub async fn start(&mut self) -> Result<(), PluginError> {
        self.stop().await;
        let err = |source| PluginError {
            socket: self.socket.clone(),
            source,
        };
        match std::fs::remove_file(&self.socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
            _ => {}
        }
        let listener = UnixListener::bind(&self.socket).map_err(err)?;
        let incoming = futures::stream::unfold(listener, |listener| async move {
            let next = listener.accept().await.map(|(stream, _)| stream);
            Some((next, listener))
        });
        let token = CancellationToken::new();
        let service = PluginService {
            state: self.state.clone(),
        };
        let shutdown = token.clone();
        let task = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .serve_with_incoming_shutdown(service, incoming, shutdown.cancelled())
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "KMS test plugin stopped");
            }
        });
        self.running = Some((token, task));
        Ok(())
    }

    /// A started plugin.
    pub async fn started(socket: impl Into<PathBuf>, key_id: &str) -> Result<Self, PluginError> {
        let mut plugin = Self::new(socket, key_id);
        plugin.start().await?;
        Ok(plugin)
    }

    /// Stops serving and removes the socket; open connections are dropped.
    pub async fn stop(&mut self) {
        if let Some((token, task)) = self.running.take() {
            token.cancel();
            // Connections still open keep the server waiting: cut them.
            task.abort();
            let _ = task.await;
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Makes `Status` report `healthz` (`ok` is healthy).
    pub fn set_healthz(&self, healthz: &str) {
        healthz.clone_into(&mut lock(&self.state).healthz);
    }

    /// Makes the plugin report (and encrypt under) another key id; the key stays.
    pub fn set_key_id(&self, key_id: &str) {
        key_id.clone_into(&mut lock(&self.state).key_id);
    }

    /// The plaintexts `Encrypt` was called with, oldest first.
    pub fn encrypted_plaintexts(&self) -> Vec<Vec<u8>> {
        lock(&self.state).encrypted.clone()
    }
}

impl Drop for TestKmsPlugin {
    fn drop(&mut self) {
        if let Some((token, task)) = self.running.take() {
            token.cancel();
            task.abort();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn status(state: &Shared) -> StatusResponse {
    let state = lock(state);
    StatusResponse {
        version: super::API_VERSION.to_owned(),
        healthz: state.healthz.clone(),
        key_id: state.key_id.clone(),
    }
}

fn encrypt(state: &Shared, request: EncryptRequest) -> Result<EncryptResponse, tonic::Status> {
    let mut state = lock(state);
    let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&state.key));
    let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
    let sealed = cipher
        .encrypt(&nonce, request.plaintext.as_slice())
        .map_err(|_| tonic::Status::internal("encryption failed"))?;
    state.encrypted.push(request.plaintext);
    Ok(EncryptResponse {
        ciphertext: [nonce.as_slice(), &sealed].concat(),
        key_id: state.key_id.clone(),
        annotations: HashMap::from([(ANNOTATION.to_owned(), b"1".to_vec())]),
    })
}

fn decrypt(state: &Shared, request: DecryptRequest) -> Result<DecryptResponse, tonic::Status> {
    if request.annotations.get(ANNOTATION).map(Vec::as_slice) != Some(b"1") {
        return Err(tonic::Status::invalid_argument(format!(
            "annotation {ANNOTATION} missing"
        )));
    }
    let state = lock(state);
    if request.ciphertext.len() < 12 {
        return Err(tonic::Status::invalid_argument("ciphertext too short"));
    }
    let (nonce, sealed) = request.ciphertext.split_at(12);
    let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&state.key));
    let plaintext = cipher
        .decrypt(Nonce::from_slice(nonce), sealed)
        .map_err(|_| {
            tonic::Status::invalid_argument(
                "decryption failed: not encrypted under this plugin's key",
            )
        })?;
    Ok(DecryptResponse { plaintext })
}

/// The gRPC service: routes the three paths, answers others Unimplemented.
#[derive(Clone)]
struct PluginService {
    state: Shared,
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

fn unary<Req, Resp>(
    state: Shared,
    request: http::Request<Body>,
    handle: fn(&Shared, Req) -> Result<Resp, tonic::Status>,
) -> ResponseFuture
where
    Req: prost::Message + Default + Send + Sync + 'static,
    Resp: prost::Message + Send + Sync + 'static,
{
    Box::pin(async move {
        let service = tower::service_fn(move |r: tonic::Request<Req>| {
            let result = handle(&state, r.into_inner()).map(tonic::Response::new);
            std::future::ready(result)
        });
        let mut grpc = tonic::server::Grpc::new(ProstCodec::<Resp, Req>::default());
        Ok(grpc.unary(service, request).await)
    })
}

impl tower::Service<http::Request<Body>> for PluginService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let state = self.state.clone();
        match request.uri().path() {
            STATUS_PATH => unary(state, request, |s, _: StatusRequest| Ok(status(s))),
            ENCRYPT_PATH => unary(state, request, encrypt),
            DECRYPT_PATH => unary(state, request, decrypt),
            other => {
                let status = tonic::Status::unimplemented(format!("no method {other}"));
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}
