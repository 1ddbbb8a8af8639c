//! Internet checksum arithmetic (RFC 1071), and incremental updates (RFC 1624).
//!
//! Values are summed exactly as they sit in memory (network order read as native integers):
//! the one's-complement sum is byte-order independent, so no swapping is needed as long as
//! every operand is taken the same way.

/// Folds a 64-bit accumulator to 16 bits with end-around carry.
#[inline(always)]
pub fn fold(mut sum: u64) -> u16 {
    // Four folds always suffice for a 64-bit accumulator; a fixed count keeps the verifier happy.
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Adds a 32-bit value as two 16-bit words.
#[inline(always)]
pub fn add32(sum: u64, value: u32) -> u64 {
    sum + u64::from(value & 0xffff) + u64::from(value >> 16)
}

/// The checksum field after a 32-bit word it covers changed from `from` to `to`
/// (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m'), one 16-bit half at a time).
#[inline(always)]
pub fn replace32(check: u16, from: u32, to: u32) -> u16 {
    !fold(add32(add32(u64::from(!check), !from), to))
}

/// The checksum field after a 16-bit word it covers changed from `from` to `to`.
#[inline(always)]
pub fn replace16(check: u16, from: u16, to: u16) -> u16 {
    !fold(u64::from(!check) + u64::from(!from) + u64::from(to))
}

/// One's-complement sum of `words` 16-bit words, for checksums computed from scratch.
#[inline(always)]
pub fn sum_words(words: &[u16]) -> u64 {
    let mut sum = 0u64;
    for word in words {
        sum += u64::from(*word);
    }
    sum
}
