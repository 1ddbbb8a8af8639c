//! Tests of the per-service path: rebuilding only the services a change names must leave the
//! maps as a full rebuild would, write nothing for other services, and keep the write order.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use lb_common::maps::{Backend, ServiceKey};

use super::{
    state::{run_of, slots_of},
    tests::assert_safely_ordered,
    *,
};
use crate::{
    config::NodeConfig,
    maps::MapOp,
    model::{Endpoint, Hint, Protocol, ServicePortId},
};

/// Applies operations to a table, as the kernel maps would.
#[derive(Default)]
struct StateMaps {
    state: DatapathState,
    ops: Vec<MapOp>,
}

impl MapWriter for StateMaps {
    fn apply(&mut self, op: &MapOp) -> crate::error::Result<()> {
        self.state.apply(op);
        self.ops.push(op.clone());
        Ok(())
    }
}

fn node() -> NodeConfig {
    NodeConfig::from_yaml_str(
        "nodeName: node-a
nodeIPs: [192.168.1.63]
clusterCIDR: 10.244.0.0/16
serviceCIDR: 10.96.0.0/12",
    )
    .expect("node configuration")
}

/// xorshift64: reproducible edits without a dependency.
struct Random(u64);

impl Random {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn name(index: u64) -> ServiceName {
    ServiceName::new("shop", format!("svc-{index}"))
}

/// A random service: addresses and endpoints come from small pools, so that services share
/// backends and ClusterIPs and fight over external IPs.
fn random_ports(random: &mut Random, service: &ServiceName) -> Vec<ServicePort> {
    let cluster_ip = Ipv4Addr::new(10, 96, 0, u8::try_from(1 + random.below(8)).expect("small"));
    let external_ips =
        if random.chance(30) { vec![Ipv4Addr::new(192, 0, 2, 1)] } else { Vec::new() };
    let load_balancer_ips =
        if random.chance(20) { vec![Ipv4Addr::new(198, 51, 100, 1)] } else { Vec::new() };
    let source_ranges = if random.chance(50) {
        vec!["203.0.113.0/25".parse::<Ipv4Net>().expect("CIDR")]
    } else {
        Vec::new()
    };
    let external_policy_local = random.chance(30);
    let internal_policy_local = random.chance(20);
    let affinity_timeout_s = random.chance(20).then_some(600);
    let mut ports = Vec::new();
    for (port, protocol) in [(80, Protocol::Tcp), (53, Protocol::Udp), (9000, Protocol::Sctp)] {
        if port != 80 && random.chance(60) {
            continue;
        }
        let mut endpoints: Vec<Endpoint> = (0..random.below(5))
            .map(|_| {
                let ready = random.chance(70);
                let host = u8::try_from(1 + random.below(8)).expect("small");
                Endpoint {
                    ip: Ipv4Addr::new(10, 244, 0, host),
                    port: 8080,
                    // A pod runs on one node, whichever service lists it.
                    node_local: host % 2 == 0,
                    ready,
                    serving: ready || random.chance(50),
                    terminating: !ready && random.chance(50),
                    zone_hint: Hint::None,
                    node_hint: Hint::None,
                }
            })
            .collect();
        endpoints.sort();
        endpoints.dedup_by_key(|e| (e.ip, e.port));
        ports.push(ServicePort {
            id: ServicePortId {
                namespace: service.namespace.clone(),
                name: service.name.clone(),
                port,
                protocol,
            },
            cluster_ip,
            port,
            node_port: random
                .chance(40)
                .then(|| 30_000 + u16::try_from(random.below(4)).expect("small")),
            external_ips: external_ips.clone(),
            load_balancer_ips: load_balancer_ips.clone(),
            external_policy_local,
            internal_policy_local,
            affinity_timeout_s,
            source_ranges: source_ranges.clone(),
            endpoints,
        });
    }
    ports.sort_by(|a, b| a.id.cmp(&b.id));
    ports
}

fn model_of(services: &BTreeMap<ServiceName, Vec<ServicePort>>, node: &NodeConfig) -> Model {
    Model {
        ports: services.values().flatten().cloned().collect(),
        node_port_addresses: node.node_port_addresses(),
        ..Model::default()
    }
}

/// A frontend with its ids replaced by what they name, so that tables built with different
/// id allocations compare equal when they serve the same.
#[derive(Debug, PartialEq, Eq)]
struct Resolved {
    slot_count: u32,
    flags: u16,
    affinity_timeout_s: u32,
    slots: Vec<Option<Backend>>,
    ranges: Vec<Ipv4Net>,
}

fn resolved(state: &DatapathState) -> BTreeMap<ServiceKey, Resolved> {
    state
        .services
        .iter()
        .map(|(key, value)| {
            let id = value.service_id;
            let slots = slots_of(&state.slots, value)
                .map(|(_, slot)| {
                    let backend = state.backends.get(&slot.backend_id).copied();
                    assert_eq!(backend, Some(slot.backend), "a slot's copy of its backend");
                    backend
                })
                .collect();
            let ranges =
                state.source_ranges.iter().filter(|(i, _)| *i == id).map(|(_, r)| *r).collect();
            let resolved = Resolved {
                slot_count: value.slot_count,
                flags: value.flags,
                affinity_timeout_s: value.affinity_timeout_s,
                slots,
                ranges,
            };
            (*key, resolved)
        })
        .collect()
}

/// Entries nothing points at: a rebuild must not leave them behind.
fn assert_no_orphans(state: &DatapathState) {
    let ids: BTreeSet<u32> = state.services.values().map(|v| v.service_id).collect();
    let pointed_at: BTreeSet<u32> = state.services.values().flat_map(run_of).collect();
    assert!(state.slots.keys().all(|i| pointed_at.contains(i)), "slots no frontend points at");
    assert!(state.source_ranges.iter().all(|(id, _)| ids.contains(id)), "ranges of unknown");
    let used: BTreeSet<u32> = state.slots.values().map(|slot| slot.backend_id).collect();
    let backends: BTreeSet<u32> = state.backends.keys().copied().collect();
    assert_eq!(used, backends, "exactly the backends the slots use");
}

fn sorted(mut problems: Vec<String>) -> Vec<String> {
    problems.sort();
    problems
}

#[test]
fn incremental_results_equal_a_full_rebuild_over_random_edits() {
    let node = node();
    for seed in 1..=20 {
        let mut random = Random(0x9E37_79B9_7F4A_7C15 ^ seed);
        let mut services: BTreeMap<ServiceName, Vec<ServicePort>> = BTreeMap::new();
        for index in 0..10 {
            let service = name(index);
            services.insert(service.clone(), random_ports(&mut random, &service));
        }
        let mut incremental = Reconciler::new(DatapathState::default(), SlotMode::PerBackend);
        let mut maps = StateMaps::default();
        incremental.reconcile(&model_of(&services, &node), &node, &mut maps).expect("first sync");
        for step in 0..60 {
            let mut changed = BTreeSet::new();
            for _ in 0..=random.below(2) {
                let service = name(random.below(12));
                if random.chance(15) {
                    services.remove(&service);
                } else {
                    services.insert(service.clone(), random_ports(&mut random, &service));
                }
                changed.insert(service);
            }
            let written = maps.ops.len();
            let before = maps.state.clone();
            let report = incremental
                .reconcile_services(
                    changed,
                    |service| services.get(service).cloned().unwrap_or_default(),
                    &mut maps,
                )
                .expect("incremental sync");
            let context = format!("seed {seed} step {step}");
            assert_eq!(report.writes, maps.ops.len() - written, "{context}");
            assert_safely_ordered(&before, &maps.ops[written..]);
            assert_eq!(&maps.state, incremental.programmed(), "{context}: the maps were written");
            assert_no_orphans(incremental.programmed());

            let mut full = Reconciler::new(DatapathState::default(), SlotMode::PerBackend);
            let full_report = full
                .reconcile(&model_of(&services, &node), &node, &mut StateMaps::default())
                .expect("full sync");
            assert_eq!(
                resolved(incremental.programmed()),
                resolved(full.programmed()),
                "{context}"
            );
            assert_eq!(sorted(report.problems), sorted(full_report.problems), "{context}");
        }
        // The periodic full resync finds nothing to repair.
        let report =
            incremental.reconcile(&model_of(&services, &node), &node, &mut maps).expect("resync");
        assert_eq!(
            report.writes,
            0,
            "seed {seed}: {:?}",
            &maps.ops[maps.ops.len() - report.writes..]
        );
    }
}

/// Two services with the seed's shape: one port, two endpoints each.
fn two_services(
    node: &NodeConfig,
) -> (BTreeMap<ServiceName, Vec<ServicePort>>, Reconciler, StateMaps) {
    let mut random = Random(7);
    let mut services = BTreeMap::new();
    for index in 0..2 {
        let service = name(index);
        let mut ports = random_ports(&mut random, &service);
        ports.retain(|p| p.port == 80);
        ports[0].cluster_ip = Ipv4Addr::new(10, 96, 1, u8::try_from(index).expect("small"));
        ports[0].external_ips = vec![Ipv4Addr::new(192, 0, 2, 1)];
        ports[0].endpoints = (1..=2)
            .map(|host| Endpoint {
                ip: Ipv4Addr::new(10, 244, u8::try_from(index).expect("small"), host),
                port: 8080,
                node_local: true,
                ready: true,
                serving: true,
                terminating: false,
                zone_hint: Hint::None,
                node_hint: Hint::None,
            })
            .collect();
        services.insert(service, ports);
    }
    let mut reconciler = Reconciler::new(DatapathState::default(), SlotMode::PerBackend);
    let mut maps = StateMaps::default();
    reconciler.reconcile(&model_of(&services, node), node, &mut maps).expect("first sync");
    (services, reconciler, maps)
}

#[test]
fn a_change_writes_only_its_services_entries_and_purges_its_removed_backends() {
    let node = node();
    let (mut services, mut reconciler, mut maps) = two_services(&node);
    let before = reconciler.programmed().clone();
    let other_ids: BTreeSet<u32> = before
        .services
        .iter()
        .filter(|(key, _)| key.vip_be == crate::maps::ip_be(Ipv4Addr::new(10, 96, 1, 0)))
        .map(|(_, value)| value.service_id)
        .collect();
    let changed = name(1);
    services.get_mut(&changed).expect("svc-1")[0].endpoints.pop();
    let written = maps.ops.len();
    let report = reconciler
        .reconcile_services([changed.clone()], |s| services[s].clone(), &mut maps)
        .expect("incremental sync");
    let ops = &maps.ops[written..];
    assert_ne!(ops, []);
    let slot_owner: BTreeMap<u32, u32> = [&before, reconciler.programmed()]
        .into_iter()
        .flat_map(|state| state.services.values())
        .flat_map(|value| run_of(value).map(|index| (index, value.service_id)))
        .collect();
    for op in ops {
        let service_id = match op {
            MapOp::UpsertService { value, .. } => value.service_id,
            MapOp::UpsertSlot { index, .. } | MapOp::RemoveSlot { index } => *slot_owner
                .get(index)
                .unwrap_or_else(|| panic!("slot {index} belongs to no frontend, before or after")),
            MapOp::RemoveBackend { .. } => continue,
            other => panic!("unexpected write for a removed endpoint: {other:?}"),
        };
        assert!(!other_ids.contains(&service_id), "svc-0's frontend {service_id} was written");
    }
    let gone = *before
        .backends
        .iter()
        .find(|(_, b)| b.ip_be == crate::maps::ip_be(Ipv4Addr::new(10, 244, 1, 2)))
        .expect("the removed endpoint was a backend")
        .0;
    assert!(ops.contains(&MapOp::RemoveBackend { id: gone }));
    let forget = &report.forget;
    assert!(forget.affinities.iter().all(|(_, backend)| *backend == gone));
    assert!(!forget.affinities.is_empty());
    // The endpoint is gone: its UDP flows go too, by address; TCP flows may still finish.
    let gone_address = (before.backends[&gone].ip_be, before.backends[&gone].port_be);
    let udp = services[&changed][0].id.protocol == Protocol::Udp;
    let expected: BTreeSet<_> = if udp {
        forget.affinities.iter().map(|(frontend, _)| (*frontend, gone_address)).collect()
    } else {
        BTreeSet::new()
    };
    assert_eq!(forget.flows, expected);

    let again = reconciler
        .reconcile_services([changed], |s| services[s].clone(), &mut maps)
        .expect("no change");
    assert_eq!(again.writes, 0, "rebuilding an unchanged service writes nothing");
}

#[test]
fn a_frontend_given_up_goes_to_the_next_claimant_and_back() {
    let node = node();
    let (mut services, mut reconciler, mut maps) = two_services(&node);
    let external = ServiceKey {
        vip_be: crate::maps::ip_be(Ipv4Addr::new(192, 0, 2, 1)),
        port_be: 80_u16.to_be(),
        proto: lb_common::maps::proto::TCP,
        scope: lb_common::maps::scope::EXTERNAL,
    };
    let serving = |reconciler: &Reconciler| {
        let state = reconciler.programmed();
        let first_slot = state.slots[&state.services[&external].slot_base];
        Ipv4Addr::from(u32::from_be(first_slot.backend.ip_be))
    };
    assert_eq!(serving(&reconciler), Ipv4Addr::new(10, 244, 0, 1), "svc-0 sorts first");
    assert_eq!(reconciler.ledger.problems().len(), 1, "svc-1 is told the external IP is taken");

    // svc-0 gives the external IP up: svc-1, which did not change, takes it over.
    services.get_mut(&name(0)).expect("svc-0")[0].external_ips.clear();
    reconciler.reconcile_services([name(0)], |s| services[s].clone(), &mut maps).expect("give up");
    assert_eq!(serving(&reconciler), Ipv4Addr::new(10, 244, 1, 1));
    assert_eq!(reconciler.ledger.problems(), Vec::<String>::new());

    // And claims it back: the earlier port wins again.
    services.get_mut(&name(0)).expect("svc-0")[0].external_ips = vec![Ipv4Addr::new(192, 0, 2, 1)];
    let written = maps.ops.len();
    let before = maps.state.clone();
    reconciler
        .reconcile_services([name(0)], |s| services[s].clone(), &mut maps)
        .expect("take back");
    assert_eq!(serving(&reconciler), Ipv4Addr::new(10, 244, 0, 1));
    assert_safely_ordered(&before, &maps.ops[written..]);
    assert_eq!(&maps.state, reconciler.programmed());
}

/// svc-1 turned UDP, with its second endpoint terminating but serving; that endpoint's
/// address and the ids of svc-1's frontends.
struct Draining {
    node: NodeConfig,
    services: BTreeMap<ServiceName, Vec<ServicePort>>,
    reconciler: Reconciler,
    maps: StateMaps,
    address: (u32, u16),
    frontends: BTreeSet<u32>,
}

fn draining() -> Draining {
    let node = node();
    let (mut services, mut reconciler, mut maps) = two_services(&node);
    let udp = name(1);
    services.get_mut(&udp).expect("svc-1")[0].id.protocol = Protocol::Udp;
    reconciler.reconcile_services([udp.clone()], |s| services[s].clone(), &mut maps).expect("UDP");
    let leaving = services[&udp][0].endpoints[1].clone();
    let address = (crate::maps::ip_be(leaving.ip), leaving.port.to_be());
    let frontends: BTreeSet<u32> = reconciler
        .programmed()
        .services
        .iter()
        .filter(|(key, _)| key.proto == lb_common::maps::proto::UDP)
        .map(|(_, value)| value.service_id)
        .collect();
    assert!(!frontends.is_empty());

    // Terminating while the other endpoint is ready: out of the slots, still serving.
    let endpoint = &mut services.get_mut(&udp).expect("svc-1")[0].endpoints[1];
    (endpoint.ready, endpoint.terminating) = (false, true);
    let report = reconciler
        .reconcile_services([udp], |s| services[s].clone(), &mut maps)
        .expect("terminating");
    let forget = report.forget;
    assert_eq!(forget.affinities.len(), frontends.len(), "sticky clients go: {forget:?}");
    assert!(forget.flows.is_empty(), "flows drain: {forget:?}");
    assert_eq!(reconciler.drains().len(), frontends.len());
    Draining { node, services, reconciler, maps, address, frontends }
}

#[test]
fn a_udp_endpoint_keeps_its_flows_while_it_serves_outside_the_slots() {
    let Draining { node, mut services, mut reconciler, mut maps, address, frontends } = draining();
    // A full resync keeps them while it serves.
    let report = reconciler.reconcile(&model_of(&services, &node), &node, &mut maps).expect("full");
    assert!(report.forget.is_empty(), "{:?}", report.forget);

    // No longer serving: its flows go, by address, on every frontend of the service.
    services.get_mut(&name(1)).expect("svc-1")[0].endpoints[1].serving = false;
    let report = reconciler.reconcile(&model_of(&services, &node), &node, &mut maps).expect("full");
    let drained: BTreeSet<_> = frontends.iter().map(|id| (*id, address)).collect();
    assert_eq!(report.forget.flows, drained);
    assert!(reconciler.drains().is_empty());
}

#[test]
fn a_deleted_service_forgets_the_udp_flows_it_kept_draining() {
    let Draining { mut reconciler, mut maps, address, frontends, .. } = draining();
    let report =
        reconciler.reconcile_services([name(1)], |_| Vec::new(), &mut maps).expect("deleted");
    let drained: BTreeSet<_> = frontends.iter().map(|id| (*id, address)).collect();
    assert!(report.forget.flows.is_superset(&drained), "{:?}", report.forget);
    assert!(reconciler.drains().is_empty());
}
