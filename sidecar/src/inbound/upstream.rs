//! The app on 127.0.0.1:<app-port>, through one pooled HTTP/1.1 client. Bodies stream
//! both ways; a 101 response hands both connections to a byte pump (WebSocket and
//! other upgrades).

use std::time::Duration;

use http::{Request, Response, Uri, Version, header, uri::Authority};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo, TokioTimer},
};

use crate::{
    config::UpstreamConfig,
    listener::{
        body::ProxyBody,
        deny::{Denial, Reason},
    },
};

/// The pooled client to the app.
#[derive(Clone, Debug)]
pub struct Upstream {
    client: Client<HttpConnector, ProxyBody>,
    // None: the pod declares no application port, so nothing can be forwarded.
    authority: Option<Authority>,
}

impl Upstream {
    /// A client for the app described by `config`.
    pub fn new(config: &UpstreamConfig) -> Self {
        let authority = Authority::try_from(format!("127.0.0.1:{}", config.app_port))
            .unwrap_or_else(|_| Authority::from_static("127.0.0.1:80"));
        Self::build(config, Some(authority))
    }

    /// For a pod without an application port: every forward is answered 502
    /// `upstream_unavailable` saying so.
    pub fn without_app(config: &UpstreamConfig) -> Self {
        Self::build(config, None)
    }

    fn build(config: &UpstreamConfig, authority: Option<Authority>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Self { client, authority }
    }

    /// Sends `request` to the app, waiting at most `timeout` for the response head.
    pub async fn forward(
        &self,
        mut request: Request<ProxyBody>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, Denial> {
        let Some(authority) = self.authority.clone() else {
            return Err(Denial::new(
                Reason::UpstreamUnavailable,
                "this pod declares no application port; set the portcullis.dev/app-port annotation",
            ));
        };
        let path = request
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".to_owned());
        // HTTP/2 requests carry the host in :authority; the app speaks HTTP/1.1.
        if !request.headers().contains_key(header::HOST)
            && let Some(authority) = request.uri().authority()
            && let Ok(value) = header::HeaderValue::from_str(authority.as_str())
        {
            request.headers_mut().insert(header::HOST, value);
        }
        *request.uri_mut() = Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(path)
            .build()
            .map_err(|_| {
                Denial::new(
                    Reason::BadRequest,
                    "the request target cannot be forwarded; send an origin-form path",
                )
            })?;
        *request.version_mut() = Version::HTTP_11;
        match tokio::time::timeout(timeout, self.client.request(request)).await {
            Err(_) => Err(Denial::new(
                Reason::UpstreamTimeout,
                format!(
                    "the service did not answer within {}s; retry later",
                    timeout.as_secs()
                ),
            )),
            Ok(Err(e)) if body_over_limit(&e) => Err(Denial::new(
                Reason::BodyTooLarge,
                "the request body is over this service's limit; send a smaller body",
            )),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "upstream request failed");
                Err(Denial::new(
                    Reason::UpstreamUnavailable,
                    "the service behind this proxy is not reachable; retry later",
                ))
            }
            Ok(Ok(response)) => Ok(response),
        }
    }
}

/// Whether forwarding failed because the request body passed its limit
/// (`http_body_util::Limited`), which is the client's fault, not the app's.
fn body_over_limit(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
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
