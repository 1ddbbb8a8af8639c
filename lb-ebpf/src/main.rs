//! The load balancer's in-kernel programs.
//!
//! `lb_xdp` runs on external interfaces (north-south), `lb_tc` on tc ingress of pod-facing
//! interfaces (east-west), `lb_tc_reply` on tc egress of both (replies of host-network
//! backends). They share the same stages, one concern per module (Katran's split):
//! `frame` gives bounds-checked access to packet bytes, `parse` decodes the headers, `lb` finds
//! the service and backend, `conntrack` keeps flows on their backend, `nat` and `csum` rewrite
//! addresses with valid checksums, `refuse` builds RSTs and ICMP errors, `icmp` translates ICMP errors about translated flows, `forward` sends
//! translated XDP packets on by FIB lookup, `hook` holds what
//! differs between XDP and tc, `sock` serves node processes at connect time, `maps` declares the maps and `stats` counts
//! every verdict.
//!
//! Everything is gated on `target_arch = "bpf"` so that a host build of the workspace (clippy,
//! `cargo build --workspace`) compiles an empty binary instead of a second panic handler.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// For the compare-and-swap of `conntrack::claim`.
#![cfg_attr(target_arch = "bpf", allow(internal_features), feature(core_intrinsics))]

#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod csum;
#[cfg(target_arch = "bpf")]
mod forward;
#[cfg(target_arch = "bpf")]
mod fragments;
#[cfg(target_arch = "bpf")]
mod frame;
#[cfg(target_arch = "bpf")]
mod hook;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod lb;
#[cfg(target_arch = "bpf")]
mod local_sockets;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod programs;
#[cfg(target_arch = "bpf")]
mod refuse;
#[cfg(target_arch = "bpf")]
mod sock;
#[cfg(target_arch = "bpf")]
mod stats;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable path to here, so this loop is never executed.
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
