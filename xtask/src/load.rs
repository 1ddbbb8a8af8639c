//! Build-and-load: the daemon binary does the loading, so there is one loader.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use clap::Args;

const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb-xdp";

#[derive(Args)]
pub struct LoadArgs {
    /// External interface for XDP (repeatable).
    #[arg(long = "xdp-iface", value_name = "IF")]
    xdp_ifaces: Vec<String>,
    /// Pod-facing interface for tc ingress (repeatable).
    #[arg(long = "tc-iface", value_name = "IF")]
    tc_ifaces: Vec<String>,
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
}

#[derive(Args)]
pub struct UnloadArgs {
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
}

pub fn load(args: &LoadArgs) -> anyhow::Result<()> {
    let mut lb_args =
        vec!["load".to_owned(), "--pin-dir".into(), args.pin_dir.display().to_string()];
    for iface in &args.xdp_ifaces {
        lb_args.extend(["--xdp-iface".into(), iface.clone()]);
    }
    for iface in &args.tc_ifaces {
        lb_args.extend(["--tc-iface".into(), iface.clone()]);
    }
    lb_user(&lb_args)
}

pub fn unload(args: &UnloadArgs) -> anyhow::Result<()> {
    lb_user(&["unload".into(), "--pin-dir".into(), args.pin_dir.display().to_string()])
}

fn lb_user(args: &[String]) -> anyhow::Result<()> {
    let binary = super::lb_user_binary()?;
    let status = Command::new(&binary)
        .args(args)
        .status()
        .with_context(|| format!("starting {}", binary.display()))?;
    if !status.success() {
        bail!("lb-user {} failed ({status})", args.join(" "));
    }
    Ok(())
}
