//! The objects of one service (its Service, its EndpointSlices) in the normalised form the
//! model is built from, and that service's part of the model. A source keeps these instead of
//! the API objects, which are many times larger, and rebuilds only the services a change
//! names.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::{
    ServiceName, ServicePort, Skipped,
    endpoints::{KeptSlice, SERVICE_NAME_LABEL, Slice, SliceObject, port_endpoints, slice_object},
    namespace,
    service::{self, Normalised},
};
use crate::config::NodeConfig;

/// One service's objects, normalised, in the order the source gave them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceObjects {
    /// More than one only in a manifest directory (the API server cannot hold two): the first
    /// counts.
    services: Vec<Result<Normalised, NotServed>>,
    slices: Vec<SliceObject>,
}

/// A Service normalised (it does not depend on the node), or why it is not programmed: the
/// compact form a source keeps instead of the API object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptService(Result<Normalised, NotServed>);

impl KeptService {
    pub fn new(service: &Service) -> Self {
        Self(service::normalise(service).map_err(|reason| NotServed {
            by_design: reason.by_design(),
            reason: reason.to_string(),
        }))
    }
}

/// Why a Service is not programmed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NotServed {
    reason: String,
    /// Headless, ExternalName or another proxy's: not a problem.
    by_design: bool,
}

/// One service's part of the [`super::Model`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceModel {
    /// Sorted by id.
    pub ports: Vec<ServicePort>,
    pub skipped: Vec<Skipped>,
    /// Left to DNS or to another proxy (headless, ExternalName, another service-proxy-name):
    /// not programmed, and not a problem either.
    pub not_proxied: Vec<Skipped>,
    pub notes: Vec<String>,
    /// EndpointSlices with addressType IPv6 or FQDN: the model counts them in one note.
    pub not_ipv4_slices: usize,
    /// What this node answers on the service's health check node port, if it has one.
    pub health_check: Option<HealthCheck>,
}

/// A LoadBalancer service with externalTrafficPolicy Local asks each node, on its
/// `healthCheckNodePort`, whether it has endpoints of the service: load balancers send traffic
/// only to nodes that do, since the others drop it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCheck {
    pub node_port: u16,
    /// Ready endpoints (address and port) of the service on this node, over all its ports, as
    /// kube-proxy counts them.
    pub local_endpoints: usize,
}

/// The service a Service object is, from its `metadata`: its namespace and name.
pub fn service_name(metadata: &ObjectMeta) -> ServiceName {
    let name = metadata.name.as_deref().unwrap_or("<unnamed>");
    ServiceName::new(namespace(metadata), name)
}

impl ServiceObjects {
    pub fn add_service(&mut self, service: &Service) {
        self.services.push(KeptService::new(service).0);
    }

    pub fn add_kept_service(&mut self, service: &KeptService) {
        self.services.push(service.0.clone());
    }

    /// Adds a slice kept by a source, which the caller knows to belong to this service,
    /// deciding against `node` which of its endpoints are local.
    pub fn add_kept_slice(&mut self, slice: &KeptSlice, node: &NodeConfig) {
        self.slices.push(slice.resolve(node));
    }

    /// Adds `slice` to the objects of its service in `by_service`; a slice of no service (no
    /// service-name label) is nobody's and left out.
    pub fn add_slice_to(
        by_service: &mut BTreeMap<ServiceName, Self>,
        slice: &EndpointSlice,
        node: &NodeConfig,
    ) {
        if let Some((service, object)) = slice_object(slice, node) {
            by_service.entry(service).or_default().slices.push(object);
        }
    }

    /// Appends `other`'s objects after this one's (the next file of a directory, say).
    pub fn extend(&mut self, other: &Self) {
        self.services.extend(other.services.iter().cloned());
        self.slices.extend(other.slices.iter().cloned());
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.slices.is_empty()
    }

    /// This service's part of the model: its ports with their endpoints, and what was left out.
    pub fn model(&self, name: &ServiceName) -> ServiceModel {
        let mut model = ServiceModel::default();
        let mut slices: Vec<&Slice> = Vec::new();
        for slice in &self.slices {
            match slice {
                SliceObject::Used(slice) => {
                    model.skipped.extend(slice.left_out.clone());
                    slices.push(slice);
                }
                SliceObject::NotIpv4 => model.not_ipv4_slices += 1,
                SliceObject::Malformed(skipped) => model.skipped.push(skipped.clone()),
            }
        }
        // Stable: slices of the same name keep the source's order.
        slices.sort_by(|a, b| a.name.cmp(&b.name));
        let object = format!("Service {name}");
        for (index, service) in self.services.iter().enumerate() {
            if index > 0 {
                // Only a manifest directory can hold two; the API server cannot.
                let reason = "a Service of the same namespace and name came earlier".to_owned();
                model.skipped.push(Skipped { object: object.clone(), reason });
                continue;
            }
            match service {
                Ok(normalised) => {
                    model.notes.extend(normalised.notes.iter().map(|n| format!("{object}: {n}")));
                    model.ports.extend(normalised.ports.iter().map(|normalised| {
                        let mut port = normalised.port.clone();
                        port.endpoints =
                            port_endpoints(&slices, &normalised.port_name, port.id.protocol);
                        port
                    }));
                    model.health_check = normalised.health_check_node_port.map(|node_port| {
                        HealthCheck { node_port, local_endpoints: local_ready(&model.ports) }
                    });
                }
                Err(NotServed { reason, by_design }) => {
                    let skipped = Skipped { object: object.clone(), reason: reason.clone() };
                    if *by_design { &mut model.not_proxied } else { &mut model.skipped }
                        .push(skipped);
                }
            }
        }
        model.ports.sort_by(|a, b| a.id.cmp(&b.id));
        model
    }
}

/// Distinct addresses of ready endpoints on this node among `ports`' endpoints: one pod behind
/// two ports is one endpoint, as kube-proxy counts them (`LocalReadyEndpoints`).
fn local_ready(ports: &[ServicePort]) -> usize {
    let local: std::collections::BTreeSet<_> = ports
        .iter()
        .flat_map(|port| &port.endpoints)
        .filter(|endpoint| endpoint.node_local && endpoint.ready)
        .map(|endpoint| endpoint.ip)
        .collect();
    local.len()
}

/// The service an EndpointSlice belongs to, from its `metadata`: the one its service-name label
/// names, in its namespace.
pub fn slice_service_name(metadata: &ObjectMeta) -> Option<ServiceName> {
    let labels = metadata.labels.as_ref();
    let service = labels.and_then(|l| l.get(SERVICE_NAME_LABEL))?;
    Some(ServiceName::new(namespace(metadata), service.as_str()))
}

/// The objects of every service, by service.
pub fn by_service(
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeConfig,
) -> BTreeMap<ServiceName, ServiceObjects> {
    let mut by_service: BTreeMap<ServiceName, ServiceObjects> = BTreeMap::new();
    for service in services {
        by_service.entry(service_name(&service.metadata)).or_default().add_service(service);
    }
    for slice in slices {
        ServiceObjects::add_slice_to(&mut by_service, slice, node);
    }
    by_service
}
