//! The packet-flow cases of a scenario (`tests/scenarios/*/packets.yaml`; the fields are
//! described in `tests/scenarios/README.md`): one reader for the model's tests and for the
//! datapath's, so that both read the same fields the same way.

use std::{net::Ipv4Addr, path::Path};

use serde::Deserialize;

use crate::model::Protocol;

/// One first packet and what must become of it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    /// `pod`, `external` or `host`.
    pub from: String,
    #[serde(default = "tcp")]
    pub proto: String,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub dport: u16,
    /// `forward`, `reject`, `drop` or `pass`.
    pub expect: String,
    /// `ip:port` of every backend a forward may reach.
    #[serde(default)]
    pub backends: Vec<String>,
    /// `true`, `false`, `when-remote` or `when-hairpin`.
    pub snat: Option<serde_yaml::Value>,
    /// Every flow from `src` must reach the same backend.
    #[serde(default)]
    pub affinity: bool,
}

fn tcp() -> String {
    "tcp".to_owned()
}

impl Case {
    /// The packet's protocol; `None` for a spelling the scenarios do not use.
    pub fn protocol(&self) -> Option<Protocol> {
        match self.proto.as_str() {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            "sctp" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

/// The cases of one `packets.yaml`; the error names the file and what is wrong with it.
pub fn read_cases(path: &Path) -> Result<Vec<Case>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}
