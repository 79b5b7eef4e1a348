//! `GET /v1/audit-key/<tenant>` on the policy server: the tenant's data-encryption keys
//! for the proxy's encrypted audit segments. The operator serialises [`AuditKeyAnswer`],
//! the proxy deserialises the same type:
//!
//! ```json
//! {"tenant": "acme", "activeVersion": 3, "keys": {"2": "<base64 32 bytes>", "3": "<base64 32 bytes>"}, "retentionDays": 365}
//! ```

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Path prefix of the endpoint.
pub const AUDIT_KEY_PREFIX: &str = "/v1/audit-key/";

/// The endpoint for `tenant`.
pub fn path(tenant: &str) -> String {
    format!("{AUDIT_KEY_PREFIX}{tenant}")
}

/// The tenant of an endpoint path, when it is one (not yet checked to be a valid name).
pub fn parse_path(path: &str) -> Option<&str> {
    path.strip_prefix(AUDIT_KEY_PREFIX)
}

/// The answer: every key version still needed, and which one new segments use.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditKeyAnswer {
    /// The tenant the keys belong to.
    pub tenant: String,
    /// The version new segments are encrypted with.
    pub active_version: u32,
    /// Version (decimal) → key material (standard base64 of 32 bytes).
    pub keys: BTreeMap<String, String>,
    /// The tenant's audit retention, when the operator knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_days: Option<u32>,
}

impl fmt::Debug for AuditKeyAnswer {
    // Key material must never reach a log: show the versions only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditKeyAnswer")
            .field("tenant", &self.tenant)
            .field("active_version", &self.active_version)
            .field("versions", &self.keys.keys().collect::<Vec<_>>())
            .field("retention_days", &self.retention_days)
            .finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_shape() {
        let answer = AuditKeyAnswer {
            tenant: "acme".into(),
            active_version: 3,
            keys: BTreeMap::from([("3".to_owned(), "c2VjcmV0".to_owned())]),
            retention_days: None,
        };
        let json = serde_json::to_string(&answer).unwrap();
        assert_eq!(
            json,
            r#"{"tenant":"acme","activeVersion":3,"keys":{"3":"c2VjcmV0"}}"#
        );
        assert_eq!(
            serde_json::from_str::<AuditKeyAnswer>(&json).unwrap(),
            answer
        );
        assert!(!format!("{answer:?}").contains("c2VjcmV0"));
        assert_eq!(path("acme"), "/v1/audit-key/acme");
        assert_eq!(parse_path(&path("acme")), Some("acme"));
    }
}
