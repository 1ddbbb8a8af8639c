//! Header parsing: Ethernet with at most one VLAN tag, IPv4 honouring IHL, then TCP, UDP or ICMP.
//! Fragments of TCP and UDP datagrams parse too: the first one with its L4 header, a later one
//! (no L4 header) with its ports left to [`crate::fragments`].
//!
//! Every read is bounds-checked against the frame; anything the parser cannot trust ends in a
//! named [`Reason`] and the packet is left untouched. The service stage only ever sees a
//! [`Packet`] whose headers are complete and whose lengths agree with each other; a first
//! fragment whose L4 header is not is named by its IPv4 header alone, for
//! [`crate::fragments`].

use lb_common::{maps::proto, stats::Reason};
use network_types::{
    eth::EthHdr, icmp::Icmpv4Hdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr, vlan::VlanHdr,
};

use crate::frame::{Frame, ptr_at};

/// EtherTypes in network byte order, compared against the raw header field.
const ETH_P_IPV4_BE: u16 = 0x0800_u16.to_be();
const ETH_P_8021Q_BE: u16 = 0x8100_u16.to_be();
const ETH_P_8021AD_BE: u16 = 0x88a8_u16.to_be();

/// "More fragments" flag and fragment offset mask of the IPv4 `frags` field (RFC 791).
const IPV4_MF: u16 = 0x2000;
/// "Don't fragment", in the `frags` field as read from the packet (network order).
pub const IPV4_DF_BE: u16 = 0x4000_u16.to_be();
pub const IPV4_OFFSET_MASK: u16 = 0x1fff;

/// A packet's headers, present and consistent: all of them once [`parse_l4`] has read them,
/// up to IPv4's after [`parse_ipv4`] (ports and flags 0).
#[derive(Clone, Copy)]
pub struct Packet {
    /// Offset of the IPv4 header from the start of the frame.
    pub l3_offset: usize,
    /// Offset of the TCP/UDP/ICMP header (after any IPv4 options).
    pub l4_offset: usize,
    /// Network order.
    pub src_ip_be: u32,
    /// Network order.
    pub dst_ip_be: u32,
    /// Network order; the echo identifier for ICMP echo, else 0 for ICMP.
    pub src_port_be: u16,
    /// Network order; 0 for ICMP.
    pub dst_port_be: u16,
    /// [`proto`] number: TCP, UDP or ICMP.
    pub proto: u8,
    /// TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10); the ICMP type for ICMP.
    pub flags: u8,
    /// IPv4 total length: the datagram without Ethernet padding.
    pub total_len: u16,
    /// [`fragment`] kind.
    pub fragment: u8,
    /// The IPv4 identification field, network order: names a fragmented datagram.
    pub ip_id_be: u16,
}

/// Which part of a datagram a packet is.
pub mod fragment {
    /// Not fragmented.
    pub const WHOLE: u8 = 0;
    /// The first fragment (MF set, offset 0): it carries the L4 header.
    pub const FIRST: u8 = 1;
    /// A later fragment (non-zero offset): payload only, no ports; `Packet`'s ports are 0.
    pub const LATER: u8 = 2;
}

impl Packet {
    /// A TCP SYN without ACK: a client opening a connection.
    #[inline(always)]
    pub fn opens_tcp_connection(&self) -> bool {
        self.proto == proto::TCP && self.flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN
    }
}

/// Field offsets inside the IPv4 header (RFC 791), shared by everything that rewrites it.
pub mod ipv4_field {
    pub const TOS: usize = 1;
    pub const FRAGS: usize = 6;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECK: usize = 10;
    pub const SRC: usize = 12;
    pub const DST: usize = 16;
}

/// TCP flag bits of `Packet::flags`.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// Parses the frame's headers up to IPv4's, or says why it cannot be trusted: a [`Packet`]
/// whose ports and flags are not read yet (final for a later fragment), to be completed by
/// [`parse_l4`].
#[inline(always)]
pub fn parse_ipv4(frame: &impl Frame) -> Result<Packet, Reason> {
    let eth: *const EthHdr = ptr_at(frame, 0).ok_or(Reason::TruncatedEthernet)?;
    // SAFETY: `ptr_at` checked that the whole header is inside the frame.
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut l3_offset = EthHdr::LEN;

    if ether_type == ETH_P_8021Q_BE || ether_type == ETH_P_8021AD_BE {
        let vlan: *const VlanHdr = ptr_at(frame, l3_offset).ok_or(Reason::TruncatedVlan)?;
        // SAFETY: bounds checked by `ptr_at`.
        ether_type = unsafe { (*vlan).ether_type };
        l3_offset += VlanHdr::LEN;
        if ether_type == ETH_P_8021Q_BE || ether_type == ETH_P_8021AD_BE {
            return Err(Reason::StackedVlan);
        }
    }
    if ether_type != ETH_P_IPV4_BE {
        return Err(Reason::NotIpv4);
    }

    let ip: *const Ipv4Hdr = ptr_at(frame, l3_offset).ok_or(Reason::TruncatedIpv4)?;
    // SAFETY: bounds checked by `ptr_at`.
    let ip = unsafe { &*ip };
    let vihl = ip.vihl;
    // Masking bounds the value for the verifier: the header is 20 to 60 bytes.
    let header_len = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || header_len < Ipv4Hdr::LEN {
        return Err(Reason::BadIpv4Header);
    }
    let total_len = usize::from(u16::from_be_bytes(ip.tot_len));
    // Ethernet may pad short frames, so the frame may be longer than the datagram, never shorter.
    if total_len < header_len || l3_offset + total_len > frame.len() {
        return Err(Reason::BadIpv4Length);
    }
    let frags = u16::from_be_bytes(ip.frags);
    let fragment = if frags & IPV4_OFFSET_MASK != 0 {
        fragment::LATER
    } else if frags & IPV4_MF != 0 {
        fragment::FIRST
    } else {
        fragment::WHOLE
    };
    // Only TCP and UDP fragments can be told apart by their first fragment's ports.
    if fragment != fragment::WHOLE && ip.proto != proto::TCP && ip.proto != proto::UDP {
        return Err(Reason::Fragment);
    }

    Ok(Packet {
        l3_offset,
        l4_offset: l3_offset + header_len,
        src_ip_be: u32::from_ne_bytes(ip.src_addr),
        dst_ip_be: u32::from_ne_bytes(ip.dst_addr),
        src_port_be: 0,
        dst_port_be: 0,
        proto: ip.proto,
        flags: 0,
        // Fits: it came from a u16.
        total_len: total_len as u16,
        fragment,
        ip_id_be: u16::from_ne_bytes(ip.id),
    })
}

/// Reads the ports and flags of a packet [`parse_ipv4`] parsed, from its L4 header; a later
/// fragment has none. On an error the caller's `packet` still names the datagram: a first
/// fragment too short for its L4 header (RFC 1858's tiny fragment) is one.
#[inline(always)]
pub fn parse_l4(frame: &impl Frame, mut packet: Packet) -> Result<Packet, Reason> {
    if packet.fragment == fragment::LATER {
        return Ok(packet);
    }
    let l4_offset = packet.l4_offset;
    let l3_end = packet.l3_offset + usize::from(packet.total_len);
    match packet.proto {
        proto::TCP => {
            let tcp: *const TcpHdr = l4_header(frame, l4_offset, l3_end)?;
            // SAFETY: bounds checked by `l4_header`.
            let tcp = unsafe { &*tcp };
            let data_offset = usize::from(tcp.doff()) * 4;
            if data_offset < TcpHdr::LEN || l4_offset + data_offset > l3_end {
                return Err(Reason::TruncatedL4);
            }
            packet.src_port_be = u16::from_ne_bytes(tcp.source);
            packet.dst_port_be = u16::from_ne_bytes(tcp.dest);
            // SAFETY: byte 13 (the flags) lies inside the 20 bytes `l4_header` checked.
            packet.flags = unsafe { *(core::ptr::from_ref(tcp).cast::<u8>().add(13)) };
        }
        proto::UDP => {
            let udp: *const UdpHdr = l4_header(frame, l4_offset, l3_end)?;
            // SAFETY: bounds checked by `l4_header`.
            let udp = unsafe { &*udp };
            // Linux's rule (udp_rcv, and conntrack's udp_error, which kube-proxy's rules then
            // leave untranslated): a length below the header, or beyond the datagram, makes
            // it invalid. A first fragment carries the whole datagram's length: only the
            // first half of the rule applies to it.
            let udp_len = usize::from(u16::from_be_bytes(udp.len));
            let beyond = packet.fragment == fragment::WHOLE && l4_offset + udp_len > l3_end;
            if udp_len < UdpHdr::LEN || beyond {
                return Err(Reason::TruncatedL4);
            }
            packet.src_port_be = u16::from_ne_bytes(udp.src);
            packet.dst_port_be = u16::from_ne_bytes(udp.dst);
        }
        proto::ICMP => {
            let icmp: *const Icmpv4Hdr = l4_header(frame, l4_offset, l3_end)?;
            // SAFETY: bounds checked by `l4_header`.
            packet.flags = unsafe { (*icmp).type_ };
        }
        _ => return Err(Reason::OtherL4),
    }
    Ok(packet)
}

/// The L4 header at `offset`, which must lie inside both the frame and the IPv4 datagram.
#[inline(always)]
fn l4_header<T>(frame: &impl Frame, offset: usize, l3_end: usize) -> Result<*const T, Reason> {
    if offset + core::mem::size_of::<T>() > l3_end {
        return Err(Reason::TruncatedL4);
    }
    ptr_at(frame, offset).ok_or(Reason::TruncatedL4)
}
