//! From the model of this node to the datapath tables it needs: frontends (with their scopes,
//! flags and ClusterIP markers), backend slots, backends and source ranges.

use std::net::Ipv4Addr;

use lb_common::maps::{
    Backend, NodeConfig, ServiceKey, ServiceValue, Slot, backend_flags, node_flags, proto, scope,
    service_flags,
};

use super::{
    claims::Claims,
    ids::Ids,
    ledger::{Batch, Layout, Ledger, Owned},
    state::{DatapathState, slots_of},
};
use crate::{
    config,
    maps::{ip_be, prefix_be},
    model::{Endpoint, FrontendKind, Model, Protocol, ServicePort, Traffic},
};

/// How the daemon fills a frontend's backend slots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SlotMode {
    /// One slot per backend: the flow hash modulo the backend count picks one.
    #[default]
    PerBackend,
    /// A Maglev table of this (prime) size: every node picks the same backend for a flow, and a
    /// backend change moves few flows.
    Maglev(u32),
}

impl SlotMode {
    /// The mode the node configuration asks for.
    pub fn of(node: &config::NodeConfig) -> Self {
        node.maglev_table_size.map_or(Self::PerBackend, Self::Maglev)
    }
}

/// The tables, and what could not be programmed.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    pub state: DatapathState,
    /// Service ports or frontends left out, with the reason.
    pub problems: Vec<String>,
}

/// The datapath's view of the node configuration.
pub fn node_config(node: &config::NodeConfig) -> NodeConfig {
    let (cluster_cidr_be, cluster_mask_be) = prefix_be(node.cluster_cidr);
    let (service_cidr_be, service_mask_be) = prefix_be(node.service_cidr);
    // Masquerade to the first node address: the one the node config lists as primary.
    let snat_ip = node.node_ips.first().copied().unwrap_or(Ipv4Addr::UNSPECIFIED);
    NodeConfig {
        cluster_cidr_be,
        cluster_mask_be,
        service_cidr_be,
        service_mask_be,
        snat_ip_be: ip_be(snat_ip),
        snat_port_min: node.snat_port_range.min,
        snat_port_max: node.snat_port_range.max,
        flags: node_flags::CONFIGURED | if node.xdp_redirect { node_flags::FIB_FORWARD } else { 0 },
        jiffies_per_second: crate::clock::jiffies_per_second(),
    }
}

/// Computes the tables for `model`, allocating ids through `ids`.
pub fn desired(model: &Model, node: &config::NodeConfig, mode: SlotMode, ids: &mut Ids) -> Desired {
    let mut ledger = Ledger::default();
    let nothing_programmed = DatapathState::default();
    let layout = Layout {
        mode,
        node_port_addresses: &model.node_port_addresses,
        programmed: &nothing_programmed,
        earlier: None,
    };
    let mut batch =
        Batch::new(DatapathState { node: Some(node_config(node)), ..DatapathState::default() });
    for ports in by_service(&model.ports) {
        ledger.rebuild_service(&ports[0].id.service(), ports, &layout, ids, &mut batch);
    }
    ledger.settle(&mut batch, &nothing_programmed, ids);
    Desired { state: batch.after, problems: ledger.problems() }
}

/// The ports of each service, from ports sorted by id (as a [`Model`] holds them).
pub(super) fn by_service(ports: &[ServicePort]) -> impl Iterator<Item = &[ServicePort]> {
    ports.chunk_by(|a, b| a.id.namespace == b.id.namespace && a.id.name == b.id.name)
}

pub(super) fn protocol_number(protocol: Protocol) -> Option<u8> {
    match protocol {
        Protocol::Tcp => Some(proto::TCP),
        Protocol::Udp => Some(proto::UDP),
        Protocol::Sctp => None,
    }
}

/// A frontend's slots as the maps hold them, kept while it cannot have a new table.
struct KeptSlots {
    base: u32,
    slots: Vec<(u32, Slot)>,
    /// The entry's flags as programmed.
    flags: u16,
}

/// Adds one service port's frontends to a batch's tables, recording what its service owns.
pub(super) struct PortTables<'a> {
    pub(super) port: &'a ServicePort,
    pub(super) protocol: u8,
    pub(super) mode: SlotMode,
    pub(super) programmed: &'a DatapathState,
    pub(super) ids: &'a mut Ids,
    pub(super) claims: &'a mut Claims,
    pub(super) batch: &'a mut Batch,
    pub(super) owned: &'a mut Owned,
    /// The frontends the port's service owned before this build; `None` when that is not
    /// known (the maps were adopted and not reconciled since): any programmed one counts.
    pub(super) previously_owned: Option<&'a [ServiceKey]>,
    pub(super) problems: &'a mut Vec<String>,
}

impl PortTables<'_> {
    pub(super) fn add_all(&mut self, node_port_addresses: &[Ipv4Addr]) {
        let port = self.port;
        // Any usable endpoint anywhere: if a policy filters them all away, the datapath drops
        // (kube-proxy's "no local endpoints"); with none at all it refuses.
        let any_usable = port.endpoints.iter().any(|e| e.ready || (e.serving && e.terminating));
        let internal = port.backends(Traffic::Internal);
        let external = port.backends(Traffic::External);
        let inside_to_external = port.backends(Traffic::InsideToExternal);
        let affinity = if port.affinity_timeout_s.is_some() { service_flags::AFFINITY } else { 0 };
        let empty_drop = |backends: &[&Endpoint]| {
            if backends.is_empty() && any_usable { service_flags::EMPTY_DROP } else { 0 }
        };

        for frontend in port.frontends(node_port_addresses) {
            if frontend.kind == FrontendKind::ClusterIp {
                self.add_marker(frontend.ip);
                let flags = affinity | empty_drop(&internal);
                self.add_frontend(
                    frontend.ip,
                    frontend.port,
                    scope::EXTERNAL,
                    flags,
                    &internal,
                    false,
                );
                continue;
            }
            let ranges =
                frontend.kind == FrontendKind::LoadBalancer && !port.source_ranges.is_empty();
            let mut flags = service_flags::EXTERNAL | affinity | empty_drop(&external);
            if ranges {
                flags |= service_flags::SOURCE_RANGES;
            }
            if port.external_policy_local {
                // Sources inside the cluster are not limited by externalTrafficPolicy: they get
                // a second entry with every endpoint, as kube-proxy short-circuits them to its
                // cluster chain (internalTrafficPolicy is for the ClusterIP only).
                flags |= service_flags::EXT_LOCAL;
                // Both entries' ranges fit, or neither entry goes in: a twin is only reached
                // through its EXTERNAL entry.
                let count = if ranges { self.range_count() } else { 0 };
                let key = |scope| self.frontend_key(frontend.ip, frontend.port, scope);
                let both = [(key(scope::INTERNAL), count), (key(scope::EXTERNAL), count)];
                if !self.ranges_fit(&both, frontend.ip, frontend.port) {
                    continue;
                }
                let internal_flags = service_flags::EXTERNAL
                    | affinity
                    | empty_drop(&inside_to_external)
                    | if ranges { service_flags::SOURCE_RANGES } else { 0 };
                let twin = self.add_frontend(
                    frontend.ip,
                    frontend.port,
                    scope::INTERNAL,
                    internal_flags,
                    &inside_to_external,
                    ranges,
                );
                // Only with the twin in the tables: the programs follow the flag to it, and
                // would pass a packet untranslated if it were missing.
                if twin {
                    flags |= service_flags::TWO_SCOPES;
                }
            }
            self.add_frontend(
                frontend.ip,
                frontend.port,
                scope::EXTERNAL,
                flags,
                &external,
                ranges,
            );
        }
    }

    /// This port's loadBalancerSourceRanges: a LoadBalancer frontend's entries in the map.
    fn range_count(&self) -> u32 {
        u32::try_from(self.port.source_ranges.len()).unwrap_or(u32::MAX)
    }

    /// Whether the frontends of `claims` (those of `vip:vport`) fit the source ranges map with
    /// their ranges; a problem if not. Served without its ranges a frontend would be open to
    /// every source: it is left out instead.
    fn ranges_fit(&mut self, claims: &[(ServiceKey, u32)], vip: Ipv4Addr, vport: u16) -> bool {
        let Err(capacity) = self.ids.source_ranges_fit(claims) else { return true };
        let ranges = self.range_count();
        self.problems.push(format!(
            "{}: {vip}:{vport}: no room for its {ranges} loadBalancerSourceRanges entries \
             (SOURCE_RANGES holds {capacity} in all); not programmed",
            self.port.id
        ));
        false
    }

    /// Marks `vip` as an allocated ClusterIP: its other ports are refused, not dropped.
    fn add_marker(&mut self, vip: Ipv4Addr) {
        let key = ServiceKey::marker(ip_be(vip));
        if !self.ids.claim_marker(key) {
            self.problems.push(format!(
                "{}: no room in SERVICES for {vip}'s marker: its other ports are dropped, not \
                 refused",
                self.port.id
            ));
            return;
        }
        self.batch.after.services.entry(key).or_default();
        self.owned.markers.push(key);
    }

    /// Adds frontend `key` with its slots and backends; whether it is in the tables now.
    fn add_frontend(
        &mut self,
        vip: Ipv4Addr,
        vport: u16,
        scope: u8,
        flags: u16,
        backends: &[&Endpoint],
        with_ranges: bool,
    ) -> bool {
        let key = self.frontend_key(vip, vport, scope);
        let port_id = &self.port.id;
        if self.claims.held_by_earlier(key, port_id) || self.owned.frontends.contains(&key) {
            self.problems.push(format!(
                "{port_id}: {vip}:{vport}/{} is already served by another service port; left to that one",
                port_id.protocol
            ));
            self.claims.wait(key, port_id);
            self.owned.waiting.push(key);
            return false;
        }
        let ranges = if with_ranges { self.range_count() } else { 0 };
        if !self.ranges_fit(&[(key, ranges)], vip, vport) {
            return false;
        }
        let Some(service_id) = self.ids.service(key) else {
            self.problems.push(format!(
                "{port_id}: no frontend id, or no room in SERVICES, left for {vip}:{vport}"
            ));
            return false;
        };
        self.batch.allocated.insert(key);
        self.ids.set_source_ranges(service_id, ranges);
        let (slot_base, slots, flags) = match self.fresh_slots(key, backends) {
            Ok((base, table, backend_slots)) => {
                self.owned.backends.extend(backend_slots.iter().map(|slot| slot.backend_id));
                (base, (base..).zip(table).collect(), flags)
            }
            Err(problem) => {
                let kept = self.programmed_slots(key);
                let note = if kept.is_some() { "; its slots are kept as they were" } else { "" };
                self.problems.push(format!("{port_id}: {vip}:{vport}: {problem}{note}"));
                let Some(kept) = kept else { return false };
                self.keep_backends(&kept.slots);
                // EXT_LOCAL says which endpoints the kept slots hold, and so whether flows to
                // them are masqueraded; every other setting takes its new value.
                let flags =
                    (flags & !service_flags::EXT_LOCAL) | (kept.flags & service_flags::EXT_LOCAL);
                (kept.base, kept.slots, flags)
            }
        };
        self.own(key);
        // Whatever an earlier build of this frontend left (the displaced owner's, or this
        // service's own before a rebuild in the same batch) must not mix in.
        let slot_count = u32::try_from(slots.len()).unwrap_or(u32::MAX);
        let after = &mut self.batch.after;
        after.remove_frontend(&key);
        after.slots.extend(slots);
        if with_ranges {
            for range in &self.port.source_ranges {
                after.source_ranges.insert((service_id, *range));
            }
        }
        let value = ServiceValue {
            service_id,
            slot_base,
            slot_count,
            affinity_timeout_s: self.port.affinity_timeout_s.unwrap_or(0),
            flags,
            pad: [0; 2],
        };
        after.services.insert(key, value);
        self.record_serving(service_id);
        true
    }

    fn frontend_key(&self, vip: Ipv4Addr, vport: u16, scope: u8) -> ServiceKey {
        ServiceKey { vip_be: ip_be(vip), port_be: vport.to_be(), proto: self.protocol, scope }
    }

    /// Takes frontend `key` for this service port.
    fn own(&mut self, key: ServiceKey) {
        if let Some(displaced) = self.claims.take(key, &self.port.id) {
            self.batch.wake.push(displaced.service());
        }
        self.owned.frontends.push(key);
    }

    /// The slots the maps hold for frontend `key`, when it cannot have a new table (no room in
    /// the slot array, no backend id, no Maglev table): a full map must not take down a
    /// service that works. Only for a frontend this service owned before (not one it takes
    /// from another service port now; on the first reconcile of adopted maps, whose owners
    /// are not known, one whose slots all name this port's endpoints), in the run it still
    /// owns.
    fn programmed_slots(&self, key: ServiceKey) -> Option<KeptSlots> {
        if self.previously_owned.is_some_and(|owned| !owned.contains(&key)) {
            return None;
        }
        let value = self.programmed.services.get(&key)?;
        let run = self.ids.slot_run(&key).map(|run| (run.base, run.len));
        let owned_run =
            if value.slot_count == 0 { None } else { Some((value.slot_base, value.slot_count)) };
        let kept = (run == owned_run).then(|| KeptSlots {
            base: value.slot_base,
            slots: slots_of(&self.programmed.slots, value).collect(),
            flags: value.flags,
        })?;
        // Whose they were is not known: only slots that all name endpoints of this port are
        // kept (not those of a service deleted meanwhile whose address it took, which may
        // share some pods with it).
        let endpoint_of_this_port = |slot: &Slot| {
            self.port.endpoints.iter().any(|endpoint| {
                (ip_be(endpoint.ip), endpoint.port.to_be())
                    == (slot.backend.ip_be, slot.backend.port_be)
            })
        };
        let ours = self.previously_owned.is_some()
            || kept.slots.iter().all(|(_, slot)| endpoint_of_this_port(slot));
        ours.then_some(kept)
    }

    /// Keeps the backends kept slots name in the tables, and their ids taken.
    fn keep_backends(&mut self, slots: &[(u32, Slot)]) {
        for (_, slot) in slots {
            let id = slot.backend_id;
            let backend = self.programmed.backends.get(&id).copied().unwrap_or(slot.backend);
            self.batch.after.backends.insert(id, backend);
            self.batch.backends.insert(id);
            self.owned.backends.push(id);
        }
    }

    /// Every serving endpoint of a non-TCP frontend, whatever the policies left in its slots:
    /// their UDP flows drain (see `drains`).
    fn record_serving(&mut self, service_id: u32) {
        if self.protocol != proto::TCP {
            let serving = self.port.endpoints.iter().filter(|e| e.ready || e.serving);
            let endpoints = serving.map(|e| (ip_be(e.ip), e.port.to_be())).collect();
            self.batch.serving.insert(service_id, endpoints);
        }
    }

    /// The first index of frontend `key`'s run of slots for `table`: the run it has if the maps
    /// hold `table` there already, else a fresh one (so that a packet never sees a run half
    /// rewritten); why not when the slot array has no room.
    fn place_slots(&mut self, key: ServiceKey, table: &[Slot]) -> Result<u32, String> {
        let len = table.len();
        let no_room = || format!("no room left in the slot array for its {len} slots");
        let len = u32::try_from(len).map_err(|_| no_room())?;
        let programmed = self.programmed;
        let unchanged = self.ids.slot_run(&key).is_some_and(|run| {
            programmed.services.get(&key).is_some_and(|value| {
                (value.slot_base, value.slot_count) == (run.base, run.len)
                    && slots_of(&programmed.slots, value)
                        .map(|(_, slot)| slot)
                        .eq(table.iter().copied())
            })
        });
        self.ids.place_slots(key, len, unchanged).ok_or_else(no_room)
    }

    /// Frontend `key`'s new slot table for `backends`, placed in the slot array: its first
    /// index, the table, and the slot of each backend; or why it cannot be had.
    ///
    /// A Maglev table that cannot be had (no room for its slots, or too many backends for its
    /// size) gives way to one slot per backend, with a problem saying so: the frontend then
    /// loses only the other nodes' agreement on its flows' backends, where it would otherwise
    /// go unserved, or keep slots naming pods that are gone.
    fn fresh_slots(
        &mut self,
        key: ServiceKey,
        backends: &[&Endpoint],
    ) -> Result<(u32, Vec<Slot>, Vec<Slot>), String> {
        let backend_slots = self.backend_slots(backends).ok_or("no backend id left")?;
        let mut gave_way = None;
        if let SlotMode::Maglev(size) = self.mode {
            let maglev = maglev_table(&backend_slots, backends, size)
                .and_then(|table| Ok((self.place_slots(key, &table)?, table)));
            match maglev {
                Ok((base, table)) => return Ok((base, table, backend_slots)),
                Err(why) => gave_way = Some(why),
            }
        }
        let base = self.place_slots(key, &backend_slots)?;
        if let Some(why) = gave_way {
            self.problems.push(format!(
                "{}: {}: its Maglev table: {why}: served by a flow hash over its {} backends \
                 instead, which other nodes do not share",
                self.port.id,
                frontend_address(key),
                backend_slots.len()
            ));
        }
        Ok((base, backend_slots.clone(), backend_slots))
    }

    /// The slot of each of `backends` (its id and entry), in the same order, with their
    /// `BACKENDS` entries added.
    fn backend_slots(&mut self, backends: &[&Endpoint]) -> Option<Vec<Slot>> {
        backends
            .iter()
            .map(|endpoint| {
                let backend = Backend {
                    ip_be: ip_be(endpoint.ip),
                    port_be: endpoint.port.to_be(),
                    proto: self.protocol,
                    flags: if endpoint.node_local { backend_flags::LOCAL } else { 0 },
                };
                let id = self.ids.backend((backend.ip_be, backend.port_be, backend.proto))?;
                self.batch.backends.insert(id);
                self.batch.after.backends.insert(id, backend);
                Some(Slot { backend_id: id, backend })
            })
            .collect()
    }
}

/// A frontend's Maglev table of `size` slots over `backends` (with their slots,
/// `backend_slots`); why not when none can be built for them.
fn maglev_table(
    backend_slots: &[Slot],
    backends: &[&Endpoint],
    size: u32,
) -> Result<Vec<Slot>, String> {
    let names: Vec<String> = backends.iter().map(ToString::to_string).collect();
    let table = crate::maglev::table(&names, size).map_err(|e| e.to_string())?;
    Ok(table.into_iter().map(|index| backend_slots[index as usize]).collect())
}

/// `vip:port` of frontend `key`, for problems.
fn frontend_address(key: ServiceKey) -> String {
    format!("{}:{}", Ipv4Addr::from(u32::from_be(key.vip_be)), u16::from_be(key.port_be))
}
