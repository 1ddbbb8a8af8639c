//! Stable ids for frontends and backends, and the frontends' runs of slots. An id names a
//! frontend's counters, affinity entries and source ranges, and a backend's conntrack
//! references, so it must not change while the thing it names lives, across reconciles and
//! across daemon restarts (the allocator is seeded from the programmed maps).

use std::collections::{BTreeMap, BTreeSet};

use lb_common::maps::ServiceKey;

use super::{
    slot_runs::{Run, SlotRuns},
    state::DatapathState,
};
use crate::loader::Capacities;

/// What identifies a backend: address, target port, protocol (network order, as in the map).
pub type BackendIdentity = (u32, u16, u8);

/// Hands out ids: released ones first (lowest first), then never-used ones in order, in
/// constant time either way.
#[derive(Clone, Debug, Default)]
struct IdSpace {
    used: BTreeSet<u32>,
    released: BTreeSet<u32>,
    /// Every id from here up to `limit` has never been handed out.
    next: u32,
    limit: u32,
}

impl IdSpace {
    fn new(limit: u32) -> Self {
        // Id 0 is reserved: the ClusterIP marker entries carry it, and a zeroed value is never a
        // real frontend or backend.
        Self { used: BTreeSet::new(), released: BTreeSet::new(), next: 1, limit }
    }

    /// Marks an id found in the programmed maps as used.
    fn adopt(&mut self, id: u32) {
        self.used.insert(id);
        // Ids below `next` that nobody uses are free; adoption happens before any allocation,
        // so collecting them once `next` moves past them is enough.
        for free in self.next..id {
            self.released.insert(free);
        }
        self.next = self.next.max(id + 1);
        self.released.remove(&id);
    }

    fn take(&mut self) -> Option<u32> {
        let id = match self.released.pop_first() {
            Some(id) => id,
            None if self.next < self.limit => {
                self.next += 1;
                self.next - 1
            }
            None => return None,
        };
        self.used.insert(id);
        Some(id)
    }

    fn release(&mut self, id: u32) {
        if self.used.remove(&id) {
            self.released.insert(id);
        }
    }

    /// Keeps the ids `live` says are in use and releases the rest.
    fn retain(&mut self, live: impl Fn(u32) -> bool) {
        let released: Vec<u32> = self.used.iter().copied().filter(|id| !live(*id)).collect();
        for id in released {
            self.release(id);
        }
    }
}

/// Room in the `SOURCE_RANGES` map: its entries by frontend id. A write beyond its size would
/// fail the whole sync, again at every retry, and hold up every other service's changes.
#[derive(Clone, Debug, Default)]
struct RangeRoom {
    capacity: u32,
    by_frontend: BTreeMap<u32, u32>,
    total: u32,
}

impl RangeRoom {
    fn of(&self, id: u32) -> u32 {
        self.by_frontend.get(&id).copied().unwrap_or(0)
    }

    fn set(&mut self, id: u32, count: u32) {
        let before = self.by_frontend.insert(id, count).unwrap_or(0);
        self.total = self.total - before + count;
    }

    /// Counts the entries `state` holds, forgetting any earlier claim.
    fn count(&mut self, state: &DatapathState) {
        self.by_frontend.clear();
        self.total = 0;
        for (id, _) in &state.source_ranges {
            let count = self.by_frontend.get(id).copied().unwrap_or(0) + 1;
            self.set(*id, count);
        }
    }
}

/// The ids in use, by what they name, and where the frontends' slots are.
#[derive(Clone, Debug)]
pub struct Ids {
    services: BTreeMap<ServiceKey, u32>,
    backends: BTreeMap<BackendIdentity, u32>,
    service_space: IdSpace,
    backend_space: IdSpace,
    slot_runs: SlotRuns,
    source_ranges: RangeRoom,
    /// The ClusterIP markers in the `SERVICES` map: entries without an id, which take room
    /// beside the frontends (a write beyond the map's size would fail every sync).
    markers: BTreeSet<ServiceKey>,
    /// Entries the `SERVICES` map holds.
    services_capacity: u32,
}

impl Default for Ids {
    fn default() -> Self {
        Self::for_capacities(&Capacities::default())
    }
}

impl Ids {
    /// Ids below the frontend and backend map sizes (a frontend id indexes the per-frontend
    /// counters array, so it must stay below its size), slots within the slot array.
    pub fn for_capacities(capacities: &Capacities) -> Self {
        Self {
            services: BTreeMap::new(),
            backends: BTreeMap::new(),
            service_space: IdSpace::new(capacities.services()),
            backend_space: IdSpace::new(capacities.backends()),
            slot_runs: SlotRuns::new(capacities.backend_slots()),
            source_ranges: RangeRoom {
                capacity: capacities.source_ranges(),
                ..RangeRoom::default()
            },
            markers: BTreeSet::new(),
            services_capacity: capacities.services(),
        }
    }

    /// The ids and slot runs a programmed state already uses.
    pub fn from_programmed(state: &DatapathState, capacities: &Capacities) -> Self {
        let mut ids = Self::for_capacities(capacities);
        let runs = state
            .services
            .iter()
            .map(|(key, value)| (*key, Run { base: value.slot_base, len: value.slot_count }));
        ids.slot_runs = SlotRuns::adopt(capacities.backend_slots(), runs);
        let mut service_ids: Vec<u32> = Vec::new();
        for (key, value) in &state.services {
            if value.service_id != 0 {
                ids.services.insert(*key, value.service_id);
                service_ids.push(value.service_id);
            }
        }
        ids.count_markers(state);
        service_ids.sort_unstable();
        for id in service_ids {
            ids.service_space.adopt(id);
        }
        // BTreeMap order: ascending ids, as `adopt` wants.
        for (id, backend) in &state.backends {
            ids.backends.insert((backend.ip_be, backend.port_be, backend.proto), *id);
            ids.backend_space.adopt(*id);
        }
        ids.source_ranges.count(state);
        ids
    }

    /// The id of frontend `key`, allocating one if it is new; `None` when the id space, or the
    /// `SERVICES` map, is full.
    pub fn service(&mut self, key: ServiceKey) -> Option<u32> {
        if let Some(id) = self.services.get(&key) {
            return Some(*id);
        }
        if !self.services_map_has_room() {
            return None;
        }
        let id = self.service_space.take()?;
        self.services.insert(key, id);
        Some(id)
    }

    /// The id of backend `identity`, allocating one if it is new.
    pub fn backend(&mut self, identity: BackendIdentity) -> Option<u32> {
        if let Some(id) = self.backends.get(&identity) {
            return Some(*id);
        }
        let id = self.backend_space.take()?;
        self.backends.insert(identity, id);
        Some(id)
    }

    /// Frees the id, slot run and source range entries of frontend `key`, which nothing uses
    /// any longer.
    pub fn release_service(&mut self, key: &ServiceKey) {
        if let Some(id) = self.services.remove(key) {
            self.service_space.release(id);
            self.source_ranges.set(id, 0);
        }
        self.slot_runs.release(*key);
    }

    /// Whether the frontends of `claims` fit with these many source ranges each, in place of
    /// those they have; `Err` with the map's size when they do not. Asked before a frontend
    /// takes an id, so that one left out holds no room.
    pub fn source_ranges_fit(&self, claims: &[(ServiceKey, u32)]) -> Result<(), u32> {
        let room = &self.source_ranges;
        let held: u32 = claims
            .iter()
            .filter_map(|(key, _)| self.services.get(key))
            .map(|id| room.of(*id))
            .sum();
        let wanted = claims.iter().fold(0u32, |sum, (_, count)| sum.saturating_add(*count));
        if (room.total - held).saturating_add(wanted) <= room.capacity {
            Ok(())
        } else {
            Err(room.capacity)
        }
    }

    /// Records frontend `id`'s `count` source ranges, which [`Ids::source_ranges_fit`] let in.
    pub fn set_source_ranges(&mut self, id: u32, count: u32) {
        self.source_ranges.set(id, count);
    }

    /// The run frontend `key`'s slots are in now, if it has slots.
    pub fn slot_run(&self, key: &ServiceKey) -> Option<Run> {
        self.slot_runs.current(*key)
    }

    /// The first slot of frontend `key`'s table of `len` slots (see [`SlotRuns::place`]).
    pub fn place_slots(&mut self, key: ServiceKey, len: u32, keep: bool) -> Option<u32> {
        self.slot_runs.place(key, len, keep)
    }

    /// The reconcile has been written: the slot runs it gave up may be handed out again.
    pub fn commit(&mut self) {
        self.slot_runs.commit();
    }

    /// Takes room for ClusterIP marker `key`; `false` when the `SERVICES` map is full.
    pub fn claim_marker(&mut self, key: ServiceKey) -> bool {
        if self.markers.contains(&key) {
            return true;
        }
        self.services_map_has_room() && self.markers.insert(key)
    }

    /// Frees the room of marker `key`, which no service uses any longer.
    pub fn release_marker(&mut self, key: &ServiceKey) {
        self.markers.remove(key);
    }

    /// Whether the `SERVICES` map has room for one more entry, frontend or marker.
    fn services_map_has_room(&self) -> bool {
        let entries = self.service_space.used.len() + self.markers.len();
        entries < usize::try_from(self.services_capacity).unwrap_or(usize::MAX)
    }

    fn count_markers(&mut self, state: &DatapathState) {
        let markers = state.services.iter().filter(|(_, value)| value.service_id == 0);
        self.markers = markers.map(|(key, _)| *key).collect();
    }

    /// Frees the id of backend `identity`, which no frontend uses any longer.
    pub fn release_backend(&mut self, identity: &BackendIdentity) {
        if let Some(id) = self.backends.remove(identity) {
            self.backend_space.release(id);
        }
    }

    /// Forgets every id the `desired` state no longer uses, so they can be reused.
    pub fn retain_used(&mut self, desired: &DatapathState) {
        let live_services: BTreeSet<u32> =
            desired.services.values().map(|v| v.service_id).collect();
        self.services.retain(|_, id| live_services.contains(id));
        self.service_space.retain(|id| live_services.contains(&id));
        self.slot_runs.retain(|key| desired.services.contains_key(key));
        self.backends.retain(|_, id| desired.backends.contains_key(id));
        self.backend_space.retain(|id| desired.backends.contains_key(&id));
        self.source_ranges.count(desired);
        self.count_markers(desired);
    }
}

#[cfg(test)]
mod tests {
    use super::IdSpace;

    #[test]
    fn ids_are_reused_lowest_first_and_adopted_ids_are_never_handed_out_twice() {
        let mut space = IdSpace::new(10);
        space.adopt(2);
        space.adopt(5);
        let taken: Vec<u32> = (0..4).map(|_| space.take().expect("room")).collect();
        assert_eq!(taken, vec![1, 3, 4, 6], "gaps first, then fresh ids");
        space.retain(|id| id != 3);
        assert_eq!(space.take(), Some(3), "a released id comes back");
        for _ in 7..10 {
            space.take().expect("room up to the limit");
        }
        assert_eq!(space.take(), None, "the limit is respected");
    }
}
