//! Scope checks: the route's scope comes from the pod's scopes-map override when set,
//! else from the tenant catalogue in the bundle. A key must hold that scope; a route
//! that maps to no scope is closed to keys. mTLS peers (once admitted, see
//! [`super::authorize_peer`]) hold no scopes: they may call any mapped route, and
//! unmapped ones only where `inbound.peersNeedMappedRoute: false` opens them.

use portcullis_crds::scope::ScopeMap;

use crate::{
    listener::deny::{Denial, Reason},
    policy::CompiledPolicy,
};

/// The scope a request needs, if its route maps to one.
pub fn route_scope<'a>(
    bundle: &'a CompiledPolicy,
    scopes_override: Option<&'a ScopeMap>,
    method: &str,
    path: &str,
) -> Option<&'a str> {
    match scopes_override {
        Some(map) => portcullis_crds::scope::scope_for(map, method, path),
        None => bundle.scope_for(method, path),
    }
}

/// Whether a key holding `granted` may call a route needing `needed`.
pub fn authorize_key<I>(
    granted: I,
    needed: Option<&str>,
    method: &str,
    path: &str,
) -> Result<(), Denial>
where
    I: IntoIterator,
    I::Item: AsRef<str>,
{
    let Some(needed) = needed else {
        return Err(Denial::new(
            Reason::NoScopeForRoute,
            format!(
                "{method} {path} is not part of any scope, so no API key may call it; check the method and path"
            ),
        ));
    };
    if granted.into_iter().any(|s| s.as_ref() == needed) {
        Ok(())
    } else {
        Err(Denial::new(
            Reason::MissingScope,
            format!(
                "this API key lacks scope \"{needed}\", which {method} {path} needs; use a key granted \"{needed}\""
            ),
        ))
    }
}

/// Whether an mTLS peer may call a route.
pub fn authorize_peer(
    needed: Option<&str>,
    peers_need_mapped_route: bool,
    method: &str,
    path: &str,
) -> Result<(), Denial> {
    if needed.is_none() && peers_need_mapped_route {
        return Err(Denial::new(
            Reason::NoScopeForRoute,
            format!(
                "{method} {path} is not part of any scope, and mTLS peers may call mapped routes only; add the route to a scope in the Tenant's spec.scopes (or the pod's portcullis.dev/scopes-map annotation)"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use portcullis_crds::{
        PolicyBundle,
        scope::{HttpMethod, RouteRule},
    };

    #[test]
    fn keys_need_the_route_scope_and_the_message_names_it() {
        let granted = ["identify".to_owned()];
        assert!(authorize_key(&granted, Some("identify"), "POST", "/v1/identify").is_ok());
        let denial = authorize_key(&granted, Some("events"), "GET", "/v1/events/1").unwrap_err();
        assert_eq!(denial.reason, Reason::MissingScope);
        assert!(denial.error.contains("\"events\""));
        assert_eq!(
            authorize_key(&granted, None, "GET", "/x")
                .unwrap_err()
                .reason,
            Reason::NoScopeForRoute
        );
    }

    #[test]
    fn override_map_replaces_the_catalogue() {
        let bundle = PolicyBundle {
            scopes: ScopeMap::from([(
                "events".into(),
                vec![RouteRule::new(&[HttpMethod::GET], "/v1/events/*")],
            )]),
            ..PolicyBundle::default()
        };
        let bundle = CompiledPolicy::from(bundle);
        let local = ScopeMap::from([("local".into(), vec![RouteRule::new(&[], "/v1/*")])]);
        assert_eq!(
            route_scope(&bundle, None, "GET", "/v1/events/1"),
            Some("events")
        );
        assert_eq!(
            route_scope(&bundle, Some(&local), "GET", "/v1/events/1"),
            Some("local")
        );
    }

    #[test]
    fn peers_may_call_unmapped_routes_unless_configured() {
        assert!(authorize_peer(None, false, "GET", "/x").is_ok());
        assert_eq!(
            authorize_peer(None, true, "GET", "/x").unwrap_err().reason,
            Reason::NoScopeForRoute
        );
    }
}
