//! The contract between the operator and the proxy for run-to-completion pods.
//!
//! Before native sidecars (Kubernetes 1.28+), the proxy is a regular container, and a
//! Job's pod completes only once every container has exited: the proxy must leave when
//! the app has. It cannot see the app's processes, and an app without a port gives it
//! nothing to probe, but the operator sees the pod's container statuses. So the proxy
//! of a run-to-completion pod asks the policy server, over the same mTLS as the policy
//! stream, `GET` [`path`]; the server holds the request until the pod's app containers
//! have all terminated for good (or for [`HOLD_SECONDS`]) and answers [`AppExitAnswer`].
//! A workload may ask only about pods of its own tenant and namespace.

use serde::{Deserialize, Serialize};

use crate::names::{is_dns_label, is_dns_subdomain};

/// Path prefix of the endpoint on the policy server.
pub const APP_EXIT_PREFIX: &str = "/v1/app-exit/";

/// How long the server holds a request before answering "still running".
pub const HOLD_SECONDS: u64 = 50;

/// The endpoint for `pod` in `namespace` of `tenant`.
pub fn path(tenant: &str, namespace: &str, pod: &str) -> String {
    format!("{APP_EXIT_PREFIX}{tenant}/{namespace}/{pod}")
}

/// `(tenant, namespace, pod)` of an endpoint path, when it is one.
pub fn parse_path(path: &str) -> Option<(&str, &str, &str)> {
    let mut parts = path.strip_prefix(APP_EXIT_PREFIX)?.split('/');
    let (tenant, namespace, pod) = (parts.next()?, parts.next()?, parts.next()?);
    (parts.next().is_none()
        && is_dns_subdomain(tenant)
        && is_dns_label(namespace)
        && is_dns_subdomain(pod))
    .then_some((tenant, namespace, pod))
}

/// The answer: whether every app container of the pod has exited for good.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppExitAnswer {
    /// True once no app container will run again; the proxy then drains and exits 0.
    pub apps_exited: bool,
    /// The app containers' names and exit codes, for the proxy's log.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exit_codes: Vec<(String, i32)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_round_trip_and_junk_is_refused() {
        let p = path("acme", "batch", "report-x7k2p");
        assert_eq!(parse_path(&p), Some(("acme", "batch", "report-x7k2p")));
        assert_eq!(parse_path("/v1/app-exit/acme/batch"), None);
        assert_eq!(parse_path("/v1/app-exit/acme/batch/pod/extra"), None);
        assert_eq!(parse_path("/v1/app-exit/acme/../pod"), None);
        assert_eq!(parse_path("/v1/app-exit/Acme/batch/pod"), None);
        assert_eq!(parse_path("/v1/policy/acme"), None);
    }
}
