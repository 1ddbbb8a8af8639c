//! A Service's spec and status, normalised into service ports (without their endpoints).
//!
//! Anything malformed skips the whole service rather than the offending part: programming a
//! service without, say, its loadBalancerSourceRanges would widen access, and half a service is
//! harder to notice than a skipped one.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
};

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::{Service, ServiceSpec, ServiceStatus};

use super::{Protocol, ServicePort, ServicePortId, address, namespace};

/// Set by a service that another proxy implementation serves (KEP-2447): kube-proxy leaves it
/// alone, and so do we.
pub(super) const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// sessionAffinity ClientIP's timeout when the spec gives none (the API's default, 3 hours).
pub(super) const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// The API's upper bound for `sessionAffinityConfig.clientIP.timeoutSeconds` (one day).
const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// A service port before its endpoints are attached; EndpointSlice ports match on `port_name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct NormalisedPort {
    pub port_name: String,
    pub port: ServicePort,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Normalised {
    pub ports: Vec<NormalisedPort>,
    /// `spec.healthCheckNodePort` of a LoadBalancer with externalTrafficPolicy Local: where
    /// the node tells load balancers whether it has endpoints of the service.
    pub health_check_node_port: Option<u16>,
    /// Parts left out, such as IPv6 addresses of a dual-stack service.
    pub notes: Vec<String>,
}

/// Why a service is not programmed.
#[derive(Debug, thiserror::Error)]
pub(super) enum NotProgrammed {
    #[error("label {SERVICE_PROXY_NAME_LABEL}={0:?}: served by another proxy")]
    OtherProxy(String),

    #[error("no spec")]
    NoSpec,

    #[error("type ExternalName: a DNS alias, nothing to proxy")]
    ExternalName,

    #[error("headless (no cluster IP): clients reach the endpoints directly")]
    Headless,

    #[error("IPv6 cluster IP {0}: only IPv4 is supported for now")]
    Ipv6(String),

    #[error("no ports")]
    NoPorts,

    #[error("malformed: {0}")]
    Malformed(String),
}

impl NotProgrammed {
    /// Not a problem: a service that no proxy of this kind serves (kube-proxy leaves these out
    /// without a word).
    pub(super) fn by_design(&self) -> bool {
        matches!(self, Self::OtherProxy(_) | Self::ExternalName | Self::Headless)
    }
}

fn malformed(reason: impl Into<String>) -> NotProgrammed {
    NotProgrammed::Malformed(reason.into())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalName,
}

/// What every port of a service shares.
struct Shared {
    namespace: String,
    name: String,
    service_type: ServiceType,
    cluster_ip: Ipv4Addr,
    external: ExternalAddresses,
    external_policy_local: bool,
    internal_policy_local: bool,
    affinity_timeout_s: Option<u32>,
}

/// The addresses a service is reached at from outside the cluster, besides NodePorts.
struct ExternalAddresses {
    external_ips: Vec<Ipv4Addr>,
    load_balancer_ips: Vec<Ipv4Addr>,
    source_ranges: Vec<Ipv4Net>,
}

pub(super) fn normalise(service: &Service) -> Result<Normalised, NotProgrammed> {
    let (spec, service_type) = programmable(service)?;
    let name =
        service.metadata.name.clone().ok_or_else(|| malformed("metadata.name is missing"))?;
    let cluster_ip = cluster_ip(spec)?;
    let ports = spec.ports.as_deref().filter(|p| !p.is_empty()).ok_or(NotProgrammed::NoPorts)?;
    let mut notes = Vec::new();
    let external = external_addresses(spec, service.status.as_ref(), service_type, &mut notes)?;
    let external_policy_local =
        is_local_policy("spec.externalTrafficPolicy", spec.external_traffic_policy.as_deref())?;
    let externally_reachable =
        matches!(service_type, ServiceType::NodePort | ServiceType::LoadBalancer)
            || !external.external_ips.is_empty();
    let shared = Shared {
        namespace: namespace(&service.metadata).to_owned(),
        name,
        service_type,
        cluster_ip,
        external,
        // The policy only means something for traffic that can come from outside.
        external_policy_local: external_policy_local && externally_reachable,
        internal_policy_local: is_local_policy(
            "spec.internalTrafficPolicy",
            spec.internal_traffic_policy.as_deref(),
        )?,
        affinity_timeout_s: affinity_timeout(spec)?,
    };
    let health_check_node_port = match spec.health_check_node_port {
        // The API server allocates one only for this kind of service; 0 or absent: none.
        Some(port)
            if port != 0 && service_type == ServiceType::LoadBalancer && external_policy_local =>
        {
            Some(port_number("spec.healthCheckNodePort", port).map_err(malformed)?)
        }
        _ => None,
    };
    let ports = service_ports(&shared, ports)?;
    Ok(Normalised { ports, health_check_node_port, notes })
}

/// The spec and type of a service this proxy serves, or why it is not served.
fn programmable(service: &Service) -> Result<(&ServiceSpec, ServiceType), NotProgrammed> {
    let labels = service.metadata.labels.as_ref();
    if let Some(proxy) = labels.and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL)) {
        return Err(NotProgrammed::OtherProxy(proxy.clone()));
    }
    let spec = service.spec.as_ref().ok_or(NotProgrammed::NoSpec)?;
    match service_type(spec)? {
        ServiceType::ExternalName => Err(NotProgrammed::ExternalName),
        service_type => Ok((spec, service_type)),
    }
}

fn external_addresses(
    spec: &ServiceSpec,
    status: Option<&ServiceStatus>,
    service_type: ServiceType,
    notes: &mut Vec<String>,
) -> Result<ExternalAddresses, NotProgrammed> {
    let external_ips =
        ipv4_addresses("spec.externalIPs", spec.external_ips.iter().flatten(), notes)?;
    let mut load_balancer_ips = if service_type == ServiceType::LoadBalancer {
        load_balancer_ips(status, notes)?
    } else {
        Vec::new()
    };
    let (source_ranges, none_for_ipv4) = source_ranges(spec, notes)?;
    if none_for_ipv4 && !load_balancer_ips.is_empty() {
        // Ranges were given but none is IPv4: no IPv4 source may reach the LoadBalancer IPs, which
        // an empty list (allow all) cannot say. Leaving the IPs out denies them.
        notes.push(format!(
            "LoadBalancer IPs {load_balancer_ips:?} left out: loadBalancerSourceRanges allow no \
             IPv4 source"
        ));
        load_balancer_ips.clear();
    }
    Ok(ExternalAddresses { external_ips, load_balancer_ips, source_ranges })
}

fn service_type(spec: &ServiceSpec) -> Result<ServiceType, NotProgrammed> {
    match spec.type_.as_deref() {
        None | Some("ClusterIP") => Ok(ServiceType::ClusterIp),
        Some("NodePort") => Ok(ServiceType::NodePort),
        Some("LoadBalancer") => Ok(ServiceType::LoadBalancer),
        Some("ExternalName") => Ok(ServiceType::ExternalName),
        Some(other) => Err(malformed(format!("spec.type {other:?} is not a service type"))),
    }
}

/// The service's IPv4 cluster IP. A dual-stack service lists both families in `clusterIPs`
/// (the first being `clusterIP`); like kube-proxy's IPv4 proxier we serve its IPv4 one.
fn cluster_ip(spec: &ServiceSpec) -> Result<Ipv4Addr, NotProgrammed> {
    let primary = spec.cluster_ip.as_deref().unwrap_or_default();
    if primary.is_empty() || primary == "None" {
        return Err(NotProgrammed::Headless);
    }
    let all = spec.cluster_ips.as_deref().filter(|ips| !ips.is_empty());
    let candidates =
        all.map_or_else(|| vec![primary], |ips| ips.iter().map(String::as_str).collect());
    for text in &candidates {
        if let IpAddr::V4(ip) = parse_ip("spec.clusterIP", text)? {
            return Ok(ip);
        }
    }
    Err(NotProgrammed::Ipv6(primary.to_owned()))
}

fn parse_ip(field: &str, text: &str) -> Result<IpAddr, NotProgrammed> {
    address::parse_ip(text)
        .ok_or_else(|| malformed(format!("{field} {text:?} is not an IP address")))
}

/// Parses addresses, leaving IPv6 ones out with a note.
fn ipv4_addresses<'a>(
    field: &str,
    texts: impl IntoIterator<Item = &'a String>,
    notes: &mut Vec<String>,
) -> Result<Vec<Ipv4Addr>, NotProgrammed> {
    let mut ipv4 = Vec::new();
    for text in texts {
        match parse_ip(field, text)? {
            IpAddr::V4(ip) => ipv4.push(ip),
            IpAddr::V6(ip) => notes.push(format!("{field}: IPv6 {ip} left out (IPv4 only)")),
        }
    }
    Ok(ipv4)
}

/// The ingress IPs the cloud's load balancer sends to. Hostname-only entries have no IP to
/// serve. Entries with ipMode Proxy are left out as kube-proxy does (Kubernetes 1.30+): that load
/// balancer delivers to the node with its own address as destination, so capturing the IP here
/// would short-circuit in-cluster clients past it.
fn load_balancer_ips(
    status: Option<&ServiceStatus>,
    notes: &mut Vec<String>,
) -> Result<Vec<Ipv4Addr>, NotProgrammed> {
    let ingress = status.and_then(|s| s.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_ref());
    let ips = ingress
        .into_iter()
        .flatten()
        .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|i| i.ip.as_ref());
    ipv4_addresses("status.loadBalancer.ingress.ip", ips, notes)
}

/// The IPv4 loadBalancerSourceRanges, and whether ranges were given but none of them is IPv4.
/// A range that does not parse skips the service: dropping it would widen access.
fn source_ranges(
    spec: &ServiceSpec,
    notes: &mut Vec<String>,
) -> Result<(Vec<Ipv4Net>, bool), NotProgrammed> {
    let texts = spec.load_balancer_source_ranges.as_deref().unwrap_or_default();
    let mut ranges = Vec::new();
    for text in texts {
        // The API server accepts surrounding blanks here, and kube-proxy trims them.
        let net = address::parse_cidr(text.trim()).ok_or_else(|| {
            malformed(format!("spec.loadBalancerSourceRanges {text:?} is not a CIDR"))
        })?;
        match net {
            IpNet::V4(net) => ranges.push(net.trunc()),
            IpNet::V6(net) => {
                notes.push(format!(
                    "spec.loadBalancerSourceRanges: IPv6 {net} left out (IPv4 only)"
                ));
            }
        }
    }
    let none_for_ipv4 = !texts.is_empty() && ranges.is_empty();
    Ok((ranges, none_for_ipv4))
}

fn is_local_policy(field: &str, policy: Option<&str>) -> Result<bool, NotProgrammed> {
    match policy {
        None | Some("Cluster") => Ok(false),
        Some("Local") => Ok(true),
        Some(other) => Err(malformed(format!("{field} {other:?} is neither Cluster nor Local"))),
    }
}

fn affinity_timeout(spec: &ServiceSpec) -> Result<Option<u32>, NotProgrammed> {
    match spec.session_affinity.as_deref() {
        None | Some("None") => return Ok(None),
        Some("ClientIP") => {}
        Some(other) => {
            return Err(malformed(format!(
                "spec.sessionAffinity {other:?} is neither None nor ClientIP"
            )));
        }
    }
    let configured = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    let Some(seconds) = configured else { return Ok(Some(DEFAULT_AFFINITY_TIMEOUT_S)) };
    match u32::try_from(seconds) {
        Ok(s) if (1..=MAX_AFFINITY_TIMEOUT_S).contains(&s) => Ok(Some(s)),
        _ => Err(malformed(format!(
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds {seconds} is outside \
             1..={MAX_AFFINITY_TIMEOUT_S}"
        ))),
    }
}

fn service_ports(
    shared: &Shared,
    ports: &[k8s_openapi::api::core::v1::ServicePort],
) -> Result<Vec<NormalisedPort>, NotProgrammed> {
    let mut seen = BTreeSet::new();
    let mut normalised = Vec::with_capacity(ports.len());
    for (index, port) in ports.iter().enumerate() {
        let field = format!("spec.ports[{index}]");
        let port = service_port(shared, &field, port)?;
        if !seen.insert((port.port.port, port.port.id.protocol)) {
            // The API server rejects this; two entries would fight over one frontend.
            return Err(malformed(format!(
                "{field}: port {}/{} is listed twice",
                port.port.port, port.port.id.protocol
            )));
        }
        normalised.push(port);
    }
    Ok(normalised)
}

fn service_port(
    shared: &Shared,
    field: &str,
    spec: &k8s_openapi::api::core::v1::ServicePort,
) -> Result<NormalisedPort, NotProgrammed> {
    let protocol = Protocol::from_api(spec.protocol.as_deref()).ok_or_else(|| {
        malformed(format!("{field}.protocol {:?} is not TCP, UDP or SCTP", spec.protocol))
    })?;
    let port = port_number(&format!("{field}.port"), spec.port).map_err(malformed)?;
    let node_port = match (shared.service_type, spec.node_port) {
        // 0 or absent: not allocated (yet), or allocateLoadBalancerNodePorts is false.
        (ServiceType::NodePort | ServiceType::LoadBalancer, Some(p)) if p != 0 => {
            Some(port_number(&format!("{field}.nodePort"), p).map_err(malformed)?)
        }
        _ => None,
    };
    Ok(NormalisedPort {
        port_name: spec.name.clone().unwrap_or_default(),
        port: ServicePort {
            id: ServicePortId {
                namespace: shared.namespace.clone(),
                name: shared.name.clone(),
                port,
                protocol,
            },
            cluster_ip: shared.cluster_ip,
            port,
            node_port,
            external_ips: shared.external.external_ips.clone(),
            load_balancer_ips: shared.external.load_balancer_ips.clone(),
            external_policy_local: shared.external_policy_local,
            internal_policy_local: shared.internal_policy_local,
            affinity_timeout_s: shared.affinity_timeout_s,
            source_ranges: shared.external.source_ranges.clone(),
            endpoints: Vec::new(),
        },
    })
}

/// A port number from the API's `i32`; the error says why in terms of `field`.
pub(super) fn port_number(field: &str, port: i32) -> Result<u16, String> {
    u16::try_from(port)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("{field} {port} is outside 1..=65535"))
}

#[cfg(test)]
mod tests {
    use Ipv4Addr;

    use super::{super::fixtures::service, *};

    fn ports(yaml: &str) -> Vec<ServicePort> {
        match normalise(&service(yaml)) {
            Ok(normalised) => normalised.ports.into_iter().map(|p| p.port).collect(),
            Err(reason) => panic!("service not programmed: {reason}"),
        }
    }

    fn only_port(yaml: &str) -> ServicePort {
        let mut ports = ports(yaml);
        assert_eq!(ports.len(), 1, "expected one port: {ports:?}");
        ports.remove(0)
    }

    fn notes(yaml: &str) -> Vec<String> {
        normalise(&service(yaml)).unwrap_or_else(|r| panic!("not programmed: {r}")).notes
    }

    fn skipped(yaml: &str) -> String {
        match normalise(&service(yaml)) {
            Ok(normalised) => panic!("service programmed: {:?}", normalised.ports.len()),
            Err(reason) => reason.to_string(),
        }
    }

    #[test]
    fn external_name_is_not_programmed() {
        let reason = skipped(
            "metadata: {name: client-svc}
spec: {type: ExternalName, externalName: nginx.example, ports: [{port: 80}]}",
        );
        assert!(reason.starts_with("type ExternalName"), "{reason}");
    }

    #[test]
    fn headless_is_not_programmed() {
        for cluster_ip in ["None", "\"\""] {
            let reason = skipped(&format!(
                "metadata: {{name: h}}\nspec: {{clusterIP: {cluster_ip}, ports: [{{port: 80}}]}}"
            ));
            assert!(reason.starts_with("headless"), "{cluster_ip}: {reason}");
        }
        let reason = skipped("metadata: {name: h}\nspec: {ports: [{port: 80}]}");
        assert!(reason.starts_with("headless"), "absent clusterIP: {reason}");
    }

    #[test]
    fn another_proxys_service_is_not_programmed() {
        for value in ["someone-else", "\"\""] {
            let reason = skipped(&format!(
                "metadata:
  name: o
  labels: {{service.kubernetes.io/service-proxy-name: {value}}}
spec: {{clusterIP: 10.96.0.1, ports: [{{port: 80}}]}}"
            ));
            assert!(reason.contains("served by another proxy"), "{value}: {reason}");
        }
    }

    #[test]
    fn ipv6_cluster_ip_is_not_programmed_but_dual_stack_serves_its_ipv4() {
        let reason =
            skipped("metadata: {name: v6}\nspec: {clusterIP: 'fd00::10', ports: [{port: 80}]}");
        assert_eq!(reason, "IPv6 cluster IP fd00::10: only IPv4 is supported for now");
        let port = only_port(
            "metadata: {name: ds}
spec: {clusterIP: 'fd00::10', clusterIPs: ['fd00::10', 10.96.0.10], ports: [{port: 80}]}",
        );
        assert_eq!(port.cluster_ip, Ipv4Addr::new(10, 96, 0, 10));
    }

    #[test]
    fn a_service_without_spec_or_ports_is_not_programmed() {
        assert_eq!(skipped("metadata: {name: s}"), "no spec");
        assert_eq!(skipped("metadata: {name: s}\nspec: {clusterIP: 10.96.0.1}"), "no ports");
        assert_eq!(
            skipped("metadata: {name: s}\nspec: {clusterIP: 10.96.0.1, ports: []}"),
            "no ports"
        );
    }

    #[test]
    fn one_service_port_per_port_protocol_defaults_to_tcp() {
        let ports = ports(
            "metadata: {name: dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53}
  - {port: 9153, protocol: SCTP}",
        );
        let ids: Vec<_> = ports.iter().map(|p| p.id.to_string()).collect();
        assert_eq!(
            ids,
            ["kube-system/dns:53/udp", "kube-system/dns:53", "kube-system/dns:9153/sctp"]
        );
        assert!(ports.iter().all(|p| p.cluster_ip == Ipv4Addr::new(10, 96, 0, 10)));
        assert!(ports.iter().all(|p| p.node_port.is_none() && p.affinity_timeout_s.is_none()));
    }

    #[test]
    fn node_port_only_for_node_port_and_load_balancer_types() {
        let yaml = |t: &str| {
            format!(
                "metadata: {{name: n}}
spec: {{type: {t}, clusterIP: 10.96.0.1, ports: [{{port: 80, nodePort: 30380}}]}}"
            )
        };
        assert_eq!(only_port(&yaml("NodePort")).node_port, Some(30380));
        assert_eq!(only_port(&yaml("LoadBalancer")).node_port, Some(30380));
        assert_eq!(only_port(&yaml("ClusterIP")).node_port, None);
    }

    #[test]
    fn external_ips_and_load_balancer_ingress() {
        let port = only_port(
            "metadata: {name: lb}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.1
  externalIPs: [192.168.1.200]
  ports: [{port: 80, nodePort: 30500}]
status:
  loadBalancer:
    ingress:
    - {ip: 198.51.100.10}
    - {hostname: lb.example}
    - {ip: 198.51.100.11, ipMode: Proxy}
    - {ip: 198.51.100.12, ipMode: VIP}",
        );
        assert_eq!(port.external_ips, [Ipv4Addr::new(192, 168, 1, 200)]);
        assert_eq!(
            port.load_balancer_ips,
            [Ipv4Addr::new(198, 51, 100, 10), Ipv4Addr::new(198, 51, 100, 12)]
        );
    }

    #[test]
    fn load_balancer_ingress_counts_only_for_type_load_balancer() {
        let port = only_port(
            "metadata: {name: lb}
spec: {type: NodePort, clusterIP: 10.96.0.1, ports: [{port: 80}]}
status: {loadBalancer: {ingress: [{ip: 198.51.100.10}]}}",
        );
        assert_eq!(port.load_balancer_ips, Vec::<Ipv4Addr>::new());
    }

    #[test]
    fn ipv6_external_addresses_are_left_out_with_a_note() {
        let yaml = "metadata: {name: ds}
spec: {clusterIP: 10.96.0.1, externalIPs: [192.168.1.200, 'fd00::200'], ports: [{port: 80}]}";
        assert_eq!(only_port(yaml).external_ips, [Ipv4Addr::new(192, 168, 1, 200)]);
        assert_eq!(notes(yaml), ["spec.externalIPs: IPv6 fd00::200 left out (IPv4 only)"]);
    }

    #[test]
    fn source_ranges_are_parsed() {
        let port = only_port(
            "metadata: {name: lb}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.1
  loadBalancerSourceRanges: [203.0.113.0/25, ' 198.51.100.7/32 ']
  ports: [{port: 80}]",
        );
        assert_eq!(
            port.source_ranges,
            ["203.0.113.0/25".parse::<Ipv4Net>().unwrap(), "198.51.100.7/32".parse().unwrap()]
        );
    }

    #[test]
    fn a_malformed_source_range_skips_the_service() {
        let reason = skipped(
            "metadata: {name: lb}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.1
  loadBalancerSourceRanges: [203.0.113.0/25, 203.0.113.300/32]
  ports: [{port: 80}]",
        );
        assert_eq!(
            reason,
            "malformed: spec.loadBalancerSourceRanges \"203.0.113.300/32\" is not a CIDR"
        );
    }

    #[test]
    fn ipv6_only_source_ranges_deny_the_ipv4_load_balancer_ips() {
        let yaml = "metadata: {name: lb}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.1
  loadBalancerSourceRanges: ['fd00::/64']
  ports: [{port: 80}]
status: {loadBalancer: {ingress: [{ip: 198.51.100.10}]}}";
        let port = only_port(yaml);
        assert!(port.load_balancer_ips.is_empty(), "{port:?}");
        assert!(notes(yaml).iter().any(|n| n.contains("allow no IPv4 source")));
    }

    #[test]
    fn session_affinity_client_ip_timeout() {
        let yaml = |extra: &str| {
            format!(
                "metadata: {{name: s}}
spec: {{clusterIP: 10.96.0.1, ports: [{{port: 80}}]{extra}}}"
            )
        };
        assert_eq!(only_port(&yaml("")).affinity_timeout_s, None);
        assert_eq!(only_port(&yaml(", sessionAffinity: None")).affinity_timeout_s, None);
        assert_eq!(
            only_port(&yaml(", sessionAffinity: ClientIP")).affinity_timeout_s,
            Some(10_800)
        );
        let configured =
            ", sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}";
        assert_eq!(only_port(&yaml(configured)).affinity_timeout_s, Some(600));
        let reason = skipped(&yaml(&configured.replace("600", "0")));
        assert!(reason.contains("timeoutSeconds 0 is outside"), "{reason}");
    }

    #[test]
    fn traffic_policies() {
        let yaml = |t: &str, policies: &str| {
            format!(
                "metadata: {{name: p}}
spec: {{type: {t}, clusterIP: 10.96.0.1, ports: [{{port: 80}}], {policies}}}"
            )
        };
        let port = only_port(&yaml("NodePort", "externalTrafficPolicy: Local"));
        assert!(port.external_policy_local && !port.internal_policy_local);
        let port = only_port(&yaml("ClusterIP", "internalTrafficPolicy: Local"));
        assert!(!port.external_policy_local && port.internal_policy_local);
        let port = only_port(&yaml(
            "ClusterIP",
            "externalTrafficPolicy: Cluster, internalTrafficPolicy: Cluster",
        ));
        assert!(!port.external_policy_local && !port.internal_policy_local);
        // Without an external address, externalTrafficPolicy has nothing to apply to.
        let port = only_port(&yaml("ClusterIP", "externalTrafficPolicy: Local"));
        assert!(!port.external_policy_local);
        let port =
            only_port(&yaml("ClusterIP", "externalTrafficPolicy: Local, externalIPs: [1.2.3.4]"));
        assert!(port.external_policy_local);
        let reason = skipped(&yaml("ClusterIP", "internalTrafficPolicy: Nearby"));
        assert!(reason.contains("spec.internalTrafficPolicy \"Nearby\""), "{reason}");
    }

    #[test]
    fn malformed_fields_skip_the_service_naming_the_field() {
        let cases = [
            ("clusterIP: 10.96.0, ports: [{port: 80}]", "spec.clusterIP \"10.96.0\""),
            ("clusterIP: 10.96.0.1, ports: [{port: 0}]", "spec.ports[0].port 0"),
            (
                "clusterIP: 10.96.0.1, ports: [{port: 80}, {port: 70000}]",
                "spec.ports[1].port 70000",
            ),
            ("clusterIP: 10.96.0.1, ports: [{port: 80, protocol: ICMP}]", "spec.ports[0].protocol"),
            ("clusterIP: 10.96.0.1, ports: [{port: 80}, {port: 80, name: b}]", "listed twice"),
            ("type: Bogus, clusterIP: 10.96.0.1, ports: [{port: 80}]", "spec.type \"Bogus\""),
            ("clusterIP: 10.96.0.1, externalIPs: [nope], ports: [{port: 80}]", "spec.externalIPs"),
            (
                "type: NodePort, clusterIP: 10.96.0.1, ports: [{port: 80, nodePort: -1}]",
                "spec.ports[0].nodePort -1",
            ),
            (
                "clusterIP: 10.96.0.1, sessionAffinity: Sticky, ports: [{port: 80}]",
                "sessionAffinity",
            ),
        ];
        for (spec, expected) in cases {
            let reason = skipped(&format!("metadata: {{name: m}}\nspec: {{{spec}}}"));
            assert!(
                reason.starts_with("malformed: ") && reason.contains(expected),
                "{spec}: {reason}"
            );
        }
    }
}
