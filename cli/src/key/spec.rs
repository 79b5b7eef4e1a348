//! From `key create` flags to an [`ApiKeySpec`], checked locally before anything is sent.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use portcullis_crds::{ApiKeySpec, Cidr, FieldErrors, RateLimit, ScopeName};

use crate::cli::KeyCreateArgs;

/// The spec the flags describe. Scope names and CIDRs are taken as typed, so
/// [`check`] can report each bad one with its field path.
pub fn from_args(args: &KeyCreateArgs) -> ApiKeySpec {
    ApiKeySpec {
        role: args.role.trim().to_owned(),
        scopes: args
            .scopes
            .iter()
            .filter_map(|s| scope_as_written(s.trim()))
            .collect(),
        rate_limit: args.rate_limit.map(|r| RateLimit {
            requests: r.requests,
            per: r.per,
            burst: args.burst,
        }),
        ip_allowlist: args
            .ip_allowlist
            .iter()
            .map(|c| Cidr::new(c.trim()))
            .collect(),
        expires_after: args.expires_after,
        expires_at: args.expires_at.map(Time),
        revoked: false,
        rotate: 0,
    }
}

/// A scope name kept exactly as typed (validation reports it with its index).
/// `ScopeName` is `#[serde(transparent)]` over a String, so deserialising keeps the text
/// unchecked, the way the API server hands it back; it never fails for a string.
fn scope_as_written(text: &str) -> Option<ScopeName> {
    serde_json::from_value(serde_json::Value::String(text.to_owned())).ok()
}

/// [`ApiKeySpec::validate`] plus what only makes sense at creation: a role, and an
/// expiry in the future.
pub fn check(spec: &ApiKeySpec, now: Timestamp) -> Result<(), FieldErrors> {
    let mut errors = spec.validate().err().unwrap_or_default();
    if spec.role.is_empty() {
        errors.push("spec.role", "name the role the key acts as, e.g. Developer");
    }
    if let Some(at) = &spec.expires_at
        && at.0 <= now
    {
        errors.push(
            "spec.expiresAt",
            format!("{} is in the past: the key would never be usable", at.0),
        );
    }
    errors.into_result()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command, KeyCommand};
    use clap::Parser;

    fn args(extra: &[&str]) -> Option<KeyCreateArgs> {
        let argv = ["kubectl-portcullis", "key", "create", "ingest"]
            .into_iter()
            .chain(extra.iter().copied());
        match Cli::try_parse_from(argv) {
            Ok(Cli {
                command: Command::Key(KeyCommand::Create(args)),
                ..
            }) => Some(args),
            _ => None,
        }
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn good_flags_make_a_valid_spec() {
        let Some(args) = args(&[
            "--role",
            "Developer",
            "--scopes",
            "identify, events",
            "--rate-limit",
            "1000/1m",
            "--burst",
            "10",
            "--ip-allowlist",
            "10.0.0.0/8",
        ]) else {
            panic!("flags refused");
        };
        let spec = from_args(&args);
        assert_eq!(check(&spec, now()), Ok(()));
        assert_eq!(spec.scopes.len(), 2);
        assert_eq!(spec.scopes[1].as_str(), "events");
        let limit = spec.rate_limit.clone().unwrap_or_default();
        assert_eq!((limit.requests, limit.burst), (1000, Some(10)));
        let json = serde_json::to_value(&spec).unwrap_or_default();
        assert_eq!(json["rateLimit"]["per"], "1m");
        assert_eq!(json["ipAllowlist"][0], "10.0.0.0/8");
    }

    #[test]
    fn bad_values_are_reported_with_their_paths() {
        let Some(args) = args(&[
            "--role",
            "Developer",
            "--scopes",
            "identify,Events,identify",
            "--ip-allowlist",
            "10.0.0.0/8,10.0.0.300/8",
            "--expires-at",
            "2020-01-01T00:00:00Z",
        ]) else {
            panic!("flags refused");
        };
        let errors = check(&from_args(&args), now()).err().unwrap_or_default();
        assert!(errors.mentions("spec.scopes[1]"), "{errors}");
        assert!(errors.mentions("spec.scopes[2]"), "{errors}");
        assert!(errors.mentions("spec.ipAllowlist[1]"), "{errors}");
        assert!(errors.mentions("spec.expiresAt"), "{errors}");
        assert!(!errors.mentions("spec.ipAllowlist[0]"), "{errors}");
        assert!(errors.to_string().contains("10.0.0.300/8"));
    }
}
