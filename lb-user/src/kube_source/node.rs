//! This node's addresses, zone and fate as its Node object reports them.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Node;

/// This node's IPv4 addresses from its Node object's `status.addresses`: the `InternalIP` ones
/// first, then the `ExternalIP` ones, each in the order listed, without duplicates. The daemon prefers these
/// to the configuration file's `nodeIPs`, which can go stale when a node is re-addressed.
/// Hostnames and IPv6 addresses are left out: only IPv4 is modelled.
pub fn node_ipv4_addresses(node: &Node) -> Vec<Ipv4Addr> {
    let addresses =
        node.status.as_ref().and_then(|status| status.addresses.as_deref()).unwrap_or_default();
    let of_type = |wanted: &'static str| {
        addresses
            .iter()
            .filter(move |address| address.type_ == wanted)
            .filter_map(|address| address.address.parse::<Ipv4Addr>().ok())
    };
    let mut ips = Vec::new();
    for ip in of_type("InternalIP").chain(of_type("ExternalIP")) {
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    ips
}

/// The well-known label of the zone a node runs in.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// This node's zone, from its Node object's `topology.kubernetes.io/zone` label.
pub fn node_zone(node: &Node) -> Option<String> {
    let labels = node.metadata.labels.as_ref()?;
    labels.get(ZONE_LABEL).filter(|zone| !zone.is_empty()).cloned()
}

/// The cluster autoscaler's taint on a node it is about to delete.
const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// False for a node being deleted (a deletion timestamp, or the cluster autoscaler's taint):
/// load balancers should drain it (kube-proxy's `nodeEligible`, KEP-3836).
pub fn node_eligible(node: &Node) -> bool {
    let deleting = node.metadata.deletion_timestamp.is_some();
    let taints = node.spec.as_ref().and_then(|spec| spec.taints.as_deref()).unwrap_or_default();
    !deleting && !taints.iter().any(|taint| taint.key == TO_BE_DELETED_TAINT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(addresses: &[(&str, &str)]) -> Node {
        let addresses: Vec<_> = addresses
            .iter()
            .map(|(type_, address)| serde_json::json!({ "type": type_, "address": address }))
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "node-a" },
            "status": { "addresses": addresses },
        }))
        .expect("test Node deserialises")
    }

    #[test]
    fn internal_addresses_come_before_external_ones() {
        let node = node(&[
            ("ExternalIP", "203.0.113.7"),
            ("Hostname", "node-a"),
            ("InternalIP", "192.168.1.63"),
            ("InternalIP", "fd00::63"),
            ("InternalIP", "10.0.0.63"),
            ("InternalDNS", "node-a.internal"),
        ]);
        assert_eq!(
            node_ipv4_addresses(&node),
            ["192.168.1.63", "10.0.0.63", "203.0.113.7"]
                .map(|ip| ip.parse::<Ipv4Addr>().expect("test address")),
            "InternalIPs in order, then ExternalIPs; IPv6 and names left out"
        );
    }

    #[test]
    fn an_address_listed_twice_is_kept_once() {
        let node = node(&[("InternalIP", "192.168.1.63"), ("ExternalIP", "192.168.1.63")]);
        assert_eq!(node_ipv4_addresses(&node), [Ipv4Addr::new(192, 168, 1, 63)]);
    }

    #[test]
    fn a_node_without_status_has_no_addresses() {
        let node: Node = serde_json::from_value(serde_json::json!({ "metadata": { "name": "a" } }))
            .expect("test Node deserialises");
        assert!(node_ipv4_addresses(&node).is_empty(), "no status: no addresses");
    }

    #[test]
    fn the_zone_is_the_well_known_label() {
        let labelled: Node = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "a", "labels": { "topology.kubernetes.io/zone": "eu-west-1a" } }
        }))
        .expect("test Node deserialises");
        assert_eq!(node_zone(&labelled).as_deref(), Some("eu-west-1a"));
        let unlabelled = node(&[]);
        assert_eq!(node_zone(&unlabelled), None);
    }

    #[test]
    fn a_node_being_deleted_is_not_eligible() {
        let node = |object| -> Node { serde_json::from_value(object).expect("test Node") };
        let taint = |key| serde_json::json!({ "taints": [{ "key": key, "effect": "NoSchedule" }] });
        let plain = serde_json::json!({ "metadata": { "name": "a" } });
        assert!(node_eligible(&node(plain)));
        let tainted = serde_json::json!({
            "metadata": { "name": "a" }, "spec": taint("ToBeDeletedByClusterAutoscaler")
        });
        assert!(!node_eligible(&node(tainted)));
        let cordoned = serde_json::json!({
            "metadata": { "name": "a" }, "spec": taint("node.kubernetes.io/unschedulable")
        });
        assert!(node_eligible(&node(cordoned)), "only deletion makes a node ineligible");
        let deleting = serde_json::json!({
            "metadata": { "name": "a", "deletionTimestamp": "2026-11-26T23:00:00Z" }
        });
        assert!(!node_eligible(&node(deleting)));
    }
}
