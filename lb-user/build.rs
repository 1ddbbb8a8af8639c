//! Builds the eBPF programs with the nightly pinned in `lb-ebpf/rust-toolchain.toml`, so that a
//! plain `cargo build` produces a daemon with its programs embedded.

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let toolchain_file = "../lb-ebpf/rust-toolchain.toml";
    println!("cargo::rerun-if-changed={toolchain_file}");
    let text = std::fs::read_to_string(toolchain_file)
        .with_context(|| format!("reading {toolchain_file}"))?;
    let channel = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("channel"))
        .and_then(|rest| rest.split('"').nth(1))
        .ok_or_else(|| anyhow!("no channel = \"...\" in {toolchain_file}"))?;
    // aya-build watches the eBPF crate's own directory; the map types and conntrack rules it
    // shares with userspace live in lb-common, whose changes must rebuild the programs too.
    println!("cargo::rerun-if-changed=../lb-common");
    let package = Package { name: "lb-ebpf", root_dir: "../lb-ebpf", ..Default::default() };
    aya_build::build_ebpf([package], Toolchain::Custom(channel))
}
