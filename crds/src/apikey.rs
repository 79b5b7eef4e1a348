//! `ApiKey`: a scoped, rate-limited, expiring credential for calling a tenant's APIs.

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    cidr::Cidr, duration::DurationSpec, scope::ScopeName, tenant::RateLimit,
    validation::FieldErrors,
};

/// Type of the Secret that carries a key's plaintext token.
pub const SECRET_TYPE: &str = "portcullis.dev/api-key";
/// Data key of the token inside that Secret.
pub const SECRET_TOKEN_KEY: &str = "token";

/// The Secret name for an ApiKey: `<name>-key`.
pub fn secret_name(api_key_name: &str) -> String {
    format!("{api_key_name}-key")
}

/// An API key. The operator generates the token, writes it once into the Secret
/// `<name>-key` and keeps only its bcrypt hash in the status.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "portcullis.dev",
    doc = "A scoped, rate-limited, expiring API key; the token is written once to the Secret <name>-key.",
    version = "v1alpha1",
    kind = "ApiKey",
    plural = "apikeys",
    shortname = "ak",
    category = "portcullis",
    namespaced,
    status = "ApiKeyStatus",
    printcolumn = r#"{"name":"Role","type":"string","jsonPath":".spec.role"}"#,
    printcolumn = r#"{"name":"Scopes","type":"string","jsonPath":".spec.scopes"}"#,
    printcolumn = r#"{"name":"Key","type":"string","jsonPath":".status.prefix"}"#,
    printcolumn = r#"{"name":"Expires","type":"string","jsonPath":".status.expiresAt"}"#,
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeySpec {
    /// The role this key acts as (`Developer`, or a custom Role's name).
    #[schemars(length(min = 1, max = 63))]
    pub role: String,
    /// Scopes granted; each must be granted by the role.
    #[schemars(length(min = 1))]
    pub scopes: Vec<ScopeName>,
    /// Rate limit for this key (default: the tenant's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Networks this key may be used from (empty: any allowed by the tenant).
    #[serde(default)]
    pub ip_allowlist: Vec<Cidr>,
    /// Lifetime from issue (default: the tenant's `defaults.keyExpiry`, 90d).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_after: Option<DurationSpec>,
    /// Fixed expiry instead of `expiresAfter` (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// A revoked key is refused everywhere within a second.
    #[serde(default)]
    pub revoked: bool,
    /// Bump to issue a new token; the previous one stays valid for the rotation overlap.
    #[serde(default)]
    pub rotate: u32,
}

/// Where a key is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum KeyState {
    /// Not issued yet.
    #[default]
    Pending,
    /// Issued and usable.
    Active,
    /// Past its expiry.
    Expired,
    /// Revoked by `spec.revoked`.
    Revoked,
    /// Its role or scopes are not valid; see the Ready condition.
    Invalid,
}

impl KeyState {
    /// The name shown in status and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Active => "Active",
            Self::Expired => "Expired",
            Self::Revoked => "Revoked",
            Self::Invalid => "Invalid",
        }
    }
}

/// A previous token kept valid during a rotation overlap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetiredKey {
    /// Its key id.
    pub key_id: String,
    /// Its bcrypt hash.
    pub hash: String,
    /// When it stops being accepted.
    pub valid_until: Time,
}

/// What the operator issued for a key. Holds no secret: only a bcrypt hash.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyStatus {
    /// Where the key is in its life.
    #[serde(default)]
    pub state: KeyState,
    /// Public key id (`ak_<keyId>_...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// The token's visible prefix, `ak_<keyId>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// bcrypt hash of the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// When the current token was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<Time>,
    /// When the current token expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// The `spec.rotate` value the current token answers.
    #[serde(default)]
    pub rotation: u32,
    /// Secret holding the plaintext token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// Previous tokens still inside their rotation overlap.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_keys: Vec<RetiredKey>,
    /// `Ready` and friends.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl ApiKeySpec {
    /// Checks what the schema cannot: scope names and duplicates, CIDRs, one expiry form.
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errors = FieldErrors::default();
        if self.scopes.is_empty() {
            errors.push("spec.scopes", "grant at least one scope");
        }
        let mut seen = BTreeSet::new();
        for (i, scope) in self.scopes.iter().enumerate() {
            if let Err(e) = scope.validate() {
                errors.push(format!("spec.scopes[{i}]"), e.to_string());
            } else if !seen.insert(scope.as_str()) {
                errors.push(
                    format!("spec.scopes[{i}]"),
                    format!("scope {scope} is listed twice"),
                );
            }
        }
        for (i, cidr) in self.ip_allowlist.iter().enumerate() {
            if let Err(e) = cidr.parse() {
                errors.push(format!("spec.ipAllowlist[{i}]"), e.to_string());
            }
        }
        if self.expires_after.is_some() && self.expires_at.is_some() {
            errors.push(
                "spec.expiresAt",
                "set either expiresAfter or expiresAt, not both",
            );
        }
        if let Some(limit) = &self.rate_limit {
            if limit.requests == 0 {
                errors.push("spec.rateLimit.requests", "must be at least 1");
            }
            if limit.per.get().is_zero() {
                errors.push("spec.rateLimit.per", "must be longer than 0s");
            }
        }
        errors.into_result()
    }

    /// When a token issued at `issued_at` expires, given the tenant's default lifetime.
    pub fn expiry(
        &self,
        issued_at: jiff::Timestamp,
        tenant_default: DurationSpec,
    ) -> jiff::Timestamp {
        if let Some(at) = &self.expires_at {
            return at.0;
        }
        let lifetime = self.expires_after.unwrap_or(tenant_default).get();
        jiff::SignedDuration::try_from(lifetime)
            .ok()
            .and_then(|d| issued_at.checked_add(d).ok())
            .unwrap_or(jiff::Timestamp::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(scopes: &[&str]) -> ApiKeySpec {
        ApiKeySpec {
            role: "Developer".into(),
            scopes: scopes.iter().map(|s| ScopeName::new(*s).unwrap()).collect(),
            ..ApiKeySpec::default()
        }
    }

    #[test]
    fn valid_spec_passes() {
        let mut s = spec(&["identify", "events"]);
        s.ip_allowlist = vec![Cidr::new("10.0.0.0/8"), Cidr::new("2001:db8::/32")];
        assert!(s.validate().is_ok());
    }

    #[test]
    fn each_bad_field_is_named() {
        let mut s = spec(&["identify", "identify"]);
        s.ip_allowlist = vec![Cidr::new("10.0.0.0/8"), Cidr::new("10.0.0.300/8")];
        s.expires_after = Some(DurationSpec::days(1));
        s.expires_at = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        s.rate_limit = Some(RateLimit {
            requests: 0,
            per: DurationSpec::minutes(1),
            burst: None,
        });
        let errors = s.validate().unwrap_err();
        assert!(errors.mentions("spec.scopes[1]"), "{errors}");
        assert!(errors.mentions("spec.ipAllowlist[1]"), "{errors}");
        assert!(errors.mentions("spec.expiresAt"), "{errors}");
        assert!(errors.mentions("spec.rateLimit.requests"), "{errors}");
        assert!(!errors.mentions("spec.ipAllowlist[0]"));
        assert!(errors.to_string().contains("10.0.0.300/8"));
    }

    #[test]
    fn empty_scopes_are_refused() {
        assert!(spec(&[]).validate().unwrap_err().mentions("spec.scopes"));
    }

    #[test]
    fn expiry_uses_spec_then_tenant_default() {
        let issued = jiff::Timestamp::from_second(1_000_000).unwrap();
        let mut s = spec(&["identify"]);
        assert_eq!(
            s.expiry(issued, DurationSpec::days(90)).as_second(),
            1_000_000 + 90 * 86_400
        );
        s.expires_after = Some(DurationSpec::minutes(5));
        assert_eq!(
            s.expiry(issued, DurationSpec::days(90)).as_second(),
            1_000_300
        );
        s.expires_after = None;
        s.expires_at = Some(Time(jiff::Timestamp::from_second(42).unwrap()));
        assert_eq!(s.expiry(issued, DurationSpec::days(90)).as_second(), 42);
    }

    #[test]
    fn secret_name_follows_the_contract() {
        assert_eq!(secret_name("ingest"), "ingest-key");
    }
}
