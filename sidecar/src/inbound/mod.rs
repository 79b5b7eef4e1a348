//! The inbound request path, composed from the one-step modules: policy loaded →
//! client address → credentials the mode requires → tenant allowlist → mTLS peer
//! admitted ([`authorize_peer`]) → route scope → API key (verify, key allowlist, scope,
//! rate limit) or mTLS peer route → audit
//! availability → headers → app. Every request, allowed or denied, is counted and
//! audited once. Connections come in through [`accept`].
//!
//! Modes: `mtls` needs a peer SPIFFE ID (key headers are ignored, and stripped);
//! `apikey` needs a key; `mtls-or-apikey` needs either (a key, when sent, must be
//! valid and then decides scopes); `mtls-and-apikey` needs both and scopes come from
//! the key. A `Restricted` tenant always gets `mtls-and-apikey`, whatever is configured.

use std::{borrow::Cow, convert::Infallible, net::IpAddr, sync::Arc, time::Instant};

use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use portcullis_crds::{DataClassification, InboundMode, scope::ScopeMap};

pub mod accept;
pub mod allowlist;
pub mod authn;
pub mod authorize;
pub mod authorize_peer;
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

/// What is known about a request so far, for its audit record.
struct Facts {
    tenant: String,
    principal: Cow<'static, str>,
    action: Cow<'static, str>,
    client_ip: IpAddr,
    fails_closed: bool,
    /// Room for the record, held from before forwarding (fail-closed tenants).
    reserved: Option<Reservation>,
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

/// The mode in force: the configured one, raised to mTLS *and* key for `Restricted`
/// tenants (DESIGN.md §6). Every configured mode already authenticates, which is all
/// `Internal` and `Confidential` ask for.
pub fn effective_mode(configured: InboundMode, classification: DataClassification) -> InboundMode {
    match classification {
        DataClassification::Restricted => InboundMode::MtlsAndApikey,
        _ => configured,
    }
}

fn log_denial(
    reason: Reason,
    status: u16,
    principal: &str,
    client_ip: IpAddr,
    method: &str,
    path: &str,
) {
    tracing::info!(
        reason = reason.as_str(),
        status,
        principal = %principal,
        client_ip = %client_ip,
        method = %method,
        path = %path,
        "request denied"
    );
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
        let started = Instant::now();
        let timestamp = jiff::Timestamp::now();
        let method = request.method().as_str().to_owned();
        // Everything below (scopes, audit, the app) sees the normalised path; a refused
        // path is audited as sent.
        let unsafe_path = path::normalize_request(&mut request).err();
        let path = request.uri().path().to_owned();
        let bytes_in = content_length(request.headers());
        let mut facts = Facts {
            tenant: String::new(),
            principal: Cow::Borrowed("anonymous"),
            action: Cow::Borrowed("api.unmapped"),
            client_ip: conn.peer.ip().to_canonical(),
            fails_closed: false,
            reserved: None,
        };

        let admitted = match self.check_shape(&request, unsafe_path, bytes_in) {
            Ok(()) => {
                self.admit(&request, &conn, &mut facts, &method, &path)
                    .await
            }
            Err(denial) => Err(denial),
        };
        let outcome = match admitted {
            Err(denial) => Err(denial),
            Ok(admitted) => {
                let client_upgrade =
                    wants_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
                self.forward(request, admitted, &facts.principal, client_upgrade)
                    .await
            }
        };
        let (mut response, mut reason) = match outcome {
            Ok(response) => (response, Reason::Allowed),
            Err(denial) => {
                let reason = denial.reason;
                (denial.into_response(), reason)
            }
        };
        let latency = started.elapsed();
        let mut status = response.status().as_u16();
        if reason != Reason::Allowed {
            log_denial(
                reason,
                status,
                &facts.principal,
                facts.client_ip,
                &method,
                &path,
            );
        }
        // The record takes the request's strings; copies are kept only for the one case
        // that logs after recording (an allowed request the audit log fails closed on).
        let kept = (facts.fails_closed && reason == Reason::Allowed)
            .then(|| (facts.principal.clone(), method.clone(), path.clone()));
        let fails_closed = facts.fails_closed;
        let client_ip = facts.client_ip;
        let reserved = facts.reserved.take();
        let record = RequestOutcome {
            timestamp,
            tenant: facts.tenant,
            principal: facts.principal.into_owned(),
            action: facts.action.into_owned(),
            client_ip,
            method,
            path,
            status,
            latency,
            bytes_in,
            bytes_out: content_length(response.headers()),
            decision: if reason == Reason::Allowed {
                Decision::Allow
            } else {
                Decision::Deny
            },
            reason: reason.as_str(),
        };
        let recorded = match reserved {
            Some(reserved) => self.audit.record_reserved(reserved, record),
            None => self.audit.record(record),
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
                log_denial(reason, status, &principal, client_ip, &method, &path);
            }
        }
        self.metrics.request(reason, status, latency.as_secs_f64());
        Ok(response.map(|body| InFlightBody::wrap(body, in_flight)))
    }

    /// Refusals that need no credentials: a path that cannot be judged safely, too
    /// many header fields (HTTP/2 has no parser limit on their number), a declared
    /// body over the limit.
    fn check_shape(
        &self,
        request: &Request<Incoming>,
        unsafe_path: Option<path::PathRefusal>,
        declared_body: u64,
    ) -> Result<(), Denial> {
        if let Some(refusal) = unsafe_path {
            return Err(Denial::new(Reason::UnsafePath, refusal.message()));
        }
        let settings = &self.settings;
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

    async fn admit(
        &self,
        request: &Request<Incoming>,
        conn: &ConnInfo,
        facts: &mut Facts,
        method: &str,
        path: &str,
    ) -> Result<Admitted, Denial> {
        let settings = &self.settings;
        let Some(bundle) = self.policy.load() else {
            return Err(Denial::new(
                Reason::PolicyUnavailable,
                "this service has not received its access policy yet; retry in a few seconds",
            ));
        };
        facts.tenant.clone_from(&bundle.tenant);
        facts.fails_closed = bundle.classification.audit_fails_closed();
        facts.client_ip =
            allowlist::client_ip(conn.peer.ip(), request.headers(), &settings.trusted_proxies)?;
        let presented = presented_key(request.headers())?;

        let mode = effective_mode(settings.mode, bundle.classification);
        let key = if mode == InboundMode::Mtls {
            None
        } else {
            presented
        };
        let peer = conn.peer_id.as_deref();
        let need_peer = matches!(mode, InboundMode::Mtls | InboundMode::MtlsAndApikey);
        let need_key = matches!(mode, InboundMode::Apikey | InboundMode::MtlsAndApikey);
        let no_workload_identity = || {
            Denial::new(
                Reason::NoWorkloadIdentity,
                "your client certificate names no workload (a spiffe://<trust-domain>/ns/<namespace>/sa/<service-account> URI SAN; a tenant URI alone is no identity); present a workload certificate issued by the mesh",
            )
        };
        if need_peer && peer.is_none() {
            return Err(if conn.client_cert {
                no_workload_identity()
            } else {
                Denial::new(
                    Reason::ClientCertificateRequired,
                    "this service requires mutual TLS; present a client certificate issued by the mesh",
                )
            });
        }
        if need_key && key.is_none() {
            return Err(Denial::new(
                Reason::ApiKeyRequired,
                "this service requires an API key; send it as \"Authorization: Bearer ak_...\" or \"X-API-Key: ak_...\"",
            ));
        }
        if key.is_none() && peer.is_none() {
            if conn.client_cert {
                return Err(no_workload_identity());
            }
            return Err(Denial::new(
                Reason::CredentialsRequired,
                "present a client certificate (mutual TLS) or an API key (\"Authorization: Bearer ak_...\")",
            ));
        }

        if !allowlist::permits(&bundle.tenant_ip_allowlist, facts.client_ip) {
            return Err(Denial::new(
                Reason::IpNotAllowed,
                format!(
                    "requests from {} are not allowed for this tenant; call from an allowed network",
                    facts.client_ip
                ),
            ));
        }
        // The peer is admitted whenever it takes part: alone, or with a key in
        // mtls-and-apikey. (In mtls-or-apikey a key, when sent, decides alone.)
        let mut peer_tenant = None;
        if (need_peer || key.is_none())
            && let (Some(identity), Some(id)) = (&conn.peer_identity, peer)
        {
            facts.principal = Cow::Owned(id.to_owned());
            authorize_peer::authorize_peer(identity, id, &settings.peers, &bundle)?;
            peer_tenant = identity.tenant.as_ref().map(|t| t.tenant().to_owned());
        }
        let scope =
            authorize::route_scope(&bundle, settings.scopes_override.as_ref(), method, path);
        if let Some(scope) = scope {
            facts.action = Cow::Owned(format!("api.{scope}"));
        }

        let Some(presented) = key else {
            // The principal is the peer, set when it was admitted above.
            authorize::authorize_peer(scope, settings.peers_need_mapped_route, method, path)?;
            self.audit_gate(facts)?;
            return Ok(Admitted {
                policy: bundle,
                scopes: None,
                rate: None,
                peer_tenant,
            });
        };

        let verified = self
            .keys
            .verify(presented, &bundle, facts.client_ip, jiff::Timestamp::now())
            .await?;
        facts.principal = Cow::Owned(format!("key:{}", verified.masked));
        if !allowlist::permits(verified.policy.ip_allowlist(), facts.client_ip) {
            return Err(Denial::new(
                Reason::IpNotAllowedForKey,
                format!(
                    "this API key may not be used from {}; call from a network on the key's allowlist",
                    facts.client_ip
                ),
            ));
        }
        let scopes = verified.policy.scopes();
        authorize::authorize_key(scopes.iter(), scope, method, path)?;
        let verdict = self
            .limits
            .check(verified.key_id, verified.policy.rate_limit(), &bundle);
        if !verdict.allowed {
            let mut denial = Denial::new(
                Reason::RateLimited,
                "this API key is over its rate limit; wait for the number of seconds in Retry-After",
            );
            denial.headers = verdict.headers();
            return Err(denial);
        }
        self.audit_gate(facts)?;
        let scopes = Some(scopes.joined().clone());
        Ok(Admitted {
            policy: bundle.clone(),
            scopes,
            rate: Some(verdict),
            peer_tenant,
        })
    }

    /// Fail-closed tenants: the record's room is reserved before the app sees the
    /// request, so no request reaches the app that cannot be audited.
    fn audit_gate(&self, facts: &mut Facts) -> Result<(), Denial> {
        if facts.fails_closed {
            let reserved = self.audit.reserve().map_err(|refused| {
                tracing::warn!(error = %refused, "audit cannot take a record; refusing before the app");
                Denial::new(
                    Reason::AuditUnavailable,
                    "this tenant requires an audit record for every request and the audit log is unavailable; retry later",
                )
            })?;
            facts.reserved = Some(reserved);
        }
        Ok(())
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
        Ok(response.map(|body| body.map_err(Into::into).boxed()))
    }
}
