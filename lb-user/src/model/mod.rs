//! The desired state: Kubernetes Services and EndpointSlices plus the node configuration,
//! normalised into one entry per service port with the endpoints it may use on this node.
//!
//! Building never fails as a whole: an object that cannot be programmed (by design, such as a
//! headless service, or because it is malformed) is listed in [`Model::skipped`] with the reason,
//! and everything else is still built. Parts of a programmed object that are left out (IPv6
//! addresses of a dual-stack service, for instance) are listed in [`Model::notes`].
//!
//! Only IPv4 is modelled for now.

mod address;
mod endpoints;
mod frontend;
mod objects;
mod service;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod seed_tests;

use std::{fmt, net::Ipv4Addr};

use ipnet::Ipv4Net;
use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

pub use self::{
    endpoints::{KeptSlice, NodeNames, keep_slice},
    frontend::{Frontend, FrontendKind},
    objects::{
        HealthCheck, KeptService, ServiceModel, ServiceObjects, by_service, service_name,
        slice_service_name,
    },
};
use crate::config::NodeConfig;

/// A service port's transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses the API's spelling; an absent protocol is TCP, as the API server defaults it.
    fn from_api(protocol: Option<&str>) -> Option<Self> {
        match protocol {
            None | Some("TCP") => Some(Self::Tcp),
            Some("UDP") => Some(Self::Udp),
            Some("SCTP") => Some(Self::Sctp),
            Some(_) => None,
        }
    }

    /// Lower case, as in the scenario files and the `/udp` suffix of a [`ServicePortId`].
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Names one service: the unit the control plane rebuilds and reprograms when its Service or
/// one of its EndpointSlices changes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

impl ServiceName {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Names one service port. Displayed `namespace/name:port`, with `/udp` or `/sctp` appended for
/// those protocols: TCP is by far the common case, and the suffix keeps the two halves of a
/// service such as DNS (53/udp and 53/tcp) apart.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortId {
    pub namespace: String,
    pub name: String,
    /// The service port (not the target port).
    pub port: u16,
    pub protocol: Protocol,
}

impl ServicePortId {
    /// The service this port belongs to.
    pub fn service(&self) -> ServiceName {
        ServiceName::new(&self.namespace, &self.name)
    }

    /// Whether this port belongs to `service`, without building a [`ServiceName`].
    pub fn belongs_to(&self, service: &ServiceName) -> bool {
        self.namespace == service.namespace && self.name == service.name
    }
}

impl fmt::Display for ServicePortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}:{}", self.namespace, self.name, self.port)?;
        if self.protocol != Protocol::Tcp {
            write!(f, "/{}", self.protocol)?;
        }
        Ok(())
    }
}

/// One backend address of a service port, with its EndpointSlice conditions resolved.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "the EndpointSlice conditions are independent flags in the API too"
)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    /// The resolved target port.
    pub port: u16,
    /// The endpoint runs on this node.
    pub node_local: bool,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Its topology hints for zones (`hints.forZones`) and for nodes (`hints.forNodes`).
    pub zone_hint: Hint,
    pub node_hint: Hint,
}

/// What one kind of an endpoint's topology hints says about this node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hint {
    /// No hint of this kind.
    #[default]
    None,
    /// For other zones (or nodes) only.
    Elsewhere,
    /// For this node's zone (or this node).
    Here,
}

impl Endpoint {
    /// How usable the conditions make an endpoint, for merging duplicates: ready, else serving
    /// while terminating, else not at all.
    fn usability(&self) -> u8 {
        match (self.ready, self.serving && self.terminating) {
            (true, _) => 2,
            (false, true) => 1,
            (false, false) => 0,
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ip, self.port)
    }
}

/// Where a packet comes from and goes, which decides the traffic policy that applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traffic {
    /// From outside the cluster to an external address (NodePort, externalIP, LoadBalancer
    /// IP): externalTrafficPolicy applies.
    External,
    /// To a ClusterIP: internalTrafficPolicy applies.
    Internal,
    /// From a pod or the node itself to an external address: kube-proxy short-circuits it to
    /// the cluster's endpoints, and neither policy applies.
    InsideToExternal,
}

impl Traffic {
    /// The traffic of a packet to a frontend of `kind`, from inside the cluster or not.
    pub fn of(kind: FrontendKind, from_inside: bool) -> Self {
        match (kind, from_inside) {
            (FrontendKind::ClusterIp, _) => Self::Internal,
            (_, false) => Self::External,
            (_, true) => Self::InsideToExternal,
        }
    }
}

/// One port of one service, with everything the datapath needs to serve it on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub id: ServicePortId,
    pub cluster_ip: Ipv4Addr,
    /// The service port, also the port of external and LoadBalancer IPs.
    pub port: u16,
    pub node_port: Option<u16>,
    pub external_ips: Vec<Ipv4Addr>,
    pub load_balancer_ips: Vec<Ipv4Addr>,
    /// externalTrafficPolicy Local on a service reachable from outside.
    pub external_policy_local: bool,
    /// internalTrafficPolicy Local.
    pub internal_policy_local: bool,
    /// sessionAffinity ClientIP and its timeout.
    pub affinity_timeout_s: Option<u32>,
    /// Sources allowed to reach the LoadBalancer IPs; empty allows all.
    pub source_ranges: Vec<Ipv4Net>,
    /// Sorted by address and port, without duplicates.
    pub endpoints: Vec<Endpoint>,
}

impl ServicePort {
    /// The endpoints a new flow of this kind of traffic may use (kube-proxy's
    /// `CategorizeEndpoints`): all endpoints, or only local ones when the traffic's policy is
    /// Local; among them the ready ones, or if none is ready the serving ones that are
    /// terminating, so that a rolling update still finishes in-flight work; never non-serving
    /// ones. The fallback looks only at the policy-filtered set: a Local policy never spills
    /// traffic to another node.
    pub fn backends(&self, traffic: Traffic) -> Vec<&Endpoint> {
        let local_only = match traffic {
            Traffic::External => self.external_policy_local,
            Traffic::Internal => self.internal_policy_local,
            Traffic::InsideToExternal => false,
        };
        let allowed = || self.endpoints.iter().filter(move |e| e.node_local || !local_only);
        let ready: Vec<_> = allowed().filter(|e| e.ready).collect();
        if !ready.is_empty() {
            return if local_only { ready } else { prefer_close(ready) };
        }
        allowed().filter(|e| e.serving && e.terminating).collect()
    }
}

/// Topology-aware routing, for endpoints any node may use (kube-proxy's `topologyModeFromHints`
/// and `availableForTopology`): when every ready endpoint has node hints and one is for this
/// node, only the endpoints hinted for this node; else when every one has zone hints and one is
/// for this node's zone, only those hinted for this zone; otherwise all. One kind of hint
/// decides: node hints that name other nodes only must not empty the set where zone hints
/// would not.
fn prefer_close(ready: Vec<&Endpoint>) -> Vec<&Endpoint> {
    let usable = |hint: fn(&Endpoint) -> Hint| {
        ready.iter().all(|e| hint(e) != Hint::None) && ready.iter().any(|e| hint(e) == Hint::Here)
    };
    let hint: fn(&Endpoint) -> Hint = if usable(|e| e.node_hint) {
        |e| e.node_hint
    } else if usable(|e| e.zone_hint) {
        |e| e.zone_hint
    } else {
        return ready;
    };
    ready.into_iter().filter(|e| hint(e) == Hint::Here).collect()
}

/// An object left out of the model, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Skipped {
    /// `Kind namespace/name`, e.g. `Service default/headless`.
    pub object: String,
    pub reason: String,
}

/// The desired state of this node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Model {
    /// Sorted by id.
    pub ports: Vec<ServicePort>,
    /// The node IPs NodePorts listen on (from the node configuration).
    pub node_port_addresses: Vec<Ipv4Addr>,
    /// Objects not programmed, sorted.
    pub skipped: Vec<Skipped>,
    /// Parts of objects left out, and counts of objects left out in bulk, sorted.
    pub notes: Vec<String>,
}

impl Model {
    /// The service port a packet to `ip:port` over `protocol` addresses, and through which kind
    /// of address. If two service ports claim the same address (possible with external IPs),
    /// the first by id answers.
    pub fn lookup(
        &self,
        ip: Ipv4Addr,
        port: u16,
        protocol: Protocol,
    ) -> Option<(&ServicePort, FrontendKind)> {
        self.ports.iter().find_map(|service_port| {
            service_port
                .frontends(&self.node_port_addresses)
                .into_iter()
                .find(|f| f.ip == ip && f.port == port && f.protocol == protocol)
                .map(|f| (service_port, f.kind))
        })
    }
}

/// Builds this node's model from the cluster's objects.
pub fn build(services: &[Service], slices: &[EndpointSlice], node: &NodeConfig) -> Model {
    let mut model = Model { node_port_addresses: node.node_port_addresses(), ..Model::default() };
    let mut not_ipv4_slices = 0;
    for (name, objects) in by_service(services, slices, node) {
        let part = objects.model(&name);
        model.ports.extend(part.ports);
        model.skipped.extend(part.skipped);
        model.skipped.extend(part.not_proxied);
        model.notes.extend(part.notes);
        not_ipv4_slices += part.not_ipv4_slices;
    }
    if let Some(note) = not_ipv4_note(not_ipv4_slices) {
        model.notes.push(note);
    }
    model.ports.sort_by(|a, b| a.id.cmp(&b.id));
    model.skipped.sort();
    model.notes.sort();
    model
}

/// The one note for every slice left out for its address type.
pub fn not_ipv4_note(slices: usize) -> Option<String> {
    (slices > 0).then(|| {
        format!("{slices} EndpointSlice(s) with addressType IPv6 or FQDN left out (IPv4 only)")
    })
}

/// The namespace an object without one lands in, as with `kubectl apply`.
const DEFAULT_NAMESPACE: &str = "default";

/// An object's namespace, `default` when the object names none.
pub(crate) fn namespace(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
}

/// `Kind namespace/name`, for skipped objects and notes.
fn object_name(kind: &str, meta: &ObjectMeta) -> String {
    format!("{kind} {}/{}", namespace(meta), meta.name.as_deref().unwrap_or("<unnamed>"))
}

#[cfg(test)]
mod tests {
    use super::{fixtures::*, *};

    /// The condition combinations that matter to [`ServicePort::backends`].
    #[derive(Clone, Copy)]
    enum State {
        Ready,
        ServingTerminating,
        /// Terminating and no longer serving.
        Terminating,
        NotReady,
    }

    fn endpoint(ip: [u8; 4], node_local: bool, state: State) -> Endpoint {
        let (ready, serving, terminating) = match state {
            State::Ready => (true, true, false),
            State::ServingTerminating => (false, true, true),
            State::Terminating => (false, false, true),
            State::NotReady => (false, false, false),
        };
        Endpoint {
            ip: ip.into(),
            port: 80,
            node_local,
            ready,
            serving,
            terminating,
            zone_hint: Hint::None,
            node_hint: Hint::None,
        }
    }

    fn port_with(
        endpoints: Vec<Endpoint>,
        external_local: bool,
        internal_local: bool,
    ) -> ServicePort {
        ServicePort {
            id: ServicePortId {
                namespace: "default".into(),
                name: "web".into(),
                port: 80,
                protocol: Protocol::Tcp,
            },
            cluster_ip: Ipv4Addr::new(10, 96, 0, 1),
            port: 80,
            node_port: None,
            external_ips: vec![],
            load_balancer_ips: vec![],
            external_policy_local: external_local,
            internal_policy_local: internal_local,
            affinity_timeout_s: None,
            source_ranges: vec![],
            endpoints,
        }
    }

    fn ips(backends: &[&Endpoint]) -> Vec<String> {
        backends.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn service_port_id_display_marks_only_non_tcp() {
        let mut id = ServicePortId {
            namespace: "default".into(),
            name: "my-nginx".into(),
            port: 80,
            protocol: Protocol::Tcp,
        };
        assert_eq!(id.to_string(), "default/my-nginx:80");
        id.protocol = Protocol::Udp;
        assert_eq!(id.to_string(), "default/my-nginx:80/udp");
        id.protocol = Protocol::Sctp;
        assert_eq!(id.to_string(), "default/my-nginx:80/sctp");
    }

    #[test]
    fn backends_prefer_ready_endpoints() {
        let port = port_with(
            vec![
                endpoint([10, 0, 0, 1], true, State::Ready),
                endpoint([10, 0, 0, 2], false, State::ServingTerminating),
                endpoint([10, 0, 0, 3], false, State::Ready),
            ],
            false,
            false,
        );
        assert_eq!(ips(&port.backends(Traffic::Internal)), ["10.0.0.1:80", "10.0.0.3:80"]);
        assert_eq!(ips(&port.backends(Traffic::External)), ["10.0.0.1:80", "10.0.0.3:80"]);
    }

    #[test]
    fn backends_fall_back_to_serving_terminating_never_to_non_serving() {
        let port = port_with(
            vec![
                endpoint([10, 0, 0, 1], true, State::ServingTerminating),
                endpoint([10, 0, 0, 2], true, State::Terminating),
                endpoint([10, 0, 0, 3], true, State::NotReady),
            ],
            false,
            false,
        );
        assert_eq!(ips(&port.backends(Traffic::Internal)), ["10.0.0.1:80"]);
        let none = port_with(vec![endpoint([10, 0, 0, 2], true, State::Terminating)], false, false);
        assert_eq!(none.backends(Traffic::Internal), Vec::<&Endpoint>::new());
    }

    #[test]
    fn local_policies_keep_local_endpoints_for_their_traffic_only() {
        let endpoints = vec![
            endpoint([10, 0, 0, 1], true, State::Ready),
            endpoint([10, 0, 0, 2], false, State::Ready),
        ];
        let external_local = port_with(endpoints.clone(), true, false);
        assert_eq!(ips(&external_local.backends(Traffic::External)), ["10.0.0.1:80"]);
        assert_eq!(external_local.backends(Traffic::Internal).len(), 2);
        let internal_local = port_with(endpoints, false, true);
        assert_eq!(internal_local.backends(Traffic::External).len(), 2);
        assert_eq!(ips(&internal_local.backends(Traffic::Internal)), ["10.0.0.1:80"]);
    }

    #[test]
    fn fallback_applies_to_the_policy_filtered_set() {
        // A remote ready endpoint must not hide the local terminating one, and must not be used.
        let port = port_with(
            vec![
                endpoint([10, 0, 0, 1], true, State::ServingTerminating),
                endpoint([10, 0, 0, 2], false, State::Ready),
            ],
            true,
            false,
        );
        assert_eq!(ips(&port.backends(Traffic::External)), ["10.0.0.1:80"]);
        assert_eq!(ips(&port.backends(Traffic::Internal)), ["10.0.0.2:80"]);
    }

    #[test]
    fn build_sorts_ports_and_attaches_endpoints() {
        let services = [
            service(
                "metadata: {name: b, namespace: default}
spec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}",
            ),
            service(
                "metadata: {name: a, namespace: default}
spec: {clusterIP: 10.96.0.1, ports: [{port: 443}, {port: 53, protocol: UDP, name: dns}]}",
            ),
        ];
        let slices = [slice(
            "metadata: {name: a-1, namespace: default, labels: {kubernetes.io/service-name: a}}
addressType: IPv4
endpoints: [{addresses: [10.244.0.1], nodeName: node-a}]
ports: [{port: 8443}, {name: dns, port: 5353, protocol: UDP}]",
        )];
        let model = build(&services, &slices, &node());
        let ids: Vec<_> = model.ports.iter().map(|p| p.id.to_string()).collect();
        assert_eq!(ids, ["default/a:53/udp", "default/a:443", "default/b:80"]);
        assert_eq!(model.ports[0].endpoints[0].to_string(), "10.244.0.1:5353");
        assert_eq!(model.ports[1].endpoints[0].to_string(), "10.244.0.1:8443");
        assert!(model.ports[0].endpoints[0].node_local);
        assert_eq!(model.ports[2].endpoints, []);
        assert!(model.skipped.is_empty(), "{:?}", model.skipped);
    }

    #[test]
    fn a_duplicate_service_is_skipped() {
        let yaml = "metadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}";
        let model = build(&[service(yaml), service(yaml)], &[], &node());
        assert_eq!(model.ports.len(), 1);
        assert_eq!(model.skipped.len(), 1);
        assert_eq!(model.skipped[0].object, "Service default/a");
    }

    /// Headless and ExternalName services are left out by design, apart from problems: the
    /// daemon logs those at debug level, where a cluster's thousands of headless services
    /// would otherwise fill its warnings.
    #[test]
    fn services_left_to_dns_are_not_problems() {
        let services = [
            service("metadata: {name: bad}\nspec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}"),
            service("metadata: {name: dns}\nspec: {type: ExternalName, externalName: a.example}"),
            service("metadata: {name: pods}\nspec: {clusterIP: None, ports: [{port: 80}]}"),
        ];
        let parts: std::collections::BTreeMap<_, _> = by_service(&services, &[], &node())
            .into_iter()
            .map(|(name, objects)| (name.name.clone(), objects.model(&name)))
            .collect();
        assert_eq!(parts["bad"].skipped.len(), 1, "a malformed one is a problem");
        assert_eq!(parts["bad"].not_proxied, []);
        for name in ["dns", "pods"] {
            assert!(parts[name].skipped.is_empty(), "{name}: {:?}", parts[name].skipped);
            assert_eq!(parts[name].not_proxied.len(), 1, "{name}");
        }
        // The whole model, which `trace` explains, still lists all three.
        assert_eq!(build(&services, &[], &node()).skipped.len(), 3);
    }

    #[test]
    fn one_malformed_service_does_not_stop_the_others() {
        let services = [
            service("metadata: {name: bad}\nspec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}"),
            service("metadata: {name: good}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}"),
        ];
        let model = build(&services, &[], &node());
        assert_eq!(model.ports.len(), 1);
        assert_eq!(model.ports[0].id.name, "good");
        assert_eq!(
            model.skipped,
            [Skipped {
                object: "Service default/bad".into(),
                reason: "malformed: spec.clusterIP \"10.96.0.300\" is not an IP address".into(),
            }]
        );
    }

    #[test]
    fn lookup_finds_every_kind_of_frontend() {
        let services = [service(
            "metadata: {name: lb}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.1
  externalIPs: [192.168.1.200]
  ports: [{port: 80, nodePort: 30080}]
status: {loadBalancer: {ingress: [{ip: 198.51.100.1}]}}",
        )];
        let model = build(&services, &[], &node());
        let find = |ip: [u8; 4], port| model.lookup(ip.into(), port, Protocol::Tcp).map(|l| l.1);
        assert_eq!(find([10, 96, 0, 1], 80), Some(FrontendKind::ClusterIp));
        assert_eq!(find([192, 168, 1, 63], 30080), Some(FrontendKind::NodePort));
        assert_eq!(find([192, 168, 1, 200], 80), Some(FrontendKind::ExternalIp));
        assert_eq!(find([198, 51, 100, 1], 80), Some(FrontendKind::LoadBalancer));
        assert_eq!(find([10, 96, 0, 1], 443), None);
        assert_eq!(model.lookup(Ipv4Addr::new(10, 96, 0, 1), 80, Protocol::Udp), None);
    }

    #[test]
    fn a_local_load_balancer_counts_its_ready_endpoints_on_this_node_for_its_health_check() {
        let load_balancer = |extra: &str| {
            service(&format!(
                "metadata: {{name: web, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.5
  healthCheckNodePort: 32100
  ports: [{{name: http, port: 80, nodePort: 30080}}, {{name: https, port: 443, nodePort: 30443}}]
  {extra}"
            ))
        };
        let slice = slice(
            "metadata:
  name: web-1
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints:
- {addresses: [10.244.1.10], nodeName: node-a, conditions: {ready: true}}
- {addresses: [10.244.1.11], nodeName: node-a, conditions: {ready: false}}
- {addresses: [10.244.2.10], nodeName: node-b, conditions: {ready: true}}
ports: [{name: http, port: 8080}, {name: https, port: 8443}]",
        );
        let name = ServiceName::new("default", "web");
        let health_check = |service: &Service| {
            let objects =
                by_service(std::slice::from_ref(service), std::slice::from_ref(&slice), &node());
            objects[&name].model(&name).health_check
        };
        // One ready local pod behind two ports: one endpoint, as kube-proxy counts them.
        assert_eq!(
            health_check(&load_balancer("externalTrafficPolicy: Local")),
            Some(HealthCheck { node_port: 32100, local_endpoints: 1 })
        );
        // Cluster policy: every node may take the traffic, and the API allocates no port.
        assert_eq!(health_check(&load_balancer("externalTrafficPolicy: Cluster")), None);
    }

    #[test]
    fn pods_reaching_an_external_address_get_every_endpoint_whatever_the_policies() {
        let endpoints = vec![
            endpoint([10, 0, 0, 1], true, State::Ready),
            endpoint([10, 0, 0, 2], false, State::Ready),
        ];
        let port = port_with(endpoints, true, true);
        assert_eq!(ips(&port.backends(Traffic::External)), ["10.0.0.1:80"]);
        assert_eq!(ips(&port.backends(Traffic::Internal)), ["10.0.0.1:80"]);
        // kube-proxy's short-circuit of in-cluster traffic to its cluster chain.
        assert_eq!(ips(&port.backends(Traffic::InsideToExternal)), ["10.0.0.1:80", "10.0.0.2:80"]);
        assert_eq!(Traffic::of(FrontendKind::NodePort, true), Traffic::InsideToExternal);
        assert_eq!(Traffic::of(FrontendKind::NodePort, false), Traffic::External);
        assert_eq!(Traffic::of(FrontendKind::ClusterIp, false), Traffic::Internal);
    }

    fn hinted(ip: [u8; 4], ready: bool, zone_hint: Hint, node_hint: Hint) -> Endpoint {
        let state = if ready { State::Ready } else { State::NotReady };
        Endpoint { zone_hint, node_hint, ..endpoint(ip, false, state) }
    }

    #[test]
    fn topology_hints_keep_traffic_close_only_when_every_ready_endpoint_has_them() {
        use Hint::{Elsewhere, Here, None as No};
        let backends = |endpoints: Vec<Endpoint>| {
            let port = port_with(endpoints, false, false);
            let internal = ips(&port.backends(Traffic::Internal));
            assert_eq!(internal, ips(&port.backends(Traffic::External)), "Cluster policy: same");
            internal
        };
        let zone_here = hinted([10, 0, 0, 1], true, Here, No);
        let zone_elsewhere = hinted([10, 0, 0, 2], true, Elsewhere, No);
        assert_eq!(backends(vec![zone_here.clone(), zone_elsewhere.clone()]), ["10.0.0.1:80"]);
        // A not-ready endpoint without hints does not count.
        let not_ready = hinted([10, 0, 0, 3], false, No, No);
        assert_eq!(
            backends(vec![zone_here.clone(), zone_elsewhere.clone(), not_ready]),
            ["10.0.0.1:80"]
        );
        // A ready one without hints turns topology off, and so does no hint for this zone.
        let unhinted = hinted([10, 0, 0, 4], true, No, No);
        assert_eq!(backends(vec![zone_here.clone(), unhinted]).len(), 2);
        assert_eq!(backends(vec![zone_elsewhere.clone(), zone_elsewhere.clone()]).len(), 2);
        // Node hints (trafficDistribution PreferSameNode) come first, where every one has them.
        let this_node = hinted([10, 0, 0, 5], true, Elsewhere, Here);
        let other_node = hinted([10, 0, 0, 6], true, Here, Elsewhere);
        assert_eq!(backends(vec![this_node, other_node.clone()]), ["10.0.0.5:80"]);
        // A node none of them is hinted for falls back to zone hints, with both kinds on each
        // endpoint (as the EndpointSlice controller writes them for PreferSameNode).
        let third_node = hinted([10, 0, 0, 9], true, Elsewhere, Elsewhere);
        assert_eq!(backends(vec![third_node, other_node]), ["10.0.0.6:80"]);
        // A Local policy already keeps traffic on this node: hints do not narrow it further.
        let local = |hint| Endpoint { node_local: true, ..hinted([10, 0, 0, 7], true, hint, No) };
        let port = port_with(
            vec![local(Elsewhere), Endpoint { ip: [10, 0, 0, 8].into(), ..local(Here) }],
            true,
            true,
        );
        assert_eq!(port.backends(Traffic::Internal).len(), 2);
    }

    #[test]
    fn zone_hints_are_read_from_endpoint_slices_against_the_node_zone() {
        let web = service(
            "metadata: {name: web, namespace: default}\nspec: {clusterIP: 10.96.0.5, ports: [{port: 80}]}",
        );
        let slice = slice(
            "metadata:
  name: web-1
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints:
- {addresses: [10.244.1.10], zone: a, hints: {forZones: [{name: a}]}}
- {addresses: [10.244.2.10], zone: b, hints: {forZones: [{name: b}]}}
ports: [{port: 8080}]",
        );
        let backends = |zone: Option<&str>| {
            let node = NodeConfig { zone: zone.map(str::to_owned), ..node() };
            let model = build(std::slice::from_ref(&web), std::slice::from_ref(&slice), &node);
            ips(&model.ports[0].backends(Traffic::Internal))
        };
        assert_eq!(backends(Some("a")), ["10.244.1.10:8080"]);
        assert_eq!(backends(Some("b")), ["10.244.2.10:8080"]);
        // A node without a zone uses every endpoint.
        assert_eq!(backends(None).len(), 2);
    }
}
