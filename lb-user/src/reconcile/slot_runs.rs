//! Where each frontend's slots live in the `BACKEND_SLOTS` array: a contiguous run per frontend,
//! handed out best-fit from the free extents (the smallest one long enough, lowest first), in
//! logarithmic time however fragmented the array gets.
//!
//! A run a frontend points at is never rewritten: a changed table gets a fresh run, written
//! before the frontend entry switches to it, and the old run is only retired. Retired runs
//! become free at [`SlotRuns::commit`], once the reconcile that switched their frontends away
//! has been written. A program that read a frontend entry just before its switch is done with
//! the old run within microseconds, long before a later reconcile can hand the run out again.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::maps::ServiceKey;

/// `len` slots from index `base`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub base: u32,
    pub len: u32,
}

impl Run {
    fn end(self) -> u32 {
        self.base.saturating_add(self.len)
    }
}

/// The free extents, by first index (to merge neighbours) and by length (to fit).
#[derive(Clone, Debug, Default)]
struct Extents {
    /// First index to length; two are never adjacent (they merge when freed).
    by_base: BTreeMap<u32, u32>,
    /// (length, first index).
    by_len: BTreeSet<(u32, u32)>,
}

impl Extents {
    fn insert(&mut self, base: u32, len: u32) {
        if len > 0 {
            self.by_base.insert(base, len);
            self.by_len.insert((len, base));
        }
    }

    fn remove(&mut self, base: u32) -> Option<u32> {
        let len = self.by_base.remove(&base)?;
        self.by_len.remove(&(len, base));
        Some(len)
    }

    /// Takes `len` slots from the start of the smallest extent that has them.
    fn take(&mut self, len: u32) -> Option<u32> {
        let &(free_len, base) = self.by_len.range((len, 0)..).next()?;
        self.remove(base);
        self.insert(base + len, free_len - len);
        Some(base)
    }

    /// Frees `run`, merged with the extents on either side of it.
    fn free(&mut self, run: Run) {
        let mut merged = run;
        if let Some((&before, &len)) = self.by_base.range(..run.base).next_back()
            && before + len == run.base
        {
            self.remove(before);
            merged = Run { base: before, len: len + merged.len };
        }
        if let Some(len) = self.remove(run.end()) {
            merged.len += len;
        }
        self.insert(merged.base, merged.len);
    }
}

#[derive(Clone, Debug)]
pub struct SlotRuns {
    free: Extents,
    /// The run of each frontend that has slots.
    runs: BTreeMap<ServiceKey, Run>,
    /// Runs given up since the last commit: not free yet.
    retired: Vec<Run>,
}

impl SlotRuns {
    /// An array of `capacity` slots, all free.
    pub fn new(capacity: u32) -> Self {
        Self::adopt(capacity, std::iter::empty())
    }

    /// An array of `capacity` slots in which the frontends of `programmed` own their runs.
    /// Runs past the array's end or overlapping an earlier one (which a daemon of this version
    /// never writes) are still adopted; only what no run covers is free.
    pub fn adopt(capacity: u32, programmed: impl IntoIterator<Item = (ServiceKey, Run)>) -> Self {
        let runs: BTreeMap<ServiceKey, Run> =
            programmed.into_iter().filter(|(_, run)| run.len > 0).collect();
        let mut taken: Vec<Run> = runs.values().copied().collect();
        taken.sort_unstable_by_key(|run| run.base);
        let mut free = Extents::default();
        let mut next = 0;
        for run in taken {
            if run.base > next {
                free.insert(next, run.base.min(capacity) - next);
            }
            next = next.max(run.end()).min(capacity);
        }
        free.insert(next, capacity - next);
        Self { free, runs, retired: Vec::new() }
    }

    /// The run frontend `key` has now.
    pub fn current(&self, key: ServiceKey) -> Option<Run> {
        self.runs.get(&key).copied()
    }

    /// The first index of frontend `key`'s run for a table of `len` slots: its current run if
    /// `keep` (the caller found the table unchanged there), else a fresh one, the current one
    /// being retired. `None` when no free extent is long enough; the current run then stays.
    pub fn place(&mut self, key: ServiceKey, len: u32, keep: bool) -> Option<u32> {
        let current = self.current(key);
        if let Some(run) = current
            && keep
            && run.len == len
        {
            return Some(run.base);
        }
        if len == 0 {
            self.release(key);
            return Some(0);
        }
        let base = self.free.take(len)?;
        if let Some(old) = current {
            self.retired.push(old);
        }
        self.runs.insert(key, Run { base, len });
        Some(base)
    }

    /// Frontend `key` has no slots any longer.
    pub fn release(&mut self, key: ServiceKey) {
        if let Some(run) = self.runs.remove(&key) {
            self.retired.push(run);
        }
    }

    /// Releases the runs of the frontends `live` says are gone.
    pub fn retain(&mut self, live: impl Fn(&ServiceKey) -> bool) {
        let gone: Vec<ServiceKey> = self.runs.keys().filter(|key| !live(key)).copied().collect();
        for key in gone {
            self.release(key);
        }
    }

    /// The reconcile that retired runs has been written: they are free from now on.
    pub fn commit(&mut self) {
        for run in std::mem::take(&mut self.retired) {
            self.free.free(run);
        }
    }
}

#[cfg(test)]
mod tests {
    use lb_common::maps::ServiceKey;

    use super::{Run, SlotRuns};

    fn key(n: u16) -> ServiceKey {
        ServiceKey { vip_be: 1, port_be: n, proto: 6, scope: 0 }
    }

    #[test]
    fn a_changed_table_moves_to_a_fresh_run_and_the_old_one_is_free_only_after_commit() {
        let mut runs = SlotRuns::new(10);
        assert_eq!(runs.place(key(1), 4, false), Some(0));
        assert_eq!(runs.place(key(2), 4, false), Some(4));
        assert_eq!(runs.place(key(1), 4, true), Some(0), "an unchanged table stays");
        assert_eq!(runs.place(key(1), 2, false), Some(8), "a changed one moves");
        assert_eq!(runs.place(key(3), 3, false), None, "the old run is not free before commit");
        runs.commit();
        assert_eq!(runs.place(key(3), 3, false), Some(0), "after commit it is");
        assert_eq!(runs.current(key(1)), Some(Run { base: 8, len: 2 }));
    }

    #[test]
    fn freed_neighbours_merge_and_adopted_runs_are_never_handed_out() {
        let adopted = [(key(1), Run { base: 2, len: 3 }), (key(2), Run { base: 7, len: 1 })];
        let mut runs = SlotRuns::adopt(10, adopted);
        assert_eq!(runs.place(key(3), 3, false), None, "free: 0..2, 5..7, 8..10");
        assert_eq!(runs.place(key(3), 2, false), Some(0));
        runs.release(key(1));
        runs.release(key(2));
        runs.commit();
        assert_eq!(runs.place(key(4), 8, false), Some(2), "2..10 merged into one extent");
        assert_eq!(runs.place(key(5), 0, false), Some(0), "an empty table needs no run");
        assert_eq!(runs.current(key(5)), None);
    }

    #[test]
    fn the_smallest_extent_long_enough_is_used() {
        // Free: 0..5 and 6..8.
        let mut runs = SlotRuns::adopt(8, [(key(1), Run { base: 5, len: 1 })]);
        assert_eq!(runs.place(key(2), 2, false), Some(6), "the 2-slot hole, not the 5");
        assert_eq!(runs.place(key(3), 5, false), Some(0), "so that 5 still fit");
    }
}
