//! The datapath's service tables as plain data: what is programmed (read back from the maps)
//! or what should be (computed from the model). The reconciler diffs two of these.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::Ipv4Net;
use lb_common::maps::{Backend, NodeConfig, ServiceKey, ServiceValue, Slot};

use crate::{
    error::Result,
    maps::{KernelMaps, MapOp},
};

/// Everything the daemon writes into the datapath's maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatapathState {
    pub node: Option<NodeConfig>,
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    /// The slots frontends point at, by index in the `BACKEND_SLOTS` array.
    pub slots: BTreeMap<u32, Slot>,
    pub backends: BTreeMap<u32, Backend>,
    /// (service id, allowed source range)
    pub source_ranges: BTreeSet<(u32, Ipv4Net)>,
}

impl DatapathState {
    /// Reads what is programmed, for a restarted daemon to reconcile against.
    pub fn read(maps: &KernelMaps) -> Result<Self> {
        let services: BTreeMap<ServiceKey, ServiceValue> = maps.services()?.into_iter().collect();
        // Only the runs frontends point at: anything else in the array is unused (zero, or
        // left by a daemon that stopped between writing a run and switching to it).
        let array = maps.slot_array()?;
        let mut slots = BTreeMap::new();
        for value in services.values() {
            for index in run_of(value) {
                let slot = usize::try_from(index).ok().and_then(|i| array.get(i));
                slots.extend(slot.map(|slot| (index, *slot)));
            }
        }
        Ok(Self {
            node: maps.node_config()?,
            services,
            slots,
            backends: maps.backends()?.into_iter().collect(),
            source_ranges: maps.source_ranges()?.into_iter().collect(),
        })
    }
}

impl DatapathState {
    /// Removes frontend `key` and what hangs off it (slots, source ranges).
    pub fn remove_frontend(&mut self, key: &ServiceKey) {
        let Some(value) = self.services.remove(key) else { return };
        let id = value.service_id;
        for index in run_of(&value) {
            self.slots.remove(&index);
        }
        let ranges: Vec<(u32, Ipv4Net)> = ranges_of(&self.source_ranges, id).copied().collect();
        for range in ranges {
            self.source_ranges.remove(&range);
        }
    }

    /// Copies frontend `key` and what hangs off its id from `from`, if `from` has it.
    pub fn copy_frontend(&mut self, from: &Self, key: &ServiceKey) {
        let Some(value) = from.services.get(key) else { return };
        self.services.insert(*key, *value);
        let id = value.service_id;
        self.slots.extend(slots_of(&from.slots, value));
        self.source_ranges.extend(ranges_of(&from.source_ranges, id));
    }

    /// What the maps hold after `op`: keeps this state equal to the maps it mirrors.
    pub fn apply(&mut self, op: &MapOp) {
        match *op {
            MapOp::SetNodeConfig(node) => self.node = Some(node),
            MapOp::UpsertBackend { id, backend } => {
                self.backends.insert(id, backend);
            }
            MapOp::RemoveBackend { id } => {
                self.backends.remove(&id);
            }
            MapOp::UpsertSlot { index, slot } => {
                self.slots.insert(index, slot);
            }
            MapOp::RemoveSlot { index } => {
                self.slots.remove(&index);
            }
            MapOp::UpsertService { key, value } => {
                self.services.insert(key, value);
            }
            MapOp::RemoveService { key } => {
                self.services.remove(&key);
            }
            MapOp::AddSourceRange { service_id, range } => {
                self.source_ranges.insert((service_id, range));
            }
            MapOp::RemoveSourceRange { service_id, range } => {
                self.source_ranges.remove(&(service_id, range));
            }
        }
    }
}

/// The indices of frontend `value`'s run of slots.
pub fn run_of(value: &ServiceValue) -> std::ops::Range<u32> {
    value.slot_base..value.slot_base.saturating_add(value.slot_count)
}

/// The slots of frontend `value`, in slot order, by index.
pub fn slots_of<'a>(
    slots: &'a BTreeMap<u32, Slot>,
    value: &ServiceValue,
) -> impl Iterator<Item = (u32, Slot)> + 'a {
    slots.range(run_of(value)).map(|(index, slot)| (*index, *slot))
}

/// The source ranges of frontend `id`.
fn ranges_of(ranges: &BTreeSet<(u32, Ipv4Net)>, id: u32) -> impl Iterator<Item = &(u32, Ipv4Net)> {
    // 0.0.0.0/0 sorts first among networks.
    ranges.range((id, Ipv4Net::default())..).take_while(move |(i, _)| *i == id)
}
