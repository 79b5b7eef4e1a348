//! `proxy.yaml`, parsed once into typed values. Every error names the field and says
//! how to fix it; code below this module never parses a string. [`env`] does the same
//! for the injected pod's environment (`run --config-from-env`), [`audit`] for the
//! `audit:` section.

pub mod audit;
pub mod env;

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use ipnet::IpNet;
use portcullis_crds::{InboundMode, scope::ScopeMap};
use serde::Deserialize;

/// Why a configuration could not be used: one line per bad field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML is not valid or has unknown fields.
    #[error("{path}: {message} (see sidecar/examples/proxy.yaml for every field)")]
    Syntax {
        /// The file.
        path: String,
        /// serde_yaml's message, with line and column.
        message: String,
    },
    /// One or more fields have unusable values.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

/// The whole proxy configuration.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// The TLS listener in front of the app.
    pub inbound: InboundConfig,
    /// `/live`, `/ready`, `/metrics`.
    pub admin: AdminConfig,
    /// The application behind the proxy.
    pub upstream: UpstreamConfig,
    /// Our certificate, key and the trust bundle.
    pub tls: TlsFiles,
    /// Where policy comes from.
    pub policy: PolicySource,
    /// The pod's `portcullis.dev/scopes-map` override of the tenant's route map.
    pub scopes_map: Option<ScopeMap>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Connection and request limits.
    pub limits: Limits,
    /// API-key verification settings.
    pub keys: KeySettings,
    /// The tamper-evident audit trail; `None`: one tracing line per request.
    pub audit: Option<audit::AuditConfig>,
    /// The plain-HTTP listener for the app's outgoing calls; `None`: off.
    pub outbound: Option<OutboundConfig>,
}

/// The outbound listener: the local app sends plain HTTP to it, naming the destination
/// in the absolute URI or `Host`; the proxy forwards over mTLS to the destination's
/// inbound proxy.
#[derive(Clone, Debug)]
pub struct OutboundConfig {
    /// Address to listen on (127.0.0.1:4140: only the pod's own containers).
    pub listen: SocketAddr,
    /// The port the destination's proxy listens on (4143).
    pub peer_port: u16,
    /// Keep the destination's port instead of rewriting it to `peer_port` (for
    /// destinations whose inbound redirect catches every port, e.g. Services).
    pub keep_port: bool,
    /// Time to open the TCP connection and finish the TLS handshake.
    pub connect_timeout: Duration,
    /// Time for the destination to answer with a response head.
    pub request_timeout: Duration,
    /// Peers must hold a workload ID in this trust domain. `None`: the trust domain of
    /// our own certificate.
    pub trust_domain: Option<crate::control::identity::TrustDomain>,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((
                [127, 0, 0, 1],
                portcullis_api::injection::PROXY_OUTBOUND_PORT,
            )),
            peer_port: portcullis_api::injection::PROXY_INBOUND_PORT,
            keep_port: false,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            trust_domain: None,
        }
    }
}

/// The inbound listener.
#[derive(Clone, Debug)]
pub struct InboundConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// What a request must present.
    pub mode: InboundMode,
    /// When true (the default), mTLS peers may only call routes that map to a scope.
    pub peers_need_mapped_route: bool,
    /// This workload's trust domain, for admitting peers. `None`: the trust domain of
    /// our own certificate's workload ID.
    pub trust_domain: Option<crate::control::identity::TrustDomain>,
    /// Peers admitted besides the tenant's own workloads and the Tenant's list.
    pub allowed_peers: Vec<portcullis_crds::AllowedPeer>,
}

/// The admin listener.
#[derive(Clone, Debug)]
pub struct AdminConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
}

/// The application on loopback.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// The app's port on 127.0.0.1.
    pub app_port: u16,
    /// Time to open a connection to the app.
    pub connect_timeout: Duration,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout: Duration,
}

/// PEM files for the serving certificate and the trust bundle.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub certificate: PathBuf,
    /// PKCS#8, SEC1 or PKCS#1 private key.
    pub private_key: PathBuf,
    /// CA certificates client certificates must chain to.
    pub trust_bundle: PathBuf,
    /// How often the files are checked for changes.
    pub reload_interval: Duration,
}

/// Where the policy bundle comes from.
#[derive(Clone, Debug)]
pub enum PolicySource {
    /// A JSON or YAML `PolicyBundle` file, polled for changes.
    File {
        /// The file.
        path: PathBuf,
        /// How often its modification time is checked.
        poll_interval: Duration,
    },
    /// The operator's streaming policy endpoint, over mTLS.
    Stream(StreamSource),
}

/// The operator's policy endpoint.
#[derive(Clone, Debug)]
pub struct StreamSource {
    /// Host name (also the TLS server name) of the operator.
    pub host: String,
    /// Its policy port (8090).
    pub port: u16,
    /// The tenant whose bundle we follow.
    pub tenant: String,
    /// First reconnect delay; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest reconnect delay.
    pub max_backoff: Duration,
}

/// Limits that protect the proxy and the app.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Open inbound connections at most.
    pub max_connections: usize,
    /// Open inbound connections from one source address at most, so one client cannot
    /// hold every slot (default: a quarter of `max_connections`). Peers listed in
    /// `trustedProxies` (an ingress speaking for many clients) are exempt.
    pub max_connections_per_source: usize,
    /// Request header fields at most, on HTTP/1 and HTTP/2 alike (431 above).
    pub max_headers: usize,
    /// Request body size at most, declared or streamed (413 above).
    pub max_request_body_bytes: usize,
    /// Request head size at most (431 above).
    pub max_header_bytes: usize,
    /// Time to complete a TLS handshake.
    pub handshake_timeout: Duration,
    /// Time to send a complete request head (slow clients are cut off).
    pub header_read_timeout: Duration,
    /// A connection with no request and no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// Time for the app to answer with a response head (504 above).
    pub request_timeout: Duration,
    /// On SIGTERM, how long in-flight requests get to finish.
    pub drain_timeout: Duration,
}

/// API-key verification.
#[derive(Clone, Debug)]
pub struct KeySettings {
    /// bcrypt verifications at once.
    pub bcrypt_workers: usize,
    /// How long a request waits for a bcrypt worker before 503 `busy`.
    pub bcrypt_wait: Duration,
    /// Verified keys remembered.
    pub cache_capacity: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_connections_per_source: 10_000 / 4,
            max_headers: 100,
            max_request_body_bytes: 10 * 1024 * 1024,
            max_header_bytes: 16 * 1024,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(25),
        }
    }
}

impl Default for KeySettings {
    fn default() -> Self {
        Self {
            bcrypt_workers: 2,
            bcrypt_wait: Duration::from_secs(2),
            cache_capacity: 10_000,
        }
    }
}

impl ProxyConfig {
    /// Reads and validates a `proxy.yaml`.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates YAML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        raw.validate()
    }
}

// The file as written: text where a typed value is expected, so errors can name fields.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    inbound: RawInbound,
    #[serde(default)]
    admin: RawAdmin,
    upstream: Option<RawUpstream>,
    tls: Option<RawTls>,
    policy: Option<RawPolicy>,
    scopes_map: Option<ScopeMap>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    keys: RawKeys,
    audit: Option<audit::RawAudit>,
    outbound: Option<RawOutbound>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawOutbound {
    listen: Option<String>,
    peer_port: Option<u32>,
    keep_port: Option<bool>,
    connect_timeout: Option<String>,
    request_timeout: Option<String>,
    trust_domain: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawInbound {
    listen: Option<String>,
    mode: Option<String>,
    peers_need_mapped_route: Option<bool>,
    trust_domain: Option<String>,
    #[serde(default)]
    allowed_peers: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawUpstream {
    app_port: Option<u32>,
    connect_timeout: Option<String>,
    pool_idle_timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawTls {
    certificate: Option<PathBuf>,
    private_key: Option<PathBuf>,
    trust_bundle: Option<PathBuf>,
    reload_interval: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPolicy {
    file: Option<PathBuf>,
    poll_interval: Option<String>,
    stream: Option<RawStream>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawStream {
    url: Option<String>,
    tenant: Option<String>,
    min_backoff: Option<String>,
    max_backoff: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<usize>,
    max_connections_per_source: Option<usize>,
    max_headers: Option<usize>,
    max_request_body_bytes: Option<usize>,
    max_header_bytes: Option<usize>,
    handshake_timeout: Option<String>,
    header_read_timeout: Option<String>,
    idle_timeout: Option<String>,
    request_timeout: Option<String>,
    drain_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawKeys {
    bcrypt_workers: Option<usize>,
    bcrypt_wait: Option<String>,
    cache_capacity: Option<usize>,
}

/// Collects field errors so one run reports every problem.
#[derive(Default)]
pub(crate) struct Problems(pub(crate) Vec<String>);

impl Problems {
    pub(crate) fn add(&mut self, field: &str, problem: impl std::fmt::Display) {
        self.0.push(format!("{field}: {problem}"));
    }

    pub(crate) fn duration(
        &mut self,
        field: &str,
        text: Option<&String>,
        default: Duration,
    ) -> Duration {
        let Some(text) = text else { return default };
        match humantime::parse_duration(text) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.add(field, "must be longer than zero, e.g. \"10s\"");
                default
            }
            Err(e) => {
                self.add(
                    field,
                    format!(
                        "{text:?} is not a duration ({e}); write e.g. \"500ms\", \"10s\" or \"1m\""
                    ),
                );
                default
            }
        }
    }

    pub(crate) fn socket(
        &mut self,
        field: &str,
        text: Option<&String>,
        default: SocketAddr,
    ) -> SocketAddr {
        let Some(text) = text else { return default };
        text.parse().unwrap_or_else(|_| {
            self.add(field, format!("{text:?} is not an address; write IP:port, e.g. \"0.0.0.0:4143\" or \"[::]:4143\""));
            default
        })
    }

    pub(crate) fn required<T>(&mut self, field: &str, value: Option<T>, hint: &str) -> Option<T> {
        if value.is_none() {
            self.add(field, format!("is required; {hint}"));
        }
        value
    }

    pub(crate) fn positive(&mut self, field: &str, value: Option<usize>, default: usize) -> usize {
        match value {
            Some(0) => {
                self.add(field, "must be at least 1");
                default
            }
            Some(n) => n,
            None => default,
        }
    }
}

/// Parses a CIDR, accepting a bare address as a single host.
pub fn parse_cidr(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

impl RawConfig {
    fn validate(self) -> Result<ProxyConfig, ConfigError> {
        let mut p = Problems::default();
        let defaults_limits = Limits::default();
        let defaults_keys = KeySettings::default();

        let mode = match self.inbound.mode.as_deref() {
            None => InboundMode::MtlsOrApikey,
            Some(text) => text.parse().unwrap_or_else(|e: String| {
                p.add("inbound.mode", e);
                InboundMode::MtlsOrApikey
            }),
        };
        let inbound = InboundConfig {
            listen: p.socket(
                "inbound.listen",
                self.inbound.listen.as_ref(),
                SocketAddr::from(([0, 0, 0, 0], 4143)),
            ),
            mode,
            // Closed unless opened: an unmapped route is often an admin one.
            peers_need_mapped_route: self.inbound.peers_need_mapped_route.unwrap_or(true),
            trust_domain: self.inbound.trust_domain.and_then(|td| {
                crate::control::identity::TrustDomain::new(td)
                    .map_err(|e| p.add("inbound.trustDomain", e))
                    .ok()
            }),
            allowed_peers: self
                .inbound
                .allowed_peers
                .iter()
                .enumerate()
                .flat_map(|(i, entry)| {
                    portcullis_crds::AllowedPeer::parse_list(entry)
                        .map_err(|e| p.add(&format!("inbound.allowedPeers[{i}]"), e))
                        .unwrap_or_default()
                })
                .collect(),
        };
        let admin = AdminConfig {
            listen: p.socket(
                "admin.listen",
                self.admin.listen.as_ref(),
                SocketAddr::from(([0, 0, 0, 0], 4191)),
            ),
        };

        let upstream = p.required(
            "upstream",
            self.upstream,
            "set upstream.appPort to the port your app listens on",
        );
        let upstream = upstream.map(|u| {
            let app_port = match u.app_port {
                Some(port @ 1..=65535) => port as u16,
                Some(other) => {
                    p.add(
                        "upstream.appPort",
                        format!("{other} is not a TCP port; use 1-65535"),
                    );
                    1
                }
                None => {
                    p.add(
                        "upstream.appPort",
                        "is required; the port your app listens on at 127.0.0.1",
                    );
                    1
                }
            };
            UpstreamConfig {
                app_port,
                connect_timeout: p.duration(
                    "upstream.connectTimeout",
                    u.connect_timeout.as_ref(),
                    Duration::from_secs(1),
                ),
                pool_idle_timeout: p.duration(
                    "upstream.poolIdleTimeout",
                    u.pool_idle_timeout.as_ref(),
                    Duration::from_secs(90),
                ),
            }
        });

        let tls = p.required(
            "tls",
            self.tls,
            "set tls.certificate, tls.privateKey and tls.trustBundle",
        );
        let tls = tls.and_then(|t| {
            let cert = p.required(
                "tls.certificate",
                t.certificate,
                "the PEM certificate chain the proxy presents",
            );
            let key = p.required(
                "tls.privateKey",
                t.private_key,
                "the PEM private key of that certificate",
            );
            let bundle = p.required(
                "tls.trustBundle",
                t.trust_bundle,
                "the PEM CA certificates clients must chain to",
            );
            let reload_interval = p.duration(
                "tls.reloadInterval",
                t.reload_interval.as_ref(),
                Duration::from_secs(1),
            );
            Some(TlsFiles {
                certificate: cert?,
                private_key: key?,
                trust_bundle: bundle?,
                reload_interval,
            })
        });

        let policy = p.required("policy", self.policy, "set policy.file or policy.stream");
        let policy = policy.and_then(|raw| match (raw.file, raw.stream) {
            (Some(path), None) => Some(PolicySource::File {
                path,
                poll_interval: p.duration("policy.pollInterval", raw.poll_interval.as_ref(), Duration::from_secs(1)),
            }),
            (None, Some(stream)) => parse_stream(&mut p, stream).map(PolicySource::Stream),
            (Some(_), Some(_)) => {
                p.add("policy", "set either policy.file or policy.stream, not both");
                None
            }
            (None, None) => {
                p.add("policy", "set policy.file (a PolicyBundle JSON/YAML file) or policy.stream (the operator URL)");
                None
            }
        });

        if let Some(map) = &self.scopes_map {
            for (scope, rules) in map {
                if !portcullis_api::names::is_dns_label(scope) {
                    p.add(
                        &format!("scopesMap.{scope}"),
                        "scope names are lowercase letters, digits and '-'",
                    );
                }
                for (i, rule) in rules.iter().enumerate() {
                    if let Err(e) = rule.validate() {
                        p.add(&format!("scopesMap.{scope}[{i}].path"), e);
                    }
                }
            }
        }

        let mut trusted_proxies = Vec::new();
        for (i, text) in self.trusted_proxies.iter().enumerate() {
            match parse_cidr(text) {
                Some(net) => trusted_proxies.push(net),
                None => p.add(
                    &format!("trustedProxies[{i}]"),
                    format!("{text:?} is not a CIDR; write e.g. \"10.0.0.0/8\" or \"fd00::/8\""),
                ),
            }
        }

        let l = self.limits;
        let max_header_bytes = l
            .max_header_bytes
            .unwrap_or(defaults_limits.max_header_bytes);
        if max_header_bytes < 8192 {
            p.add(
                "limits.maxHeaderBytes",
                "must be at least 8192 (the HTTP/1 parser's minimum buffer)",
            );
        }
        let max_connections = p.positive(
            "limits.maxConnections",
            l.max_connections,
            defaults_limits.max_connections,
        );
        let limits = Limits {
            max_connections,
            max_connections_per_source: p.positive(
                "limits.maxConnectionsPerSource",
                l.max_connections_per_source,
                (max_connections / 4).max(1),
            ),
            max_headers: p.positive(
                "limits.maxHeaders",
                l.max_headers,
                defaults_limits.max_headers,
            ),
            max_request_body_bytes: p.positive(
                "limits.maxRequestBodyBytes",
                l.max_request_body_bytes,
                defaults_limits.max_request_body_bytes,
            ),
            max_header_bytes: max_header_bytes.max(8192),
            handshake_timeout: p.duration(
                "limits.handshakeTimeout",
                l.handshake_timeout.as_ref(),
                defaults_limits.handshake_timeout,
            ),
            header_read_timeout: p.duration(
                "limits.headerReadTimeout",
                l.header_read_timeout.as_ref(),
                defaults_limits.header_read_timeout,
            ),
            idle_timeout: p.duration(
                "limits.idleTimeout",
                l.idle_timeout.as_ref(),
                defaults_limits.idle_timeout,
            ),
            request_timeout: p.duration(
                "limits.requestTimeout",
                l.request_timeout.as_ref(),
                defaults_limits.request_timeout,
            ),
            drain_timeout: p.duration(
                "limits.drainTimeout",
                l.drain_timeout.as_ref(),
                defaults_limits.drain_timeout,
            ),
        };
        let k = self.keys;
        let keys = KeySettings {
            bcrypt_workers: p.positive(
                "keys.bcryptWorkers",
                k.bcrypt_workers,
                defaults_keys.bcrypt_workers,
            ),
            bcrypt_wait: p.duration(
                "keys.bcryptWait",
                k.bcrypt_wait.as_ref(),
                defaults_keys.bcrypt_wait,
            ),
            cache_capacity: p.positive(
                "keys.cacheCapacity",
                k.cache_capacity,
                defaults_keys.cache_capacity,
            ),
        };

        let audit = self.audit.map(|raw| raw.validate(&mut p));
        let outbound = self.outbound.map(|raw| parse_outbound(&mut p, raw));

        match (p.0.is_empty(), upstream, tls, policy) {
            (true, Some(upstream), Some(tls), Some(policy)) => Ok(ProxyConfig {
                inbound,
                admin,
                upstream,
                tls,
                policy,
                scopes_map: self.scopes_map,
                trusted_proxies,
                limits,
                keys,
                audit,
                outbound,
            }),
            _ => Err(ConfigError::Invalid(p.0)),
        }
    }
}

fn parse_outbound(p: &mut Problems, raw: RawOutbound) -> OutboundConfig {
    let defaults = OutboundConfig::default();
    let peer_port = match raw.peer_port {
        None => defaults.peer_port,
        Some(port @ 1..=65535) => port as u16,
        Some(other) => {
            p.add(
                "outbound.peerPort",
                format!("{other} is not a TCP port; use 1-65535 (the peers' inbound port, 4143)"),
            );
            defaults.peer_port
        }
    };
    let trust_domain = raw.trust_domain.and_then(|td| {
        crate::control::identity::TrustDomain::new(td)
            .map_err(|e| p.add("outbound.trustDomain", e))
            .ok()
    });
    OutboundConfig {
        listen: p.socket("outbound.listen", raw.listen.as_ref(), defaults.listen),
        peer_port,
        keep_port: raw.keep_port.unwrap_or(false),
        connect_timeout: p.duration(
            "outbound.connectTimeout",
            raw.connect_timeout.as_ref(),
            defaults.connect_timeout,
        ),
        request_timeout: p.duration(
            "outbound.requestTimeout",
            raw.request_timeout.as_ref(),
            defaults.request_timeout,
        ),
        trust_domain,
    }
}

/// Parses `https://HOST[:PORT]` (no path) into host and port (default 8090); `field`
/// names the setting in errors.
pub(crate) fn parse_https_authority(
    p: &mut Problems,
    field: &str,
    url: &str,
) -> Option<(String, u16)> {
    let Some(rest) = url.strip_prefix("https://") else {
        p.add(
            field,
            format!("{url:?} must start with https:// (the operator endpoints are mTLS only)"),
        );
        return None;
    };
    let authority = rest.trim_end_matches('/');
    let uri: Option<http::uri::Authority> = authority.parse().ok();
    let Some(authority) = uri.filter(|a| !a.host().is_empty() && !authority.contains('/')) else {
        p.add(
            field,
            format!("{url:?} must be https://HOST[:PORT] with no path"),
        );
        return None;
    };
    Some((
        authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        authority
            .port_u16()
            .unwrap_or(portcullis_api::injection::POLICY_PORT),
    ))
}

fn parse_stream(p: &mut Problems, raw: RawStream) -> Option<StreamSource> {
    let url = p.required("policy.stream.url", raw.url, "the operator's policy endpoint, e.g. https://portcullis-operator.portcullis-system.svc:8090")?;
    let tenant = p.required(
        "policy.stream.tenant",
        raw.tenant,
        "the tenant whose policy this proxy enforces",
    )?;
    let min_backoff = p.duration(
        "policy.stream.minBackoff",
        raw.min_backoff.as_ref(),
        Duration::from_millis(250),
    );
    let max_backoff = p.duration(
        "policy.stream.maxBackoff",
        raw.max_backoff.as_ref(),
        Duration::from_secs(30),
    );
    let (host, port) = parse_https_authority(p, "policy.stream.url", &url)?;
    if !portcullis_api::names::is_dns_label(&tenant) {
        p.add(
            "policy.stream.tenant",
            format!("{tenant:?} is not a tenant name (a DNS label)"),
        );
        return None;
    }
    Some(StreamSource {
        host,
        port,
        tenant,
        min_backoff,
        max_backoff,
    })
}

/// Parses the `portcullis.dev/scopes-map` annotation (JSON, scope → routes).
pub fn parse_scopes_annotation(text: &str) -> Result<ScopeMap, String> {
    serde_json::from_str::<BTreeMap<String, Vec<portcullis_crds::RouteRule>>>(text)
        .map_err(|e| format!("portcullis.dev/scopes-map is not a JSON scope map: {e}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const MINIMAL: &str = "
upstream: {appPort: 8080}
tls: {certificate: /c.pem, privateKey: /k.pem, trustBundle: /ca.pem}
policy: {file: /policy.json}
";

    #[test]
    fn minimal_config_gets_contract_defaults() {
        let config = ProxyConfig::parse(MINIMAL, "proxy.yaml").unwrap();
        assert_eq!(config.inbound.listen.port(), 4143);
        assert_eq!(config.admin.listen.port(), 4191);
        assert_eq!(config.inbound.mode, InboundMode::MtlsOrApikey);
        assert_eq!(config.upstream.app_port, 8080);
        assert!(matches!(config.policy, PolicySource::File { .. }));
    }

    #[test]
    fn errors_name_every_bad_field() {
        let text = format!(
            "{MINIMAL}inbound: {{mode: tls, listen: nope}}\nlimits: {{idleTimeout: soon}}\ntrustedProxies: [10.0.0.0/99]\n"
        );
        let err = ProxyConfig::parse(&text, "proxy.yaml")
            .unwrap_err()
            .to_string();
        for needle in [
            "inbound.mode",
            "inbound.listen",
            "limits.idleTimeout",
            "trustedProxies[0]",
            "mtls-or-apikey",
        ] {
            assert!(err.contains(needle), "{needle} missing from: {err}");
        }
    }

    #[test]
    fn unknown_fields_and_missing_sections_are_reported() {
        let err = ProxyConfig::parse("upstreem: {}", "p.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("upstreem"), "{err}");
        let err = ProxyConfig::parse("inbound: {}", "p.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("upstream: is required"), "{err}");
        assert!(err.contains("policy: is required"), "{err}");
    }

    #[test]
    fn per_source_cap_defaults_to_a_quarter_of_max_connections() {
        let text = format!("{MINIMAL}limits: {{maxConnections: 40}}\n");
        let config = ProxyConfig::parse(&text, "p.yaml").unwrap();
        assert_eq!(config.limits.max_connections_per_source, 10);
        let text = format!("{MINIMAL}limits: {{maxConnections: 2, maxConnectionsPerSource: 0}}\n");
        let err = ProxyConfig::parse(&text, "p.yaml").unwrap_err().to_string();
        assert!(err.contains("limits.maxConnectionsPerSource"), "{err}");
    }

    #[test]
    fn stream_source_parses_host_port_and_tenant() {
        let text = MINIMAL.replace(
            "policy: {file: /policy.json}",
            "policy: {stream: {url: \"https://op.portcullis-system.svc\", tenant: acme}}",
        );
        let config = ProxyConfig::parse(&text, "p.yaml").unwrap();
        let PolicySource::Stream(s) = config.policy else {
            panic!("not a stream")
        };
        assert_eq!(
            (s.host.as_str(), s.port, s.tenant.as_str()),
            ("op.portcullis-system.svc", 8090, "acme")
        );
        let bad = MINIMAL.replace(
            "policy: {file: /policy.json}",
            "policy: {stream: {url: \"http://x\", tenant: acme}}",
        );
        assert!(
            ProxyConfig::parse(&bad, "p")
                .unwrap_err()
                .to_string()
                .contains("https://")
        );
    }

    #[test]
    fn the_documented_example_parses() {
        let text = include_str!("../../examples/proxy.yaml");
        let config = ProxyConfig::parse(text, "examples/proxy.yaml").unwrap();
        assert_eq!(config.upstream.app_port, 8080);
        assert_eq!(config.limits.max_header_bytes, 16384);
        assert_eq!(config.limits.max_connections_per_source, 2500);
        assert_eq!(config.limits.max_headers, 100);
        assert_eq!(config.limits.max_request_body_bytes, 10 * 1024 * 1024);
        // The commented-out alternatives parse too.
        let uncommented = text
            .replace(
                "  file: /etc/portcullis/policy.json\n  pollInterval: 1s\n",
                "",
            )
            .replace("  # stream:", "  stream:")
            .replace("  #   url:", "    url:")
            .replace("  #   tenant:", "    tenant:")
            .replace("# scopesMap:", "scopesMap:")
            .replace("#   identify:", "  identify:")
            .replace("#   events:", "  events:");
        let config = ProxyConfig::parse(&uncommented, "uncommented").unwrap();
        assert!(matches!(config.policy, PolicySource::Stream(_)));
        assert_eq!(config.scopes_map.map(|m| m.len()), Some(2));
        // So do the outbound and audit sections.
        let sections: String = text
            .lines()
            .skip_while(|l| *l != "# outbound:")
            .filter(|l| *l == "# outbound:" || *l == "# audit:" || l.starts_with("#   "))
            .map(|l| format!("{}\n", &l[2..]))
            .collect();
        let extra = ProxyConfig::parse(&format!("{text}\n{sections}"), "sections").unwrap();
        assert_eq!(extra.outbound.unwrap().peer_port, 4143);
        assert_eq!(extra.audit.unwrap().sinks.len(), 5);
    }

    #[test]
    fn bare_addresses_are_single_host_cidrs() {
        assert_eq!(parse_cidr("10.1.2.3").unwrap().to_string(), "10.1.2.3/32");
        assert_eq!(parse_cidr("::1").unwrap().to_string(), "::1/128");
        assert!(parse_cidr("banana").is_none());
    }
}
