//! A string that must never be printed: tokens and API keys.

use std::fmt;

/// A secret string (Splunk HEC token, Datadog API key). `Debug` and `Display` print
/// `<redacted>`; only [`Secret::expose`] gives the value, at the point of use.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value; call only where it is sent, never where it is logged.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_redact() {
        let s = Secret::new("hec-token-123");
        assert!(!format!("{s:?}").contains("hec-token"));
        assert!(!format!("{s}").contains("hec-token"));
        assert_eq!(s.expose(), "hec-token-123");
    }
}
