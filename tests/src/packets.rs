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
