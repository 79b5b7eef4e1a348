//! Headers between the client and the app: the key headers, every client-sent
//! `X-Portcullis-*` header and every header name holding `_` are removed (so an app can
//! trust the ones we set, however it spells header names), hop-by-hop headers are
//! dropped, and the principal, tenant, scopes and an mTLS caller's own tenant are added.

use http::{HeaderMap, HeaderName, HeaderValue, header};

use super::authn::extract::{X_API_KEY, is_bearer};
use crate::listener::proxy_http::strip_hop_by_hop;

/// The principal: `key:ak_***xyz` or `spiffe://...`.
pub const X_PORTCULLIS_PRINCIPAL: &str = "x-portcullis-principal";
/// The tenant (the callee's: the tenant whose policy admitted the request).
pub const X_PORTCULLIS_TENANT: &str = "x-portcullis-tenant";
/// The mTLS caller's tenant, from its certificate (absent when it names none).
pub const X_PORTCULLIS_PEER_TENANT: &str = "x-portcullis-peer-tenant";
/// The key's scopes, comma-separated (absent for mTLS peers, which hold none).
pub const X_PORTCULLIS_SCOPES: &str = "x-portcullis-scopes";

/// What the app is told about the caller.
#[derive(Clone, Debug)]
pub struct Forwarded<'a> {
    /// `key:ak_***xyz` or a SPIFFE ID.
    pub principal: &'a str,
    /// The tenant.
    pub tenant: &'a str,
    /// The key's scopes, comma-separated.
    pub scopes: Option<&'a str>,
    /// The admitted mTLS peer's tenant.
    pub peer_tenant: Option<&'a str>,
}

/// Prepares request headers for the app.
pub fn to_upstream(headers: &mut HeaderMap, forwarded: &Forwarded<'_>, keep_upgrade: bool) {
    strip_hop_by_hop(headers, keep_upgrade);
    headers.remove(X_API_KEY);
    if headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .any(|v| is_bearer(v.as_bytes()))
    {
        headers.remove(header::AUTHORIZATION);
    }
    // Names with "_" are dropped whole, as nginx does by default: CGI-style
    // frameworks (PHP, WSGI, Rack) read `X_Portcullis_Principal` as the header we set,
    // and `_` spellings of any other header an app trusts are just as forgeable.
    let ours: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            let name = name.as_str();
            name.starts_with("x-portcullis-") || name.contains('_')
        })
        .cloned()
        .collect();
    for name in ours {
        headers.remove(name);
    }
    let mut set = |name: &'static str, value: &str| {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    };
    set(X_PORTCULLIS_PRINCIPAL, forwarded.principal);
    set(X_PORTCULLIS_TENANT, forwarded.tenant);
    if let Some(scopes) = forwarded.scopes {
        set(X_PORTCULLIS_SCOPES, scopes);
    }
    if let Some(tenant) = forwarded.peer_tenant {
        set(X_PORTCULLIS_PEER_TENANT, tenant);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn key_and_spoofed_headers_never_reach_the_app() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer ak_secret"),
        );
        headers.insert("x-api-key", HeaderValue::from_static("ak_secret"));
        headers.insert(
            "x-portcullis-principal",
            HeaderValue::from_static("spiffe://evil"),
        );
        headers.insert("x-portcullis-admin", HeaderValue::from_static("true"));
        headers.insert("x_portcullis_principal", HeaderValue::from_static("admin"));
        headers.insert("x-portcullis_tenant", HeaderValue::from_static("evil"));
        headers.insert("x_other", HeaderValue::from_static("1"));
        headers.insert("x-portcullis-peer-tenant", HeaderValue::from_static("acme"));
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-drop-me"),
        );
        headers.insert("x-drop-me", HeaderValue::from_static("1"));
        headers.insert("x-keep", HeaderValue::from_static("1"));
        let forwarded = Forwarded {
            principal: "key:ak_***cret",
            tenant: "acme",
            scopes: Some("events"),
            peer_tenant: None,
        };
        to_upstream(&mut headers, &forwarded, false);
        assert!(headers.get(header::AUTHORIZATION).is_none());
        assert!(headers.get("x-api-key").is_none());
        assert!(headers.get("x-portcullis-admin").is_none());
        assert!(headers.keys().all(|name| !name.as_str().contains('_')));
        assert!(headers.get(X_PORTCULLIS_PEER_TENANT).is_none());
        assert!(headers.get("x-drop-me").is_none());
        assert!(headers.get(header::CONNECTION).is_none());
        assert_eq!(headers["x-portcullis-principal"], "key:ak_***cret");
        assert_eq!(headers["x-portcullis-tenant"], "acme");
        assert_eq!(headers["x-portcullis-scopes"], "events");
        assert_eq!(headers["x-keep"], "1");
    }

    #[test]
    fn other_authorization_schemes_pass_and_upgrades_keep_their_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic dXNlcg=="),
        );
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let forwarded = Forwarded {
            principal: "spiffe://td/ns/a/sa/b",
            tenant: "acme",
            scopes: None,
            peer_tenant: Some("globex"),
        };
        to_upstream(&mut headers, &forwarded, true);
        assert_eq!(headers[X_PORTCULLIS_TENANT], "acme");
        assert_eq!(headers[X_PORTCULLIS_PEER_TENANT], "globex");
        assert_eq!(headers[header::AUTHORIZATION], "Basic dXNlcg==");
        assert_eq!(headers[header::UPGRADE], "websocket");
        assert_eq!(headers[header::CONNECTION], "upgrade");
        assert!(headers.get(X_PORTCULLIS_SCOPES).is_none());
    }
}
