//! Prometheus metrics served on `/metrics`. Labels are closed sets (decision, reason,
//! status, handshake failure kind): never a key, token, path or principal.

use std::sync::{
    Arc,
    atomic::{AtomicI64, Ordering},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::listener::deny::Reason;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    decision: &'static str,
    reason: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
    result: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// Every metric the proxy exports; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<DecisionLabels, Histogram, fn() -> Histogram>,
    handshakes: Counter,
    handshake_failures: Family<ReasonLabels, Counter>,
    key_cache_hits: Counter,
    key_cache_misses: Counter,
    key_verifications: Counter,
    audit_data_key_missing: Gauge,
    bcrypt_in_flight: Gauge,
    bcrypt_busy: Counter,
    policy_version: Gauge,
    policy_updates: Family<SourceLabels, Counter>,
    cert_expiry: Gauge,
    cert_not_after: AtomicI64,
    connections_open: Gauge,
    connections_refused: Family<ReasonLabels, Counter>,
    cert_reloads: Family<SourceLabels, Counter>,
    outbound_requests: Family<OutboundLabels, Counter>,
    serving_certificate_refusals: Family<ReasonLabels, Counter>,
    serving_certificate_in_force: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutboundLabels {
    reason: &'static str,
    status: u16,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("portcullis");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<DecisionLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        let handshakes = Counter::default();
        let handshake_failures = Family::<ReasonLabels, Counter>::default();
        let key_cache_hits = Counter::default();
        let key_cache_misses = Counter::default();
        let key_verifications = Counter::default();
        let audit_data_key_missing = Gauge::default();
        let bcrypt_in_flight = Gauge::default();
        let bcrypt_busy = Counter::default();
        let policy_version = Gauge::default();
        let policy_updates = Family::<SourceLabels, Counter>::default();
        let cert_expiry = Gauge::default();
        let connections_open = Gauge::default();
        let connections_refused = Family::<ReasonLabels, Counter>::default();
        let cert_reloads = Family::<SourceLabels, Counter>::default();
        let outbound_requests = Family::<OutboundLabels, Counter>::default();
        let serving_certificate_refusals = Family::<ReasonLabels, Counter>::default();
        let serving_certificate_in_force = Gauge::default();
        registry.register(
            "requests",
            "Inbound requests by decision, reason and status",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Inbound request latency to response head",
            latency.clone(),
        );
        registry.register(
            "tls_handshakes",
            "Completed inbound TLS handshakes",
            handshakes.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "Failed inbound TLS handshakes by reason",
            handshake_failures.clone(),
        );
        registry.register(
            "key_cache_hits",
            "API keys accepted from the verified-key cache",
            key_cache_hits.clone(),
        );
        registry.register(
            "key_cache_misses",
            "API keys that needed a bcrypt verification",
            key_cache_misses.clone(),
        );
        registry.register(
            "key_verifications",
            "bcrypt verifications run (the CPU a key check costs)",
            key_verifications.clone(),
        );
        registry.register(
            "audit_data_key_missing",
            "1 while the pod has no tenant data key: fail-closed tenants refuse requests, others audit to stdout only",
            audit_data_key_missing.clone(),
        );
        registry.register(
            "bcrypt_in_flight",
            "bcrypt verifications running now",
            bcrypt_in_flight.clone(),
        );
        registry.register(
            "bcrypt_busy",
            "Requests refused because every bcrypt worker was busy",
            bcrypt_busy.clone(),
        );
        registry.register(
            "policy_version",
            "Version of the policy bundle in force",
            policy_version.clone(),
        );
        registry.register(
            "policy_updates",
            "Policy bundles received by source and result",
            policy_updates.clone(),
        );
        registry.register(
            "cert_expiry_seconds",
            "Seconds until the serving certificate expires",
            cert_expiry.clone(),
        );
        registry.register(
            "connections_open",
            "Open inbound connections",
            connections_open.clone(),
        );
        registry.register(
            "connections_refused",
            "Inbound connections closed at accept, by reason (per_source_limit: the source already holds limits.maxConnectionsPerSource)",
            connections_refused.clone(),
        );
        registry.register(
            "cert_reloads",
            "Certificate and trust bundle reloads by result",
            cert_reloads.clone(),
        );
        registry.register(
            "outbound_requests",
            "Requests from the local app through the outbound listener, by reason and status",
            outbound_requests.clone(),
        );
        registry.register(
            "serving_certificate_refusals",
            "Bring-your-own serving certificates refused, once per change of the files or the verdict, by reason (missing, unparseable, key_mismatch, expired, not_yet_valid)",
            serving_certificate_refusals.clone(),
        );
        registry.register(
            "serving_certificate_in_force",
            "1 while a bring-your-own serving certificate is presented to clients outside the mesh",
            serving_certificate_in_force.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                registry,
                requests,
                latency,
                handshakes,
                handshake_failures,
                key_cache_hits,
                key_cache_misses,
                key_verifications,
                audit_data_key_missing,
                bcrypt_in_flight,
                bcrypt_busy,
                policy_version,
                policy_updates,
                cert_expiry,
                cert_not_after: AtomicI64::new(0),
                connections_open,
                connections_refused,
                cert_reloads,
                outbound_requests,
                serving_certificate_refusals,
                serving_certificate_in_force,
            }),
        }
    }

    /// Counts one request decision and its latency.
    pub fn request(&self, reason: Reason, status: u16, seconds: f64) {
        let decision = if reason == Reason::Allowed {
            "allow"
        } else {
            "deny"
        };
        self.inner
            .requests
            .get_or_create(&RequestLabels {
                decision,
                reason: reason.as_str(),
                status,
            })
            .inc();
        self.inner
            .latency
            .get_or_create(&DecisionLabels { decision })
            .observe(seconds);
    }

    /// Counts a completed handshake.
    pub fn handshake_ok(&self) {
        self.inner.handshakes.inc();
    }

    /// Counts a connection closed at accept, by reason.
    pub fn connection_refused(&self, reason: &'static str) {
        self.inner
            .connections_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts a failed TLS handshake by kind.
    pub fn handshake_failed(&self, reason: &'static str) {
        self.inner
            .handshake_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts a verified-key cache hit or miss.
    pub fn key_cache(&self, hit: bool) {
        if hit {
            self.inner.key_cache_hits.inc();
        } else {
            self.inner.key_cache_misses.inc();
        }
    }

    /// Counts one bcrypt verification started.
    pub fn key_verification(&self) {
        self.inner.key_verifications.inc();
    }

    /// Whether the pod runs without its tenant's data key.
    pub fn audit_data_key_missing(&self, missing: bool) {
        self.inner.audit_data_key_missing.set(i64::from(missing));
    }

    /// Tracks running bcrypt verifications.
    pub fn bcrypt_in_flight(&self) -> &Gauge {
        &self.inner.bcrypt_in_flight
    }

    /// Counts a request refused for lack of a bcrypt worker.
    pub fn bcrypt_busy(&self) {
        self.inner.bcrypt_busy.inc();
    }

    /// Records a policy bundle received.
    pub fn policy_update(
        &self,
        source: &'static str,
        result: &'static str,
        version_in_force: Option<u64>,
    ) {
        self.inner
            .policy_updates
            .get_or_create(&SourceLabels { source, result })
            .inc();
        if let Some(version) = version_in_force {
            self.inner
                .policy_version
                .set(i64::try_from(version).unwrap_or(i64::MAX));
        }
    }

    /// Records a certificate reload from files.
    pub fn cert_reload(&self, result: &'static str, not_after_unix: Option<i64>) {
        self.cert_update("file", result, not_after_unix);
    }

    /// Records a certificate change from `source` (`file` or `identity`).
    pub fn cert_update(
        &self,
        source: &'static str,
        result: &'static str,
        not_after_unix: Option<i64>,
    ) {
        self.inner
            .cert_reloads
            .get_or_create(&SourceLabels { source, result })
            .inc();
        if let Some(not_after) = not_after_unix {
            self.inner
                .cert_not_after
                .store(not_after, Ordering::Relaxed);
        }
    }

    /// Counts one outbound request by its outcome.
    pub fn outbound_request(&self, reason: Reason, status: u16) {
        self.inner
            .outbound_requests
            .get_or_create(&OutboundLabels {
                reason: reason.as_str(),
                status,
            })
            .inc();
    }

    /// Counts a refused serving certificate by reason.
    pub fn serving_certificate_refused(&self, reason: &'static str) {
        self.inner
            .serving_certificate_refusals
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Whether a bring-your-own serving certificate is in force.
    pub fn serving_certificate_in_force(&self, in_force: bool) {
        self.inner
            .serving_certificate_in_force
            .set(i64::from(in_force));
    }

    /// Tracks open connections.
    pub fn connections_open(&self) -> &Gauge {
        &self.inner.connections_open
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let not_after = self.inner.cert_not_after.load(Ordering::Relaxed);
        if not_after > 0 {
            self.inner
                .cert_expiry
                .set(not_after - jiff::Timestamp::now().as_second());
        }
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.inner.registry).is_err() {
            text.clear();
        }
        text
    }

    /// The value of one sample line (`name{labels}`), for tests and diagnostics.
    pub fn sample(&self, line_prefix: &str) -> Option<f64> {
        self.encode()
            .lines()
            .find(|line| {
                line.starts_with(line_prefix) && line[line_prefix.len()..].starts_with(' ')
            })
            .and_then(|line| line.rsplit(' ').next()?.parse().ok())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_decision_reason_and_status() {
        let metrics = Metrics::new();
        metrics.request(Reason::MissingScope, 403, 0.001);
        metrics.request(Reason::MissingScope, 403, 0.001);
        metrics.request(Reason::Allowed, 200, 0.002);
        assert_eq!(
            metrics.sample("portcullis_requests_total{decision=\"deny\",reason=\"missing_scope\",status=\"403\"}"),
            Some(2.0)
        );
        assert!(
            metrics
                .encode()
                .contains("portcullis_request_duration_seconds_bucket")
        );
    }
}
