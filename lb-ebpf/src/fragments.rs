//! Fragmented TCP and UDP datagrams (RFC 791). Only the first fragment carries the ports, so
//! the service stage translates it like a whole datagram and records the addresses it gave
//! it; the later fragments, found by source, destination, protocol and identification, get
//! the same addresses. Only their IPv4 header changes: the L4 checksum is in the first
//! fragment, which the translation fixed for the whole datagram.
//!
//! As in Cilium, a later fragment that arrives before its first one is not translated: to a
//! service address it is dropped, as its receiver could never reassemble it; elsewhere (a
//! NodePort on the node's address) it is passed to the stack, which drops it when its
//! reassembly times out.

use lb_common::{
    maps::{ConntrackValue, FragmentKey, FragmentValue, NodeConfig, ct_flags, fragment_side},
    stats::Reason,
};

use crate::{
    conntrack,
    hook::Hook,
    lb::{self, Verdict},
    maps::FRAGMENTS,
    parse::{Packet, fragment, ipv4_field},
};

#[inline(always)]
fn key_of(packet: &Packet, side: u8) -> FragmentKey {
    FragmentKey {
        src_ip_be: packet.src_ip_be,
        dst_ip_be: packet.dst_ip_be,
        id_be: packet.ip_id_be,
        proto: packet.proto,
        side,
    }
}

/// After a first fragment was translated client to backend by `flow` (a forward entry, on
/// arrival): records its addresses for the datagram's later fragments.
#[inline(always)]
pub fn remember_forward(packet: &Packet, flow: &ConntrackValue) {
    if packet.fragment != fragment::FIRST {
        return;
    }
    let src = if flow.flags & ct_flags::SNAT != 0 { flow.nat_ip_be } else { packet.src_ip_be };
    remember(packet, fragment_side::INGRESS, src, flow.translated_ip_be, flow.service_id);
}

/// After a first fragment seen on `side` was reverse-translated by `flow` (a reply entry):
/// records its addresses for the datagram's later fragments.
#[inline(always)]
pub fn remember_reply(packet: &Packet, side: u8, flow: &ConntrackValue) {
    if packet.fragment != fragment::FIRST {
        return;
    }
    let dst = if flow.flags & ct_flags::SNAT != 0 { flow.nat_ip_be } else { packet.dst_ip_be };
    remember(packet, side, flow.translated_ip_be, dst, FragmentValue::NO_FRONTEND);
}

#[inline(always)]
fn remember(packet: &Packet, side: u8, src_ip_be: u32, dst_ip_be: u32, service_id: u32) {
    let value =
        FragmentValue { created: conntrack::now(), src_ip_be, dst_ip_be, service_id, pad: [0; 4] };
    // Should the insert fail, the record of an earlier datagram with this key would stay and
    // give this one's later fragments its addresses: removed then.
    let key = key_of(packet, side);
    if FRAGMENTS.insert(&key, &value, 0).is_err() {
        let _ = FRAGMENTS.remove(&key);
    }
}

/// For a first fragment seen on `side` that was not translated (the service stage's
/// `verdict`, or `Pass` when its L4 header did not parse): removes the record of an earlier
/// datagram with the same key (an identification reused within the timeout), whose addresses
/// this datagram's later fragments would otherwise get.
#[inline(always)]
pub fn settle_untranslated(packet: &Packet, side: u8, verdict: Verdict) {
    if packet.fragment == fragment::FIRST && verdict != Verdict::Forward {
        let _ = FRAGMENTS.remove(&key_of(packet, side));
    }
}

/// A later fragment seen on `side`: given its first fragment's addresses if that one was
/// translated there, and counted for its frontend; `None` if it was not (or too long ago).
#[inline(always)]
pub fn translate_later(
    hook: &impl Hook,
    packet: &Packet,
    side: u8,
    config: &NodeConfig,
) -> Option<(Verdict, Reason)> {
    // SAFETY: plain data written by this program.
    let first = *unsafe { FRAGMENTS.get(&key_of(packet, side)) }?;
    let timeout = u64::from(FragmentValue::TIMEOUT_S) * u64::from(config.jiffies_per_second);
    if conntrack::now().saturating_sub(first.created) > timeout {
        return None;
    }
    if rewrite_addresses(hook, packet, first.src_ip_be, first.dst_ip_be).is_err() {
        return Some((Verdict::Drop, Reason::TruncatedIpv4));
    }
    if first.service_id != FragmentValue::NO_FRONTEND {
        lb::count_frontend(first.service_id, u64::from(packet.total_len));
    }
    Some((Verdict::Forward, Reason::FragmentTranslated))
}

/// Sets both IPv4 addresses and fixes the header checksum.
#[inline(always)]
fn rewrite_addresses(hook: &impl Hook, packet: &Packet, src: u32, dst: u32) -> Result<(), ()> {
    let (check, l3) = (packet.l3_offset + ipv4_field::CHECK, packet.l3_offset);
    hook.store(l3 + ipv4_field::SRC, &src)?;
    hook.store(l3 + ipv4_field::DST, &dst)?;
    hook.fix_l3_csum(check, packet.src_ip_be, src)?;
    hook.fix_l3_csum(check, packet.dst_ip_be, dst)
}
