//! IP allowlist entries.

use std::{borrow::Cow, fmt, str::FromStr};

use ipnet::IpNet;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// An allowlist entry as written in a spec: an IPv4 or IPv6 CIDR (`10.0.0.0/8`,
/// `2001:db8::/32`).
///
/// The text is kept as written so an object the API server stored never fails to
/// deserialise; [`Cidr::parse`] gives the typed network, and validation refuses
/// malformed entries with the field path.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Cidr(String);

/// Why an allowlist entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid CIDR {text:?}: write an address and prefix length such as 10.0.0.0/8 or 2001:db8::/32"
)]
pub struct CidrError {
    /// The refused text.
    pub text: String,
}

impl Cidr {
    /// Wraps text without checking it; [`Cidr::parse`] checks.
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// The text as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The typed network.
    pub fn parse(&self) -> Result<IpNet, CidrError> {
        IpNet::from_str(&self.0).map_err(|_| CidrError {
            text: self.0.clone(),
        })
    }
}

impl fmt::Debug for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cidr({})", self.0)
    }
}

impl JsonSchema for Cidr {
    fn schema_name() -> Cow<'static, str> {
        "Cidr".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "format": "cidr",
            "maxLength": 43,
            "description": "An IPv4 or IPv6 network in CIDR notation, e.g. 10.0.0.0/8 or 2001:db8::/32.",
        })
    }
}

/// Parses every entry, reporting the first malformed one with its index.
pub fn parse_all(entries: &[Cidr]) -> Result<Vec<IpNet>, (usize, CidrError)> {
    entries
        .iter()
        .enumerate()
        .map(|(i, c)| c.parse().map_err(|e| (i, e)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v4_and_v6() {
        assert_eq!(
            Cidr::new("10.0.0.0/8").parse().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            Cidr::new("2001:db8::/32").parse().unwrap().to_string(),
            "2001:db8::/32"
        );
    }

    #[test]
    fn refuses_malformed_entries_with_a_hint() {
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "300.1.1.1/8",
            "2001:db8::/129",
            "",
            "any",
        ] {
            let err = Cidr::new(bad).parse().unwrap_err();
            assert_eq!(err.text, bad);
            assert!(err.to_string().contains("10.0.0.0/8"));
        }
    }

    #[test]
    fn parse_all_names_the_first_bad_index() {
        let entries = [Cidr::new("10.0.0.0/8"), Cidr::new("nope"), Cidr::new("bad")];
        let (index, err) = parse_all(&entries).unwrap_err();
        assert_eq!(index, 1);
        assert_eq!(err.text, "nope");
    }
}
