//! An in-process stand-in for the operator's policy endpoint:
//! `GET /v1/policy/<tenant>/watch` over mTLS, newline-delimited JSON bundles (the
//! current one first, then one per change). It can be stopped and restarted on the
//! same port to test fail-static behaviour.
//!
//! While stopped it keeps the port bound and closes every connection it accepts: a
//! released loopback port can be taken meanwhile (by another test's outbound socket, or
//! by the proxy's own reconnect connecting to itself), and the restart would then fail.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{body::Frame, service::service_fn};
use hyper_util::rt::TokioIo;
use portcullis_crds::PolicyBundle;
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::{net::TcpListener, sync::watch, task::JoinSet};

use super::{TestCa, client::roots};

pub struct PolicyServer {
    pub addr: SocketAddr,
    listener: Arc<TcpListener>,
    bundle: watch::Sender<PolicyBundle>,
    tasks: Option<JoinSet<()>>,
    config: Arc<ServerConfig>,
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl PolicyServer {
    pub async fn start(ca: &TestCa, bundle: PolicyBundle) -> Self {
        let issued = ca.server();
        let chain: Vec<_> = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
            .map(|c| c.unwrap())
            .collect();
        let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&ca.pem)), provider.clone())
                .build()
                .unwrap();
        let config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        let (bundle, _) = watch::channel(bundle);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut server = Self {
            addr: listener.local_addr().unwrap(),
            listener: Arc::new(listener),
            bundle,
            tasks: None,
            config: Arc::new(config),
            connections: Default::default(),
        };
        server.listen();
        server
    }

    fn listen(&mut self) {
        let listener = self.listener.clone();
        let mut tasks = JoinSet::new();
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config.clone());
        let bundle = self.bundle.clone();
        let connections = self.connections.clone();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let bundle = bundle.subscribe();
                let connections = connections.clone();
                conns.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    connections.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let bundle = bundle.clone();
                        async move { Ok::<_, Infallible>(watch_response(req.uri().path(), bundle)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        self.tasks = Some(tasks);
    }

    /// Publishes a new bundle to every watcher.
    pub fn publish(&self, bundle: PolicyBundle) {
        self.bundle.send_replace(bundle);
    }

    /// Drops every open stream and closes each new connection until [`Self::restart`].
    pub async fn stop(&mut self) {
        if let Some(mut tasks) = self.tasks.take() {
            tasks.shutdown().await;
        }
        let listener = self.listener.clone();
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            loop {
                // Dropping the accepted socket closes it before any TLS is spoken.
                let _ = listener.accept().await;
            }
        });
        self.tasks = Some(tasks);
    }

    /// Serves again on the same port.
    pub async fn restart(&mut self) {
        if let Some(mut tasks) = self.tasks.take() {
            tasks.shutdown().await;
        }
        self.listen();
    }
}

fn watch_response(
    path: &str,
    mut bundle: watch::Receiver<PolicyBundle>,
) -> Response<UnsyncBoxBody<Bytes, Infallible>> {
    let tenant = bundle.borrow().tenant.clone();
    if path != format!("/v1/policy/{tenant}/watch") {
        let mut response =
            Response::new(Full::new(Bytes::from_static(b"not found\n")).boxed_unsync());
        *response.status_mut() = StatusCode::NOT_FOUND;
        return response;
    }
    let stream = futures::stream::unfold((bundle.clone(), true), |(mut rx, first)| async move {
        if !first && rx.changed().await.is_err() {
            return None;
        }
        let mut line = serde_json::to_vec(&*rx.borrow_and_update()).unwrap();
        line.push(b'\n');
        Some((
            Ok::<_, Infallible>(Frame::data(Bytes::from(line))),
            (rx, false),
        ))
    })
    .boxed();
    bundle.mark_unchanged();
    Response::new(StreamBody::new(stream).boxed_unsync())
}
