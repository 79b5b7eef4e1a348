//! `run --config-from-env`: the injected pod's configuration, from the variables the
//! operator's injector sets (operator/src/webhook/inject/mod.rs, "Proxy environment").
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `POD_NAME`, `POD_NAMESPACE`, `PORTCULLIS_SERVICE_ACCOUNT` | who we are (downward API) | required |
//! | `PORTCULLIS_APP_PORT` | the app's port on 127.0.0.1 | none: inbound answers 502 |
//! | `PORTCULLIS_INBOUND_MODE` | `mtls`, `apikey`, `mtls-or-apikey`, `mtls-and-apikey` | `mtls-or-apikey` |
//! | `PORTCULLIS_SCOPES_MAP` | JSON scope → routes, replaces the tenant's | the tenant's |
//! | `PORTCULLIS_IDENTITY_URL` | the operator's identity service, `https://host:8443` | required |
//! | `PORTCULLIS_POLICY_URL` | the operator's policy server, `https://host:8090` | required |
//! | `PORTCULLIS_TOKEN_PATH` | the projected ServiceAccount token | `/var/run/secrets/portcullis.dev/identity/token` |
//! | `PORTCULLIS_TRUST_BUNDLE` | PEM roots (the trust-bundle ConfigMap) | `/var/run/portcullis.dev/trust-bundle/ca-bundle.crt` |
//! | `PORTCULLIS_DATA_DIR` | writable directory (encrypted audit under `audit/`) | `/var/lib/portcullis` |
//! | `PORTCULLIS_EXIT_WHEN_APP_EXITS` | `true`: exit 0 once the app port stops accepting | `false` |
//! | `PORTCULLIS_APP_EXIT_GRACE` | how long the app port must stay closed | `5s` |
//! | `PORTCULLIS_TRUST_DOMAIN` | SPIFFE trust domain | `cluster.local` |
//! | `PORTCULLIS_TENANT` | tenant when the certificate carries none | from the certificate |
//! | `PORTCULLIS_APP_PROBES` | the app's `httpGet`/`tcpSocket` probes, JSON, answered at `:4191/app-health/...` | none |
//! | `PORTCULLIS_SERVING_CERT_DIR` | directory with `tls.crt`/`tls.key` (a mounted `kubernetes.io/tls` Secret) presented to clients outside the mesh | none: the workload certificate for everyone |
//! | `PORTCULLIS_AUDIT_COLLECTOR_URL` | the audit collector records are shipped to, `https://host:port`, through a spool under the data dir | none: records stay in the pod |
//! | `PORTCULLIS_OUTBOUND_KEEP_PORT` | outbound dials the destination's own port (its init step redirects it to its proxy; a Service exposes only app ports) instead of 4143 | `true` |

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use portcullis_api::injection::env as vars;
use portcullis_audit::CheckpointPolicy;
use portcullis_crds::{InboundMode, scope::ScopeMap};

use super::{
    AdminConfig, ConfigError, InboundConfig, KeySettings, Limits, OutboundConfig, Problems,
    UpstreamConfig, parse_https_authority, parse_scopes_annotation,
};
use crate::control::identity::{IdentityEndpoint, RenewalSettings, TrustDomain, WorkloadId};

/// The proxy's writable directory in an injected pod.
pub use portcullis_api::injection::env::DATA_MOUNT as DEFAULT_DATA_DIR;
pub use portcullis_api::injection::env::{
    DEFAULT_TOKEN_PATH, DEFAULT_TRUST_BUNDLE, DEFAULT_TRUST_DOMAIN,
};

/// Default room for records awaiting the collector: 64 MiB, about 100k records.
pub const DEFAULT_SPOOL_BYTES: u64 = 64 * 1024 * 1024;

/// An operator endpoint reached over mTLS with the workload certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorEndpoint {
    /// Host name (also the TLS server name the operator's certificate must carry).
    pub host: String,
    /// Port (8090).
    pub port: u16,
}

/// Audit settings of an injected proxy (sinks are fixed: stdout, the encrypted file
/// under the data dir when the operator hands out the tenant's key, and the audit
/// collector when one is configured).
#[derive(Clone, Debug)]
pub struct ClusterAudit {
    /// When signed checkpoints are written.
    pub checkpoint: CheckpointPolicy,
    /// How long to keep asking for the tenant's data key at start before running with
    /// stdout only.
    pub key_wait: Duration,
    /// How often the data key is asked for again (it rotates weekly).
    pub key_refresh: Duration,
    /// The audit collector, `https://host:port` (`PORTCULLIS_AUDIT_COLLECTOR_URL`);
    /// `None`: records stay in the pod.
    pub collector: Option<String>,
    /// Most bytes of records waiting under the data dir for the collector's
    /// acknowledgement. When it is full a fail-closed tenant's requests are refused; a
    /// collector outage alone refuses nothing while there is room.
    pub spool_max_bytes: u64,
    /// Backoff between shipments the collector did not acknowledge.
    pub ship_retry: portcullis_audit::retry::RetryPolicy,
}

impl Default for ClusterAudit {
    fn default() -> Self {
        Self {
            checkpoint: CheckpointPolicy::default(),
            key_wait: Duration::from_secs(5),
            key_refresh: Duration::from_secs(600),
            collector: None,
            spool_max_bytes: DEFAULT_SPOOL_BYTES,
            ship_retry: portcullis_audit::retry::RetryPolicy::default(),
        }
    }
}

/// Everything an injected proxy needs, validated.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// The pod (audit records, chain ids).
    pub pod_name: String,
    /// Our SPIFFE ID: trust domain, namespace, ServiceAccount.
    pub workload: WorkloadId,
    /// The tenant to use when the certificate names none.
    pub tenant: Option<String>,
    /// The app's port; `None` when the pod declares none.
    pub app_port: Option<u16>,
    /// The app's own probes the proxy answers for (`PORTCULLIS_APP_PROBES`).
    pub app_probes: portcullis_api::injection::probes::AppProbes,
    /// The inbound TLS listener.
    pub inbound: InboundConfig,
    /// `/live`, `/ready`, `/metrics`, `/identity`.
    pub admin: AdminConfig,
    /// The outbound listener.
    pub outbound: OutboundConfig,
    /// The pod's route map override.
    pub scopes_map: Option<ScopeMap>,
    /// The identity service.
    pub identity: IdentityEndpoint,
    /// The policy server (also serves the tenant's audit key).
    pub policy: OperatorEndpoint,
    /// First policy-stream reconnect delay.
    pub policy_min_backoff: Duration,
    /// Longest policy-stream reconnect delay.
    pub policy_max_backoff: Duration,
    /// The projected ServiceAccount token.
    pub token_path: PathBuf,
    /// The mounted trust bundle (bootstrap roots).
    pub trust_bundle: PathBuf,
    /// Writable directory.
    pub data_dir: PathBuf,
    /// Exit once the app port has stopped accepting for this long (Jobs).
    pub exit_when_app_exits: Option<Duration>,
    /// How often the app port is probed for that.
    pub app_probe_interval: Duration,
    /// Certificate renewal.
    pub renewal: RenewalSettings,
    /// Connection and request limits.
    pub limits: Limits,
    /// API-key verification.
    pub keys: KeySettings,
    /// Timeouts towards the app.
    pub upstream_connect_timeout: Duration,
    /// Idle pooled connections to the app.
    pub upstream_pool_idle_timeout: Duration,
    /// Audit.
    pub audit: ClusterAudit,
    /// The bring-your-own serving certificate's directory
    /// (`PORTCULLIS_SERVING_CERT_DIR`).
    pub serving_cert_dir: Option<PathBuf>,
    /// How often that directory is read.
    pub serving_cert_poll: Duration,
}

impl ClusterConfig {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads variables through `lookup` (tests pass a map). Every problem is reported,
    /// each naming its variable and the fix.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let mut p = Problems::default();
        let from_injector =
            "set by the Portcullis injector; run the proxy in an injected pod or set it by hand";

        let pod_name = p.required(vars::POD_NAME, get(vars::POD_NAME), from_injector);
        let namespace = p.required(vars::POD_NAMESPACE, get(vars::POD_NAMESPACE), from_injector);
        let service_account = p.required(
            vars::SERVICE_ACCOUNT,
            get(vars::SERVICE_ACCOUNT),
            from_injector,
        );
        let trust_domain =
            get(vars::TRUST_DOMAIN).unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_owned());
        let trust_domain = TrustDomain::new(trust_domain)
            .map_err(|e| {
                p.add(
                    vars::TRUST_DOMAIN,
                    format!("{e}; it must match the operator's --trust-domain"),
                )
            })
            .ok();
        let workload = match (trust_domain, &namespace, &service_account) {
            (Some(td), Some(ns), Some(sa)) => WorkloadId::new(td, ns.clone(), sa.clone())
                .map_err(|e| {
                    p.add(
                        "POD_NAMESPACE/PORTCULLIS_SERVICE_ACCOUNT",
                        format!("{e}; they must be the pod's namespace and serviceAccountName"),
                    )
                })
                .ok(),
            _ => None,
        };

        let tenant = get(vars::TENANT);
        if let Some(t) = &tenant
            && !portcullis_api::names::is_dns_label(t)
        {
            p.add(
                vars::TENANT,
                format!("{t:?} is not a tenant name (a DNS label); unset it to use the certificate's tenant"),
            );
        }
        let app_port = get(vars::APP_PORT).and_then(|text| match text.parse::<u16>() {
            Ok(port) if port > 0 => Some(port),
            _ => {
                p.add(
                    vars::APP_PORT,
                    format!("{text:?} is not a TCP port; use 1-65535 (annotation portcullis.dev/app-port)"),
                );
                None
            }
        });
        let app_probes = match get(vars::APP_PROBES) {
            None => portcullis_api::injection::probes::AppProbes::new(),
            Some(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
                p.add(
                    vars::APP_PROBES,
                    format!("not the injector's probe list ({e}); re-create the pod so the injector writes it again"),
                );
                portcullis_api::injection::probes::AppProbes::new()
            }),
        };
        let mode = match get(vars::INBOUND_MODE) {
            None => InboundMode::MtlsOrApikey,
            Some(text) => text.parse().unwrap_or_else(|e: String| {
                p.add(
                    vars::INBOUND_MODE,
                    format!("{e} (annotation portcullis.dev/inbound-mode)"),
                );
                InboundMode::MtlsOrApikey
            }),
        };
        let scopes_map = get(vars::SCOPES_MAP).and_then(|text| {
            parse_scopes_annotation(&text)
                .map_err(|e| p.add(vars::SCOPES_MAP, e))
                .ok()
        });
        if let Some(map) = &scopes_map {
            for (scope, rules) in map {
                for (i, rule) in rules.iter().enumerate() {
                    if let Err(e) = rule.validate() {
                        p.add(&format!("PORTCULLIS_SCOPES_MAP {scope}[{i}].path"), e);
                    }
                }
            }
        }
        let allowed_peers = get(vars::ALLOWED_PEERS)
            .map(|text| {
                portcullis_crds::AllowedPeer::parse_list(&text)
                    .map_err(|e| {
                        p.add(
                            vars::ALLOWED_PEERS,
                            format!("{e} (annotation portcullis.dev/allowed-peers)"),
                        )
                    })
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        let identity = p
            .required(
                vars::IDENTITY_URL,
                get(vars::IDENTITY_URL),
                "the operator's identity service, e.g. https://portcullis-operator.portcullis-system.svc:8443",
            )
            .and_then(|url| {
                IdentityEndpoint::parse(&url)
                    .map_err(|e| p.add(vars::IDENTITY_URL, format!("{e}; write https://HOST:8443")))
                    .ok()
            });
        let policy = p
            .required(
                vars::POLICY_URL,
                get(vars::POLICY_URL),
                "the operator's policy server, e.g. https://portcullis-operator.portcullis-system.svc:8090",
            )
            .and_then(|url| parse_https_authority(&mut p, vars::POLICY_URL, &url))
            .map(|(host, port)| OperatorEndpoint { host, port });

        let flag = |p: &mut Problems, name: &str| match get(name).as_deref() {
            None => false,
            Some(v) if v.eq_ignore_ascii_case("true") || v == "1" => true,
            Some(v) if v.eq_ignore_ascii_case("false") || v == "0" => false,
            Some(v) => {
                p.add(name, format!("{v:?} is not a boolean; write true or false"));
                false
            }
        };
        let exit_grace = p.duration(
            vars::APP_EXIT_GRACE,
            get(vars::APP_EXIT_GRACE).as_ref(),
            Duration::from_secs(5),
        );
        let exit_when_app_exits = flag(&mut p, vars::EXIT_WHEN_APP_EXITS).then_some(exit_grace);
        // In a cluster the destination is usually a Service, whose ClusterIP answers only
        // on the app's ports; the destination pod's redirect takes them to its proxy.
        let keep_port =
            get(vars::OUTBOUND_KEEP_PORT).is_none() || flag(&mut p, vars::OUTBOUND_KEEP_PORT);
        let outbound = OutboundConfig {
            keep_port,
            ..OutboundConfig::default()
        };

        let path = |name: &str, default: &str| {
            PathBuf::from(get(name).unwrap_or_else(|| default.to_owned()))
        };
        let token_path = path(vars::TOKEN_PATH, DEFAULT_TOKEN_PATH);
        let trust_bundle = path(vars::TRUST_BUNDLE, DEFAULT_TRUST_BUNDLE);
        let data_dir = path(vars::DATA_DIR, DEFAULT_DATA_DIR);
        let serving_cert_dir = get(vars::SERVING_CERT_DIR).map(PathBuf::from);
        let collector = get(vars::AUDIT_COLLECTOR_URL)
            .filter(|url| parse_https_authority(&mut p, vars::AUDIT_COLLECTOR_URL, url).is_some());

        match (p.0.is_empty(), pod_name, workload, identity, policy) {
            (true, Some(pod_name), Some(workload), Some(identity), Some(policy)) => Ok(Self {
                pod_name,
                workload: workload.clone(),
                tenant,
                app_port,
                app_probes,
                inbound: InboundConfig {
                    listen: SocketAddr::from((
                        [0, 0, 0, 0],
                        portcullis_api::injection::PROXY_INBOUND_PORT,
                    )),
                    mode,
                    peers_need_mapped_route: true,
                    trust_domain: Some(workload.trust_domain().clone()),
                    allowed_peers,
                },
                admin: AdminConfig {
                    listen: SocketAddr::from((
                        [0, 0, 0, 0],
                        portcullis_api::injection::PROXY_ADMIN_PORT,
                    )),
                },
                outbound,
                scopes_map,
                identity,
                policy,
                policy_min_backoff: Duration::from_millis(250),
                policy_max_backoff: Duration::from_secs(30),
                token_path,
                trust_bundle,
                data_dir,
                exit_when_app_exits,
                app_probe_interval: Duration::from_secs(1),
                renewal: RenewalSettings::default(),
                limits: Limits::default(),
                keys: KeySettings::default(),
                upstream_connect_timeout: Duration::from_secs(1),
                upstream_pool_idle_timeout: Duration::from_secs(90),
                audit: ClusterAudit {
                    collector,
                    ..ClusterAudit::default()
                },
                serving_cert_dir,
                serving_cert_poll: crate::tls::serving_certificate::POLL_INTERVAL,
            }),
            _ => Err(ConfigError::Invalid(p.0)),
        }
    }

    /// The upstream settings for `app_port`.
    pub fn upstream(&self, app_port: u16) -> UpstreamConfig {
        UpstreamConfig {
            app_port,
            connect_timeout: self.upstream_connect_timeout,
            pool_idle_timeout: self.upstream_pool_idle_timeout,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn injected() -> HashMap<&'static str, &'static str> {
        HashMap::from([
            ("POD_NAME", "api-7d9f"),
            ("POD_NAMESPACE", "acme-prod"),
            ("PORTCULLIS_SERVICE_ACCOUNT", "api"),
            ("PORTCULLIS_APP_PORT", "8080"),
            (
                "PORTCULLIS_IDENTITY_URL",
                "https://portcullis-operator.portcullis-system.svc:8443",
            ),
            (
                "PORTCULLIS_POLICY_URL",
                "https://portcullis-operator.portcullis-system.svc:8090",
            ),
            (
                "PORTCULLIS_TOKEN_PATH",
                "/var/run/secrets/portcullis.dev/identity/token",
            ),
            (
                "PORTCULLIS_TRUST_BUNDLE",
                "/var/run/portcullis.dev/trust-bundle/ca-bundle.crt",
            ),
            ("PORTCULLIS_DATA_DIR", "/var/lib/portcullis"),
        ])
    }

    fn parse(vars: &HashMap<&str, &str>) -> Result<ClusterConfig, ConfigError> {
        ClusterConfig::from_lookup(|name| vars.get(name).map(|v| (*v).to_owned()))
    }

    #[test]
    fn the_injected_environment_parses_with_contract_defaults() {
        let config = parse(&injected()).unwrap();
        assert_eq!(
            config.workload.to_string(),
            "spiffe://cluster.local/ns/acme-prod/sa/api"
        );
        assert_eq!(config.app_port, Some(8080));
        assert_eq!(config.inbound.listen.port(), 4143);
        assert_eq!(config.admin.listen.port(), 4191);
        assert_eq!(config.outbound.listen.to_string(), "127.0.0.1:4140");
        assert_eq!(config.inbound.mode, InboundMode::MtlsOrApikey);
        assert_eq!(
            config.policy,
            OperatorEndpoint {
                host: "portcullis-operator.portcullis-system.svc".into(),
                port: 8090
            }
        );
        assert!(config.exit_when_app_exits.is_none());
        assert!(config.tenant.is_none());
        assert!(config.outbound.keep_port);
        // Peers: the pod's own trust domain, mapped routes only, nobody else named.
        assert!(config.inbound.peers_need_mapped_route);
        assert_eq!(
            config.inbound.trust_domain.as_ref().map(|td| td.as_str()),
            Some("cluster.local")
        );
        assert!(config.inbound.allowed_peers.is_empty());
    }

    #[test]
    fn the_allowed_peers_annotation_reaches_the_inbound_settings() {
        let mut vars = injected();
        vars.insert("PORTCULLIS_ALLOWED_PEERS", "tenant:globex,namespace:batch");
        let config = parse(&vars).unwrap();
        assert_eq!(
            config.inbound.allowed_peers,
            vec![
                portcullis_crds::AllowedPeer::tenant("globex"),
                portcullis_crds::AllowedPeer::namespace("batch"),
            ]
        );
        vars.insert(
            "PORTCULLIS_ALLOWED_PEERS",
            "spiffe://cluster.local/tenant/globex",
        );
        let error = parse(&vars).unwrap_err().to_string();
        assert!(
            error.contains("PORTCULLIS_ALLOWED_PEERS") && error.contains("not a workload ID"),
            "{error}"
        );
    }

    #[test]
    fn optional_variables_are_honoured() {
        let mut vars = injected();
        vars.remove("PORTCULLIS_APP_PORT");
        vars.extend([
            ("PORTCULLIS_INBOUND_MODE", "mtls-and-apikey"),
            (
                "PORTCULLIS_SCOPES_MAP",
                r#"{"identify":[{"methods":["POST"],"path":"/v1/identify"}]}"#,
            ),
            ("PORTCULLIS_EXIT_WHEN_APP_EXITS", "true"),
            ("PORTCULLIS_APP_EXIT_GRACE", "2s"),
            ("PORTCULLIS_TRUST_DOMAIN", "prod.acme"),
            ("PORTCULLIS_TENANT", "acme"),
            ("PORTCULLIS_OUTBOUND_KEEP_PORT", "false"),
        ]);
        let config = parse(&vars).unwrap();
        assert_eq!(config.app_port, None);
        assert_eq!(config.inbound.mode, InboundMode::MtlsAndApikey);
        assert_eq!(config.scopes_map.unwrap().len(), 1);
        assert_eq!(config.exit_when_app_exits, Some(Duration::from_secs(2)));
        assert_eq!(config.workload.trust_domain().as_str(), "prod.acme");
        assert_eq!(config.tenant.as_deref(), Some("acme"));
        assert!(!config.outbound.keep_port);
    }

    #[test]
    fn every_problem_names_its_variable() {
        let mut vars = injected();
        vars.remove("POD_NAME");
        vars.extend([
            ("PORTCULLIS_APP_PORT", "http"),
            ("PORTCULLIS_INBOUND_MODE", "tls"),
            ("PORTCULLIS_POLICY_URL", "http://op:8090"),
            ("PORTCULLIS_IDENTITY_URL", "op:8443"),
            ("PORTCULLIS_EXIT_WHEN_APP_EXITS", "yes please"),
            ("PORTCULLIS_SCOPES_MAP", "{not json"),
            ("PORTCULLIS_TRUST_DOMAIN", "Bad Domain"),
        ]);
        let err = parse(&vars).unwrap_err().to_string();
        for needle in [
            "POD_NAME: is required",
            "PORTCULLIS_APP_PORT",
            "PORTCULLIS_INBOUND_MODE",
            "PORTCULLIS_POLICY_URL",
            "PORTCULLIS_IDENTITY_URL",
            "PORTCULLIS_EXIT_WHEN_APP_EXITS",
            "PORTCULLIS_SCOPES_MAP",
            "PORTCULLIS_TRUST_DOMAIN",
        ] {
            assert!(err.contains(needle), "{needle} missing from: {err}");
        }
    }

    #[test]
    fn the_audit_collector_url_must_be_https() {
        let mut vars = injected();
        vars.insert(
            "PORTCULLIS_AUDIT_COLLECTOR_URL",
            "https://portcullis-audit.portcullis-system.svc:8091",
        );
        assert_eq!(
            parse(&vars).unwrap().audit.collector.as_deref(),
            Some("https://portcullis-audit.portcullis-system.svc:8091")
        );
        assert_eq!(parse(&injected()).unwrap().audit.collector, None);
        vars.insert(
            "PORTCULLIS_AUDIT_COLLECTOR_URL",
            "http://portcullis-audit:8091",
        );
        let err = parse(&vars).unwrap_err().to_string();
        assert!(
            err.contains("PORTCULLIS_AUDIT_COLLECTOR_URL")
                && err.contains("must start with https://"),
            "{err}"
        );
    }
}
