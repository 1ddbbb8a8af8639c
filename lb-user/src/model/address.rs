//! Addresses as the API server accepts them: besides the standard forms, IPv4 octets with
//! leading zeros (`10.244.001.005`), which Kubernetes validation lets through for compatibility
//! and kube-proxy reads as decimal (`netutils.ParseIPSloppy`). Rust's parser refuses them.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};

/// An address in any form the API server accepts.
pub fn parse_ip(text: &str) -> Option<IpAddr> {
    text.parse().ok().or_else(|| ipv4_with_leading_zeros(text).map(IpAddr::V4))
}

/// A CIDR in any form the API server accepts (`netutils.ParseCIDRSloppy`).
pub fn parse_cidr(text: &str) -> Option<IpNet> {
    text.parse().ok().or_else(|| {
        let (address, prefix) = text.split_once('/')?;
        let prefix = prefix.parse().ok()?;
        Ipv4Net::new(ipv4_with_leading_zeros(address)?, prefix).ok().map(IpNet::V4)
    })
}

/// Four decimal octets of one to three digits each, leading zeros allowed.
fn ipv4_with_leading_zeros(text: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = text.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    parts.next().is_none().then(|| Ipv4Addr::from(octets))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_zeros_are_read_as_decimal_as_kube_proxy_does() {
        assert_eq!(parse_ip("192.168.1.010"), Some(IpAddr::V4(Ipv4Addr::new(192, 168, 1, 10))));
        assert_eq!(parse_ip("10.244.001.5"), Some(IpAddr::V4(Ipv4Addr::new(10, 244, 1, 5))));
        assert_eq!(parse_ip("fd00::1"), "fd00::1".parse().ok());
        assert_eq!(parse_cidr("010.0.0.0/8"), "10.0.0.0/8".parse().ok());
        for bad in ["10.0.0", "10.0.0.0.1", "10.0.0.256", "10.0.0.0001", "10.0..1", "10.0.0.+1"] {
            assert_eq!(parse_ip(bad), None, "{bad}");
        }
        assert_eq!(parse_cidr("10.0.0.0/33"), None);
    }
}
