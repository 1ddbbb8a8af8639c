//! Program entry points: thin wrappers that run the shared stages and turn the verdict into
//! the hook's return code.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    maps::{ConntrackKey, fragment_side, proto},
    stats::Reason,
};

use crate::{
    conntrack,
    forward::{self, Onward},
    fragments,
    frame::{self, Frame},
    hook::Hook,
    icmp,
    lb::{self, Origin, Verdict},
    parse::{self, Packet, fragment, tcp_flags},
    refuse, stats,
};

/// Bytes a tc program wants in the linear part of the skb: Ethernet, one VLAN tag, the largest
/// IPv4 header and a TCP header with options.
const TC_PULL_LEN: usize = 14 + 4 + 60 + 60;

/// North-south entry point, on external interfaces.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    match north_south(&ctx, forward::forward) {
        Ok(code) => code,
        Err(Verdict::Pass | Verdict::Forward) => xdp_action::XDP_PASS,
        Err(Verdict::Drop) => xdp_action::XDP_DROP,
        Err(Verdict::Refuse) => ctx.bounce() as u32,
    }
}

/// East-west entry point, on tc ingress of pod-facing interfaces.
///
/// Packets that are not ours get `TC_ACT_UNSPEC`: with tcx that means "next program" and with
/// cls_bpf direct-action "continue classification", so other programs on the same hook (a CNI's,
/// for one) still see them.
#[classifier]
pub fn lb_tc(ctx: TcContext) -> i32 {
    pull_headers(&ctx);
    tc_verdict(&ctx, run(&ctx, Origin::Pod).0)
}

#[inline(always)]
fn tc_verdict(ctx: &TcContext, verdict: Verdict) -> i32 {
    match verdict {
        Verdict::Pass => TC_ACT_UNSPEC,
        Verdict::Forward => TC_ACT_OK,
        Verdict::Drop => TC_ACT_SHOT,
        Verdict::Refuse => ctx.bounce(),
    }
}

/// North-south on tc ingress, for an external interface whose XDP hook another program holds:
/// `lb_xdp`'s service stage and forwarding, with tc's return codes.
#[classifier]
pub fn lb_tc_external(ctx: TcContext) -> i32 {
    pull_headers(&ctx);
    north_south(&ctx, forward::forward_from_tc).unwrap_or_else(|verdict| tc_verdict(&ctx, verdict))
}

/// The service stage for a packet from outside, and `send_on` for one it translated; counts
/// the reason. `Ok`: the packet was sent on, with that return code; `Err`: the verdict to
/// carry out.
#[inline(always)]
fn north_south<H: Hook, C>(
    hook: &H,
    send_on: impl FnOnce(&H, &Packet) -> Onward<C>,
) -> Result<C, Verdict> {
    let (verdict, reason, packet) = classify(hook, Origin::External);
    let (verdict, reason) = match (verdict, packet) {
        (Verdict::Forward, Some(packet)) => match send_on(hook, &packet) {
            Onward::Sent(code) => {
                stats::count(reason);
                return Ok(code);
            }
            Onward::Instead(verdict, reason) => (verdict, reason),
        },
        (verdict, _) => (verdict, reason),
    };
    stats::count(reason);
    Err(verdict)
}

/// Not attached: the daemon's conntrack collector runs it (`BPF_PROG_TEST_RUN`) on the key of
/// each entry it found expired, given as the packet's bytes, to delete the entry only if it is
/// still expired, claiming it first (`conntrack::remove_expired`). A delete from user space
/// could not claim: between the collector's look and its delete, a new flow could take the
/// entry over, lose it, and leave its tuple to a third flow. `XDP_DROP`: deleted; `XDP_PASS`:
/// kept (live, claimed, or gone already).
#[xdp]
pub fn lb_reap(ctx: XdpContext) -> u32 {
    let Some(key) = frame::ptr_at::<ConntrackKey>(&ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    let Some(config) = lb::node_config() else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: inside the packet, checked by `ptr_at`; the key is plain data.
    let key = unsafe { core::ptr::read_unaligned(key) };
    if conntrack::remove_expired(&key, conntrack::now(), config) {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// Replies from the node's own stack, on tc egress of pod-facing and external interfaces: the
/// flows whose backend is a host-network endpoint of this node (see `lb::process_from_node`).
/// It counts only what it translates or drops: every packet this node sends or forwards to a
/// pod passes here, and counting those it passes would count most traffic twice.
#[classifier]
pub fn lb_tc_reply(ctx: TcContext) -> i32 {
    pull_headers(&ctx);
    let (verdict, reason) = match parse_headers(&ctx, fragment_side::EGRESS) {
        Ok(packet) => {
            let outcome = lb::process_from_node(&ctx, &packet);
            fragments::settle_untranslated(&packet, fragment_side::EGRESS, outcome.0);
            outcome
        }
        Err(reason) => (Verdict::Pass, reason),
    };
    if verdict != Verdict::Pass {
        stats::count(reason);
    }
    tc_verdict(&ctx, verdict)
}

/// Parses the headers. A first fragment whose L4 header is incomplete is passed untranslated,
/// like any packet that does not parse, and, as for any first fragment not translated, the
/// record of an earlier datagram with its key on `side` (a [`fragment_side`]) goes.
#[inline(always)]
fn parse_headers(frame: &impl Frame, side: u8) -> Result<Packet, Reason> {
    let packet = parse::parse_ipv4(frame)?;
    parse::parse_l4(frame, packet).inspect_err(|_| {
        fragments::settle_untranslated(&packet, side, Verdict::Pass);
    })
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

/// Classifies the packet and counts the reason; returns the verdict and, when the packet
/// parsed, its headers.
#[inline(always)]
fn run(hook: &impl Hook, origin: Origin) -> (Verdict, Option<Packet>) {
    let (verdict, reason, packet) = classify(hook, origin);
    stats::count(reason);
    (verdict, packet)
}

/// Parses, runs the service stage, and builds the refusal if one is due.
#[inline(always)]
fn classify(hook: &impl Hook, origin: Origin) -> (Verdict, Reason, Option<Packet>) {
    let packet = match parse_headers(hook, fragment_side::INGRESS) {
        Ok(packet) => packet,
        Err(reason) => return (Verdict::Pass, reason, None),
    };
    let (verdict, reason) = service_stage(hook, &packet, origin);
    fragments::settle_untranslated(&packet, fragment_side::INGRESS, verdict);
    (verdict, reason, Some(packet))
}

#[inline(always)]
fn service_stage(hook: &impl Hook, packet: &Packet, origin: Origin) -> (Verdict, Reason) {
    if packet.fragment == fragment::LATER {
        return lb::process_later_fragment(hook, packet);
    }
    if !lb::translatable(packet) {
        if packet.proto == proto::ICMP
            && let Some(outcome) = icmp::process_error(hook, packet, false)
        {
            return outcome;
        }
        return lb::process_other(packet);
    }
    let (verdict, reason) = lb::process(hook, packet, origin);
    if verdict != Verdict::Refuse {
        return (verdict, reason);
    }
    if packet.proto == proto::TCP && packet.flags & tcp_flags::RST != 0 {
        // Never answer a reset with a reset (RFC 793).
        return (Verdict::Drop, reason);
    }
    if !refuse::within_budget(origin) {
        return (Verdict::Drop, Reason::DropRefusalRateLimited);
    }
    match refuse::refuse(hook, packet) {
        Ok(()) => (verdict, reason),
        Err(()) => {
            refuse::give_back(origin);
            (Verdict::Drop, Reason::DropRefusalFailed)
        }
    }
}
