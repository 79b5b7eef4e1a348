//! Where a request carries its API key: `Authorization: Bearer <key>` or
//! `X-API-Key: <key>`. Both may be sent only when they agree.

use http::{HeaderMap, header};
use subtle::ConstantTimeEq;

use crate::listener::deny::{Denial, Reason};

/// The header carrying a key besides `Authorization`.
pub const X_API_KEY: &str = "x-api-key";

/// Whether an `Authorization` value uses the Bearer scheme (case-insensitive).
pub fn is_bearer(value: &[u8]) -> bool {
    value.len() >= 7 && value[..7].eq_ignore_ascii_case(b"bearer ")
}

/// The key presented, if any. Different keys in the two headers (or repeated headers)
/// are refused as `conflicting_keys`; a value that is not text is `malformed_key`.
/// Borrows from `headers`: nothing is copied.
pub fn presented_key(headers: &HeaderMap) -> Result<Option<&str>, Denial> {
    let bearer = headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter(|v| is_bearer(v.as_bytes()))
        .map(|v| v.as_bytes()[7..].trim_ascii());
    let api_key = headers
        .get_all(X_API_KEY)
        .iter()
        .map(|v| v.as_bytes().trim_ascii());
    let mut found: Option<&[u8]> = None;
    for candidate in bearer.chain(api_key) {
        match found {
            None => found = Some(candidate),
            // Both are the caller's own values; constant time anyway, it costs nothing.
            Some(first) if bool::from(first.ct_eq(candidate)) => {}
            Some(_) => {
                return Err(Denial::new(
                    Reason::ConflictingKeys,
                    "the Authorization and X-API-Key headers carry different API keys; send one key in one header",
                ));
            }
        }
    }
    match found {
        None => Ok(None),
        Some(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) if !text.is_empty() => Ok(Some(text)),
            _ => Err(Denial::new(
                Reason::MalformedKey,
                "the API key header is empty or not text; send the key exactly as issued (ak_...)",
            )),
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    #[test]
    fn bearer_and_x_api_key_are_both_read() {
        assert_eq!(
            presented_key(&headers(&[("authorization", "Bearer ak_1")])).unwrap(),
            Some("ak_1")
        );
        assert_eq!(
            presented_key(&headers(&[("authorization", "bearer  ak_1 ")])).unwrap(),
            Some("ak_1")
        );
        assert_eq!(
            presented_key(&headers(&[("x-api-key", "ak_2")])).unwrap(),
            Some("ak_2")
        );
        assert_eq!(
            presented_key(&headers(&[("authorization", "Basic abc")])).unwrap(),
            None
        );
        assert_eq!(presented_key(&headers(&[])).unwrap(), None);
    }

    #[test]
    fn agreeing_headers_pass_and_different_keys_conflict() {
        let same = headers(&[("authorization", "Bearer ak_1"), ("x-api-key", "ak_1")]);
        assert_eq!(presented_key(&same).unwrap(), Some("ak_1"));
        let different = headers(&[("authorization", "Bearer ak_1"), ("x-api-key", "ak_2")]);
        assert_eq!(
            presented_key(&different).unwrap_err().reason,
            Reason::ConflictingKeys
        );
        let repeated = headers(&[("x-api-key", "ak_1"), ("x-api-key", "ak_3")]);
        assert_eq!(
            presented_key(&repeated).unwrap_err().reason,
            Reason::ConflictingKeys
        );
    }

    #[test]
    fn empty_keys_are_malformed() {
        assert_eq!(
            presented_key(&headers(&[("x-api-key", " ")]))
                .unwrap_err()
                .reason,
            Reason::MalformedKey
        );
    }
}
