//! Seeding the datapath's service maps directly, Katran/Cilium style: frontends with their
//! backends, as map operations.

use lb_common::maps::{Backend, ServiceKey, ServiceValue, Slot, backend_flags, scope};
use lb_user::maps::{MapOp, ip_be};

/// One frontend (VIP, port, protocol, scope) and the backends in its slots.
#[derive(Clone, Debug)]
pub struct Frontend {
    pub service_id: u32,
    pub vip: &'static str,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
    pub flags: u16,
    pub affinity_timeout_s: u32,
    /// (address, port, runs on this node)
    pub backends: Vec<(&'static str, u16, bool)>,
    /// loadBalancerSourceRanges.
    pub source_ranges: Vec<&'static str>,
}

impl Frontend {
    pub fn new(service_id: u32, vip: &'static str, port: u16, proto: u8) -> Self {
        Self {
            service_id,
            vip,
            port,
            proto,
            scope: scope::EXTERNAL,
            flags: 0,
            affinity_timeout_s: 0,
            backends: Vec::new(),
            source_ranges: Vec::new(),
        }
    }

    pub fn backend(mut self, ip: &'static str, port: u16, local: bool) -> Self {
        self.backends.push((ip, port, local));
        self
    }

    pub fn flags(mut self, flags: u16) -> Self {
        self.flags |= flags;
        self
    }

    pub fn scope(mut self, scope: u8) -> Self {
        self.scope = scope;
        self
    }

    pub fn affinity(mut self, timeout_s: u32) -> Self {
        self.flags |= lb_common::maps::service_flags::AFFINITY;
        self.affinity_timeout_s = timeout_s;
        self
    }

    pub fn source_range(mut self, cidr: &'static str) -> Self {
        self.flags |= lb_common::maps::service_flags::SOURCE_RANGES;
        self.source_ranges.push(cidr);
        self
    }

    /// The id of backend number `index`, and the index of its slot: unique per frontend and
    /// index (64 per frontend).
    pub fn backend_id(&self, index: usize) -> u32 {
        self.slot_base() + u32::try_from(index).expect("few backends")
    }

    /// The frontend's `SERVICES` key.
    pub fn key(&self) -> ServiceKey {
        let vip_be = ip_be(self.vip.parse().expect("VIP"));
        ServiceKey { vip_be, port_be: self.port.to_be(), proto: self.proto, scope: self.scope }
    }

    /// The first slot of the frontend's run.
    fn slot_base(&self) -> u32 {
        self.service_id * 64
    }

    /// Backends, then slots and source ranges, then the frontend: the daemon's write order.
    pub fn ops(&self) -> Vec<MapOp> {
        let mut ops = Vec::new();
        for (index, &(ip, port, local)) in self.backends.iter().enumerate() {
            let backend = Backend {
                ip_be: ip_be(ip.parse().expect("backend address")),
                port_be: port.to_be(),
                proto: self.proto,
                flags: if local { backend_flags::LOCAL } else { 0 },
            };
            ops.push(MapOp::UpsertBackend { id: self.backend_id(index), backend });
            let slot = Slot { backend_id: self.backend_id(index), backend };
            ops.push(MapOp::UpsertSlot { index: self.backend_id(index), slot });
        }
        for cidr in &self.source_ranges {
            ops.push(MapOp::AddSourceRange {
                service_id: self.service_id,
                range: cidr.parse().expect("CIDR"),
            });
        }
        let key = self.key();
        let value = ServiceValue {
            service_id: self.service_id,
            slot_base: self.slot_base(),
            slot_count: u32::try_from(self.backends.len()).expect("few"),
            affinity_timeout_s: self.affinity_timeout_s,
            flags: self.flags,
            pad: [0; 2],
        };
        ops.push(MapOp::UpsertService { key, value });
        ops
    }
}

/// The entry that marks `vip` as an allocated ClusterIP (port 0, protocol 0): other ports on it
/// are refused rather than dropped.
pub fn cluster_ip_marker(vip: &str) -> MapOp {
    let key = ServiceKey {
        vip_be: ip_be(vip.parse().expect("VIP")),
        port_be: 0,
        proto: 0,
        scope: scope::EXTERNAL,
    };
    MapOp::UpsertService { key, value: ServiceValue::default() }
}
