//! From the model of this node to the datapath tables it needs: frontends (with their scopes,
//! flags and ClusterIP markers), backend slots, backends, reverse NAT and source ranges.

use std::net::Ipv4Addr;

use lb_common::maps::{
    Backend, BackendSlotKey, NodeConfig, RevNat, ServiceKey, ServiceValue, backend_flags,
    node_flags, proto, scope, service_flags,
};

use super::{ids::Ids, state::DatapathState};
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
    let mut desired = Desired::default();
    desired.state.node = Some(node_config(node));
    for port in &model.ports {
        let Some(protocol) = protocol_number(port.id.protocol) else {
            desired.problems.push(format!("{}: the datapath does not translate SCTP yet", port.id));
            continue;
        };
        let mut builder = PortTables { port, protocol, mode, ids, desired: &mut desired };
        builder.add_all(&model.node_port_addresses);
    }
    desired
}

fn protocol_number(protocol: Protocol) -> Option<u8> {
    match protocol {
        Protocol::Tcp => Some(proto::TCP),
        Protocol::Udp => Some(proto::UDP),
        Protocol::Sctp => None,
    }
}

/// Adds one service port's frontends to the tables.
struct PortTables<'a> {
    port: &'a ServicePort,
    protocol: u8,
    mode: SlotMode,
    ids: &'a mut Ids,
    desired: &'a mut Desired,
}

impl PortTables<'_> {
    fn add_all(&mut self, node_port_addresses: &[Ipv4Addr]) {
        let port = self.port;
        // Any usable endpoint anywhere: if a policy filters them all away, the datapath drops
        // (kube-proxy's "no local endpoints"); with none at all it refuses.
        let any_usable = port.endpoints.iter().any(|e| e.ready || (e.serving && e.terminating));
        let internal = port.backends(Traffic::Internal);
        let external = port.backends(Traffic::External);
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
                // a second entry with the internal backend set.
                flags |= service_flags::EXT_LOCAL | service_flags::TWO_SCOPES;
                let internal_flags = service_flags::EXTERNAL
                    | affinity
                    | empty_drop(&internal)
                    | if ranges { service_flags::SOURCE_RANGES } else { 0 };
                self.add_frontend(
                    frontend.ip,
                    frontend.port,
                    scope::INTERNAL,
                    internal_flags,
                    &internal,
                    ranges,
                );
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

    /// Marks `vip` as an allocated ClusterIP: its other ports are refused, not dropped.
    fn add_marker(&mut self, vip: Ipv4Addr) {
        let key = ServiceKey { vip_be: ip_be(vip), port_be: 0, proto: 0, scope: scope::EXTERNAL };
        self.desired.state.services.entry(key).or_default();
    }

    fn add_frontend(
        &mut self,
        vip: Ipv4Addr,
        vport: u16,
        scope: u8,
        flags: u16,
        backends: &[&Endpoint],
        with_ranges: bool,
    ) {
        let key =
            ServiceKey { vip_be: ip_be(vip), port_be: vport.to_be(), proto: self.protocol, scope };
        if self.desired.state.services.contains_key(&key) {
            self.desired.problems.push(format!(
                "{}: {vip}:{vport}/{} is already served by another service port; left to that one",
                self.port.id, self.port.id.protocol
            ));
            return;
        }
        let Some(service_id) = self.ids.service(key) else {
            self.desired
                .problems
                .push(format!("{}: no frontend id left for {vip}:{vport}", self.port.id));
            return;
        };
        let Some(backend_ids) = self.backend_ids(backends) else {
            self.desired.problems.push(format!("{}: no backend id left", self.port.id));
            return;
        };
        let Some(slot_count) = self.add_slots(service_id, &backend_ids, backends) else {
            return;
        };
        let rev_nat = RevNat { vip_be: key.vip_be, port_be: key.port_be, pad: [0; 2] };
        self.desired.state.rev_nats.insert(service_id, rev_nat);
        if with_ranges {
            for range in &self.port.source_ranges {
                self.desired.state.source_ranges.insert((service_id, *range));
            }
        }
        let value = ServiceValue {
            service_id,
            slot_count,
            affinity_timeout_s: self.port.affinity_timeout_s.unwrap_or(0),
            flags,
            pad: [0; 2],
        };
        self.desired.state.services.insert(key, value);
    }

    /// Backend ids of `backends`, in the same order, with their entries added.
    fn backend_ids(&mut self, backends: &[&Endpoint]) -> Option<Vec<u32>> {
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
                self.desired.state.backends.insert(id, backend);
                Some(id)
            })
            .collect()
    }

    /// Fills the frontend's slots and returns their count; `None` (with a problem recorded)
    /// when no Maglev table can be built for them.
    fn add_slots(
        &mut self,
        service_id: u32,
        backend_ids: &[u32],
        backends: &[&Endpoint],
    ) -> Option<u32> {
        let table: Vec<u32> = match self.mode {
            SlotMode::PerBackend => backend_ids.to_vec(),
            SlotMode::Maglev(size) => {
                let names: Vec<String> = backends.iter().map(ToString::to_string).collect();
                match crate::maglev::table(&names, size) {
                    Ok(table) => {
                        table.into_iter().map(|index| backend_ids[index as usize]).collect()
                    }
                    Err(error) => {
                        self.desired.problems.push(format!("{}: {error}", self.port.id));
                        return None;
                    }
                }
            }
        };
        let slots =
            (0u32..).zip(&table).map(|(slot, id)| (BackendSlotKey { service_id, slot }, *id));
        self.desired.state.slots.extend(slots);
        u32::try_from(table.len()).ok()
    }
}
