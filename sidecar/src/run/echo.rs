//! A small echo app for the demo and benchmarks: answers every request with JSON
//! holding the method, path, query, headers it received (so `X-Portcullis-*` are visible) and
//! the body; an `Upgrade` request gets 101 and its bytes echoed back.

use std::{collections::BTreeMap, convert::Infallible, net::SocketAddr};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{io::AsyncWriteExt, net::TcpListener};
use tokio_util::sync::CancellationToken;

/// Largest body echoed back (the rest is refused with 413).
pub const MAX_ECHO_BODY: usize = 1024 * 1024;

async fn echo(mut request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.headers().contains_key(header::UPGRADE) {
        let protocol = request.headers()[header::UPGRADE].clone();
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
                let _ = writer.shutdown().await;
            }
        });
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        response.headers_mut().insert(header::UPGRADE, protocol);
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("upgrade"),
        );
        return Ok(response);
    }
    let method = request.method().to_string();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().map(str::to_owned);
    let mut headers = BTreeMap::<String, String>::new();
    for (name, value) in request.headers() {
        headers.insert(
            name.to_string(),
            String::from_utf8_lossy(value.as_bytes()).into_owned(),
        );
    }
    let body = http_body_util::Limited::new(request.into_body(), MAX_ECHO_BODY)
        .collect()
        .await;
    let Ok(body) = body else {
        let mut response = Response::new(Full::new(Bytes::from_static(b"body too large\n")));
        *response.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
        return Ok(response);
    };
    let json = serde_json::json!({
        "method": method,
        "path": path,
        "query": query,
        "headers": headers,
        "body": String::from_utf8_lossy(&body.to_bytes()),
    });
    let mut response = Response::new(Full::new(Bytes::from(json.to_string())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// Starts the echo app on `address` (port 0 for an ephemeral one); returns where.
pub async fn start(
    address: SocketAddr,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted { Ok((tcp, _)) => tcp, Err(_) => continue },
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service_fn(echo))
                    .with_upgrades()
                    .await;
            });
        }
    });
    Ok(bound)
}
