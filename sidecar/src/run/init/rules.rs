//! The iptables `nat` rules of the init step, as data.
//!
//! Inbound: every TCP connection arriving at the pod (`PREROUTING`) jumps to
//! `PORTCULLIS_INBOUND`, which returns early for the proxy's admin port (kubelet probes
//! must reach the proxy itself), the inbound port (already there) and the skipped ports,
//! and redirects everything else to the proxy's inbound port. Connections the pod makes
//! to itself never traverse `PREROUTING`, so the proxy reaching the app on localhost
//! cannot loop.
//!
//! Outbound (only with `--outbound-port`): locally generated TCP jumps to
//! `PORTCULLIS_OUTPUT`, which exempts the proxy's own uid (its upstream connections
//! would otherwise come back to it) and loopback, and redirects the rest.
//!
//! The rules are applied with `iptables-restore --noflush`: the chain declarations
//! replace our chains' contents and leave every other rule of the node-local pod
//! network namespace alone; the jumps from the built-in chains are written only when
//! `iptables-save` does not already show them, so a re-run (an init container restart)
//! changes nothing.

use std::fmt::Write as _;

use super::PortList;

/// The inbound chain.
pub const INBOUND_CHAIN: &str = "PORTCULLIS_INBOUND";
/// The outbound chain.
pub const OUTBOUND_CHAIN: &str = "PORTCULLIS_OUTPUT";

/// What the rules redirect and exempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedirectPlan {
    /// The proxy's inbound port (4143).
    pub inbound_port: u16,
    /// The proxy's admin port (4191), never redirected.
    pub admin_port: u16,
    /// The uid the proxy runs as (2102), exempt from outbound redirection.
    pub proxy_uid: u32,
    /// Inbound ports that bypass the proxy.
    pub skip_inbound_ports: PortList,
    /// Redirect outbound TCP to this port; `None` leaves outbound traffic alone.
    pub outbound_port: Option<u16>,
}

/// One `-A` rule: the chain and the arguments after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The chain appended to.
    pub chain: &'static str,
    /// Match and target arguments.
    pub args: Vec<String>,
}

impl Rule {
    fn new(chain: &'static str, args: &[&str]) -> Self {
        Self {
            chain,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    /// The line as `iptables-save` prints it and `iptables-restore` reads it.
    pub fn line(&self) -> String {
        format!("-A {} {}", self.chain, self.args.join(" "))
    }
}

/// The complete `nat` table change: our chains with their rules, and the jumps into
/// them from the built-in chains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatRules {
    /// Chains we own (declared, flushed and refilled on every run).
    pub chains: Vec<&'static str>,
    /// Rules inside our chains.
    pub chain_rules: Vec<Rule>,
    /// Jumps from `PREROUTING` / `OUTPUT` into our chains.
    pub jumps: Vec<Rule>,
}

impl RedirectPlan {
    /// The rules, in order.
    pub fn rules(&self) -> NatRules {
        let mut chains = vec![INBOUND_CHAIN];
        let mut chain_rules = Vec::new();
        let mut jumps = vec![Rule::new("PREROUTING", &["-p", "tcp", "-j", INBOUND_CHAIN])];

        let mut exempt: Vec<String> =
            vec![self.admin_port.to_string(), self.inbound_port.to_string()];
        for range in self.skip_inbound_ports.ranges() {
            let dport = range.iptables_dport();
            if !exempt.contains(&dport) {
                exempt.push(dport);
            }
        }
        for dport in &exempt {
            chain_rules.push(Rule::new(
                INBOUND_CHAIN,
                &["-p", "tcp", "-m", "tcp", "--dport", dport, "-j", "RETURN"],
            ));
        }
        let to_inbound = self.inbound_port.to_string();
        chain_rules.push(Rule::new(
            INBOUND_CHAIN,
            &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &to_inbound],
        ));

        if let Some(outbound_port) = self.outbound_port {
            chains.push(OUTBOUND_CHAIN);
            let uid = self.proxy_uid.to_string();
            let to_outbound = outbound_port.to_string();
            chain_rules.extend([
                Rule::new(
                    OUTBOUND_CHAIN,
                    &["-m", "owner", "--uid-owner", &uid, "-j", "RETURN"],
                ),
                Rule::new(OUTBOUND_CHAIN, &["-o", "lo", "-j", "RETURN"]),
                Rule::new(
                    OUTBOUND_CHAIN,
                    &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &to_outbound],
                ),
            ]);
            jumps.push(Rule::new("OUTPUT", &["-p", "tcp", "-j", OUTBOUND_CHAIN]));
        }
        NatRules {
            chains,
            chain_rules,
            jumps,
        }
    }
}

/// One line of the `iptables-restore` input and the rule it came from, so a failure
/// reported as "line N" can be named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreScript {
    /// The lines, without trailing newlines.
    pub lines: Vec<String>,
}

impl RestoreScript {
    /// The text fed to `iptables-restore --noflush`.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for line in &self.lines {
            let _ = writeln!(out, "{line}");
        }
        out
    }

    /// The line with 1-based number `n`, as iptables-restore reports it.
    pub fn line(&self, n: usize) -> Option<&str> {
        n.checked_sub(1)
            .and_then(|i| self.lines.get(i))
            .map(String::as_str)
    }
}

impl NatRules {
    /// The `iptables-restore --noflush` input given what `iptables-save -t nat` shows
    /// now: jumps already present are left out so a re-run adds nothing twice.
    pub fn restore_script(&self, current_nat: &str) -> RestoreScript {
        let present: Vec<&str> = current_nat.lines().map(str::trim).collect();
        let mut lines = vec!["*nat".to_owned()];
        for chain in &self.chains {
            lines.push(format!(":{chain} - [0:0]"));
        }
        for chain in &self.chains {
            lines.push(format!("-F {chain}"));
        }
        lines.extend(self.chain_rules.iter().map(Rule::line));
        lines.extend(
            self.jumps
                .iter()
                .map(Rule::line)
                .filter(|line| !present.contains(&line.as_str())),
        );
        lines.push("COMMIT".to_owned());
        RestoreScript { lines }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn plan(skip: &str, outbound: Option<u16>) -> RedirectPlan {
        RedirectPlan {
            inbound_port: 4143,
            admin_port: 4191,
            proxy_uid: 2102,
            skip_inbound_ports: skip.parse().unwrap(),
            outbound_port: outbound,
        }
    }

    #[test]
    fn inbound_rules_are_exact() {
        let script = plan("22,8000-8100,4191", None).rules().restore_script("");
        assert_eq!(
            script.text(),
            "*nat\n\
             :PORTCULLIS_INBOUND - [0:0]\n\
             -F PORTCULLIS_INBOUND\n\
             -A PORTCULLIS_INBOUND -p tcp -m tcp --dport 4191 -j RETURN\n\
             -A PORTCULLIS_INBOUND -p tcp -m tcp --dport 4143 -j RETURN\n\
             -A PORTCULLIS_INBOUND -p tcp -m tcp --dport 22 -j RETURN\n\
             -A PORTCULLIS_INBOUND -p tcp -m tcp --dport 8000:8100 -j RETURN\n\
             -A PORTCULLIS_INBOUND -p tcp -j REDIRECT --to-ports 4143\n\
             -A PREROUTING -p tcp -j PORTCULLIS_INBOUND\n\
             COMMIT\n"
        );
    }

    #[test]
    fn outbound_rules_exempt_the_proxy_uid_and_loopback() {
        let rules = plan("", Some(4140)).rules();
        assert_eq!(rules.chains, [INBOUND_CHAIN, OUTBOUND_CHAIN]);
        let lines: Vec<String> = rules
            .chain_rules
            .iter()
            .chain(&rules.jumps)
            .map(Rule::line)
            .collect();
        assert_eq!(
            lines,
            [
                "-A PORTCULLIS_INBOUND -p tcp -m tcp --dport 4191 -j RETURN",
                "-A PORTCULLIS_INBOUND -p tcp -m tcp --dport 4143 -j RETURN",
                "-A PORTCULLIS_INBOUND -p tcp -j REDIRECT --to-ports 4143",
                "-A PORTCULLIS_OUTPUT -m owner --uid-owner 2102 -j RETURN",
                "-A PORTCULLIS_OUTPUT -o lo -j RETURN",
                "-A PORTCULLIS_OUTPUT -p tcp -j REDIRECT --to-ports 4140",
                "-A PREROUTING -p tcp -j PORTCULLIS_INBOUND",
                "-A OUTPUT -p tcp -j PORTCULLIS_OUTPUT",
            ]
        );
    }

    #[test]
    fn rerun_does_not_add_the_jumps_twice() {
        let rules = plan("22", Some(4140)).rules();
        let first = rules.restore_script("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n");
        assert!(
            first
                .lines
                .iter()
                .any(|l| l == "-A PREROUTING -p tcp -j PORTCULLIS_INBOUND")
        );
        // What iptables-save prints after the first run.
        let after_first = first
            .text()
            .replace("*nat\n", "*nat\n:PREROUTING ACCEPT [0:0]\n");
        let second = rules.restore_script(&after_first);
        assert!(
            !second
                .lines
                .iter()
                .any(|l| l.starts_with("-A PREROUTING") || l.starts_with("-A OUTPUT"))
        );
        // Our chains are still declared and flushed, so their contents are replaced.
        assert!(second.lines.contains(&"-F PORTCULLIS_INBOUND".to_owned()));
        assert_eq!(second.line(1), Some("*nat"));
        assert_eq!(second.line(0), None);
    }
}
