//! `load` attaches and pins in a throwaway namespace, counts real packets, refuses a second load
//! and an unknown interface cleanly; `unload` leaves nothing attached and nothing pinned.

use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use aya::programs::{SchedClassifier, TcAttachType};
use lb_common::{maps::names, stats::Reason};
use lb_tests::{
    netns::{Netns, run},
    pins::TestPins,
    stand_in,
};
use lb_user::{
    attach::{self, AttachMode, Attachment, Targets},
    error::Error,
    loader::{self, Capacities},
    program_names, stats,
};

/// A node namespace holding `lb0` (XDP and tc attach here) and a peer namespace holding its
/// veth peer `peer0`. Addresses exist only inside the two namespaces; neither has a default route.
struct Topology {
    node: Netns,
    peer: Netns,
}

const NODE_ADDR: &str = "10.77.0.1";
const PEER_ADDR: &str = "10.77.0.2";

impl Topology {
    fn new() -> Self {
        let node = Netns::new("lbt-node");
        let peer = Netns::new("lbt-peer");
        node.ip(&[
            "link",
            "add",
            "lb0",
            "type",
            "veth",
            "peer",
            "name",
            "peer0",
            "netns",
            peer.name(),
        ]);
        node.ip(&["addr", "add", &format!("{NODE_ADDR}/24"), "dev", "lb0"]);
        node.ip(&["link", "set", "lb0", "up"]);
        peer.ip(&["addr", "add", &format!("{PEER_ADDR}/24"), "dev", "peer0"]);
        peer.ip(&["link", "set", "peer0", "up"]);
        Self { node, peer }
    }

    /// Sends `count` UDP datagrams from the peer to the node across the veth pair.
    fn send_udp_to_node(&self, count: usize) {
        self.peer.enter(|| {
            let socket = UdpSocket::bind((PEER_ADDR, 0)).expect("bind in the peer namespace");
            let node: SocketAddr = format!("{NODE_ADDR}:9").parse().expect("address");
            for _ in 0..count {
                socket.send_to(b"ping", node).expect("send across the veth");
            }
        });
    }
}

fn load(topology: &Topology, pins: &TestPins) -> Result<Vec<Attachment>, Error> {
    let targets = Targets {
        xdp_ifaces: vec!["lb0".into()],
        tc_ifaces: vec!["lb0".into()],
        host_cgroup: None,
    };
    topology.node.enter(|| attach::load_and_attach(pins.layout(), &targets, &Capacities::default()))
}

fn tcx_ingress_ids(netns: &Netns, iface: &'static str) -> Vec<u32> {
    netns.enter(|| {
        let c_iface = std::ffi::CString::new(iface).expect("name");
        let (_, programs) = SchedClassifier::query_tcx(c_iface.as_c_str(), TcAttachType::Ingress)
            .expect("query tcx");
        programs.iter().map(aya::programs::ProgramInfo::id).collect()
    })
}

fn program_exists(id: u32) -> bool {
    std::process::Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .expect("bpftool")
        .status
        .success()
}

#[test]
fn load_attaches_pins_and_counts_then_unload_removes_everything() {
    let topology = Topology::new();
    let pins = TestPins::new();
    let attachments = load(&topology, &pins).expect("load");

    let [xdp, tc, replies] = attachments.as_slice() else {
        panic!("three attachments: {attachments:?}")
    };
    assert_eq!(
        (xdp.iface.as_str(), xdp.mode),
        ("lb0", AttachMode::XdpDriver),
        "veth supports driver-mode XDP"
    );
    assert!(matches!(tc.mode, AttachMode::Tcx | AttachMode::ClsBpf), "{tc:?}");
    assert_eq!((replies.iface.as_str(), replies.program), ("lb0", program_names::TC_REPLY));
    assert!(
        matches!(replies.mode, AttachMode::TcxEgress | AttachMode::ClsBpfEgress),
        "{replies:?}"
    );

    let link = topology.node.ip(&["-d", "link", "show", "dev", "lb0"]);
    assert!(link.contains(&format!("prog/xdp id {}", xdp.program_id)), "XDP on the link: {link}");
    if tc.mode == AttachMode::Tcx {
        assert_eq!(tcx_ingress_ids(&topology.node, "lb0"), vec![tc.program_id]);
    } else {
        let filters = topology.node_tc_filters();
        assert!(filters.contains("lb_tc"), "cls_bpf filter: {filters}");
    }
    let layout = pins.layout();
    for path in [
        layout.program("lb_xdp"),
        layout.program("lb_tc"),
        layout.map("STATS"),
        layout.link("xdp", "lb0"),
    ] {
        assert!(path.exists(), "{} pinned", path.display());
    }
    assert!(program_exists(xdp.program_id) && program_exists(tc.program_id));

    // Real packets through the attached programs: XDP and tc each count every datagram; with
    // no node configuration programmed, every one passes under `no_node_config`.
    topology.send_udp_to_node(5);
    std::thread::sleep(Duration::from_millis(100));
    let counts = stats::read_pinned(layout).expect("pinned STATS");
    assert!(counts.get(Reason::NoNodeConfig) >= 10, "5 datagrams through XDP and tc: {counts:?}");

    let removed = topology.node.enter(|| attach::unload(layout)).expect("unload");
    assert!(removed.iter().any(|line| line == "detached xdp@lb0"), "{removed:?}");
    assert!(!layout.root().exists(), "pin directory removed");
    let link = topology.node.ip(&["-d", "link", "show", "dev", "lb0"]);
    assert!(!link.contains("prog/xdp"), "no XDP left on the link: {link}");
    if tc.mode == AttachMode::Tcx {
        assert!(tcx_ingress_ids(&topology.node, "lb0").is_empty(), "no tcx program left");
    }
    assert!(!program_exists(xdp.program_id), "XDP program unloaded from the kernel");
    assert!(!program_exists(tc.program_id), "tc program unloaded from the kernel");
    assert!(!program_exists(replies.program_id), "tc egress program unloaded from the kernel");
}

impl Topology {
    fn node_tc_filters(&self) -> String {
        run("tc", &["-n", self.node.name(), "filter", "show", "dev", "lb0", "ingress"])
    }
}

#[test]
fn a_second_load_on_the_same_pin_directory_is_refused() {
    let topology = Topology::new();
    let pins = TestPins::new();
    load(&topology, &pins).expect("first load");
    let second = load(&topology, &pins);
    assert!(matches!(second, Err(Error::AlreadyLoaded(_))), "{second:?}");
    assert!(pins.layout().program("lb_xdp").exists(), "the first instance is untouched");
}

#[test]
fn an_unknown_interface_is_named_and_nothing_is_left_behind() {
    let topology = Topology::new();
    let pins = TestPins::new();
    let result = topology.node.enter(|| {
        let targets = Targets {
            xdp_ifaces: vec!["lb0".into()],
            tc_ifaces: vec!["nosuch0".into()],
            host_cgroup: None,
        };
        attach::load_and_attach(pins.layout(), &targets, &Capacities::default())
    });
    let error = result.expect_err("attaching to a missing interface fails");
    assert!(format!("{error:#}").contains("nosuch0"), "error names the interface: {error:#}");
    assert!(!pins.layout().root().exists(), "a failed fresh load leaves no pin directory");
    let link = topology.node.ip(&["-d", "link", "show", "dev", "lb0"]);
    assert!(
        !link.contains("prog/xdp"),
        "the XDP attachment made before the failure is undone: {link}"
    );
}

#[test]
fn verdict_counters_for_fewer_reasons_on_maps_no_program_runs_on_start_afresh() {
    let pins = TestPins::new();
    drop(loader::load_pinned(pins.layout(), &Capacities::default()).expect("pinning the maps"));
    stand_in::put_older_maps(pins.layout(), Reason::COUNT - 2, (Reason::ForwardNew, 7));
    drop(loader::load_pinned(pins.layout(), &Capacities::default()).expect("a load on them"));
    let stats = aya::maps::MapInfo::from_pin(pins.layout().map(names::STATS)).expect("STATS");
    assert_eq!(stats.max_entries(), Reason::COUNT, "a slot per reason");
    let counted = stats::read_pinned(pins.layout()).expect("readable counters");
    assert_eq!(counted.get(Reason::ForwardNew), 0, "afresh");
}

#[test]
fn pinned_maps_keep_their_size_when_a_later_load_asks_for_another() {
    let pins = TestPins::new();
    let small = Capacities { conntrack: Some(4096), ..Capacities::default() };
    drop(loader::load_pinned(pins.layout(), &small).expect("a load that pins its maps"));
    // The loader adopts a pinned map at its size whatever it is asked; resizing one is
    // `lb_user::resize`'s part, which moves it aside first (tests/upgrade.rs).
    drop(loader::load_pinned(pins.layout(), &Capacities::default()).expect("adopting them"));
    let conntrack = aya::maps::MapInfo::from_pin(pins.layout().map(names::CONNTRACK))
        .expect("the pinned conntrack map");
    assert_eq!(conntrack.max_entries(), 4096);
}
