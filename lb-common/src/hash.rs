//! The flow hash that picks a backend slot. It is deterministic (no per-boot seed) so that every
//! node, and every restart, maps a flow to the same slot: with Maglev tables that means the same
//! backend cluster-wide.
#![expect(
    clippy::inline_always,
    reason = "BPF programs cannot call across functions cheaply; the datapath wants these inlined"
)]

/// Hashes a five-tuple (fields as they sit in the packet, network order).
#[inline(always)]
#[must_use]
pub fn flow_hash(
    src_ip_be: u32,
    dst_ip_be: u32,
    src_port_be: u16,
    dst_port_be: u16,
    proto: u8,
) -> u32 {
    let ports = (u32::from(src_port_be) << 16) | u32::from(dst_port_be);
    let mut hash = 0x9e37_79b9 ^ u32::from(proto);
    hash = mix(hash ^ src_ip_be);
    hash = mix(hash ^ dst_ip_be);
    hash = mix(hash ^ ports);
    finalize(hash)
}

/// `MurmurHash3`'s block mix.
#[inline(always)]
fn mix(value: u32) -> u32 {
    value
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// `MurmurHash3`'s finaliser: every input bit affects every output bit.
#[inline(always)]
#[must_use]
pub fn finalize(mut hash: u32) -> u32 {
    hash ^= hash >> 16;
    hash = hash.wrapping_mul(0x85eb_ca6b);
    hash ^= hash >> 13;
    hash = hash.wrapping_mul(0xc2b2_ae35);
    hash ^ (hash >> 16)
}
