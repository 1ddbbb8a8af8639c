//! The node configuration file: which node this is, its addresses, and the cluster's pod and
//! service ranges. One file serves every node of a DaemonSet: the node's name may come from the
//! command line (`--node-name`, or `NODE_NAME` from the pod's `spec.nodeName`), and its
//! addresses from its Node object when the daemon watches the Kubernetes API ([`Supplied`]).
//!
//! Only IPv4 is supported for now: an IPv6 address anywhere in the file is an error rather than
//! something silently ignored, so that a dual-stack node is not half-configured without notice.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    str::FromStr,
};

use ipnet::{IpNet, Ipv4Net};
use serde::Deserialize;

/// The source ports used when the source is rewritten to the node IP (SNAT), or only its port
/// (the client's address kept) where another flow holds a flow's reply tuple. The datapath skips
/// a port a local socket already holds towards the backend, but a socket that takes the port
/// after the flow did is not stopped by anything: so the range sits above Linux's default
/// `ip_local_port_range` (32768-60999), which local sockets do not pick from unless an operator
/// widens the ephemeral range over it (or a program binds such a port itself).
pub const DEFAULT_SNAT_PORT_RANGE: PortRange = PortRange { min: 61000, max: 65535 };

/// Refusals each CPU may send (see [`RefusalLimit`]): the kernel's own budget for the ICMP
/// errors it sends (`net.ipv4.icmp_msgs_per_sec`, `icmp_msgs_burst`), which holds kube-proxy's
/// REJECT; per CPU here.
pub const DEFAULT_REFUSAL_LIMIT: RefusalLimit = RefusalLimit { per_second: 1000, burst: 50 };

/// The validated node configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Endpoints whose `nodeName` equals this are local.
    pub node_name: String,
    /// This node's zone (its `topology.kubernetes.io/zone` label, which overrides this when the
    /// daemon watches the Node): endpoints hinted for it are preferred (topology-aware
    /// routing).
    pub zone: Option<String>,
    /// This node's addresses, in file order. Empty when the file leaves them to the Node object
    /// ([`Supplied::node_ips_from_api`]) until the daemon has read it.
    pub node_ips: Vec<Ipv4Addr>,
    /// Where NodePorts listen; `None` means on every node IP.
    pub node_port_cidrs: Option<Vec<Ipv4Net>>,
    /// Pod addresses: traffic from here comes from inside the cluster.
    pub cluster_cidr: Ipv4Net,
    /// Service addresses: an address here that no service holds is dropped.
    pub service_cidr: Ipv4Net,
    /// Source ports for SNAT.
    pub snat_port_range: PortRange,
    /// Fill backend slots with a Maglev table of this prime size (every node then picks the
    /// same backend for a flow); `None`: one slot per backend.
    pub maglev_table_size: Option<u32>,
    /// XDP (and the tc fallback where XDP cannot be attached) sends translated packets out
    /// itself (FIB lookup + redirect) instead of passing them up the stack. XDP only those
    /// that leave by the interface they came in on: those for other interfaces (a local pod's
    /// veth, whose peer may take no redirected frame) go up the stack, as do all on a bond (XDP
    /// runs on its members, the FIB names the bond). Off by default: a veth as the external
    /// interface takes frames XDP redirects only with an XDP program or GRO on its peer.
    pub xdp_redirect: bool,
    /// How many refusals (RSTs, ICMP port unreachables) each CPU sends.
    pub refusal_limit: RefusalLimit,
    /// Map sizes for a fresh datapath.
    pub map_capacities: crate::loader::Capacities,
}

/// At most `per_second` refusals per second on each CPU after a burst of `burst`, to pods and to
/// the outside world each; the packets
/// beyond are dropped (counted `drop_refusal_rate_limited`), so a flood to a service without
/// endpoints, from spoofed sources or not, is not answered packet for packet. `per_second` 0:
/// no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RefusalLimit {
    pub per_second: u32,
    pub burst: u32,
}

impl RefusalLimit {
    /// The budget each CPU starts with.
    pub fn budget(self) -> lb_common::maps::RefusalBudget {
        lb_common::maps::RefusalBudget::new(self.per_second, self.burst)
    }

    fn check(self) -> Result<Self, InvalidConfig> {
        let invalid = |reason| InvalidConfig::RefusalLimit { limit: self, reason };
        if self.per_second > 1_000_000_000 {
            return Err(invalid("perSecond is at most 1000000000 (one per nanosecond)"));
        }
        if self.per_second > 0 && self.burst == 0 {
            return Err(invalid("burst must be at least 1 (perSecond 0 sets no limit)"));
        }
        Ok(self)
    }
}

/// An inclusive port range, written `min-max` in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

/// The file could not be read or is not a valid node configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading node configuration {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("node configuration {}", path.display())]
    Invalid {
        path: PathBuf,
        #[source]
        source: InvalidConfig,
    },
}

/// Why a node configuration's text is not valid.
#[derive(Debug, thiserror::Error)]
pub enum InvalidConfig {
    /// Syntax errors, missing keys, unknown keys and wrong types, with line and column.
    #[error("{0}")]
    Yaml(#[source] serde_yaml::Error),

    #[error("{field}: {value} is IPv6; only IPv4 is supported for now")]
    Ipv6 { field: &'static str, value: String },

    #[error("{field} must not be empty")]
    Empty { field: &'static str },

    #[error("{field} is missing: {hint}")]
    Missing { field: &'static str, hint: &'static str },

    #[error("snatPortRange {value:?}: {reason}")]
    SnatPortRange { value: String, reason: &'static str },

    #[error("refusalLimit {limit:?}: {reason}")]
    RefusalLimit { limit: RefusalLimit, reason: &'static str },

    #[error("maglevTableSize: {0}")]
    MaglevTableSize(#[source] crate::maglev::Error),
}

/// The file as written; [`NodeConfig`] is what validation makes of it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawNodeConfig {
    node_name: Option<String>,
    zone: Option<String>,
    #[serde(rename = "nodeIPs")]
    node_ips: Option<Vec<IpAddr>>,
    node_port_addresses: Option<Vec<IpNet>>,
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: IpNet,
    #[serde(rename = "serviceCIDR")]
    service_cidr: IpNet,
    snat_port_range: Option<String>,
    maglev_table_size: Option<u32>,
    #[serde(default)]
    xdp_redirect: bool,
    refusal_limit: Option<RefusalLimit>,
    #[serde(default)]
    map_capacities: crate::loader::Capacities,
}

/// What the daemon knows about its node besides the file.
#[derive(Debug, Default)]
pub struct Supplied {
    /// The node's name (`--node-name`, `NODE_NAME`): it overrides the file's `nodeName`.
    pub node_name: Option<String>,
    /// The node's Node object will be watched, and its `status.addresses` are this node's
    /// addresses: the file need not list `nodeIPs`.
    pub node_ips_from_api: bool,
}

impl NodeConfig {
    /// A file that names the node and lists its addresses itself.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Self::from_file_with(path, &Supplied::default())
    }

    /// A file completed by what the daemon was told (see [`Supplied`]).
    pub fn from_file_with(path: &Path, supplied: &Supplied) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_yaml_str_with(&text, supplied)
            .map_err(|source| ConfigError::Invalid { path: path.to_owned(), source })
    }

    pub fn from_yaml_str(yaml: &str) -> Result<Self, InvalidConfig> {
        Self::from_yaml_str_with(yaml, &Supplied::default())
    }

    pub fn from_yaml_str_with(yaml: &str, supplied: &Supplied) -> Result<Self, InvalidConfig> {
        let raw: RawNodeConfig = serde_yaml::from_str(yaml).map_err(InvalidConfig::Yaml)?;
        raw.validate(supplied)
    }

    pub fn is_local_node(&self, name: &str) -> bool {
        self.node_name == name
    }

    /// Where health check node ports listen, as kube-proxy binds them: on the NodePort
    /// addresses when `nodePortAddresses` narrows them, else on every address.
    pub fn health_check_addresses(&self) -> Vec<Ipv4Addr> {
        match &self.node_port_cidrs {
            Some(cidrs) if !cidrs.is_empty() => self.node_port_addresses(),
            _ => vec![Ipv4Addr::UNSPECIFIED],
        }
    }

    /// The node IPs NodePorts listen on: those inside a `nodePortAddresses` CIDR, or all of them
    /// when the key is absent or empty (kube-proxy's `--nodeport-addresses` default).
    pub fn node_port_addresses(&self) -> Vec<Ipv4Addr> {
        match &self.node_port_cidrs {
            Some(cidrs) if !cidrs.is_empty() => self
                .node_ips
                .iter()
                .copied()
                .filter(|ip| cidrs.iter().any(|cidr| cidr.contains(ip)))
                .collect(),
            _ => self.node_ips.clone(),
        }
    }
}

impl RawNodeConfig {
    fn validate(self, supplied: &Supplied) -> Result<NodeConfig, InvalidConfig> {
        let node_name =
            supplied.node_name.clone().or(self.node_name).ok_or(InvalidConfig::Missing {
                field: "nodeName",
                hint: "name the node in the file, with --node-name or in NODE_NAME",
            })?;
        if node_name.is_empty() {
            return Err(InvalidConfig::Empty { field: "nodeName" });
        }
        let node_ips = match self.node_ips {
            // SNAT and NodePorts need an address of this node.
            Some(ips) if ips.is_empty() => return Err(InvalidConfig::Empty { field: "nodeIPs" }),
            Some(ips) => ips.into_iter().map(|ip| ipv4("nodeIPs", ip)).collect::<Result<_, _>>()?,
            None if supplied.node_ips_from_api => Vec::new(),
            None => {
                return Err(InvalidConfig::Missing {
                    field: "nodeIPs",
                    hint: "only a daemon watching the Kubernetes API can take them from the Node",
                });
            }
        };
        let node_port_cidrs = self
            .node_port_addresses
            .map(|cidrs| cidrs.into_iter().map(|net| ipv4_net("nodePortAddresses", net)).collect())
            .transpose()?;
        let snat_port_range = match self.snat_port_range {
            Some(text) => text.parse()?,
            None => DEFAULT_SNAT_PORT_RANGE,
        };
        Ok(NodeConfig {
            node_name,
            zone: self.zone.filter(|zone| !zone.is_empty()),
            node_ips,
            node_port_cidrs,
            cluster_cidr: ipv4_net("clusterCIDR", self.cluster_cidr)?,
            service_cidr: ipv4_net("serviceCIDR", self.service_cidr)?,
            snat_port_range,
            maglev_table_size: self
                .maglev_table_size
                .map(crate::maglev::check_table_size)
                .transpose()
                .map_err(InvalidConfig::MaglevTableSize)?,
            xdp_redirect: self.xdp_redirect,
            refusal_limit: self.refusal_limit.unwrap_or(DEFAULT_REFUSAL_LIMIT).check()?,
            map_capacities: self.map_capacities,
        })
    }
}

fn ipv4(field: &'static str, ip: IpAddr) -> Result<Ipv4Addr, InvalidConfig> {
    match ip {
        IpAddr::V4(ip) => Ok(ip),
        IpAddr::V6(ip) => Err(InvalidConfig::Ipv6 { field, value: ip.to_string() }),
    }
}

fn ipv4_net(field: &'static str, net: IpNet) -> Result<Ipv4Net, InvalidConfig> {
    match net {
        IpNet::V4(net) => Ok(net),
        IpNet::V6(net) => Err(InvalidConfig::Ipv6 { field, value: net.to_string() }),
    }
}

impl FromStr for PortRange {
    type Err = InvalidConfig;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| InvalidConfig::SnatPortRange { value: text.to_owned(), reason };
        let (min, max) = text.split_once('-').ok_or_else(|| invalid("expected MIN-MAX"))?;
        let port = |s: &str| s.trim().parse::<u16>().map_err(|_| invalid("ports are 0-65535"));
        let (min, max) = (port(min)?, port(max)?);
        if min == 0 {
            // Port 0 means "any" to the kernel; it cannot be a translated source port.
            return Err(invalid("the lowest port must be at least 1"));
        }
        if min > max {
            return Err(invalid("the lowest port is above the highest"));
        }
        Ok(Self { min, max })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;
    use lb_common::maps::names;

    const MINIMAL: &str = "
nodeName: node-a
nodeIPs: [192.168.1.63, 10.0.0.5]
clusterCIDR: 10.244.0.0/16
serviceCIDR: 10.96.0.0/12
";

    fn parse(yaml: &str) -> NodeConfig {
        NodeConfig::from_yaml_str(yaml).unwrap_or_else(|e| panic!("valid config rejected: {e}"))
    }

    #[test]
    fn map_capacities_are_read_by_their_camel_case_names() {
        let yaml = format!(
            "{MINIMAL}mapCapacities: {{services: 1000, backends: 2000, backendSlots: 3000, \
             conntrack: 4000, affinity: 5000, fragments: 6000}}"
        );
        let capacities = parse(&yaml).map_capacities;
        let sizes = [names::SERVICES, names::BACKENDS, names::BACKEND_SLOTS, names::CONNTRACK]
            .map(|name| capacities.of(name));
        assert_eq!(sizes, [Some(1000), Some(2000), Some(3000), Some(4000)]);
        assert_eq!(capacities.of(names::AFFINITY), Some(5000));
        assert_eq!(capacities.of(names::FRAGMENTS), Some(6000));
        assert_eq!(capacities.of(names::SERVICE_STATS), Some(1000), "one counter per frontend");
        assert!(rejected(&format!("{MINIMAL}mapCapacities: {{conntrak: 1}}")).contains("conntrak"));
    }

    fn rejected(yaml: &str) -> String {
        match NodeConfig::from_yaml_str(yaml) {
            Ok(config) => panic!("invalid config accepted: {config:?}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn reads_the_seed_node() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/scenarios/seed/node.yaml");
        let config = NodeConfig::from_file(&path).expect("seed node.yaml must load");
        assert_eq!(config.node_name, "node-a");
        assert_eq!(config.node_ips, [Ipv4Addr::new(192, 168, 1, 63)]);
        assert_eq!(config.cluster_cidr, "10.244.0.0/16".parse().unwrap());
        assert_eq!(config.service_cidr, "10.96.0.0/12".parse().unwrap());
        assert_eq!(config.snat_port_range, DEFAULT_SNAT_PORT_RANGE);
        assert!(config.is_local_node("node-a"));
        assert!(!config.is_local_node("node-b"));
    }

    #[test]
    fn node_port_addresses_default_to_every_node_ip() {
        let config = parse(MINIMAL);
        assert_eq!(config.node_port_cidrs, None);
        assert_eq!(
            config.node_port_addresses(),
            [Ipv4Addr::new(192, 168, 1, 63), Ipv4Addr::new(10, 0, 0, 5)]
        );
        assert_eq!(config.health_check_addresses(), [Ipv4Addr::UNSPECIFIED], "all addresses");
    }

    #[test]
    fn refusal_limit_defaults_to_the_kernels_icmp_budget_and_is_checked() {
        assert_eq!(parse(MINIMAL).refusal_limit, DEFAULT_REFUSAL_LIMIT);
        let set = parse(&format!("{MINIMAL}refusalLimit: {{perSecond: 20, burst: 5}}\n"));
        assert_eq!(set.refusal_limit, RefusalLimit { per_second: 20, burst: 5 });
        assert_eq!(set.refusal_limit.budget().interval_ns, 50_000_000);
        let off = parse(&format!("{MINIMAL}refusalLimit: {{perSecond: 0, burst: 0}}\n"));
        assert_eq!(off.refusal_limit.budget().interval_ns, 0, "no limit");
        let no_burst = rejected(&format!("{MINIMAL}refusalLimit: {{perSecond: 20, burst: 0}}\n"));
        assert!(no_burst.contains("burst must be at least 1"), "{no_burst}");
        let too_fast =
            rejected(&format!("{MINIMAL}refusalLimit: {{perSecond: 2000000000, burst: 1}}\n"));
        assert!(too_fast.contains("at most 1000000000"), "{too_fast}");
        assert!(rejected(&format!("{MINIMAL}refusalLimit: {{rate: 1}}\n")).contains("rate"));
    }

    #[test]
    fn node_port_addresses_keep_node_ips_inside_the_cidrs() {
        let config = parse(&format!("{MINIMAL}nodePortAddresses: [192.168.0.0/16]\n"));
        assert_eq!(config.node_port_addresses(), [Ipv4Addr::new(192, 168, 1, 63)]);
        assert_eq!(config.health_check_addresses(), [Ipv4Addr::new(192, 168, 1, 63)]);
    }

    #[test]
    fn snat_port_range_is_parsed_and_validated() {
        let config = parse(&format!("{MINIMAL}snatPortRange: \"1024-2048\"\n"));
        assert_eq!(config.snat_port_range, PortRange { min: 1024, max: 2048 });
        for (value, expected) in [
            ("2048-1024", "above the highest"),
            ("0-100", "at least 1"),
            ("100", "expected MIN-MAX"),
            ("1-70000", "0-65535"),
        ] {
            let error = rejected(&format!("{MINIMAL}snatPortRange: \"{value}\"\n"));
            assert!(error.contains(expected), "{value}: {error}");
        }
    }

    #[test]
    fn ipv6_is_a_clear_error() {
        let error = rejected(
            "nodeName: n
nodeIPs: [fd00::1]
clusterCIDR: 10.244.0.0/16
serviceCIDR: 10.96.0.0/12",
        );
        assert_eq!(error, "nodeIPs: fd00::1 is IPv6; only IPv4 is supported for now");
        let error = rejected(&MINIMAL.replace("10.96.0.0/12", "fd00:96::/108"));
        assert!(error.starts_with("serviceCIDR: fd00:96::/108 is IPv6"), "{error}");
    }

    #[test]
    fn missing_and_empty_keys_are_rejected() {
        let error = rejected("nodeName: n\nnodeIPs: [1.2.3.4]\nclusterCIDR: 10.0.0.0/8\n");
        assert!(error.contains("missing field `serviceCIDR`"), "{error}");
        let error = rejected(&MINIMAL.replace("[192.168.1.63, 10.0.0.5]", "[]"));
        assert_eq!(error, "nodeIPs must not be empty");
    }

    #[test]
    fn the_node_name_and_addresses_may_be_supplied_beside_the_file() {
        let shared = "clusterCIDR: 10.244.0.0/16\nserviceCIDR: 10.96.0.0/12\n";
        let error = rejected(shared);
        assert_eq!(
            error,
            "nodeName is missing: name the node in the file, with --node-name or in NODE_NAME"
        );
        let named = Supplied { node_name: Some("node-b".into()), node_ips_from_api: false };
        let error = NodeConfig::from_yaml_str_with(shared, &named).expect_err("no addresses");
        assert!(error.to_string().starts_with("nodeIPs is missing: only a daemon watching"));
        let from_api = Supplied { node_ips_from_api: true, ..named };
        let config = NodeConfig::from_yaml_str_with(shared, &from_api).expect("complete");
        assert_eq!((config.node_name.as_str(), config.node_ips.len()), ("node-b", 0));
        // The command line wins over the file; addresses the file lists are kept.
        let config = NodeConfig::from_yaml_str_with(MINIMAL, &from_api).expect("complete");
        assert_eq!(config.node_name, "node-b");
        assert_eq!(config.node_ips.len(), 2);
    }

    #[test]
    fn unknown_keys_are_rejected_naming_the_file() {
        let path = std::env::temp_dir().join(format!("lb-user-config-{}.yaml", std::process::id()));
        std::fs::write(&path, format!("{MINIMAL}nodeIp: 1.2.3.4\n")).expect("writing temp file");
        let result = NodeConfig::from_file(&path);
        std::fs::remove_file(&path).expect("removing temp file");
        let error = result.expect_err("an unknown key must be rejected");
        assert_eq!(error.to_string(), format!("node configuration {}", path.display()));
        let reason = error.source().expect("the reason is the source").to_string();
        assert!(reason.contains("unknown field `nodeIp`"), "{reason}");
    }

    #[test]
    fn a_missing_file_is_named() {
        let error = NodeConfig::from_file(Path::new("/nonexistent/node.yaml"))
            .expect_err("a missing file is an error");
        assert_eq!(error.to_string(), "reading node configuration /nonexistent/node.yaml");
    }
}
