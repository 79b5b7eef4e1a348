//! Rendering: aligned tables and label/value blocks for people, JSON and YAML for
//! scripts, and the time formats both use.

use std::io::Write;

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

use crate::cli::OutputFormat;
use crate::error::CliError;

/// Columns separated by three spaces, as `kubectl get` prints them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new<S: Into<String>>(header: impl IntoIterator<Item = S>) -> Self {
        Self {
            header: header.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row; missing cells print empty, extra cells are dropped.
    pub fn push<S: Into<String>>(&mut self, row: impl IntoIterator<Item = S>) {
        let mut row: Vec<String> = row.into_iter().map(Into::into).collect();
        row.resize(self.header.len(), String::new());
        self.rows.push(row);
    }

    /// The rendered table, one line per row, no trailing spaces.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| width(h)).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(cell));
            }
        }
        let mut text = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
                if i > 0 {
                    line.push_str("   ");
                }
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', w - width(cell)));
            }
            text.push_str(line.trim_end());
            text.push('\n');
        }
        text
    }
}

/// Label/value lines with the values aligned (`kubectl describe` style).
pub fn render_fields(fields: &[(&str, String)]) -> String {
    let label_width = fields.iter().map(|(l, _)| width(l) + 1).max().unwrap_or(0);
    let mut text = String::new();
    for (label, value) in fields {
        let label = format!("{label}:");
        let pad = label_width - width(&label) + 2;
        text.push_str(&label);
        text.extend(std::iter::repeat_n(' ', pad));
        text.push_str(value);
        text.push('\n');
    }
    text
}

/// Display width: characters, which is right for the ASCII and the ✓ ✗ ! we print.
fn width(text: &str) -> usize {
    text.chars().count()
}

/// Writes `value` as pretty JSON or YAML.
pub fn write_structured<T: Serialize>(
    format: OutputFormat,
    value: &T,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let text = match format {
        OutputFormat::Yaml => {
            serde_yaml::to_string(value).map_err(|e| CliError::Output(e.to_string()))?
        }
        OutputFormat::Json | OutputFormat::Table => {
            let mut json =
                serde_json::to_string_pretty(value).map_err(|e| CliError::Output(e.to_string()))?;
            json.push('\n');
            json
        }
    };
    out.write_all(text.as_bytes())?;
    Ok(())
}

/// A Kubernetes object without `metadata.managedFields`, as kubectl prints objects.
pub fn without_managed_fields<K: kube::Resource>(mut object: K) -> K {
    object.meta_mut().managed_fields = None;
    object
}

/// `2026-03-16T14:22:01Z`.
pub fn timestamp(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// A short duration the way kubectl prints ages: `45s`, `12m`, `5h`, `87d`, `3y`.
pub fn short_duration(d: SignedDuration) -> String {
    let secs = d.as_secs().unsigned_abs();
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 120 * 60 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s if s < 730 * 86_400 => format!("{}d", s / 86_400),
        s => format!("{}y", s / (365 * 86_400)),
    }
}

/// `in 87d` or `3d ago` relative to `now`.
pub fn relative(t: Timestamp, now: Timestamp) -> String {
    let d = t.duration_since(now);
    if d.is_negative() {
        format!("{} ago", short_duration(d))
    } else {
        format!("in {}", short_duration(d))
    }
}

/// `2026-03-16T14:22:01Z (in 87d)`.
pub fn timestamp_relative(t: Timestamp, now: Timestamp) -> String {
    format!("{} ({})", timestamp(t), relative(t, now))
}

/// An object's age (`kubectl get` AGE column), `<unknown>` without a creation time.
pub fn age(
    created: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    now: Timestamp,
) -> String {
    created.map_or_else(
        || "<unknown>".to_owned(),
        |t| short_duration(now.duration_since(t.0)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_and_trims_line_ends() {
        let mut table = Table::new(["NAME", "ROLE", "STATE"]);
        table.push(["ingest", "Developer", "Active"]);
        table.push(["a", "Owner"]);
        table.push(["x", "y", "z", "dropped"]);
        assert_eq!(
            table.render(),
            "NAME     ROLE        STATE\n\
             ingest   Developer   Active\n\
             a        Owner\n\
             x        y           z\n"
        );
    }

    #[test]
    fn table_counts_symbols_as_one_column() {
        let mut table = Table::new(["", "CHECK"]);
        table.push(["✓", "a"]);
        table.push(["✗", "b"]);
        assert_eq!(table.render(), "    CHECK\n✓   a\n✗   b\n");
    }

    #[test]
    fn fields_align_values() {
        let text = render_fields(&[("Name", "ingest".into()), ("Rate limit", "1000/1m".into())]);
        assert_eq!(text, "Name:        ingest\nRate limit:  1000/1m\n");
    }

    #[test]
    fn durations_and_relative_times_read_like_kubectl() {
        let now = Timestamp::from_second(1_800_000_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let at = |secs: i64| now + SignedDuration::from_secs(secs);
        assert_eq!(relative(at(45), now), "in 45s");
        assert_eq!(relative(at(-600), now), "10m ago");
        assert_eq!(relative(at(5 * 3600), now), "in 5h");
        assert_eq!(relative(at(87 * 86_400 + 10), now), "in 87d");
        assert_eq!(relative(at(-3 * 365 * 86_400), now), "3y ago");
        assert_eq!(timestamp(now), "2027-01-15T08:00:00Z");
    }

    #[test]
    fn structured_output_is_json_or_yaml() {
        #[derive(Serialize)]
        struct Report {
            name: &'static str,
        }
        let mut json = Vec::new();
        write_structured(OutputFormat::Json, &Report { name: "a" }, &mut json).ok();
        assert_eq!(String::from_utf8_lossy(&json), "{\n  \"name\": \"a\"\n}\n");
        let mut yaml = Vec::new();
        write_structured(OutputFormat::Yaml, &Report { name: "a" }, &mut yaml).ok();
        assert_eq!(String::from_utf8_lossy(&yaml), "name: a\n");
    }
}
