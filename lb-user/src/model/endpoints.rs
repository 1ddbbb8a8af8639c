//! EndpointSlices, normalised and keyed by the service they belong to, and the merged endpoint
//! list of one service port.
//!
//! A slice belongs to the service named by its `kubernetes.io/service-name` label in its own
//! namespace. A service port takes its endpoints' port from the slice port with the same name
//! and protocol: that is how a named targetPort, resolved per pod by the EndpointSlice
//! controller, reaches us.
//!
//! Normalising happens in two steps: [`keep_slice`] extracts what the model needs without
//! looking at the node (what a long-lived source stores), and [`KeptSlice::resolve`] decides
//! which endpoints are local once the node configuration is known, at model time.

use std::{
    collections::{BTreeMap, HashSet, btree_map::Entry},
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use k8s_openapi::api::discovery::v1::{Endpoint as ApiEndpoint, EndpointSlice};

use super::{
    Endpoint, Hint, Protocol, ServiceName, Skipped, address, object_name, service::port_number,
    slice_service_name,
};
use crate::config::NodeConfig;

/// Names the service an EndpointSlice belongs to.
pub(super) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One EndpointSlice as the model keeps it: normalised, or why it is left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum SliceObject {
    Used(Slice),
    /// addressType IPv6 or FQDN: counted in one note rather than listed.
    NotIpv4,
    Malformed(Skipped),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Slice {
    pub(super) name: String,
    ports: Vec<SlicePort>,
    /// With port 0: each service port sets the port of the slice port it matches.
    endpoints: Vec<Endpoint>,
    /// Malformed endpoints left out, the others used (as kube-proxy skips one endpoint).
    pub(super) left_out: Option<Skipped>,
}

/// One EndpointSlice normalised without the node configuration: the compact form a source
/// keeps instead of the API object. Which endpoints are local is decided by
/// [`KeptSlice::resolve`], against the node configuration a model is built with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptSlice(Kept);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kept {
    Used {
        name: String,
        ports: Vec<SlicePort>,
        endpoints: Vec<KeptEndpoint>,
        left_out: Option<Skipped>,
    },
    NotIpv4,
    Malformed(Skipped),
}

/// An endpoint with its node's name instead of whether that node is this one.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeptEndpoint {
    ip: Ipv4Addr,
    /// Shared through [`NodeNames`]: a cluster has far fewer nodes than endpoints.
    node_name: Option<Arc<str>>,
    ready: bool,
    serving: bool,
    terminating: bool,
    /// Boxed: most endpoints have none, and a big cluster has millions of endpoints.
    hints: Option<Box<TopologyHints>>,
}

/// The zones and nodes an endpoint is hinted for (topology-aware routing); either may be empty.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TopologyHints {
    zones: Box<[Arc<str>]>,
    nodes: Box<[Arc<str>]>,
}

/// The node names endpoints run on (and the zone names of their hints), each stored once.
/// Names are never dropped: a cluster has few nodes, and a name outlives its last endpoint only
/// until the next pod lands there.
#[derive(Debug, Default)]
pub struct NodeNames(HashSet<Arc<str>>);

impl NodeNames {
    fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(known) = self.0.get(name) {
            return Arc::clone(known);
        }
        let name: Arc<str> = Arc::from(name);
        self.0.insert(Arc::clone(&name));
        name
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SlicePort {
    name: String,
    protocol: Protocol,
    port: u16,
}

/// Why a slice is left out.
enum NotUsed {
    NotIpv4,
    Malformed(String),
}

/// The service `slice` belongs to and what the model keeps of it; `None` for a slice of no
/// service.
pub(super) fn slice_object(
    slice: &EndpointSlice,
    node: &NodeConfig,
) -> Option<(ServiceName, SliceObject)> {
    let (service, kept) = keep_slice(slice, &mut NodeNames::default())?;
    Some((service, kept.resolve(node)))
}

/// The service `slice` belongs to and its node-independent normalised form; `None` for a slice
/// of no service.
pub fn keep_slice(
    slice: &EndpointSlice,
    nodes: &mut NodeNames,
) -> Option<(ServiceName, KeptSlice)> {
    let key = slice_service_name(&slice.metadata)?;
    let kept = match normalise(slice, nodes) {
        Ok(kept) => kept,
        Err(NotUsed::NotIpv4) => Kept::NotIpv4,
        Err(NotUsed::Malformed(reason)) => Kept::Malformed(Skipped {
            object: object_name("EndpointSlice", &slice.metadata),
            reason: format!("malformed: {reason}"),
        }),
    };
    Some((key, KeptSlice(kept)))
}

impl KeptSlice {
    /// The slice as the model uses it on `node`.
    pub(super) fn resolve(&self, node: &NodeConfig) -> SliceObject {
        match &self.0 {
            Kept::Used { name, ports, endpoints, left_out } => SliceObject::Used(Slice {
                name: name.clone(),
                ports: ports.clone(),
                endpoints: endpoints.iter().map(|endpoint| endpoint.resolve(node)).collect(),
                left_out: left_out.clone(),
            }),
            Kept::NotIpv4 => SliceObject::NotIpv4,
            Kept::Malformed(skipped) => SliceObject::Malformed(skipped.clone()),
        }
    }
}

impl KeptEndpoint {
    fn resolve(&self, node: &NodeConfig) -> Endpoint {
        let hints = self.hints.as_deref();
        Endpoint {
            ip: self.ip,
            port: 0,
            node_local: self.node_name.as_deref().is_some_and(|n| node.is_local_node(n)),
            ready: self.ready,
            serving: self.serving,
            terminating: self.terminating,
            zone_hint: hint(hints.map(|h| &*h.zones), node.zone.as_deref()),
            node_hint: hint(hints.map(|h| &*h.nodes), Some(&node.node_name)),
        }
    }
}

/// What hints for `names` say about `here`.
fn hint(names: Option<&[Arc<str>]>, here: Option<&str>) -> Hint {
    match names {
        None | Some([]) => Hint::None,
        Some(names) if here.is_some_and(|here| names.iter().any(|name| **name == *here)) => {
            Hint::Here
        }
        Some(_) => Hint::Elsewhere,
    }
}

/// The endpoints of one service port: from every slice of the service (in slice-name order, so
/// that merging does not depend on the order the API delivered them in) that has a port of
/// this name and protocol, merged on address and port.
pub(super) fn port_endpoints(
    slices: &[&Slice],
    port_name: &str,
    protocol: Protocol,
) -> Vec<Endpoint> {
    let mut merged = BTreeMap::new();
    for slice in slices {
        let Some(port) = slice.ports.iter().find(|p| p.name == port_name && p.protocol == protocol)
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            merge(&mut merged, Endpoint { port: port.port, ..endpoint.clone() });
        }
    }
    merged.into_values().collect()
}

/// Keeps one endpoint per address and port, the most usable one: the same pod can appear in two
/// slices while the controller moves it, and a stale copy must not hide a ready one. On a tie
/// the first (by slice name) stays.
fn merge(merged: &mut BTreeMap<(Ipv4Addr, u16), Endpoint>, endpoint: Endpoint) {
    match merged.entry((endpoint.ip, endpoint.port)) {
        Entry::Vacant(entry) => {
            entry.insert(endpoint);
        }
        Entry::Occupied(mut entry) => {
            if endpoint.usability() > entry.get().usability() {
                entry.insert(endpoint);
            }
        }
    }
}

/// The slice's ports and endpoints; its owner (the service-name label) is `keep_slice`'s
/// business.
fn normalise(slice: &EndpointSlice, nodes: &mut NodeNames) -> Result<Kept, NotUsed> {
    match slice.address_type.as_str() {
        "IPv4" => {}
        "IPv6" | "FQDN" => return Err(NotUsed::NotIpv4),
        other => return Err(NotUsed::Malformed(format!("addressType {other:?} is unknown"))),
    }
    let ports = slice
        .ports
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(index, port)| slice_port(index, port).transpose())
        .collect::<Result<_, _>>()?;
    let mut endpoints = Vec::with_capacity(slice.endpoints.as_ref().map_or(0, Vec::len));
    let mut malformed = Vec::new();
    for (index, endpoint) in slice.endpoints.iter().flatten().enumerate() {
        match slice_endpoint(index, endpoint, nodes) {
            Ok(endpoint) => endpoints.push(endpoint),
            Err(reason) => malformed.push(reason),
        }
    }
    let left_out = left_out(slice, &malformed);
    let name = slice.metadata.name.clone().unwrap_or_default();
    Ok(Kept::Used { name, ports, endpoints, left_out })
}

/// The problem to report for a slice whose `malformed` endpoints (why each is) were left out:
/// the first one named, the others counted, as a slice holds up to a thousand.
fn left_out(slice: &EndpointSlice, malformed: &[String]) -> Option<Skipped> {
    let first = malformed.first()?;
    let total = slice.endpoints.as_ref().map_or(0, Vec::len);
    Some(Skipped {
        object: object_name("EndpointSlice", &slice.metadata),
        reason: format!("{} of {total} endpoints malformed, left out: {first}", malformed.len()),
    })
}

/// A slice port; `None` for one without a port number, which the API allows (it means "all
/// ports", for selector-less services) and which kube-proxy ignores too.
fn slice_port(
    index: usize,
    port: &k8s_openapi::api::discovery::v1::EndpointPort,
) -> Result<Option<SlicePort>, NotUsed> {
    let Some(number) = port.port else { return Ok(None) };
    let field = format!("ports[{index}]");
    let protocol = Protocol::from_api(port.protocol.as_deref()).ok_or_else(|| {
        NotUsed::Malformed(format!("{field}.protocol {:?} is not TCP, UDP or SCTP", port.protocol))
    })?;
    let number = port_number(&format!("{field}.port"), number).map_err(NotUsed::Malformed)?;
    Ok(Some(SlicePort { name: port.name.clone().unwrap_or_default(), protocol, port: number }))
}

/// One endpoint, without its port, with its conditions defaulted as kube-proxy reads them:
/// ready and serving unknown mean true, terminating unknown means not terminating. `Err`: why
/// it is malformed.
fn slice_endpoint(
    index: usize,
    endpoint: &ApiEndpoint,
    nodes: &mut NodeNames,
) -> Result<KeptEndpoint, String> {
    // The API says consumers use the first address; the others are reserved. The field is
    // named only on error: a big cluster has millions of endpoints.
    let field = || format!("endpoints[{index}].addresses");
    let text = endpoint.addresses.first().ok_or_else(|| format!("{} is empty", field()))?;
    let Some(IpAddr::V4(ip)) = address::parse_ip(text) else {
        return Err(format!("{}: {text:?} is not an IPv4 address", field()));
    };
    let conditions = endpoint.conditions.as_ref();
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    Ok(KeptEndpoint {
        ip,
        node_name: endpoint.node_name.as_deref().map(|name| nodes.intern(name)),
        ready,
        // The API says to defer to `ready` when it is absent; kube-proxy reads it as true, so
        // a terminating endpoint without it still drains as kube-proxy's would.
        serving: conditions.and_then(|c| c.serving).unwrap_or(true),
        terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
        hints: topology_hints(endpoint, nodes),
    })
}

fn topology_hints(endpoint: &ApiEndpoint, names: &mut NodeNames) -> Option<Box<TopologyHints>> {
    let hints = endpoint.hints.as_ref()?;
    let zones: Box<[Arc<str>]> =
        hints.for_zones.iter().flatten().map(|zone| names.intern(&zone.name)).collect();
    let nodes: Box<[Arc<str>]> =
        hints.for_nodes.iter().flatten().map(|node| names.intern(&node.name)).collect();
    (!zones.is_empty() || !nodes.is_empty()).then(|| Box::new(TopologyHints { zones, nodes }))
}

#[cfg(test)]
mod tests {
    use super::{
        super::{Model, build, fixtures::*},
        *,
    };

    const SERVICE: &str = "metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.1, ports: [{name: web, port: 80, targetPort: http-alt}]}";

    fn model(slices: &[&str]) -> Model {
        let slices: Vec<_> = slices.iter().map(|yaml| slice(yaml)).collect();
        build(&[service(SERVICE)], &slices, &node())
    }

    fn endpoints(slices: &[&str]) -> Vec<Endpoint> {
        let model = model(slices);
        assert_eq!(model.ports.len(), 1, "{model:?}");
        model.ports[0].endpoints.clone()
    }

    fn slice_yaml(name: &str, endpoints: &str, ports: &str) -> String {
        format!(
            "metadata:
  name: {name}
  namespace: shop
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: {endpoints}
ports: {ports}"
        )
    }

    fn addresses(endpoints: &[Endpoint]) -> Vec<String> {
        endpoints.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn named_target_port_resolves_through_the_slice_port_name() {
        let yaml = slice_yaml(
            "web-1",
            "[{addresses: [10.244.1.14]}, {addresses: [10.244.2.14]}]",
            "[{name: web, port: 8080}, {name: other, port: 9090}]",
        );
        assert_eq!(addresses(&endpoints(&[&yaml])), ["10.244.1.14:8080", "10.244.2.14:8080"]);
    }

    #[test]
    fn a_slice_without_the_port_contributes_nothing() {
        let with = slice_yaml("web-1", "[{addresses: [10.244.1.1]}]", "[{name: web, port: 8080}]");
        let without =
            slice_yaml("web-2", "[{addresses: [10.244.1.2]}]", "[{name: other, port: 8080}]");
        let udp = slice_yaml(
            "web-3",
            "[{addresses: [10.244.1.3]}]",
            "[{name: web, port: 8080, protocol: UDP}]",
        );
        let no_number = slice_yaml("web-4", "[{addresses: [10.244.1.4]}]", "[{name: web}]");
        assert_eq!(
            addresses(&endpoints(&[&with, &without, &udp, &no_number])),
            ["10.244.1.1:8080"]
        );
    }

    #[test]
    fn empty_and_absent_port_names_match() {
        let model = build(
            &[service(
                "metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}",
            )],
            &[
                slice(&slice_yaml(
                    "web-1",
                    "[{addresses: [10.244.1.1]}]",
                    "[{name: '', port: 81}]",
                )),
                slice(&slice_yaml("web-2", "[{addresses: [10.244.1.2]}]", "[{port: 82}]")),
            ],
            &node(),
        );
        assert_eq!(addresses(&model.ports[0].endpoints), ["10.244.1.1:81", "10.244.1.2:82"]);
    }

    #[test]
    fn slices_belong_by_label_and_namespace() {
        let other_namespace =
            slice_yaml("web-1", "[{addresses: [10.244.1.1]}]", "[{name: web, port: 80}]")
                .replace("namespace: shop", "namespace: elsewhere");
        let other_service =
            slice_yaml("web-2", "[{addresses: [10.244.1.2]}]", "[{name: web, port: 80}]")
                .replace("service-name: web", "service-name: api");
        let unlabelled = "metadata: {name: web-3, namespace: shop}
addressType: IPv4
endpoints: [{addresses: [10.244.1.3]}]
ports: [{name: web, port: 80}]";
        let mine = slice_yaml("web-4", "[{addresses: [10.244.1.4]}]", "[{name: web, port: 80}]");
        let model = model(&[&other_namespace, &other_service, unlabelled, &mine]);
        assert_eq!(addresses(&model.ports[0].endpoints), ["10.244.1.4:80"]);
        assert!(model.skipped.is_empty() && model.notes.is_empty(), "{model:?}");
    }

    #[test]
    fn several_slices_are_merged() {
        let a = slice_yaml("web-a", "[{addresses: [10.244.2.1]}]", "[{name: web, port: 8080}]");
        let b = slice_yaml("web-b", "[{addresses: [10.244.1.1]}]", "[{name: web, port: 8080}]");
        assert_eq!(addresses(&endpoints(&[&a, &b])), ["10.244.1.1:8080", "10.244.2.1:8080"]);
    }

    #[test]
    fn conditions_default_as_kube_proxy_reads_them() {
        let yaml = slice_yaml(
            "web-1",
            "[{addresses: [10.244.1.1]},
              {addresses: [10.244.1.2], conditions: {ready: false}},
              {addresses: [10.244.1.3], conditions: {ready: false, terminating: true}},
              {addresses: [10.244.1.4], conditions: {serving: false}}]",
            "[{name: web, port: 80}]",
        );
        let conditions: Vec<_> =
            endpoints(&[&yaml]).iter().map(|e| (e.ready, e.serving, e.terminating)).collect();
        assert_eq!(
            conditions,
            [(true, true, false), (false, true, false), (false, true, true), (true, false, false)]
        );
    }

    #[test]
    fn node_name_decides_locality() {
        let yaml = slice_yaml(
            "web-1",
            "[{addresses: [10.244.1.1], nodeName: node-a},
              {addresses: [10.244.2.1], nodeName: node-b},
              {addresses: [10.244.3.1]}]",
            "[{name: web, port: 80}]",
        );
        let local: Vec<_> = endpoints(&[&yaml]).iter().map(|e| e.node_local).collect();
        assert_eq!(local, [true, false, false]);
    }

    #[test]
    fn duplicates_merge_keeping_the_most_usable() {
        let stale = slice_yaml(
            "web-a",
            "[{addresses: [10.244.1.1], conditions: {ready: false, serving: false}},
              {addresses: [10.244.1.2],
               conditions: {ready: false, serving: false, terminating: true}}]",
            "[{name: web, port: 80}]",
        );
        let fresh = slice_yaml(
            "web-b",
            "[{addresses: [10.244.1.1], conditions: {ready: true}},
              {addresses: [10.244.1.2],
               conditions: {ready: false, serving: true, terminating: true}}]",
            "[{name: web, port: 80}]",
        );
        for order in [[stale.as_str(), &fresh], [&fresh, &stale]] {
            let merged = endpoints(&order);
            let conditions: Vec<_> =
                merged.iter().map(|e| (e.to_string(), e.ready, e.serving)).collect();
            assert_eq!(
                conditions,
                [
                    ("10.244.1.1:80".to_owned(), true, true),
                    ("10.244.1.2:80".to_owned(), false, true)
                ]
            );
        }
    }

    #[test]
    fn ipv6_and_fqdn_slices_are_counted_in_one_note() {
        let v6 = slice_yaml("web-6", "[{addresses: ['fd00::1']}]", "[{name: web, port: 80}]")
            .replace("IPv4", "IPv6");
        let fqdn = slice_yaml("web-f", "[{addresses: [a.example]}]", "[{name: web, port: 80}]")
            .replace("IPv4", "FQDN");
        let model = model(&[&v6, &fqdn]);
        assert_eq!(model.ports[0].endpoints, []);
        assert!(model.skipped.is_empty(), "{:?}", model.skipped);
        assert_eq!(
            model.notes,
            ["2 EndpointSlice(s) with addressType IPv6 or FQDN left out (IPv4 only)"]
        );
    }

    #[test]
    fn a_malformed_slice_is_skipped_and_the_others_used() {
        let bad =
            slice_yaml("web-bad", "[{addresses: [10.244.1.9]}]", "[{name: web, port: 70000}]");
        let good = slice_yaml("web-good", "[{addresses: [10.244.1.1]}]", "[{name: web, port: 80}]");
        let model = model(&[&bad, &good]);
        assert_eq!(addresses(&model.ports[0].endpoints), ["10.244.1.1:80"]);
        assert_eq!(model.skipped.len(), 1, "{:?}", model.skipped);
        assert_eq!(model.skipped[0].object, "EndpointSlice shop/web-bad");
        assert!(
            model.skipped[0].reason.starts_with("malformed: ports[0].port"),
            "{:?}",
            model.skipped
        );
    }

    /// As kube-proxy, a malformed endpoint is left out alone: the rest of its slice still serves.
    #[test]
    fn a_malformed_endpoint_is_left_out_and_the_rest_of_its_slice_used() {
        let endpoints = "[{addresses: [10.244.1.300]}, {addresses: [10.244.1.2]}, {addresses: []}]";
        let slice = slice_yaml("web-mixed", endpoints, "[{name: web, port: 80}]");
        let model = model(&[&slice]);
        assert_eq!(addresses(&model.ports[0].endpoints), ["10.244.1.2:80"]);
        assert_eq!(
            model.skipped,
            [Skipped {
                object: "EndpointSlice shop/web-mixed".into(),
                reason: "2 of 3 endpoints malformed, left out: endpoints[0].addresses: \
                         \"10.244.1.300\" is not an IPv4 address"
                    .into(),
            }]
        );
    }
}
