//! Pod networking for the local-cluster tier: one Linux bridge per test process and one
//! network namespace per pod, joined to the bridge by a veth pair.
//!
//! Addresses are `10.244.<octet>.0/24`, private to the bridge this process creates: no
//! traffic leaves the machine. Names carry the owning process id so a later run removes
//! what a killed run left behind.

use std::{
    io,
    net::Ipv4Addr,
    path::Path,
    process::{Child, ChildStdin, Command, Stdio},
    sync::atomic::{AtomicU8, Ordering},
};

/// Prefix of every network namespace this tier creates: `pc<pid>-<n>`.
const NETNS_PREFIX: &str = "pc";
/// Prefix of the bridge: `pcb<pid>`.
const BRIDGE_PREFIX: &str = "pcb";

/// Runs `ip` with `args`, turning a failure into an error that shows the command and
/// what `ip` said.
pub(crate) fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Removes the bridge `$1` and every namespace named `$2*` once its stdin closes: when
/// the bridge drops, or when the test process exits without running destructors (a
/// bridge shared through a `static`).
const JANITOR: &str = r#"
cat >/dev/null
for n in $(ip netns list | awk '{print $1}' | grep "^$2"); do ip netns del "$n"; done
ip link del "$1" 2>/dev/null
"#;

/// The bridge every pod of this process is attached to.
pub struct Bridge {
    name: String,
    octet: u8,
    next_host: AtomicU8,
    janitor: Option<(Child, ChildStdin)>,
}

impl Bridge {
    /// Creates the bridge with its gateway address, after removing bridges and
    /// namespaces whose owning process is gone.
    pub fn create() -> io::Result<Self> {
        remove_stale();
        let pid = std::process::id();
        let name = format!("{BRIDGE_PREFIX}{pid}");
        // A /24 per process; the octet only has to differ between live test processes.
        let octet = u8::try_from(pid % 200 + 20).unwrap_or(20);
        let _ = ip(&["link", "del", &name]);
        ip(&["link", "add", &name, "type", "bridge"])?;
        let mut janitor = Command::new("sh")
            .args([
                "-c",
                JANITOR,
                "portcullis-bridge-janitor",
                &name,
                &format!("{NETNS_PREFIX}{pid}-"),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let lifeline = janitor
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("janitor has no stdin"))?;
        let bridge = Self {
            name,
            octet,
            next_host: AtomicU8::new(2),
            janitor: Some((janitor, lifeline)),
        };
        ip(&[
            "addr",
            "add",
            &format!("{}/24", bridge.gateway()),
            "dev",
            &bridge.name,
        ])?;
        ip(&["link", "set", &bridge.name, "up"])?;
        Ok(bridge)
    }

    /// The bridge's own address: where processes in the root namespace (the operator)
    /// are reached from pods.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.octet, 1)
    }

    /// Creates a network namespace with an address on the bridge and a default route
    /// through the gateway.
    pub fn add_pod(&self) -> io::Result<PodNetns> {
        let host = self.next_host.fetch_add(1, Ordering::Relaxed);
        if host >= 250 {
            return Err(io::Error::other(
                "the local cluster ran out of pod addresses (248)",
            ));
        }
        let pid = std::process::id();
        let name = format!("{NETNS_PREFIX}{pid}-{host}");
        let (outside, inside) = (format!("vh{pid}{host}"), format!("vp{pid}{host}"));
        let address = Ipv4Addr::new(10, 244, self.octet, host);
        ip(&["netns", "add", &name])?;
        let netns = PodNetns {
            name: name.clone(),
            address,
        };
        ip(&[
            "link", "add", &outside, "type", "veth", "peer", "name", &inside,
        ])?;
        ip(&["link", "set", &inside, "netns", &name])?;
        ip(&["link", "set", &outside, "master", &self.name])?;
        ip(&["link", "set", &outside, "up"])?;
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            &inside,
        ])?;
        ip(&["-n", &name, "link", "set", &inside, "up"])?;
        ip(&[
            "-n",
            &name,
            "route",
            "add",
            "default",
            "via",
            &self.gateway().to_string(),
        ])?;
        Ok(netns)
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Some((mut janitor, lifeline)) = self.janitor.take() {
            drop(lifeline);
            let _ = janitor.wait();
        }
    }
}

/// A pod's network namespace; removed (with its veth pair) on drop.
pub struct PodNetns {
    name: String,
    address: Ipv4Addr,
}

impl PodNetns {
    /// The namespace name for `ip netns exec`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pod's IP address.
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Removes namespaces and bridges left by test processes that no longer run.
fn remove_stale() {
    let dead = |pid: &str| !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists();
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if let Some(rest) = name.strip_prefix(NETNS_PREFIX)
                && let Some((pid, _)) = rest.split_once('-')
                && pid.bytes().all(|b| b.is_ascii_digit())
                && dead(pid)
            {
                let _ = ip(&["netns", "del", name]);
            }
        }
    }
    if let Ok(out) = Command::new("ip")
        .args(["-o", "link", "show", "type", "bridge"])
        .output()
    {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split(':').nth(1).unwrap_or_default().trim();
            if let Some(pid) = name.strip_prefix(BRIDGE_PREFIX)
                && pid.bytes().all(|b| b.is_ascii_digit())
                && dead(pid)
            {
                let _ = ip(&["link", "del", name]);
            }
        }
    }
}
