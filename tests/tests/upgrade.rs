//! A daemon adopting a datapath that another version attached: every pinned program whose code
//! differs from this binary's is replaced on its attachments in place, programs with the same
//! code are left alone, the maps stay, and connections established before the upgrade keep
//! their backends. The older version is played by stand-in programs (pass everything) put on
//! the pinned XDP and tc attachments while no daemon runs; a program it did not have is pinned.

use std::{collections::BTreeMap, net::SocketAddr};

use aya::programs::ProgramInfo;
use lb_tests::{
    daemon::{RunningDaemon, examples},
    pins::TestPins,
    stand_in,
    topology::{NODE_IP, Topology, exchange, long_lived, tcp_request},
};
use lb_user::{loader, pins::PinLayout, program_names};

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

    // A program the older version did not have (the host path is not attached here).
    let missing = program_names::GETPEERNAME4;
    std::fs::remove_file(pins.layout().program(missing)).expect("unpin a host program");

    let daemon = RunningDaemon::start(&topology, &pins, &manifests, None);
    let upgraded = pinned(pins.layout());
    for name in program_names::ALL {
        assert_eq!(upgraded[name].1, own[name], "{name} runs this binary's code");
        let replaced = upgraded[name].0 != older[name].0;
        let outdated = older[name].1 != own[name] || name == missing;
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
    daemon.stop();

    // The same version again replaces nothing.
    let daemon = RunningDaemon::start(&topology, &pins, &manifests, None);
    assert_eq!(pinned(pins.layout()), upgraded, "a restart of the same version keeps its programs");
    assert_eq!(exchange(&mut east_west), backends.0, "after a restart of the same version");
    drop(daemon);
}
