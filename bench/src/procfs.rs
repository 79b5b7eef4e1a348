//! What the report needs from /proc: CPU time and RSS of a server's process tree (nginx
//! is a master and a worker), the load average, and the machine.

use std::path::Path;

/// utime + stime in clock ticks from the text of `/proc/<pid>/stat`. The command name
/// (field 2) is in parentheses and may hold spaces or `)`, so fields are counted from
/// the last `)`: state is field 3, utime field 14, stime field 15.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS` in bytes from the text of `/proc/<pid>/status`.
pub fn parse_vmrss_bytes(status: &str) -> Option<u64> {
    parse_status_bytes(status, "VmRSS")
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, ...) in bytes.
pub fn parse_status_bytes(status: &str, field: &str) -> Option<u64> {
    let line = status
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?;
    let mut parts = line[field.len() + 1..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => Some(value * 1024),
        _ => None,
    }
}

/// Resident memory of one process now (`VmRSS`) and at its peak (`VmHWM`), in bytes.
pub fn memory(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some((
        parse_status_bytes(&status, "VmRSS")?,
        parse_status_bytes(&status, "VmHWM")?,
    ))
}

/// Child pids listed in a `/proc/<pid>/task/<tid>/children` file.
pub fn parse_children(text: &str) -> Vec<u32> {
    text.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 on Linux unless told otherwise).
pub fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// `pid` and all its descendants.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let p = all[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for task in tasks.flatten() {
                if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
                    all.extend(parse_children(&text));
                }
            }
        }
        i += 1;
    }
    all
}

/// CPU seconds (user + system) used so far by `pid` and its descendants.
pub fn cpu_seconds(pid: u32, ticks_per_second: u64) -> f64 {
    let ticks: u64 = tree(pid)
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| parse_stat_ticks(&s))
        .sum();
    ticks as f64 / ticks_per_second as f64
}

/// Resident memory of `pid` and its descendants, in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    tree(pid)
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| parse_vmrss_bytes(&s))
        .sum()
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".to_owned())
}

/// Processors in /proc/cpuinfo (the machine's, whatever this process is pinned to).
pub fn processors() -> usize {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| s.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(0)
}

/// The CPU model from /proc/cpuinfo.
pub fn cpu_model() -> String {
    std::fs::read_to_string(Path::new("/proc/cpuinfo"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "?".to_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let stat = "4242 (nginx: worker) process)) S 4241 4241 4241 0 -1 4194624 412 0 0 0 \
                    1234 567 0 0 20 0 1 0 981 11468800 1280 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat), Some(1234 + 567));
        assert_eq!(parse_stat_ticks("1 (x) S 0"), None);
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn vmrss_is_read_in_bytes() {
        let status =
            "Name:\tportcullis-prox\nVmPeak:\t  9000 kB\nVmRSS:\t    7300 kB\nThreads:\t2\n";
        assert_eq!(parse_vmrss_bytes(status), Some(7300 * 1024));
        assert_eq!(parse_vmrss_bytes("Name:\tkthreadd\n"), None);
        let status = "VmHWMx:\t1 kB\nVmHWM:\t  81234 kB\nVmRSS:\t 60000 kB\n";
        assert_eq!(parse_status_bytes(status, "VmHWM"), Some(81234 * 1024));
    }

    #[test]
    fn children_list_and_own_process() {
        assert_eq!(parse_children("12 13 \n"), vec![12, 13]);
        assert!(parse_children("").is_empty());
        let me = std::process::id();
        assert!(tree(me).contains(&me));
        assert!(rss_bytes(me) > 0);
        assert!(cpu_seconds(me, clock_ticks()) >= 0.0);
    }
}
