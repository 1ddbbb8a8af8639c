//! The node the packet tables run on: the seed scenario's node (192.168.1.63, pods in
//! 10.244.0.0/16, services in 10.96.0.0/12).

use lb_common::maps::{NodeConfig, node_flags};
use lb_user::maps::{MapOp, ip_be, prefix_be};

pub const NODE_IP: &str = "192.168.1.63";
pub const SNAT_PORT_MIN: u16 = 61_000;
pub const SNAT_PORT_MAX: u16 = 65_535;

pub fn node_config() -> NodeConfig {
    let (cluster_cidr_be, cluster_mask_be) = prefix_be("10.244.0.0/16".parse().expect("CIDR"));
    let (service_cidr_be, service_mask_be) = prefix_be("10.96.0.0/12".parse().expect("CIDR"));
    NodeConfig {
        cluster_cidr_be,
        cluster_mask_be,
        service_cidr_be,
        service_mask_be,
        snat_ip_be: ip_be(NODE_IP.parse().expect("address")),
        snat_port_min: SNAT_PORT_MIN,
        snat_port_max: SNAT_PORT_MAX,
        flags: node_flags::CONFIGURED,
        jiffies_per_second: lb_user::clock::jiffies_per_second(),
    }
}

pub fn set_node_config() -> MapOp {
    MapOp::SetNodeConfig(node_config())
}
