//! The HTTPS server the API server calls: `POST /inject` (mutating) and
//! `POST /validate` (validating), AdmissionReview v1 in and out, over TLS 1.3 with
//! HTTP/1.1 or HTTP/2. Bounded: request bodies and review time here, connections by the
//! shared server ([`portcullis_server`]: handshake, header, idle and keep-alive time, caps in
//! all and per source that evict idle connections rather than stop accepting); drains
//! on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::config::{INJECT_PATH, VALIDATE_PATH};
use super::review::{review_admin, review_pod};
use super::{WebhookError, WebhookState};
use portcullis_server::{self as serve, ConnectionLimits};

/// Limits of the webhook server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// Largest AdmissionReview accepted (object + old object; etcd caps objects at 1.5 MiB).
    pub max_body_bytes: usize,
    /// Time allowed for one review (the API server gives up after `timeoutSeconds`).
    pub request_timeout: Duration,
    /// Handshake, header, idle and keep-alive time, connection caps, drain.
    pub connections: ConnectionLimits,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: 6 * 1024 * 1024,
            request_timeout: Duration::from_secs(10),
            connections: ConnectionLimits::default(),
        }
    }
}

/// Binds `addr` and serves until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    tls: Arc<ServerConfig>,
    state: Arc<WebhookState>,
    shutdown: CancellationToken,
) -> Result<(), WebhookError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| WebhookError::Bind { addr, source })?;
    serve_on(listener, tls, state, ServerLimits::default(), shutdown).await
}

/// Serves on an already bound listener (tests bind port 0 and read the address).
pub async fn serve_on(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    state: Arc<WebhookState>,
    limits: ServerLimits,
    shutdown: CancellationToken,
) -> Result<(), WebhookError> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "admission webhooks listening");
    }
    let connections = limits.connections.clone();
    let limits = Arc::new(limits);
    let handler = move |request| {
        let state = state.clone();
        let limits = limits.clone();
        async move { route(request, &state, &limits).await.map(serve::boxed) }
    };
    serve::serve_with(listener, Some(tls.into()), handler, connections, shutdown).await;
    Ok(())
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.into())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

async fn route(
    request: Request<Incoming>,
    state: &WebhookState,
    limits: &ServerLimits,
) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    let kind = match path.as_str() {
        INJECT_PATH => Kind::Inject,
        VALIDATE_PATH => Kind::Validate,
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                "not found: use POST /inject or POST /validate\n",
            );
        }
    };
    if request.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
    }
    let body = match Limited::new(request.into_body(), limits.max_body_bytes)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            let status = if e.is::<http_body_util::LengthLimitError>() {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            return text(status, format!("reading the request: {e}\n"));
        }
    };
    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(&body) {
        Ok(review) => review,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("not an AdmissionReview: {e}\n"),
            );
        }
    };
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(request) => request,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let reviewed = tokio::time::timeout(limits.request_timeout, async {
        match kind {
            Kind::Inject => review_pod(state, &request).await,
            Kind::Validate => review_admin(state, &request).await,
        }
    })
    .await;
    let response = reviewed.unwrap_or_else(|_| {
        AdmissionResponse::from(&request)
            .deny("portcullis webhook timed out reading cluster state; retry shortly")
    });
    match serde_json::to_vec(&response.into_review()) {
        Ok(json) => {
            let mut response = Response::new(Full::new(Bytes::from(json)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the response: {e}\n"),
        ),
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Inject,
    Validate,
}
