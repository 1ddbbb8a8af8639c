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
        }
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
        let eth = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC);
        let ip_step = match self.vlan {
            Some(id) => eth.single_vlan(VlanId::try_new(id).expect("VLAN id")).ip(ip),
            None => eth.ip(ip),
        };
        let mut frame = Vec::new();
        match self.l4 {
            L4::Tcp { src_port, dst_port } => {
                ip_step.tcp(src_port, dst_port, 1000, 64_240).syn().write(&mut frame, &self.payload)
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
