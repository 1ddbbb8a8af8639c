//! Test harness shared by the integration tests: running the real programs on crafted packets
//! (BPF_PROG_TEST_RUN), building packets, checking checksums independently of the programs, and
//! throwaway network namespaces.
//!
//! Helpers panic with a message instead of returning errors: they only run inside tests.
#![expect(clippy::missing_panics_doc, reason = "test helpers panic by design, with a message")]
#![expect(
    clippy::missing_errors_doc,
    reason = "the request helpers return the socket error itself, which the tests inspect"
)]
#![expect(
    clippy::must_use_candidate,
    clippy::return_self_not_must_use,
    reason = "builders and getters used only by tests: an unused result fails no test silently"
)]

pub mod cgroup;
pub mod checksum;
pub mod daemon;
pub mod datapath;
pub mod deploy;
pub mod fixtures;
pub mod manifests;
pub mod netns;
pub mod node;
pub mod packets;
pub mod pins;
pub mod rng;
pub mod services;
pub mod stand_in;
pub mod topology;
