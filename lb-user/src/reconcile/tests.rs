//! Reconciler tests without a kernel: the seed scenario's tables, ordering, no-op resyncs,
//! id stability and restarts, through a recording map writer.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use lb_common::maps::{ServiceKey, ServiceValue, proto, scope, service_flags as flag};

use super::{
    state::{run_of, slots_of},
    *,
};
use crate::{
    config::NodeConfig,
    loader::Capacities,
    manifest,
    maps::{MapOp, ip_be},
    model::{self, Model, Protocol},
};

/// Records operations and keeps the resulting tables, like the kernel maps would.
#[derive(Default)]
struct FakeMaps {
    ops: Vec<MapOp>,
}

impl MapWriter for FakeMaps {
    fn apply(&mut self, op: &MapOp) -> crate::error::Result<()> {
        self.ops.push(op.clone());
        Ok(())
    }
}

fn seed_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/scenarios/seed")
}

fn seed() -> (Model, NodeConfig) {
    let node = NodeConfig::from_file(&seed_dir().join("node.yaml")).expect("seed node.yaml");
    let manifests = manifest::load_file(&seed_dir().join("manifests.yaml"));
    assert!(manifests.problems.is_empty(), "{:?}", manifests.problems);
    (model::build(&manifests.services, &manifests.slices, &node), node)
}

fn key(vip: &str, port: u16, protocol: u8, entry_scope: u8) -> ServiceKey {
    let vip: Ipv4Addr = vip.parse().expect("address");
    ServiceKey { vip_be: ip_be(vip), port_be: port.to_be(), proto: protocol, scope: entry_scope }
}

fn frontend(state: &DatapathState, vip: &str, port: u16, entry_scope: u8) -> ServiceValue {
    *state
        .services
        .get(&key(vip, port, proto::TCP, entry_scope))
        .unwrap_or_else(|| panic!("no frontend {vip}:{port} scope {entry_scope}"))
}

fn seed_state() -> DatapathState {
    let (model, node) = seed();
    desired(&model, &node, SlotMode::PerBackend, &mut Ids::default()).state
}

#[test]
fn seed_frontends_carry_their_policies() {
    let state = seed_state();
    let my_nginx = frontend(&state, "10.96.45.10", 80, scope::EXTERNAL);
    assert_eq!((my_nginx.slot_count, my_nginx.flags), (2, 0));
    let node_port = frontend(&state, "192.168.1.63", 30380, scope::EXTERNAL);
    assert_eq!((node_port.slot_count, node_port.flags), (2, flag::EXTERNAL));

    let local_remote = frontend(&state, "192.168.1.63", 30400, scope::EXTERNAL);
    assert_eq!(local_remote.slot_count, 0);
    assert_eq!(
        local_remote.flags,
        flag::EXTERNAL | flag::EXT_LOCAL | flag::TWO_SCOPES | flag::EMPTY_DROP
    );
    let local_remote_internal = frontend(&state, "192.168.1.63", 30400, scope::INTERNAL);
    assert_eq!(
        (local_remote_internal.slot_count, local_remote_internal.flags),
        (1, flag::EXTERNAL)
    );

    let itp = frontend(&state, "10.96.45.22", 80, scope::EXTERNAL);
    assert_eq!((itp.slot_count, itp.flags), (0, flag::EMPTY_DROP));
    let empty = frontend(&state, "10.96.45.12", 80, scope::EXTERNAL);
    assert_eq!((empty.slot_count, empty.flags), (0, 0), "no endpoints at all: refuse, not drop");

    let lb = frontend(&state, "198.51.100.10", 80, scope::EXTERNAL);
    assert_eq!(lb.flags, flag::EXTERNAL | flag::SOURCE_RANGES);
    let range: ipnet::Ipv4Net = "203.0.113.0/25".parse().expect("CIDR");
    assert!(state.source_ranges.contains(&(lb.service_id, range)));

    let sticky = frontend(&state, "10.96.45.11", 80, scope::EXTERNAL);
    assert_eq!((sticky.flags, sticky.affinity_timeout_s), (flag::AFFINITY, 600));

    let marker = state.services.get(&key("10.96.45.10", 0, 0, scope::EXTERNAL));
    assert_eq!(marker, Some(&ServiceValue::default()), "ClusterIP marker");
    for (vip, port) in [("10.96.45.40", 80), ("10.96.45.41", 80)] {
        assert!(!state.services.contains_key(&key(vip, port, proto::TCP, scope::EXTERNAL)));
    }
}

#[test]
fn every_frontend_has_its_slots() {
    let state = seed_state();
    for value in state.services.values().filter(|v| v.service_id != 0) {
        let slots = slots_of(&state.slots, value).count();
        assert_eq!(slots, value.slot_count as usize);
    }
}

#[test]
fn a_resync_with_no_change_writes_nothing() {
    let (model, node) = seed();
    let mut reconciler = Reconciler::new(DatapathState::default(), SlotMode::PerBackend);
    let mut maps = FakeMaps::default();
    let first = reconciler.reconcile(&model, &node, &mut maps).expect("first");
    assert!(first.writes > 10, "the seed programs many entries: {}", first.writes);
    assert_eq!(first.writes, maps.ops.len(), "the report counts what was written");
    let second = reconciler.reconcile(&model, &node, &mut maps).expect("second");
    assert_eq!(second.writes, 0, "{:?}", &maps.ops[first.writes..]);
}

#[test]
fn a_restarted_daemon_adopts_the_programmed_tables_without_writing() {
    let (model, node) = seed();
    let mut first = Reconciler::new(DatapathState::default(), SlotMode::PerBackend);
    first.reconcile(&model, &node, &mut FakeMaps::default()).expect("first daemon");
    let programmed = first.programmed().clone();
    let mut restarted = Reconciler::new(programmed.clone(), SlotMode::PerBackend);
    let mut maps = FakeMaps::default();
    restarted.reconcile(&model, &node, &mut maps).expect("restart");
    assert!(maps.ops.is_empty(), "a restart rewrites nothing: {:?}", maps.ops);
    assert_eq!(restarted.programmed(), &programmed, "same ids after the restart");
}

/// The seed with one endpoint of my-nginx removed.
fn without_endpoint(model: &Model, ip: &str) -> Model {
    let mut changed = model.clone();
    let ip: Ipv4Addr = ip.parse().expect("address");
    for port in &mut changed.ports {
        port.endpoints.retain(|e| e.ip != ip);
    }
    changed
}

#[test]
fn writes_are_ordered_so_no_packet_sees_a_half_written_service() {
    let (model, node) = seed();
    let mut reconciler = Reconciler::new(DatapathState::default(), SlotMode::PerBackend);
    for model in [model.clone(), without_endpoint(&model, "10.244.2.10"), model] {
        let mut maps = FakeMaps::default();
        let before = reconciler.programmed().clone();
        reconciler.reconcile(&model, &node, &mut maps).expect("reconcile");
        assert_safely_ordered(&before, &maps.ops);
    }
}

/// Replays `ops` on `before` and checks, after every one, what a packet could see: each
/// frontend's whole run of slots and the backends they name, and a run
/// a frontend points at never rewritten.
pub(super) fn assert_safely_ordered(before: &DatapathState, ops: &[MapOp]) {
    let mut state = before.clone();
    for op in ops {
        if let MapOp::UpsertSlot { index, .. } | MapOp::RemoveSlot { index } = op {
            let live = state.services.values().any(|value| run_of(value).contains(index));
            assert!(!live, "{op:?} rewrites a run a frontend points at");
        }
        state.apply(op);
        for (key, value) in &state.services {
            if value.flags & flag::TWO_SCOPES != 0 {
                let twin = ServiceKey { scope: scope::INTERNAL, ..*key };
                assert!(state.services.contains_key(&twin), "after {op:?}: {key:?} lacks its twin");
            }
        }
        for value in state.services.values().filter(|value| value.service_id != 0) {
            for index in run_of(value) {
                let slot = state.slots.get(&index);
                assert!(slot.is_some(), "after {op:?}: frontend {value:?} lacks slot {index}");
                let backend_id = slot.map(|slot| slot.backend_id).unwrap_or_default();
                assert!(state.backends.contains_key(&backend_id), "after {op:?}: backend gone");
            }
        }
    }
}

#[test]
fn the_node_configuration_comes_last_into_a_fresh_datapath_and_first_into_a_running_one() {
    let (model, node) = seed();
    let mut reconciler = Reconciler::new(DatapathState::default(), SlotMode::PerBackend);
    let mut maps = FakeMaps::default();
    reconciler.reconcile(&model, &node, &mut maps).expect("first");
    assert!(maps.ops.len() > 1);
    assert!(matches!(maps.ops.last(), Some(MapOp::SetNodeConfig(_))), "{:?}", maps.ops.last());
    assert_eq!(maps.ops.iter().filter(|op| matches!(op, MapOp::SetNodeConfig(_))).count(), 1);

    let mut moved = node.clone();
    moved.snat_port_range.min += 1;
    let mut maps = FakeMaps::default();
    reconciler
        .reconcile(&without_endpoint(&model, "10.244.2.10"), &moved, &mut maps)
        .expect("second");
    assert!(maps.ops.len() > 1);
    assert!(matches!(maps.ops.first(), Some(MapOp::SetNodeConfig(_))), "{:?}", maps.ops.first());
}

#[test]
fn a_removed_endpoint_shrinks_its_frontends_and_forgets_their_flows() {
    let (model, node) = seed();
    let mut reconciler = Reconciler::new(DatapathState::default(), SlotMode::PerBackend);
    reconciler.reconcile(&model, &node, &mut FakeMaps::default()).expect("first");
    let before = reconciler.programmed().clone();
    let mut maps = FakeMaps::default();
    let report = reconciler
        .reconcile(&without_endpoint(&model, "10.244.2.10"), &node, &mut maps)
        .expect("second");
    let my_nginx = frontend(&before, "10.96.45.10", 80, scope::EXTERNAL);
    let after = frontend(reconciler.programmed(), "10.96.45.10", 80, scope::EXTERNAL);
    assert_eq!((after.service_id, after.slot_count), (my_nginx.service_id, 1), "same id, one slot");
    let gone: Vec<u32> = before
        .backends
        .iter()
        .filter(|(_, b)| b.ip_be == ip_be("10.244.2.10".parse().expect("address")))
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(gone.len(), 1);
    let pair = (my_nginx.service_id, gone[0]);
    assert!(report.forget.affinities.contains(&pair));
    assert!(report.forget.flows.is_empty(), "TCP flows may still finish: {:?}", report.forget);
    assert!(maps.ops.contains(&MapOp::RemoveBackend { id: gone[0] }));
    // Everything else is untouched: only my-nginx's frontend, slot and backend changed.
    let unrelated: BTreeMap<_, _> =
        before.services.iter().filter(|(_, v)| v.service_id != my_nginx.service_id).collect();
    for (key, value) in unrelated {
        assert_eq!(reconciler.programmed().services.get(key), Some(value));
    }
}

#[test]
fn maglev_mode_fills_a_prime_sized_table_with_every_backend() {
    let (model, node) = seed();
    let state = desired(&model, &node, SlotMode::Maglev(251), &mut Ids::default()).state;
    let value = frontend(&state, "10.96.45.11", 80, scope::EXTERNAL);
    assert_eq!(value.slot_count, 251);
    let used: std::collections::BTreeSet<u32> =
        slots_of(&state.slots, &value).map(|(_, slot)| slot.backend_id).collect();
    assert_eq!(used.len(), 3, "all three sticky backends own slots");
}

/// The seed programmed into maps of `capacities`, which it must just fit: the model, the node,
/// the reconciler and what it programmed.
fn seed_just_fitting(capacities: &Capacities) -> (Model, NodeConfig, Reconciler, DatapathState) {
    let (model, node) = seed();
    let mut reconciler =
        Reconciler::with_capacities(DatapathState::default(), SlotMode::PerBackend, capacities);
    let report = reconciler.reconcile(&model, &node, &mut FakeMaps::default()).expect("first");
    assert_eq!(report.problems, Vec::<String>::new(), "the seed just fits {capacities:?}");
    let before = reconciler.programmed().clone();
    (model, node, reconciler, before)
}

/// Maps with exactly the slots the seed needs.
fn seed_slots() -> Capacities {
    let room = u32::try_from(seed_state().slots.len()).expect("few slots");
    Capacities { backend_slots: Some(room), ..Capacities::default() }
}

/// Adds a third pod to my-nginx (10.96.45.10:80); its service.
fn add_third_my_nginx_pod(model: &mut Model) -> ServiceName {
    let port = model
        .ports
        .iter_mut()
        .find(|p| p.cluster_ip == Ipv4Addr::new(10, 96, 45, 10) && p.port == 80)
        .expect("my-nginx");
    let mut third = port.endpoints[0].clone();
    third.ip = Ipv4Addr::new(10, 244, 1, 99);
    port.endpoints.push(third);
    port.id.service()
}

#[test]
fn a_service_whose_new_table_finds_no_room_is_kept_as_it_was() {
    let (mut model, node, mut reconciler, before) = seed_just_fitting(&seed_slots());
    // A third my-nginx pod needs a fresh run of three slots, and the array is full.
    let my_nginx = add_third_my_nginx_pod(&mut model);
    let mut maps = FakeMaps::default();
    let ports_of = |service: &ServiceName| -> Vec<ServicePort> {
        model.ports.iter().filter(|p| p.id.service() == *service).cloned().collect()
    };
    let incremental = reconciler.reconcile_services([my_nginx], ports_of, &mut maps);
    let full = reconciler.reconcile(&model, &node, &mut maps);
    for report in [incremental.expect("service sync"), full.expect("full sync")] {
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("no room") && p.contains("kept as they were")),
            "{:?}",
            report.problems
        );
        assert!(report.forget.is_empty(), "{:?}", report.forget);
    }
    assert_eq!(reconciler.programmed(), &before, "every service as it was, my-nginx included");
}

#[test]
fn source_ranges_beyond_their_map_leave_their_frontend_out_and_every_other_service_in() {
    let seed_ranges = u32::try_from(seed_state().source_ranges.len()).expect("few ranges");
    assert!(seed_ranges > 0, "the seed has a LoadBalancer with ranges");
    let capacities = Capacities { source_ranges: Some(seed_ranges), ..Capacities::default() };
    let (mut model, node, mut reconciler, before) = seed_just_fitting(&capacities);

    // One range more for lb-web: its LoadBalancer frontend no longer fits.
    let lb_web = model.ports.iter_mut().find(|p| !p.source_ranges.is_empty()).expect("lb-web");
    lb_web.source_ranges.push("198.18.0.0/15".parse().expect("CIDR"));
    let service = lb_web.id.service();
    let ports_of = |name: &ServiceName| -> Vec<ServicePort> {
        model.ports.iter().filter(|p| p.id.service() == *name).cloned().collect()
    };
    let mut maps = FakeMaps::default();
    let lb_ip = key("198.51.100.10", 80, proto::TCP, scope::EXTERNAL);
    for full in [false, true] {
        let report = if full {
            reconciler.reconcile(&model, &node, &mut maps).expect("full sync")
        } else {
            reconciler.reconcile_services([service.clone()], ports_of, &mut maps).expect("sync")
        };
        assert!(
            report.problems.iter().any(|p| p.contains("198.51.100.10:80: no room for its 2")),
            "{:?}",
            report.problems
        );
        let programmed = reconciler.programmed();
        assert!(!programmed.services.contains_key(&lb_ip), "left out, not served unfiltered");
        assert!(programmed.source_ranges.len() <= seed_ranges as usize);
        for (key, value) in before.services.iter().filter(|(key, _)| **key != lb_ip) {
            if before.source_ranges.iter().all(|(id, _)| *id != value.service_id) {
                assert_eq!(programmed.services.get(key), Some(value), "{key:?} as it was");
            }
        }
    }

    // Room again (the map of a fresh datapath): the frontend comes back with both ranges.
    let mut roomy = Reconciler::with_capacities(
        reconciler.programmed().clone(),
        SlotMode::PerBackend,
        &Capacities::default(),
    );
    let report = roomy.reconcile(&model, &node, &mut FakeMaps::default()).expect("sync");
    assert_eq!(report.problems, Vec::<String>::new());
    let value = roomy.programmed().services[&lb_ip];
    let ranges = roomy.programmed().source_ranges.iter().filter(|(id, _)| *id == value.service_id);
    assert_eq!(ranges.count(), 2);
}

#[test]
fn after_a_restart_a_service_whose_new_table_finds_no_room_is_kept_as_it_was() {
    let capacities = seed_slots();
    let (mut model, node, _, before) = seed_just_fitting(&capacities);
    add_third_my_nginx_pod(&mut model);
    // A restarted daemon (or one whose sync failed) knows only what the maps hold.
    let mut adopted =
        Reconciler::with_capacities(before.clone(), SlotMode::PerBackend, &capacities);
    let report = adopted.reconcile(&model, &node, &mut FakeMaps::default()).expect("sync");
    assert!(
        report.problems.iter().any(|p| p.contains("no room") && p.contains("kept as they were")),
        "{:?}",
        report.problems
    );
    assert!(report.forget.is_empty(), "{:?}", report.forget);
    assert_eq!(adopted.programmed(), &before, "every service as it was, my-nginx included");

    // Slots that name none of the port's endpoints are not its own: another service's, whose
    // address it took while no daemon ran.
    let port = model.ports.iter_mut().find(|p| p.endpoints.len() == 3).expect("my-nginx");
    for (endpoint, host) in port.endpoints.iter_mut().zip(200..) {
        endpoint.ip = Ipv4Addr::new(10, 244, 9, host);
    }
    let mut adopted =
        Reconciler::with_capacities(before.clone(), SlotMode::PerBackend, &capacities);
    let report = adopted.reconcile(&model, &node, &mut FakeMaps::default()).expect("sync");
    assert!(report.problems.iter().any(|p| p.contains("no room")), "{:?}", report.problems);
    let my_nginx = key("10.96.45.10", 80, proto::TCP, scope::EXTERNAL);
    assert!(!adopted.programmed().services.contains_key(&my_nginx), "not kept");
}

#[test]
fn frontends_and_markers_never_outgrow_the_services_map() {
    let entries = u32::try_from(seed_state().services.len()).expect("few entries");
    let capacities = Capacities { services: Some(entries), ..Capacities::default() };
    let (mut model, node, mut reconciler, before) = seed_just_fitting(&capacities);

    // A new ClusterIP service: its marker and its frontend find no room.
    let mut extra = model.ports.iter().find(|p| p.node_port.is_none()).expect("a port").clone();
    extra.id.name = "zz-extra".to_owned();
    extra.cluster_ip = Ipv4Addr::new(10, 96, 45, 250);
    model.ports.push(extra);
    let report =
        reconciler.reconcile(&model, &node, &mut FakeMaps::default()).expect("second sync");
    assert!(
        report.problems.iter().any(|p| p.contains("no room in SERVICES for 10.96.45.250")),
        "{:?}",
        report.problems
    );
    assert!(report.problems.iter().any(|p| p.contains("no room in SERVICES, left for")));
    assert_eq!(reconciler.programmed(), &before, "every other service as it was");
}

#[test]
fn a_frontends_dropped_ranges_go_before_its_new_ones_come() {
    let (model, node) = seed();
    let mut reconciler = Reconciler::new(DatapathState::default(), SlotMode::PerBackend);
    reconciler.reconcile(&model, &node, &mut FakeMaps::default()).expect("first sync");
    let mut changed = model.clone();
    let lb_web = changed.ports.iter_mut().find(|p| !p.source_ranges.is_empty()).expect("lb-web");
    lb_web.source_ranges = vec!["198.18.0.0/15".parse().expect("CIDR")];
    let mut maps = FakeMaps::default();
    reconciler.reconcile(&changed, &node, &mut maps).expect("second sync");
    let position = |wanted: fn(&MapOp) -> bool| maps.ops.iter().position(wanted);
    let removed = position(|op| matches!(op, MapOp::RemoveSourceRange { .. })).expect("removed");
    let added = position(|op| matches!(op, MapOp::AddSourceRange { .. })).expect("added");
    // The map never holds both sets, which the reconciler does not count on.
    assert!(removed < added, "{:?}", maps.ops);
}

#[test]
fn a_service_whose_new_endpoint_finds_no_backend_id_keeps_its_slots() {
    let ids = u32::try_from(seed_state().backends.len()).expect("few backends");
    // Id 0 is no backend: room for exactly the seed's backends.
    let capacities = Capacities { backends: Some(ids + 1), ..Capacities::default() };
    let (mut model, node, mut reconciler, before) = seed_just_fitting(&capacities);
    add_third_my_nginx_pod(&mut model);
    let report =
        reconciler.reconcile(&model, &node, &mut FakeMaps::default()).expect("second sync");
    assert!(
        report.problems.iter().any(|p| p.contains("no backend id") && p.contains("kept")),
        "{:?}",
        report.problems
    );
    assert_eq!(reconciler.programmed(), &before, "my-nginx as it was");
}

#[test]
fn in_a_full_array_kept_slots_take_the_new_settings_but_never_name_a_twin_that_is_gone() {
    let (mut model, node, mut reconciler, before) = seed_just_fitting(&seed_slots());

    // Local to Cluster: the external frontends need every endpoint, and there is no room.
    let local: Vec<ServiceName> = model
        .ports
        .iter_mut()
        .filter(|p| p.external_policy_local)
        .map(|p| {
            p.external_policy_local = false;
            p.id.service()
        })
        .collect();
    assert!(!local.is_empty(), "the seed has externalTrafficPolicy Local");
    let mut maps = FakeMaps::default();
    let report = reconciler.reconcile(&model, &node, &mut maps).expect("second sync");
    assert!(
        report.problems.iter().any(|p| p.contains("kept as they were")),
        "{:?}",
        report.problems
    );
    assert_safely_ordered(&before, &maps.ops);
    let after = reconciler.programmed();
    for (key, value) in &after.services {
        assert_eq!(value.flags & flag::TWO_SCOPES, 0, "{key:?}: no twin is built any longer");
        if let Some(old) = before.services.get(key).filter(|old| old.flags & flag::EXT_LOCAL != 0) {
            // Still only the local endpoints in its slots: still not masqueraded.
            assert_eq!(value.flags & flag::EXT_LOCAL, flag::EXT_LOCAL, "{key:?}");
            assert_eq!((value.slot_base, value.slot_count), (old.slot_base, old.slot_count));
        }
    }
}

#[test]
fn a_full_array_keeps_no_frontend_for_a_service_port_that_takes_it_from_another() {
    let (mut model, node, mut reconciler, before) = seed_just_fitting(&seed_slots());
    // The first service port in id order claims ext-web's external IP and port, which it
    // would take over, with tables there is no room for.
    let ext_web = model.ports.iter().find(|p| !p.external_ips.is_empty()).expect("ext-web");
    let (taken, taken_port, owner) = (ext_web.external_ips[0], ext_web.port, ext_web.id.clone());
    let first = &mut model.ports[0];
    assert!(first.id < owner, "{} sorts first", first.id);
    first.id.protocol = Protocol::Tcp;
    first.port = taken_port;
    first.external_ips.push(taken);
    let report = reconciler.reconcile(&model, &node, &mut FakeMaps::default()).expect("sync");
    let frontend = key(&taken.to_string(), taken_port, proto::TCP, scope::EXTERNAL);
    assert_eq!(
        reconciler.programmed().services.get(&frontend),
        before.services.get(&frontend),
        "still ext-web's: {:?}",
        report.problems
    );
    let lost = report.problems.iter().any(|p| p.starts_with(&owner.to_string()));
    assert!(!lost, "ext-web keeps its frontend: {:?}", report.problems);
}

#[test]
fn a_frontend_names_its_internal_twin_only_when_the_twin_fits() {
    let (model, node) = seed();
    let all = u32::try_from(seed_state().slots.len()).expect("few slots");
    let mut twins_left_out = 0;
    for room in 1..=all {
        let capacities = Capacities { backend_slots: Some(room), ..Capacities::default() };
        let mut reconciler = Reconciler::with_capacities(
            DatapathState::default(),
            SlotMode::PerBackend,
            &capacities,
        );
        reconciler.reconcile(&model, &node, &mut FakeMaps::default()).expect("reconcile");
        let services = &reconciler.programmed().services;
        for (key, value) in services {
            let twin = ServiceKey { scope: scope::INTERNAL, ..*key };
            let local = value.flags & flag::EXT_LOCAL != 0 && key.scope == scope::EXTERNAL;
            let named = value.flags & flag::TWO_SCOPES != 0;
            assert_eq!(named, local && services.contains_key(&twin), "room {room}: {key:?}");
            twins_left_out += usize::from(local && !named);
        }
    }
    assert!(twins_left_out > 0, "some room leaves a twin out");
}

#[test]
fn a_full_slot_array_leaves_out_what_does_not_fit_says_so_and_keeps_the_rest() {
    let (model, node) = seed();
    let all = seed_state();
    let room = u32::try_from(all.slots.len()).expect("few slots") - 1;
    let capacities = Capacities { backend_slots: Some(room), ..Capacities::default() };
    let mut reconciler =
        Reconciler::with_capacities(DatapathState::default(), SlotMode::PerBackend, &capacities);
    let report = reconciler.reconcile(&model, &node, &mut FakeMaps::default()).expect("reconcile");
    let left_out: Vec<&String> =
        report.problems.iter().filter(|p| p.contains("no room left in the slot array")).collect();
    assert!(!left_out.is_empty(), "{:?}", report.problems);
    let programmed = reconciler.programmed();
    let frontends =
        |state: &DatapathState| state.services.values().filter(|v| v.service_id != 0).count();
    assert_eq!(frontends(programmed), frontends(&all) - left_out.len(), "only those left out");
    for value in programmed.services.values() {
        assert_eq!(slots_of(&programmed.slots, value).count(), value.slot_count as usize);
        assert!(run_of(value).end <= room, "{value:?} within the array");
    }
}

/// The Maglev table size of the tests below: small, so that tables are quick to build.
const MAGLEV_SIZE: u32 = 251;

/// The frontends that have slots, with their entries.
fn frontends_with_slots(state: &DatapathState) -> BTreeMap<ServiceKey, ServiceValue> {
    state.services.iter().filter(|(_, v)| v.slot_count > 0).map(|(k, v)| (*k, *v)).collect()
}

/// The backends (address, port) a frontend's slots name, once each.
fn backends_in_slots(
    state: &DatapathState,
    value: &ServiceValue,
) -> std::collections::BTreeSet<(u32, u16)> {
    slots_of(&state.slots, value)
        .map(|(_, slot)| (slot.backend.ip_be, slot.backend.port_be))
        .collect()
}

#[test]
fn maglev_tables_that_find_no_room_give_way_to_one_slot_per_backend() {
    let (model, node) = seed();
    let per_backend = frontends_with_slots(&seed_state());
    // Room for two tables, and for everything else at one slot per backend.
    let room = 2 * MAGLEV_SIZE + u32::try_from(seed_state().slots.len()).expect("few slots");
    let capacities = Capacities { backend_slots: Some(room), ..Capacities::default() };
    let mut reconciler = Reconciler::with_capacities(
        DatapathState::default(),
        SlotMode::Maglev(MAGLEV_SIZE),
        &capacities,
    );
    let report = reconciler.reconcile(&model, &node, &mut FakeMaps::default()).expect("reconcile");
    let programmed = reconciler.programmed();
    let with_slots = frontends_with_slots(programmed);
    assert_eq!(
        with_slots.keys().collect::<Vec<_>>(),
        per_backend.keys().collect::<Vec<_>>(),
        "every frontend with endpoints is served: {:?}",
        report.problems
    );
    let maglev = with_slots.values().filter(|v| v.slot_count == MAGLEV_SIZE).count();
    assert_eq!(maglev, 2, "two tables fit");
    for (key, value) in with_slots.iter().filter(|(_, v)| v.slot_count != MAGLEV_SIZE) {
        let plain = per_backend[key];
        assert_eq!(value.slot_count, plain.slot_count, "{key:?}: one slot per backend");
        assert_eq!(backends_in_slots(programmed, value), backends_in_slots(&seed_state(), &plain));
    }
    let gave_way: Vec<&String> =
        report.problems.iter().filter(|p| p.contains("served by a flow hash")).collect();
    assert_eq!(gave_way.len(), with_slots.len() - 2, "{:?}", report.problems);
    assert!(gave_way.iter().all(|p| p.contains("no room left in the slot array")), "{gave_way:?}");
}

#[test]
fn a_changed_maglev_table_without_room_for_its_new_run_serves_the_new_endpoints() {
    let (mut model, node) = seed();
    let tables = u32::try_from(frontends_with_slots(&seed_state()).len()).expect("few");
    // Every table fits, and the slots of one frontend of three backends beside them.
    let capacities =
        Capacities { backend_slots: Some(tables * MAGLEV_SIZE + 3), ..Capacities::default() };
    let mut reconciler = Reconciler::with_capacities(
        DatapathState::default(),
        SlotMode::Maglev(MAGLEV_SIZE),
        &capacities,
    );
    let first = reconciler.reconcile(&model, &node, &mut FakeMaps::default()).expect("first");
    assert_eq!(first.problems, Vec::<String>::new(), "every table fits");
    let my_nginx = key("10.96.45.10", 80, proto::TCP, scope::EXTERNAL);
    assert_eq!(reconciler.programmed().services[&my_nginx].slot_count, MAGLEV_SIZE);

    add_third_my_nginx_pod(&mut model);
    let report = reconciler.reconcile(&model, &node, &mut FakeMaps::default()).expect("second");
    let programmed = reconciler.programmed();
    let value = programmed.services[&my_nginx];
    assert_eq!(value.slot_count, 3, "one slot per backend: {:?}", report.problems);
    let third = (ip_be(Ipv4Addr::new(10, 244, 1, 99)), 80u16.to_be());
    let named = backends_in_slots(programmed, &value);
    assert!(named.contains(&third) && named.len() == 3, "the three pods of now: {named:?}");
    assert!(
        report.problems.iter().any(|p| p.contains("10.96.45.10:80") && p.contains("flow hash")),
        "{:?}",
        report.problems
    );
}
