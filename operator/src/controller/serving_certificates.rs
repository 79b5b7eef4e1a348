//! The Tenant's `ServingCertificates` condition: the proxy has no API access, so the
//! operator checks the bring-your-own serving certificate Secrets its pods use — the one
//! each injected pod mounts (`portcullis-serving-certificate`) and the Tenant's
//! `spec.defaults.servingCertificateSecret` in every bound namespace — with the proxy's
//! own verdict ([`portcullis_tls::serving_certificate::check`]). A problem never
//! stops a pod: its proxy serves the workload certificate meanwhile; the condition and
//! a Warning Event say which Secret to fix and how.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use portcullis_tls::serving_certificate::{self, Refusal};

use crate::webhook::inject::SERVING_CERT_VOLUME;

/// Condition type reporting the serving certificate Secrets.
pub const SERVING_CERTIFICATES: &str = "ServingCertificates";

/// A Secret a pod or the Tenant names, `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SecretRef {
    /// Its namespace (the pod's).
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl std::fmt::Display for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The Secrets to check: those injected pods mount, and the Tenant's default in each
/// bound namespace.
pub fn referenced<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    tenant_default: Option<&str>,
    namespaces: &[String],
) -> BTreeSet<SecretRef> {
    let mounted = pods.into_iter().flat_map(|pod| {
        let namespace = pod.namespace().unwrap_or_default();
        pod.spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
            .filter(|v| v.name == SERVING_CERT_VOLUME)
            .filter_map(|v| v.secret.as_ref()?.secret_name.clone())
            .map(move |name| SecretRef {
                namespace: namespace.clone(),
                name,
            })
            .collect::<Vec<_>>()
    });
    let defaults = tenant_default.into_iter().flat_map(|name| {
        namespaces.iter().map(move |ns| SecretRef {
            namespace: ns.clone(),
            name: name.to_owned(),
        })
    });
    mounted.chain(defaults).collect()
}

/// What is wrong with a Secret; `as_str` is the condition's and the Event's reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Problem {
    /// No such Secret.
    SecretMissing,
    /// No usable `tls.crt`/`tls.key`.
    NotTls,
    /// The key is not the certificate's.
    KeyMismatch,
    /// The certificate expired.
    SecretExpired,
    /// The certificate is not valid yet.
    SecretNotYetValid,
}

impl Problem {
    /// The reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SecretMissing => "SecretMissing",
            Self::NotTls => "NotTls",
            Self::KeyMismatch => "KeyMismatch",
            Self::SecretExpired => "SecretExpired",
            Self::SecretNotYetValid => "SecretNotYetValid",
        }
    }

    fn fix(self) -> &'static str {
        match self {
            Self::SecretMissing | Self::NotTls => {
                "create a kubernetes.io/tls Secret with tls.crt and tls.key (e.g. a cert-manager Certificate's secretName)"
            }
            Self::KeyMismatch => "put the certificate's own key in tls.key, leaf first in tls.crt",
            Self::SecretExpired | Self::SecretNotYetValid => {
                "renew the certificate (is its cert-manager Certificate Ready?)"
            }
        }
    }
}

/// One Secret's problem.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Finding {
    /// The Secret.
    pub secret: SecretRef,
    /// What is wrong.
    pub problem: Problem,
    /// The proxy's words for it (no key material).
    pub detail: String,
}

/// The verdict on one Secret at `now` (Unix seconds).
pub fn verdict(secret: Option<&Secret>, now: i64) -> Result<(), (Problem, String)> {
    let Some(secret) = secret else {
        return Err((Problem::SecretMissing, "not found".into()));
    };
    let data = secret.data.as_ref();
    let file = |key: &str| data.and_then(|d| d.get(key)).map(|b| b.0.as_slice());
    let (Some(cert), Some(key)) = (file("tls.crt"), file("tls.key")) else {
        return Err((
            Problem::NotTls,
            format!(
                "type {:?} without tls.crt and tls.key",
                secret.type_.as_deref().unwrap_or("Opaque")
            ),
        ));
    };
    serving_certificate::check(cert, key, now).map_err(|refused| {
        let problem = match refused.reason {
            Refusal::Missing | Refusal::Unparseable => Problem::NotTls,
            Refusal::KeyMismatch => Problem::KeyMismatch,
            Refusal::Expired => Problem::SecretExpired,
            Refusal::NotYetValid => Problem::SecretNotYetValid,
        };
        (problem, refused.detail)
    })
}

/// The condition for `checked` Secrets with `findings`; `None` when no Secret is
/// named at all. `lastTransitionTime` is kept while the status holds.
pub fn condition(
    checked: usize,
    findings: &[Finding],
    generation: Option<i64>,
    previous: &[Condition],
    now: Time,
) -> Option<Condition> {
    if checked == 0 {
        return None;
    }
    let (status, reason, message) = match findings.first() {
        None => (
            "True",
            "SecretsUsable",
            format!("{checked} serving certificate Secret(s) usable"),
        ),
        Some(first) => {
            let each: Vec<String> = findings
                .iter()
                .map(|f| {
                    format!(
                        "{}: {} ({}); {}",
                        f.secret,
                        f.problem.as_str(),
                        f.detail,
                        f.problem.fix()
                    )
                })
                .collect();
            (
                "False",
                first.problem.as_str(),
                format!(
                    "pods serve the workload certificate to clients outside the mesh instead: {}",
                    each.join("; ")
                ),
            )
        }
    };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == SERVING_CERTIFICATES && c.status == status)
        .map_or(now, |c| c.last_transition_time.clone());
    Some(Condition {
        type_: SERVING_CERTIFICATES.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
