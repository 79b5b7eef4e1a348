//! The init step against fake `iptables-save` / `iptables-restore` scripts that record
//! their input, so the whole path (parse args → plan → save → restore → report) runs
//! without privileges; one test also applies the real rules in a scratch network
//! namespace where the host allows it (root with CAP_SYS_ADMIN), and skips otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use clap::Parser;

use super::*;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    init: InitArgs,
}

fn parse(argv: &[&str]) -> InitArgs {
    Cli::try_parse_from(std::iter::once("init").chain(argv.iter().copied()))
        .unwrap()
        .init
}

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A fake pair: save prints `state`, restore appends its stdin to `state`.
fn fake_tools(dir: &Path) -> (PathBuf, PathBuf) {
    let state = dir.join("state");
    std::fs::write(&state, "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n").unwrap();
    let save = script(dir, "iptables-save", &format!("cat {}", state.display()));
    let restore = script(
        dir,
        "iptables-restore",
        &format!(
            "[ \"$1\" = --noflush ] || exit 9\ncat >> {}",
            state.display()
        ),
    );
    (save, restore)
}

#[test]
fn args_as_the_injector_writes_them_parse() {
    let args = parse(&[
        "--inbound-port",
        "4143",
        "--proxy-uid",
        "2102",
        "--skip-inbound-ports",
        "22,9000-9010",
    ]);
    assert_eq!(args.inbound_port, 4143);
    assert_eq!(args.admin_port, 4191);
    assert_eq!(args.proxy_uid, 2102);
    assert_eq!(args.skip_inbound_ports.to_string(), "22,9000-9010");
    assert_eq!(args.outbound_port, None);
    assert!(!args.dry_run);
    let defaults = parse(&[]);
    assert_eq!((defaults.inbound_port, defaults.proxy_uid), (4143, 2102));
    assert!(defaults.skip_inbound_ports.is_empty());
    assert!(Cli::try_parse_from(["init", "--skip-inbound-ports", "ssh"]).is_err());
}

#[test]
fn dry_run_touches_nothing() {
    let args = parse(&[
        "--dry-run",
        "--iptables-save",
        "/nonexistent/save",
        "--iptables-restore",
        "/nonexistent/restore",
    ]);
    let InitOutcome::DryRun(script) = run_init(&args).unwrap() else {
        panic!("not a dry run");
    };
    assert!(
        script
            .lines
            .contains(&"-A PORTCULLIS_INBOUND -p tcp -j REDIRECT --to-ports 4143".to_owned())
    );
}

#[test]
fn applies_once_and_a_rerun_adds_no_second_jump() {
    let dir = tempfile::tempdir().unwrap();
    let (save, restore) = fake_tools(dir.path());
    let argv = [
        "--skip-inbound-ports",
        "22",
        "--iptables-save",
        save.to_str().unwrap(),
        "--iptables-restore",
        restore.to_str().unwrap(),
    ];
    let args = parse(&argv);
    let InitOutcome::Applied(first) = run_init(&args).unwrap() else {
        panic!("dry run")
    };
    assert!(
        first
            .lines
            .contains(&"-A PREROUTING -p tcp -j PORTCULLIS_INBOUND".to_owned())
    );
    let InitOutcome::Applied(second) = run_init(&args).unwrap() else {
        panic!("dry run")
    };
    assert!(
        !second.lines.iter().any(|l| l.starts_with("-A PREROUTING")),
        "{second:?}"
    );
    let state = std::fs::read_to_string(dir.path().join("state")).unwrap();
    assert_eq!(
        state
            .matches("-A PREROUTING -p tcp -j PORTCULLIS_INBOUND")
            .count(),
        1,
        "{state}"
    );
    assert_eq!(
        state.matches("--dport 22 -j RETURN").count(),
        2,
        "rules replaced on each run"
    );
}

#[test]
fn a_failing_rule_is_named_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let (save, _) = fake_tools(dir.path());
    // Line 6 of the script is the REDIRECT rule (no skip ports: *nat, :chain, -F, 2 RETURNs).
    let restore = script(
        dir.path(),
        "failing-restore",
        "cat > /dev/null\necho \"iptables-restore v1.8.7 (legacy): Couldn't load target \\`REDIRECT':No such file or directory\" >&2\necho >&2\necho 'Error occurred at line: 6' >&2\nexit 1",
    );
    let args = parse(&[
        "--iptables-save",
        save.to_str().unwrap(),
        "--iptables-restore",
        restore.to_str().unwrap(),
    ]);
    let err = run_init(&args).unwrap_err();
    let message = err.to_string();
    assert!(
        message.starts_with(
            "rule `-A PORTCULLIS_INBOUND -p tcp -j REDIRECT --to-ports 4143` failed: "
        ),
        "{message}"
    );
    assert!(message.contains("xt_REDIRECT"), "{message}");
}

#[test]
fn missing_privileges_say_net_admin() {
    let dir = tempfile::tempdir().unwrap();
    let save = script(
        dir.path(),
        "iptables-save",
        "echo \"iptables-save v1.8.7 (legacy): Cannot initialize: Permission denied (you must be root)\" >&2\nexit 1",
    );
    let args = parse(&["--iptables-save", save.to_str().unwrap()]);
    let message = run_init(&args).unwrap_err().to_string();
    assert!(message.contains("NET_ADMIN and NET_RAW"), "{message}");

    let args = parse(&["--iptables-save", "/nonexistent/iptables-save"]);
    let message = run_init(&args).unwrap_err().to_string();
    assert!(
        message.contains("install the iptables package"),
        "{message}"
    );
}

/// A scratch network namespace held open by `unshare -n sleep`, entered with nsenter.
struct ScratchNetns {
    holder: std::process::Child,
}

impl ScratchNetns {
    /// `None` (after saying why) where namespaces or iptables are not available.
    fn new() -> Option<Self> {
        let works = |cmd: &str, args: &[&str]| {
            std::process::Command::new(cmd)
                .args(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !works("unshare", &["-n", "iptables-save", "-t", "nat"])
            || !works("nsenter", &["--version"])
        {
            eprintln!("skipping: needs unshare -n (CAP_SYS_ADMIN), nsenter and iptables");
            return None;
        }
        let holder = std::process::Command::new("unshare")
            .args(["-n", "sleep", "120"])
            .spawn()
            .ok()?;
        // unshare execs sleep in the same process once the namespace exists.
        std::thread::sleep(std::time::Duration::from_millis(300));
        Some(Self { holder })
    }

    fn wrapper(&self, dir: &Path, tool: &str) -> PathBuf {
        script(
            dir,
            tool,
            &format!("exec nsenter -t {} -n {tool} \"$@\"", self.holder.id()),
        )
    }
}

impl Drop for ScratchNetns {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

#[test]
fn real_iptables_in_a_scratch_network_namespace() {
    let Some(netns) = ScratchNetns::new() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let save = netns.wrapper(dir.path(), "iptables-save");
    let restore = netns.wrapper(dir.path(), "iptables-restore");
    let args = parse(&[
        "--skip-inbound-ports",
        "22,8000-8100",
        "--outbound-port",
        "4140",
        "--iptables-save",
        save.to_str().unwrap(),
        "--iptables-restore",
        restore.to_str().unwrap(),
    ]);
    run_init(&args).unwrap();
    run_init(&args).unwrap(); // an init container restart
    let output = std::process::Command::new(&save)
        .args(["-t", "nat"])
        .output()
        .unwrap();
    let nat = String::from_utf8_lossy(&output.stdout);
    let ours: Vec<&str> = nat.lines().filter(|l| l.starts_with("-A ")).collect();
    assert_eq!(
        ours,
        [
            "-A PREROUTING -p tcp -j PORTCULLIS_INBOUND",
            "-A OUTPUT -p tcp -j PORTCULLIS_OUTPUT",
            "-A PORTCULLIS_INBOUND -p tcp -m tcp --dport 4191 -j RETURN",
            "-A PORTCULLIS_INBOUND -p tcp -m tcp --dport 4143 -j RETURN",
            "-A PORTCULLIS_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
            "-A PORTCULLIS_INBOUND -p tcp -m tcp --dport 8000:8100 -j RETURN",
            "-A PORTCULLIS_INBOUND -p tcp -j REDIRECT --to-ports 4143",
            "-A PORTCULLIS_OUTPUT -m owner --uid-owner 2102 -j RETURN",
            "-A PORTCULLIS_OUTPUT -o lo -j RETURN",
            "-A PORTCULLIS_OUTPUT -p tcp -j REDIRECT --to-ports 4140",
        ],
        "{nat}"
    );
}
