//! `cargo xtask`: build, build-and-load, tests and the demo. Run `scripts/setup` first (the
//! README's commands do): it installs the toolchains and bpf-linker this relies on.

mod bench;
mod demo;
mod load;
mod test;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, load, test and demo the load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build every crate, the eBPF programs included.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build, then load and attach the programs and pin them (see `lb-user load --help`).
    Load(load::LoadArgs),
    /// Detach and unpin what `load` created.
    Unload(load::UnloadArgs),
    /// rustfmt, clippy (userspace and eBPF) and every test; fails if any of them fails.
    Test,
    /// The daemon on the example manifests and a demo node of network namespaces: requests to
    /// a ClusterIP and a NodePort answered by pods, then the status; everything cleaned up.
    Demo,
    /// The integration tests inside QEMU on Debian 12's 6.1 kernel (part of `test`).
    Vm,
    /// Build in release and run a benchmark (see `bench --help`).
    Bench {
        #[arg(value_enum)]
        target: bench::Target,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Build { release } => build(release),
        Task::Load(args) => load::load(&args),
        Task::Unload(args) => load::unload(&args),
        Task::Test => test::run(),
        Task::Demo => demo::run_demo(),
        Task::Vm => vm::run(),
        Task::Bench { target } => bench::run(target),
    }
}

/// The workspace root (the parent of this crate's directory).
fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives inside the workspace")
}

fn build(release: bool) -> anyhow::Result<()> {
    let mut args = vec!["build", "--workspace", "--all-targets"];
    if release {
        args.push("--release");
    }
    cargo(&args)
}

/// Runs cargo in the workspace root and fails if it fails.
fn cargo(args: &[&str]) -> anyhow::Result<()> {
    run_in(Command::new("cargo").current_dir(workspace_root()), args)
}

/// Runs `command` with `args` and fails if it fails.
fn run_in(command: &mut Command, args: &[&str]) -> anyhow::Result<()> {
    let program = command.get_program().to_string_lossy().into_owned();
    let status = command.args(args).status().with_context(|| format!("starting {program}"))?;
    if !status.success() {
        bail!("{program} {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Builds the daemon and returns the path of its binary.
fn lb_user_binary() -> anyhow::Result<PathBuf> {
    cargo(&["build", "--package", "lb-user"])?;
    Ok(lb_user_binary_path())
}

/// Where the daemon's debug binary is built.
fn lb_user_binary_path() -> PathBuf {
    target_dir().join("debug").join("lb-user")
}

/// Cargo's target directory: `CARGO_TARGET_DIR`, or `target` in the workspace.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
}
