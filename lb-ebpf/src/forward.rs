//! North-south forwarding of translated packets: a FIB lookup finds the egress interface and
//! next hop, and the packet leaves by `bpf_redirect` without going up the stack (from XDP only
//! by the interface it came in on, see [`Egress`]). When the lookup cannot finish the job (no
//! route, no neighbour entry yet, forwarding disabled) the packet goes up the stack, which
//! resolves the neighbour, as does one with a VLAN tag, and one XDP may not send where the
//! FIB says; both outcomes are counted. XDP and the tc fallback of an external interface
//! forward the same way otherwise.
//!
//! With or without FIB forwarding, a packet with DF set too big for its path is answered here
//! with the ICMP fragmentation needed (see [`refuse::fragmentation_needed`]): for a
//! masqueraded flow the stack's own would go to this node's address, where nothing
//! translates it.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, TC_ACT_OK, xdp_action},
    helpers::{bpf_check_mtu, bpf_fib_lookup, bpf_redirect},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    maps::{forwarding, node_flags, proto},
    stats::Reason,
};
use network_types::eth::EthHdr;

use crate::{
    csum,
    hook::Hook,
    lb::{self, Verdict},
    maps::FORWARDING,
    parse::{IPV4_DF_BE, Packet, fragment, ipv4_field},
    refuse,
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
/// `BPF_FIB_LKUP_RET_FRAG_NEEDED`: `tot_len` is above the route's MTU, now in `tot_len`.
const FIB_LOOKUP_FRAG_NEEDED: i64 = 8;
/// Packets up to this IPv4 length are not checked against their path's MTU: Linux never takes
/// a path MTU below `net.ipv4.route.min_pmtu` (552 by default), it sends without DF instead.
/// Below it the lookup would cost every small packet (ACKs) for nothing.
const PATH_MTU_FLOOR: u16 = 552;

/// What becomes of a translated packet.
pub enum Onward<C> {
    /// Sent on (redirected, or up the stack): the hook's return code.
    Sent(C),
    /// Not sent on (too big for its path, DF set): the verdict and reason instead.
    Instead(Verdict, Reason),
}

/// Where the FIB sends a packet.
enum Route {
    /// On: the lookup holds the egress interface and the next hop's and its own MACs.
    Found,
    /// Longer than the path's MTU (given).
    TooBig(u16),
    /// Nowhere the lookup can tell: no route, no neighbour, forwarding off, ...
    Unknown,
}

/// What XDP does with a translated packet: answers it if too big for its path, else sends it
/// on. Only with FIB forwarding on are the packets sent on counted: off, every one goes up the
/// stack by configuration.
#[inline(always)]
pub fn forward(ctx: &XdpContext, packet: &Packet) -> Onward<u32> {
    let fib = fib_forwarding();
    let checked = may_be_too_big(ctx, packet);
    if !fib && !checked {
        return Onward::Sent(xdp_action::XDP_PASS);
    }
    // Filled in place: a copy would cost stack, of which 6.1's verifier allows 512 bytes for
    // all of a program's frames together.
    let mut next_hop = FibLookup::default();
    let redirected = match lookup(ctx, packet, &mut next_hop) {
        Route::TooBig(mtu)
            if checked && !expires_here(ctx, packet) && arrived_whole(ctx, packet) =>
        {
            return too_big(ctx, packet, mtu);
        }
        Route::Found if fib => redirect(ctx, packet, &next_hop, Egress::IngressOnly),
        _ => None,
    };
    if !fib {
        return Onward::Sent(xdp_action::XDP_PASS);
    }
    let (index, verdict) = match redirected {
        Some(verdict) => (forwarding::REDIRECTED, verdict as u32),
        None => (forwarding::TO_STACK, xdp_action::XDP_PASS),
    };
    count(index);
    Onward::Sent(verdict)
}

/// The tc fallback's [`forward`]: every translated packet is counted as the fallback's, and
/// with FIB forwarding on the redirected ones also on their own.
#[inline(always)]
pub fn forward_from_tc(ctx: &TcContext, packet: &Packet) -> Onward<i32> {
    count(forwarding::TC_FALLBACK);
    let fib = fib_forwarding();
    let checked = may_be_too_big(ctx, packet);
    if !fib && !checked {
        return Onward::Sent(TC_ACT_OK);
    }
    let mut next_hop = FibLookup::default();
    match lookup(ctx, packet, &mut next_hop) {
        Route::TooBig(mtu) if checked && !expires_here(ctx, packet) && !merged_by_gro(ctx) => {
            too_big(ctx, packet, mtu)
        }
        Route::Found if fib => match redirect(ctx, packet, &next_hop, Egress::Any) {
            Some(verdict) => {
                count(forwarding::TC_FALLBACK_REDIRECTED);
                Onward::Sent(verdict as i32)
            }
            None => Onward::Sent(TC_ACT_OK),
        },
        _ => Onward::Sent(TC_ACT_OK),
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

/// Whether `packet` is one to check against its path's MTU: a TCP or UDP packet (whose
/// translation [`refuse::fragmentation_needed`] can undo) with DF set, longer than
/// [`PATH_MTU_FLOOR`]. Without DF the stack fragments it, as the sender allows.
#[inline(always)]
fn may_be_too_big(hook: &impl Hook, packet: &Packet) -> bool {
    packet.total_len > PATH_MTU_FLOOR
        && (packet.proto == proto::TCP || packet.proto == proto::UDP)
        && packet.fragment != fragment::LATER
        && hook
            .load::<u16>(packet.l3_offset + ipv4_field::FRAGS)
            .is_ok_and(|frags_be| frags_be & IPV4_DF_BE != 0)
}

/// Whether an XDP frame is one the wire carried: within its interface's MTU. Generic (skb) XDP
/// runs after GRO, on segments merged into one frame longer than any MTU, which the stack
/// splits again on the way out. Measured by the IPv4 length, as the FIB lookup measures it (a
/// frame's own length would count a VLAN tag against the MTU).
#[inline(always)]
fn arrived_whole(ctx: &XdpContext, packet: &Packet) -> bool {
    let mut mtu_len = u32::from(packet.total_len);
    // SAFETY: plain helper call; ifindex 0 means the interface the frame arrived on.
    unsafe { bpf_check_mtu(ctx.as_ptr(), 0, &raw mut mtu_len, 0, 0) == 0 }
}

/// Whether the skb holds several segments merged by GRO (or built for GSO): longer than the
/// path's MTU as a whole, but sent on segment by segment.
#[inline(always)]
fn merged_by_gro(ctx: &TcContext) -> bool {
    let skb = ctx.as_ptr().cast::<__sk_buff>();
    // SAFETY: reads a field of the skb the kernel handed us.
    unsafe { (*skb).gso_size != 0 }
}

/// A packet too big for a path of `mtu` bytes becomes its ICMP error, to send back.
#[inline(always)]
fn too_big<C>(hook: &impl Hook, packet: &Packet, mtu: u16) -> Onward<C> {
    match refuse::fragmentation_needed(hook, packet, mtu) {
        Ok(()) => Onward::Instead(Verdict::Refuse, Reason::FragmentationNeeded),
        Err(()) => Onward::Instead(Verdict::Drop, Reason::DropRefusalFailed),
    }
}

/// Whether the packet's TTL runs out at this hop: the stack's time exceeded then comes before
/// any fragmentation needed, as in `ip_forward`.
#[inline(always)]
fn expires_here(hook: &impl Hook, packet: &Packet) -> bool {
    hook.load::<u8>(packet.l3_offset + ipv4_field::TTL).is_ok_and(|ttl| ttl <= 1)
}

/// Looks the translated packet up in the FIB, from the interface it came in on, into `lookup`.
#[inline(always)]
fn lookup(ctx: &impl Hook, packet: &Packet, lookup: &mut FibLookup) -> Route {
    let l3 = packet.l3_offset;
    // The translated addresses and ports, as they are now in the packet. A later fragment has
    // no ports, so none for any fragment: the fragments of a datagram take one path (the
    // kernel's multipath hash leaves ports out for fragments too).
    let ports = if packet.fragment != fragment::WHOLE {
        Ok((0, 0))
    } else {
        ctx.load(packet.l4_offset).and_then(|sport| Ok((sport, ctx.load(packet.l4_offset + 2)?)))
    };
    let (Ok((sport_be, dport_be)), Ok(src), Ok(dst), Ok(tos)) = (
        ports,
        ctx.load(l3 + ipv4_field::SRC),
        ctx.load(l3 + ipv4_field::DST),
        ctx.load::<u8>(l3 + ipv4_field::TOS),
    ) else {
        return Route::Unknown;
    };
    lookup.family = AF_INET;
    lookup.l4_protocol = packet.proto;
    lookup.sport_be = sport_be;
    lookup.dport_be = dport_be;
    // Asks for the MTU check: a longer packet gets FRAG_NEEDED, and the route's MTU here.
    lookup.tot_len = packet.total_len;
    lookup.ifindex = ctx.ingress_ifindex();
    // Routing by TOS (`ip rule ... tos`) sees what the stack's forwarding would.
    lookup.tos = u32::from(tos);
    lookup.ipv4_src[0] = src;
    lookup.ipv4_dst[0] = dst;
    // SAFETY: `lookup` is a valid, writable bpf_fib_lookup of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            core::ptr::from_mut(lookup).cast(),
            size_of::<FibLookup>() as i32,
            0,
        )
    };
    match rc {
        FIB_LOOKUP_SUCCESS => Route::Found,
        FIB_LOOKUP_FRAG_NEEDED => Route::TooBig(lookup.tot_len),
        _ => Route::Unknown,
    }
}

/// Rewrites the packet for `next_hop` and returns `bpf_redirect`'s verdict; `None` (the packet
/// unchanged) where the stack has to take it.
#[inline(always)]
fn redirect(ctx: &impl Hook, packet: &Packet, next_hop: &FibLookup, egress: Egress) -> Option<i64> {
    let l3 = packet.l3_offset;
    // A frame with an 802.1Q tag, in it or (tc) taken out into the skb by the kernel, would
    // leave with that tag whatever the egress (the FIB lookup says nothing of VLANs): the
    // stack takes it.
    if l3 != EthHdr::LEN || ctx.vlan_tag_outside_frame() {
        return None;
    }
    if egress == Egress::IngressOnly && next_hop.ifindex != ctx.ingress_ifindex() {
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
    macs[..6].copy_from_slice(&next_hop.dmac);
    macs[6..].copy_from_slice(&next_hop.smac);
    ctx.store(0, &macs).ok()?;
    // SAFETY: plain helper call.
    Some(unsafe { bpf_redirect(next_hop.ifindex, 0) })
}
