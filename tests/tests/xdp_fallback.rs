//! North-south where XDP cannot be attached: another program holds the external interface's
//! XDP hook (attached through netlink in generic mode, as many tools do, which a bpf_link can
//! neither join nor replace), so the daemon puts the same service stage on the interface's tc
//! ingress, and NodePort traffic from outside is still served: up the stack, or with FIB
//! forwarding on (`xdpRedirect`) by redirect to the pod's interface once its neighbour is known.
//! When the other program leaves, XDP takes the interface back and the fallback goes.

use std::net::SocketAddr;

use lb_tests::{
    daemon::{
        RunningDaemon, counter, default_targets, example_node_config, examples, scrape_metrics,
        wait_for,
    },
    netns::run,
    pins::TestPins,
    stand_in,
    topology::{EXTERNAL_IFACE, NODE_IP, Servers, Topology, tcp_request},
};
use lb_user::{
    program_names,
    status::{self, AttachmentStatus, Status},
};

#[test]
fn an_external_interface_whose_xdp_hook_is_taken_is_served_through_tc_until_it_is_free() {
    let node = TakenHook::start(false);
    let status = node.request_a_node_port_through_tc();
    assert_eq!(status.tc_fallback_redirected, 0, "FIB forwarding is off");

    // The other program leaves (a link event): XDP takes the interface back, the fallback goes.
    node.free_the_hook();
    wait_for(|| node.on_external() == [program_names::XDP], "XDP back on the external interface");
    // Counted from here: the first connection's last packets may have reached the fallback
    // after `status` was read.
    let before = node.status();
    let answer = tcp_request(&node.topology.client, node_port()).expect("the NodePort answers");
    assert!(answer.starts_with("hello from my-nginx-nodeport-"), "{answer}");
    let after = node.status();
    assert_eq!(after.tc_fallback_translated, before.tc_fallback_translated, "no fallback left");
    assert!(after.reasons["forward_new"] > before.reasons["forward_new"], "XDP translated it");
    // The fallback took nothing else with it: lb_tc_reply still runs on the interface's egress
    // (with cls_bpf both filters share one clsact qdisc, which stays while one of them does).
    assert!(node.reply_program_on_external(), "lb_tc_reply left the external interface");
}

#[test]
fn with_fib_forwarding_the_tc_fallback_redirects() {
    let status = TakenHook::start(true).request_a_node_port_through_tc();
    // The first packet to a pod whose neighbour entry does not exist yet goes up the stack,
    // which resolves it; the later ones leave by redirect.
    assert!(status.tc_fallback_redirected >= 1, "redirected by FIB lookup: {status:?}");
    assert!(status.tc_fallback_redirected <= status.tc_fallback_translated, "{status:?}");
}

/// A node whose external interface's XDP hook another program holds, and a daemon on it.
/// (Fields drop in order: the daemon stops before its pins and the namespaces go.)
struct TakenHook {
    _daemon: RunningDaemon,
    pins: TestPins,
    _other: TestPins,
    _servers: Servers,
    topology: Topology,
}

impl TakenHook {
    /// Takes the external interface's XDP hook, then starts a daemon (`xdp_redirect` as given).
    fn start(xdp_redirect: bool) -> Self {
        let topology = Topology::new(if xdp_redirect { "lbxr" } else { "lbx" });
        let servers = topology.start_servers();
        // Someone else's program (it passes everything), pinned in a directory of its own.
        let other = TestPins::new();
        std::fs::create_dir_all(other.layout().root()).expect("pin directory");
        let other_xdp = other.layout().root().join("other-xdp");
        stand_in::pin(&stand_in::load(stand_in::Kind::Xdp), &other_xdp);
        let other_xdp = other_xdp.to_str().expect("a UTF-8 path");
        set_xdp(&topology, &["xdpgeneric", "pinned", other_xdp]);

        let pins = TestPins::new();
        let manifests = examples().join("manifests");
        let node_config = lb_user::config::NodeConfig { xdp_redirect, ..example_node_config() };
        let targets = default_targets(&topology, None);
        let daemon = RunningDaemon::start_with(&topology, &pins, &manifests, targets, node_config);
        Self { _daemon: daemon, pins, _other: other, _servers: servers, topology }
    }

    /// Checks that the daemon put the tc fallback on the external interface and that a NodePort
    /// request from outside is answered through it; returns the status after the request.
    fn request_a_node_port_through_tc(&self) -> Status {
        assert_eq!(self.on_external(), [program_names::TC_EXTERNAL]);
        let answer = tcp_request(&self.topology.client, node_port()).expect("the NodePort answers");
        assert!(answer.starts_with("hello from my-nginx-nodeport-"), "{answer}");
        let status = self.status();
        assert!(status.reasons["forward_new"] >= 1, "{:?}", status.reasons);
        assert!(status.tc_fallback_translated >= 1, "counted as the tc fallback's");
        assert_eq!(status.xdp_to_stack + status.xdp_redirected, 0, "XDP translated nothing");
        let metrics = scrape_metrics(&self.topology.node).expect("metrics");
        // The metrics are read later: the connection's last packets may have been counted since.
        let series = counter(&metrics, "lb_tc_fallback_packets_total");
        assert!(series >= Some(status.tc_fallback_translated), "the metric: {series:?}");
        let series = counter(&metrics, "lb_tc_fallback_redirected_packets_total");
        assert!(series >= Some(status.tc_fallback_redirected), "the metric: {series:?}");
        status
    }

    /// The other program leaves the XDP hook.
    fn free_the_hook(&self) {
        set_xdp(&self.topology, &["xdpgeneric", "off"]);
    }

    fn status(&self) -> Status {
        status::read(self.pins.layout()).expect("status")
    }

    /// The north-south programs attached to the external interface.
    fn on_external(&self) -> Vec<&'static str> {
        let attachments = self.status().attachments;
        // Its egress runs lb_tc_reply whichever program serves its ingress.
        let north_south = |a: &&AttachmentStatus| a.program != program_names::TC_REPLY;
        let on_it = attachments.iter().filter(|a| a.target == EXTERNAL_IFACE);
        on_it.filter(north_south).map(|a| a.program).collect()
    }
}

impl TakenHook {
    /// True if the kernel runs `lb_tc_reply` on the external interface's egress: a pinned tcx
    /// link, or (kernels without tcx) a cls_bpf filter the kernel lists.
    fn reply_program_on_external(&self) -> bool {
        let layout = self.pins.layout();
        if layout.link(lb_user::pins::TCX_REPLY_HOOK, EXTERNAL_IFACE).exists() {
            return true;
        }
        // Without the qdisc, `tc` fails: no filter either.
        let net = format!("--net={}", self.topology.node.path());
        let listed = std::process::Command::new("nsenter")
            .args([net.as_str(), "tc", "filter", "show", "dev", EXTERNAL_IFACE, "egress"])
            .output()
            .expect("tc");
        String::from_utf8_lossy(&listed.stdout).contains(program_names::TC_REPLY)
    }
}

/// `ip link set dev <external interface> <xdp...>` in the node's namespace.
fn set_xdp(topology: &Topology, xdp: &[&str]) {
    // nsenter, not `ip -n`: that one mounts a fresh /sys, which hides pins.
    let net = format!("--net={}", topology.node.path());
    let link = ["ip", "link", "set", "dev", EXTERNAL_IFACE];
    run("nsenter", &[&[net.as_str()][..], &link, xdp].concat());
}

fn node_port() -> SocketAddr {
    format!("{NODE_IP}:30380").parse().expect("address")
}
