//! A tenant's data-encryption keys as the operator hands them out
//! (`GET /v1/audit-key/<tenant>`, [`AuditKeyAnswer`]): the proxy seals its segments with
//! them, the collector its stored days. Neither the answer nor any key is ever logged.

use portcullis_api::audit_key::AuditKeyAnswer;

use crate::keyring::{DataKey, KeyRing, parse_key_material};

/// The tenant's keys. `Debug` shows versions only.
#[derive(Clone, Debug)]
pub struct TenantKeys {
    /// The tenant.
    pub tenant: String,
    /// The key new data is sealed with.
    pub active: DataKey,
    /// Every version handed out (for reading).
    pub ring: KeyRing,
    /// The tenant's audit retention, when the operator says.
    pub retention_days: Option<u32>,
}

/// Why an answer is unusable; never quotes the body (it may hold key material).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidAnswer(pub String);

impl TenantKeys {
    /// Parses the endpoint's answer, which must be for `tenant`.
    pub fn from_answer(tenant: &str, body: &[u8]) -> Result<Self, InvalidAnswer> {
        // serde's message could quote the body; say only what is wrong with the shape.
        let answer: AuditKeyAnswer = serde_json::from_slice(body).map_err(|_| {
            InvalidAnswer(
                "not {\"tenant\", \"activeVersion\", \"keys\": {\"<version>\": \"<base64>\"}}"
                    .into(),
            )
        })?;
        if answer.tenant != tenant {
            return Err(InvalidAnswer(format!(
                "keys are for tenant {:?}, not {tenant:?}",
                answer.tenant
            )));
        }
        let mut ring = KeyRing::new();
        for (version, material) in &answer.keys {
            let version: u32 = version
                .parse()
                .map_err(|_| InvalidAnswer(format!("key version {version:?} is not a number")))?;
            let key = parse_key_material(version, material.as_bytes()).map_err(|_| {
                InvalidAnswer(format!("key version {version} is not 32 bytes of base64"))
            })?;
            ring.insert(key);
        }
        let active = ring.get(answer.active_version).cloned().ok_or_else(|| {
            InvalidAnswer(format!(
                "activeVersion {} is not among the keys",
                answer.active_version
            ))
        })?;
        Ok(Self {
            tenant: answer.tenant,
            active,
            ring,
            retention_days: answer.retention_days,
        })
    }

    /// Only `key`, active (tests and demos: the operator hands out the real ones).
    pub fn single(tenant: &str, key: DataKey) -> Self {
        Self {
            tenant: tenant.to_owned(),
            ring: KeyRing::from_keys([key.clone()]),
            active: key,
            retention_days: None,
        }
    }

    /// One random key, version 1 (tests and demos).
    pub fn generate(tenant: &str) -> Self {
        Self::single(tenant, DataKey::generate(1))
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
        let keys = TenantKeys::from_answer("acme", body.as_bytes()).unwrap();
        assert_eq!(keys.active.version(), 3);
        assert_eq!(keys.active.bytes(), &[3u8; 32]);
        assert_eq!(keys.ring.versions(), vec![2, 3]);
        assert_eq!(keys.retention_days, Some(400));
        assert!(!format!("{keys:?}").contains(&b64(3)));
    }

    #[test]
    fn wrong_tenant_missing_active_and_garbage_are_refused_without_echoing() {
        let parse = |body: &[u8]| {
            TenantKeys::from_answer("acme", body)
                .unwrap_err()
                .to_string()
        };
        let other = format!(
            r#"{{"tenant":"globex","activeVersion":1,"keys":{{"1":"{}"}}}}"#,
            b64(1)
        );
        assert!(parse(other.as_bytes()).contains("globex"));
        let missing = format!(
            r#"{{"tenant":"acme","activeVersion":2,"keys":{{"1":"{}"}}}}"#,
            b64(1)
        );
        assert!(parse(missing.as_bytes()).contains("activeVersion 2"));
        let short = r#"{"tenant":"acme","activeVersion":1,"keys":{"1":"c2hvcnQ="}}"#;
        let err = parse(short.as_bytes());
        assert!(!err.contains("c2hvcnQ"), "{err}");
        assert!(!parse(br#"{"secret": "hunter2"#).contains("hunter2"));
    }
}
