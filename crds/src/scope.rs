//! Scopes: named sets of routes (method + path pattern) that API keys are granted.

use std::{borrow::Cow, collections::BTreeMap, fmt};

use portcullis_api::names::is_dns_label;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// The pattern the API server enforces for scope names (a DNS label).
pub const SCOPE_NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// A scope name such as `identify` or `events`: lowercase letters, digits and `-`,
/// starting and ending with a letter or digit, at most 63 characters.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ScopeName(String);

/// Why a scope name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid scope name {text:?}: use 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit"
)]
pub struct ScopeNameError {
    /// The refused text.
    pub text: String,
}

impl ScopeName {
    /// Checks and wraps a scope name.
    pub fn new(text: impl Into<String>) -> Result<Self, ScopeNameError> {
        let text = text.into();
        if is_dns_label(&text) {
            Ok(Self(text))
        } else {
            Err(ScopeNameError { text })
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Checks a name read from the API server (kept as text so one bad object never
    /// stops a watch).
    pub fn validate(&self) -> Result<(), ScopeNameError> {
        if is_dns_label(&self.0) {
            Ok(())
        } else {
            Err(ScopeNameError {
                text: self.0.clone(),
            })
        }
    }
}

impl fmt::Display for ScopeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ScopeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ScopeName({})", self.0)
    }
}

impl JsonSchema for ScopeName {
    fn schema_name() -> Cow<'static, str> {
        "ScopeName".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": SCOPE_NAME_PATTERN,
            "maxLength": 63,
            "description": "A scope name: lowercase letters, digits and '-', e.g. identify.",
        })
    }
}

/// An HTTP method a route matches.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "UPPERCASE")]
#[allow(clippy::upper_case_acronyms)]
pub enum HttpMethod {
    /// GET
    GET,
    /// HEAD
    HEAD,
    /// POST
    POST,
    /// PUT
    PUT,
    /// PATCH
    PATCH,
    /// DELETE
    DELETE,
    /// OPTIONS
    OPTIONS,
}

impl HttpMethod {
    /// The method's name as sent on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GET => "GET",
            Self::HEAD => "HEAD",
            Self::POST => "POST",
            Self::PUT => "PUT",
            Self::PATCH => "PATCH",
            Self::DELETE => "DELETE",
            Self::OPTIONS => "OPTIONS",
        }
    }
}

/// One route of a scope: methods (empty means any) and a path pattern where `*`
/// matches any run of characters, `/` included (`/v1/events/*`, `/v1/signals*`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteRule {
    /// Methods this route matches; empty matches every method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<HttpMethod>,
    /// Path pattern starting with `/`; `*` matches any characters.
    #[schemars(regex(pattern = r"^/[^\s?#]*$"), length(max = 1024))]
    pub path: String,
}

impl RouteRule {
    /// A rule for the given methods and path pattern.
    pub fn new(methods: &[HttpMethod], path: impl Into<String>) -> Self {
        Self {
            methods: methods.to_vec(),
            path: path.into(),
        }
    }

    /// Whether a request's method and path (no query string) match this route.
    pub fn matches(&self, method: &str, path: &str) -> bool {
        (self.methods.is_empty() || self.methods.iter().any(|m| m.as_str() == method))
            && glob_match(self.path.as_bytes(), path.as_bytes())
    }

    /// Checks the path pattern (the schema checks it too).
    pub fn validate(&self) -> Result<(), String> {
        if !self.path.starts_with('/') {
            return Err(format!("path {:?} must start with '/'", self.path));
        }
        if self
            .path
            .chars()
            .any(|c| c.is_whitespace() || c == '?' || c == '#')
        {
            return Err(format!(
                "path {:?} must not contain spaces, '?' or '#': match the path only",
                self.path
            ));
        }
        Ok(())
    }

    /// Literal characters in the pattern: more literal means more specific.
    fn specificity(&self) -> (usize, bool) {
        (
            self.path.bytes().filter(|&b| b != b'*').count(),
            !self.methods.is_empty(),
        )
    }
}

/// Matches `text` against `pattern`, where `*` matches any run of bytes.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    // Iterative matcher with one backtrack point: linear in practice, no recursion.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// A tenant's catalogue: scope name → routes.
pub type ScopeMap = BTreeMap<String, Vec<RouteRule>>;

/// The scope a request needs: the scope of the most specific matching route
/// (most literal characters; a rule naming methods beats one that does not; then
/// scope name order, so the answer never depends on map order).
pub fn scope_for<'a>(scopes: &'a ScopeMap, method: &str, path: &str) -> Option<&'a str> {
    scopes
        .iter()
        .flat_map(|(name, rules)| rules.iter().map(move |r| (name, r)))
        .filter(|(_, r)| r.matches(method, path))
        .max_by(|(na, a), (nb, b)| a.specificity().cmp(&b.specificity()).then(nb.cmp(na)))
        .map(|(name, _)| name.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use HttpMethod::*;

    fn demo_scopes() -> ScopeMap {
        ScopeMap::from([
            (
                "identify".to_owned(),
                vec![RouteRule::new(&[POST], "/v1/identify")],
            ),
            (
                "events".to_owned(),
                vec![RouteRule::new(&[GET, POST], "/v1/events/*")],
            ),
            (
                "signals".to_owned(),
                vec![RouteRule::new(&[GET], "/v1/signals*")],
            ),
        ])
    }

    #[test]
    fn scope_names_follow_dns_labels() {
        assert!(ScopeName::new("identify").is_ok());
        assert!(ScopeName::new("a-1").is_ok());
        for bad in ["", "Identify", "-a", "a-", "a_b", "a.b", &"a".repeat(64)] {
            let err = ScopeName::new(bad).unwrap_err();
            assert!(err.to_string().contains("lowercase"), "{bad}: {err}");
        }
    }

    #[test]
    fn glob_matches_prefixes_and_inner_stars() {
        assert!(glob_match(b"/v1/events/*", b"/v1/events/abc/def"));
        assert!(glob_match(b"/v1/events/*", b"/v1/events/"));
        assert!(!glob_match(b"/v1/events/*", b"/v1/events"));
        assert!(glob_match(b"/v1/signals*", b"/v1/signals"));
        assert!(glob_match(b"/v1/signals*", b"/v1/signals/x"));
        assert!(glob_match(b"/v1/*/items", b"/v1/a/b/items"));
        assert!(!glob_match(b"/v1/identify", b"/v1/identify/x"));
        assert!(glob_match(b"*", b""));
    }

    #[test]
    fn scope_for_uses_method_and_path() {
        let scopes = demo_scopes();
        assert_eq!(scope_for(&scopes, "POST", "/v1/identify"), Some("identify"));
        assert_eq!(scope_for(&scopes, "GET", "/v1/identify"), None);
        assert_eq!(scope_for(&scopes, "GET", "/v1/events/42"), Some("events"));
        assert_eq!(scope_for(&scopes, "DELETE", "/v1/events/42"), None);
        assert_eq!(scope_for(&scopes, "GET", "/v1/signals"), Some("signals"));
        assert_eq!(scope_for(&scopes, "GET", "/other"), None);
    }

    #[test]
    fn most_specific_route_wins() {
        let mut scopes = demo_scopes();
        scopes.insert("everything".into(), vec![RouteRule::new(&[], "/v1/*")]);
        assert_eq!(scope_for(&scopes, "POST", "/v1/identify"), Some("identify"));
        assert_eq!(
            scope_for(&scopes, "PUT", "/v1/identify"),
            Some("everything")
        );
    }

    #[test]
    fn route_validation_explains_the_problem() {
        assert!(RouteRule::new(&[], "/ok/*").validate().is_ok());
        assert!(
            RouteRule::new(&[], "v1")
                .validate()
                .unwrap_err()
                .contains("must start with '/'")
        );
        assert!(
            RouteRule::new(&[], "/a?b=1")
                .validate()
                .unwrap_err()
                .contains("path only")
        );
    }
}
