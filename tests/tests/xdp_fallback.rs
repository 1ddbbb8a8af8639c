//! North-south where XDP cannot be attached: another program holds the external interface's
//! XDP hook (attached through netlink in generic mode, as many tools do, which a bpf_link can
//! neither join nor replace), so the daemon puts the same service stage on the interface's tc
//! ingress, and NodePort traffic from outside is still served.

use std::net::SocketAddr;

use lb_tests::{
    daemon::{RunningDaemon, counter, examples, scrape_metrics},
    netns::run,
    pins::TestPins,
    stand_in,
    topology::{EXTERNAL_IFACE, NODE_IP, Topology, tcp_request},
};
use lb_user::{program_names, status};

#[test]
fn an_external_interface_whose_xdp_hook_is_taken_is_served_through_tc() {
    let topology = Topology::new("lbx");
    let _servers = topology.start_servers();
    // Someone else's program (it passes everything), pinned in a directory of its own.
    let other = TestPins::new();
    std::fs::create_dir_all(other.layout().root()).expect("pin directory");
    let other_xdp = other.layout().root().join("other-xdp");
    stand_in::pin(&stand_in::load(stand_in::Kind::Xdp), &other_xdp);
    let other_xdp = other_xdp.to_str().expect("a UTF-8 path");
    // nsenter, not `ip -n`: that one mounts a fresh /sys, which hides the pin.
    let net = format!("--net={}", topology.node.path());
    let attach = ["link", "set", "dev", EXTERNAL_IFACE, "xdpgeneric", "pinned", other_xdp];
    run("nsenter", &[&[net.as_str(), "ip"][..], &attach].concat());

    let pins = TestPins::new();
    let daemon = RunningDaemon::start(&topology, &pins, &examples().join("manifests"), None);
    let attachments = status::read(pins.layout()).expect("status").attachments;
    let on_external: Vec<_> =
        attachments.iter().filter(|a| a.target == EXTERNAL_IFACE).map(|a| a.program).collect();
    assert_eq!(on_external, [program_names::TC_EXTERNAL], "{attachments:?}");

    let node_port: SocketAddr = format!("{NODE_IP}:30380").parse().expect("address");
    let answer = tcp_request(&topology.client, node_port).expect("the NodePort answers");
    assert!(answer.starts_with("hello from my-nginx-nodeport-"), "{answer}");
    let status = status::read(pins.layout()).expect("status");
    assert!(status.reasons["forward_new"] >= 1, "{:?}", status.reasons);
    assert!(status.tc_fallback_translated >= 1, "counted as the tc fallback's");
    assert_eq!(status.xdp_to_stack + status.xdp_redirected, 0, "XDP translated nothing");
    let metrics = scrape_metrics(&topology.node).expect("metrics");
    // The metric is read later: the connection's last packets may have been counted since.
    let series = counter(&metrics, "lb_tc_fallback_packets_total");
    assert!(series >= Some(status.tc_fallback_translated), "the metric: {series:?}");
    drop(daemon);
}
