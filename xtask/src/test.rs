//! The test command CI runs: formatting, lints and every test tier, the VM one included.

use anyhow::bail;

use std::process::Command;

use super::{cargo, run_in, workspace_root};

/// A named check; all run even when an earlier one fails, so one CI run reports every failure.
type Step = (&'static str, fn() -> anyhow::Result<()>);

pub fn run() -> anyhow::Result<()> {
    let steps: [Step; 5] = [
        ("rustfmt", || cargo(&["fmt", "--all", "--check"])),
        ("clippy (userspace, pedantic)", || {
            cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])
        }),
        ("clippy (eBPF, bpfel-unknown-none)", || {
            // Inside lb-ebpf its rust-toolchain.toml selects the pinned nightly, once the
            // toolchain rustup chose for xtask itself is out of the environment.
            run_in(
                Command::new("cargo")
                    .current_dir(workspace_root().join("lb-ebpf"))
                    .env_remove("RUSTUP_TOOLCHAIN"),
                &[
                    "clippy",
                    "--release",
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                    "--",
                    "-D",
                    "warnings",
                ],
            )
        }),
        ("tests", || cargo(&["test", "--workspace", "--", "--test-threads", "2"])),
        ("VM tier: integration tests on Debian 12's 6.1 kernel", super::vm::run),
    ];
    let mut failed = Vec::new();
    for (name, step) in steps {
        eprintln!("xtask test: {name}");
        if let Err(error) = step() {
            eprintln!("xtask test: {name} FAILED: {error:#}");
            failed.push(name);
        }
    }
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    eprintln!("xtask test: all steps passed");
    Ok(())
}
