//! Stable ids for frontends and backends. An id names a frontend's slots, reverse-NAT entry,
//! counters and affinity entries, and a backend's conntrack references, so it must not change
//! while the thing it names lives, across reconciles and across daemon restarts (the allocator
//! is seeded from the programmed maps).

use std::collections::{BTreeMap, BTreeSet};

use lb_common::maps::{ServiceKey, capacity};

use super::state::DatapathState;

/// What identifies a backend: address, target port, protocol (network order, as in the map).
pub type BackendIdentity = (u32, u16, u8);

/// Hands out the lowest free id, and keeps ids of things that still exist.
#[derive(Clone, Debug, Default)]
struct IdSpace {
    used: BTreeSet<u32>,
    limit: u32,
}

impl IdSpace {
    fn new(limit: u32) -> Self {
        // Id 0 is reserved: the ClusterIP marker entries carry it, and a zeroed value is never a
        // real frontend or backend.
        Self { used: BTreeSet::from([0]), limit }
    }

    fn take(&mut self) -> Option<u32> {
        let id = (1..self.limit).find(|id| !self.used.contains(id))?;
        self.used.insert(id);
        Some(id)
    }
}

/// The ids in use, by what they name.
#[derive(Clone, Debug)]
pub struct Ids {
    services: BTreeMap<ServiceKey, u32>,
    backends: BTreeMap<BackendIdentity, u32>,
    service_space: IdSpace,
    backend_space: IdSpace,
}

impl Default for Ids {
    fn default() -> Self {
        Self {
            services: BTreeMap::new(),
            backends: BTreeMap::new(),
            service_space: IdSpace::new(capacity::SERVICES),
            backend_space: IdSpace::new(capacity::BACKENDS),
        }
    }
}

impl Ids {
    /// The ids a programmed state already uses.
    pub fn from_programmed(state: &DatapathState) -> Self {
        let mut ids = Self::default();
        for (key, value) in &state.services {
            if value.service_id != 0 {
                ids.services.insert(*key, value.service_id);
                ids.service_space.used.insert(value.service_id);
            }
        }
        for (id, backend) in &state.backends {
            ids.backends.insert((backend.ip_be, backend.port_be, backend.proto), *id);
            ids.backend_space.used.insert(*id);
        }
        ids
    }

    /// The id of frontend `key`, allocating one if it is new; `None` when the id space is full.
    pub fn service(&mut self, key: ServiceKey) -> Option<u32> {
        if let Some(id) = self.services.get(&key) {
            return Some(*id);
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

    /// Forgets every id the `desired` state no longer uses, so they can be reused.
    pub fn retain_used(&mut self, desired: &DatapathState) {
        let live_services: BTreeSet<u32> =
            desired.services.values().map(|v| v.service_id).collect();
        self.services.retain(|_, id| live_services.contains(id));
        self.service_space.used.retain(|id| *id == 0 || live_services.contains(id));
        self.backends.retain(|_, id| desired.backends.contains_key(id));
        self.backend_space.used.retain(|id| *id == 0 || desired.backends.contains_key(id));
    }
}
