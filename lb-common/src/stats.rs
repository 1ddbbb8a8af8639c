//! Per-CPU counters indexed by the reason a program reached its verdict.
//!
//! Every path through a program ends in exactly one reason, so the sum over all reasons is the
//! number of packets the program saw. Userspace reads the names from [`Reason::NAMES`].

/// Declares [`Reason`] with its index order, names and doc comments in one place.
macro_rules! reasons {
    ($($(#[doc = $doc:literal])* $variant:ident = $name:literal,)+) => {
        /// Why a program returned what it returned. The discriminant is the index into the
        /// `STATS` per-CPU array; the map key is a `u32`, never this enum.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Reason {
            $($(#[doc = $doc])* $variant,)+
        }

        impl Reason {
            /// Every reason, in index order.
            pub const ALL: &'static [Self] = &[$(Self::$variant,)+];
            /// Stable names for metrics, `status` and tests, in index order.
            pub const NAMES: &'static [&'static str] = &[$($name,)+];
        }
    };
}

reasons! {
    /// Not IPv4 (ARP, IPv6, LLDP, ...): not ours, passed.
    NotIpv4 = "not_ipv4",
    /// A frame shorter than an Ethernet header: passed untouched.
    TruncatedEthernet = "truncated_ethernet",
    /// An 802.1Q/802.1ad tag that is cut short: passed untouched.
    TruncatedVlan = "truncated_vlan",
    /// Stacked VLAN tags (QinQ) are not parsed: passed untouched.
    StackedVlan = "stacked_vlan",
    /// Shorter than a minimal IPv4 header: passed untouched.
    TruncatedIpv4 = "truncated_ipv4",
    /// Version field is not 4, or IHL is below 5 words: passed untouched.
    BadIpv4Header = "bad_ipv4_header",
    /// Total length smaller than the header, or larger than the frame: passed untouched.
    BadIpv4Length = "bad_ipv4_length",
    /// A fragment this program does not translate: a later fragment (non-zero offset, no
    /// ports) of a datagram whose first fragment was not translated here, outside the service
    /// CIDR, or any fragment of a protocol other than TCP and UDP: passed. (A first fragment
    /// carries the ports and is handled like a whole datagram.)
    Fragment = "fragment",
    /// An L4 protocol the load balancer does not translate (not TCP, UDP or ICMP).
    OtherL4 = "other_l4",
    /// The TCP, UDP or ICMP header is cut short, or TCP's data offset or UDP's length is
    /// impossible (UDP's: below its header, or beyond a whole datagram).
    TruncatedL4 = "truncated_l4",
    /// Well-formed, but not addressed to a service: passed.
    NotService = "not_service",
    /// First packet of a flow: a backend was chosen and the packet translated.
    ForwardNew = "forward_new",
    /// A packet of a known flow, client to service, translated.
    ForwardEstablished = "forward_established",
    /// A reply of a known flow, backend to client, reverse-translated.
    ReplyTranslated = "reply_translated",
    /// An ICMP error about a translated flow (port unreachable, fragmentation needed, time
    /// exceeded), translated so it reaches the flow's other end through the service address.
    IcmpErrorTranslated = "icmp_error_translated",
    /// The service has no usable endpoint: refused (TCP RST or ICMP port unreachable). A TCP
    /// RST is not answered (RFC 793) but dropped, and counted here too.
    RejectNoEndpoints = "reject_no_endpoints",
    /// A ClusterIP on a port or protocol it does not serve: refused (a RST: dropped, as above).
    RejectUnservedPort = "reject_unserved_port",
    /// A traffic policy (Local) left no endpoint on this node: dropped, as kube-proxy does.
    DropNoLocalEndpoint = "drop_no_local_endpoint",
    /// An address in the service CIDR that no service holds: dropped.
    DropUnallocatedVip = "drop_unallocated_vip",
    /// The source is outside the service's loadBalancerSourceRanges: dropped.
    DropSourceRange = "drop_source_range",
    /// ICMP to a service address that is not an error about a known flow: dropped.
    DropIcmpToVip = "drop_icmp_to_vip",
    /// Every SNAT port candidate for this backend was taken: dropped.
    DropSnatExhausted = "drop_snat_exhausted",
    /// A slot or backend entry was missing (the daemon is mid-update, or the maps disagree).
    DropBackendMissing = "drop_backend_missing",
    /// The conntrack map refused a new entry: dropped rather than translated without state.
    DropConntrackFull = "drop_conntrack_full",
    /// The refusal could not be built in the packet (no room to grow it): dropped instead.
    DropRefusalFailed = "drop_refusal_failed",
    /// A node process connected to (or sent to) a service: the socket was pointed at a backend.
    HostTranslated = "host_translated",
    /// A node process connected to a service without usable endpoints: refused.
    HostRefused = "host_refused",
    /// The node configuration entry is missing: passed, nothing can be translated.
    NoNodeConfig = "no_node_config",
    /// A later fragment of a datagram whose first fragment was translated: given the same
    /// addresses. (Appended: an index is a counter's slot in a pinned map.)
    FragmentTranslated = "fragment_translated",
    /// A later fragment to the service CIDR whose first fragment was not translated here (it
    /// came after this one, was refused, or is too old): dropped, as the receiver could not
    /// reassemble it.
    DropFragmentUntracked = "drop_fragment_untracked",
    /// A refusal was due but this CPU's refusal budget for the packet's side (pods, or the
    /// outside world; `refusalLimit` each) is spent: dropped.
    DropRefusalRateLimited = "drop_refusal_rate_limited",
    /// North-south, a translated TCP or UDP packet with DF set longer than its path's MTU (the
    /// FIB's, learned path MTUs included): rewritten into the ICMP fragmentation needed its
    /// sender expects, from the address it sent to and quoting the packet as it was sent, and
    /// sent back. For a masqueraded flow the stack's own error would go to this node's own
    /// address, where nothing translates it.
    FragmentationNeeded = "fragmentation_needed",
}

impl Reason {
    /// Number of reasons: the size of the `STATS` map.
    pub const COUNT: u32 = Self::FragmentationNeeded as u32 + 1;

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
    assert!(Reason::ALL.len() == Reason::COUNT as usize);
    assert!(Reason::NAMES.len() == Reason::COUNT as usize);
    let mut i = 0;
    while i < Reason::ALL.len() {
        assert!(Reason::ALL[i] as usize == i, "Reason::ALL must be in index order");
        i += 1;
    }
};
