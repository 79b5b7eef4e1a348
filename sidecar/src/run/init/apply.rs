//! Running `iptables-save` / `iptables-restore` and turning their complaints into a
//! message that says which rule failed and how to fix it.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::InitError;
use super::rules::RestoreScript;

/// The two iptables tools the init step runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IptablesTools {
    /// `iptables-save`.
    pub save: PathBuf,
    /// `iptables-restore`.
    pub restore: PathBuf,
}

impl Default for IptablesTools {
    fn default() -> Self {
        Self {
            save: PathBuf::from("iptables-save"),
            restore: PathBuf::from("iptables-restore"),
        }
    }
}

impl IptablesTools {
    /// `iptables-save -t nat`: the current nat table, to leave out jumps already there.
    pub fn current_nat(&self) -> Result<String, InitError> {
        let output = Command::new(&self.save)
            .args(["-t", "nat"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| spawn_error(&self.save, e))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
            return Err(InitError::Iptables {
                rule: None,
                hint: diagnose(&stderr),
                stderr,
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `iptables-restore --noflush` with `script` on stdin.
    pub fn restore(&self, script: &RestoreScript) -> Result<(), InitError> {
        let mut child = Command::new(&self.restore)
            .arg("--noflush")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| spawn_error(&self.restore, e))?;
        if let Some(mut stdin) = child.stdin.take() {
            // A tool that exits early closes the pipe; its stderr says why.
            let _ = stdin.write_all(script.text().as_bytes());
        }
        let output = child
            .wait_with_output()
            .map_err(|e| spawn_error(&self.restore, e))?;
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        Err(InitError::Iptables {
            rule: failed_rule(&stderr, script),
            hint: diagnose(&stderr),
            stderr,
        })
    }
}

fn spawn_error(tool: &Path, source: std::io::Error) -> InitError {
    let hint = if source.kind() == std::io::ErrorKind::NotFound {
        format!(
            "{} is not installed in the proxy image; install the iptables package",
            tool.display()
        )
    } else {
        "check that the init container's image and securityContext allow running it".to_owned()
    };
    InitError::Spawn {
        tool: tool.display().to_string(),
        source,
        hint,
    }
}

/// The line iptables-restore blames: `Error occurred at line: 7` (legacy) or
/// `line 7: RULE_APPEND failed (...)` (nf_tables) → 7.
fn failed_line(stderr: &str) -> Option<usize> {
    stderr.lines().find_map(|line| {
        if let Some((_, rest)) = line.split_once("Error occurred at line:") {
            return rest.trim().parse().ok();
        }
        let rest = line.trim_start().strip_prefix("line ")?;
        rest.split_once(':')?.0.trim().parse().ok()
    })
}

/// The rule on `line` of `script`, when that line is a rule (nf_tables may blame COMMIT).
fn failed_rule(stderr: &str, script: &RestoreScript) -> Option<String> {
    let line = script.line(failed_line(stderr)?)?;
    line.starts_with("-A ").then(|| line.to_owned())
}

/// The fix for the failures seen in practice.
pub(crate) fn diagnose(stderr: &str) -> String {
    let text = stderr.to_ascii_lowercase();
    if text.contains("permission denied")
        || text.contains("operation not permitted")
        || text.contains("must be root")
    {
        "the init container needs uid 0 with the NET_ADMIN and NET_RAW capabilities (the \
         injector sets them; a Pod Security admission level or policy engine may have removed them)"
            .to_owned()
    } else if text.contains("read-only file system")
        || text.contains("lock file")
        || text.contains("xtables.lock")
    {
        "iptables needs a writable /run for its lock file; mount an emptyDir there (the injector \
         adds volume portcullis-xtables-lock)"
            .to_owned()
    } else if text.contains("table does not exist")
        || text.contains("can't initialize")
        || text.contains("unable to initialize table")
        || text.contains("couldn't load target")
        || text.contains("no chain/target/match")
    {
        "the node's kernel lacks iptables nat support (modules iptable_nat / nf_nat and xt_REDIRECT); \
         load them on the node, or use the iptables variant (legacy or nft) the node uses"
            .to_owned()
    } else {
        "run `portcullis-proxy init --dry-run` to print the rules and apply them by hand to see the full error".to_owned()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn failed_line_is_read_from_iptables_restore_output() {
        let stderr = "iptables-restore v1.8.7 (legacy): Couldn't load target `REDIRECT':No such file or directory\n\nError occurred at line: 5\nTry `iptables-restore -h' or 'iptables-restore --help' for more information.";
        assert_eq!(failed_line(stderr), Some(5));
        assert!(diagnose(stderr).contains("xt_REDIRECT"));
        assert_eq!(failed_line("no line here"), None);
        let nft = "iptables-restore v1.8.9 (nf_tables): \nline 10: RULE_APPEND failed (Invalid argument): rule in chain PORTCULLIS_OUTPUT";
        assert_eq!(failed_line(nft), Some(10));
        let script = RestoreScript {
            lines: vec!["*nat".into(), "-A X -j RETURN".into(), "COMMIT".into()],
        };
        assert_eq!(
            failed_rule("Error occurred at line: 2", &script).as_deref(),
            Some("-A X -j RETURN")
        );
        assert_eq!(
            failed_rule("Error occurred at line: 3", &script),
            None,
            "COMMIT is not a rule"
        );
    }

    #[test]
    fn permission_problems_name_the_capability() {
        let hint = diagnose(
            "iptables-restore v1.8.7 (legacy): iptables-restore: unable to initialize table 'nat': Permission denied (you must be root)",
        );
        assert!(hint.contains("NET_ADMIN"), "{hint}");
        assert!(
            diagnose("Fatal: can't open lock file /run/xtables.lock: Read-only file system")
                .contains("/run")
        );
    }
}
