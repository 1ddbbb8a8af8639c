//! Connection tracking: one LRU entry per direction of a translated flow, refreshed together as
//! packets pass, expired by protocol and TCP state (the rule is `lb_common::conntrack`'s, shared
//! with the daemon's garbage collector). TCP state: opening (SYN, SYN-ACK) until the first
//! packet without SYN or RST in either direction, then established, half-closed in a direction
//! after its FIN, closing after both FINs or a RST.

use core::intrinsics::{AtomicOrdering, atomic_cxchg};

use aya_ebpf::helpers::bpf_jiffies64;
use lb_common::{
    conntrack::{CLAIMED, expired_at, is_twin_of, reply_entry_of, twin_key},
    maps::{ConntrackKey, ConntrackValue, NodeConfig, closing, ct_flags, proto},
};

use crate::{
    maps::{BPF_NOEXIST, CONNTRACK},
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

/// Records that a packet of the flow passed: refreshes the timestamps, follows FIN and RST, and
/// ends the opening state at the flow's first packet without SYN or RST. The two entries of a
/// flow age together, as Linux's one conntrack entry per flow does: a flow whose packets go one
/// way (a UDP stream) keeps its reply entry, and with it its SNAT port, and a reset flow frees
/// both after the closing timeout.
///
/// Timestamps are written at most once a second, so that busy flows do not bounce the entries'
/// cache lines between CPUs on every packet, and the other entry is looked up only then or at
/// a change of state.
#[inline(always)]
pub fn touch(entry: *mut ConntrackValue, packet: &Packet, now: u64, config: &NodeConfig) {
    let key = key_of(packet);
    // Where the flow's other entry is: a function of this one's fixed fields.
    // SAFETY: `entry` came from a map lookup in this program run.
    let twin_key = twin_key(&key, unsafe { &*entry });
    if packet.proto == proto::TCP && follow_tcp_state(entry, &twin_key, packet, now) {
        return;
    }
    // SAFETY: as above; no other reference to the entry is alive.
    let value = unsafe { &mut *entry };
    let rate = config.jiffies_per_second;
    if now.saturating_sub(value.last_seen) > u64::from(rate) {
        value.last_seen = now;
        if !refresh_twin(&key, value, &twin_key, now) {
            // Expired rather than removed: the caller reads the entry yet, and the map may
            // give a removed entry's slot to another flow's at once.
            value.last_seen = expired_at(now, rate);
        }
    }
}

/// Refreshes the other entry of the flow whose entry under `key` is `value`; false if the flow
/// is to be forgotten.
///
/// A full map's LRU evicts one entry at a time, and may take one half of a live flow. A forward
/// entry whose reply entry went writes it again, or the flow's replies would pass untranslated;
/// one whose reply tuple another flow has taken since is forgotten, so that the flow's next
/// packet opens it anew (another source port) rather than reach the backend on the other flow's
/// connection. A reply entry whose forward entry went needs nothing here: the flow's next
/// forward packet opens it again and takes its own reply entry back (`lb::same_flow`).
#[inline(always)]
fn refresh_twin(
    key: &ConntrackKey,
    value: &ConntrackValue,
    twin_key: &ConntrackKey,
    now: u64,
) -> bool {
    let forward = value.flags & ct_flags::REPLY == 0;
    match CONNTRACK.get_ptr_mut(twin_key) {
        // SAFETY: a valid pointer from the lookup.
        Some(twin) if forward && !is_twin_of(twin_key, unsafe { &*twin }, key) => return false,
        // SAFETY: as above.
        Some(twin) => unsafe { (*twin).last_seen = now },
        None if forward => {
            // NOEXIST: never over an entry another CPU wrote meanwhile. A refused write (a flow
            // on that tuple since) leaves this flow as it was before.
            let _ = insert(twin_key, &reply_entry_of(key, value, now), BPF_NOEXIST);
        }
        None => {}
    }
    true
}

/// The TCP state changes `packet` makes to its flow's entries (the other one under
/// `twin_key`); true if it closed the flow (which refreshed both timestamps).
#[inline(always)]
fn follow_tcp_state(
    entry: *mut ConntrackValue,
    twin_key: &ConntrackKey,
    packet: &Packet,
    now: u64,
) -> bool {
    // A reset (a backend refusing the SYN) ends nothing: the flow never opened.
    let opened = packet.flags & (tcp_flags::SYN | tcp_flags::RST) == 0;
    // SAFETY (every read of `*entry` here): a valid pointer from a lookup in this program run,
    // read through a short-lived reference while nothing writes it in this function.
    if opened && lb_common::conntrack::is_opening(unsafe { &*entry }) {
        end_opening(entry);
        if let Some(twin) = CONNTRACK.get_ptr_mut(twin_key) {
            end_opening(twin);
        }
    }
    if lb_common::conntrack::is_closing(unsafe { &*entry }) {
        return false;
    }
    let reset = packet.flags & tcp_flags::RST != 0;
    let fin = packet.flags & tcp_flags::FIN != 0;
    let half_closed = unsafe { (*entry).closing } == closing::HALF_CLOSED;
    if !reset && !fin && !half_closed {
        return false;
    }
    let twin = CONNTRACK.get_ptr_mut(twin_key);
    // SAFETY: a valid pointer from the lookup.
    let twin_finished = twin.is_some_and(|twin| unsafe {
        (*twin).closing != closing::OPEN || lb_common::conntrack::is_closing(&*twin)
    });
    // Both FINs (the second one, or a packet after both on two CPUs at once), or a reset.
    if reset || ((fin || half_closed) && twin_finished) {
        set_closing(entry, closing::CLOSING, now);
        if let Some(twin) = twin {
            set_closing(twin, closing::CLOSING, now);
        }
        return true;
    }
    // Read again just before: a reset on another CPU may have closed the flow since, and a
    // half-close written over it would keep this entry for the established timeout.
    // SAFETY: as above.
    if fin && unsafe { core::ptr::read_volatile(&raw const (*entry).closing) } == closing::OPEN {
        set_closing(entry, closing::HALF_CLOSED, now);
        // The twin too, which `touch` then leaves for a second: after a long quiet spell it
        // would expire first, and its replies go untranslated, or its tuple to a new flow.
        if let Some(twin) = twin {
            // SAFETY: a valid pointer from the lookup.
            unsafe { (*twin).last_seen = now };
        }
    }
    false
}

/// Refreshes an entry and sets its closing state (a whole-byte store, as in `end_opening`).
/// The timestamp first: a CPU that judges the entry expired from the old timestamp and the new
/// state (its shorter timeout) to take it over (`lb::may_replace`) then fails its claim, the
/// timestamp having moved.
#[inline(always)]
fn set_closing(entry: *mut ConntrackValue, state: u8, now: u64) {
    // SAFETY: a valid pointer from a lookup in this program run.
    unsafe {
        core::ptr::write_volatile(&raw mut (*entry).last_seen, now);
        core::ptr::write_volatile(&raw mut (*entry).closing, state);
    }
}

/// Marks an entry's flow established.
///
/// The state byte is written whole (volatile: never merged into a wider read-modify-write), as
/// another CPU may set `closing` beside it at the same time (see `ConntrackValue::opening`).
/// The opening bit an earlier version set in `flags` is cleared by a read-modify-write: this
/// version writes `flags` nowhere else, and should a write of the previous programs (during an
/// upgrade) undo it, the bit stays set and the flow's next packet clears it again.
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

/// `entry`'s timestamp, read once (see [`claim`]).
#[inline(always)]
pub fn last_seen(entry: *const ConntrackValue) -> u64 {
    // SAFETY: a valid pointer from a map lookup in this program run.
    unsafe { core::ptr::read_volatile(&raw const (*entry).last_seen) }
}

/// Takes `entry` over for a new flow, unless another CPU has since: swaps its timestamp `seen`
/// (read with [`last_seen`] when the entry was judged) for `CLAIMED` in one compare-and-swap,
/// so that of two CPUs that judged it at once exactly one wins, and the other, as any later
/// look, finds it claimed. The winner then replaces the entry whole, or gives it back
/// ([`release`]) if the map refuses the new one.
#[inline(always)]
pub fn claim(entry: *mut ConntrackValue, seen: u64) -> bool {
    // `AtomicU64::compare_exchange` is not built for the BPF target (no CAS in its spec), though
    // the instruction set has one (`BPF_CMPXCHG`, 5.12+): the intrinsic behind it emits that.
    // SAFETY: a valid pointer from a map lookup in this program run; map values are 8-byte
    // aligned, and `last_seen` is the first field of the `repr(C)` value.
    seen != CLAIMED
        && unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::Relaxed }>(
                &raw mut (*entry).last_seen,
                seen,
                CLAIMED,
            )
        }
        .1
}

/// Gives a claimed entry its timestamp back, if it is still claimed: a slot the map freed and
/// gave to another entry since keeps that one's.
#[inline(always)]
pub fn release(entry: *mut ConntrackValue, seen: u64) {
    // SAFETY: as in `claim`.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::Relaxed }>(
            &raw mut (*entry).last_seen,
            CLAIMED,
            seen,
        )
    };
}

/// Deletes the entry under `key` if it has expired, claiming it first ([`claim`]), as a new
/// flow that takes an expired entry over does: of the two, only one gets it. True if deleted.
#[inline(always)]
pub fn remove_expired(key: &ConntrackKey, now: u64, config: &NodeConfig) -> bool {
    let Some(entry) = CONNTRACK.get_ptr_mut(key) else {
        return false;
    };
    let seen = last_seen(entry);
    // SAFETY: a valid pointer from the lookup.
    let value = unsafe { &*entry };
    let rate = config.jiffies_per_second;
    if lb_common::conntrack::lives_at(seen, value, key.proto, now, rate) || !claim(entry, seen) {
        return false;
    }
    if CONNTRACK.remove(key).is_ok() {
        return true;
    }
    release(entry, seen);
    false
}

/// Inserts an entry; `Err` if the map refused it.
#[inline(always)]
pub fn insert(key: &ConntrackKey, value: &ConntrackValue, flags: u64) -> Result<(), ()> {
    CONNTRACK.insert(key, value, flags).map_err(|_| ())
}
