//! When a conntrack entry is live: one rule for the programs, which treat a dead entry as
//! absent, and for the daemon's garbage collector, which deletes dead entries so that new flows
//! find free slots instead of evicting.
//!
//! Time is in jiffies (`bpf_jiffies64()`, which the verifier inlines into one load; the clock
//! helpers it replaced cost about 13 ns of the conntrack-hit path). The kernel's tick rate is
//! not known at compile time: the daemon measures it and writes it into the node config as
//! `jiffies_per_second`.
#![expect(
    clippy::inline_always,
    reason = "BPF programs cannot call across functions cheaply; the datapath wants these inlined"
)]

use crate::maps::{ConntrackKey, ConntrackValue, closing, ct_flags, proto};

/// An established TCP flow with no packet for this long is forgotten (Cilium's default).
pub const TCP_TIMEOUT_S: u64 = 6 * 3600;
/// After a FIN or RST, long enough for the closing handshake and its retransmissions.
pub const TCP_CLOSING_TIMEOUT_S: u64 = 10;
/// A TCP flow still opening (a SYN, perhaps a SYN-ACK, nothing else yet): Linux conntrack's
/// `SYN_SENT` timeout. A client retransmits an unanswered SYN for about a minute (the sixth and
/// last retransmission at 63 s, with the default `tcp_syn_retries`), and only replies refresh
/// the reply entry, which must still translate the answer to that last SYN. A SYN that nobody
/// follows up (a scan, a flood with spoofed sources) frees its entries, and the SNAT port it
/// took, after two minutes instead of six hours.
pub const TCP_OPENING_TIMEOUT_S: u64 = 120;
/// UDP and the rest: a quiet flow is new after a minute (Linux conntrack's UDP stream timeout
/// is 120 s; a shorter one moves idle UDP clients off removed backends sooner).
pub const OTHER_TIMEOUT_S: u64 = 60;

/// The state of a TCP flow's entry that decides its timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpState {
    /// SYN seen, nothing without SYN or RST since: [`TCP_OPENING_TIMEOUT_S`].
    Opening,
    /// [`TCP_TIMEOUT_S`].
    Established,
    /// A FIN in this entry's direction only: still [`TCP_TIMEOUT_S`].
    HalfClosed,
    /// Both FINs, or a RST: [`TCP_CLOSING_TIMEOUT_S`], whatever else was seen.
    Closing,
}

impl TcpState {
    /// The name `flows` and `status` show.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Opening => "opening",
            Self::Established => "established",
            Self::HalfClosed => "half-closed",
            Self::Closing => "closing",
        }
    }
}

/// The state of the TCP flow entry `value`.
#[inline(always)]
#[must_use]
pub fn tcp_state(value: &ConntrackValue) -> TcpState {
    if is_closing(value) {
        TcpState::Closing
    } else if is_opening(value) {
        TcpState::Opening
    } else if value.closing == closing::HALF_CLOSED {
        TcpState::HalfClosed
    } else {
        TcpState::Established
    }
}

/// Seconds `value` may stay quiet before it is dead.
#[inline(always)]
#[must_use]
pub fn timeout_s(value: &ConntrackValue, proto_number: u8) -> u64 {
    if proto_number != proto::TCP {
        return OTHER_TIMEOUT_S;
    }
    match tcp_state(value) {
        TcpState::Closing => TCP_CLOSING_TIMEOUT_S,
        TcpState::Opening => TCP_OPENING_TIMEOUT_S,
        TcpState::Established | TcpState::HalfClosed => TCP_TIMEOUT_S,
    }
}

/// True once both directions' FINs, or a RST, of the flow were seen (versions before the state
/// bytes marked a single FIN so, with a flag bit).
#[inline(always)]
#[must_use]
pub fn is_closing(value: &ConntrackValue) -> bool {
    value.closing == closing::CLOSING || value.flags & ct_flags::CLOSING != 0
}

/// True while the TCP flow is opening, as this version or one before it marked it.
#[inline(always)]
#[must_use]
pub fn is_opening(value: &ConntrackValue) -> bool {
    value.opening != 0 || value.flags & ct_flags::OPENING != 0
}

/// The timestamp of an entry a new flow is taking over (the programs' `conntrack::claim`), until
/// it writes the entry anew: no age, so live to every reader, and never a timestamp another CPU
/// read before, so that no second claim succeeds, not even on the slot the map frees when the
/// entry is replaced.
pub const CLAIMED: u64 = u64::MAX;

/// True if `value` (of a flow of `proto_number`) was refreshed within its timeout at `now`.
#[inline(always)]
#[must_use]
pub fn is_live(
    value: &ConntrackValue,
    proto_number: u8,
    now: u64,
    jiffies_per_second: u32,
) -> bool {
    lives_at(value.last_seen, value, proto_number, now, jiffies_per_second)
}

/// [`is_live`] with the timestamp `last_seen` read on its own (once, by a CPU that may then
/// swap it: the rest of `value` may have changed since).
#[inline(always)]
#[must_use]
pub fn lives_at(
    last_seen: u64,
    value: &ConntrackValue,
    proto_number: u8,
    now: u64,
    jiffies_per_second: u32,
) -> bool {
    now.saturating_sub(last_seen) <= timeout_s(value, proto_number) * u64::from(jiffies_per_second)
}

/// A timestamp that leaves an entry dead at `now`, whatever its state: older than the longest
/// timeout. (The kernel starts jiffies far above it, at `INITIAL_JIFFIES`.)
#[inline(always)]
#[must_use]
pub fn expired_at(now: u64, jiffies_per_second: u32) -> u64 {
    now.saturating_sub((TCP_TIMEOUT_S + 1) * u64::from(jiffies_per_second))
}

/// The key of the other direction's entry of the flow whose entry `value` is found under `key`.
/// Forward: backend -> client, or -> the SNAT address and port. Reply: client (the original
/// one under SNAT) -> the frontend address.
#[inline(always)]
#[must_use]
pub fn twin_key(key: &ConntrackKey, value: &ConntrackValue) -> ConntrackKey {
    let masqueraded = value.flags & ct_flags::SNAT != 0;
    let (translated, nat) =
        ((value.translated_ip_be, value.translated_port_be), (value.nat_ip_be, value.nat_port_be));
    let ((src_ip_be, src_port_be), (dst_ip_be, dst_port_be)) = if value.flags & ct_flags::REPLY == 0
    {
        let client = if masqueraded { nat } else { (key.src_ip_be, key.src_port_be) };
        (translated, client)
    } else {
        let client = if masqueraded { nat } else { (key.dst_ip_be, key.dst_port_be) };
        (client, translated)
    };
    ConntrackKey::new(src_ip_be, dst_ip_be, src_port_be, dst_port_be, key.proto)
}

/// The reply entry that the forward entry `forward`, found under `key`, implies: the one the
/// flow's first packet wrote beside it, refreshed at `now`. Its closing state is the flow's:
/// a half-close of the reply direction is not known from the forward entry, so the entry is
/// written open, and a flow whose backend had already sent its FIN then holds its entries
/// for the established timeout after the client's, not the closing one.
#[inline(always)]
#[must_use]
pub fn reply_entry_of(key: &ConntrackKey, forward: &ConntrackValue, now: u64) -> ConntrackValue {
    let masqueraded = forward.flags & ct_flags::SNAT != 0;
    let (nat_ip_be, nat_port_be) =
        if masqueraded { (key.src_ip_be, key.src_port_be) } else { (0, 0) };
    let kept = ct_flags::SNAT | ct_flags::CLOSING | ct_flags::OPENING;
    ConntrackValue {
        last_seen: now,
        translated_ip_be: key.dst_ip_be,
        translated_port_be: key.dst_port_be,
        nat_ip_be,
        nat_port_be,
        flags: ct_flags::REPLY | forward.flags & kept,
        closing: if forward.closing == closing::CLOSING { closing::CLOSING } else { closing::OPEN },
        ..*forward
    }
}

/// Whether `twin`, found under `twin_key` (the key [`twin_key`] gives for the entry under
/// `key`), is that entry's own other half, rather than another flow's entry under the same
/// tuple.
#[inline(always)]
#[must_use]
pub fn is_twin_of(twin_key: &ConntrackKey, twin: &ConntrackValue, key: &ConntrackKey) -> bool {
    self::twin_key(twin_key, twin) == *key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forward(flags: u16, nat_port_be: u16) -> (ConntrackKey, ConntrackValue) {
        let key = ConntrackKey::new(0x0a00_0001, 0x0a60_0001, 4000, 80, proto::TCP);
        let value = ConntrackValue {
            last_seen: 7,
            backend_id: 3,
            service_id: 9,
            translated_ip_be: 0x0a00_0002,
            nat_ip_be: if nat_port_be == 0 { 0 } else { 0xc0a8_0001 },
            translated_port_be: 8080,
            nat_port_be,
            flags,
            opening: 1,
            closing: closing::HALF_CLOSED,
        };
        (key, value)
    }

    #[test]
    fn the_reply_entry_of_a_forward_entry_leads_back_to_it() {
        for (flags, nat_port_be) in [(0, 0), (ct_flags::SNAT, 61_000)] {
            let (key, value) = forward(flags, nat_port_be);
            let reply_key = twin_key(&key, &value);
            let reply = reply_entry_of(&key, &value, 11);
            assert_eq!(twin_key(&reply_key, &reply), key, "flags {flags:#x}");
            assert!(is_twin_of(&reply_key, &reply, &key));
            assert_eq!(reply.flags & ct_flags::REPLY, ct_flags::REPLY);
            assert_eq!((reply.last_seen, reply.opening, reply.closing), (11, 1, closing::OPEN));
        }
    }

    #[test]
    fn another_flows_entry_under_the_reply_tuple_is_not_the_twin() {
        let (key, value) = forward(0, 0);
        let reply_key = twin_key(&key, &value);
        // The same client socket asking another frontend of the same backend.
        let other_frontend = ConntrackKey { dst_port_be: 443, ..key };
        let theirs = reply_entry_of(&other_frontend, &value, 11);
        assert!(!is_twin_of(&reply_key, &theirs, &key));
    }
}
