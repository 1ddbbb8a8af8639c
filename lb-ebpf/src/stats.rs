//! Per-CPU verdict counters, one slot per [`Reason`].

use aya_ebpf::{macros::map, maps::PerCpuArray};
use lb_common::stats::Reason;

#[map(name = "STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

/// Counts one packet under `reason`. Per-CPU slots need no atomics.
#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(slot) = STATS.get_ptr_mut(reason.index()) {
        // SAFETY: the pointer is this CPU's slot of a live array entry; BPF programs are not
        // preempted on the same CPU while running.
        unsafe { *slot += 1 };
    }
}
