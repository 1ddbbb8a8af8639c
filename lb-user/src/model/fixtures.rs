//! Objects for tests, written as the YAML a user would write (apiVersion and kind may be left
//! out: the typed deserialisers only check them when present).

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::config::NodeConfig;

pub(super) fn service(yaml: &str) -> Service {
    serde_yaml::from_str(yaml)
        .unwrap_or_else(|e| panic!("test Service does not parse: {e}\n{yaml}"))
}

pub(super) fn slice(yaml: &str) -> EndpointSlice {
    serde_yaml::from_str(yaml)
        .unwrap_or_else(|e| panic!("test EndpointSlice does not parse: {e}\n{yaml}"))
}

/// node-a at 192.168.1.63, as in the seed scenario.
pub(super) fn node() -> NodeConfig {
    NodeConfig::from_yaml_str(
        "nodeName: node-a
nodeIPs: [192.168.1.63]
clusterCIDR: 10.244.0.0/16
serviceCIDR: 10.96.0.0/12",
    )
    .unwrap_or_else(|e| panic!("test node configuration does not parse: {e}"))
}
