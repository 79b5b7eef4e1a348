//! The tenant's data-encryption key, from the operator:
//!
//! `GET https://<policy-svc>:8090/v1/audit-key/<tenant>` over mTLS with the workload
//! certificate answers, only to workloads whose certificate's tenant URI SAN is
//! `<tenant>`,
//!
//! ```json
//! {"tenant": "acme", "activeVersion": 3, "keys": {"2": "<base64 32 bytes>", "3": "<base64 32 bytes>"}}
//! ```
//!
//! (optionally `"retentionDays": 365`). New segments are encrypted with the active
//! version; the older ones are there so a reader on the pod could open older segments.
//! Neither the body nor any key is ever logged.

use std::time::Duration;

use http::StatusCode;
use portcullis_api::audit_key;

use super::operator_client::{self, OperatorError};
use crate::{config::env::OperatorEndpoint, tls::ClientConfigSource};

/// The path of the key endpoint for `tenant`.
pub fn key_path(tenant: &str) -> String {
    audit_key::path(tenant)
}

pub use portcullis_audit::TenantKeys;

/// Why no key was obtained.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The request did not complete.
    #[error(transparent)]
    Operator(#[from] OperatorError),
    /// The operator does not serve keys (older operator) or has none for the tenant.
    #[error("the operator has no audit key for tenant {tenant:?} (HTTP {status})")]
    NotServed {
        /// The tenant asked for.
        tenant: String,
        /// 404 and the like.
        status: u16,
    },
    /// The operator refused: our certificate is not for this tenant.
    #[error(
        "the operator refused the audit key for tenant {tenant:?} (HTTP {status}); the workload certificate must name that tenant"
    )]
    Refused {
        /// The tenant asked for.
        tenant: String,
        /// 401 or 403.
        status: u16,
    },
    /// Any other status.
    #[error("the operator answered HTTP {0} for the audit key")]
    Status(u16),
    /// The answer is not the documented shape.
    #[error("the audit key answer is unusable: {0}")]
    Invalid(String),
}

/// Parses the endpoint's answer for `tenant`.
pub fn parse_answer(tenant: &str, body: &[u8]) -> Result<TenantKeys, KeyError> {
    TenantKeys::from_answer(tenant, body).map_err(|e| KeyError::Invalid(e.0))
}

/// Asks the operator for `tenant`'s keys.
pub async fn fetch(
    endpoint: &OperatorEndpoint,
    tls: &ClientConfigSource,
    tenant: &str,
) -> Result<TenantKeys, KeyError> {
    let (status, body) =
        operator_client::get(endpoint, tls, &key_path(tenant), Duration::from_secs(10)).await?;
    match status {
        StatusCode::OK => parse_answer(tenant, &body),
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED | StatusCode::NOT_IMPLEMENTED => {
            Err(KeyError::NotServed {
                tenant: tenant.to_owned(),
                status: status.as_u16(),
            })
        }
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(KeyError::Refused {
            tenant: tenant.to_owned(),
            status: status.as_u16(),
        }),
        other => Err(KeyError::Status(other.as_u16())),
    }
}
