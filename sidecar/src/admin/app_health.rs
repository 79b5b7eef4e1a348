//! The app's own probes, run by the proxy on the kubelet's behalf
//! (`GET :4191/app-health/<container>/<kind>`; the contract is in
//! `portcullis_api::injection::probes`). The check goes to the app on 127.0.0.1, where no
//! redirect applies, so the answer is the app's: 200 when it is healthy, 503 with what
//! went wrong when it is not.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use portcullis_api::injection::probes::{AppProbe, AppProbes, ProbeCheck};
use tokio::net::TcpStream;

/// The original probes of this pod's app containers.
#[derive(Clone, Debug, Default)]
pub struct AppHealth {
    probes: AppProbes,
}

/// The outcome of one check.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    /// 200 healthy, 503 unhealthy.
    pub status: StatusCode,
    /// What was checked and what came back.
    pub detail: String,
}

impl AppHealth {
    /// Probes from the injector (`PORTCULLIS_APP_PROBES`).
    pub fn new(probes: AppProbes) -> Self {
        Self { probes }
    }

    /// Whether `path` is one of ours (`/app-health/...`).
    pub fn knows(&self, path: &str) -> bool {
        self.probes.contains_key(path)
    }

    /// Runs the probe behind `path`; `None` when there is none.
    pub async fn check(&self, path: &str) -> Option<Outcome> {
        let probe = self.probes.get(path)?;
        Some(run(probe).await)
    }
}

fn unhealthy(detail: String) -> Outcome {
    Outcome {
        status: StatusCode::SERVICE_UNAVAILABLE,
        detail,
    }
}

async fn run(probe: &AppProbe) -> Outcome {
    let address = SocketAddr::from(([127, 0, 0, 1], probe.port));
    // The kubelet allows at least one second; so do we.
    let timeout = Duration::from_secs(u64::from(probe.timeout_seconds.max(1)));
    let result = tokio::time::timeout(timeout, async {
        let tcp = TcpStream::connect(address)
            .await
            .map_err(|e| format!("connecting to the app at {address}: {e}"))?;
        match &probe.check {
            ProbeCheck::Tcp => Ok(format!("the app accepts connections on {address}")),
            ProbeCheck::Http { path, headers } => http_get(tcp, address, path, headers).await,
        }
    })
    .await;
    match result {
        Ok(Ok(detail)) => Outcome {
            status: StatusCode::OK,
            detail,
        },
        Ok(Err(detail)) => unhealthy(detail),
        Err(_) => unhealthy(format!(
            "the app at {address} did not answer within {timeout:?}"
        )),
    }
}

async fn http_get(
    tcp: TcpStream,
    address: SocketAddr,
    path: &str,
    headers: &[portcullis_api::injection::probes::ProbeHeader],
) -> Result<String, String> {
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("HTTP to the app at {address}: {e}"))?;
    tokio::spawn(connection);
    let mut request = Request::get(path)
        .header(header::HOST, address.to_string())
        .header(header::USER_AGENT, "kube-probe (portcullis)");
    for h in headers {
        request = request.header(h.name.as_str(), h.value.as_str());
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("the probe's path or headers are not valid HTTP: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP to the app at {address}: {e}"))?;
    let status = response.status();
    // The kubelet's rule: 200-399 is success.
    if (200..400).contains(&status.as_u16()) {
        Ok(format!("GET {path} on {address}: {status}"))
    } else {
        Err(format!("GET {path} on {address}: {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_api::injection::probes::{ProbeKind, health_path};
    use tokio::net::TcpListener;

    fn probes(port: u16) -> AppHealth {
        let mut probes = AppProbes::new();
        probes.insert(
            health_path("app", ProbeKind::Readiness),
            AppProbe {
                port,
                check: ProbeCheck::Http {
                    path: "/healthz".into(),
                    headers: vec![],
                },
                timeout_seconds: 1,
            },
        );
        probes.insert(
            health_path("app", ProbeKind::Liveness),
            AppProbe {
                port,
                check: ProbeCheck::Tcp,
                timeout_seconds: 1,
            },
        );
        AppHealth::new(probes)
    }

    /// An app answering `status` to every request, until dropped.
    async fn app(status: StatusCode) -> (u16, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req| async move {
                        let mut response =
                            http::Response::new(http_body_util::Full::new(Bytes::new()));
                        *response.status_mut() = status;
                        Ok::<_, std::convert::Infallible>(response)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        (port, task)
    }

    #[tokio::test]
    async fn probes_report_the_app_and_only_the_app() {
        let (port, app) = app(StatusCode::OK).await;
        let health = probes(port);
        let ready = health.check("/app-health/app/readyz").await.unwrap();
        assert_eq!(ready.status, StatusCode::OK, "{ready:?}");
        let live = health.check("/app-health/app/livez").await.unwrap();
        assert_eq!(live.status, StatusCode::OK, "{live:?}");

        // The app stops listening: both probes say so.
        app.abort();
        let _ = app.await;
        let ready = health.check("/app-health/app/readyz").await.unwrap();
        assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE, "{ready:?}");
        let live = health.check("/app-health/app/livez").await.unwrap();
        assert_eq!(live.status, StatusCode::SERVICE_UNAVAILABLE, "{live:?}");
        assert!(health.check("/app-health/other/readyz").await.is_none());
    }

    #[tokio::test]
    async fn an_app_answering_an_error_status_is_unhealthy() {
        let (port, _app) = app(StatusCode::INTERNAL_SERVER_ERROR).await;
        let ready = probes(port).check("/app-health/app/readyz").await.unwrap();
        assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(ready.detail.contains("500"), "{ready:?}");
    }
}
