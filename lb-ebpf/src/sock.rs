//! The host path: node processes reaching services. Their packets never cross a pod-facing or
//! external interface, so instead of translating every packet, these cgroup hooks point the
//! socket at a backend when it connects (TCP, connected UDP) or sends (unconnected UDP), as
//! Cilium's socket LB does: no per-packet cost, no conntrack, and it works whatever the node's
//! routes. `recvmsg` and `getpeername` show the service address back to the process.
//!
//! Only sockets of the daemon's own network namespace are the node's: attached to the root of
//! the node's cgroup tree, the hooks also see every pod's sockets, which the pod-facing tc path
//! serves instead (as a pod's flows, with its own address for session affinity), as Cilium's
//! socket LB does with `bpf-lb-sock-hostns-only`.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use lb_common::{
    hash::flow_hash,
    maps::{RevNat, SockRevNatKey, proto, service_flags},
    stats::Reason,
};

use crate::{
    conntrack,
    lb::{self, Unserved},
    maps::SOCK_REV_NAT,
    stats,
};

/// A cgroup sock_addr program's "let the call proceed".
const ALLOW: i32 = 1;
/// "Fail the call"; the error is EPERM unless `bpf_set_retval` chose another.
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// The cookie of the daemon's network namespace (the node's), set by the loader
/// (`lb_user::loader`): a read-only global the verifier sees as a constant.
#[unsafe(no_mangle)]
static NODE_NETNS_COOKIE: u64 = 0;

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    point_at_backend(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    point_at_backend(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    show_service_address(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    show_service_address(&ctx);
    ALLOW
}

/// Rewrites the destination of a connect or sendmsg to a service into one of its backends.
#[inline(always)]
fn point_at_backend(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel hands the program a valid bpf_sock_addr for the duration of the call.
    let address = unsafe { &mut *ctx.sock_addr };
    let protocol = address.protocol as u8;
    if protocol != proto::TCP && protocol != proto::UDP {
        return ALLOW;
    }
    // SAFETY: plain helper call on this program's context (Linux 5.7+ for sock_addr); the
    // global is read volatile so that the compiler does not fold the 0 it was built with.
    let node_socket = unsafe {
        bpf_get_netns_cookie(ctx.as_ptr()) == core::ptr::read_volatile(&raw const NODE_NETNS_COOKIE)
    };
    if !node_socket {
        return ALLOW;
    }
    let Some(config) = lb::node_config() else { return ALLOW };
    let vip_be = address.user_ip4;
    // The port sits in network order in the low 16 bits.
    let port_be = address.user_port as u16;
    // The node itself is inside the cluster: it gets the internal backend set.
    let Some(service) = lb::lookup_frontend(vip_be, port_be, protocol, true) else {
        // As the packet path does: a ClusterIP's unserved port is refused, an unallocated
        // service address fails (EPERM) rather than leave by the default route.
        return match lb::unserved(vip_be, config) {
            Unserved::NotOurs => ALLOW,
            Unserved::Port => refuse(),
            Unserved::UnallocatedVip => {
                stats::count(Reason::DropUnallocatedVip);
                DENY
            }
        };
    };
    // kube-proxy lets the node reach a LoadBalancer IP with loadBalancerSourceRanges only when
    // a range holds the node's address (its "allow from node" rule), and drops it otherwise.
    // A connect cannot be dropped silently: it fails at once (EPERM).
    if service.flags & service_flags::SOURCE_RANGES != 0
        && !lb::source_allowed(service.service_id, config.snat_ip_be)
    {
        stats::count(Reason::DropSourceRange);
        return DENY;
    }
    if service.slot_count == 0 {
        // A policy that leaves no local endpoint drops; none at all refuses. A connect cannot
        // be dropped silently, so both fail at once, refused unless the policy emptied it.
        if service.flags & service_flags::EMPTY_DROP == 0 {
            return refuse();
        }
        stats::count(Reason::HostRefused);
        return DENY;
    }
    // SAFETY: the context is a valid sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // The socket and the service pick the backend, as a flow's tuple does on the packet path:
    // every datagram an unconnected socket sends to the service goes to the same backend, as
    // kube-proxy's conntrack keeps them.
    let hash = flow_hash(cookie as u32, (cookie >> 32) as u32 ^ vip_be, port_be, 0, protocol);
    let Some((_, backend)) =
        lb::choose_backend(&service, config, config.snat_ip_be, hash, conntrack::now())
    else {
        return ALLOW;
    };
    address.user_ip4 = backend.ip_be;
    address.user_port = u32::from(backend.port_be);
    let key = SockRevNatKey {
        cookie,
        backend_ip_be: backend.ip_be,
        backend_port_be: backend.port_be,
        pad: [0; 2],
    };
    let original = RevNat { vip_be, port_be, pad: [0; 2] };
    // Losing this entry (LRU pressure) only shows the backend's address to the process.
    let _ = SOCK_REV_NAT.insert(&key, &original, 0);
    lb::count_frontend(service.service_id, 0);
    stats::count(Reason::HostTranslated);
    ALLOW
}

/// Fails the call with "connection refused".
#[inline(always)]
fn refuse() -> i32 {
    stats::count(Reason::HostRefused);
    // SAFETY: plain helper call (Linux 5.18+ for sock_addr programs).
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    DENY
}

/// Shows the service address instead of the backend a host socket was pointed at.
#[inline(always)]
fn show_service_address(ctx: &SockAddrContext) {
    // SAFETY: as above.
    let address = unsafe { &mut *ctx.sock_addr };
    // SAFETY: the context is a valid sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevNatKey {
        cookie,
        backend_ip_be: address.user_ip4,
        backend_port_be: address.user_port as u16,
        pad: [0; 2],
    };
    // SAFETY: plain data.
    if let Some(original) = unsafe { SOCK_REV_NAT.get(&key) } {
        address.user_ip4 = original.vip_be;
        address.user_port = u32::from(original.port_be);
    }
}
