//! The identity service wire contract, shared by the operator (server) and the proxy
//! (client): `POST /v1/certificate` with an [`IssueRequest`], answered by an
//! [`IssueResponse`] or an [`ErrorBody`]. One definition, so the two sides cannot
//! drift apart.

use std::fmt;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// The audience a projected ServiceAccount token must carry for the identity service.
pub const IDENTITY_AUDIENCE: &str = "portcullis.dev/identity";

/// The path of the issuance endpoint.
pub const CERTIFICATE_PATH: &str = "/v1/certificate";

/// A certificate request: a PEM CSR and the projected ServiceAccount token that proves
/// which pod is asking.
#[derive(Clone, Serialize, Deserialize)]
pub struct IssueRequest {
    /// PEM-encoded PKCS#10 certificate signing request.
    pub csr: String,
    /// Projected ServiceAccount token with audience [`IDENTITY_AUDIENCE`].
    pub token: String,
}

impl fmt::Debug for IssueRequest {
    // The token is a bearer credential: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssueRequest")
            .field("csr_len", &self.csr.len())
            .field("token", &"<redacted>")
            .finish()
    }
}

/// A signed workload certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssueResponse {
    /// The leaf certificate (PEM).
    pub certificate: String,
    /// The issuing intermediate (PEM), to be sent after the leaf.
    pub chain: String,
    /// Every root currently trusted (PEM, concatenated).
    pub trust_bundle: String,
    /// The leaf's notAfter.
    pub expires_at: Timestamp,
    /// When the workload should ask for a new certificate (before jitter).
    pub renew_after: Timestamp,
    /// The DNS names in the leaf: those of the Services that select the pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
    /// The revision of the namespace's Service selectors the names were decided from;
    /// the proxy renews when the policy bundle lists another one for its namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names_revision: Option<String>,
}

/// A refusal: `{"error": "...", "reason": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Human-readable explanation.
    pub error: String,
    /// Machine-readable reason.
    pub reason: RefusalReason,
}

/// Why the identity service refused to issue a certificate. The names are a contract:
/// they appear in responses and as the `reason` label of
/// `portcullis_identity_issuance_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RefusalReason {
    /// The token was not authenticated by the API server.
    TokenInvalid,
    /// The token is not for the identity audience.
    WrongAudience,
    /// The token is not bound to a pod.
    TokenNotBoundToPod,
    /// The pod the token is bound to no longer exists.
    PodNotFound,
    /// The pod exists but its UID differs from the token's.
    PodMismatch,
    /// The pod runs under a different ServiceAccount than the token's.
    ServiceAccountMismatch,
    /// The pod's namespace does not belong to a tenant.
    NoTenant,
    /// The CSR could not be parsed or its signature is wrong.
    CsrInvalid,
    /// The CSR asks for a CA certificate (basicConstraints).
    CsrHasCaFlag,
    /// The CSR asks for names beyond the workload's SPIFFE ID.
    CsrExtraSans,
    /// The CSR asks for a SPIFFE ID other than the workload's.
    CsrWrongIdentity,
    /// The CSR's key is not ECDSA P-256.
    UnsupportedKey,
    /// The request body is not the expected JSON.
    MalformedRequest,
    /// The Kubernetes API could not be asked; retry later.
    Unavailable,
    /// Something failed inside the CA.
    Internal,
    /// No such endpoint.
    NotFound,
}

impl RefusalReason {
    /// The reason's name, as used in JSON and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TokenInvalid => "TokenInvalid",
            Self::WrongAudience => "WrongAudience",
            Self::TokenNotBoundToPod => "TokenNotBoundToPod",
            Self::PodNotFound => "PodNotFound",
            Self::PodMismatch => "PodMismatch",
            Self::ServiceAccountMismatch => "ServiceAccountMismatch",
            Self::NoTenant => "NoTenant",
            Self::CsrInvalid => "CsrInvalid",
            Self::CsrHasCaFlag => "CsrHasCaFlag",
            Self::CsrExtraSans => "CsrExtraSans",
            Self::CsrWrongIdentity => "CsrWrongIdentity",
            Self::UnsupportedKey => "UnsupportedKey",
            Self::MalformedRequest => "MalformedRequest",
            Self::Unavailable => "Unavailable",
            Self::Internal => "Internal",
            Self::NotFound => "NotFound",
        }
    }

    /// Whether asking again later may succeed without changing the request.
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::Unavailable | Self::Internal)
    }
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn response_uses_camel_case() {
        let r = IssueResponse {
            certificate: "c".into(),
            chain: "i".into(),
            trust_bundle: "b".into(),
            expires_at: Timestamp::from_second(100).unwrap(),
            renew_after: Timestamp::from_second(50).unwrap(),
            dns_names: Vec::new(),
            names_revision: None,
        };
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["trustBundle"], "b");
        assert_eq!(v["expiresAt"], "1970-01-01T00:01:40Z");
        assert_eq!(v["renewAfter"], "1970-01-01T00:00:50Z");
    }

    #[test]
    fn reason_serialises_as_its_name() {
        let body = ErrorBody {
            error: "x".into(),
            reason: RefusalReason::CsrExtraSans,
        };
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"error":"x","reason":"CsrExtraSans"}"#
        );
        assert_eq!(RefusalReason::CsrExtraSans.as_str(), "CsrExtraSans");
    }

    #[test]
    fn request_debug_hides_the_token() {
        let r = IssueRequest {
            csr: "pem".into(),
            token: "secret-token".into(),
        };
        assert!(!format!("{r:?}").contains("secret-token"));
    }
}
