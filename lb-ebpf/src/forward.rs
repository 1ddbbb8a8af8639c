//! XDP forwarding of translated packets: a FIB lookup finds the egress interface and next hop,
//! and the packet leaves by `bpf_redirect` without going up the stack. When the lookup cannot
//! finish the job (no route, no neighbour entry yet, forwarding disabled) the packet goes up
//! the stack, which resolves the neighbour; both outcomes are counted.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use lb_common::maps::{forwarding, node_flags};

use crate::{
    csum,
    hook::Hook as _,
    lb,
    maps::FORWARDING,
    parse::{Packet, ipv4_field},
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
    let enabled =
        lb::node_config().is_some_and(|config| config.flags & node_flags::FIB_FORWARD != 0);
    if !enabled {
        return xdp_action::XDP_PASS;
    }
    let (index, verdict) = match redirect(ctx, packet) {
        Some(verdict) => (forwarding::REDIRECTED, verdict),
        None => (forwarding::TO_STACK, xdp_action::XDP_PASS),
    };
    count(index);
    verdict
}

/// Counts one translated packet under `index` of [`forwarding`].
#[inline(always)]
pub fn count(index: u32) {
    if let Some(counter) = FORWARDING.get_ptr_mut(index) {
        // SAFETY: this CPU's slot.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn redirect(ctx: &XdpContext, packet: &Packet) -> Option<u32> {
    let l3 = packet.l3_offset;
    // The translated addresses and ports, as they are now in the packet.
    let mut lookup = FibLookup {
        family: AF_INET,
        l4_protocol: packet.proto,
        sport_be: ctx.load(packet.l4_offset).ok()?,
        dport_be: ctx.load(packet.l4_offset + 2).ok()?,
        tot_len: packet.total_len,
        ifindex: ctx.ingress_ifindex() as u32,
        ..FibLookup::default()
    };
    lookup.ipv4_src[0] = ctx.load(l3 + ipv4_field::SRC).ok()?;
    lookup.ipv4_dst[0] = ctx.load(l3 + ipv4_field::DST).ok()?;
    // SAFETY: `lookup` is a valid, writable bpf_fib_lookup of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            core::ptr::from_mut(&mut lookup).cast(),
            size_of::<FibLookup>() as i32,
            0,
        )
    };
    if rc != FIB_LOOKUP_SUCCESS {
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
    Some(unsafe { bpf_redirect(lookup.ifindex, 0) } as u32)
}
