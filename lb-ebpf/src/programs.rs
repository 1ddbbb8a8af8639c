//! Program entry points: thin wrappers that run the shared stages and turn the outcome into the
//! hook's return code.

use aya_ebpf::{
    bindings::{TC_ACT_UNSPEC, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{maps::proto, stats::Reason};

use crate::{frame::Frame, parse, stats};

/// Bytes a tc program wants in the linear part of the skb: Ethernet, one VLAN tag, the largest
/// IPv4 header and a TCP header with options. Beyond it sit the payload and, for ICMP errors, the
/// quoted datagram, which later stages pull themselves.
const TC_PULL_LEN: usize = 14 + 4 + 60 + 60;

/// North-south entry point, on external interfaces.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    stats::count(first_stage(&ctx));
    xdp_action::XDP_PASS
}

/// East-west entry point, on tc ingress of pod-facing interfaces.
///
/// Returns `TC_ACT_UNSPEC` for packets that are not ours: with tcx that means "next program"
/// and with cls_bpf direct-action "continue classification", so other programs on the same hook
/// (a CNI's, for one) still see them.
#[classifier]
pub fn lb_tc(ctx: TcContext) -> i32 {
    pull_headers(&ctx);
    stats::count(first_stage(&ctx));
    TC_ACT_UNSPEC
}

/// Makes the headers directly readable when the skb keeps them in paged fragments (GRO'd or
/// driver-built skbs may hold only part of them linearly).
#[inline(always)]
fn pull_headers(ctx: &TcContext) {
    let want = core::cmp::min(Frame::len(ctx), TC_PULL_LEN);
    if ctx.end() - ctx.start() < want {
        // A failed pull leaves the skb as it was; the parser then reports the truncation.
        let _ = ctx.pull_data(want as u32);
    }
}

/// Parses the packet and names the outcome. No service lookup exists yet, so every well-formed
/// packet is passed under its protocol's reason.
#[inline(always)]
fn first_stage(frame: &impl Frame) -> Reason {
    match parse::parse(frame) {
        Ok(packet) => match packet.proto {
            proto::TCP => Reason::PassTcp,
            proto::UDP => Reason::PassUdp,
            _ => Reason::PassIcmp,
        },
        Err(reason) => reason,
    }
}
