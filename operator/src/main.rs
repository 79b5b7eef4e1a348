//! `portcullis-operator`: the operator binary.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "portcullis-operator", version, about = "The Portcullis Kubernetes operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the CustomResourceDefinitions as YAML, one file per kind.
    Crdgen {
        /// Folder to write into (default: this checkout's crds/).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crdgen { out } => {
            let dir = out.unwrap_or_else(portcullis_operator::crdgen::default_dir);
            for path in portcullis_operator::crdgen::write_all(&dir)? {
                println!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}
