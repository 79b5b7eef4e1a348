//! The one path a request is judged and forwarded by. Scopes match on it, the audit
//! records it and the app receives it, so an app that resolves `..` or decodes `%2f`
//! itself cannot be led somewhere the scope check never saw.
//!
//! Normalising (in this order, after Envoy's `normalize_path` + `merge_slashes` +
//! `path_with_escaped_slashes_action: REJECT_REQUEST`, but refusing instead of
//! clamping where the request is ambiguous, as nginx does):
//! 1. percent-escapes of unreserved characters (ALPHA DIGIT `-` `_` `~`) are decoded,
//!    other escapes keep their bytes with upper-case hex;
//! 2. repeated slashes are merged;
//! 3. `.` and `..` segments are removed (RFC 3986 §5.2.4).
//!
//! Refused: an encoded `/`, `\` or `.` (`%2f`, `%5c`, `%2e`: each app decodes them at a
//! different step), a raw `\` (a separator on Windows and in some frameworks), `%00`
//! (C strings end there), a malformed escape, a dot segment carrying `;` parameters
//! (`..;/` is `..` to Tomcat), and a `..` that would climb above `/` (no app has a
//! parent of its root; clamping would hide the attempt).

use std::borrow::Cow;

/// Why a path is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathRefusal {
    /// `%2f`, `%5c` or `%2e`: a separator or dot hidden from the scope check.
    EncodedSeparator,
    /// A raw backslash.
    Backslash,
    /// `%00`.
    EncodedNul,
    /// `%` not followed by two hex digits.
    MalformedEscape,
    /// `.;x` or `..;x`: a dot segment with parameters.
    DotSegmentParameters,
    /// More `..` segments than there are segments above them.
    AboveRoot,
    /// Neither `/`-rooted nor `*`.
    NotAbsolute,
}

impl PathRefusal {
    /// What the caller should do, for the denial body.
    pub fn message(self) -> &'static str {
        match self {
            Self::EncodedSeparator => {
                "the path holds an encoded \"/\", \"\\\" or \".\" (%2F, %5C, %2E); send them unencoded or encode the data another way"
            }
            Self::Backslash => "the path holds a backslash; use \"/\" to separate segments",
            Self::EncodedNul => "the path holds an encoded NUL (%00); remove it",
            Self::MalformedEscape => {
                "the path holds a \"%\" not followed by two hex digits; encode \"%\" as %25"
            }
            Self::DotSegmentParameters => {
                "the path holds a \".\" or \"..\" segment with \";\" parameters; remove them"
            }
            Self::AboveRoot => {
                "the path climbs above \"/\" with \"..\"; send the path you mean without dot segments"
            }
            Self::NotAbsolute => "the path must start with \"/\"",
        }
    }
}

fn hex(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

fn unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// Step 1: decodes unreserved escapes, refuses the ambiguous ones.
fn decode_unreserved(path: &str) -> Result<String, PathRefusal> {
    const UPPER_HEX: &[u8; 16] = b"0123456789ABCDEF";
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => return Err(PathRefusal::Backslash),
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathRefusal::MalformedEscape);
                };
                match hi << 4 | lo {
                    b'/' | b'\\' | b'.' => return Err(PathRefusal::EncodedSeparator),
                    0 => return Err(PathRefusal::EncodedNul),
                    decoded if unreserved(decoded) => out.push(char::from(decoded)),
                    _ => {
                        out.push('%');
                        out.push(char::from(UPPER_HEX[usize::from(hi)]));
                        out.push(char::from(UPPER_HEX[usize::from(lo)]));
                    }
                }
                i += 3;
            }
            _ => {
                // Copy the run up to the next special byte at once (keeps UTF-8 whole).
                let end = bytes[i..]
                    .iter()
                    .position(|b| matches!(b, b'%' | b'\\'))
                    .map_or(bytes.len(), |n| i + n);
                out.push_str(&path[i..end]);
                i = end;
            }
        }
    }
    Ok(out)
}

/// Steps 2 and 3 on a decoded, `/`-rooted path.
fn resolve_segments(decoded: &str) -> Result<String, PathRefusal> {
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded.split('/').skip(1) {
        trailing_slash = false;
        let bare = segment.split(';').next().unwrap_or_default();
        if segment.contains(';') && matches!(bare, "." | "..") {
            return Err(PathRefusal::DotSegmentParameters);
        }
        match segment {
            // Empty (a repeated or trailing slash) and "." keep the directory.
            "" | "." => trailing_slash = true,
            ".." => {
                kept.pop().ok_or(PathRefusal::AboveRoot)?;
                trailing_slash = true;
            }
            _ => kept.push(segment),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for segment in &kept {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || kept.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// The normalised form of `path` (no query), borrowed when it is already normal.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathRefusal> {
    if path == "*" {
        return Ok(Cow::Borrowed(path));
    }
    if !path.starts_with('/') {
        return Err(PathRefusal::NotAbsolute);
    }
    let decoded = decode_unreserved(path)?;
    let resolved = resolve_segments(&decoded)?;
    Ok(if resolved == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(resolved)
    })
}

/// Normalises the path of `request`'s target in place, keeping the query as sent.
/// An absolute-form target (`GET https://host/p`) and an HTTP/2 `:path` go through the
/// same steps; the authority plays no part in routing.
pub fn normalize_request<B>(request: &mut http::Request<B>) -> Result<(), PathRefusal> {
    let uri = request.uri();
    let Cow::Owned(normal) = normalize(uri.path())? else {
        return Ok(());
    };
    let target = match uri.query() {
        Some(query) => format!("{normal}?{query}"),
        None => normal,
    };
    let mut parts = uri.clone().into_parts();
    // Every byte of `target` came from a valid target, so this only fails on a bug;
    // refusing is the safe answer then.
    parts.path_and_query =
        Some(http::uri::PathAndQuery::try_from(target).map_err(|_| PathRefusal::NotAbsolute)?);
    *request.uri_mut() = http::Uri::from_parts(parts).map_err(|_| PathRefusal::NotAbsolute)?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn ok(path: &str) -> String {
        normalize(path).unwrap().into_owned()
    }

    fn refused(path: &str) -> PathRefusal {
        normalize(path).unwrap_err()
    }

    #[test]
    fn normal_paths_are_borrowed_unchanged() {
        for path in [
            "/",
            "/v1/events/1",
            "/v1/events/",
            "/a%20b",
            "/caf\u{e9}",
            "*",
        ] {
            assert!(matches!(normalize(path), Ok(Cow::Borrowed(p)) if p == path));
        }
    }

    #[test]
    fn dot_segments_are_removed() {
        assert_eq!(ok("/v1/events/../signals"), "/v1/signals");
        assert_eq!(
            ok("/v1/events/../../admin/secrets.txt"),
            "/admin/secrets.txt"
        );
        assert_eq!(ok("/v1/./events/./1"), "/v1/events/1");
        assert_eq!(ok("/v1/events/.."), "/v1/");
        assert_eq!(ok("/v1/events/."), "/v1/events/");
        assert_eq!(ok("/v1/.."), "/");
        assert_eq!(ok("/v1/...x/..."), "/v1/...x/...");
    }

    #[test]
    fn repeated_slashes_are_merged_before_dot_segments() {
        assert_eq!(ok("//v1///events//1"), "/v1/events/1");
        // Merged first, so ".." removes "a", as Go's path.Clean and nginx do.
        assert_eq!(ok("/a//../b"), "/b");
        assert_eq!(ok("/v1//"), "/v1/");
    }

    #[test]
    fn unreserved_escapes_are_decoded_others_kept_upper_case() {
        assert_eq!(ok("/v1/%65vents/%31"), "/v1/events/1");
        assert_eq!(ok("/a%7eb%5F"), "/a~b_");
        assert_eq!(ok("/a%20b%3f%3B"), "/a%20b%3F%3B");
        assert_eq!(ok("/x%c3%a9"), "/x%C3%A9");
    }

    #[test]
    fn encoded_separators_and_dots_are_refused() {
        for path in [
            "/v1/events/..%2f..%2fadmin",
            "/v1/events/..%2F..%2Fadmin",
            "/v1/events/..%5cadmin",
            "/v1/events/..%5Cadmin",
            "/v1/events/%2e%2e/admin",
            "/v1/events/%2E%2E/admin",
            "/v1/events/%2e",
        ] {
            assert_eq!(refused(path), PathRefusal::EncodedSeparator, "{path}");
        }
    }

    #[test]
    fn ambiguous_bytes_are_refused() {
        assert_eq!(refused("/v1/events\\..\\admin"), PathRefusal::Backslash);
        assert_eq!(refused("/v1/events/1%00.json"), PathRefusal::EncodedNul);
        assert_eq!(refused("/v1/%zz"), PathRefusal::MalformedEscape);
        assert_eq!(refused("/v1/%2"), PathRefusal::MalformedEscape);
        assert_eq!(
            refused("/v1/events/..;/admin"),
            PathRefusal::DotSegmentParameters
        );
        assert_eq!(
            refused("/v1/events/.;x/1"),
            PathRefusal::DotSegmentParameters
        );
        assert_eq!(ok("/v1/events/1;v=2"), "/v1/events/1;v=2");
        assert_eq!(refused("v1/events"), PathRefusal::NotAbsolute);
    }

    #[test]
    fn climbing_above_the_root_is_refused_not_clamped() {
        assert_eq!(refused("/.."), PathRefusal::AboveRoot);
        assert_eq!(
            refused("/v1/events/../../../etc/passwd"),
            PathRefusal::AboveRoot
        );
        assert_eq!(refused("/v1/../../x"), PathRefusal::AboveRoot);
    }
}
