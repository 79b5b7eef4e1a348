//! The export endpoint: a tenant's log read back, filtered, as JSON lines or CSV
//! (the contract is [`portcullis_api::audit_export`]).
//!
//! Who may read is decided by an [`ExportAuthorizer`] (in a cluster: TokenReview then
//! SubjectAccessReview against the API server, so the tenant's RBAC decides). The answer
//! is streamed a megabyte of a stored day at a time, so an export of a year never sits
//! in memory whole and ingest waits for the log's lock only that long; a read that fails part-way aborts the body instead of ending it, and the
//! client sees a broken transfer, never a short export that looks complete.

use std::future::Future;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, channel::Channel};
use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;
use portcullis_api::audit_export::{
    ACTION, CHAIN_FORMAT, CSV_CONTENT_TYPE, FORMAT, JSON_CONTENT_TYPE, PRINCIPAL, SINCE, UNTIL,
};
use portcullis_api::names::is_dns_subdomain;
use portcullis_audit::entry::Entry;
use portcullis_audit::files::ExportFilter;
use portcullis_audit::format::csv;
use portcullis_audit::seal::Seal;
use portcullis_server::{self as serve, Body, BodyError};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::collector::{Collector, Found, blocking};
use crate::store::{Position, RecordStore, StoreError};

/// Bytes gathered before a piece of the answer is sent.
const CHUNK: usize = 64 * 1024;

/// Bytes of a stored day read at a time: the log's lock is held for one such read, and
/// an export holds about this much of the log in memory.
const READ_PIECE: usize = 1024 * 1024;

/// The two output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// JSON lines, each record exactly as stored.
    Json,
    /// CSV with a header row.
    Csv,
    /// Every stored entry, records and checkpoints, unfiltered: the history to verify.
    Chain,
}

/// A parsed export query.
#[derive(Debug, Clone)]
pub struct ExportQuery {
    /// Which records.
    pub filter: ExportFilter,
    /// How they are written.
    pub format: ExportFormat,
}

fn time(name: &str, value: &str) -> Result<Timestamp, String> {
    value.parse().map_err(|_| {
        format!("{name}={value:?} is not an RFC 3339 time; write it like 2026-03-16T14:22:01Z")
    })
}

impl ExportQuery {
    /// Parses the query string; the error names the parameter and the fix.
    pub fn parse(query: Option<&str>) -> Result<Self, String> {
        let mut filter = ExportFilter::default();
        let mut format = ExportFormat::Json;
        for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            match name.as_ref() {
                SINCE => filter.since = Some(time(SINCE, &value)?),
                UNTIL => filter.until = Some(time(UNTIL, &value)?),
                ACTION => filter.action = Some(value.into_owned()),
                PRINCIPAL => filter.principal = Some(value.into_owned()),
                FORMAT => {
                    format = match value.as_ref() {
                        "json" => ExportFormat::Json,
                        "csv" => ExportFormat::Csv,
                        CHAIN_FORMAT => ExportFormat::Chain,
                        other => {
                            return Err(format!(
                                "format={other:?}: use format=json, format=csv or format={CHAIN_FORMAT}"
                            ));
                        }
                    }
                }
                other => {
                    return Err(format!(
                        "unknown parameter {other:?}; the export takes {SINCE}, {UNTIL}, {ACTION}, {PRINCIPAL} and {FORMAT}"
                    ));
                }
            }
        }
        if let (Some(since), Some(until)) = (filter.since, filter.until)
            && since >= until
        {
            return Err(format!("since={since} is not before until={until}"));
        }
        if format == ExportFormat::Chain
            && (filter.since.is_some()
                || filter.until.is_some()
                || filter.action.is_some()
                || filter.principal.is_some())
        {
            return Err(format!(
                "format={CHAIN_FORMAT} is the whole log, to verify; a filtered chain does not verify, so it takes no {SINCE}, {UNTIL}, {ACTION} or {PRINCIPAL}"
            ));
        }
        Ok(Self { filter, format })
    }
}

/// Who was allowed to export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reader {
    /// The user name the API server gave the token.
    pub user: String,
}

/// Why an export was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExportDenial {
    /// No token, or one the API server does not accept (401).
    #[error("{0}")]
    Unauthenticated(String),
    /// The subject may not export this tenant's records (403).
    #[error("{0}")]
    Forbidden(String),
    /// There is no such tenant (404).
    #[error("{0}")]
    NoTenant(String),
    /// The decision could not be made (503): the API server is unreachable.
    #[error("{0}")]
    Unavailable(String),
}

impl ExportDenial {
    fn status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NoTenant(_) => StatusCode::NOT_FOUND,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn outcome(&self) -> &'static str {
        match self {
            Self::Unauthenticated(_) => "unauthenticated",
            Self::Forbidden(_) => "forbidden",
            Self::NoTenant(_) => "no_tenant",
            Self::Unavailable(_) => "unavailable",
        }
    }
}

/// Decides whether the bearer of `token` may export `tenant`'s records.
pub trait ExportAuthorizer: Send + Sync + 'static {
    /// The reader, or why not.
    fn authorize(
        &self,
        token: &str,
        tenant: &str,
    ) -> impl Future<Output = Result<Reader, ExportDenial>> + Send;
}

/// Refuses every export: a collector running without the API server to ask.
#[derive(Debug, Clone, Copy)]
pub struct NoExport;

impl ExportAuthorizer for NoExport {
    async fn authorize(&self, _token: &str, _tenant: &str) -> Result<Reader, ExportDenial> {
        Err(ExportDenial::Unavailable(
            "this collector runs without Kubernetes API access, so it cannot authorise exports; run it in the cluster with the chart's ServiceAccount".into(),
        ))
    }
}

/// `outcome` label of an export.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// Export metrics: `portcullis_audit_exports_total{outcome}`.
#[derive(Debug, Clone, Default)]
pub struct ExportMetrics {
    exports: Family<OutcomeLabel, Counter>,
}

impl ExportMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "portcullis_audit_exports",
            "Export requests, by outcome (served, failed, or why refused)",
            metrics.exports.clone(),
        );
        metrics
    }

    fn count(&self, outcome: &'static str) {
        self.exports.get_or_create(&OutcomeLabel { outcome }).inc();
    }
}

/// What every export request shares.
pub struct Export<S, A> {
    collector: Arc<Mutex<Collector<S>>>,
    authorizer: Arc<A>,
    metrics: ExportMetrics,
}

impl<S, A> Clone for Export<S, A> {
    fn clone(&self) -> Self {
        Self {
            collector: self.collector.clone(),
            authorizer: self.authorizer.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

impl<S, A> std::fmt::Debug for Export<S, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export").finish_non_exhaustive()
    }
}

/// The bearer token of a request, if it sent one.
fn bearer<B>(request: &Request<B>) -> Option<&str> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn denied(denial: &ExportDenial) -> Response<Body> {
    let mut response = serve::error(denial.status(), &denial.to_string());
    if matches!(denial, ExportDenial::Unauthenticated(_)) {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

impl<S: RecordStore + Send + 'static, A: ExportAuthorizer> Export<S, A> {
    /// Exports from `collector`, asking `authorizer` who may.
    pub fn new(collector: Arc<Mutex<Collector<S>>>, authorizer: A, metrics: ExportMetrics) -> Self {
        Self {
            collector,
            authorizer: Arc::new(authorizer),
            metrics,
        }
    }

    /// Who asks, if they may read `tenant`'s log; else the answer to give.
    async fn admit<B>(&self, request: &Request<B>, tenant: &str) -> Result<Reader, Response<Body>> {
        if request.method() != Method::GET {
            return Err(serve::error(
                StatusCode::METHOD_NOT_ALLOWED,
                "read records with GET; records are written only by shipping proxies",
            ));
        }
        let Some(token) = bearer(request) else {
            let denial = ExportDenial::Unauthenticated(
                "send a Kubernetes token as Authorization: Bearer <token> (a ServiceAccount token, or your own); kubectl portcullis audit export does this for you".into(),
            );
            self.metrics.count(denial.outcome());
            return Err(denied(&denial));
        };
        if !is_dns_subdomain(tenant) {
            return Err(serve::error(
                StatusCode::NOT_FOUND,
                &format!("{tenant:?} is not a tenant name"),
            ));
        }
        self.authorizer
            .authorize(token, tenant)
            .await
            .map_err(|denial| {
                self.metrics.count(denial.outcome());
                tracing::info!(tenant, outcome = denial.outcome(), "export refused");
                denied(&denial)
            })
    }

    /// Answers `GET /v1/tenants/{tenant}/seal`: the newest seal of the tenant's log.
    pub async fn handle_seal<B>(self, request: Request<B>, tenant: &str) -> Response<Body> {
        if let Err(refused) = self.admit(&request, tenant).await {
            return refused;
        }
        let collector = self.collector.clone();
        let owned = tenant.to_owned();
        let seal = blocking(&collector, move |collector| {
            Ok::<_, StoreError>(collector.last_seal(&owned))
        })
        .await;
        match seal {
            Ok(Some(line)) => serve::full(StatusCode::OK, "application/json", line),
            Ok(None) => serve::error(
                StatusCode::NOT_FOUND,
                &format!(
                    "tenant {tenant:?} has no sealed log yet: the collector seals a log once records arrive"
                ),
            ),
            Err(e) => serve::error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        }
    }

    /// Answers `GET /v1/tenants/{tenant}/records`.
    pub async fn handle<B>(self, request: Request<B>, tenant: &str) -> Response<Body> {
        let reader = match self.admit(&request, tenant).await {
            Ok(reader) => reader,
            Err(refused) => return refused,
        };
        let query = match ExportQuery::parse(request.uri().query()) {
            Ok(query) => query,
            Err(message) => {
                self.metrics.count("bad_request");
                return serve::error(StatusCode::BAD_REQUEST, &message);
            }
        };
        tracing::info!(tenant, user = %reader.user, format = ?query.format, "export");
        self.metrics.count("served");
        let content_type = match query.format {
            ExportFormat::Json | ExportFormat::Chain => JSON_CONTENT_TYPE,
            ExportFormat::Csv => CSV_CONTENT_TYPE,
        };
        let (mut sender, body) = Channel::<Bytes, BodyError>::new(2);
        let this = self.clone();
        let tenant = tenant.to_owned();
        tokio::spawn(async move {
            match this.stream(&tenant, &query, &mut sender).await {
                Ok(Sent::All | Sent::ClientGone) => {}
                Err(e) => {
                    this.metrics.count("failed");
                    tracing::error!(tenant, error = %e, "export failed part-way; the answer is cut off");
                    sender.abort(Box::new(e));
                }
            }
        });
        let mut response = Response::new(body.boxed_unsync());
        if let Ok(value) = HeaderValue::from_str(content_type) {
            response.headers_mut().insert(header::CONTENT_TYPE, value);
        }
        response
    }

    async fn stream(
        &self,
        tenant: &str,
        query: &ExportQuery,
        sender: &mut http_body_util::channel::Sender<Bytes, BodyError>,
    ) -> Result<Sent, StoreError> {
        let mut out = Out {
            sender,
            chunk: Vec::with_capacity(CHUNK),
        };
        if query.format == ExportFormat::Csv {
            csv::append_header(&mut out.chunk).map_err(format_error)?;
        }
        // Days are days of arrival, never earlier than the record's own day.
        let first_day = query
            .filter
            .since
            .map_or(Date::MIN, |since| since.to_zoned(TimeZone::UTC).date());
        let mut at = Position::start_of(first_day);
        loop {
            let owner = tenant.to_owned();
            let found = blocking(&self.collector, move |c| {
                c.read_from(&owner, at, READ_PIECE)
            })
            .await?;
            // Nothing more: the end of the last day (a torn last line, never
            // acknowledged, is not read).
            let Found::Lines { lines, next } = found else {
                break;
            };
            at = next;
            if out.write_lines(query, lines).await? == Sent::ClientGone {
                return Ok(Sent::ClientGone);
            }
        }
        Ok(out.send().await)
    }
}

fn is_seal_line(line: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(line).is_ok_and(|value| Seal::is_seal_value(&value))
}

fn format_error(e: portcullis_audit::Error) -> StoreError {
    StoreError::Io {
        action: "formatting",
        path: "the export".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    All,
    ClientGone,
}

struct Out<'a> {
    sender: &'a mut http_body_util::channel::Sender<Bytes, BodyError>,
    chunk: Vec<u8>,
}

impl Out<'_> {
    /// Writes the lines the query keeps, sending each full chunk.
    async fn write_lines(
        &mut self,
        query: &ExportQuery,
        lines: Vec<String>,
    ) -> Result<Sent, StoreError> {
        for line in lines {
            let Ok(entry) = Entry::from_json_line(&line) else {
                // Seals are not entries, but they are part of the history to verify.
                if query.format == ExportFormat::Chain && is_seal_line(&line) {
                    self.push_line(&line);
                }
                continue;
            };
            match (query.format, &entry) {
                // The whole history: every entry as stored.
                (ExportFormat::Chain, _) => self.push_line(&line),
                (format, Entry::Record(record)) if query.filter.keeps(record) => {
                    if format == ExportFormat::Csv {
                        csv::append_record(record, &mut self.chunk).map_err(format_error)?;
                    } else {
                        self.push_line(&line);
                    }
                }
                _ => continue,
            }
            if self.chunk.len() >= CHUNK && self.send().await == Sent::ClientGone {
                return Ok(Sent::ClientGone);
            }
        }
        Ok(Sent::All)
    }

    fn push_line(&mut self, line: &str) {
        self.chunk.extend_from_slice(line.as_bytes());
        self.chunk.push(b'\n');
    }

    async fn send(&mut self) -> Sent {
        if self.chunk.is_empty() {
            return Sent::All;
        }
        let piece = Bytes::from(std::mem::replace(
            &mut self.chunk,
            Vec::with_capacity(CHUNK),
        ));
        match self.sender.send_data(piece).await {
            Ok(()) => Sent::All,
            Err(_) => Sent::ClientGone,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_names_what_is_wrong() {
        let query = ExportQuery::parse(Some(
            "since=2026-01-01T00:00:00Z&action=api.*&principal=key%3Aak_***abc&format=csv",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(query.format, ExportFormat::Csv);
        assert_eq!(query.filter.action.as_deref(), Some("api.*"));
        assert_eq!(query.filter.principal.as_deref(), Some("key:ak_***abc"));
        assert!(query.filter.since.is_some() && query.filter.until.is_none());

        for (bad, names) in [
            ("since=yesterday", "since=\"yesterday\""),
            ("format=xml", "format=json, format=csv or format=chain"),
            (
                "format=chain&action=api.x",
                "a filtered chain does not verify",
            ),
            ("tenant=other", "unknown parameter \"tenant\""),
            (
                "since=2026-02-01T00:00:00Z&until=2026-01-01T00:00:00Z",
                "is not before",
            ),
        ] {
            let error = ExportQuery::parse(Some(bad)).err().unwrap_or_default();
            assert!(error.contains(names), "{bad}: {error}");
        }
        assert_eq!(
            ExportQuery::parse(None).map(|q| q.format),
            Ok(ExportFormat::Json)
        );
    }

    #[test]
    fn only_bearer_tokens_count() {
        let with = |value: &str| {
            Request::builder()
                .header(header::AUTHORIZATION, value)
                .body(())
                .unwrap_or_default()
        };
        assert_eq!(bearer(&with("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&with("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(&with("Basic abc")), None);
        assert_eq!(bearer(&with("Bearer ")), None);
        assert_eq!(bearer(&Request::new(())), None);
    }
}
