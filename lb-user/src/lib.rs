//! The node daemon and its CLI as a library, so that `xtask` and the integration tests drive the
//! same loader the daemon uses.
#![expect(
    clippy::missing_errors_doc,
    reason = "every fallible function returns the crate's Error, whose variants document the failures"
)]
#![expect(
    clippy::must_use_candidate,
    reason = "getters and constructors: an unused result is harmless, the attribute only noise"
)]

pub mod attach;
pub mod config;
pub mod daemon;
pub mod error;
pub mod loader;
pub mod maglev;
pub mod manifest;
pub mod maps;
pub mod model;
pub mod pins;
pub mod reconcile;
pub mod stats;
pub mod status;
pub mod trace;

/// The compiled eBPF object (programs `lb_xdp` and `lb_tc`), built by `build.rs`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Names of the programs inside [`EBPF_OBJECT`].
pub mod program_names {
    pub const XDP: &str = "lb_xdp";
    pub const TC: &str = "lb_tc";
}
