//! `portcullis-proxy init`: the init step of an injected pod. It programs the pod's
//! network namespace so inbound TCP reaches the proxy (DESIGN.md §4).
//!
//! The rule list is pure data ([`rules`]), applied with `iptables-restore --noflush`
//! ([`apply`]); a failure names the rule and the fix. Re-running is safe: our chains are
//! replaced, the jumps into them are added once.
//!
//! Wiring in the binary (one line per subcommand):
//!
//! ```ignore
//! Command::Init(args) => portcullis_sidecar::run::init::run_init(&args)?,
//! Command::WaitReady(args) => portcullis_sidecar::run::init::run_wait_ready(&args)?,
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub mod apply;
pub mod rules;
pub mod wait_ready;

pub use apply::IptablesTools;
// The skip-port list and the proxy uid are the injector's contract too.
pub use portcullis_api::injection::{PROXY_UID, PortList, PortListError, PortRange};
pub use rules::{NatRules, RedirectPlan, RestoreScript, Rule};
pub use wait_ready::{WaitReadyArgs, run_wait_ready};

use portcullis_api::injection::{PROXY_ADMIN_PORT, PROXY_INBOUND_PORT};

/// Arguments of `portcullis-proxy init`.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct InitArgs {
    /// The proxy's inbound port: inbound TCP is redirected here.
    #[arg(long, default_value_t = PROXY_INBOUND_PORT)]
    pub inbound_port: u16,
    /// The proxy's admin port, never redirected (kubelet probes reach the proxy).
    #[arg(long, default_value_t = PROXY_ADMIN_PORT)]
    pub admin_port: u16,
    /// The uid the proxy runs as; its own connections are never redirected.
    #[arg(long, default_value_t = PROXY_UID)]
    pub proxy_uid: u32,
    /// Inbound ports that bypass the proxy: `22,8000-8100`.
    #[arg(long, default_value = "")]
    pub skip_inbound_ports: PortList,
    /// Also redirect outbound TCP to this port (off unless given).
    #[arg(long)]
    pub outbound_port: Option<u16>,
    /// Print the iptables-restore input instead of applying it.
    #[arg(long)]
    pub dry_run: bool,
    /// The iptables-save binary.
    #[arg(long, default_value = "iptables-save", hide = true)]
    pub iptables_save: PathBuf,
    /// The iptables-restore binary.
    #[arg(long, default_value = "iptables-restore", hide = true)]
    pub iptables_restore: PathBuf,
}

impl InitArgs {
    /// The plan these arguments describe.
    pub fn plan(&self) -> RedirectPlan {
        RedirectPlan {
            inbound_port: self.inbound_port,
            admin_port: self.admin_port,
            proxy_uid: self.proxy_uid,
            skip_inbound_ports: self.skip_inbound_ports.clone(),
            outbound_port: self.outbound_port,
        }
    }

    fn tools(&self) -> IptablesTools {
        IptablesTools {
            save: self.iptables_save.clone(),
            restore: self.iptables_restore.clone(),
        }
    }
}

/// What the init step did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InitOutcome {
    /// `--dry-run`: the script that would have been applied.
    DryRun(RestoreScript),
    /// The rules are in place.
    Applied(RestoreScript),
}

/// Why the init step failed. Each message ends with the fix.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// An iptables tool could not be started.
    #[error("cannot run {tool}: {source}; {hint}")]
    Spawn {
        /// The tool.
        tool: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
        /// The fix.
        hint: String,
    },
    /// iptables refused the rules.
    #[error("{}iptables failed: {stderr}; {hint}", rule.as_ref().map(|r| format!("rule `{r}` failed: ")).unwrap_or_default())]
    Iptables {
        /// The rule on the line iptables-restore reported, when it reported one.
        rule: Option<String>,
        /// What iptables printed.
        stderr: String,
        /// The fix.
        hint: String,
    },
    /// `wait-ready` gave up.
    #[error(
        "proxy at {addr} not ready after {waited:?} (last: {last}); check the portcullis-proxy container's logs"
    )]
    NotReady {
        /// The admin address polled.
        addr: SocketAddr,
        /// How long it waited.
        waited: Duration,
        /// The last answer or error.
        last: String,
    },
}

/// Runs the init step: prints the script under `--dry-run`, else applies it.
pub fn run_init(args: &InitArgs) -> Result<InitOutcome, InitError> {
    let rules = args.plan().rules();
    if args.dry_run {
        let script = rules.restore_script("");
        print!("{}", script.text());
        return Ok(InitOutcome::DryRun(script));
    }
    let tools = args.tools();
    let script = rules.restore_script(&tools.current_nat()?);
    tools.restore(&script)?;
    tracing::info!(
        inbound_port = args.inbound_port,
        skip_inbound_ports = %args.skip_inbound_ports,
        outbound_port = ?args.outbound_port,
        "iptables redirect installed"
    );
    Ok(InitOutcome::Applied(script))
}

#[cfg(test)]
mod tests;
