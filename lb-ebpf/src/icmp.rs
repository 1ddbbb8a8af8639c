//! ICMP errors about translated flows (RFC 792: destination unreachable, including RFC 1191's
//! fragmentation needed, and time exceeded). They quote the offending datagram's header as it
//! was on the wire, after our translation, so both the quoted header and the outer addresses
//! must be translated back for the error to reach the flow's other end and make sense there:
//! otherwise path-MTU discovery breaks and clients wait for timeouts instead of errors.

use lb_common::{
    maps::{ConntrackKey, ct_flags, proto},
    stats::Reason,
};

use crate::{
    conntrack, csum,
    hook::{Hook, L4Csum},
    lb::{self, Verdict},
    maps::CONNTRACK,
    nat::End,
    parse::{IPV4_OFFSET_MASK, Packet, ipv4_field},
};

const DEST_UNREACHABLE: u8 = 3;
const TIME_EXCEEDED: u8 = 11;
/// The ICMP header before the quoted datagram.
const ICMP_HEADER_LEN: usize = 8;

/// The quoted datagram's header fields and where they sit in the packet.
struct Quote {
    l3: usize,
    l4: usize,
    src_be: u32,
    dst_be: u32,
    src_port_be: u16,
    dst_port_be: u16,
    proto: u8,
}

/// Translates an ICMP error about a known flow; `None` if the packet is not one. With
/// `about_forward_only`, only errors about packets sent to a backend (the node's own errors on
/// their way out, already routed to the client, which a translation towards a backend would
/// not reroute).
#[inline(always)]
pub fn process_error(
    hook: &impl Hook,
    packet: &Packet,
    about_forward_only: bool,
) -> Option<(Verdict, Reason)> {
    if packet.flags != DEST_UNREACHABLE && packet.flags != TIME_EXCEEDED {
        return None;
    }
    let config = lb::node_config()?;
    let quote = read_quote(hook, packet)?;
    // The quoted datagram went one way; the conntrack entry of the opposite direction is keyed
    // by the tuple as the other end sends it.
    let key = ConntrackKey::new(
        quote.dst_be,
        quote.src_be,
        quote.dst_port_be,
        quote.src_port_be,
        quote.proto,
    );
    // SAFETY: plain data.
    let flow = *unsafe { CONNTRACK.get(&key) }?;
    if !conntrack::is_live(&flow, quote.proto, conntrack::now(), config) {
        return None;
    }
    let translated = if flow.flags & ct_flags::REPLY != 0 {
        about_forward_packet(hook, packet, &quote, &flow)
    } else if about_forward_only {
        return None;
    } else {
        about_reply_packet(hook, packet, &quote, &flow)
    };
    Some(match translated {
        Ok(()) => (Verdict::Forward, Reason::IcmpErrorTranslated),
        Err(()) => (Verdict::Drop, Reason::TruncatedL4),
    })
}

#[inline(always)]
fn read_quote(hook: &impl Hook, packet: &Packet) -> Option<Quote> {
    let l3 = packet.l4_offset + ICMP_HEADER_LEN;
    let version_ihl: u8 = hook.load(l3).ok()?;
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || header_len < 20 {
        return None;
    }
    let l4 = l3 + header_len;
    // The ports must lie inside the ICMP message, not in padding after it.
    if l4 + 4 > packet.l3_offset + usize::from(packet.total_len) {
        return None;
    }
    // A quoted later fragment has no ports where they would be: its bytes there are payload.
    let quoted_frags: u16 = hook.load(l3 + ipv4_field::FRAGS).ok()?;
    if u16::from_be(quoted_frags) & IPV4_OFFSET_MASK != 0 {
        return None;
    }
    let quoted_proto: u8 = hook.load(l3 + ipv4_field::PROTOCOL).ok()?;
    if quoted_proto != proto::TCP && quoted_proto != proto::UDP {
        return None;
    }
    Some(Quote {
        l3,
        l4,
        src_be: hook.load(l3 + ipv4_field::SRC).ok()?,
        dst_be: hook.load(l3 + ipv4_field::DST).ok()?,
        src_port_be: hook.load(l4).ok()?,
        dst_port_be: hook.load(l4 + 2).ok()?,
        proto: quoted_proto,
    })
}

/// The error is about a client-to-backend packet (the backend, or a router towards it,
/// answered): make the quote read client -> VIP again and send it to the client.
#[inline(always)]
fn about_forward_packet(
    hook: &impl Hook,
    packet: &Packet,
    quote: &Quote,
    reply_entry: &lb_common::maps::ConntrackValue,
) -> Result<(), ()> {
    let (vip, port) = (reply_entry.translated_ip_be, reply_entry.translated_port_be);
    let icmp = packet.l4_offset;
    rewrite_quoted(hook, icmp, quote, End::Destination, vip, port)?;
    if reply_entry.flags & ct_flags::SNAT != 0 {
        let (client, client_port) = (reply_entry.nat_ip_be, reply_entry.nat_port_be);
        rewrite_quoted(hook, icmp, quote, End::Source, client, client_port)?;
        rewrite_outer(hook, packet, End::Destination, client)?;
    }
    if packet.src_ip_be == quote.dst_be {
        // The backend's own host reported it: the client only knows the service address.
        rewrite_outer(hook, packet, End::Source, vip)?;
    }
    Ok(())
}

/// The error is about a reply we sent from the service address (the client side answered):
/// make the quote read backend -> client (or SNAT address) and send it to the backend.
#[inline(always)]
fn about_reply_packet(
    hook: &impl Hook,
    packet: &Packet,
    quote: &Quote,
    forward_entry: &lb_common::maps::ConntrackValue,
) -> Result<(), ()> {
    let icmp = packet.l4_offset;
    let (backend, backend_port) =
        (forward_entry.translated_ip_be, forward_entry.translated_port_be);
    rewrite_quoted(hook, icmp, quote, End::Source, backend, backend_port)?;
    if forward_entry.flags & ct_flags::SNAT != 0 {
        let (snat, snat_port) = (forward_entry.nat_ip_be, forward_entry.nat_port_be);
        rewrite_quoted(hook, icmp, quote, End::Destination, snat, snat_port)?;
        rewrite_outer(hook, packet, End::Source, snat)?;
    }
    rewrite_outer(hook, packet, End::Destination, backend)
}

/// Rewrites one end (address and port) of the quoted header, its IPv4 checksum, and the ICMP
/// checksum (which covers all three; ICMP has no pseudo-header). The quoted L4 checksum is
/// left alone: it is usually cut off, and no receiver checks it.
#[inline(always)]
fn rewrite_quoted(
    hook: &impl Hook,
    icmp: usize,
    quote: &Quote,
    end: End,
    new_addr: u32,
    new_port: u16,
) -> Result<(), ()> {
    let (addr_offset, port_offset, old_addr, old_port) = match end {
        End::Source => (quote.l3 + ipv4_field::SRC, quote.l4, quote.src_be, quote.src_port_be),
        End::Destination => {
            (quote.l3 + ipv4_field::DST, quote.l4 + 2, quote.dst_be, quote.dst_port_be)
        }
    };
    let old_check: u16 = hook.load(quote.l3 + ipv4_field::CHECK)?;
    let new_check = csum::replace32(old_check, old_addr, new_addr);
    hook.store(addr_offset, &new_addr)?;
    hook.store(port_offset, &new_port)?;
    hook.store(quote.l3 + ipv4_field::CHECK, &new_check)?;
    let payload = L4Csum { pseudo_header: false, udp: false };
    hook.fix_l4_csum(icmp + 2, old_addr, new_addr, 4, payload)?;
    hook.fix_l4_csum(icmp + 2, u32::from(old_port), u32::from(new_port), 2, payload)?;
    hook.fix_l4_csum(icmp + 2, u32::from(old_check), u32::from(new_check), 2, payload)
}

/// Rewrites an outer address and the outer IPv4 checksum.
#[inline(always)]
fn rewrite_outer(hook: &impl Hook, packet: &Packet, end: End, new: u32) -> Result<(), ()> {
    let (field, old) = match end {
        End::Source => (ipv4_field::SRC, packet.src_ip_be),
        End::Destination => (ipv4_field::DST, packet.dst_ip_be),
    };
    hook.store(packet.l3_offset + field, &new)?;
    hook.fix_l3_csum(packet.l3_offset + ipv4_field::CHECK, old, new)
}
