//! Pod-facing interfaces follow the pods: with `--tc-iface vpod*`, a pod started after the
//! daemon gets the tc program on its veth (its connections to a ClusterIP are load-balanced),
//! and a pod that goes takes its attachment's pin with it. An interface that goes, or is
//! replaced by a new one of the same name, while no daemon runs does not stop the next daemon
//! from adopting the datapath (with its programs replaced by this binary's), and the replaced
//! one is attached again.

use std::net::SocketAddr;

use lb_tests::{
    daemon::{RunningDaemon, counter, example_node_config, examples, scrape_metrics, wait_for},
    pins::TestPins,
    stand_in,
    topology::{EXTERNAL_IFACE, Topology, tcp_request},
};
use lb_user::{
    attach::Targets,
    pins::{NetlinkTcRecord, PinLayout, TCX_HOOK, XDP_HOOK},
    program_names, status,
};

const MY_NGINX: &str = "10.96.45.10:80";

/// Both kinds of interface by pattern, as a node's configuration would name them.
fn targets() -> Targets {
    Targets { xdp_ifaces: vec!["ext*".into()], tc_ifaces: vec!["vpod*".into()], host_cgroup: None }
}

/// True if a tc attachment (tcx link, or cls_bpf record on kernels without tcx) of `iface` is
/// pinned.
fn tc_pinned(pins: &PinLayout, iface: &str) -> bool {
    std::fs::read_dir(pins.links_dir()).expect("links dir").any(|entry| {
        let name = entry.expect("entry").file_name().to_string_lossy().into_owned();
        name == format!("{TCX_HOOK}@{iface}")
            || NetlinkTcRecord::parse(&name).is_some_and(|record| record.iface == iface)
    })
}

/// A request from `pod` to my-nginx's ClusterIP, answered by one of its backends: the pod's
/// veth runs the tc program (without it the ClusterIP is nobody's address).
fn assert_served(topology: &Topology, pod: &str) {
    let address: SocketAddr = MY_NGINX.parse().expect("address");
    let answer = tcp_request(&topology.pod(pod).netns, address)
        .unwrap_or_else(|error| panic!("{pod} -> {MY_NGINX}: {error}"));
    assert!(answer.starts_with("hello from my-nginx-"), "{pod}: {answer}");
}

fn manifests() -> std::path::PathBuf {
    examples().join("manifests")
}

#[test]
fn pods_that_start_get_the_tc_program_and_pods_that_go_take_their_pins() {
    let mut topology = Topology::new("lbi");
    let _servers = topology.start_servers();
    let pins = TestPins::new();
    let daemon =
        RunningDaemon::start_with(&topology, &pins, &manifests(), targets(), example_node_config());
    for iface in topology.pod_ifaces() {
        assert!(tc_pinned(pins.layout(), &iface), "{iface} matched vpod* when the daemon started");
    }
    let xdp = pins.layout().link(XDP_HOOK, EXTERNAL_IFACE);
    assert!(xdp.exists(), "{EXTERNAL_IFACE} matched ext* when the daemon started");

    let late = topology.add_pod("late", "10.244.1.40").host_iface.clone();
    wait_for(|| tc_pinned(pins.layout(), &late), "the new pod's veth to be attached");
    assert_served(&topology, "late");
    let status = status::read(pins.layout()).expect("status");
    assert!(
        status.attachments.iter().any(|a| a.program == program_names::TC && a.target == late),
        "status lists the new attachment: {:?}",
        status.attachments
    );

    topology.remove_pod("late");
    wait_for(|| !tc_pinned(pins.layout(), &late), "the gone pod's pin to be removed");
    assert_served(&topology, "client");
    let metrics = scrape_metrics(&topology.node).expect("metrics");
    // The late pod's veth: tc ingress, and tc egress for host-network backends' replies.
    for change in ["attached", "removed"] {
        let series = format!("lb_interface_attachments_total{{change=\"{change}\"}}");
        assert_eq!(counter(&metrics, &series), Some(2), "{series}");
    }
    drop(daemon);
}

#[test]
fn interfaces_gone_or_replaced_while_no_daemon_ran_do_not_stop_an_upgrade() {
    let mut topology = Topology::new("lbj");
    let _servers = topology.start_servers();
    let pins = TestPins::new();
    let gone = topology.add_pod("gone", "10.244.1.41").host_iface.clone();
    let replaced = topology.add_pod("replaced", "10.244.1.42").host_iface.clone();
    let daemon =
        RunningDaemon::start_with(&topology, &pins, &manifests(), targets(), example_node_config());
    assert!(tc_pinned(pins.layout(), &gone) && tc_pinned(pins.layout(), &replaced));
    daemon.stop();

    // An older version's programs on every attachment, so that the next daemon replaces them
    // on each link; then one pod goes and another gets a new veth of the same name.
    let layout = pins.layout().clone();
    topology.node.enter(move || stand_in::put_on_attachments(&layout));
    topology.remove_pod("gone");
    topology.replace_pod_veth("replaced");

    let daemon =
        RunningDaemon::start_with(&topology, &pins, &manifests(), targets(), example_node_config());
    assert!(!tc_pinned(pins.layout(), &gone), "the pin of the gone interface is removed");
    wait_for(|| tc_pinned(pins.layout(), &replaced), "the replaced veth to be attached again");
    assert_served(&topology, "replaced");
    assert_served(&topology, "client");
    drop(daemon);
}
