//! Rewriting a parsed packet's addresses and ports, with every checksum kept valid.

use lb_common::maps::proto;

use crate::{
    frame::ptr_at_mut,
    hook::Hook,
    parse::{Packet, ipv4_field},
};

/// Offsets of the checksum inside the TCP and UDP headers.
const TCP_CHECK: usize = 16;
const UDP_CHECK: usize = 6;

/// Which end of the packet to rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Source,
    Destination,
}

/// Sets the source or destination address and port of `packet` to `ip_be:port_be` and fixes the
/// IPv4 and TCP/UDP checksums. `packet` keeps describing the old values; callers re-read what
/// they need before rewriting.
#[inline(always)]
pub fn rewrite(
    hook: &impl Hook,
    packet: &Packet,
    end: End,
    ip_be: u32,
    port_be: u16,
) -> Result<(), ()> {
    let (ip_offset, port_offset) = match end {
        End::Source => (packet.l3_offset + ipv4_field::SRC, packet.l4_offset),
        End::Destination => (packet.l3_offset + ipv4_field::DST, packet.l4_offset + 2),
    };
    let (old_ip, old_port) = match end {
        End::Source => (packet.src_ip_be, packet.src_port_be),
        End::Destination => (packet.dst_ip_be, packet.dst_port_be),
    };
    let udp = packet.proto == proto::UDP;
    let l4_check = packet.l4_offset + if udp { UDP_CHECK } else { TCP_CHECK };

    // All writes first: the tc checksum helpers may move packet data and invalidate pointers.
    let ip: *mut u32 = ptr_at_mut(hook, ip_offset).ok_or(())?;
    let port: *mut u16 = ptr_at_mut(hook, port_offset).ok_or(())?;
    // SAFETY: both pointers were bounds-checked by `ptr_at_mut`; unaligned writes are fine for
    // packet memory on BPF (the verifier allows byte-granular access).
    unsafe {
        ip.write_unaligned(ip_be);
        port.write_unaligned(port_be);
    }

    hook.fix_l3_csum(packet.l3_offset + ipv4_field::CHECK, old_ip, ip_be)?;
    hook.fix_l4_csum_endpoint(l4_check, (old_ip, old_port), (ip_be, port_be), udp)
}
