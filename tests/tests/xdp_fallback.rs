//! North-south where XDP cannot be attached: another program holds the external interface's
//! XDP hook (attached through netlink in generic mode, as many tools do, which a bpf_link can
//! neither join nor replace), so the daemon puts the same service stage on the interface's tc
//! ingress, and NodePort traffic from outside is still served: up the stack, or with FIB
//! forwarding on (`xdpRedirect`) by redirect to the pod's interface once its neighbour is known.

use std::net::SocketAddr;

use lb_tests::{
    daemon::{
        RunningDaemon, counter, default_targets, example_node_config, examples, scrape_metrics,
    },
    netns::run,
    pins::TestPins,
    stand_in,
    topology::{EXTERNAL_IFACE, NODE_IP, Topology, tcp_request},
};
use lb_user::{
    program_names,
    status::{self, Status},
};

#[test]
fn an_external_interface_whose_xdp_hook_is_taken_is_served_through_tc() {
    let status = serve_a_node_port_through_tc(false);
    assert_eq!(status.tc_fallback_redirected, 0, "FIB forwarding is off");
}

#[test]
fn with_fib_forwarding_the_tc_fallback_redirects() {
    let status = serve_a_node_port_through_tc(true);
    // The first packet to a pod whose neighbour entry does not exist yet goes up the stack,
    // which resolves it; the later ones leave by redirect.
    assert!(status.tc_fallback_redirected >= 1, "redirected by FIB lookup: {status:?}");
    assert!(status.tc_fallback_redirected <= status.tc_fallback_translated, "{status:?}");
}

/// Takes the external interface's XDP hook, starts a daemon (`xdp_redirect` as given), checks
/// that it put the tc fallback there and that a NodePort request from outside is answered
/// through it; returns the status after the request.
fn serve_a_node_port_through_tc(xdp_redirect: bool) -> Status {
    let topology = Topology::new(if xdp_redirect { "lbxr" } else { "lbx" });
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
    let manifests = examples().join("manifests");
    let node_config = lb_user::config::NodeConfig { xdp_redirect, ..example_node_config() };
    let daemon =
        RunningDaemon::start_with(&topology, &pins, &manifests, default_targets(&topology, None), node_config);
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
    let series = counter(&metrics, "lb_tc_fallback_redirected_packets_total");
    assert!(series >= Some(status.tc_fallback_redirected), "the metric: {series:?}");
    drop(daemon);
    status
}
