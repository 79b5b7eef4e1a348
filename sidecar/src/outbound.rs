//! The outbound listener (127.0.0.1:4140, plain HTTP): the local app names the
//! destination in an absolute-form URI (`http://10.1.2.3:8080/path`) or the `Host`
//! header, and the proxy forwards the request over mTLS to the destination's inbound
//! proxy (port 4143 unless `keepPort`), presenting the workload certificate and
//! checking that the peer holds a workload certificate of our trust bundle and trust
//! domain. The TLS server name sent is always the reserved
//! [`PEER_SERVER_NAME`](crate::tls::PEER_SERVER_NAME), so the callee
//! presents its workload certificate even when it serves its own certificate to clients
//! outside the mesh. `X-Portcullis-Expect-Identity: spiffe://…` narrows that to exactly one
//! workload. So app A → A's proxy :4140 → mTLS → B's proxy :4143 → B's app sees
//! `X-Portcullis-Principal: spiffe://…/ns/<A ns>/sa/<A sa>`.
//!
//! Proxy-to-proxy traffic is HTTP/2 over one pooled connection per destination
//! (re-established after [`MAX_CONNECTION_AGE`] so rotated certificates take over);
//! `Upgrade` requests are not carried. Failures are JSON `{"error", "reason"}`: 400
//! `destination_required`/`bad_request`, 502 `peer_unreachable`,
//! `peer_handshake_failed`, `peer_identity_mismatch`, 503 `identity_unavailable`, 504
//! `upstream_timeout`.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http::{Request, Response, Uri, Version, header, uri::Authority};
use http_body_util::BodyExt;
use hyper::{body::Incoming, client::conn::http2, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use portcullis_api::spiffe::WorkloadId;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{Limits, OutboundConfig},
    listener::{
        accept::{Bounds, accept_loop},
        body::ProxyBody,
        deny::{Denial, Reason},
        idle::{self, Activity, InFlightBody},
        proxy_http,
    },
    metrics::Metrics,
    tls::{ClientConfigSource, PEER_SERVER_NAME, peer::peer_identity},
};

/// The header naming the one workload the destination must be.
pub const EXPECT_IDENTITY: &str = "x-portcullis-expect-identity";

/// A pooled connection is replaced after this long.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);

#[derive(Clone)]
struct PeerConnection {
    sender: http2::SendRequest<ProxyBody>,
    peer: Option<WorkloadId>,
    opened: Instant,
}

/// The outbound path: settings, the TLS client source and the connection pool.
pub struct Outbound {
    settings: OutboundConfig,
    tls: ClientConfigSource,
    pool: Mutex<HashMap<SocketAddr, PeerConnection>>,
    metrics: Metrics,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Where a request goes: the authority the app named and the address dialled.
struct Destination {
    authority: Authority,
    address: SocketAddr,
}

impl Outbound {
    /// An outbound path presenting and verifying certificates through `tls` (a config
    /// with our workload certificate and a peer verifier; ALPN is set here).
    pub fn new(settings: OutboundConfig, tls: ClientConfigSource, metrics: Metrics) -> Self {
        Self {
            settings,
            tls,
            pool: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Serves one request from the app.
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let method = request.method().clone();
        let target = request.uri().path().to_owned();
        let (response, reason) = match self.route(request).await {
            Ok(response) => (response, Reason::Allowed),
            Err(denial) => {
                tracing::info!(reason = denial.reason.as_str(), %method, path = %target, error = %denial.error, "outbound request failed");
                let reason = denial.reason;
                (denial.into_response(), reason)
            }
        };
        self.metrics
            .outbound_request(reason, response.status().as_u16());
        Ok(response)
    }

    async fn route(&self, request: Request<Incoming>) -> Result<Response<ProxyBody>, Denial> {
        let expected = expected_identity(&request)?;
        let destination = self.destination(&request).await?;
        let connection = self.connection(&destination).await?;
        if let Some(expected) = &expected
            && connection.peer.as_ref() != Some(expected)
        {
            return Err(Denial::new(
                Reason::PeerIdentityMismatch,
                format!(
                    "{} presented {}, not the expected {expected}; check the address or X-Portcullis-Expect-Identity",
                    destination.authority,
                    connection
                        .peer
                        .as_ref()
                        .map_or_else(|| "no workload identity".to_owned(), ToString::to_string),
                ),
            ));
        }
        let request = to_peer(request, &destination.authority)?;
        let mut sender = connection.sender;
        let sent =
            tokio::time::timeout(self.settings.request_timeout, sender.send_request(request));
        let mut response = match sent.await {
            Err(_) => {
                return Err(Denial::new(
                    Reason::UpstreamTimeout,
                    format!(
                        "{} did not answer within {}s",
                        destination.authority,
                        self.settings.request_timeout.as_secs()
                    ),
                ));
            }
            Ok(Err(e)) => {
                self.forget(destination.address);
                return Err(Denial::new(
                    Reason::PeerUnreachable,
                    format!(
                        "the request to {} failed: {e}; retry",
                        destination.authority
                    ),
                ));
            }
            Ok(Ok(response)) => response,
        };
        proxy_http::strip_hop_by_hop(response.headers_mut(), false);
        Ok(response.map(|body| body.map_err(Into::into).boxed()))
    }

    async fn destination(&self, request: &Request<Incoming>) -> Result<Destination, Denial> {
        let authority = request
            .uri()
            .authority()
            .cloned()
            .or_else(|| {
                request
                    .headers()
                    .get(header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<Authority>().ok())
            })
            .ok_or_else(|| {
                Denial::new(
                    Reason::DestinationRequired,
                    "name the destination: send http://HOST:PORT/path or a Host header",
                )
            })?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let named_port = authority.port_u16().unwrap_or(80);
        let port = if self.settings.keep_port {
            named_port
        } else {
            self.settings.peer_port
        };
        let address = match host.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, port),
            Err(_) => {
                let lookup = tokio::net::lookup_host((host.as_str(), port));
                match tokio::time::timeout(self.settings.connect_timeout, lookup).await {
                    Ok(Ok(mut addresses)) => addresses.next().ok_or_else(|| unresolved(&host))?,
                    _ => return Err(unresolved(&host)),
                }
            }
        };
        Ok(Destination { authority, address })
    }

    fn forget(&self, address: SocketAddr) {
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&address);
    }

    async fn connection(&self, destination: &Destination) -> Result<PeerConnection, Denial> {
        let pooled = self
            .pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&destination.address)
            .filter(|c| !c.sender.is_closed() && c.opened.elapsed() < MAX_CONNECTION_AGE)
            .cloned();
        if let Some(connection) = pooled {
            return Ok(connection);
        }
        let connection = self.connect(destination).await?;
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(destination.address, connection.clone());
        Ok(connection)
    }

    async fn connect(&self, destination: &Destination) -> Result<PeerConnection, Denial> {
        let config = (self.tls)().map_err(|e| {
            Denial::new(
                Reason::IdentityUnavailable,
                format!("this proxy has no workload certificate yet ({e}); retry in a few seconds"),
            )
        })?;
        let mut config = (*config).clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let address = destination.address;
        let timeout = self.settings.connect_timeout;
        let unreachable = |e: String| {
            Denial::new(
                Reason::PeerUnreachable,
                format!(
                    "cannot reach the proxy of {} at {address}: {e}",
                    destination.authority
                ),
            )
        };
        let tcp = match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
            Err(_) => return Err(unreachable(format!("no connection within {timeout:?}"))),
            Ok(Err(e)) => return Err(unreachable(e.to_string())),
            Ok(Ok(tcp)) => tcp,
        };
        let _ = tcp.set_nodelay(true);
        let handshake_failed = |e: String| {
            Denial::new(
                Reason::PeerHandshakeFailed,
                format!(
                    "mTLS with the proxy of {} failed: {e}; is the destination in the mesh?",
                    destination.authority
                ),
            )
        };
        // The reserved peer name, whatever the destination: the callee then presents its
        // workload certificate (not a bring-your-own one); the verifier checks that by
        // SPIFFE ID and ignores the name.
        let server_name = ServerName::try_from(PEER_SERVER_NAME)
            .map_err(|e| handshake_failed(format!("reserved server name: {e}")))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tls = match tokio::time::timeout(timeout, connector.connect(server_name, tcp)).await {
            Err(_) => return Err(handshake_failed(format!("no handshake within {timeout:?}"))),
            Ok(Err(e)) => return Err(handshake_failed(e.to_string())),
            Ok(Ok(tls)) => tls,
        };
        let peer = peer_identity(tls.get_ref().1.peer_certificates()).map(|p| p.workload);
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(20)))
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| handshake_failed(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "outbound peer connection ended");
            }
        });
        Ok(PeerConnection {
            sender,
            peer,
            opened: Instant::now(),
        })
    }
}

fn unresolved(host: &str) -> Denial {
    Denial::new(
        Reason::PeerUnreachable,
        format!("cannot resolve {host:?}; use a pod IP or a resolvable name"),
    )
}

fn expected_identity<B>(request: &Request<B>) -> Result<Option<WorkloadId>, Denial> {
    let Some(value) = request.headers().get(EXPECT_IDENTITY) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<WorkloadId>().ok())
        .map(Some)
        .ok_or_else(|| {
            Denial::new(
                Reason::BadRequest,
                "X-Portcullis-Expect-Identity must be a workload SPIFFE ID like spiffe://cluster.local/ns/NAMESPACE/sa/SERVICEACCOUNT",
            )
        })
}

/// The app's request as the peer proxy gets it: HTTP/2, the app's authority as
/// `:authority`, no hop-by-hop or expectation headers.
fn to_peer(
    request: Request<Incoming>,
    authority: &Authority,
) -> Result<Request<ProxyBody>, Denial> {
    let (mut parts, body) = request.into_parts();
    proxy_http::strip_hop_by_hop(&mut parts.headers, false);
    parts.headers.remove(EXPECT_IDENTITY);
    parts.headers.remove(header::HOST);
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = Uri::builder()
        .scheme("https")
        .authority(authority.clone())
        .path_and_query(path)
        .build()
        .map_err(|_| {
            Denial::new(
                Reason::BadRequest,
                "the request target cannot be forwarded; send http://HOST:PORT/path",
            )
        })?;
    parts.version = Version::HTTP_2;
    Ok(Request::from_parts(parts, body.map_err(Into::into).boxed()))
}

/// Serves the outbound listener until `shutdown`, then lets requests finish for up to
/// `limits.drain_timeout`. Bounded like the inbound listener: at most
/// `limits.max_connections`, header read and idle timeouts, HTTP/2 keep-alive.
pub async fn serve(
    listener: TcpListener,
    outbound: Arc<Outbound>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let builder = Arc::new(proxy_http::http_builder(&limits));
    let bounds = Bounds {
        name: "outbound",
        max_connections: limits.max_connections,
        // Every connection comes from the local app.
        per_source: None,
        drain_timeout: limits.drain_timeout,
    };
    let metrics = outbound.metrics.clone();
    let serve = {
        let shutdown = shutdown.clone();
        move |tcp, _peer| {
            serve_connection(
                tcp,
                outbound.clone(),
                builder.clone(),
                limits.clone(),
                shutdown.clone(),
            )
        }
    };
    accept_loop(listener, bounds, metrics, shutdown, serve).await;
}

async fn serve_connection(
    tcp: TcpStream,
    outbound: Arc<Outbound>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let activity = Activity::new();
    let service = service_fn({
        let activity = activity.clone();
        move |request| {
            let in_flight = activity.request_started();
            let handled = outbound.clone().handle(request);
            async move {
                let response = handled.await?;
                Ok::<_, Infallible>(response.map(|body| InFlightBody::wrap(body, in_flight)))
            }
        }
    });
    let connection = builder.serve_connection(TokioIo::new(tcp), service);
    let (idle_timeout, drain) = (limits.idle_timeout, limits.drain_timeout);
    let closing = idle::close_signal(&activity, idle_timeout, &shutdown, drain);
    let served = idle::serve_until_closed!(connection, closing);
    if let Err(e) = served {
        tracing::debug!(error = %e, "outbound client connection ended with an error");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn expected_identity_must_be_a_workload_id() {
        let request = |value: &str| {
            Request::builder()
                .header(EXPECT_IDENTITY, value)
                .body(())
                .unwrap()
        };
        assert_eq!(
            expected_identity(&request("spiffe://td/ns/a/sa/b"))
                .unwrap()
                .unwrap()
                .to_string(),
            "spiffe://td/ns/a/sa/b"
        );
        for bad in ["spiffe://td/tenant/acme", "https://x", ""] {
            assert_eq!(
                expected_identity(&request(bad)).unwrap_err().reason,
                Reason::BadRequest
            );
        }
        assert!(
            expected_identity(&Request::builder().body(()).unwrap())
                .unwrap()
                .is_none()
        );
    }
}
