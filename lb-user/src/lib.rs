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
pub mod cli;
pub mod clock;
pub mod config;
pub mod conntrack_gc;
pub mod control;
pub mod daemon;
pub mod error;
pub mod flows;
pub mod health;
pub mod http;
pub mod interfaces;
pub mod kube_source;
pub mod loader;
pub mod maglev;
pub mod manifest;
pub mod map_batch;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod pins;
pub mod reconcile;
pub mod resize;
pub mod scenario;
pub mod stats;
pub mod status;
pub mod trace;
pub mod upgrade;

/// The allocator of every program built on this library: the daemon and CLI, and the tests and
/// benchmarks, which so measure what the daemon does. A first sync decodes and normalises
/// millions of small objects (100k Services and their EndpointSlices); glibc's malloc spent a
/// quarter of that time on its own bookkeeping (`perf` of `cargo xtask bench control-plane`);
/// mimalloc takes seconds off a first sync of 100k services.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The compiled eBPF object, built by `build.rs`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// What the programs return, as BPF_PROG_TEST_RUN reports it (a `u32`).
pub mod return_codes {
    pub const XDP_DROP: u32 = 1;
    pub const XDP_PASS: u32 = 2;
    pub const XDP_TX: u32 = 3;
    pub const XDP_REDIRECT: u32 = 4;
    pub const TC_ACT_OK: u32 = 0;
    pub const TC_ACT_SHOT: u32 = 2;
    pub const TC_ACT_REDIRECT: u32 = 7;
    /// `TC_ACT_UNSPEC` (-1): "not mine, continue".
    pub const TC_ACT_UNSPEC: u32 = u32::MAX;
}

/// Names of the programs inside [`EBPF_OBJECT`].
pub mod program_names {
    /// External interfaces (north-south).
    pub const XDP: &str = "lb_xdp";
    /// tc ingress of pod-facing interfaces (east-west).
    pub const TC: &str = "lb_tc";
    /// tc ingress of an external interface whose XDP hook another program holds.
    pub const TC_EXTERNAL: &str = "lb_tc_external";
    /// tc egress of pod-facing and external interfaces: replies of host-network backends.
    pub const TC_REPLY: &str = "lb_tc_reply";
    /// The host path: cgroup hooks for node processes.
    pub const CONNECT4: &str = "lb_connect4";
    pub const SENDMSG4: &str = "lb_sendmsg4";
    pub const RECVMSG4: &str = "lb_recvmsg4";
    pub const GETPEERNAME4: &str = "lb_getpeername4";
    /// The host-path programs, attached together to one cgroup.
    pub const HOST: [&str; 4] = [CONNECT4, SENDMSG4, RECVMSG4, GETPEERNAME4];
    /// Never attached: the conntrack collector runs it on each entry it found expired (see
    /// `crate::conntrack_gc::Reaper`).
    pub const REAP: &str = "lb_reap";
    /// Every program.
    pub const ALL: [&str; 9] =
        [XDP, TC, TC_EXTERNAL, TC_REPLY, CONNECT4, SENDMSG4, RECVMSG4, GETPEERNAME4, REAP];
}
