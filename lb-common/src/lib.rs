//! Map keys, values and constants shared by the in-kernel programs (`lb-ebpf`) and the daemon
//! (`lb-user`).
//!
//! Every type here is part of the kernel/user contract: `#[repr(C)]`, explicit padding, no
//! `bool`/`enum`/`Option` fields, and a compile-time size assert. Addresses and ports are kept in
//! network byte order wherever the datapath compares them against packet bytes; such fields end
//! in `_be`.
#![no_std]

pub mod conntrack;
pub mod hash;
pub mod maps;
pub mod stats;

/// Implements `aya::Pod` for map types on the userspace side only: the eBPF side has no aya.
macro_rules! user_pod {
    ($($t:ty),+ $(,)?) => {
        $(
            // SAFETY: the type is `#[repr(C)]`, `Copy`, made only of integers, with every padding
            // byte spelled out as a field, so every bit pattern is a valid value.
            #[cfg(feature = "user")]
            unsafe impl aya::Pod for $t {}
        )+
    };
}
pub(crate) use user_pod;
