//! The service stage: translate packets of known flows, and for the first packet of a new one
//! find the frontend, apply its policies, choose a backend, decide on SNAT and record the flow.

use lb_common::{
    conntrack::{CLAIMED, lives_at},
    hash::{finalize, flow_hash},
    maps::{
        AffinityKey, AffinityValue, Backend, ConntrackKey, ConntrackValue, NodeConfig, ServiceKey,
        ServiceValue, SourceRangeKey, backend_flags, closing, ct_flags, fragment_side, node_flags,
        proto, scope, service_flags,
    },
    stats::Reason,
};

use aya_ebpf::maps::lpm_trie::Key as LpmKey;

use crate::{
    conntrack, fragments,
    hook::Hook,
    local_sockets,
    maps::{
        AFFINITY, BACKEND_SLOTS, BACKENDS, BPF_ANY, BPF_NOEXIST, NODE_CONFIG, SERVICE_STATS,
        SERVICES, SOURCE_RANGES,
    },
    nat::{self, End},
    parse::{Packet, fragment, tcp_flags},
};

/// Where the packet entered this node.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A pod-facing interface (tc): the source is a pod of this node.
    Pod,
    /// An external interface (XDP): anything from the network.
    External,
}

/// What the program does with the packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not ours: hand it on untouched.
    Pass,
    /// Translated: let it continue to its new destination.
    Forward,
    /// Discard.
    Drop,
    /// Refuse: the packet was rewritten into a refusal to send back.
    Refuse,
}

/// Upper bound on SNAT port candidates tried for one new flow.
const SNAT_PROBES: u32 = 8;
/// The step between a flow's SNAT port candidates: a prime above any port range.
const SNAT_PORT_STRIDE: u32 = 65_537;

/// Runs the service stage on a parsed TCP or UDP packet.
#[inline(always)]
pub fn process(hook: &impl Hook, packet: &Packet, origin: Origin) -> (Verdict, Reason) {
    let Some(config) = node_config() else {
        return (Verdict::Pass, Reason::NoNodeConfig);
    };
    let now = conntrack::now();
    let key = conntrack::key_of(packet);
    // A TCP SYN nearly always opens a flow. Looking its frontend up before the conntrack lookup,
    // instead of after that misses, lets the CPU overlap the two lookups' cache misses (their
    // loads are independent), and misses are most of what a first packet costs on a busy node.
    let early_frontend =
        packet.opens_tcp_connection().then(|| find_service(packet, origin, config));
    if let Some(Some(service)) = early_frontend {
        warm_counters(service.service_id);
    }
    if let Some(entry) = conntrack::lookup(&key, packet, now, config) {
        conntrack::touch(entry, packet, now, config);
        // SAFETY: a live pointer from the conntrack lookup above.
        let value = unsafe { *entry };
        return if value.flags & ct_flags::REPLY != 0 {
            reply(hook, packet, fragment_side::INGRESS, &value)
        } else {
            forward_established(hook, packet, &value)
        };
    }
    let frontend = early_frontend.unwrap_or_else(|| find_service(packet, origin, config));
    new_flow(hook, packet, origin, config, now, frontend)
}

/// The node configuration, once the daemon has written it.
#[inline(always)]
pub fn node_config() -> Option<&'static NodeConfig> {
    NODE_CONFIG.get(0).filter(|config| config.flags & node_flags::CONFIGURED != 0)
}

/// Client to service, on a known flow.
#[inline(always)]
fn forward_established(
    hook: &impl Hook,
    packet: &Packet,
    flow: &ConntrackValue,
) -> (Verdict, Reason) {
    if translate_forward(hook, packet, flow).is_err() {
        return (Verdict::Drop, Reason::TruncatedL4);
    }
    fragments::remember_forward(packet, flow);
    count_service(flow.service_id, packet);
    (Verdict::Forward, Reason::ForwardEstablished)
}

#[inline(always)]
fn translate_forward(hook: &impl Hook, packet: &Packet, flow: &ConntrackValue) -> Result<(), ()> {
    nat::rewrite(hook, packet, End::Destination, flow.translated_ip_be, flow.translated_port_be)?;
    if flow.flags & ct_flags::SNAT != 0 {
        nat::rewrite(hook, packet, End::Source, flow.nat_ip_be, flow.nat_port_be)?;
    }
    Ok(())
}

/// Backend to client: restore the service address as the source, and the client as the
/// destination if the flow was masqueraded. `side`: a [`fragment_side`], where the reply is
/// seen.
#[inline(always)]
fn reply(hook: &impl Hook, packet: &Packet, side: u8, flow: &ConntrackValue) -> (Verdict, Reason) {
    let (vip, port) = (flow.translated_ip_be, flow.translated_port_be);
    let translated = nat::rewrite(hook, packet, End::Source, vip, port).and_then(|()| {
        if flow.flags & ct_flags::SNAT != 0 {
            nat::rewrite(hook, packet, End::Destination, flow.nat_ip_be, flow.nat_port_be)
        } else {
            Ok(())
        }
    });
    match translated {
        Ok(()) => {
            fragments::remember_reply(packet, side, flow);
            (Verdict::Forward, Reason::ReplyTranslated)
        }
        Err(()) => (Verdict::Drop, Reason::TruncatedL4),
    }
}

#[inline(always)]
fn in_prefix(address_be: u32, prefix_be: u32, mask_be: u32) -> bool {
    address_be & mask_be == prefix_be
}

/// The first packet of a flow, to `frontend` (`None`: no frontend serves its destination).
#[inline(always)]
fn new_flow(
    hook: &impl Hook,
    packet: &Packet,
    origin: Origin,
    config: &NodeConfig,
    now: u64,
    frontend: Option<ServiceValue>,
) -> (Verdict, Reason) {
    let Some(service) = frontend else {
        return not_a_service(packet, config);
    };
    let service_id = service.service_id;
    if service.flags & service_flags::SOURCE_RANGES != 0
        && !source_allowed(service_id, packet.src_ip_be)
    {
        return (Verdict::Drop, Reason::DropSourceRange);
    }
    if service.slot_count == 0 {
        return if service.flags & service_flags::EMPTY_DROP != 0 {
            (Verdict::Drop, Reason::DropNoLocalEndpoint)
        } else {
            (Verdict::Refuse, Reason::RejectNoEndpoints)
        };
    }
    let hash = flow_hash(
        packet.src_ip_be,
        packet.dst_ip_be,
        packet.src_port_be,
        packet.dst_port_be,
        packet.proto,
    );
    let Some((backend_id, backend)) = choose_backend(&service, config, packet.src_ip_be, hash, now)
    else {
        return (Verdict::Drop, Reason::DropBackendMissing);
    };

    // A TCP flow is opening until a packet without SYN or RST passes (see `conntrack`). One
    // first seen at a FIN or RST (no SYN: a stray segment, or a connection whose entries are
    // gone) is closing from the start, so that it holds its entries, and any SNAT port, for
    // the closing timeout only.
    let tcp = packet.proto == proto::TCP;
    let ending = tcp
        && packet.flags & (tcp_flags::FIN | tcp_flags::RST) != 0
        && packet.flags & tcp_flags::SYN == 0;
    let mut forward = ConntrackValue {
        last_seen: now,
        backend_id,
        service_id,
        translated_ip_be: backend.ip_be,
        nat_ip_be: 0,
        translated_port_be: backend.port_be,
        nat_port_be: 0,
        flags: 0,
        opening: u8::from(tcp && !ending),
        closing: if ending { closing::CLOSING } else { closing::OPEN },
    };
    // Replies come from the address the client spoke to: the packet's destination.
    let mut reply_entry = ConntrackValue {
        flags: ct_flags::REPLY,
        translated_ip_be: packet.dst_ip_be,
        translated_port_be: packet.dst_port_be,
        ..forward
    };
    let mut reply_key = ConntrackKey::new(
        backend.ip_be,
        packet.src_ip_be,
        backend.port_be,
        packet.src_port_be,
        packet.proto,
    );

    // The address to masquerade to: the node's, where the reply would otherwise not come back
    // through this node; the client's own (a new port only, as netfilter resolves a clash)
    // where another flow holds the reply tuple.
    let masquerade_to = if needs_snat(&service, &backend, packet, origin, config) {
        Some(config.snat_ip_be)
    } else {
        match insert_reply(&reply_key, &reply_entry, packet.proto, config) {
            Ok(()) => None,
            Err(ReplyTuple::HeldByAnotherFlow) => Some(packet.src_ip_be),
            Err(ReplyTuple::Refused) => return (Verdict::Drop, Reason::DropConntrackFull),
        }
    };
    if let Some(nat_ip_be) = masquerade_to {
        // Mixed once more: the flow hash modulo the slot count chose the backend, and a slot
        // count and a port range with a common factor would otherwise give each backend's
        // flows only part of the range.
        let claim = SnatClaim { nat_ip_be, hash: finalize(hash) };
        let claimed =
            claim_snat_port(hook, &mut reply_key, &mut reply_entry, packet, config, claim);
        let Some(port_be) = claimed else {
            return (Verdict::Drop, Reason::DropSnatExhausted);
        };
        forward.flags |= ct_flags::SNAT;
        forward.nat_ip_be = nat_ip_be;
        forward.nat_port_be = port_be;
    }
    if conntrack::insert(&conntrack::key_of(packet), &forward, BPF_ANY).is_err() {
        return (Verdict::Drop, Reason::DropConntrackFull);
    }
    if translate_forward(hook, packet, &forward).is_err() {
        return (Verdict::Drop, Reason::TruncatedL4);
    }
    fragments::remember_forward(packet, &forward);
    count_service(service_id, packet);
    (Verdict::Forward, Reason::ForwardNew)
}

/// The frontend for this packet: the scope-EXTERNAL entry, or its INTERNAL twin for sources
/// inside the cluster when the two differ.
#[inline(always)]
fn find_service(packet: &Packet, origin: Origin, config: &NodeConfig) -> Option<ServiceValue> {
    let internal_source = origin == Origin::Pod
        || in_prefix(packet.src_ip_be, config.cluster_cidr_be, config.cluster_mask_be);
    lookup_frontend(packet.dst_ip_be, packet.dst_port_be, packet.proto, internal_source)
}

/// The frontend of `vip:port/proto` as a source inside or outside the cluster sees it.
#[inline(always)]
pub fn lookup_frontend(
    vip_be: u32,
    port_be: u16,
    proto: u8,
    internal_source: bool,
) -> Option<ServiceValue> {
    let mut key = ServiceKey { vip_be, port_be, proto, scope: scope::EXTERNAL };
    // SAFETY: service values are plain data written by the daemon.
    let service = *unsafe { SERVICES.get(&key) }?;
    if service.flags & service_flags::TWO_SCOPES != 0 && internal_source {
        key.scope = scope::INTERNAL;
        // SAFETY: as above.
        return unsafe { SERVICES.get(&key) }.copied();
    }
    Some(service)
}

/// No frontend matched: refuse on an allocated ClusterIP, drop elsewhere in the service CIDR,
/// pass anything else.
#[inline(always)]
fn not_a_service(packet: &Packet, config: &NodeConfig) -> (Verdict, Reason) {
    match unserved(packet.dst_ip_be, config) {
        Unserved::NotOurs => (Verdict::Pass, Reason::NotService),
        Unserved::Port => (Verdict::Refuse, Reason::RejectUnservedPort),
        Unserved::UnallocatedVip => (Verdict::Drop, Reason::DropUnallocatedVip),
    }
}

/// What an address no frontend serves (on the port and protocol asked) is.
pub enum Unserved {
    /// Outside the service CIDR: not a service address at all.
    NotOurs,
    /// An allocated ClusterIP (its marker entry, port 0 protocol 0, exists), on a port or
    /// protocol it does not serve.
    Port,
    /// Inside the service CIDR, held by no service.
    UnallocatedVip,
}

#[inline(always)]
pub fn unserved(dst_ip_be: u32, config: &NodeConfig) -> Unserved {
    if !in_prefix(dst_ip_be, config.service_cidr_be, config.service_mask_be) {
        return Unserved::NotOurs;
    }
    let marker = ServiceKey::marker(dst_ip_be);
    // SAFETY: plain data.
    if unsafe { SERVICES.get(&marker) }.is_some() {
        Unserved::Port
    } else {
        Unserved::UnallocatedVip
    }
}

/// Whether `src_ip_be` lies in a loadBalancerSourceRanges CIDR of frontend `service_id`.
#[inline(always)]
pub fn source_allowed(service_id: u32, src_ip_be: u32) -> bool {
    let key =
        LpmKey::new(SourceRangeKey::SERVICE_ID_BITS + 32, SourceRangeKey { service_id, src_ip_be });
    SOURCE_RANGES.get(&key).is_some()
}

/// The backend for a new flow: the client's affinity if the frontend has one and it is fresh,
/// else the slot the flow hash picks.
#[inline(always)]
pub fn choose_backend(
    service: &ServiceValue,
    config: &NodeConfig,
    client_be: u32,
    hash: u32,
    now: u64,
) -> Option<(u32, Backend)> {
    let sticky = service.flags & service_flags::AFFINITY != 0;
    let affinity_key = AffinityKey { client_ip_be: client_be, service_id: service.service_id };
    if sticky {
        // SAFETY: plain data.
        if let Some(previous) = unsafe { AFFINITY.get(&affinity_key) } {
            let timeout =
                u64::from(service.affinity_timeout_s) * u64::from(config.jiffies_per_second);
            if now.saturating_sub(previous.last_used) <= timeout {
                let backend_id = previous.backend_id;
                // SAFETY: plain data.
                if let Some(backend) = unsafe { BACKENDS.get(&backend_id) } {
                    remember_affinity(&affinity_key, backend_id, now);
                    return Some((backend_id, *backend));
                }
            }
        }
    }
    // `checked_rem`: a division by zero would be a panic path, which the verifier rejects.
    let index = service.slot_base.wrapping_add(hash.checked_rem(service.slot_count)?);
    // The slot carries the backend itself: no `BACKENDS` lookup. A zero slot was never written
    // (or was freed): no backend.
    let slot = *BACKEND_SLOTS.get(index).filter(|slot| slot.backend_id != 0)?;
    if sticky {
        remember_affinity(&affinity_key, slot.backend_id, now);
    }
    Some((slot.backend_id, slot.backend))
}

#[inline(always)]
fn remember_affinity(key: &AffinityKey, backend_id: u32, now: u64) {
    let value = AffinityValue { last_used: now, backend_id, pad: [0; 4] };
    // A failed insert only loses stickiness for the next flow; the LRU map makes it rare.
    let _ = AFFINITY.insert(key, &value, BPF_ANY);
}

/// Masquerade when the reply would otherwise not come back through this node, or not to the
/// client: hairpin (the backend is the client itself), a NodePort/externalIP/LoadBalancer
/// frontend with Cluster policy whose backend is remote, and a ClusterIP reached from outside
/// the cluster (kube-proxy's masquerade of non-cluster sources), unless the backend is this
/// node's own stack (a host-network endpoint): its reply to the masquerading address would
/// stay on loopback, where nothing translates it, while to the client it leaves by an
/// interface whose egress `lb_tc_reply` translates.
#[inline(always)]
fn needs_snat(
    service: &ServiceValue,
    backend: &Backend,
    packet: &Packet,
    origin: Origin,
    config: &NodeConfig,
) -> bool {
    if backend.ip_be == packet.src_ip_be {
        return true;
    }
    let external_frontend = service.flags & service_flags::EXTERNAL != 0;
    if external_frontend {
        return service.flags & service_flags::EXT_LOCAL == 0
            && backend.flags & backend_flags::LOCAL == 0;
    }
    let host_network_here = backend.flags & backend_flags::LOCAL != 0
        && !in_prefix(backend.ip_be, config.cluster_cidr_be, config.cluster_mask_be);
    origin == Origin::External
        && !in_prefix(packet.src_ip_be, config.cluster_cidr_be, config.cluster_mask_be)
        && !host_network_here
}

/// Why a flow's reply entry could not be inserted under its own reply tuple.
enum ReplyTuple {
    /// A live flow from the same client socket to the same backend through another frontend
    /// (a DNS client asking two services of the same pods from one port) holds it: its
    /// replies would come back from this flow's frontend.
    HeldByAnotherFlow,
    /// The map refused the entry.
    Refused,
}

/// Inserts a flow's reply entry under its reply tuple (backend -> client), unless another
/// live flow holds it ([`may_replace`]).
#[inline(always)]
fn insert_reply(
    key: &ConntrackKey,
    entry: &ConntrackValue,
    proto_number: u8,
    config: &NodeConfig,
) -> Result<(), ReplyTuple> {
    if conntrack::insert(key, entry, BPF_NOEXIST).is_ok() {
        return Ok(());
    }
    let Some(existing) = crate::maps::CONNTRACK.get_ptr_mut(key) else {
        // Deleted since (the collector): insert again, over no flow that another CPU made
        // meanwhile.
        return conntrack::insert(key, entry, BPF_NOEXIST)
            .or_else(|()| made_meanwhile(key, entry))
            .map_err(|()| ReplyTuple::HeldByAnotherFlow);
    };
    take_over(key, existing, entry, proto_number, config)
}

/// Writes `entry` under `key` over `existing`, the entry found there, if [`may_replace`] lets
/// it.
#[inline(always)]
fn take_over(
    key: &ConntrackKey,
    existing: *mut ConntrackValue,
    entry: &ConntrackValue,
    proto_number: u8,
    config: &NodeConfig,
) -> Result<(), ReplyTuple> {
    let claimed =
        may_replace(existing, entry, proto_number, config).ok_or(ReplyTuple::HeldByAnotherFlow)?;
    write_over(key, existing, entry, claimed).map_err(|()| ReplyTuple::Refused)
}

/// Writes `entry` under `key` over `existing`, which [`may_replace`] let it take, giving the
/// claim back (`claimed`, the timestamp it took) if the map refuses the write.
#[inline(always)]
fn write_over(
    key: &ConntrackKey,
    existing: *mut ConntrackValue,
    entry: &ConntrackValue,
    claimed: u64,
) -> Result<(), ()> {
    conntrack::insert(key, entry, BPF_ANY).inspect_err(|()| conntrack::release(existing, claimed))
}

/// Whether a new flow may write its reply entry `entry` over `existing`, found under the same
/// reply tuple: `Some(timestamp)` to give back if the write fails (`conntrack::release`).
/// - This flow's own live entry: written over as it is (`Some(CLAIMED)`, nothing to give
///   back), as another CPU writes a live entry only for this same flow, with the same content.
/// - An expired one, once this CPU claimed it (`conntrack::claim`): looking and writing are not
///   one step, and without the claim two CPUs opening two flows over it at once would both
///   write it, and the replies of the first would go to the second's client.
/// - An entry being claimed is held.
#[inline(always)]
fn may_replace(
    existing: *mut ConntrackValue,
    entry: &ConntrackValue,
    proto_number: u8,
    config: &NodeConfig,
) -> Option<u64> {
    let seen_at = conntrack::last_seen(existing);
    if seen_at == CLAIMED {
        return None;
    }
    // SAFETY: a valid pointer from a lookup in this program run.
    let seen = unsafe { &*existing };
    let rate = config.jiffies_per_second;
    if lives_at(seen_at, seen, proto_number, entry.last_seen, rate) {
        return same_flow(seen, entry).then_some(CLAIMED);
    }
    // Expired: a slot the map freed and reused since the look holds a fresh timestamp, which
    // the claim does not match.
    conntrack::claim(existing, seen_at).then_some(seen_at)
}

/// Whether another CPU has just inserted `entry` itself under `key`: a packet of the same new
/// flow, opening it at the same time. Its entry then serves this one too.
#[inline(always)]
fn made_meanwhile(key: &ConntrackKey, entry: &ConntrackValue) -> Result<(), ()> {
    let existing = crate::maps::CONNTRACK.get_ptr(key).ok_or(())?;
    // SAFETY: a valid pointer from the lookup.
    let mine = same_flow(unsafe { &*existing }, entry) && conntrack::last_seen(existing) != CLAIMED;
    if mine { Ok(()) } else { Err(()) }
}

/// Whether the reply entry `existing` is the one `entry` would write: this very flow's (same
/// reply tuple, frontend and masquerade), seen again after its forward entry went (evicted
/// under pressure while its reply entry stayed). It takes its own entry back: another reply
/// tuple (another SNAT port) would break the connection the backend knows.
#[inline(always)]
fn same_flow(existing: &ConntrackValue, entry: &ConntrackValue) -> bool {
    let kind = ct_flags::REPLY | ct_flags::SNAT;
    existing.flags & kind == entry.flags & kind
        && (existing.translated_ip_be, existing.translated_port_be)
            == (entry.translated_ip_be, entry.translated_port_be)
        && (existing.nat_ip_be, existing.nat_port_be) == (entry.nat_ip_be, entry.nat_port_be)
}

/// Where a masqueraded flow's source goes: the address, and the hash its port candidates
/// start from.
struct SnatClaim {
    nat_ip_be: u32,
    hash: u32,
}

/// Finds a source port in the SNAT range whose reply tuple (backend -> masquerading
/// address:port) is free, of flows and of the node's own sockets, or holds an expired entry or
/// this flow's own ([`same_flow`]), and takes it by writing the reply entry. Returns the port
/// in network order. Should another CPU take a free port for another flow between the look and
/// the write, this flow gets none: its packet is dropped, and its client's retry looks again.
///
/// A local socket that takes the port later is not seen: the range sits above the kernel's
/// ephemeral ports, so only an explicit bind (or a widened `ip_local_port_range`) does that.
#[inline(always)]
fn claim_snat_port(
    hook: &impl Hook,
    reply_key: &mut ConntrackKey,
    reply_entry: &mut ConntrackValue,
    packet: &Packet,
    config: &NodeConfig,
    claim: SnatClaim,
) -> Option<u16> {
    if config.snat_port_min == 0 || config.snat_port_max < config.snat_port_min {
        return None;
    }
    reply_key.dst_ip_be = claim.nat_ip_be;
    reply_entry.flags |= ct_flags::SNAT;
    reply_entry.nat_ip_be = packet.src_ip_be;
    reply_entry.nat_port_be = packet.src_port_be;
    // The search only looks (and claims); the one write follows it, so that the verifier walks
    // the writes once rather than once per candidate.
    let (port, found) = snat_port_candidate(hook, reply_key, reply_entry, packet, config, claim)?;
    reply_key.dst_port_be = port.to_be();
    let written = match found {
        // A free port: NOEXIST, as another CPU may take it between the look and here, for
        // another flow, or for this one.
        None => conntrack::insert(reply_key, reply_entry, BPF_NOEXIST)
            .or_else(|()| made_meanwhile(reply_key, reply_entry)),
        Some((existing, claimed)) => write_over(reply_key, existing, reply_entry, claimed),
    };
    written.is_ok().then_some(port.to_be())
}

/// An entry found under a candidate reply tuple that a new flow may write over, and the
/// timestamp its claim took (see [`may_replace`]).
type Replaceable = (*mut ConntrackValue, u64);

/// The first SNAT port candidate for the flow whose reply entry is `reply_entry`: its own
/// entry's port, or one whose reply tuple is free of flows (`None`) and of the node's own
/// sockets, or holds an entry it may take over (claimed already).
#[inline(always)]
fn snat_port_candidate(
    hook: &impl Hook,
    reply_key: &mut ConntrackKey,
    reply_entry: &ConntrackValue,
    packet: &Packet,
    config: &NodeConfig,
    SnatClaim { nat_ip_be, hash }: SnatClaim,
) -> Option<(u16, Option<Replaceable>)> {
    let min = u32::from(config.snat_port_min);
    let range = u32::from(config.snat_port_max) - min + 1;
    // A TCP segment in the middle of a connection whose forward entry went: its own reply
    // entry may hold any candidate, not only the first free one (an earlier one may have
    // freed up since). Only then: every new flow would pay for the lookups.
    if packet.proto == proto::TCP && packet.flags & tcp_flags::SYN == 0 {
        for probe in 0..SNAT_PROBES {
            let port = snat_candidate(hash, probe, min, range)?;
            reply_key.dst_port_be = port.to_be();
            if let Some(existing) = crate::maps::CONNTRACK.get_ptr_mut(reply_key)
                // SAFETY: a valid pointer from the lookup.
                && same_flow(unsafe { &*existing }, reply_entry)
                && let Some(claimed) = may_replace(existing, reply_entry, packet.proto, config)
            {
                return Some((port, Some((existing, claimed))));
            }
        }
    }
    for probe in 0..SNAT_PROBES {
        let port = snat_candidate(hash, probe, min, range)?;
        reply_key.dst_port_be = port.to_be();
        let reply_from = (reply_key.src_ip_be, reply_key.src_port_be);
        if local_sockets::receive(hook, packet.proto, reply_from, (nat_ip_be, port.to_be())) {
            continue;
        }
        let Some(existing) = crate::maps::CONNTRACK.get_ptr_mut(reply_key) else {
            return Some((port, None));
        };
        // An expired entry, or this flow's own: reuse its port.
        if let Some(claimed) = may_replace(existing, reply_entry, packet.proto, config) {
            return Some((port, Some((existing, claimed))));
        }
    }
    None
}

/// The `probe`th SNAT port candidate of a flow whose hash is `hash`, in the range of `range`
/// ports from `min`.
#[inline(always)]
fn snat_candidate(hash: u32, probe: u32, min: u32, range: u32) -> Option<u16> {
    // A prime stride above any range shares no factor with it: no candidate repeats (in 64
    // bits, which nothing here wraps).
    let step = u64::from(probe) * u64::from(SNAT_PORT_STRIDE);
    let offset = (u64::from(hash) + step).checked_rem(u64::from(range))? as u32;
    Some((min + offset) as u16)
}

#[inline(always)]
fn count_service(service_id: u32, packet: &Packet) {
    count_frontend(service_id, u64::from(packet.total_len));
}

/// Reads the frontend's counters without changing them, so that their cache misses (a per-CPU
/// array: two dependent loads) overlap the conntrack lookup's instead of coming after it.
#[inline(always)]
fn warm_counters(service_id: u32) {
    if let Some(counters) = SERVICE_STATS.get_ptr(service_id) {
        // SAFETY: this CPU's slot of a live array entry; a volatile read is never elided.
        let _ = unsafe { core::ptr::read_volatile(&raw const (*counters).packets) };
    }
}

/// Counts one packet (or one host connection, with 0 bytes) for a frontend.
#[inline(always)]
pub fn count_frontend(service_id: u32, bytes: u64) {
    if let Some(counters) = SERVICE_STATS.get_ptr_mut(service_id) {
        // SAFETY: this CPU's slot of a live array entry.
        unsafe {
            (*counters).packets += 1;
            (*counters).bytes += bytes;
        }
    }
}

/// A packet the node sends out of an interface (tc egress): when a flow's backend is a
/// host-network endpoint of this node, its replies come from the node's own stack, which no
/// interface's ingress sees, so they are reverse-translated here; so are ICMP errors the node
/// sends about translated packets, whatever their source: with a bridge CNI, the node's
/// address towards its pods lies in the cluster CIDR. (An error that a pod or a backend sent
/// was translated where it entered: its quote names the service address, which no entry's key
/// holds as a source.) Other packets from the cluster or service CIDR are pods', whose
/// replies their own interface's ingress translated, or already translated: passed at once.
#[inline(always)]
pub fn process_from_node(hook: &impl Hook, packet: &Packet) -> (Verdict, Reason) {
    let Some(config) = node_config() else {
        return (Verdict::Pass, Reason::NoNodeConfig);
    };
    if packet.proto == proto::ICMP && packet.fragment != fragment::LATER {
        return crate::icmp::process_error(hook, packet, true)
            .unwrap_or((Verdict::Pass, Reason::NotService));
    }
    let from_cluster = in_prefix(packet.src_ip_be, config.cluster_cidr_be, config.cluster_mask_be)
        || in_prefix(packet.src_ip_be, config.service_cidr_be, config.service_mask_be);
    if from_cluster {
        return (Verdict::Pass, Reason::NotService);
    }
    if packet.fragment == fragment::LATER {
        return fragments::translate_later(hook, packet, fragment_side::EGRESS, config)
            .unwrap_or((Verdict::Pass, Reason::Fragment));
    }
    let now = conntrack::now();
    let entry = translatable(packet)
        .then(|| conntrack::lookup(&conntrack::key_of(packet), packet, now, config))
        .flatten();
    // Only reply entries: the node's own connections to services never carry a service
    // address on the wire (the host path points their sockets at backends).
    // SAFETY: a live pointer from the conntrack lookup.
    let Some(entry) = entry.filter(|entry| unsafe { (**entry).flags } & ct_flags::REPLY != 0)
    else {
        return (Verdict::Pass, Reason::NotService);
    };
    conntrack::touch(entry, packet, now, config);
    // SAFETY: as above.
    reply(hook, packet, fragment_side::EGRESS, &unsafe { *entry })
}

/// A later fragment (no ports): translated as its first fragment was, if that one was
/// translated here; else dropped to a service address, passed elsewhere (see `fragments`).
#[inline(always)]
pub fn process_later_fragment(hook: &impl Hook, packet: &Packet) -> (Verdict, Reason) {
    let Some(config) = node_config() else {
        return (Verdict::Pass, Reason::NoNodeConfig);
    };
    if let Some(outcome) = fragments::translate_later(hook, packet, fragment_side::INGRESS, config)
    {
        return outcome;
    }
    if in_prefix(packet.dst_ip_be, config.service_cidr_be, config.service_mask_be) {
        (Verdict::Drop, Reason::DropFragmentUntracked)
    } else {
        (Verdict::Pass, Reason::Fragment)
    }
}

/// ICMP and the rest: nothing to translate yet. Echo requests to a service address are dropped
/// (a ClusterIP is not a host); anything else passes.
#[inline(always)]
pub fn process_other(packet: &Packet) -> (Verdict, Reason) {
    let Some(config) = node_config() else {
        return (Verdict::Pass, Reason::NoNodeConfig);
    };
    if in_prefix(packet.dst_ip_be, config.service_cidr_be, config.service_mask_be) {
        (Verdict::Drop, Reason::DropIcmpToVip)
    } else {
        (Verdict::Pass, Reason::NotService)
    }
}

/// The protocols the service stage translates.
#[inline(always)]
pub fn translatable(packet: &Packet) -> bool {
    packet.proto == proto::TCP || packet.proto == proto::UDP
}
