//! Topology-aware routing through the running daemon and the real datapath: a service whose
//! endpoints carry EndpointSlice zone hints sends this node's pods only to the endpoint hinted
//! for this node's zone, and to every endpoint again once not every endpoint has a hint.

use std::net::SocketAddr;

use lb_tests::{
    daemon::{RunningDaemon, default_targets, example_node_config, wait_for},
    manifests::ManifestDir,
    pins::TestPins,
    topology::{Topology, tcp_request},
};
use lb_user::config::NodeConfig;

/// The demo's two my-nginx pods behind one more service, one hinted for each zone.
const ZONED: &str = "
apiVersion: v1
kind: Service
metadata: {name: zoned, namespace: default}
spec:
  clusterIP: 10.96.90.1
  ports:
  - {port: 80, protocol: TCP, targetPort: 80}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: zoned-1
  namespace: default
  labels: {kubernetes.io/service-name: zoned}
addressType: IPv4
endpoints:
- {addresses: [10.244.1.10], nodeName: node-a, zone: zone-a, hints: {forZones: [{name: zone-a}]}}
- {addresses: [10.244.1.11], nodeName: node-a, zone: zone-b, hints: {forZones: [{name: zone-b}]}}
ports:
- {name: '', port: 80, protocol: TCP}
";

fn request(topology: &Topology) -> String {
    let address: SocketAddr = "10.96.90.1:80".parse().expect("address");
    tcp_request(&topology.pod("client").netns, address).expect("zoned answers")
}

#[test]
fn pods_reach_the_endpoint_hinted_for_their_zone() {
    let topology = Topology::new("lbz");
    let _servers = topology.start_servers();
    let pins = TestPins::new();
    let manifests = ManifestDir::new();
    manifests.add_file("zoned.yaml", ZONED);
    let node = NodeConfig { zone: Some("zone-b".into()), ..example_node_config() };
    let targets = default_targets(&topology, None);
    let daemon = RunningDaemon::start_with(&topology, &pins, manifests.path(), targets, node);

    // New connections, each its own flow: every one lands on the zone-b endpoint.
    for _ in 0..12 {
        assert_eq!(request(&topology), "hello from my-nginx-2", "zone-b's endpoint only");
    }

    // One endpoint loses its hint: hints no longer apply, and both endpoints take flows.
    manifests
        .add_file("zoned.yaml", &ZONED.replacen(", hints: {forZones: [{name: zone-a}]}", "", 1));
    wait_for(|| request(&topology) == "hello from my-nginx-1", "flows to zone-a's endpoint too");
    drop(daemon);
}
