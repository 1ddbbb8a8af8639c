//! Who owns what in the programmed tables, service by service, so that a change to one service
//! is rebuilt and diffed alone: its frontends (and what hangs off their ids), the ClusterIP
//! markers and backends it shares with other services (kept while any service uses them), the
//! frontends it lost to an earlier service port, and its problems.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    hash::Hash,
    net::Ipv4Addr,
};

use lb_common::maps::ServiceKey;

use super::{
    claims::Claims,
    desired::{PortTables, SlotMode, protocol_number},
    drains::Serving,
    ids::Ids,
    state::DatapathState,
};
use crate::model::{ServiceName, ServicePort};

#[derive(Debug, Default)]
pub(super) struct Ledger {
    /// Made for maps an earlier daemon (or a failed sync) left, before any reconcile: who
    /// owned which programmed frontend is not known.
    pub(super) adopted: bool,
    services: HashMap<ServiceName, Owned>,
    pub(super) claims: Claims,
    /// Services using each backend id.
    backend_users: HashMap<u32, u32>,
    /// Services using each ClusterIP marker.
    marker_users: HashMap<ServiceKey, u32>,
    /// Only services with problems.
    problems: BTreeMap<ServiceName, Vec<String>>,
}

/// What one service contributes to the tables.
#[derive(Debug, Default)]
pub(super) struct Owned {
    pub(super) frontends: Vec<ServiceKey>,
    /// Frontends an earlier service port serves, which this service would take over.
    pub(super) waiting: Vec<ServiceKey>,
    pub(super) markers: Vec<ServiceKey>,
    pub(super) backends: Vec<u32>,
}

impl Owned {
    fn is_empty(&self) -> bool {
        self.frontends.is_empty()
            && self.waiting.is_empty()
            && self.markers.is_empty()
            && self.backends.is_empty()
    }
}

/// The services rebuilt by one reconcile: their new entries, and every key their old or new
/// entries touch, which is all the diff has to look at.
#[derive(Debug, Default)]
pub(super) struct Batch {
    /// The new entries of the rebuilt services (plus the node configuration on a full rebuild).
    pub(super) after: DatapathState,
    /// Frontends owned by a rebuilt service, before or after.
    frontends: BTreeSet<ServiceKey>,
    /// Frontends given an id in this batch, owned or not in the end.
    pub(super) allocated: BTreeSet<ServiceKey>,
    markers: BTreeSet<ServiceKey>,
    pub(super) backends: BTreeSet<u32>,
    /// Services to rebuild because a rebuilt one took or freed a frontend they claim.
    pub(super) wake: Vec<ServiceName>,
    /// The serving endpoints of the non-TCP frontends built, by id.
    pub(super) serving: Serving,
}

impl Batch {
    pub(super) fn new(after: DatapathState) -> Self {
        Self { after, ..Self::default() }
    }

    /// The programmed entries this batch may change: the other side of the diff.
    pub(super) fn before(&self, programmed: &DatapathState) -> DatapathState {
        let mut before = DatapathState::default();
        for key in &self.frontends {
            before.copy_frontend(programmed, key);
        }
        for key in &self.markers {
            if let Some(value) = programmed.services.get(key) {
                before.services.insert(*key, *value);
            }
        }
        for id in &self.backends {
            if let Some(backend) = programmed.backends.get(id) {
                before.backends.insert(*id, *backend);
            }
        }
        before
    }
}

/// How service ports become table entries on this node.
pub(super) struct Layout<'a> {
    pub(super) mode: SlotMode,
    pub(super) node_port_addresses: &'a [Ipv4Addr],
    /// What the maps hold: a frontend whose slot table is unchanged keeps its run.
    pub(super) programmed: &'a DatapathState,
    /// On a full rebuild, the ledger before it: who owned which frontend.
    pub(super) earlier: Option<&'a Ledger>,
}

impl Ledger {
    /// The ledger of maps adopted as they are (its `adopted` field says why that matters).
    pub(super) fn adopted() -> Self {
        Self { adopted: true, ..Self::default() }
    }

    /// Replaces what `service` contributes with the entries `ports` (sorted by id; empty for a
    /// service that is gone) ask for, written into `batch.after`.
    pub(super) fn rebuild_service(
        &mut self,
        service: &ServiceName,
        ports: &[ServicePort],
        layout: &Layout,
        ids: &mut Ids,
        batch: &mut Batch,
    ) {
        let old = self.services.remove(service).unwrap_or_default();
        let previously_owned = match layout.earlier {
            // Any programmed frontend may have been this service's: one whose new table finds
            // no room keeps its slots, as it would had this daemon programmed it.
            Some(earlier) if earlier.adopted => None,
            Some(earlier) => {
                Some(earlier.services.get(service).map(|o| o.frontends.clone()).unwrap_or_default())
            }
            None => Some(old.frontends.clone()),
        };
        for key in &old.frontends {
            batch.frontends.insert(*key);
            if self.claims.release(*key, service) {
                batch.after.remove_frontend(key);
            }
        }
        for key in &old.waiting {
            self.claims.stop_waiting(*key, service);
        }
        for key in &old.markers {
            stop_using(&mut self.marker_users, key);
            batch.markers.insert(*key);
        }
        for id in &old.backends {
            stop_using(&mut self.backend_users, id);
            batch.backends.insert(*id);
        }
        self.problems.remove(service);

        let mut owned = Owned::default();
        let mut problems = Vec::new();
        for port in ports {
            let Some(protocol) = protocol_number(port.id.protocol) else {
                problems.push(format!("{}: the datapath does not translate SCTP yet", port.id));
                continue;
            };
            let mut tables = PortTables {
                port,
                protocol,
                mode: layout.mode,
                programmed: layout.programmed,
                ids: &mut *ids,
                claims: &mut self.claims,
                batch: &mut *batch,
                owned: &mut owned,
                previously_owned: previously_owned.as_deref(),
                problems: &mut problems,
            };
            tables.add_all(layout.node_port_addresses);
        }
        dedup(&mut owned.markers);
        dedup(&mut owned.backends);
        for key in &owned.markers {
            *self.marker_users.entry(*key).or_default() += 1;
            batch.markers.insert(*key);
        }
        for id in &owned.backends {
            *self.backend_users.entry(*id).or_default() += 1;
            batch.backends.insert(*id);
        }
        batch.frontends.extend(owned.frontends.iter().copied());
        for key in &old.frontends {
            if !self.claims.is_owned(*key) {
                batch.wake.extend(self.claims.waiters(*key));
            }
        }
        if !problems.is_empty() {
            self.problems.insert(service.clone(), problems);
        }
        if !owned.is_empty() {
            self.services.insert(service.clone(), owned);
        }
    }

    /// Settles what the rebuilt services share with the others: a marker or backend stays
    /// while any service uses it, and goes (its id freed) when none does. Frontends nobody owns
    /// any longer free their ids too.
    pub(super) fn settle(&self, batch: &mut Batch, programmed: &DatapathState, ids: &mut Ids) {
        for key in &batch.markers {
            if self.marker_users.contains_key(key) {
                batch.after.services.entry(*key).or_default();
            } else {
                batch.after.services.remove(key);
                ids.release_marker(key);
            }
        }
        for id in &batch.backends {
            if self.backend_users.contains_key(id) {
                if let Some(backend) = programmed.backends.get(id)
                    && !batch.after.backends.contains_key(id)
                {
                    batch.after.backends.insert(*id, *backend);
                }
            } else {
                let gone = batch
                    .after
                    .backends
                    .remove(id)
                    .or_else(|| programmed.backends.get(id).copied());
                if let Some(backend) = gone {
                    ids.release_backend(&(backend.ip_be, backend.port_be, backend.proto));
                }
            }
        }
        for key in batch.frontends.iter().chain(&batch.allocated) {
            if !self.claims.is_owned(*key) {
                ids.release_service(key);
            }
        }
    }

    /// Every service port or frontend left out, and why.
    pub(super) fn problems(&self) -> Vec<String> {
        self.problems.values().flatten().cloned().collect()
    }
}

fn stop_using<K: Eq + Hash>(users: &mut HashMap<K, u32>, key: &K) {
    if let Some(count) = users.get_mut(key) {
        *count -= 1;
        if *count == 0 {
            users.remove(key);
        }
    }
}

fn dedup<T: Ord>(items: &mut Vec<T>) {
    items.sort_unstable();
    items.dedup();
}
