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
use portcullis_api::audit_key::{self, AuditKeyAnswer};
use portcullis_audit::{DataKey, KeyRing, keyring::parse_key_material};

use super::operator_client::{self, OperatorError};
use crate::{config::env::OperatorEndpoint, tls::ClientConfigSource};

/// The path of the key endpoint for `tenant`.
pub fn key_path(tenant: &str) -> String {
    audit_key::path(tenant)
}

/// The tenant's keys as the operator handed them out. `Debug` shows versions only.
#[derive(Clone, Debug)]
pub struct TenantKeys {
    /// The tenant.
    pub tenant: String,
    /// The key new segments are written with.
    pub active: DataKey,
    /// Every version handed out (for reading).
    pub ring: KeyRing,
    /// The tenant's audit retention, when the operator says.
    pub retention_days: Option<u32>,
}

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
    // serde's message could quote the body; say only what is wrong with the shape.
    let answer: AuditKeyAnswer = serde_json::from_slice(body).map_err(|_| {
        KeyError::Invalid(
            "not {\"tenant\", \"activeVersion\", \"keys\": {\"<version>\": \"<base64>\"}}".into(),
        )
    })?;
    if answer.tenant != tenant {
        return Err(KeyError::Invalid(format!(
            "keys are for tenant {:?}, we are in {tenant:?}",
            answer.tenant
        )));
    }
    let mut ring = KeyRing::new();
    for (version, material) in &answer.keys {
        let version: u32 = version
            .parse()
            .map_err(|_| KeyError::Invalid(format!("key version {version:?} is not a number")))?;
        let key = parse_key_material(version, material.as_bytes()).map_err(|_| {
            KeyError::Invalid(format!("key version {version} is not 32 bytes of base64"))
        })?;
        ring.insert(key);
    }
    let active = ring.get(answer.active_version).cloned().ok_or_else(|| {
        KeyError::Invalid(format!(
            "activeVersion {} is not among the keys",
            answer.active_version
        ))
    })?;
    Ok(TenantKeys {
        tenant: answer.tenant,
        active,
        ring,
        retention_days: answer.retention_days,
    })
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use base64::Engine as _;

    use super::*;

    fn b64(byte: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([byte; 32])
    }

    #[test]
    fn the_documented_answer_parses() {
        let body = format!(
            r#"{{"tenant":"acme","activeVersion":3,"keys":{{"2":"{}","3":"{}"}},"retentionDays":400}}"#,
            b64(2),
            b64(3)
        );
        let keys = parse_answer("acme", body.as_bytes()).unwrap();
        assert_eq!(keys.active.version(), 3);
        assert_eq!(keys.active.bytes(), &[3u8; 32]);
        assert_eq!(keys.ring.versions(), vec![2, 3]);
        assert_eq!(keys.retention_days, Some(400));
        assert!(!format!("{keys:?}").contains(&b64(3)));
    }

    #[test]
    fn wrong_tenant_missing_active_and_garbage_are_refused_without_echoing() {
        let other = format!(
            r#"{{"tenant":"globex","activeVersion":1,"keys":{{"1":"{}"}}}}"#,
            b64(1)
        );
        assert!(
            parse_answer("acme", other.as_bytes())
                .unwrap_err()
                .to_string()
                .contains("globex")
        );
        let missing = format!(
            r#"{{"tenant":"acme","activeVersion":2,"keys":{{"1":"{}"}}}}"#,
            b64(1)
        );
        assert!(
            parse_answer("acme", missing.as_bytes())
                .unwrap_err()
                .to_string()
                .contains("activeVersion 2")
        );
        let short = r#"{"tenant":"acme","activeVersion":1,"keys":{"1":"c2hvcnQ="}}"#;
        let err = parse_answer("acme", short.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(!err.contains("c2hvcnQ"), "{err}");
        let garbage = br#"{"secret": "hunter2"#;
        assert!(
            !parse_answer("acme", garbage)
                .unwrap_err()
                .to_string()
                .contains("hunter2")
        );
    }
}
