//! The inbound request path, composed from the one-step modules: policy loaded →
//! client address → credentials the mode requires → tenant allowlist → mTLS peer
//! admitted ([`authorize_peer`]) → route scope → API key (verify, key allowlist, scope,
//! rate limit) or mTLS peer route → audit
//! availability → headers → app. Every request, allowed or denied, is counted and
//! audited once. Connections come in through [`accept`].
//!
//! The request travels as one value, an `Exchange`, through one step per module
//! (shape, [`allowlist`], [`credentials`], [`authorize_peer`], [`authorize`],
//! [`authn`], [`ratelimit`], [`headers`], [`upstream`]); each step returns a
//! [`Denial`] with its [`Reason`], and the exchange then becomes the audit record.
//!
//! Modes ([`credentials`]): `mtls` needs a peer SPIFFE ID (key headers are ignored,
//! and stripped); `apikey` needs a key; `mtls-or-apikey` needs either (a key, when
//! sent, must be valid and then decides scopes); `mtls-and-apikey` needs both and
//! scopes come from the key. A `Restricted` tenant always gets `mtls-and-apikey`,
//! whatever is configured.

use std::{borrow::Cow, convert::Infallible, net::IpAddr, sync::Arc, time::Instant};

use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use portcullis_crds::{DataClassification, InboundMode, scope::ScopeMap};

pub mod accept;
pub mod allowlist;
pub mod app_connections;
pub mod authn;
pub mod authorize;
pub mod authorize_peer;
pub mod credentials;
pub mod headers;
pub mod path;
pub mod ratelimit;
pub mod upstream;

use accept::ConnInfo;
use authn::{KeyVerifier, presented_key};
use authorize_peer::PeerRules;
use headers::Forwarded;
use ratelimit::{RateLimits, Verdict};
use upstream::Upstream;

use crate::{
    audit::{AuditHook, Decision, RequestOutcome, Reservation},
    listener::{
        body::ProxyBody,
        deny::{Denial, Reason},
        idle::InFlightBody,
    },
    metrics::Metrics,
    policy::{CompiledPolicy, PolicyStore},
};

/// Settings of the inbound path (from `ProxyConfig`).
#[derive(Clone, Debug)]
pub struct InboundSettings {
    /// What requests must present.
    pub mode: InboundMode,
    /// Whether mTLS peers are limited to mapped routes.
    pub peers_need_mapped_route: bool,
    /// Which mTLS peers are admitted.
    pub peers: PeerRules,
    /// The pod's route map override.
    pub scopes_override: Option<ScopeMap>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Time for the app's response head.
    pub request_timeout: std::time::Duration,
    /// Header fields a request may carry (checked here for HTTP/2; hyper's HTTP/1
    /// parser enforces the same number).
    pub max_headers: usize,
    /// Bytes a request body may hold, declared or streamed.
    pub max_request_body_bytes: usize,
}

/// Everything a request needs; shared by all connections.
pub struct Inbound {
    /// Settings.
    pub settings: InboundSettings,
    /// The policy in force.
    pub policy: PolicyStore,
    /// API-key verification.
    pub keys: Arc<KeyVerifier>,
    /// Per-key rate limits.
    pub limits: RateLimits,
    /// The app.
    pub upstream: Upstream,
    /// The audit hook.
    pub audit: Arc<dyn AuditHook>,
    /// Metrics.
    pub metrics: Metrics,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// One request on its way through the steps: what its audit record will say, learned
/// step by step, and the room held for that record. Every step reads and extends it;
/// [`Exchange::finish`] turns it into the record, the log line and the metrics.
struct Exchange {
    started: Instant,
    timestamp: jiff::Timestamp,
    /// The normalised path (a refused path as sent).
    path: String,
    method: String,
    bytes_in: u64,
    tenant: String,
    principal: Cow<'static, str>,
    action: Cow<'static, str>,
    client_ip: IpAddr,
    audit: AuditDuty,
}

/// What the tenant's classification asks of the audit record.
enum AuditDuty {
    /// A record that cannot be written is logged, and the request stands.
    BestEffort,
    /// No request reaches the app unless its record's room is held first.
    FailClosed(Option<Reservation>),
}

/// A request that may pass.
struct Admitted {
    /// The policy it was admitted under (for the tenant header).
    policy: Arc<CompiledPolicy>,
    /// The key's scopes, comma-separated, shared by every key holding the same set.
    scopes: Option<Arc<str>>,
    rate: Option<Verdict>,
    /// The admitted mTLS peer's tenant.
    peer_tenant: Option<String>,
}

impl Exchange {
    fn start(request: &Request<Incoming>, conn: &ConnInfo) -> Self {
        Self {
            started: Instant::now(),
            timestamp: jiff::Timestamp::now(),
            path: request.uri().path().to_owned(),
            method: request.method().as_str().to_owned(),
            bytes_in: content_length(request.headers()),
            tenant: String::new(),
            principal: Cow::Borrowed("anonymous"),
            action: Cow::Borrowed("api.unmapped"),
            client_ip: conn.peer.ip().to_canonical(),
            audit: AuditDuty::BestEffort,
        }
    }

    /// The steps, in order; the first that refuses ends the request.
    async fn admit(
        &mut self,
        inbound: &Inbound,
        request: &Request<Incoming>,
        conn: &ConnInfo,
        unsafe_path: Option<path::PathRefusal>,
    ) -> Result<Admitted, Denial> {
        let settings = &inbound.settings;
        check_shape(settings, request, unsafe_path, self.bytes_in)?;
        let Some(bundle) = inbound.policy.load() else {
            return Err(Denial::new(
                Reason::PolicyUnavailable,
                "this service has not received its access policy yet; retry in a few seconds",
            ));
        };
        self.tenant.clone_from(&bundle.tenant);
        if bundle.classification.audit_fails_closed() {
            self.audit = AuditDuty::FailClosed(None);
        }
        self.client_ip =
            allowlist::client_ip(conn.peer.ip(), request.headers(), &settings.trusted_proxies)?;
        let mode = effective_mode(settings.mode, bundle.classification);
        let credentials =
            credentials::required(mode, conn.certificate(), presented_key(request.headers())?)?;
        allowlist::check_tenant(&bundle.tenant_ip_allowlist, self.client_ip)?;
        let mut peer_tenant = None;
        if credentials.peer
            && let (Some(identity), Some(id)) = (&conn.peer_identity, &conn.peer_id)
        {
            self.principal = Cow::Owned(id.clone());
            authorize_peer::authorize_peer(identity, id, &settings.peers, &bundle)?;
            peer_tenant = identity.tenant.as_ref().map(|t| t.tenant().to_owned());
        }
        let (method, path) = (self.method.as_str(), self.path.as_str());
        let scope =
            authorize::route_scope(&bundle, settings.scopes_override.as_ref(), method, path);
        if let Some(scope) = scope {
            self.action = Cow::Owned(format!("api.{scope}"));
        }

        let Some(presented) = credentials.key else {
            // The principal is the peer, set when it was admitted above.
            authorize::authorize_peer(scope, settings.peers_need_mapped_route, method, path)?;
            self.hold_audit_room(inbound)?;
            return Ok(Admitted {
                policy: bundle,
                scopes: None,
                rate: None,
                peer_tenant,
            });
        };
        let verified = inbound
            .keys
            .verify(presented, &bundle, self.client_ip, jiff::Timestamp::now())
            .await?;
        self.principal = Cow::Owned(format!("key:{}", verified.masked));
        allowlist::check_key(verified.policy.ip_allowlist(), self.client_ip)?;
        let scopes = verified.policy.scopes();
        authorize::authorize_key(scopes.iter(), scope, method, path)?;
        let verdict =
            inbound
                .limits
                .admit(verified.key_id, verified.policy.rate_limit(), &bundle)?;
        self.hold_audit_room(inbound)?;
        let scopes = Some(scopes.joined().clone());
        Ok(Admitted {
            policy: bundle.clone(),
            scopes,
            rate: Some(verdict),
            peer_tenant,
        })
    }

    /// Fail-closed tenants: the record's room is held before the app sees the
    /// request, so no request reaches the app that cannot be audited.
    fn hold_audit_room(&mut self, inbound: &Inbound) -> Result<(), Denial> {
        if let AuditDuty::FailClosed(room) = &mut self.audit {
            let reserved = inbound.audit.reserve().map_err(|refused| {
                tracing::warn!(error = %refused, "audit cannot take a record; refusing before the app");
                Denial::new(
                    Reason::AuditUnavailable,
                    "this tenant requires an audit record for every request and the audit log is unavailable; retry later",
                )
            })?;
            *room = Some(reserved);
        }
        Ok(())
    }

    /// Logs a denial, writes the record and counts the request. A fail-closed tenant's
    /// allowed request whose record is refused after all is answered with 503.
    fn finish(
        self,
        inbound: &Inbound,
        outcome: Result<Response<ProxyBody>, Denial>,
    ) -> Response<ProxyBody> {
        let (mut response, mut reason) = match outcome {
            Ok(response) => (response, Reason::Allowed),
            Err(denial) => {
                let reason = denial.reason;
                (denial.into_response(), reason)
            }
        };
        let latency = self.started.elapsed();
        let mut status = response.status().as_u16();
        if reason != Reason::Allowed {
            self.denied().log(reason, status);
        }
        let (fails_closed, reserved) = match self.audit {
            AuditDuty::BestEffort => (false, None),
            AuditDuty::FailClosed(reserved) => (true, reserved),
        };
        // The record takes the request's strings; copies are kept only for the one case
        // that logs after recording (an allowed request the audit log fails closed on).
        let kept = (fails_closed && reason == Reason::Allowed).then(|| {
            (
                self.principal.clone(),
                self.method.clone(),
                self.path.clone(),
            )
        });
        let client_ip = self.client_ip;
        let record = RequestOutcome {
            timestamp: self.timestamp,
            tenant: self.tenant,
            principal: self.principal.into_owned(),
            action: self.action.into_owned(),
            client_ip: self.client_ip,
            method: self.method,
            path: self.path,
            status,
            latency,
            bytes_in: self.bytes_in,
            bytes_out: content_length(response.headers()),
            decision: if reason == Reason::Allowed {
                Decision::Allow
            } else {
                Decision::Deny
            },
            reason: reason.as_str(),
        };
        let recorded = match reserved {
            Some(reserved) => inbound.audit.record_reserved(reserved, record),
            None => inbound.audit.record(record),
        };
        if let Err(refused) = recorded {
            tracing::warn!(error = %refused, fails_closed, "audit hook refused a record");
            if let Some((principal, method, path)) = kept {
                response = Denial::new(
                    Reason::AuditUnavailable,
                    "this tenant requires an audit record for every request and the audit log cannot be written; retry later",
                )
                .into_response();
                reason = Reason::AuditUnavailable;
                status = response.status().as_u16();
                let denied = Denied {
                    principal: &principal,
                    client_ip,
                    method: &method,
                    path: &path,
                };
                denied.log(reason, status);
            }
        }
        inbound
            .metrics
            .request(reason, status, latency.as_secs_f64());
        response
    }

    fn denied(&self) -> Denied<'_> {
        Denied {
            principal: &self.principal,
            client_ip: self.client_ip,
            method: &self.method,
            path: &self.path,
        }
    }
}

/// What a denial's log line names.
struct Denied<'a> {
    principal: &'a str,
    client_ip: IpAddr,
    method: &'a str,
    path: &'a str,
}

impl Denied<'_> {
    fn log(&self, reason: Reason, status: u16) {
        tracing::info!(
            reason = reason.as_str(),
            status,
            principal = %self.principal,
            client_ip = %self.client_ip,
            method = %self.method,
            path = %self.path,
            "request denied"
        );
    }
}

/// Refusals that need no credentials: a path that cannot be judged safely, too many
/// header fields (HTTP/2 has no parser limit on their number), a declared body over
/// the limit.
fn check_shape(
    settings: &InboundSettings,
    request: &Request<Incoming>,
    unsafe_path: Option<path::PathRefusal>,
    declared_body: u64,
) -> Result<(), Denial> {
    if let Some(refusal) = unsafe_path {
        return Err(Denial::new(Reason::UnsafePath, refusal.message()));
    }
    if request.headers().len() > settings.max_headers {
        return Err(Denial::new(
            Reason::TooManyHeaders,
            format!(
                "the request has more than {} header fields; send fewer",
                settings.max_headers
            ),
        ));
    }
    if declared_body > settings.max_request_body_bytes as u64 {
        return Err(body_too_large(settings.max_request_body_bytes));
    }
    Ok(())
}

/// The mode in force: the configured one, raised to mTLS *and* key for `Restricted`
/// tenants (DESIGN.md §6). Every configured mode already authenticates, which is all
/// `Internal` and `Confidential` ask for.
pub fn effective_mode(configured: InboundMode, classification: DataClassification) -> InboundMode {
    match classification {
        DataClassification::Restricted => InboundMode::MtlsAndApikey,
        _ => configured,
    }
}

fn body_too_large(limit: usize) -> Denial {
    Denial::new(
        Reason::BodyTooLarge,
        format!(
            "the request body is over {limit} bytes, this service's limit; send a smaller body"
        ),
    )
}

fn content_length(headers: &HeaderMap) -> u64 {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn wants_upgrade<B>(request: &Request<B>) -> bool {
    request.version() == http::Version::HTTP_11
        && request.headers().contains_key(header::UPGRADE)
        && request
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

impl Inbound {
    /// Serves one request.
    pub async fn handle(
        self: Arc<Self>,
        mut request: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let in_flight = conn.activity.request_started();
        // Everything below (scopes, audit, the app) sees the normalised path; a refused
        // path is audited as sent.
        let unsafe_path = path::normalize_request(&mut request).err();
        let mut exchange = Exchange::start(&request, &conn);
        let outcome = match exchange.admit(&self, &request, &conn, unsafe_path).await {
            Err(denial) => Err(denial),
            Ok(admitted) => {
                let client_upgrade =
                    wants_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
                self.forward(request, admitted, &exchange.principal, client_upgrade)
                    .await
            }
        };
        let response = exchange.finish(&self, outcome);
        Ok(response.map(|body| InFlightBody::wrap(body, in_flight)))
    }

    async fn forward(
        &self,
        request: Request<Incoming>,
        admitted: Admitted,
        principal: &str,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Result<Response<ProxyBody>, Denial> {
        let (mut parts, body) = request.into_parts();
        let forwarded = Forwarded {
            principal,
            tenant: &admitted.policy.tenant,
            scopes: admitted.scopes.as_deref(),
            peer_tenant: admitted.peer_tenant.as_deref(),
        };
        headers::to_upstream(&mut parts.headers, &forwarded, client_upgrade.is_some());
        // A streamed (chunked, or HTTP/2 without content-length) body is cut off at
        // the limit, so the proxy never holds more than a frame of it.
        let limit = self.settings.max_request_body_bytes;
        let request = Request::from_parts(parts, Limited::new(body, limit).boxed());
        let mut response = self
            .upstream
            .forward(request, self.settings.request_timeout)
            .await
            .map_err(|denial| match denial.reason {
                Reason::BodyTooLarge => body_too_large(limit),
                _ => denial,
            })?;
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switching && let Some(client) = client_upgrade {
            let app = hyper::upgrade::on(&mut response);
            upstream::splice_upgrades(client, app);
        }
        crate::listener::proxy_http::strip_hop_by_hop(response.headers_mut(), switching);
        if let Some(verdict) = admitted.rate {
            verdict.insert_headers(response.headers_mut());
        }
        Ok(response)
    }
}
