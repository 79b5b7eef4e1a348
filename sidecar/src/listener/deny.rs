//! Denials: one reason per way a request can be refused, each with its status and a
//! JSON body `{"error": "<what to do>", "reason": "<snake_case>"}`.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

use super::body::ProxyBody;

/// Why a request was decided the way it was. The names are metric labels and the
/// `reason` of denial bodies, so the set is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Allowed and forwarded.
    Allowed,
    /// Neither a client certificate nor an API key was presented.
    CredentialsRequired,
    /// The mode needs a client certificate.
    ClientCertificateRequired,
    /// The client certificate carries no workload `spiffe://` URI SAN (a tenant URI
    /// alone names no workload).
    NoWorkloadIdentity,
    /// The peer is a workload of another trust domain that nobody admitted.
    PeerTrustDomainNotAllowed,
    /// The peer is a workload of another tenant (or of none) that nobody admitted.
    PeerTenantNotAllowed,
    /// The peer's certificate was issued to a pod that is gone.
    PeerCertificateRevoked,
    /// The mode needs an API key.
    ApiKeyRequired,
    /// `Authorization` and `X-API-Key` carry different keys.
    ConflictingKeys,
    /// The key is not in the `ak_<id>_<secret><checksum>` format.
    MalformedKey,
    /// No such key: an unknown key id or a wrong secret (one answer for both, so it
    /// does not tell which key ids exist).
    InvalidKey,
    /// Too many wrong keys from this client or for this key id lately; refused before
    /// any bcrypt runs.
    TooManyFailedKeys,
    /// The key is past its expiry.
    KeyExpired,
    /// The key was revoked.
    KeyRevoked,
    /// The client address is outside the tenant's allowlist.
    IpNotAllowed,
    /// The client address is outside the key's allowlist.
    IpNotAllowedForKey,
    /// The route maps to no scope.
    NoScopeForRoute,
    /// The key lacks the route's scope.
    MissingScope,
    /// The key's rate limit is exhausted.
    RateLimited,
    /// Too many keys are being verified at once.
    Busy,
    /// No policy has been loaded yet.
    PolicyUnavailable,
    /// The audit hook refused and the tenant's audit fails closed.
    AuditUnavailable,
    /// The app could not be reached.
    UpstreamUnavailable,
    /// The app did not answer in time.
    UpstreamTimeout,
    /// The request cannot be forwarded as sent.
    BadRequest,
    /// The path is ambiguous (encoded separators, backslashes, NUL, dot segments with
    /// parameters) or climbs above `/`.
    UnsafePath,
    /// The request body is over `limits.maxRequestBodyBytes`.
    BodyTooLarge,
    /// The request has more header fields than `limits.maxHeaders`.
    TooManyHeaders,
    /// Outbound: the request names no destination (no absolute URI, no Host).
    DestinationRequired,
    /// Outbound: no workload certificate to present yet.
    IdentityUnavailable,
    /// Outbound: the destination's proxy could not be reached.
    PeerUnreachable,
    /// Outbound: the TLS handshake with the destination's proxy failed (its certificate
    /// is not from our trust bundle, or it refused ours).
    PeerHandshakeFailed,
    /// Outbound: the destination presented another identity than
    /// `X-Portcullis-Expect-Identity` asked for.
    PeerIdentityMismatch,
}

impl Reason {
    /// The snake_case name used in bodies, metrics and audit.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::CredentialsRequired => "credentials_required",
            Self::ClientCertificateRequired => "client_certificate_required",
            Self::NoWorkloadIdentity => "no_workload_identity",
            Self::PeerTrustDomainNotAllowed => "peer_trust_domain_not_allowed",
            Self::PeerTenantNotAllowed => "peer_tenant_not_allowed",
            Self::PeerCertificateRevoked => "peer_certificate_revoked",
            Self::ApiKeyRequired => "api_key_required",
            Self::ConflictingKeys => "conflicting_keys",
            Self::MalformedKey => "malformed_key",
            Self::InvalidKey => "invalid_key",
            Self::KeyExpired => "key_expired",
            Self::KeyRevoked => "key_revoked",
            Self::IpNotAllowed => "ip_not_allowed",
            Self::IpNotAllowedForKey => "ip_not_allowed_for_key",
            Self::NoScopeForRoute => "no_scope_for_route",
            Self::MissingScope => "missing_scope",
            Self::RateLimited => "rate_limited",
            Self::TooManyFailedKeys => "too_many_failed_keys",
            Self::Busy => "busy",
            Self::PolicyUnavailable => "policy_unavailable",
            Self::AuditUnavailable => "audit_unavailable",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::BadRequest => "bad_request",
            Self::UnsafePath => "unsafe_path",
            Self::BodyTooLarge => "body_too_large",
            Self::TooManyHeaders => "too_many_headers",
            Self::DestinationRequired => "destination_required",
            Self::IdentityUnavailable => "identity_unavailable",
            Self::PeerUnreachable => "peer_unreachable",
            Self::PeerHandshakeFailed => "peer_handshake_failed",
            Self::PeerIdentityMismatch => "peer_identity_mismatch",
        }
    }

    /// The status a denial for this reason carries.
    pub fn status(self) -> StatusCode {
        match self {
            Self::Allowed => StatusCode::OK,
            Self::ConflictingKeys
            | Self::BadRequest
            | Self::UnsafePath
            | Self::DestinationRequired => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::TooManyHeaders => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::CredentialsRequired
            | Self::ClientCertificateRequired
            | Self::NoWorkloadIdentity
            | Self::ApiKeyRequired
            | Self::MalformedKey
            | Self::InvalidKey
            | Self::KeyExpired
            | Self::KeyRevoked => StatusCode::UNAUTHORIZED,
            Self::IpNotAllowed
            | Self::PeerTrustDomainNotAllowed
            | Self::PeerTenantNotAllowed
            | Self::PeerCertificateRevoked
            | Self::IpNotAllowedForKey
            | Self::NoScopeForRoute
            | Self::MissingScope => StatusCode::FORBIDDEN,
            Self::RateLimited | Self::TooManyFailedKeys => StatusCode::TOO_MANY_REQUESTS,
            Self::Busy
            | Self::PolicyUnavailable
            | Self::AuditUnavailable
            | Self::IdentityUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamUnavailable
            | Self::PeerUnreachable
            | Self::PeerHandshakeFailed
            | Self::PeerIdentityMismatch => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

/// A refused request: the reason and a sentence telling the caller what to do. The
/// sentence never contains a presented secret.
#[derive(Clone, Debug)]
pub struct Denial {
    /// Why.
    pub reason: Reason,
    /// What to do about it.
    pub error: String,
    /// Extra response headers (`Retry-After`, `RateLimit-*`).
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl Denial {
    /// A denial with a message.
    pub fn new(reason: Reason, error: impl Into<String>) -> Self {
        Self {
            reason,
            error: error.into(),
            headers: Vec::new(),
        }
    }

    /// The status this denial is answered with.
    pub fn status(&self) -> StatusCode {
        self.reason.status()
    }

    /// The JSON response.
    pub fn into_response(self) -> Response<ProxyBody> {
        let body =
            serde_json::json!({"error": self.error, "reason": self.reason.as_str()}).to_string();
        let mut response = Response::new(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        );
        *response.status_mut() = self.reason.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        for (name, value) in self.headers {
            headers.insert(name, value);
        }
        response
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn denial_is_json_with_reason_and_status() {
        let response =
            Denial::new(Reason::MissingScope, "this key lacks scope \"events\"").into_response();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["reason"], "missing_scope");
        assert!(json["error"].as_str().unwrap().contains("events"));
    }
}
