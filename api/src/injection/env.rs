//! The proxy's environment variables in an injected pod: set by the injector, read by
//! `portcullis-proxy run --config-from-env`.

/// The pod's name (downward API).
pub const POD_NAME: &str = "POD_NAME";
/// The pod's namespace (downward API).
pub const POD_NAMESPACE: &str = "POD_NAMESPACE";
/// The pod's ServiceAccount (downward API).
pub const SERVICE_ACCOUNT: &str = "PORTCULLIS_SERVICE_ACCOUNT";
/// The app's port on 127.0.0.1 (annotation `portcullis.dev/app-port`).
pub const APP_PORT: &str = "PORTCULLIS_APP_PORT";
/// How the inbound listener authenticates (annotation `portcullis.dev/inbound-mode`).
pub const INBOUND_MODE: &str = "PORTCULLIS_INBOUND_MODE";
/// The pod's scope map, JSON (annotation `portcullis.dev/scopes-map`).
pub const SCOPES_MAP: &str = "PORTCULLIS_SCOPES_MAP";
/// Extra mTLS peers (annotation `portcullis.dev/allowed-peers`).
pub const ALLOWED_PEERS: &str = "PORTCULLIS_ALLOWED_PEERS";
/// The operator's identity service, `https://host:8443`.
pub const IDENTITY_URL: &str = "PORTCULLIS_IDENTITY_URL";
/// The operator's policy server, `https://host:8090`.
pub const POLICY_URL: &str = "PORTCULLIS_POLICY_URL";
/// The projected ServiceAccount token.
pub const TOKEN_PATH: &str = "PORTCULLIS_TOKEN_PATH";
/// The PEM roots of the trust-bundle ConfigMap.
pub const TRUST_BUNDLE: &str = "PORTCULLIS_TRUST_BUNDLE";
/// The proxy's writable directory.
pub const DATA_DIR: &str = "PORTCULLIS_DATA_DIR";
/// The directory of a bring-your-own serving certificate (`tls.crt`, `tls.key`).
pub const SERVING_CERT_DIR: &str = "PORTCULLIS_SERVING_CERT_DIR";
/// The SPIFFE trust domain, set only when it is not the default.
pub const TRUST_DOMAIN: &str = "PORTCULLIS_TRUST_DOMAIN";
/// `true`: exit once the app has (run-to-completion pods without native sidecars).
pub const EXIT_WHEN_APP_EXITS: &str = "PORTCULLIS_EXIT_WHEN_APP_EXITS";
/// How long the app port must stay closed before the proxy exits.
pub const APP_EXIT_GRACE: &str = "PORTCULLIS_APP_EXIT_GRACE";
/// The tenant when the certificate carries none.
pub const TENANT: &str = "PORTCULLIS_TENANT";
/// Whether outbound dials the destination's own port.
pub const OUTBOUND_KEEP_PORT: &str = "PORTCULLIS_OUTBOUND_KEEP_PORT";
/// The audit collector records are shipped to, `https://host:port`; unset: records stay
/// in the pod.
pub const AUDIT_COLLECTOR_URL: &str = "PORTCULLIS_AUDIT_COLLECTOR_URL";
/// The app's original probes, JSON ([`super::probes::AppProbes`]).
pub const APP_PROBES: &str = "PORTCULLIS_APP_PROBES";

/// The trust domain when [`TRUST_DOMAIN`] is not set.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Where the injector mounts the projected identity token; the token is the file
/// `token` inside.
pub const IDENTITY_TOKEN_MOUNT: &str = "/var/run/secrets/portcullis.dev/identity";
/// Where the injector mounts the trust-bundle ConfigMap.
pub const TRUST_BUNDLE_MOUNT: &str = "/var/run/portcullis.dev/trust-bundle";
/// Key of the PEM bundle in the trust-bundle ConfigMap.
pub const TRUST_BUNDLE_KEY: &str = "ca-bundle.crt";
/// The proxy's writable directory in an injected pod.
pub const DATA_MOUNT: &str = "/var/lib/portcullis";
/// The default of [`TOKEN_PATH`].
pub const DEFAULT_TOKEN_PATH: &str = "/var/run/secrets/portcullis.dev/identity/token";
/// The default of [`TRUST_BUNDLE`].
pub const DEFAULT_TRUST_BUNDLE: &str = "/var/run/portcullis.dev/trust-bundle/ca-bundle.crt";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_mounts() {
        assert_eq!(DEFAULT_TOKEN_PATH, format!("{IDENTITY_TOKEN_MOUNT}/token"));
        assert_eq!(
            DEFAULT_TRUST_BUNDLE,
            format!("{TRUST_BUNDLE_MOUNT}/{TRUST_BUNDLE_KEY}")
        );
    }
}
