//! The seed every datapath test starts from: the seed scenario's node, a dozen frontends that
//! cover each kind of service and policy, and the allocated `ClusterIPs`. The packet tables
//! (`tests/dataplane.rs`) and the robustness test (`tests/robustness.rs`) share it, so the
//! random packets are aimed at exactly the services the tables check by hand.

use lb_common::maps::{proto, scope, service_flags as flag};
use lb_user::maps::MapOp;

use crate::{
    datapath::Datapath,
    node::{self, NODE_IP},
    services::{Frontend, cluster_ip_marker},
};

/// A pod on this node (inside the cluster CIDR 10.244.0.0/16).
pub const POD: &str = "10.244.1.5";
/// A client outside the cluster, inside frontend 11's loadBalancerSourceRanges.
pub const EXTERNAL_CLIENT: &str = "203.0.113.9";
/// The LoadBalancer ingress IP of frontend 11.
pub const LB_IP: &str = "198.51.100.10";

/// Allocated `ClusterIPs`: each gets a marker entry, so a port it does not serve is refused
/// rather than dropped.
pub const CLUSTER_IPS: [&str; 7] = [
    "10.96.45.10",
    "10.96.0.10",
    "10.96.45.14",
    "10.96.45.12",
    "10.96.45.22",
    "10.96.45.11",
    HOST_NETWORK_VIP,
];

/// The ClusterIP of frontend 13, whose backend is a host-network endpoint of this node.
pub const HOST_NETWORK_VIP: &str = "10.96.45.30";

/// The frontends every test starts from (ids are the frontends' `service_id`s).
pub fn frontends() -> Vec<Frontend> {
    let tcp = proto::TCP;
    let node_port = flag::EXTERNAL;
    vec![
        Frontend::new(1, "10.96.45.10", 80, tcp).backend("10.244.1.10", 80, true).backend(
            "10.244.2.10",
            80,
            false,
        ),
        Frontend::new(2, "10.96.0.10", 53, proto::UDP).backend("10.244.1.15", 53, true).backend(
            "10.244.2.15",
            53,
            false,
        ),
        Frontend::new(3, NODE_IP, 30380, tcp).flags(node_port).backend("10.244.2.11", 80, false),
        Frontend::new(4, NODE_IP, 30381, tcp).flags(node_port).backend("10.244.1.11", 80, true),
        Frontend::new(5, "10.96.45.14", 80, tcp).backend("10.244.1.10", 80, true),
        Frontend::new(6, "10.96.45.12", 80, tcp),
        Frontend::new(7, "10.96.45.12", 53, proto::UDP),
        Frontend::new(8, NODE_IP, 30400, tcp)
            .flags(node_port | flag::EXT_LOCAL | flag::EMPTY_DROP | flag::TWO_SCOPES),
        Frontend::new(9, NODE_IP, 30400, tcp).scope(scope::INTERNAL).flags(node_port).backend(
            "10.244.2.30",
            80,
            false,
        ),
        Frontend::new(10, "10.96.45.22", 80, tcp).flags(flag::EMPTY_DROP),
        Frontend::new(11, LB_IP, 80, tcp).flags(node_port).source_range("203.0.113.0/25").backend(
            "10.244.1.50",
            80,
            true,
        ),
        Frontend::new(12, "10.96.45.11", 80, tcp)
            .affinity(600)
            .backend("10.244.1.12", 80, true)
            .backend("10.244.2.12", 80, false)
            .backend("10.244.2.13", 80, false),
        Frontend::new(13, HOST_NETWORK_VIP, 443, tcp).backend(NODE_IP, 6443, true),
    ]
}

/// The map operations that program the seed: node configuration, frontends, ClusterIP markers.
pub fn seed_ops() -> Vec<MapOp> {
    let mut ops = vec![node::set_node_config()];
    for frontend in frontends() {
        ops.extend(frontend.ops());
    }
    ops.extend(CLUSTER_IPS.iter().map(|vip| cluster_ip_marker(vip)));
    ops
}

/// A private datapath programmed with the seed.
pub fn seeded() -> Datapath {
    let mut datapath = Datapath::load();
    datapath.apply(&seed_ops());
    datapath
}
