//! Scans the demo proxy with Debian's `sslscan` and asserts only TLS 1.3 is enabled.
//! Skips with a printed reason when sslscan is not installed (CI installs it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;

use support::demo_process::DemoProcess;

#[test]
fn sslscan_sees_only_tls13() {
    if Command::new("sslscan").arg("--version").output().is_err() {
        eprintln!(
            "SKIPPED sslscan_sees_only_tls13: sslscan is not installed (apt-get install -y sslscan)"
        );
        return;
    }
    let demo = DemoProcess::spawn();
    let output = Command::new("timeout")
        .args([
            "60",
            "sslscan",
            "--no-colour",
            "--no-cipher-details",
            &format!("127.0.0.1:{}", demo.inbound_port),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let state = |protocol: &str| {
        text.lines()
            .find(|l| {
                l.trim_start().starts_with(protocol)
                    && (l.contains("enabled") || l.contains("disabled"))
            })
            .map(|l| l.contains("enabled") && !l.contains("disabled"))
            .unwrap_or_else(|| panic!("sslscan output has no {protocol} line:\n{text}"))
    };
    for old in ["SSLv2", "SSLv3", "TLSv1.0", "TLSv1.1", "TLSv1.2"] {
        assert!(!state(old), "{old} must be disabled:\n{text}");
    }
    assert!(state("TLSv1.3"), "TLSv1.3 must be enabled:\n{text}");
}
