//! Check results, their aggregation and their rendering.

use serde::Serialize;

use crate::Outcome;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine (`✓`).
    Pass,
    /// Works now, needs attention (`!`).
    Warn,
    /// Broken (`✗`): the command exits non-zero.
    Fail,
}

impl Status {
    /// The mark printed before the check.
    pub fn mark(self) -> &'static str {
        match self {
            Self::Pass => "✓",
            Self::Warn => "!",
            Self::Fail => "✗",
        }
    }
}

/// One check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    /// What was checked (`CRD apikeys.portcullis.dev`).
    pub name: String,
    /// How it came out.
    pub status: Status,
    /// What was found.
    pub message: String,
    /// What to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// Items the message refers to (pods without a proxy, ...).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
}

impl CheckResult {
    fn new(name: impl Into<String>, status: Status, message: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status,
            message: message.into(),
            hint: None,
            details: Vec::new(),
        }
    }

    /// A passed check.
    pub fn pass(name: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(name, Status::Pass, message)
    }

    /// A warning.
    pub fn warn(name: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(name, Status::Warn, message)
    }

    /// A failure.
    pub fn fail(name: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(name, Status::Fail, message)
    }

    /// Adds what to do.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Adds the items the message refers to.
    pub fn details(mut self, details: Vec<String>) -> Self {
        self.details = details;
        self
    }
}

/// Most detail lines a check lists; the rest are counted.
pub const MAX_DETAILS: usize = 10;

/// The first [`MAX_DETAILS`] of `lines`, then `and K more`, so a cluster with many
/// broken objects still gets a report that fits on a screen.
pub fn bounded(mut lines: Vec<String>) -> Vec<String> {
    if lines.len() > MAX_DETAILS {
        let more = lines.len() - MAX_DETAILS;
        lines.truncate(MAX_DETAILS);
        lines.push(format!("and {more} more"));
    }
    lines
}

/// Counts by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Checks that passed.
    pub passed: usize,
    /// Warnings.
    pub warnings: usize,
    /// Failures.
    pub failed: usize,
}

/// Every check of one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// In the order they ran.
    pub checks: Vec<CheckResult>,
    /// Counts.
    pub summary: Summary,
}

impl CheckReport {
    /// Aggregates `checks`.
    pub fn new(checks: Vec<CheckResult>) -> Self {
        let mut summary = Summary::default();
        for check in &checks {
            match check.status {
                Status::Pass => summary.passed += 1,
                Status::Warn => summary.warnings += 1,
                Status::Fail => summary.failed += 1,
            }
        }
        Self { checks, summary }
    }

    /// The worst status, `Pass` for no checks.
    pub fn worst(&self) -> Status {
        self.checks
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(Status::Pass)
    }

    /// Findings (exit 1) when any check failed; warnings alone exit 0.
    pub fn outcome(&self) -> Outcome {
        if self.worst() == Status::Fail {
            Outcome::Findings
        } else {
            Outcome::Clean
        }
    }

    /// One line per check (mark, name, message), its details and hint indented below,
    /// then the counts.
    pub fn render(&self) -> String {
        let name_width = self
            .checks
            .iter()
            .map(|c| c.name.chars().count())
            .max()
            .unwrap_or(0);
        let mut text = String::new();
        for check in &self.checks {
            let pad = name_width - check.name.chars().count();
            text.push_str(&format!(
                "{} {}{}   {}\n",
                check.status.mark(),
                check.name,
                " ".repeat(pad),
                check.message
            ));
            for detail in &check.details {
                text.push_str(&format!("      {detail}\n"));
            }
            if let Some(hint) = &check.hint {
                text.push_str(&format!("    → {hint}\n"));
            }
        }
        let s = &self.summary;
        let plural =
            |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
        text.push_str(&format!(
            "\n{}, {}, {}\n",
            plural(s.failed, "failed", "failed"),
            plural(s.warnings, "warning", "warnings"),
            plural(s.passed, "passed", "passed"),
        ));
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregation_counts_and_picks_the_exit_code() {
        let clean = CheckReport::new(vec![
            CheckResult::pass("API server", "v1.33.1"),
            CheckResult::warn("CA root", "expires in 10d"),
        ]);
        assert_eq!(
            clean.summary,
            Summary {
                passed: 1,
                warnings: 1,
                failed: 0
            }
        );
        assert_eq!(clean.worst(), Status::Warn);
        assert_eq!(clean.outcome(), Outcome::Clean);

        let broken = CheckReport::new(vec![
            CheckResult::pass("a", "ok"),
            CheckResult::fail("b", "broken"),
            CheckResult::warn("c", "meh"),
        ]);
        assert_eq!(broken.worst(), Status::Fail);
        assert_eq!(broken.outcome(), Outcome::Findings);
        assert_eq!(CheckReport::new(Vec::new()).outcome(), Outcome::Clean);
    }

    #[test]
    fn rendering_aligns_names_and_indents_hints() {
        let report = CheckReport::new(vec![
            CheckResult::pass("API server", "v1.33.1: native sidecars supported"),
            CheckResult::fail("Injection", "1 pod runs without the proxy")
                .details(vec!["acme/api-0".into()])
                .hint("restart it"),
        ]);
        assert_eq!(
            report.render(),
            "✓ API server   v1.33.1: native sidecars supported\n\
             ✗ Injection    1 pod runs without the proxy\n      acme/api-0\n    → restart it\n\
             \n1 failed, 0 warnings, 1 passed\n"
        );
    }

    #[test]
    fn details_are_bounded() {
        let lines = |n: usize| (0..n).map(|i| i.to_string()).collect::<Vec<_>>();
        assert_eq!(bounded(lines(MAX_DETAILS)).len(), MAX_DETAILS);
        let long = bounded(lines(MAX_DETAILS + 3));
        assert_eq!(long.len(), MAX_DETAILS + 1);
        assert_eq!(long[MAX_DETAILS], "and 3 more");
    }

    #[test]
    fn json_names_statuses_in_lowercase() {
        let report = CheckReport::new(vec![CheckResult::warn("x", "y").hint("z")]);
        let json = serde_json::to_value(&report).unwrap_or_default();
        assert_eq!(json["checks"][0]["status"], "warn");
        assert_eq!(json["checks"][0]["hint"], "z");
        assert!(json["checks"][0].get("details").is_none());
        assert_eq!(json["summary"]["warnings"], 1);
    }
}
