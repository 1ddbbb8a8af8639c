//! North-south forwarding of translated packets: a FIB lookup finds the egress interface and
//! next hop, and the packet leaves by `bpf_redirect` without going up the stack (from XDP only
//! by the interface it came in on, see [`Egress`]). When the lookup cannot finish the job (no
//! route, no neighbour entry yet, forwarding disabled) the packet goes up the stack, which
//! resolves the neighbour, as does one with a VLAN tag, and one XDP may not send where the
//! FIB says; both outcomes are counted. XDP and the tc fallback of an external interface
//! forward the same way otherwise.
use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action},
    helpers::{bpf_fib_lookup, bpf_redirect},
    programs::{TcContext, XdpContext},
};
use lb_common::maps::{forwarding, node_flags};
use network_types::eth::EthHdr;

use crate::{
    csum,
    hook::Hook,
    lb,
    maps::FORWARDING,
    parse::{Packet, fragment, ipv4_field},
};

/// `struct bpf_fib_lookup` for IPv4 (include/uapi/linux/bpf.h), 64 bytes.
#[repr(C)]
#[derive(Default)]
struct FibLookup {
    family: u8,
    l4_protocol: u8,
    sport_be: u16,
    dport_be: u16,
    tot_len: u16,
    ifindex: u32,
    tos: u32,
    ipv4_src: [u32; 4],
    ipv4_dst: [u32; 4],
    vlan: u32,
    smac: [u8; 6],
    dmac: [u8; 6],
}

const AF_INET: u8 = 2;
const FIB_LOOKUP_SUCCESS: i64 = 0;

/// The XDP verdict for a translated packet. Only with FIB forwarding on are the outcomes
/// counted: off, every packet goes up the stack by configuration.
#[inline(always)]
pub fn forward(ctx: &XdpContext, packet: &Packet) -> u32 {
    if !fib_forwarding() {
        return xdp_action::XDP_PASS;
    }
    let (index, verdict) = match redirect(ctx, packet, Egress::IngressOnly) {
        Some(verdict) => (forwarding::REDIRECTED, verdict as u32),
        None => (forwarding::TO_STACK, xdp_action::XDP_PASS),
    };
    count(index);
    verdict
}

/// The tc fallback's verdict for a translated packet: every one is counted as the fallback's,
/// and with FIB forwarding on the redirected ones also on their own.
#[inline(always)]
pub fn forward_from_tc(ctx: &TcContext, packet: &Packet) -> i32 {
    count(forwarding::TC_FALLBACK);
    if !fib_forwarding() {
        return TC_ACT_OK;
    }
    match redirect(ctx, packet, Egress::Any) {
        Some(verdict) => {
            count(forwarding::TC_FALLBACK_REDIRECTED);
            verdict as i32
        }
        None => TC_ACT_OK,
    }
}

#[inline(always)]
fn fib_forwarding() -> bool {
    lb::node_config().is_some_and(|config| config.flags & node_flags::FIB_FORWARD != 0)
}

/// Counts one translated packet under `index` of [`forwarding`].
#[inline(always)]
pub fn count(index: u32) {
    if let Some(counter) = FORWARDING.get_ptr_mut(index) {
        // SAFETY: this CPU's slot.
        unsafe { *counter += 1 };
    }
}

/// Where a redirect may send a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Egress {
    /// XDP: only back out of the interface the packet came in on (a NodePort's remote backend,
    /// or an answer to a client behind the same network). A frame XDP redirects into another
    /// device is lost where that device cannot take it (a pod's veth, whose peer runs no XDP
    /// program and no GRO, drops it), which no lookup here can tell.
    IngressOnly,
    /// tc: anywhere; an skb redirected into a veth needs nothing of its peer.
    Any,
}

/// Rewrites the packet for the next hop the FIB names and returns `bpf_redirect`'s verdict;
/// `None` (the packet unchanged) where the stack has to take it.
#[inline(always)]
fn redirect(ctx: &impl Hook, packet: &Packet, egress: Egress) -> Option<i64> {
    let l3 = packet.l3_offset;
    // A frame with an 802.1Q tag, in it or (tc) taken out into the skb by the kernel, would
    // leave with that tag whatever the egress (the FIB lookup says nothing of VLANs): the
    // stack takes it.
    if l3 != EthHdr::LEN || ctx.vlan_tag_outside_frame() {
        return None;
    }
    // The translated addresses and ports, as they are now in the packet. A later fragment has
    // no ports, so none for any fragment: the fragments of a datagram take one path (the
    // kernel's multipath hash leaves ports out for fragments too).
    let (sport_be, dport_be) = if packet.fragment != fragment::WHOLE {
        (0, 0)
    } else {
        (ctx.load(packet.l4_offset).ok()?, ctx.load(packet.l4_offset + 2).ok()?)
    };
    let ingress = ctx.ingress_ifindex();
    let mut lookup = FibLookup {
        family: AF_INET,
        l4_protocol: packet.proto,
        sport_be,
        dport_be,
        tot_len: packet.total_len,
        ifindex: ingress,
        ..FibLookup::default()
    };
    lookup.ipv4_src[0] = ctx.load(l3 + ipv4_field::SRC).ok()?;
    lookup.ipv4_dst[0] = ctx.load(l3 + ipv4_field::DST).ok()?;
    // SAFETY: `lookup` is a valid, writable bpf_fib_lookup of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            core::ptr::from_mut(&mut lookup).cast(),
            size_of::<FibLookup>() as i32,
            0,
        )
    };
    if rc != FIB_LOOKUP_SUCCESS || (egress == Egress::IngressOnly && lookup.ifindex != ingress) {
        return None;
    }
    // A router decrements the TTL; an expiring packet goes up the stack, which sends the
    // ICMP time exceeded.
    let ttl_proto: u16 = ctx.load(l3 + ipv4_field::TTL).ok()?;
    let ttl = ttl_proto.to_ne_bytes()[0];
    if ttl <= 1 {
        return None;
    }
    let decremented = u16::from_ne_bytes([ttl - 1, ttl_proto.to_ne_bytes()[1]]);
    let check: u16 = ctx.load(l3 + ipv4_field::CHECK).ok()?;
    ctx.store(l3 + ipv4_field::TTL, &decremented).ok()?;
    ctx.store(l3 + ipv4_field::CHECK, &csum::replace16(check, ttl_proto, decremented)).ok()?;
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&lookup.dmac);
    macs[6..].copy_from_slice(&lookup.smac);
    ctx.store(0, &macs).ok()?;
    // SAFETY: plain helper call.
    Some(unsafe { bpf_redirect(lookup.ifindex, 0) })
}
