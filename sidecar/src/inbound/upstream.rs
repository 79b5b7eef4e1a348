//! The app on 127.0.0.1:<app-port>, over keep-alive HTTP/1.1 connections
//! ([`AppConnections`]). Bodies stream both ways; a 101 response hands both connections to a
//! byte pump (WebSocket and other upgrades).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http::{Request, Response, Uri, Version, header, uri::Authority};
use http_body_util::BodyExt;
use hyper::{body::Incoming, client::conn::http1};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::app_connections::{AppConnection, AppConnections, Returning};
use crate::{
    config::UpstreamConfig,
    listener::{
        body::ProxyBody,
        deny::{Denial, Reason},
    },
};

/// Where the app listens and how to reach it; shared by every connection.
#[derive(Clone, Debug)]
pub struct Upstream {
    // None: the pod declares no application port, so nothing can be forwarded.
    app: Option<Arc<App>>,
}

#[derive(Debug)]
struct App {
    addr: SocketAddr,
    authority: Authority,
    connect_timeout: Duration,
    connections: Arc<AppConnections>,
}

/// Why a request did not reach the app, before any status is chosen.
enum Failure {
    Connect(std::io::Error),
    Http(hyper::Error),
}

impl Upstream {
    /// The app described by `config`.
    pub fn new(config: &UpstreamConfig) -> Self {
        let addr = SocketAddr::from(([127, 0, 0, 1], config.app_port));
        let authority = Authority::try_from(addr.to_string())
            .unwrap_or_else(|_| Authority::from_static("127.0.0.1:80"));
        Self {
            app: Some(Arc::new(App {
                addr,
                authority,
                connect_timeout: config.connect_timeout,
                connections: Arc::new(AppConnections::new(config.pool_idle_timeout)),
            })),
        }
    }

    /// For a pod without an application port: every forward is answered 502
    /// `upstream_unavailable` saying so.
    pub fn without_app() -> Self {
        Self { app: None }
    }

    /// Sends `request` to the app, waiting at most `timeout` for the response head.
    pub async fn forward(
        &self,
        mut request: Request<ProxyBody>,
        timeout: Duration,
    ) -> Result<Response<ProxyBody>, Denial> {
        let Some(app) = self.app.as_deref() else {
            return Err(Denial::new(
                Reason::UpstreamUnavailable,
                "this pod declares no application port; set the portcullis.dev/app-port annotation",
            ));
        };
        // HTTP/2 requests carry the host in :authority; the app speaks HTTP/1.1.
        if !request.headers().contains_key(header::HOST)
            && let Some(authority) = request.uri().authority()
            && let Ok(value) = header::HeaderValue::from_str(authority.as_str())
        {
            request.headers_mut().insert(header::HOST, value);
        }
        if !request.headers().contains_key(header::HOST)
            && let Ok(value) = header::HeaderValue::from_str(app.authority.as_str())
        {
            request.headers_mut().insert(header::HOST, value);
        }
        // The app gets origin-form, as HTTP/1.1 clients send it.
        let path = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        *request.uri_mut() = Uri::from(path);
        *request.version_mut() = Version::HTTP_11;
        match tokio::time::timeout(timeout, app.send(request)).await {
            Err(_) => Err(Denial::new(
                Reason::UpstreamTimeout,
                format!(
                    "the service did not answer within {}s; retry later",
                    timeout.as_secs()
                ),
            )),
            Ok(Err(Failure::Http(e))) if body_over_limit(&e) => Err(Denial::new(
                Reason::BodyTooLarge,
                "the request body is over this service's limit; send a smaller body",
            )),
            Ok(Err(failure)) => {
                match failure {
                    Failure::Connect(e) => {
                        tracing::warn!(error = %e, app = %app.authority, "cannot connect to the app")
                    }
                    Failure::Http(e) => tracing::warn!(error = %e, "upstream request failed"),
                }
                Err(Denial::new(
                    Reason::UpstreamUnavailable,
                    "the service behind this proxy is not reachable; retry later",
                ))
            }
            Ok(Ok(response)) => Ok(response),
        }
    }
}

impl App {
    /// Sends on a kept connection, or a new one when none is kept or the kept one
    /// closed before taking the request (the app may close idle connections at will).
    async fn send(&self, request: Request<ProxyBody>) -> Result<Response<ProxyBody>, Failure> {
        let Some(mut kept) = self.connections.take() else {
            return self.send_on_new(request).await;
        };
        if kept.ready().await.is_err() {
            // Closed while idle, between the check in `take` and now.
            return self.send_on_new(request).await;
        }
        match kept.try_send_request(request).await {
            Ok(response) => Ok(self.returning(kept, response)),
            Err(mut refused) => match refused.take_message() {
                // Closed by the app before the request went out: once more on a new one.
                Some(unsent) => self.send_on_new(unsent).await,
                None => Err(Failure::Http(refused.into_error())),
            },
        }
    }

    async fn send_on_new(
        &self,
        request: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, Failure> {
        let mut connection = self.connect().await?;
        connection.ready().await.map_err(Failure::Http)?;
        let response = connection
            .send_request(request)
            .await
            .map_err(Failure::Http)?;
        Ok(self.returning(connection, response))
    }

    async fn connect(&self) -> Result<AppConnection, Failure> {
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.addr))
            .await
            .map_err(|_| {
                Failure::Connect(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect timed out",
                ))
            })?
            .map_err(Failure::Connect)?;
        tcp.set_nodelay(true).map_err(Failure::Connect)?;
        let (sender, io) = http1::Builder::new()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(Failure::Http)?;
        tokio::spawn(async move {
            if let Err(e) = io.with_upgrades().await {
                tracing::debug!(error = %e, "app connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// The response, its body giving the connection back at its end. A switch of
    /// protocols takes the connection over for good.
    fn returning(
        &self,
        connection: AppConnection,
        response: Response<Incoming>,
    ) -> Response<ProxyBody> {
        if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            return response.map(|body| body.map_err(Into::into).boxed());
        }
        let home = self.connections.clone();
        response.map(|body| Returning::wrap(body, connection, home).boxed())
    }
}

/// Whether forwarding failed because the request body passed its limit
/// (`http_body_util::Limited`), which is the client's fault, not the app's.
fn body_over_limit(error: &hyper::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// Pumps bytes between the client's and the app's upgraded connections.
pub fn splice_upgrades(client: hyper::upgrade::OnUpgrade, app: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        let (client, app) = match tokio::try_join!(client, app) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut app = TokioIo::new(app);
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut app).await {
            tracing::debug!(error = %e, "upgraded connection ended");
        }
    });
}
