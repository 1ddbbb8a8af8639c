//! Masqueraded north-south traffic through the real stack, with the daemon running: an external
//! client reaching a ClusterIP (a source outside the cluster, masqueraded so that the pod's
//! answer comes back through this node), and a NodePort with Cluster policy whose only endpoint
//! is a pod of another node (masqueraded so that the answer comes back through this node, not
//! straight from that node to the client). In both, XDP hands the kernel a packet whose source
//! is now the node's own address, arriving on the external interface; the answer to the
//! NodePort, translated back, arrives there with the node's address as source too. Then the
//! same with `xdpRedirect`, where XDP sends them all out itself.

use std::net::SocketAddr;

use lb_tests::{
    daemon::{RunningDaemon, default_targets, example_node_config},
    manifests::ManifestDir,
    netns::run,
    pins::TestPins,
    topology::{NODE_IP, Topology, tcp_request, udp_request},
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
