//! A Splunk HTTP Event Collector stand-in for the tests (in-process on 127.0.0.1, or
//! as a pod: `pod-app hec`): `POST /services/collector/event` with
//! `Authorization: Splunk <token>` and newline-separated event objects, answered the way
//! Splunk answers (200 `Success`, 401 without a token, 403 with another one, 400 for a
//! body that is not events); `GET /received` gives back every accepted event's `event`
//! object as JSON lines, in arrival order.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Largest request body taken (Splunk's default `max_content_length` is about 1 MB).
const MAX_BODY: usize = 1_000_000;

/// What the receiver accepted.
#[derive(Clone, Debug, Default)]
pub struct Received {
    events: Arc<Mutex<Vec<Value>>>,
}

impl Received {
    /// Every accepted event's `event` object, in arrival order.
    pub fn events(&self) -> Vec<Value> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn answer(status: StatusCode, text: &str, code: u32) -> Response<Full<Bytes>> {
    let body = json!({"text": text, "code": code}).to_string();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

async fn handle(
    request: Request<Incoming>,
    token: Arc<str>,
    received: Received,
) -> Result<Response<Full<Bytes>>, Infallible> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/received") => {
            let lines: String = received
                .events()
                .iter()
                .map(|event| format!("{event}\n"))
                .collect();
            Ok(Response::new(Full::new(Bytes::from(lines))))
        }
        (&Method::POST, "/services/collector/event") => {
            let presented = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.strip_prefix("Splunk ").unwrap_or(v).to_owned());
            match presented {
                None => return Ok(answer(StatusCode::UNAUTHORIZED, "Token is required", 2)),
                Some(t) if *t != *token => {
                    return Ok(answer(StatusCode::FORBIDDEN, "Invalid token", 4));
                }
                Some(_) => {}
            }
            let Ok(body) = Limited::new(request.into_body(), MAX_BODY).collect().await else {
                return Ok(answer(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "Content too large",
                    27,
                ));
            };
            let body = body.to_bytes();
            let mut events = Vec::new();
            for line in String::from_utf8_lossy(&body).lines() {
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Value>(line) {
                    Ok(mut value) if value.get("event").is_some() => {
                        events.push(value["event"].take());
                    }
                    _ => return Ok(answer(StatusCode::BAD_REQUEST, "Invalid data format", 6)),
                }
            }
            received
                .events
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend(events);
            Ok(answer(StatusCode::OK, "Success", 0))
        }
        _ => Ok(answer(
            StatusCode::NOT_FOUND,
            "The requested URL was not found",
            404,
        )),
    }
}

/// Serves on `listener` until `shutdown`, accepting `token`.
pub fn serve(listener: TcpListener, token: &str, shutdown: CancellationToken) -> Received {
    let received = Received::default();
    let token: Arc<str> = Arc::from(token);
    let kept = received.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(_) => continue,
                },
                () = shutdown.cancelled() => return,
            };
            let (token, received) = (token.clone(), kept.clone());
            tokio::spawn(async move {
                let service =
                    service_fn(move |request| handle(request, token.clone(), received.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    received
}

/// A running receiver; stops when dropped.
#[derive(Debug)]
pub struct Receiver {
    /// Where it listens.
    pub addr: SocketAddr,
    received: Received,
    stop: CancellationToken,
}

impl Receiver {
    /// Binds `addr` and serves there, accepting `token`.
    pub async fn start(addr: SocketAddr, token: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let received = serve(listener, token, stop.clone());
        Ok(Self {
            addr,
            received,
            stop,
        })
    }

    /// Every accepted event's `event` object, in arrival order.
    pub fn events(&self) -> Vec<Value> {
        self.received.events()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
