//! A daemon adopting a datapath that another version attached: every pinned program whose code
//! differs from this binary's is replaced on its attachments in place, programs with the same
//! code are left alone, the maps stay, and connections established before the upgrade keep
//! their backends. The older version is played by stand-in programs (pass everything) put on
//! the pinned XDP and tc attachments while no daemon runs; a program it did not have is pinned.
//! Its maps, played too: no `FRAGMENTS` and `REFUSAL_BUDGET` maps, and verdict counters for
//! fewer reasons, which move to a map with a slot per reason, their counts kept.
//!
//! A restart with other map capacities resizes the pinned maps the same way: every program moves
//! to new maps filled from the old ones, and the flows carry on.

use std::{collections::BTreeMap, net::SocketAddr};

use aya::{
    maps::{Map, MapData, MapInfo, PerCpuArray},
    programs::ProgramInfo,
};
use lb_common::{
    maps::{RefusalBudget, names, refusal_budget},
    stats::Reason,
};
use lb_tests::{
    daemon::{
        RunningDaemon, counter, default_targets, example_node_config, examples, scrape_metrics,
    },
    netns::Netns,
    pins::TestPins,
    stand_in,
    topology::{EXTERNAL_IFACE, NODE_IP, Topology, exchange, long_lived, tcp_request},
};
use lb_user::{
    attach,
    config::DEFAULT_REFUSAL_LIMIT,
    loader,
    maps::copy::move_pin,
    pins::{NetlinkTcRecord, PinLayout, TcRole, program_of_link},
    program_names, status, upgrade,
};

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("socket address")
}

/// (program id, tag) of every pinned program.
fn pinned(pins: &PinLayout) -> BTreeMap<&'static str, (u32, u64)> {
    program_names::ALL
        .into_iter()
        .map(|name| {
            let info = ProgramInfo::from_pin(pins.program(name)).expect("a pinned program");
            (name, (info.id(), info.tag()))
        })
        .collect()
}

/// The tags of this binary's programs, loaded privately.
fn own_tags() -> BTreeMap<&'static str, u64> {
    let ebpf = loader::load_private().expect("loading the programs");
    program_names::ALL
        .into_iter()
        .map(|name| (name, ebpf.program(name).expect("program").info().expect("info").tag()))
        .collect()
}

#[test]
fn an_upgrade_replaces_outdated_programs_in_place_and_established_flows_keep_their_backends() {
    let topology = Topology::new("lbu");
    let _servers = topology.start_servers();
    let pins = TestPins::new();
    let manifests = examples().join("manifests");
    let daemon = RunningDaemon::start(&topology, &pins, &manifests, None);
    let client_pod = &topology.pod("client").netns;
    // East-west through the pod's tc program, north-south through the external XDP program.
    let mut east_west = long_lived(client_pod, addr("10.96.45.10:80"));
    let mut north_south = long_lived(&topology.client, addr(&format!("{NODE_IP}:30380")));
    let backends = (exchange(&mut east_west), exchange(&mut north_south));
    daemon.stop();

    let own = own_tags();
    // cls_bpf filters (kernels without tcx) are found by interface name, in the node's namespace.
    let layout = pins.layout().clone();
    topology.node.enter(move || stand_in::put_on_attachments(&layout));
    let older = pinned(pins.layout());
    for name in [program_names::XDP, program_names::TC] {
        assert_ne!(older[name].1, own[name], "{name}: the stand-in's code differs");
    }

    // Programs the older version did not have: a host-path one (the host path is not attached
    // here), the replies' program, with its egress attachments, and the collector's reaper.
    let missing = [program_names::GETPEERNAME4, program_names::TC_REPLY, program_names::REAP];
    let layout = pins.layout().clone();
    topology.node.enter(move || without_reply_attachments(&layout));
    for name in missing {
        std::fs::remove_file(pins.layout().program(name)).expect("unpin a program");
    }

    let daemon = RunningDaemon::start(&topology, &pins, &manifests, None);
    let upgraded = pinned(pins.layout());
    for name in program_names::ALL {
        assert_eq!(upgraded[name].1, own[name], "{name} runs this binary's code");
        let replaced = upgraded[name].0 != older[name].0;
        let outdated = older[name].1 != own[name] || missing.contains(&name);
        assert_eq!(
            replaced, outdated,
            "{name}: new exactly when its code differed or it was missing"
        );
    }
    assert_eq!(
        (exchange(&mut east_west), exchange(&mut north_south)),
        backends,
        "connections from before the upgrade keep their backends"
    );
    let answer = tcp_request(client_pod, addr("10.96.45.10:80")).expect("a new connection");
    assert!(answer.starts_with("hello from my-nginx-"), "{answer}");
    // The daemon attached the replies' program where it belongs: every interface's egress.
    let attachments = status::read(pins.layout()).expect("status").attachments;
    let on_egress: Vec<_> = attachments
        .iter()
        .filter(|a| a.program == program_names::TC_REPLY)
        .map(|a| a.target.clone())
        .collect();
    let mut every_iface = topology.pod_ifaces();
    every_iface.push(EXTERNAL_IFACE.to_owned());
    every_iface.sort();
    assert_eq!(on_egress, every_iface, "lb_tc_reply on every interface: {attachments:?}");
    daemon.stop();

    // The same version again replaces nothing.
    let daemon = RunningDaemon::start(&topology, &pins, &manifests, None);
    assert_eq!(pinned(pins.layout()), upgraded, "a restart of the same version keeps its programs");
    assert_eq!(exchange(&mut east_west), backends.0, "after a restart of the same version");
    daemon.stop();

    // An older version's maps: every program moves to the new ones, as in a resize, even
    // those whose code is the same, which would otherwise count into the old map for good.
    let counted_before = (Reason::ForwardNew, 1_000_000);
    stand_in::put_older_maps(pins.layout(), Reason::COUNT - 2, counted_before);
    let daemon = RunningDaemon::start(&topology, &pins, &manifests, None);
    let entries = |name| MapInfo::from_pin(pins.layout().map(name)).expect(name).max_entries();
    assert_eq!(entries(names::STATS), Reason::COUNT, "verdict counters for every reason");
    assert_eq!(entries(names::FRAGMENTS), lb_common::maps::capacity::FRAGMENTS);
    assert_eq!(
        refusal_budgets(pins.layout()),
        [DEFAULT_REFUSAL_LIMIT.budget()],
        "every CPU's, each side's"
    );
    assert!(!pins.layout().map_set_aside(names::STATS).exists(), "the old counters are gone");
    let moved = pinned(pins.layout());
    for name in program_names::ALL {
        assert_ne!(moved[name].0, upgraded[name].0, "{name} moved to the new maps");
    }
    let counted = lb_user::stats::read_pinned(pins.layout()).expect("the verdict counters");
    assert!(counted.get(counted_before.0) >= counted_before.1, "counts kept: {counted:?}");
    assert_eq!(exchange(&mut east_west), backends.0, "after the verdict counters moved");
    drop(daemon);
}

/// The distinct budgets of the CPUs and sides in the pinned `REFUSAL_BUDGET`.
fn refusal_budgets(pins: &PinLayout) -> Vec<RefusalBudget> {
    let data = MapData::from_pin(pins.map(names::REFUSAL_BUDGET)).expect("REFUSAL_BUDGET");
    let array: PerCpuArray<_, RefusalBudget> =
        PerCpuArray::try_from(Map::PerCpuArray(data)).expect("a per-CPU array");
    assert_eq!(array.len(), refusal_budget::COUNT, "a budget per side");
    let mut budgets: Vec<_> =
        (0..array.len()).flat_map(|side| array.get(&side, 0).expect("an entry").to_vec()).collect();
    budgets.dedup();
    budgets
}

/// Detaches and unpins the replies' program's attachments, as a datapath pinned by a version
/// without it has none.
fn without_reply_attachments(layout: &PinLayout) {
    let names: Vec<String> = std::fs::read_dir(layout.links_dir())
        .expect("links dir")
        .map(|entry| entry.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    for name in names {
        let replies = program_of_link(&name) == Some(program_names::TC_REPLY)
            || NetlinkTcRecord::parse(&name).is_some_and(|record| record.role == TcRole::Replies);
        if replies {
            attach::detach_pinned(layout, &name).expect("detach an egress attachment");
        }
    }
}

/// The maps whose size the node configuration chooses.
const SIZED_MAPS: [&str; 7] = [
    names::SERVICES,
    names::SERVICE_STATS,
    names::BACKENDS,
    names::BACKEND_SLOTS,
    names::CONNTRACK,
    names::AFFINITY,
    names::FRAGMENTS,
];

/// (map id, entries) of every map whose size can be chosen, as pinned.
fn sized_maps(pins: &PinLayout) -> BTreeMap<&'static str, (u32, u32)> {
    SIZED_MAPS
        .into_iter()
        .map(|name| {
            let info = MapInfo::from_pin(pins.map(name)).expect("a pinned map");
            (name, (info.id(), info.max_entries()))
        })
        .collect()
}

/// Packets counted for the my-nginx ClusterIP frontend.
fn my_nginx_packets(pins: &PinLayout) -> u64 {
    let status = status::read(pins).expect("status");
    let frontend = status.frontends.iter().find(|f| f.address == "10.96.45.10:80");
    frontend.expect("the my-nginx frontend").packets
}

#[test]
fn a_restart_with_other_map_capacities_resizes_the_maps_and_established_flows_keep_their_backends()
{
    let topology = Topology::new("lbz");
    let _servers = topology.start_servers();
    let pins = TestPins::new();
    let manifests = examples().join("manifests");
    let start = |node_config| {
        let targets = default_targets(&topology, None);
        RunningDaemon::start_with(&topology, &pins, &manifests, targets, node_config)
    };
    let daemon = start(example_node_config());
    let client_pod = &topology.pod("client").netns;
    let mut east_west = long_lived(client_pod, addr("10.96.45.10:80"));
    let mut north_south = long_lived(&topology.client, addr(&format!("{NODE_IP}:30380")));
    let backends = (exchange(&mut east_west), exchange(&mut north_south));
    // A ClientIP-affinity service: the client's backend is in the affinity map.
    let sticky = addr("10.96.45.11:80");
    let chosen = tcp_request(client_pod, sticky).expect("a request to the sticky service");
    daemon.stop();
    let (programs, maps) = (pinned(pins.layout()), sized_maps(pins.layout()));
    let packets = my_nginx_packets(pins.layout());

    // Larger programmed maps, a larger affinity map and a smaller conntrack map.
    let capacities = loader::Capacities {
        services: Some(maps[names::SERVICES].1 + 4_096),
        backends: Some(maps[names::BACKENDS].1 + 4_096),
        backend_slots: Some(maps[names::BACKEND_SLOTS].1 + 65_536),
        conntrack: Some(maps[names::CONNTRACK].1 / 16),
        affinity: Some(maps[names::AFFINITY].1 + 4_096),
        fragments: Some(maps[names::FRAGMENTS].1 / 2),
        source_ranges: None,
    };
    let daemon = start(example_node_config_with(capacities));
    let resized = sized_maps(pins.layout());
    for name in SIZED_MAPS {
        assert_ne!(resized[name].0, maps[name].0, "{name} is a new map");
        assert_eq!(Some(resized[name].1), capacities.of(name), "{name} has the configured size");
        let aside = pins.layout().map_set_aside(name);
        assert!(!aside.exists(), "{} is gone once the move is done", aside.display());
    }
    assert_eq!(my_nginx_packets(pins.layout()), packets, "the frontend's counters carried over");
    let metrics = scrape_metrics(&topology.node).expect("the daemon's metrics");
    let series = format!("lb_map_capacity_entries{{map=\"{}\"}}", names::CONNTRACK);
    assert_eq!(counter(&metrics, &series), capacities.conntrack.map(u64::from), "{metrics}");
    let relinked = pinned(pins.layout());
    for name in program_names::ALL {
        assert_ne!(relinked[name].0, programs[name].0, "{name} moved to the new maps");
        assert_eq!(relinked[name].1, programs[name].1, "{name}: the same code");
    }
    assert_eq!(
        (exchange(&mut east_west), exchange(&mut north_south)),
        backends,
        "connections from before the resize keep their backends"
    );
    assert!(my_nginx_packets(pins.layout()) > packets, "the counters go on counting");
    let answer = tcp_request(client_pod, addr("10.96.45.10:80")).expect("a new connection");
    assert!(answer.starts_with("hello from my-nginx-"), "{answer}");
    for _ in 0..5 {
        let again = tcp_request(client_pod, sticky).expect("a request to the sticky service");
        assert_eq!(again, chosen, "the client's affinity carried over");
    }
    daemon.stop();

    // A daemon stopped right after moving a map aside; and a smaller services capacity, which
    // the programmed maps do not take.
    let (aside, pinned_conntrack) =
        (pins.layout().map_set_aside(names::CONNTRACK), pins.layout().map(names::CONNTRACK));
    move_pin(names::CONNTRACK, &pinned_conntrack, &aside).expect("move the conntrack map aside");
    let daemon =
        start(example_node_config_with(loader::Capacities { services: Some(1_024), ..capacities }));
    assert_eq!(sized_maps(pins.layout()), resized, "every map kept, at its pinned size");
    assert_eq!(pinned(pins.layout()), relinked, "no program moved");
    assert_eq!(exchange(&mut east_west), backends.0, "after the interrupted move");
    daemon.stop();

    // A daemon stopped after pinning a new, still empty conntrack map in place of the one
    // the programs use, moved aside, before any program used it: the next one puts the old
    // map back, and with the size unchanged, that is all.
    let conntrack_id = |pins: &TestPins| sized_maps(pins.layout())[names::CONNTRACK].0;
    let old_conntrack = conntrack_id(&pins);
    drop(interrupted_move(&pins));
    let daemon = start(example_node_config_with(capacities));
    assert!(!aside.exists(), "the interrupted move is undone");
    assert_eq!(conntrack_id(&pins), old_conntrack, "the old conntrack map is back");
    assert_eq!(pinned(pins.layout()), relinked, "no program moved");
    assert_eq!(exchange(&mut east_west), backends.0, "after the undone move");
    daemon.stop();

    let connections = Connections { east_west, north_south, backends };
    let start_resized = || start(example_node_config_with(capacities));
    moves_in_use_are_finished((&topology.node, &pins), &start_resized, connections);
}

/// The long-lived connections of a test, and the backends they reached.
struct Connections {
    east_west: std::net::TcpStream,
    north_south: std::net::TcpStream,
    backends: (String, String),
}

/// A daemon stopped part way through a resize, once a program used the new map (pinned, or
/// on the links only): the next one (`start`) fills it from what the old one holds and moves
/// every program onto it.
fn moves_in_use_are_finished(
    (node, pins): (&Netns, &TestPins),
    start: &dyn Fn() -> RunningDaemon,
    mut connections: Connections,
) {
    let Connections { east_west, north_south, backends } = &mut connections;
    let conntrack_id = |pins: &TestPins| sized_maps(pins.layout())[names::CONNTRACK].0;
    let aside = pins.layout().map_set_aside(names::CONNTRACK);
    let relinked = pinned(pins.layout());

    // Pinned: a program that uses the new map.
    let mut fresh = interrupted_move(pins);
    let new_conntrack = conntrack_id(pins);
    let tc_pin = pins.layout().program(program_names::TC);
    std::fs::remove_file(&tc_pin).expect("unpin a program");
    let program = fresh.program_mut(program_names::TC).expect("the tc program");
    program.pin(&tc_pin).expect("pin one that uses the new map");
    drop(fresh);
    let daemon = start();
    assert!(!aside.exists(), "the interrupted move is finished");
    assert_eq!(conntrack_id(pins), new_conntrack, "the new conntrack map stays");
    let finished = pinned(pins.layout());
    for name in program_names::ALL {
        assert_ne!(finished[name].0, relinked[name].0, "{name} moved to the new map");
    }
    assert_eq!(
        (exchange(east_west), exchange(north_south)),
        *backends,
        "connections keep their backends through the finished move"
    );
    daemon.stop();

    // Stopped while relinking: a program on the new map runs on the links, its pin not yet
    // written. The move is finished too, not undone under the links that use the new map.
    let mut fresh = interrupted_move(pins);
    let new_conntrack = conntrack_id(pins);
    let saved = tc_pin.with_file_name("lb_tc-saved");
    std::fs::rename(&tc_pin, &saved).expect("keep the pinned program aside");
    let program = fresh.program_mut(program_names::TC).expect("the tc program");
    // In the node's namespace, where the daemon runs: a cls_bpf filter (kernels before tcx)
    // is replaced by netlink on its interface there.
    let relinked_links =
        node.enter(|| upgrade::relink(program, program_names::TC, pins.layout())).expect("relink");
    assert!(relinked_links > 0, "the tc program has links");
    std::fs::remove_file(&tc_pin).expect("unpin the new program");
    std::fs::rename(&saved, &tc_pin).expect("the old program's pin back");
    drop(fresh);
    let daemon = start();
    assert!(!aside.exists(), "the interrupted move is finished");
    assert_eq!(conntrack_id(pins), new_conntrack, "the new conntrack map stays");
    assert_eq!(
        (exchange(east_west), exchange(north_south)),
        *backends,
        "connections keep their backends through the move finished after a relink"
    );
    drop(daemon);
}

/// What a daemon stopped in the middle of a resize leaves: the conntrack map pinned aside and
/// a new, empty one (of the programs returned, not used by any pinned program) in its place.
fn interrupted_move(pins: &TestPins) -> aya::Ebpf {
    let (pinned, aside) =
        (pins.layout().map(names::CONNTRACK), pins.layout().map_set_aside(names::CONNTRACK));
    move_pin(names::CONNTRACK, &pinned, &aside).expect("move the conntrack map aside");
    let fresh = loader::load_private().expect("loading the programs");
    let empty = fresh.map(names::CONNTRACK).expect("a conntrack map");
    empty.pin(&pinned).expect("pin an empty conntrack map in its place");
    fresh
}

fn example_node_config_with(capacities: loader::Capacities) -> lb_user::config::NodeConfig {
    let mut node_config = example_node_config();
    node_config.map_capacities = capacities;
    node_config
}
