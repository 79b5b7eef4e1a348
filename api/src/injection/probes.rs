//! The contract between the injector and the proxy for the app's own probes.
//!
//! In an injected pod every inbound TCP connection is redirected to the proxy, so a
//! kubelet `httpGet` or `tcpSocket` probe on an app port would reach the proxy, not the
//! app: an HTTP probe fails the TLS handshake and a TCP probe succeeds whatever the app
//! does. The injector therefore points each such probe at the proxy's admin port,
//! `GET /app-health/<container>/<kind>` (the admin port is never redirected), and hands
//! the proxy the original probes in [`APP_PROBES_ENV`]; the proxy runs the original
//! check against the app on 127.0.0.1 and answers with its outcome, so the probe keeps
//! telling the truth about the app. The same idea as Istio's probe rewrite.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The proxy's environment variable holding the original probes, JSON [`AppProbes`].
pub const APP_PROBES_ENV: &str = super::env::APP_PROBES;

/// Path prefix of the rewritten probes on the admin port.
pub const APP_HEALTH_PREFIX: &str = "/app-health/";

/// Which of a container's probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProbeKind {
    /// `livenessProbe`.
    Liveness,
    /// `readinessProbe`.
    Readiness,
    /// `startupProbe`.
    Startup,
}

impl ProbeKind {
    /// Every kind, in the order the injector visits them.
    pub const ALL: [Self; 3] = [Self::Liveness, Self::Readiness, Self::Startup];

    /// The word in the admin path.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Liveness => "livez",
            Self::Readiness => "readyz",
            Self::Startup => "startupz",
        }
    }

    /// The container field (`livenessProbe`, ...).
    pub fn field(self) -> &'static str {
        match self {
            Self::Liveness => "livenessProbe",
            Self::Readiness => "readinessProbe",
            Self::Startup => "startupProbe",
        }
    }
}

/// A request header an HTTP probe sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeHeader {
    /// Header name.
    pub name: String,
    /// Header value.
    pub value: String,
}

/// What the proxy checks on the app's behalf.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ProbeCheck {
    /// `GET http://127.0.0.1:<port><path>`: 200-399 is healthy, as for the kubelet.
    Http {
        /// The request path (with query), `/` when the probe named none.
        path: String,
        /// Extra request headers.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        headers: Vec<ProbeHeader>,
    },
    /// A TCP connection to `127.0.0.1:<port>` that opens.
    Tcp,
}

/// One original probe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppProbe {
    /// The app port probed (named ports resolved by the injector).
    pub port: u16,
    /// What is checked.
    #[serde(flatten)]
    pub check: ProbeCheck,
    /// The probe's own `timeoutSeconds` (the kubelet's default is 1).
    pub timeout_seconds: u32,
}

/// The original probes by admin path (`/app-health/<container>/<kind>`).
pub type AppProbes = BTreeMap<String, AppProbe>;

/// The admin path a rewritten probe asks.
pub fn health_path(container: &str, kind: ProbeKind) -> String {
    format!("{APP_HEALTH_PREFIX}{container}/{}", kind.as_str())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn probes_round_trip_through_the_environment_format() {
        let mut probes = AppProbes::new();
        probes.insert(
            health_path("app", ProbeKind::Readiness),
            AppProbe {
                port: 8080,
                check: ProbeCheck::Http {
                    path: "/healthz".into(),
                    headers: vec![ProbeHeader {
                        name: "X-Probe".into(),
                        value: "1".into(),
                    }],
                },
                timeout_seconds: 2,
            },
        );
        probes.insert(
            health_path("app", ProbeKind::Liveness),
            AppProbe {
                port: 8080,
                check: ProbeCheck::Tcp,
                timeout_seconds: 1,
            },
        );
        let text = serde_json::to_string(&probes).unwrap();
        assert!(
            text.contains(
                r#""/app-health/app/readyz":{"port":8080,"type":"http","path":"/healthz""#
            ),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<AppProbes>(&text).unwrap(), probes);
    }
}
