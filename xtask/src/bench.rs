//! `cargo xtask bench <target>`: benchmarks, built in release and run from the workspace root,
//! their output passed through.

use clap::ValueEnum;

use super::cargo;

/// What to benchmark.
#[derive(Clone, Copy, ValueEnum)]
pub enum Target {
    /// ns/packet of the XDP program's paths under BPF_PROG_TEST_RUN (root needed); writes
    /// target/bench/dataplane.json.
    Dataplane,
    /// The control plane from a manifest directory and from a scripted API server at
    /// 1k/10k/100k services: time to fully programmed, peak RSS, change latency; writes
    /// target/bench/control-plane.json.
    ControlPlane,
}

pub fn run(target: Target) -> anyhow::Result<()> {
    match target {
        Target::Dataplane => {
            cargo(&["run", "--release", "--package", "lb-tests", "--bin", "bench-dataplane"])
        }
        Target::ControlPlane => {
            cargo(&["run", "--release", "--package", "lb-tests", "--bin", "bench-control-plane"])
        }
    }
}
