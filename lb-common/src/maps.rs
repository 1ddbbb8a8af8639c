//! Keys and values of the load balancer's BPF maps, following Cilium's split: a service entry
//! keyed by (VIP, port, protocol), backend slots per service, backends by id, connection
//! tracking (whose reply entries hold the reverse NAT), session affinity and node configuration.
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
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const AFFINITY: &str = "AFFINITY";
    pub const SOURCE_RANGES: &str = "SOURCE_RANGES";
    pub const NODE_CONFIG: &str = "NODE_CONFIG";
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    pub const SOCK_REV_NAT: &str = "SOCK_REV_NAT";
    pub const FORWARDING: &str = "FORWARDING";
    pub const FRAGMENTS: &str = "FRAGMENTS";
    pub const REFUSAL_BUDGET: &str = "REFUSAL_BUDGET";
}

/// Default capacities; the daemon may override each at load time.
pub mod capacity {
    /// Frontends (VIP, port, protocol, scope); also the size of the per-service counters.
    pub const SERVICES: u32 = 262_144;
    pub const BACKEND_SLOTS: u32 = 2_097_152;
    pub const BACKENDS: u32 = 262_144;
    pub const CONNTRACK: u32 = 1_048_576;
    pub const AFFINITY: u32 = 262_144;
    /// (frontend, range) entries. An LPM trie takes memory per entry, not for its size.
    pub const SOURCE_RANGES: u32 = 262_144;
    pub const SOCK_REV_NAT: u32 = 262_144;
    /// Fragmented datagrams in flight (Cilium's default is 8192).
    pub const FRAGMENTS: u32 = 16_384;
}

/// IANA protocol numbers as they appear in the IPv4 header.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

/// Which lookup a service entry answers (Cilium's `lb4_key.scope`).
///
/// Every lookup starts with [`scope::EXTERNAL`]. A frontend whose backend set depends on where
/// the traffic comes from (externalTrafficPolicy Local on a NodePort, externalIP or LoadBalancer
/// IP) has a second entry under [`scope::INTERNAL`], flagged by [`service_flags::TWO_SCOPES`],
/// used for sources inside the cluster (pods, the node itself), which kube-proxy sends to every
/// endpoint.
pub mod scope {
    pub const EXTERNAL: u8 = 0;
    pub const INTERNAL: u8 = 1;
}

/// Lookup key of [`ServiceValue`]: one VIP, port, protocol and scope (a "frontend").
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
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

impl ServiceKey {
    /// The entry that marks `vip_be` as an allocated ClusterIP (port and protocol 0): its
    /// unserved ports are refused, not dropped. It is not a frontend.
    #[must_use]
    pub const fn marker(vip_be: u32) -> Self {
        Self { vip_be, port_be: 0, proto: 0, scope: scope::EXTERNAL }
    }

    /// True for a ClusterIP's marker entry (see [`Self::marker`]).
    #[must_use]
    pub const fn is_marker(&self) -> bool {
        self.proto == 0
    }
}

/// Service flags (`ServiceValue::flags`).
pub mod service_flags {
    /// NodePort, externalIP or LoadBalancer frontend, as opposed to a ClusterIP.
    pub const EXTERNAL: u16 = 1 << 0;
    /// externalTrafficPolicy Local: client address kept, never masqueraded to the node (only
    /// a new source port, where another flow holds a flow's reply tuple).
    pub const EXT_LOCAL: u16 = 1 << 1;
    /// An [`super::scope::INTERNAL`] entry exists for sources inside the cluster.
    pub const TWO_SCOPES: u16 = 1 << 2;
    /// sessionAffinity ClientIP.
    pub const AFFINITY: u16 = 1 << 3;
    /// loadBalancerSourceRanges apply: sources not in `SOURCE_RANGES` are dropped.
    pub const SOURCE_RANGES: u16 = 1 << 4;
    /// No slot because a traffic policy filtered every endpoint away: drop (kube-proxy's
    /// "has no local endpoints") instead of refusing.
    pub const EMPTY_DROP: u16 = 1 << 5;
}

/// What a frontend maps to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    /// Identifies the frontend: its counters in `SERVICE_STATS`, its affinity entries and its
    /// flows' conntrack entries. Below `capacity::SERVICES`.
    pub service_id: u32,
    /// Index of the frontend's first slot in the `BACKEND_SLOTS` array; its slots are
    /// `slot_base..slot_base + slot_count`.
    pub slot_base: u32,
    /// Number of slots to choose from; 0 means no usable endpoint (refuse, or drop with
    /// [`service_flags::EMPTY_DROP`]).
    pub slot_count: u32,
    /// sessionAffinity timeout in seconds (with [`service_flags::AFFINITY`]).
    pub affinity_timeout_s: u32,
    /// [`service_flags`].
    pub flags: u16,
    pub pad: [u8; 2],
}

/// Backend flags (`Backend::flags`).
pub mod backend_flags {
    /// The endpoint runs on this node: replies come back through a pod-facing interface, so
    /// external traffic to it needs no SNAT.
    pub const LOCAL: u8 = 1 << 0;
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

/// An entry of the `BACKEND_SLOTS` array: the backend a slot sends flows to, copied in whole
/// beside its id. A frontend owns a contiguous run of slots (`ServiceValue::slot_base`), which
/// the daemon fills with one entry per backend or with a Maglev table; the datapath picks
/// `slot_base + flow_hash % slot_count`.
///
/// Array and copy are what make the first packet of a flow cheap: on a node with many services
/// the frontend, slot and backend entries of a new flow are all cold, and each dependent lookup
/// of a large hash map costs a cache and TLB miss or two, an array index one. `BACKENDS` still
/// holds every backend by id, for session affinity and the daemon.
///
/// The daemon never rewrites a run a frontend points at: a changed table goes to a fresh run and
/// the frontend entry (a hash map entry, replaced atomically) then switches to it, so a packet
/// never sees half a table or a torn entry. Unused slots are zero: `backend_id` 0 is no backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Slot {
    /// The backend's id (conntrack entries carry it, so the daemon can purge a backend's flows).
    pub backend_id: u32,
    pub backend: Backend,
}

/// What reverse NAT restores for a host socket (`SOCK_REV_NAT`): the service address the
/// client spoke to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RevNat {
    /// Network order.
    pub vip_be: u32,
    /// Network order.
    pub port_be: u16,
    pub pad: [u8; 2],
}

/// A five-tuple as it appears in a packet: the key of the LRU conntrack map. The forward entry
/// of a flow is keyed by the client's packet (client -> VIP), the reply entry by the backend's
/// (backend -> client, or backend -> SNAT address). A reply tuple another flow holds (the same
/// client socket through another frontend to the same backend, or a backend that is itself a
/// client of a frontend at the client's address and port) gives the new flow another source
/// port instead (`lb::insert_reply` in the programs).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConntrackKey {
    /// Network order.
    pub src_ip_be: u32,
    /// Network order.
    pub dst_ip_be: u32,
    /// Network order.
    pub src_port_be: u16,
    /// Network order.
    pub dst_port_be: u16,
    /// [`proto`] number.
    pub proto: u8,
    pub pad: [u8; 3],
}

impl ConntrackKey {
    /// The key of a five-tuple (fields in network order, as in the packet).
    ///
    /// Built as four 32-bit words: written field by field, LLVM turns the three padding bytes
    /// into a call of a byte-loop `memset` subprogram in the BPF programs, on every packet.
    #[expect(clippy::inline_always, reason = "the datapath builds a key on every packet")]
    #[inline(always)]
    #[must_use]
    pub fn new(
        src_ip_be: u32,
        dst_ip_be: u32,
        src_port_be: u16,
        dst_port_be: u16,
        proto_number: u8,
    ) -> Self {
        let [src_port_0, src_port_1] = src_port_be.to_ne_bytes();
        let [dst_port_0, dst_port_1] = dst_port_be.to_ne_bytes();
        let words: [u32; 4] = [
            src_ip_be,
            dst_ip_be,
            u32::from_ne_bytes([src_port_0, src_port_1, dst_port_0, dst_port_1]),
            u32::from_ne_bytes([proto_number, 0, 0, 0]),
        ];
        // SAFETY: `ConntrackKey` is `repr(C)`, 16 bytes of integers with no implicit padding,
        // laid out exactly as these four words in memory; every bit pattern is valid.
        unsafe { core::mem::transmute::<[u32; 4], Self>(words) }
    }

    /// The key's bytes as the map holds them (for a program that reads a key from its input).
    #[must_use]
    pub fn to_bytes(self) -> [u8; 16] {
        // SAFETY: as in `new`, the other way round: 16 bytes of plain integers.
        unsafe { core::mem::transmute::<Self, [u8; 16]>(self) }
    }
}

/// Conntrack flags (`ConntrackValue::flags`), fixed when the entry is made.
pub mod ct_flags {
    /// This is the reply entry of its flow.
    pub const REPLY: u16 = 1 << 0;
    /// The client's source was rewritten to `nat_ip_be:nat_port_be`.
    pub const SNAT: u16 = 1 << 1;
    /// Versions before [`super::ConntrackValue::closing`] marked a closing entry with this bit;
    /// it is still read, so that their entries keep their meaning after an upgrade.
    pub const CLOSING: u16 = 1 << 3;
    /// Versions before [`super::ConntrackValue::opening`] marked an opening entry with this
    /// bit; it is still read, and the packet that ends the opening clears it (see
    /// `lb_common::conntrack::is_opening`).
    pub const OPENING: u16 = 1 << 4;
}

/// State of one translated flow in one direction.
///
/// Forward entry: rewrite the destination to the backend at `translated_ip_be:translated_port_be`
/// and, with [`ct_flags::SNAT`], the source to `nat_ip_be:nat_port_be`.
/// Reply entry: rewrite the source to the frontend at `translated_ip_be:translated_port_be` (the
/// address the client spoke to) and, with SNAT, the destination back to the client at
/// `nat_ip_be:nat_port_be`.
///
/// The reply entry carries the frontend's address itself, rather than naming the frontend by
/// id: a reply then needs no second lookup, and a flow that outlives its frontend (TCP flows
/// are left to finish) keeps answering from the address its client knows, even once the id
/// names another frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConntrackValue {
    /// `bpf_jiffies64()` when the entry was last refreshed.
    pub last_seen: u64,
    /// The backend the flow is pinned to (the daemon purges by it when a backend goes).
    pub backend_id: u32,
    /// The frontend the flow entered through.
    pub service_id: u32,
    /// Network order; the backend (forward entry) or the frontend (reply entry).
    pub translated_ip_be: u32,
    /// Network order; see the type's doc for each direction.
    pub nat_ip_be: u32,
    /// Network order; the backend (forward entry) or the frontend (reply entry).
    pub translated_port_be: u16,
    /// Network order; see the type's doc for each direction.
    pub nat_port_be: u16,
    /// [`ct_flags`].
    pub flags: u16,
    /// 1 while the TCP flow is opening: made by its first packet (a SYN, or a packet of a
    /// connection picked up mid-stream), and no packet without SYN (or RST) seen since in
    /// either direction; the entry then expires after the short opening timeout. Set to 0 in
    /// both entries of the flow by the first such packet (the handshake's last ACK).
    ///
    /// The TCP state is two bytes of its own, each only ever written whole, rather than bits
    /// of `flags`: the packets of the two directions may change the state of the same entry on
    /// two CPUs at once, and a read-modify-write of shared bits could then undo the other
    /// CPU's change (the BPF target has no atomic or on bytes).
    pub opening: u8,
    /// [`closing`]: whether the flow is closing, or half-closed in this entry's direction.
    pub closing: u8,
}

/// Values of [`ConntrackValue::closing`]. A FIN alone half-closes a connection, which may go on
/// for long in the other direction (a client that shuts down its sending side, then reads a
/// long answer): only both directions' FINs, or a RST, make it closing (Cilium's rule; Linux's
/// own timeouts after a FIN are minutes).
pub mod closing {
    /// Neither FIN nor RST seen.
    pub const OPEN: u8 = 0;
    /// Closing: both directions sent a FIN, or either a RST. Both entries of the flow have it,
    /// and expire after the short closing timeout.
    pub const CLOSING: u8 = 1;
    /// A FIN passed in this entry's direction only: still the established timeout.
    pub const HALF_CLOSED: u8 = 2;
}

/// Key of the session-affinity LRU map: one client and one frontend.
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
    /// `bpf_jiffies64()` when a flow of the client last chose the backend.
    pub last_used: u64,
    pub backend_id: u32,
    pub pad: [u8; 4],
}

/// Data of the `SOURCE_RANGES` longest-prefix-match key: the prefix length covers all 32 bits of
/// `service_id` plus the CIDR's length, so a match means "this source is allowed to this
/// frontend".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SourceRangeKey {
    pub service_id: u32,
    /// Network order (LPM compares bytes in memory order, most significant first).
    pub src_ip_be: u32,
}

impl SourceRangeKey {
    /// Bits of `service_id`, always matched in full.
    pub const SERVICE_ID_BITS: u32 = 32;
}

/// Key of the socket reverse-NAT LRU map: a socket (by cookie) and the backend the host path
/// connected it to. `recvmsg`/`getpeername` show the service address instead of the backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRevNatKey {
    pub cookie: u64,
    /// Network order.
    pub backend_ip_be: u32,
    /// Network order.
    pub backend_port_be: u16,
    pub pad: [u8; 2],
}

/// Key of the `FRAGMENTS` LRU map: one fragmented datagram as it arrived (RFC 791 identifies
/// a datagram's fragments by source, destination, protocol and identification).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragmentKey {
    /// Network order.
    pub src_ip_be: u32,
    /// Network order.
    pub dst_ip_be: u32,
    /// The IPv4 identification field, network order.
    pub id_be: u16,
    /// [`proto`] number.
    pub proto: u8,
    /// [`fragment_side`]: the programs that made the record, and may use it.
    pub side: u8,
}

/// Where a datagram's fragments were seen: records of one side never apply to the other's
/// packets. A datagram translated on its way in (to a backend, or back to a client) leaves the
/// node again, with other addresses, through `lb_tc_reply`; its fragments there must not take
/// a record the node's own datagrams made, nor remove one.
pub mod fragment_side {
    /// Arriving at the node: `lb_xdp`, `lb_tc`, `lb_tc_external`.
    pub const INGRESS: u8 = 0;
    /// Sent by the node's own stack: `lb_tc_reply`.
    pub const EGRESS: u8 = 1;
}

/// How the first fragment of a datagram was translated, so that its later fragments, which
/// carry no ports, get the same addresses. Ports and the L4 checksum are in the first
/// fragment only, so later fragments change in their IPv4 header alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragmentValue {
    /// `bpf_jiffies64()` when the first fragment passed: older entries are stale (see
    /// [`FragmentValue::TIMEOUT_S`]).
    pub created: u64,
    /// The translated source address; network order.
    pub src_ip_be: u32,
    /// The translated destination address; network order.
    pub dst_ip_be: u32,
    /// The frontend whose counters the fragments add to; [`FragmentValue::NO_FRONTEND`] for a
    /// reply.
    pub service_id: u32,
    pub pad: [u8; 4],
}

impl FragmentValue {
    /// `service_id` of a reply's fragments, which no frontend counts.
    pub const NO_FRONTEND: u32 = u32::MAX;
    /// How long a first fragment's translation is used for its datagram's other fragments:
    /// Linux's default reassembly timeout (`ipfrag_time`), after which the receiver has given
    /// up on the datagram anyway and its identification may be reused.
    pub const TIMEOUT_S: u32 = 30;
}

/// Indexes of the `FORWARDING` per-CPU counters: how the north-south programs sent on the
/// packets they translated.
pub mod forwarding {
    /// XDP with FIB forwarding on: sent out of the egress interface by FIB lookup and
    /// `bpf_redirect`.
    pub const REDIRECTED: u32 = 0;
    /// XDP with FIB forwarding on: handed to the stack because the lookup could not finish (no
    /// route, no neighbour yet).
    pub const TO_STACK: u32 = 1;
    /// Translated by `lb_tc_external`, the tc fallback of an external interface where XDP could
    /// not be attached (always counted).
    pub const TC_FALLBACK: u32 = 2;
    /// Of those, sent out by FIB lookup and `bpf_redirect` (FIB forwarding on); the others went
    /// up the stack.
    pub const TC_FALLBACK_REDIRECTED: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// Node flags (`NodeConfig::flags`).
pub mod node_flags {
    /// The daemon has written this entry. An array entry always exists, zeroed until then, and
    /// a zero service mask would make every address look like an unallocated service address.
    pub const CONFIGURED: u32 = 1 << 0;
    /// XDP forwards translated packets itself (FIB lookup + redirect) instead of passing them
    /// up the stack.
    pub const FIB_FORWARD: u32 = 1 << 1;
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
    /// [`node_flags`].
    pub flags: u32,
    /// The kernel's tick rate (`CONFIG_HZ`): converts the timeouts, in seconds, to jiffies.
    pub jiffies_per_second: u32,
}

/// Entries of the per-CPU `REFUSAL_BUDGET` array: refusals to pods and to the outside world
/// are budgeted apart, so that a flood from outside to a LoadBalancer IP without endpoints does
/// not leave this node's pods waiting on a timeout instead of refused.
pub mod refusal_budget {
    /// Packets from pod-facing interfaces.
    pub const PODS: u32 = 0;
    /// Packets from external interfaces.
    pub const EXTERNAL: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// How many refusals (RSTs and ICMP errors the programs build) a CPU may still send to one
/// side ([`refusal_budget`]). A token bucket kept as one time (the generic
/// cell rate algorithm): the instant the bucket would be full again, which each refusal moves
/// one interval later, and which may run at most `burst` intervals ahead of now. Without it,
/// every packet to a service without endpoints, at any rate and from any (spoofed) source, is
/// answered; kube-proxy's REJECT is held to the kernel's ICMP rate limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RefusalBudget {
    /// Nanoseconds per refusal at the sustained rate; 0: no limit (the entry as created,
    /// before the daemon writes it).
    pub interval_ns: u64,
    /// How far ahead of now `full_at_ns` may run: the burst, in intervals.
    pub burst_ns: u64,
    /// When the bucket is full again, on the kernel's monotonic clock (`bpf_ktime_get_ns`);
    /// 0 (long past) when written.
    pub full_at_ns: u64,
}

impl RefusalBudget {
    /// `per_second` refusals at most, after a burst of `burst` (at least 1); `per_second` 0
    /// sets no limit.
    #[must_use]
    pub const fn new(per_second: u32, burst: u32) -> Self {
        if per_second == 0 {
            return Self { interval_ns: 0, burst_ns: 0, full_at_ns: 0 };
        }
        let interval_ns = 1_000_000_000 / per_second as u64;
        Self { interval_ns, burst_ns: interval_ns * burst as u64, full_at_ns: 0 }
    }

    /// Spends one refusal at `now_ns`; `false` when the budget is spent.
    #[expect(clippy::inline_always, reason = "called by the datapath, which wants it inlined")]
    #[inline(always)]
    pub fn take(&mut self, now_ns: u64) -> bool {
        if self.interval_ns == 0 {
            return true;
        }
        let start = if self.full_at_ns > now_ns { self.full_at_ns } else { now_ns };
        let full_at_ns = start.saturating_add(self.interval_ns);
        if full_at_ns - now_ns > self.burst_ns {
            return false;
        }
        self.full_at_ns = full_at_ns;
        true
    }

    /// Returns the refusal [`RefusalBudget::take`] spent last, which was not sent after all.
    #[expect(clippy::inline_always, reason = "called by the datapath, which wants it inlined")]
    #[inline(always)]
    pub fn give_back(&mut self) {
        self.full_at_ns = self.full_at_ns.saturating_sub(self.interval_ns);
    }
}

/// Per-frontend traffic, a per-CPU array indexed by `service_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceCounters {
    /// Client-to-service packets translated.
    pub packets: u64,
    /// Their bytes (IPv4 total length).
    pub bytes: u64,
}

user_pod!(
    ServiceKey,
    ServiceValue,
    Backend,
    Slot,
    RevNat,
    ConntrackKey,
    ConntrackValue,
    AffinityKey,
    AffinityValue,
    SourceRangeKey,
    NodeConfig,
    ServiceCounters,
    SockRevNatKey,
    FragmentKey,
    FragmentValue,
    RefusalBudget,
);

// The layouts are the contract with the compiled programs: any change must be deliberate.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<ServiceKey>() == 8);
    assert!(size_of::<ServiceValue>() == 20);
    assert!(size_of::<Backend>() == 8);
    assert!(size_of::<Slot>() == 12);
    assert!(size_of::<RevNat>() == 8);
    assert!(size_of::<ConntrackKey>() == 16);
    assert!(size_of::<ConntrackValue>() == 32);
    assert!(size_of::<AffinityKey>() == 8);
    assert!(size_of::<AffinityValue>() == 16);
    assert!(size_of::<SourceRangeKey>() == 8);
    assert!(size_of::<NodeConfig>() == 32);
    assert!(size_of::<ServiceCounters>() == 16);
    assert!(size_of::<SockRevNatKey>() == 16);
    assert!(size_of::<FragmentKey>() == 12);
    assert!(size_of::<FragmentValue>() == 24);
    assert!(size_of::<RefusalBudget>() == 24);
};

#[cfg(test)]
mod tests {
    use super::{ConntrackKey, RefusalBudget, proto};

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn a_refusal_budget_allows_its_burst_then_its_rate() {
        let mut budget = RefusalBudget::new(10, 3);
        let now = 50 * SECOND;
        let taken = (0..5).filter(|_| budget.take(now)).count();
        assert_eq!(taken, 3, "the burst, at once");
        assert!(!budget.take(now + SECOND / 10 - 1), "not before an interval has passed");
        assert!(budget.take(now + SECOND / 10), "one more an interval later");
        assert!(!budget.take(now + SECOND / 10));
        let idle = now + 10 * SECOND;
        assert_eq!((0..5).filter(|_| budget.take(idle)).count(), 3, "idle: a full burst again");
        budget.give_back();
        assert!(budget.take(idle), "a refusal given back is there to take again");
        assert!(!budget.take(idle));
    }

    #[test]
    fn a_refusal_budget_of_zero_per_second_never_runs_out() {
        let mut budget = RefusalBudget::new(0, 0);
        assert!((0..1000).all(|i| budget.take(i)));
        assert_eq!(RefusalBudget::default(), RefusalBudget::new(0, 50), "as the map creates it");
    }

    #[test]
    fn a_conntrack_key_built_from_words_equals_the_one_built_from_fields() {
        let (src, dst) = (0x0a_f4_01_02_u32.to_be(), 0x0a_60_00_0a_u32.to_be());
        let (src_port, dst_port) = (40_000_u16.to_be(), 80_u16.to_be());
        for proto_number in [proto::TCP, proto::UDP, 0xff] {
            assert_eq!(
                ConntrackKey::new(src, dst, src_port, dst_port, proto_number),
                ConntrackKey {
                    src_ip_be: src,
                    dst_ip_be: dst,
                    src_port_be: src_port,
                    dst_port_be: dst_port,
                    proto: proto_number,
                    pad: [0; 3],
                }
            );
        }
    }
}
