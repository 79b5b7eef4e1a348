//! `kubectl-portcullis`, invoked by kubectl as `kubectl portcullis ...`.

use clap::Parser;
use portcullis_cli::{Cli, Outcome, run};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr());
    match run(cli, &mut out, &mut err) {
        Ok(Outcome::Clean) => ExitCode::SUCCESS,
        Ok(Outcome::Findings) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
