//! The datapath's service tables as plain data: what is programmed (read back from the maps)
//! or what should be (computed from the model). The reconciler diffs two of these.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::Ipv4Net;
use lb_common::maps::{Backend, BackendSlotKey, NodeConfig, RevNat, ServiceKey, ServiceValue};

use crate::{error::Result, maps::KernelMaps};

/// Everything the daemon writes into the datapath's maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatapathState {
    pub node: Option<NodeConfig>,
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub slots: BTreeMap<BackendSlotKey, u32>,
    pub backends: BTreeMap<u32, Backend>,
    pub rev_nats: BTreeMap<u32, RevNat>,
    /// (service id, allowed source range)
    pub source_ranges: BTreeSet<(u32, Ipv4Net)>,
}

impl DatapathState {
    /// Reads what is programmed, for a restarted daemon to reconcile against.
    pub fn read(maps: &KernelMaps) -> Result<Self> {
        Ok(Self {
            node: maps.node_config()?,
            services: maps.services()?.into_iter().collect(),
            slots: maps.slots()?.into_iter().collect(),
            backends: maps.backends()?.into_iter().collect(),
            rev_nats: maps.rev_nats()?.into_iter().collect(),
            source_ranges: maps.source_ranges()?.into_iter().collect(),
        })
    }
}
