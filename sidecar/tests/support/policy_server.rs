//! An in-process stand-in for the operator's policy endpoint:
//! `GET /v1/policy/<tenant>/watch` over mTLS, newline-delimited JSON bundles (the
//! current one first, then one per change). It can be stopped and restarted on the
//! same port to test fail-static behaviour.

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
        let mut server = Self {
            addr: "127.0.0.1:0".parse().unwrap(),
            bundle,
            tasks: None,
            config: Arc::new(config),
            connections: Default::default(),
        };
        server.listen().await;
        server
    }

    async fn listen(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.addr = listener.local_addr().unwrap();
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

    /// Stops listening and drops every open stream.
    pub async fn stop(&mut self) {
        if let Some(mut tasks) = self.tasks.take() {
            tasks.shutdown().await;
        }
    }

    /// Listens again on the same port.
    pub async fn restart(&mut self) {
        self.listen().await;
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
