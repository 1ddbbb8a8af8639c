//! Connection tracking: one LRU entry per direction of a translated flow, refreshed as packets
//! pass, expired by protocol and TCP state.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::maps::{ConntrackKey, ConntrackValue, ct_flags, proto};

use crate::{
    maps::CONNTRACK,
    parse::{Packet, tcp_flags},
};

const SECOND_NS: u64 = 1_000_000_000;
/// An established TCP flow with no packet for this long is forgotten (Cilium's default).
const TCP_TIMEOUT_NS: u64 = 6 * 3600 * SECOND_NS;
/// After a FIN or RST, long enough for the closing handshake and its retransmissions.
const TCP_CLOSING_TIMEOUT_NS: u64 = 10 * SECOND_NS;
/// UDP and the rest: a quiet flow is new after a minute (Linux conntrack's UDP stream timeout
/// is 120 s; a shorter one moves idle UDP clients off removed backends sooner).
const OTHER_TIMEOUT_NS: u64 = 60 * SECOND_NS;
/// `last_seen_ns` is written at most this often, so that busy flows do not bounce the entry's
/// cache line between CPUs on every packet.
const REFRESH_INTERVAL_NS: u64 = SECOND_NS;

/// The coarse clock (jiffies resolution) is enough for timeouts and cheaper than the precise one.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The key of `packet` as it appears on the wire.
#[inline(always)]
pub fn key_of(packet: &Packet) -> ConntrackKey {
    ConntrackKey {
        src_ip_be: packet.src_ip_be,
        dst_ip_be: packet.dst_ip_be,
        src_port_be: packet.src_port_be,
        dst_port_be: packet.dst_port_be,
        proto: packet.proto,
        pad: [0; 3],
    }
}

/// The live entry under `key`, if any. An expired entry counts as absent; a TCP SYN without ACK
/// on a closing entry starts a new flow on the same tuple.
#[inline(always)]
pub fn lookup(key: &ConntrackKey, packet: &Packet, now: u64) -> Option<*mut ConntrackValue> {
    let entry = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: the map returned a valid pointer to the value.
    let value = unsafe { &*entry };
    if !is_live(value, key.proto, now) {
        return None;
    }
    let new_syn = packet.proto == proto::TCP
        && packet.flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN;
    if new_syn && value.flags & ct_flags::CLOSING != 0 {
        return None;
    }
    Some(entry)
}

/// True if `value` has not timed out.
#[inline(always)]
pub fn is_live(value: &ConntrackValue, proto_number: u8, now: u64) -> bool {
    let timeout = if proto_number != proto::TCP {
        OTHER_TIMEOUT_NS
    } else if value.flags & ct_flags::CLOSING != 0 {
        TCP_CLOSING_TIMEOUT_NS
    } else {
        TCP_TIMEOUT_NS
    };
    now.saturating_sub(value.last_seen_ns) <= timeout
}

/// Records that a packet of the flow passed: refreshes the timestamp and notes FIN/RST.
#[inline(always)]
pub fn touch(entry: *mut ConntrackValue, packet: &Packet, now: u64) {
    // SAFETY: `entry` came from a map lookup in this program run.
    let value = unsafe { &mut *entry };
    let closing = packet.proto == proto::TCP
        && packet.flags & (tcp_flags::FIN | tcp_flags::RST) != 0
        && value.flags & ct_flags::CLOSING == 0;
    if closing {
        value.flags |= ct_flags::CLOSING;
        value.last_seen_ns = now;
    } else if now.saturating_sub(value.last_seen_ns) > REFRESH_INTERVAL_NS {
        value.last_seen_ns = now;
    }
}

/// Inserts an entry; `Err` if the map refused it.
#[inline(always)]
pub fn insert(key: &ConntrackKey, value: &ConntrackValue, flags: u64) -> Result<(), ()> {
    CONNTRACK.insert(key, value, flags).map_err(|_| ())
}
