//! The addresses a service port is reached at: what the datapath's service map is keyed by.

use std::net::Ipv4Addr;

use super::{Protocol, ServicePort};

/// Through which kind of address a service port is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    ClusterIp,
    ExternalIp,
    LoadBalancer,
    NodePort,
}

/// One address, port and protocol at which a service port is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub kind: FrontendKind,
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl ServicePort {
    /// Every frontend of this service port: its cluster IP, external IPs and LoadBalancer IPs on
    /// the service port, and its NodePort on each of `node_port_addresses`.
    pub fn frontends(&self, node_port_addresses: &[Ipv4Addr]) -> Vec<Frontend> {
        let protocol = self.id.protocol;
        let on_port = |kind, ip| Frontend { kind, ip, port: self.port, protocol };
        let mut frontends = vec![on_port(FrontendKind::ClusterIp, self.cluster_ip)];
        frontends.extend(self.external_ips.iter().map(|&ip| on_port(FrontendKind::ExternalIp, ip)));
        frontends.extend(
            self.load_balancer_ips.iter().map(|&ip| on_port(FrontendKind::LoadBalancer, ip)),
        );
        if let Some(port) = self.node_port {
            frontends.extend(node_port_addresses.iter().map(|&ip| Frontend {
                kind: FrontendKind::NodePort,
                ip,
                port,
                protocol,
            }));
        }
        frontends
    }
}
