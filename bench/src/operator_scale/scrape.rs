//! The operator's Prometheus `/metrics` (plain HTTP on its admin port): fetching and
//! reading the few samples the benchmark follows.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

const TIMEOUT: Duration = Duration::from_secs(5);

/// `GET http://<addr>/metrics`, the body as text.
pub async fn fetch(addr: SocketAddr) -> anyhow::Result<String> {
    tokio::time::timeout(TIMEOUT, async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        let driver = tokio::spawn(connection);
        let request = http::Request::get("/metrics")
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        anyhow::ensure!(
            response.status().is_success(),
            "/metrics: {}",
            response.status()
        );
        let body = response.into_body().collect().await?.to_bytes();
        driver.abort();
        Ok(String::from_utf8_lossy(&body).into_owned())
    })
    .await
    .map_err(|_| anyhow::anyhow!("/metrics on {addr}: no answer within {TIMEOUT:?}"))?
}

/// The sum of every sample of `name` whose labels include all of `labels` (0 when none
/// matches: a counter that was never incremented is not exported yet).
pub fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (label_text, value) = match rest.strip_prefix('{') {
                Some(inner) => inner.split_once('}')?,
                // Exactly `name`, not a longer metric name sharing the prefix.
                None if rest.starts_with(' ') => ("", rest),
                None => return None,
            };
            let matches = labels.iter().all(|(k, v)| {
                label_text
                    .split(',')
                    .any(|pair| pair.trim() == format!("{k}=\"{v}\""))
            });
            matches.then(|| value.split_whitespace().next()?.parse::<f64>().ok())?
        })
        .sum()
}

/// What the benchmark follows, from one scrape.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    /// `portcullis_operator_leader`.
    pub leader: bool,
    /// Reconciles of `kind` (total, including failed ones).
    pub reconciles: u64,
    /// Failed reconciles of `kind`, every error label.
    pub failures: u64,
    /// Seconds spent in reconciles of `kind`.
    pub reconcile_seconds: f64,
    /// `portcullis_operator_api_keys{state="Active"}`: keys Active in the operator's cache.
    pub active_keys: u64,
}

impl Sample {
    /// Reads the samples for `kind` (`ApiKey`, `Tenant`, `Role`).
    pub fn parse(text: &str, kind: &str) -> Self {
        let by_kind = [("kind", kind)];
        Self {
            leader: sum(text, "portcullis_operator_leader", &[]) >= 1.0,
            reconciles: sum(text, "portcullis_operator_reconciles_total", &by_kind) as u64,
            failures: sum(
                text,
                "portcullis_operator_reconcile_failures_total",
                &by_kind,
            ) as u64,
            reconcile_seconds: sum(
                text,
                "portcullis_operator_reconcile_duration_seconds_sum",
                &by_kind,
            ),
            active_keys: sum(text, "portcullis_operator_api_keys", &[("state", "Active")]) as u64,
        }
    }
}

/// The API server's own request counts (`apiserver_request_total` of its `/metrics`),
/// by verb and resource: which calls the operator's work costs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ApiRequests(pub BTreeMap<String, f64>);

impl ApiRequests {
    /// One scrape of the API server's `/metrics` through `client`.
    pub async fn read(client: &kube::Client) -> anyhow::Result<Self> {
        let request = http::Request::get("/metrics").body(Vec::new())?;
        Ok(Self::parse(&client.request_text(request).await?))
    }

    /// `apiserver_request_total` summed per `VERB resource[/subresource]`.
    pub fn parse(text: &str) -> Self {
        let mut counts = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
                continue;
            };
            let Some((labels, value)) = rest.split_once('}') else {
                continue;
            };
            let Ok(value) = value.trim().parse::<f64>() else {
                continue;
            };
            let label = |name: &str| {
                labels
                    .split(',')
                    .find_map(|pair| pair.strip_prefix(&format!("{name}=\"")))
                    .map(|v| v.trim_end_matches('"').to_owned())
                    .unwrap_or_default()
            };
            let (subresource, resource) = (label("subresource"), label("resource"));
            let what = if subresource.is_empty() {
                format!("{} {resource}", label("verb"))
            } else {
                format!("{} {resource}/{subresource}", label("verb"))
            };
            *counts.entry(what).or_insert(0.0) += value;
        }
        Self(counts)
    }

    /// The requests made since `before`.
    pub fn since(&self, before: &Self) -> Self {
        Self(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), v - before.0.get(k).copied().unwrap_or(0.0)))
                .filter(|(_, v)| *v > 0.0)
                .collect(),
        )
    }

    /// All requests.
    pub fn total(&self) -> u64 {
        self.0.values().sum::<f64>() as u64
    }

    /// `total (VERB resource n, ...)`, the `top` most frequent first.
    pub fn summary(&self, top: usize) -> String {
        let mut each: Vec<(&String, &f64)> = self.0.iter().collect();
        each.sort_by(|a, b| b.1.total_cmp(a.1));
        let listed: Vec<String> = each
            .iter()
            .take(top)
            .map(|(k, v)| format!("{k} {}", **v as u64))
            .collect();
        format!("{} ({})", self.total(), listed.join(", "))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    // The shape prometheus-client 0.24 writes (operator/src/metrics.rs).
    const TEXT: &str = r#"# HELP portcullis_operator_reconciles Reconciliations by kind.
# TYPE portcullis_operator_reconciles counter
portcullis_operator_reconciles_total{kind="ApiKey"} 10234
portcullis_operator_reconciles_total{kind="Tenant"} 12
# TYPE portcullis_operator_reconcile_failures counter
portcullis_operator_reconcile_failures_total{kind="ApiKey",error="Kube"} 3
portcullis_operator_reconcile_failures_total{kind="ApiKey",error="TenantNotFound"} 2
portcullis_operator_reconcile_failures_total{kind="Role",error="Kube"} 7
portcullis_operator_reconcile_duration_seconds_sum{kind="ApiKey"} 41.5
portcullis_operator_reconcile_duration_seconds_count{kind="ApiKey"} 10234
portcullis_operator_api_keys{state="Active"} 9990
portcullis_operator_api_keys{state="Pending"} 10
portcullis_operator_leader 1
portcullis_operator_leader_changes 4
# EOF
"#;

    #[test]
    fn samples_are_read_by_kind() {
        let s = Sample::parse(TEXT, "ApiKey");
        assert_eq!(
            s,
            Sample {
                leader: true,
                reconciles: 10234,
                failures: 5,
                reconcile_seconds: 41.5,
                active_keys: 9990,
            }
        );
        assert_eq!(Sample::parse(TEXT, "Tenant").reconciles, 12);
        assert_eq!(Sample::parse(TEXT, "Tenant").failures, 0);
    }

    #[test]
    fn api_server_requests_are_counted_by_verb_and_resource() {
        let text = r#"# TYPE apiserver_request_total counter
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="namespaces",scope="resource",subresource="",verb="GET",version="v1"} 5
apiserver_request_total{code="404",component="apiserver",dry_run="",group="",resource="namespaces",scope="resource",subresource="",verb="GET",version="v1"} 2
apiserver_request_total{code="200",component="apiserver",dry_run="",group="portcullis.dev",resource="tenants",scope="resource",subresource="status",verb="APPLY",version="v1alpha1"} 3
"#;
        let counts = ApiRequests::parse(text);
        assert_eq!(counts.0.get("GET namespaces"), Some(&7.0));
        assert_eq!(counts.0.get("APPLY tenants/status"), Some(&3.0));
        let before = ApiRequests([("GET namespaces".to_owned(), 4.0)].into());
        assert_eq!(counts.since(&before).total(), 6);
        assert!(counts.summary(1).starts_with("10 (GET namespaces 7)"));
    }

    #[test]
    fn names_match_exactly() {
        // `_leader` must not pick up `_leader_changes`.
        assert_eq!(sum(TEXT, "portcullis_operator_leader", &[]), 1.0);
        assert_eq!(sum("", "portcullis_operator_leader", &[]), 0.0);
        assert_eq!(sum("x{a=\"b\"} oops", "x", &[]), 0.0);
    }
}
