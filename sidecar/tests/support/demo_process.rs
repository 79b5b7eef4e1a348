//! Runs the real `portcullis-proxy demo` binary on free ports and reads its lines.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

pub struct DemoProcess {
    pub child: Child,
    pub inbound_port: u16,
    pub admin_port: u16,
    pub values: BTreeMap<String, String>,
    pub lines: Vec<String>,
    pub dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl DemoProcess {
    pub fn spawn() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (inbound_port, admin_port) = (free_port(), free_port());
        let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis-proxy"))
            .args(["demo", "--dir"])
            .arg(dir.path())
            .args([
                "--inbound-port",
                &inbound_port.to_string(),
                "--admin-port",
                &admin_port.to_string(),
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut lines = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(line) if line == "ready" => {
                    lines.push(line);
                    break;
                }
                Ok(line) => lines.push(line),
                Err(_) => {
                    let _ = child.kill();
                    panic!("demo did not print `ready` within 30s; got {lines:?}");
                }
            }
        }
        let values = lines
            .iter()
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Self {
            child,
            inbound_port,
            admin_port,
            values,
            lines,
            dir,
        }
    }

    pub fn path(&self, key: &str) -> PathBuf {
        PathBuf::from(&self.values[key])
    }

    /// SIGTERM, then the exit status within 15 s.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..150 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        panic!("demo did not exit within 15s of SIGTERM");
    }
}

impl Drop for DemoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
