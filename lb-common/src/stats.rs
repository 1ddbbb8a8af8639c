//! Per-CPU counters indexed by the reason a program reached its verdict.
//!
//! Every path through a program ends in exactly one reason, so the sum over all reasons is the
//! number of packets the program saw. Userspace reads the names from [`Reason::NAMES`].

/// Why a program returned what it returned. The discriminant is the index into the `STATS`
/// per-CPU array; the map key is a `u32`, never this enum.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IPv4 (ARP, IPv6, LLDP, ...): not ours, passed.
    NotIpv4 = 0,
    /// A frame shorter than an Ethernet header: passed untouched.
    TruncatedEthernet,
    /// An 802.1Q/802.1ad tag that is cut short: passed untouched.
    TruncatedVlan,
    /// Stacked VLAN tags (QinQ) are not parsed: passed untouched.
    StackedVlan,
    /// Shorter than a minimal IPv4 header: passed untouched.
    TruncatedIpv4,
    /// Version field is not 4, or IHL is below 5 words: passed untouched.
    BadIpv4Header,
    /// Total length smaller than the header, or larger than the frame: passed untouched.
    BadIpv4Length,
    /// A fragment (MF set or non-zero offset): ports are not in every fragment, passed.
    Fragment,
    /// An L4 protocol the load balancer does not translate (not TCP, UDP or ICMP).
    OtherL4,
    /// The TCP, UDP or ICMP header is cut short, or TCP's data offset is impossible.
    TruncatedL4,
    /// A well-formed TCP segment that no service matched: passed.
    PassTcp,
    /// A well-formed UDP datagram that no service matched: passed.
    PassUdp,
    /// A well-formed ICMP message that no service matched: passed.
    PassIcmp,
}

impl Reason {
    /// Number of reasons: the size of the `STATS` map.
    pub const COUNT: u32 = Self::PassIcmp as u32 + 1;

    /// Every reason, in index order.
    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::NotIpv4,
        Self::TruncatedEthernet,
        Self::TruncatedVlan,
        Self::StackedVlan,
        Self::TruncatedIpv4,
        Self::BadIpv4Header,
        Self::BadIpv4Length,
        Self::Fragment,
        Self::OtherL4,
        Self::TruncatedL4,
        Self::PassTcp,
        Self::PassUdp,
        Self::PassIcmp,
    ];

    /// Stable names for metrics, `status` and tests, in index order.
    pub const NAMES: [&'static str; Self::COUNT as usize] = [
        "not_ipv4",
        "truncated_ethernet",
        "truncated_vlan",
        "stacked_vlan",
        "truncated_ipv4",
        "bad_ipv4_header",
        "bad_ipv4_length",
        "fragment",
        "other_l4",
        "truncated_l4",
        "pass_tcp",
        "pass_udp",
        "pass_icmp",
    ];

    #[must_use]
    pub const fn index(self) -> u32 {
        self as u32
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// True for reasons that describe a packet the parser could not trust.
    #[must_use]
    pub const fn is_malformed(self) -> bool {
        matches!(
            self,
            Self::TruncatedEthernet
                | Self::TruncatedVlan
                | Self::TruncatedIpv4
                | Self::BadIpv4Header
                | Self::BadIpv4Length
                | Self::TruncatedL4
        )
    }
}

const _: () = {
    let mut i = 0;
    while i < Reason::ALL.len() {
        assert!(Reason::ALL[i] as usize == i, "Reason::ALL must be in index order");
        i += 1;
    }
};
