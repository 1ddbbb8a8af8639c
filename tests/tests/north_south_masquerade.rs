//! Masqueraded north-south traffic through the real stack, with the daemon running: an external
//! client reaching a ClusterIP (a source outside the cluster, masqueraded so that the pod's
//! answer comes back through this node), and a NodePort with Cluster policy whose only endpoint
//! is a pod of another node (masqueraded so that the answer comes back through this node, not
//! straight from that node to the client). In both, XDP hands the kernel a packet whose source
//! is now the node's own address, arriving on the external interface; the answer to the
//! NodePort, translated back, arrives there with the node's address as source too. Then the
//! same with `xdpRedirect`, where XDP sends them all out itself. And a path to that pod
//! narrower than the client's, which the client learns through the NodePort.

use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use aya::programs::{Program, XdpMode};
use lb_common::stats::Reason;
use lb_tests::{
    daemon::{RunningDaemon, default_targets, example_node_config},
    manifests::ManifestDir,
    netns::run,
    pins::TestPins,
    stand_in::{self, Kind},
    topology::{CLIENT_IP, EXTERNAL_IFACE, NODE_IP, Topology, tcp_request, udp_request},
};
use lb_user::{
    config::NodeConfig,
    flows,
    stats::{self, Forwarding},
};

/// A NodePort service, Cluster policy, whose one endpoint is on node-b.
const REMOTE_SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata: {name: remote-web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.45.40
  selector: {run: remote-web}
  ports:
  - {name: http, port: 80, protocol: TCP, targetPort: 80, nodePort: 30390}
  - {name: dns, port: 53, protocol: UDP, targetPort: 53, nodePort: 30390}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: remote-web-r1
  namespace: default
  labels: {kubernetes.io/service-name: remote-web}
addressType: IPv4
endpoints:
- {addresses: [10.244.2.11], nodeName: node-b, conditions: {ready: true}}
ports:
- {name: http, port: 80, protocol: TCP}
- {name: dns, port: 53, protocol: UDP}
";

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("socket address")
}

#[test]
fn masqueraded_north_south_flows_pass_through_the_node() {
    let forwarding = masqueraded_flows("lbq", false);
    assert_eq!(forwarding.redirected, 0, "up the stack: {forwarding:?}");
}

/// With `xdpRedirect`, XDP sends the translated packets out itself (here back out of the
/// external interface: towards the remote pod, and the answers to the client).
#[test]
fn with_xdp_redirect_masqueraded_flows_leave_by_redirect() {
    let forwarding = masqueraded_flows("lbr", true);
    assert!(forwarding.redirected >= 4, "redirected by XDP: {forwarding:?}");
}

/// The flows of both tests, with FIB forwarding on or off; the forwarding counters after.
fn masqueraded_flows(prefix: &str, xdp_redirect: bool) -> Forwarding {
    let mut topology = Topology::new(prefix);
    topology.add_remote_pod("remote-web-1", "10.244.2.11");
    // A veth takes frames redirected by XDP only with NAPI on its peer: GRO here.
    run("ip", &["netns", "exec", topology.client.name(), "ethtool", "-K", "client0", "gro", "on"]);
    let _servers = topology.start_servers();
    let pins = TestPins::new();
    let manifests = ManifestDir::new();
    manifests.add_file("remote.yaml", REMOTE_SERVICE);
    let node_config = NodeConfig { xdp_redirect, ..example_node_config() };
    let targets = default_targets(&topology, None);
    let daemon =
        RunningDaemon::start_with(&topology, &pins, manifests.path(), targets, node_config);

    // The remote pod is reachable from the node (so nothing below fails for want of a route).
    let answer = tcp_request(&topology.node, addr("10.244.2.11:80")).expect("node to node-b's pod");
    assert_eq!(answer, "hello from remote-web-1");

    let answer = tcp_request(&topology.client, addr("10.96.45.10:80"))
        .expect("external client to the my-nginx ClusterIP");
    assert!(answer.starts_with("hello from my-nginx-"), "{answer}");

    let node_port = format!("{NODE_IP}:30390");
    let answer = tcp_request(&topology.client, addr(&node_port))
        .expect("external client to a NodePort whose endpoint is on another node");
    assert_eq!(answer, "hello from remote-web-1");
    let answer = udp_request(&topology.client, addr(&node_port)).expect("the same over UDP");
    assert_eq!(answer, "remote-web-1");

    let flows = flows::read(pins.layout()).expect("flows");
    let masqueraded = |frontend: &str| {
        flows.iter().any(|f| {
            f.client.starts_with("192.168.1.100:")
                && f.frontend == frontend
                && f.snat.as_deref().is_some_and(|snat| snat.starts_with(&format!("{NODE_IP}:")))
        })
    };
    assert!(masqueraded("10.96.45.10:80"), "{flows:#?}");
    assert!(masqueraded(&node_port), "{flows:#?}");
    let forwarding = stats::read_forwarding_pinned(pins.layout()).expect("forwarding counters");
    daemon.stop();
    forwarding
}

/// The MTU of the node's path to node-b's pod in the test below.
const NARROW_MTU: i32 = 1000;

/// The node reaches node-b's pod by a path narrower than the client's. A datagram the client
/// sends to the NodePort with DF set, too big for that path, must come back to it as an ICMP
/// fragmentation needed it can match: XDP answers it itself, quoting the datagram as sent (the
/// stack, forwarding it masqueraded, would send its error to the node's own address). The
/// client's kernel then lowers its path MTU to the NodePort, as a socket's `IP_MTU` shows.
#[test]
fn a_narrower_path_to_the_pod_becomes_the_clients_path_mtu() {
    let mut topology = Topology::new("lbm");
    topology.add_remote_pod("remote-web-1", "10.244.2.11");
    let _servers = topology.start_servers();
    let pins = TestPins::new();
    let manifests = ManifestDir::new();
    manifests.add_file("remote.yaml", REMOTE_SERVICE);
    let targets = default_targets(&topology, None);
    let daemon = RunningDaemon::start_with(
        &topology,
        &pins,
        manifests.path(),
        targets,
        example_node_config(),
    );
    // XDP sends the error back (XDP_TX) into the client's veth. A veth hands such frames to its
    // peer's stack at once only when the peer runs an XDP program too (`veth_xdp_flush`
    // schedules the peer's NAPI only then; a NIC has no such condition): a pass-all one.
    let _pass_all = attach_pass_all(&topology, &pins);
    // A route's own MTU counts for the FIB lookup of a BPF program only when locked (with
    // `net.ipv4.fwd_use_pmtu` off); an interface's MTU always does.
    topology.node.ip(&[
        "route",
        "change",
        "10.244.2.11/32",
        "via",
        CLIENT_IP,
        "dev",
        EXTERNAL_IFACE,
        "mtu",
        "lock",
        &NARROW_MTU.to_string(),
    ]);
    // The refusals XDP sends back take the same way: a ClusterIP without endpoints.
    let started = Instant::now();
    let refused = tcp_request(&topology.client, addr("10.96.45.12:80")).expect_err("refused");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "{refused}");
    assert!(started.elapsed() < Duration::from_secs(1), "refused at once, not timed out");

    let node_port = addr(&format!("{NODE_IP}:30390"));
    let answer = udp_request(&topology.client, node_port).expect("a small datagram gets through");
    assert_eq!(answer, "remote-web-1");

    let path_mtu = topology.client.enter(|| {
        let socket = UdpSocket::bind(("0.0.0.0", 0)).expect("bind");
        set_ip_option(&socket, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DO);
        socket.connect(node_port).expect("connect");
        socket.send(&[0x5a; 1200]).expect("1200 bytes fit the client's own path");
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let mtu = ip_option(&socket, libc::IP_MTU);
            if mtu < 1500 || Instant::now() > deadline {
                break mtu;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let counted = stats::read_pinned(pins.layout()).expect("counters");
    assert_eq!(path_mtu, NARROW_MTU, "the client's path MTU to the NodePort");
    assert!(counted.get(Reason::FragmentationNeeded) >= 1, "{counted:?}");
    daemon.stop();
}

/// The length of a `c_int` socket option.
#[expect(clippy::cast_possible_truncation, reason = "four bytes")]
const C_INT_LEN: libc::socklen_t = size_of::<libc::c_int>() as libc::socklen_t;

fn set_ip_option(socket: &UdpSocket, option: libc::c_int, value: libc::c_int) {
    // SAFETY: a valid socket and a c_int option of the right size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            option,
            (&raw const value).cast(),
            C_INT_LEN,
        )
    };
    assert_eq!(rc, 0, "setsockopt {option}: {}", std::io::Error::last_os_error());
}

fn ip_option(socket: &UdpSocket, option: libc::c_int) -> libc::c_int {
    let mut value: libc::c_int = 0;
    let mut len = C_INT_LEN;
    // SAFETY: a valid socket, and a c_int buffer with its length.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            option,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    assert_eq!(rc, 0, "getsockopt {option}: {}", std::io::Error::last_os_error());
    value
}

/// A pass-all XDP program on the client's interface, attached while the returned program lives.
fn attach_pass_all(topology: &Topology, pins: &TestPins) -> Program {
    let mut program = stand_in::pass_all(Kind::Xdp, pins.layout(), "client-pass-all");
    let Program::Xdp(xdp) = &mut program else { unreachable!("an XDP stand-in") };
    topology.client.enter(|| xdp.attach(c"client0", XdpMode::Driver).expect("pass-all on client0"));
    program
}
