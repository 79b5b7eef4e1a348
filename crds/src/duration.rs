//! Durations as users write them in specs: `90d`, `1m`, `1h30m`, `500ms`.

use std::{borrow::Cow, fmt, str::FromStr, time::Duration};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The pattern the API server enforces; [`DurationSpec::from_str`] accepts exactly this.
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h|d|w))+$";

/// A duration written as one or more `<number><unit>` parts, units `ms s m h d w`.
///
/// It keeps the typed value; it serialises to its canonical compact form.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DurationSpec(Duration);

/// Why a duration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration {text:?}: use a number and a unit (ms, s, m, h, d, w), e.g. 90d or 1h30m"
)]
pub struct DurationError {
    /// The refused text.
    pub text: String,
}

impl DurationSpec {
    /// Wraps a typed duration.
    pub const fn new(duration: Duration) -> Self {
        Self(duration)
    }

    /// `n` days.
    pub const fn days(n: u64) -> Self {
        Self(Duration::from_secs(n * 86_400))
    }

    /// `n` minutes.
    pub const fn minutes(n: u64) -> Self {
        Self(Duration::from_secs(n * 60))
    }

    /// The typed value.
    pub const fn get(self) -> Duration {
        self.0
    }
}

impl FromStr for DurationSpec {
    type Err = DurationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || DurationError {
            text: text.to_owned(),
        };
        if text.is_empty() {
            return Err(error());
        }
        let mut total = Duration::ZERO;
        let mut rest = text;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(error());
            }
            let number: u64 = rest[..digits].parse().map_err(|_| error())?;
            rest = &rest[digits..];
            let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
            let unit = match &rest[..unit_len] {
                "ms" => Duration::from_millis(1),
                "s" => Duration::from_secs(1),
                "m" => Duration::from_secs(60),
                "h" => Duration::from_secs(3_600),
                "d" => Duration::from_secs(86_400),
                "w" => Duration::from_secs(7 * 86_400),
                _ => return Err(error()),
            };
            rest = &rest[unit_len..];
            let part = u32::try_from(number)
                .ok()
                .and_then(|n| unit.checked_mul(n))
                .ok_or_else(error)?;
            total = total.checked_add(part).ok_or_else(error)?;
        }
        Ok(Self(total))
    }
}

impl fmt::Display for DurationSpec {
    /// Largest whole units first: `90d`, `1h30m`, `1500ms` prints as `1s500ms`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut millis = self.0.as_millis();
        if millis == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in [
            ("d", 86_400_000u128),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1_000),
            ("ms", 1),
        ] {
            if millis >= size {
                write!(f, "{}{unit}", millis / size)?;
                millis %= size;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for DurationSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DurationSpec({self})")
    }
}

impl Serialize for DurationSpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DurationSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for DurationSpec {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "description": "A duration such as 90d, 7d, 1h30m, 1m or 500ms (units ms, s, m, h, d, w).",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_and_compound_durations() {
        let parse = |t: &str| t.parse::<DurationSpec>().unwrap().get();
        assert_eq!(parse("90d"), Duration::from_secs(90 * 86_400));
        assert_eq!(parse("1m"), Duration::from_secs(60));
        assert_eq!(parse("1h30m"), Duration::from_secs(5_400));
        assert_eq!(parse("500ms"), Duration::from_millis(500));
        assert_eq!(parse("2w"), Duration::from_secs(14 * 86_400));
    }

    #[test]
    fn refuses_what_the_schema_pattern_refuses() {
        for bad in ["", "90", "d", "1.5h", "1 h", "1y", "-1m", "1month", "h1"] {
            let err = bad.parse::<DurationSpec>().unwrap_err();
            assert_eq!(err.text, bad);
            assert!(err.to_string().contains("e.g. 90d"), "{err}");
        }
    }

    #[test]
    fn overflow_is_an_error_not_a_panic() {
        assert!("99999999999999999999d".parse::<DurationSpec>().is_err());
        assert!("4294967296d".parse::<DurationSpec>().is_err());
    }

    #[test]
    fn display_is_canonical_and_round_trips() {
        for (text, canonical) in [
            ("90d", "90d"),
            ("60m", "1h"),
            ("1500ms", "1s500ms"),
            ("0s", "0s"),
        ] {
            let d: DurationSpec = text.parse().unwrap();
            assert_eq!(d.to_string(), canonical);
            assert_eq!(canonical.parse::<DurationSpec>().unwrap(), d);
        }
    }

    #[test]
    fn serde_uses_the_text_form() {
        let d: DurationSpec = serde_json::from_str("\"7d\"").unwrap();
        assert_eq!(d, DurationSpec::days(7));
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"7d\"");
        let err = serde_json::from_str::<DurationSpec>("\"seven days\"").unwrap_err();
        assert!(err.to_string().contains("invalid duration"));
    }
}
