//! Packet builders on etherparse, and the byte offsets tests use to damage them.

use std::net::Ipv4Addr;

use etherparse::{IpHeaders, Ipv4Header, Ipv4Options, PacketBuilder, VlanId};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// Offset of the IPv4 header in an untagged frame.
pub const L3: usize = 14;
/// Offset of the L4 header in an untagged frame without IP options.
pub const L4: usize = L3 + 20;

/// The L4 part of a test packet.
#[derive(Clone, Copy, Debug)]
pub enum L4 {
    Tcp { src_port: u16, dst_port: u16 },
    Udp { src_port: u16, dst_port: u16 },
    IcmpEcho { id: u16, seq: u16 },
}

/// A well-formed Ethernet/IPv4 packet, described by its fields.
#[derive(Clone, Debug)]
pub struct Spec {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub l4: L4,
    pub payload: Vec<u8>,
    pub vlan: Option<u16>,
    /// IPv4 options bytes (a multiple of 4, at most 40).
    pub ip_options: Vec<u8>,
    /// Ethernet source and destination.
    pub macs: ([u8; 6], [u8; 6]),
    /// TCP flags, sequence and acknowledgement numbers.
    pub tcp: TcpFields,
}

/// The TCP header fields a test may care about.
#[derive(Clone, Copy, Debug)]
pub struct TcpFields {
    pub syn: bool,
    pub ack: Option<u32>,
    pub rst: bool,
    pub fin: bool,
    pub seq: u32,
    pub window: u16,
}

impl Default for TcpFields {
    fn default() -> Self {
        Self { syn: true, ack: None, rst: false, fin: false, seq: 1000, window: 64_240 }
    }
}

impl Spec {
    pub fn tcp(src: &str, src_port: u16, dst: &str, dst_port: u16) -> Self {
        Self::new(src, dst, L4::Tcp { src_port, dst_port })
    }

    pub fn udp(src: &str, src_port: u16, dst: &str, dst_port: u16) -> Self {
        Self::new(src, dst, L4::Udp { src_port, dst_port })
    }

    pub fn icmp_echo(src: &str, dst: &str, id: u16) -> Self {
        Self::new(src, dst, L4::IcmpEcho { id, seq: 1 })
    }

    fn new(src: &str, dst: &str, l4: L4) -> Self {
        Self {
            src: src.parse().expect("source address"),
            dst: dst.parse().expect("destination address"),
            l4,
            payload: b"hello".to_vec(),
            vlan: None,
            ip_options: Vec::new(),
            macs: (CLIENT_MAC, NODE_MAC),
            tcp: TcpFields::default(),
        }
    }

    /// The same packet with other addresses and ports (a translation's expected result).
    pub fn with_addresses(mut self, src: &str, src_port: u16, dst: &str, dst_port: u16) -> Self {
        self.src = src.parse().expect("source address");
        self.dst = dst.parse().expect("destination address");
        self.l4 = match self.l4 {
            L4::Tcp { .. } => L4::Tcp { src_port, dst_port },
            L4::Udp { .. } => L4::Udp { src_port, dst_port },
            L4::IcmpEcho { id, seq } => L4::IcmpEcho { id, seq },
        };
        self
    }

    pub fn with_macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.macs = (src, dst);
        self
    }

    pub fn with_tcp(mut self, tcp: TcpFields) -> Self {
        self.tcp = tcp;
        self
    }

    /// The same segment as a FIN of an established connection (FIN and ACK, no SYN).
    pub fn fin(&self) -> Self {
        self.clone().with_tcp(TcpFields {
            syn: false,
            fin: true,
            ack: Some(1),
            ..TcpFields::default()
        })
    }

    pub fn with_vlan(mut self, id: u16) -> Self {
        self.vlan = Some(id);
        self
    }

    pub fn with_ip_options(mut self, options: &[u8]) -> Self {
        self.ip_options = options.to_vec();
        self
    }

    pub fn with_payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// The frame's bytes, with every checksum correct.
    pub fn build(&self) -> Vec<u8> {
        let mut ip =
            Ipv4Header::new(0, 64, etherparse::IpNumber::TCP, self.src.octets(), self.dst.octets())
                .expect("IPv4 header");
        ip.options = Ipv4Options::try_from(self.ip_options.as_slice()).expect("IPv4 options");
        let ip = IpHeaders::Ipv4(ip, etherparse::Ipv4Extensions::default());
        let eth = PacketBuilder::ethernet2(self.macs.0, self.macs.1);
        let ip_step = match self.vlan {
            Some(id) => eth.single_vlan(VlanId::try_new(id).expect("VLAN id")).ip(ip),
            None => eth.ip(ip),
        };
        let mut frame = Vec::new();
        match self.l4 {
            L4::Tcp { src_port, dst_port } => {
                let t = self.tcp;
                let mut step = ip_step.tcp(src_port, dst_port, t.seq, t.window);
                if t.syn {
                    step = step.syn();
                }
                if let Some(ack) = t.ack {
                    step = step.ack(ack);
                }
                if t.rst {
                    step = step.rst();
                }
                if t.fin {
                    step = step.fin();
                }
                step.write(&mut frame, &self.payload)
            }
            L4::Udp { src_port, dst_port } => {
                ip_step.udp(src_port, dst_port).write(&mut frame, &self.payload)
            }
            L4::IcmpEcho { id, seq } => {
                ip_step.icmpv4_echo_request(id, seq).write(&mut frame, &self.payload)
            }
        }
        .expect("writing the packet");
        frame
    }
}

/// Source and destination (address, port) of an IPv4 TCP or UDP frame.
pub fn endpoints(frame: &[u8]) -> ((Ipv4Addr, u16), (Ipv4Addr, u16)) {
    let packet = etherparse::SlicedPacket::from_ethernet(frame).expect("parsable frame");
    let Some(etherparse::NetSlice::Ipv4(ip)) = packet.net else { panic!("not IPv4") };
    let (src, dst) = (ip.header().source_addr(), ip.header().destination_addr());
    let (sport, dport) = match packet.transport {
        Some(etherparse::TransportSlice::Tcp(tcp)) => (tcp.source_port(), tcp.destination_port()),
        Some(etherparse::TransportSlice::Udp(udp)) => (udp.source_port(), udp.destination_port()),
        other => panic!("not TCP or UDP: {other:?}"),
    };
    ((src, sport), (dst, dport))
}

/// Splits the untagged IPv4 datagram in `frame` into two fragments as a sender would (RFC
/// 791): the first with the IPv4 header and `first_len` bytes of the datagram's data (a
/// multiple of 8, so the L4 header and its checksum over the whole datagram go in it), "more
/// fragments" set; the second with the rest at that offset. Both get identification `id` and a
/// recomputed header checksum.
pub fn fragmented(frame: &[u8], id: u16, first_len: usize) -> [Vec<u8>; 2] {
    const MORE_FRAGMENTS: u16 = 0x2000;
    let header_len = usize::from(frame[L3] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([frame[L3 + 2], frame[L3 + 3]]));
    let data = &frame[L3 + header_len..L3 + total_len];
    assert!(
        first_len.is_multiple_of(8) && first_len < data.len(),
        "a fragment boundary inside the data"
    );
    let fragment = |part: &[u8], frags: u16| {
        let mut bytes = frame[..L3 + header_len].to_vec();
        bytes.extend_from_slice(part);
        let len = u16::try_from(header_len + part.len()).expect("fits an IPv4 total length");
        bytes[L3 + 2..L3 + 4].copy_from_slice(&len.to_be_bytes());
        bytes[L3 + 4..L3 + 6].copy_from_slice(&id.to_be_bytes());
        bytes[L3 + 6..L3 + 8].copy_from_slice(&frags.to_be_bytes());
        let header = Ipv4Header::from_slice(&bytes[L3..]).expect("IPv4 header").0;
        bytes[L3 + 10..L3 + 12].copy_from_slice(&header.calc_header_checksum().to_be_bytes());
        bytes
    };
    let offset_words = u16::try_from(first_len / 8).expect("fits the offset field");
    [fragment(&data[..first_len], MORE_FRAGMENTS), fragment(&data[first_len..], offset_words)]
}

/// An ICMP "fragmentation needed" (RFC 1191) from `from` to `to`, node to client on Ethernet,
/// with `next_hop_mtu`, quoting `quote`.
pub fn icmp_fragmentation_needed(from: &str, to: &str, next_hop_mtu: u16, quote: &[u8]) -> Vec<u8> {
    use etherparse::{Icmpv4Type, icmpv4::DestUnreachableHeader};
    let address = |text: &str| text.parse::<Ipv4Addr>().expect("address").octets();
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(NODE_MAC, CLIENT_MAC)
        .ipv4(address(from), address(to), 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu,
        }))
        .write(&mut frame, quote)
        .expect("ICMP frame");
    frame
}
