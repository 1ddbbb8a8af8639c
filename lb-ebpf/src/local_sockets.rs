//! The node's own sockets, as the SNAT port allocation must see them: a masqueraded flow may not
//! take a source port that a local socket already uses towards the same backend, or the
//! backend's replies to that socket would be taken for the flow's (and the other way round).

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock_tuple},
    helpers::{bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
};
use lb_common::maps::proto;

/// `struct bpf_sock_tuple`'s IPv4 member: the size the lookup helpers take for IPv4.
#[repr(C)]
struct SockTuple4 {
    saddr_be: u32,
    daddr_be: u32,
    sport_be: u16,
    dport_be: u16,
}

/// True if a packet `from` -> `to` (addresses and ports in network order) of protocol `proto`
/// would reach a socket of this node's network namespace: a connection on that tuple (TCP: also
/// one in `TIME_WAIT` or being opened) or a socket listening on, or bound to, `to`.
#[inline(always)]
pub fn receive(ctx: &impl EbpfContext, proto: u8, from: (u32, u16), to: (u32, u16)) -> bool {
    let mut tuple =
        SockTuple4 { saddr_be: from.0, daddr_be: to.0, sport_be: from.1, dport_be: to.1 };
    let tuple_ptr = core::ptr::from_mut(&mut tuple).cast::<bpf_sock_tuple>();
    let size = size_of::<SockTuple4>() as u32;
    // The namespace of the device the packet is on: the node's.
    let netns = BPF_F_CURRENT_NETNS as u64;
    // SAFETY: `tuple` is valid for `size` bytes; the helpers read it only.
    let socket = unsafe {
        if proto == proto::TCP {
            // `skc`: TIME_WAIT and request sockets count too, which the full-socket lookup
            // skips.
            bpf_skc_lookup_tcp(ctx.as_ptr(), tuple_ptr, size, netns, 0)
        } else {
            bpf_sk_lookup_udp(ctx.as_ptr(), tuple_ptr, size, netns, 0)
        }
    };
    if socket.is_null() {
        return false;
    }
    // SAFETY: a referenced socket from the lookup above, released once.
    unsafe { bpf_sk_release(socket.cast()) };
    true
}
