//! Keys and values of the load balancer's BPF maps, following Cilium's split: a service entry
//! keyed by (VIP, port, protocol), backend slots per service, backends by id, reverse-NAT entries,
//! connection tracking, session affinity and node configuration.
//!
//! Userspace computes, the kernel looks up: slot tables are written by the daemon and only read by
//! the datapath.

use crate::user_pod;

/// Map names as they appear in the object file and under the pin directory.
pub mod names {
    pub const STATS: &str = "STATS";
    pub const SERVICES: &str = "SERVICES";
    pub const BACKEND_SLOTS: &str = "BACKEND_SLOTS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const REV_NAT: &str = "REV_NAT";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const AFFINITY: &str = "AFFINITY";
    pub const NODE_CONFIG: &str = "NODE_CONFIG";
}

/// Default capacities; the daemon may override each at load time.
pub mod capacity {
    pub const SERVICES: u32 = 65_536;
    pub const BACKEND_SLOTS: u32 = 1_048_576;
    pub const BACKENDS: u32 = 262_144;
    pub const REV_NAT: u32 = 65_536;
    pub const CONNTRACK: u32 = 1_048_576;
    pub const AFFINITY: u32 = 262_144;
}

/// IANA protocol numbers as they appear in the IPv4 header.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

/// Which traffic a service entry answers. kube-proxy applies externalTrafficPolicy to traffic
/// arriving from outside the cluster and internalTrafficPolicy to traffic from pods, so one
/// VIP:port may need two backend sets; the scope keeps them apart (Cilium's `lb4_key.scope`).
pub mod scope {
    /// Traffic from outside the cluster (north-south), or the only entry of a service.
    pub const EXTERNAL: u8 = 0;
    /// Traffic from pods and the node itself, when the two policies select different backends.
    pub const INTERNAL: u8 = 1;
}

/// Lookup key of [`ServiceValue`]: one VIP, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    /// ClusterIP, node address (NodePort), external IP or load-balancer ingress IP; network order.
    pub vip_be: u32,
    /// Service port, or the NodePort; network order.
    pub port_be: u16,
    /// [`proto`] number.
    pub proto: u8,
    /// [`scope`] of the entry.
    pub scope: u8,
}

/// Service flags (`ServiceValue::flags`).
pub mod service_flags {
    /// NodePort, externalIP or LoadBalancer entry: reachable from outside the cluster.
    pub const EXTERNAL: u16 = 1 << 0;
    /// externalTrafficPolicy Local: keep the client address, only local backends.
    pub const EXT_LOCAL: u16 = 1 << 1;
    /// internalTrafficPolicy Local: only local backends for traffic from inside the cluster.
    pub const INT_LOCAL: u16 = 1 << 2;
    /// sessionAffinity ClientIP.
    pub const AFFINITY: u16 = 1 << 3;
    /// loadBalancerSourceRanges apply to this entry.
    pub const SOURCE_RANGES: u16 = 1 << 4;
    /// Backend slots hold a Maglev table of `slot_count` entries rather than one slot a backend.
    pub const MAGLEV: u16 = 1 << 5;
    /// The entry is a NodePort (its VIP is a node address).
    pub const NODE_PORT: u16 = 1 << 6;
}

/// What a VIP:port:proto maps to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    /// Identifies this service's slots in `BACKEND_SLOTS` and its per-service counters.
    pub service_id: u32,
    /// Number of slots to choose from; 0 means no usable endpoint (refuse).
    pub slot_count: u32,
    /// Reverse-NAT entry that restores this VIP:port on replies.
    pub rev_nat_id: u16,
    /// [`service_flags`].
    pub flags: u16,
    /// sessionAffinity timeout in seconds (ClientIP affinity only).
    pub affinity_timeout_s: u32,
}

/// Key of `BACKEND_SLOTS`: slot `slot` of service `service_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct BackendSlotKey {
    pub service_id: u32,
    pub slot: u32,
}

/// Backend flags (`Backend::flags`).
pub mod backend_flags {
    /// The endpoint runs on this node.
    pub const LOCAL: u8 = 1 << 0;
    /// Only serving-but-terminating: chosen only when no ready endpoint exists.
    pub const TERMINATING: u8 = 1 << 1;
}

/// One endpoint address and target port, keyed by a backend id (`u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    /// Endpoint address; network order.
    pub ip_be: u32,
    /// Resolved targetPort; network order.
    pub port_be: u16,
    /// [`proto`] number.
    pub proto: u8,
    /// [`backend_flags`].
    pub flags: u8,
}

/// What a reverse-NAT id (`u32` key) restores on replies: the address the client spoke to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RevNat {
    /// Network order.
    pub vip_be: u32,
    /// Network order.
    pub port_be: u16,
    pub pad: [u8; 2],
}

/// Direction of a conntrack entry (`ConntrackKey::direction`).
pub mod ct_direction {
    /// Client to service, keyed by the tuple as the client sent it.
    pub const FORWARD: u8 = 0;
    /// Backend to client, keyed by the tuple as the backend sends it (after translation).
    pub const REPLY: u8 = 1;
}

/// Five-tuple plus direction: the key of the LRU conntrack map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConntrackKey {
    /// Network order.
    pub src_ip_be: u32,
    /// Network order.
    pub dst_ip_be: u32,
    /// Network order; the ICMP echo identifier for ICMP.
    pub src_port_be: u16,
    /// Network order; 0 for ICMP.
    pub dst_port_be: u16,
    /// [`proto`] number.
    pub proto: u8,
    /// [`ct_direction`].
    pub direction: u8,
    pub pad: [u8; 2],
}

/// Conntrack flags (`ConntrackValue::flags`).
pub mod ct_flags {
    /// The source was rewritten to `snat_ip_be:snat_port_be`.
    pub const SNAT: u16 = 1 << 0;
    /// A SYN was seen from the client.
    pub const TCP_SYN_SEEN: u16 = 1 << 1;
    /// The backend answered.
    pub const REPLY_SEEN: u16 = 1 << 2;
    /// A FIN was seen in either direction: the entry ages out quickly.
    pub const TCP_CLOSING: u16 = 1 << 3;
    /// An RST was seen: the entry ages out quickly.
    pub const TCP_RESET: u16 = 1 << 4;
}

/// State of one translated flow, stored for both directions.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConntrackValue {
    /// `bpf_ktime_get_ns()` when a packet of the flow was last seen in this direction.
    pub last_seen_ns: u64,
    /// The backend the flow is pinned to.
    pub backend_id: u32,
    /// The reverse-NAT entry that restores the VIP on replies.
    pub rev_nat_id: u16,
    /// [`ct_flags`].
    pub flags: u16,
    /// Source address after SNAT; network order; 0 without SNAT.
    pub snat_ip_be: u32,
    /// Source port after SNAT; network order.
    pub snat_port_be: u16,
    pub pad: [u8; 2],
}

/// Key of the session-affinity LRU map: one client and one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey {
    /// Network order.
    pub client_ip_be: u32,
    pub service_id: u32,
}

/// The backend a client sticks to, and when it last used it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityValue {
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub pad: [u8; 4],
}

/// Node-wide settings, the single entry (index 0) of the `NODE_CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeConfig {
    /// Pod addresses ("from inside the cluster"); network order.
    pub cluster_cidr_be: u32,
    /// Network order.
    pub cluster_mask_be: u32,
    /// Service addresses: an unallocated one is dropped; network order.
    pub service_cidr_be: u32,
    /// Network order.
    pub service_mask_be: u32,
    /// Source address for masquerade; network order.
    pub snat_ip_be: u32,
    /// First source port of the SNAT range (host order).
    pub snat_port_min: u16,
    /// Last source port of the SNAT range (host order).
    pub snat_port_max: u16,
}

user_pod!(
    ServiceKey,
    ServiceValue,
    BackendSlotKey,
    Backend,
    RevNat,
    ConntrackKey,
    ConntrackValue,
    AffinityKey,
    AffinityValue,
    NodeConfig,
);

// The layouts are the contract with the compiled programs: any change must be deliberate.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<ServiceKey>() == 8);
    assert!(size_of::<ServiceValue>() == 16);
    assert!(size_of::<BackendSlotKey>() == 8);
    assert!(size_of::<Backend>() == 8);
    assert!(size_of::<RevNat>() == 8);
    assert!(size_of::<ConntrackKey>() == 16);
    assert!(size_of::<ConntrackValue>() == 24);
    assert!(size_of::<AffinityKey>() == 8);
    assert!(size_of::<AffinityValue>() == 16);
    assert!(size_of::<NodeConfig>() == 24);
};
