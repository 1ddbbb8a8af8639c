//! Connection tracking: one LRU entry per direction of a translated flow, refreshed as packets
//! pass, expired by protocol and TCP state (the rule is `lb_common::conntrack`'s, shared with
//! the daemon's garbage collector). TCP state: opening (SYN, SYN-ACK) until the first packet
//! without SYN or RST in either direction, then established, closing after a FIN or RST.

use aya_ebpf::helpers::bpf_jiffies64;
use lb_common::{
    conntrack::twin_key,
    maps::{ConntrackKey, ConntrackValue, NodeConfig, ct_flags, proto},
};

use crate::{
    maps::CONNTRACK,
    parse::{Packet, tcp_flags},
};

/// The datapath clock, in jiffies: the verifier inlines this helper into one load.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_jiffies64() }
}

/// The key of `packet` as it appears on the wire.
#[inline(always)]
pub fn key_of(packet: &Packet) -> ConntrackKey {
    ConntrackKey::new(
        packet.src_ip_be,
        packet.dst_ip_be,
        packet.src_port_be,
        packet.dst_port_be,
        packet.proto,
    )
}

/// The live entry under `key`, if any. An expired entry counts as absent; a TCP SYN without ACK
/// on a closing entry starts a new flow on the same tuple.
#[inline(always)]
pub fn lookup(
    key: &ConntrackKey,
    packet: &Packet,
    now: u64,
    config: &NodeConfig,
) -> Option<*mut ConntrackValue> {
    let entry = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: the map returned a valid pointer to the value.
    let value = unsafe { &*entry };
    if !is_live(value, key.proto, now, config) {
        return None;
    }
    if packet.opens_tcp_connection() && lb_common::conntrack::is_closing(value) {
        return None;
    }
    Some(entry)
}

/// True if `value` has not timed out.
#[inline(always)]
pub fn is_live(value: &ConntrackValue, proto_number: u8, now: u64, config: &NodeConfig) -> bool {
    lb_common::conntrack::is_live(value, proto_number, now, config.jiffies_per_second)
}

/// Records that a packet of the flow passed: refreshes the timestamp, notes FIN/RST, and ends
/// the opening state of both the flow's entries at its first packet without SYN or RST.
///
/// The timestamp is written at most once a second, so that busy flows do not bounce the
/// entry's cache line between CPUs on every packet.
#[inline(always)]
pub fn touch(entry: *mut ConntrackValue, packet: &Packet, now: u64, config: &NodeConfig) {
    // SAFETY: `entry` came from a map lookup in this program run.
    let value = unsafe { &mut *entry };
    let tcp = packet.proto == proto::TCP;
    // A reset (a backend refusing the SYN) ends nothing: the flow never opened.
    let opened = packet.flags & (tcp_flags::SYN | tcp_flags::RST) == 0;
    if tcp && lb_common::conntrack::is_opening(value) && opened {
        let twin = CONNTRACK.get_ptr_mut(&twin_key(&key_of(packet), value));
        end_opening(entry);
        if let Some(twin) = twin {
            end_opening(twin);
        }
    }
    let closing = tcp
        && packet.flags & (tcp_flags::FIN | tcp_flags::RST) != 0
        && !lb_common::conntrack::is_closing(value);
    if closing {
        // A whole-byte store, as in `end_opening`.
        // SAFETY: a field of the live entry.
        unsafe { core::ptr::write_volatile(&raw mut value.closing, 1) };
        value.last_seen = now;
    } else if now.saturating_sub(value.last_seen) > u64::from(config.jiffies_per_second) {
        value.last_seen = now;
    }
}

/// Marks an entry's flow established.
///
/// The state byte is written whole (volatile: never merged into a wider read-modify-write), as
/// another CPU may set `closing` beside it at the same time (see `ConntrackValue::opening`). The opening bit an earlier version
/// set in `flags` is cleared by a read-modify-write: this version writes `flags` nowhere else,
/// and should a write of the previous programs (during an upgrade) undo it, the bit stays set
/// and the flow's next packet clears it again.
#[inline(always)]
fn end_opening(entry: *mut ConntrackValue) {
    // SAFETY: a valid pointer from a lookup in this program run.
    unsafe {
        core::ptr::write_volatile(&raw mut (*entry).opening, 0);
        if (*entry).flags & ct_flags::OPENING != 0 {
            (*entry).flags &= !ct_flags::OPENING;
        }
    }
}

/// Inserts an entry; `Err` if the map refused it.
#[inline(always)]
pub fn insert(key: &ConntrackKey, value: &ConntrackValue, flags: u64) -> Result<(), ()> {
    CONNTRACK.insert(key, value, flags).map_err(|_| ())
}
