//! `lb-user`: the node daemon and its command-line tools.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use lb_user::{
    attach,
    pins::{DEFAULT_PIN_DIR, PinLayout},
    stats,
};

#[derive(Parser)]
#[command(version, about = "eBPF/XDP Kubernetes Service load balancer: node daemon and tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the programs, attach them, and pin programs, links and maps under the pin directory.
    Load {
        /// External interface for the XDP program (repeatable).
        #[arg(long = "xdp-iface", value_name = "IF")]
        xdp_ifaces: Vec<String>,
        /// Pod-facing interface for the tc ingress program (repeatable).
        #[arg(long = "tc-iface", value_name = "IF")]
        tc_ifaces: Vec<String>,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Print the attachments as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Detach and unpin everything `load` created under the pin directory.
    Unload {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Print the per-reason packet counters of a loaded instance.
    Stats {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Print every counter, as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Load { xdp_ifaces, tc_ifaces, pin_dir, json } => {
            let attachments =
                attach::load_and_attach(&PinLayout::new(&pin_dir), &xdp_ifaces, &tc_ifaces)
                    .context("load")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&attachments)?);
            } else {
                for attachment in &attachments {
                    println!("{attachment}");
                }
                println!("pinned under {}", pin_dir.display());
            }
        }
        Command::Unload { pin_dir } => {
            for line in attach::unload(&PinLayout::new(&pin_dir)).context("unload")? {
                println!("{line}");
            }
        }
        Command::Stats { pin_dir, json } => {
            let counts = stats::read_pinned(&PinLayout::new(&pin_dir)).context("stats")?;
            if json {
                let all: serde_json::Map<_, _> = lb_common::stats::Reason::ALL
                    .iter()
                    .map(|r| (r.name().to_owned(), counts.get(*r).into()))
                    .collect();
                println!("{}", serde_json::Value::Object(all));
            } else {
                for (name, count) in counts.non_zero() {
                    println!("{name:<24} {count}");
                }
            }
        }
    }
    Ok(())
}
