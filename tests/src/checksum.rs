//! Checksums recomputed from scratch (RFC 1071) by etherparse, independently of the programs'
//! incremental updates.

use etherparse::{NetSlice, SlicedPacket, TransportSlice};

/// Panics unless the IPv4 header checksum and the TCP/UDP/ICMP checksum of `frame` are correct.
pub fn assert_valid(frame: &[u8]) {
    let packet =
        SlicedPacket::from_ethernet(frame).unwrap_or_else(|e| panic!("unparsable frame: {e}"));
    let Some(NetSlice::Ipv4(ipv4)) = &packet.net else {
        panic!("not an IPv4 frame");
    };
    let header = ipv4.header().to_header();
    assert_eq!(header.header_checksum, header.calc_header_checksum(), "IPv4 header checksum");
    match &packet.transport {
        Some(TransportSlice::Tcp(tcp)) => {
            let expected = tcp
                .to_header()
                .calc_checksum_ipv4(&header, tcp.payload())
                .expect("TCP checksum computable");
            assert_eq!(tcp.checksum(), expected, "TCP checksum");
        }
        Some(TransportSlice::Udp(udp)) => {
            // Zero means "no checksum" for UDP over IPv4 (RFC 768).
            if udp.checksum() != 0 {
                let expected = udp
                    .to_header()
                    .calc_checksum_ipv4(&header, udp.payload())
                    .expect("UDP checksum computable");
                assert_eq!(udp.checksum(), expected, "UDP checksum");
            }
        }
        Some(TransportSlice::Icmpv4(icmp)) => {
            let expected = icmp.icmp_type().calc_checksum(icmp.payload());
            assert_eq!(icmp.checksum(), expected, "ICMP checksum");
        }
        other => panic!("unexpected transport {other:?}"),
    }
}

/// Panics unless the IPv4 header checksum and the ICMP checksum (over the whole message) of an
/// ICMP frame are correct.
pub fn assert_icmp_valid(frame: &[u8]) {
    let packet =
        SlicedPacket::from_ethernet(frame).unwrap_or_else(|e| panic!("unparsable frame: {e}"));
    let Some(NetSlice::Ipv4(ipv4)) = &packet.net else { panic!("not an IPv4 frame") };
    let header = ipv4.header().to_header();
    assert_eq!(header.header_checksum, header.calc_header_checksum(), "IPv4 header checksum");
    let Some(TransportSlice::Icmpv4(icmp)) = &packet.transport else { panic!("not ICMP") };
    assert_eq!(icmp.checksum(), icmp.icmp_type().calc_checksum(icmp.payload()), "ICMP checksum");
}
