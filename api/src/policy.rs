//! The policy server's paths (operator: server, proxy: client): `GET /v1/policy/<tenant>`
//! answers the tenant's current bundle, `GET /v1/policy/<tenant>/watch` streams it as
//! newline-delimited JSON. The bundle itself is `portcullis_crds::PolicyBundle`, built
//! from the custom resources.

/// Path prefix of the policy endpoints.
pub const POLICY_PREFIX: &str = "/v1/policy/";
/// Suffix that turns the one-shot answer into a long-lived stream.
pub const WATCH_SUFFIX: &str = "/watch";

/// The one-shot endpoint for `tenant`.
pub fn current_path(tenant: &str) -> String {
    format!("{POLICY_PREFIX}{tenant}")
}

/// The streaming endpoint for `tenant`.
pub fn watch_path(tenant: &str) -> String {
    format!("{POLICY_PREFIX}{tenant}{WATCH_SUFFIX}")
}

/// A policy endpoint, as the server reads its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyPath<'a> {
    /// The tenant asked for; not yet checked to be a valid name.
    pub tenant: &'a str,
    /// Whether the stream was asked for.
    pub watch: bool,
}

/// The tenant and kind of a policy endpoint path, when it is one.
pub fn parse_path(path: &str) -> Option<PolicyPath<'_>> {
    let rest = path.strip_prefix(POLICY_PREFIX)?;
    Some(match rest.strip_suffix(WATCH_SUFFIX) {
        Some(tenant) => PolicyPath {
            tenant,
            watch: true,
        },
        None => PolicyPath {
            tenant: rest,
            watch: false,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_round_trip() {
        assert_eq!(watch_path("acme"), "/v1/policy/acme/watch");
        assert_eq!(current_path("acme"), "/v1/policy/acme");
        assert_eq!(
            parse_path(&watch_path("acme")),
            Some(PolicyPath {
                tenant: "acme",
                watch: true
            })
        );
        assert_eq!(
            parse_path(&current_path("acme")),
            Some(PolicyPath {
                tenant: "acme",
                watch: false
            })
        );
        assert_eq!(parse_path("/v1/audit-key/acme"), None);
    }
}
