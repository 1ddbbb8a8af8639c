//! Refusals built in place: a TCP RST for TCP, an ICMP port unreachable (RFC 792) for the rest,
//! sent back from the address the client spoke to, so a connect() fails at once instead of
//! timing out. Each CPU sends them within a budget (`RefusalBudget`), per side. Built the same
//! way: the ICMP fragmentation needed for a translated packet too big for its path.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::maps::{proto, refusal_budget};

use crate::{
    csum,
    hook::Hook,
    lb::Origin,
    maps::REFUSAL_BUDGET,
    nat::{self, End},
    parse::{IPV4_DF_BE, Packet, ipv4_field, tcp_flags},
};

/// A 20-byte IPv4 header without options, as built here.
#[repr(C, align(4))]
#[derive(Clone, Copy, Default)]
struct Ipv4Header {
    version_ihl: u8,
    tos: u8,
    total_len_be: u16,
    id_be: u16,
    frags_be: u16,
    ttl: u8,
    proto: u8,
    check: u16,
    src_be: u32,
    dst_be: u32,
}

/// A 20-byte TCP header without options.
#[repr(C, align(4))]
#[derive(Clone, Copy, Default)]
struct TcpHeader {
    src_port_be: u16,
    dst_port_be: u16,
    seq_be: u32,
    ack_be: u32,
    data_offset: u8,
    flags: u8,
    window_be: u16,
    check: u16,
    urgent_be: u16,
}

/// An ICMP destination-unreachable header and the quoted datagram (its IPv4 header, up to 60
/// bytes, and the first 8 bytes of its payload).
#[repr(C, align(4))]
struct IcmpError {
    kind: u8,
    code: u8,
    check: u16,
    /// The header's second word, network order: unused, but for fragmentation needed's
    /// next-hop MTU in its low 16 bits (RFC 1191).
    rest_be: u32,
    /// In 4-byte words, as they are copied in: no second buffer on the stack.
    quote: [u32; MAX_QUOTE / 4],
}

const MAX_QUOTE: usize = 60 + 8;
const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMP_PORT_UNREACHABLE: u8 = 3;
const ICMP_FRAGMENTATION_NEEDED: u8 = 4;
const DEFAULT_TTL: u8 = 64;

/// Spends one of this CPU's refusals to the side `origin` stands for; `false` when its budget
/// is spent (the packet is then dropped). Per CPU: no atomics, so a node refuses up to its CPU
/// count times the limit.
#[inline(always)]
pub fn within_budget(origin: Origin) -> bool {
    let Some(budget) = REFUSAL_BUDGET.get_ptr_mut(budget_index(origin)) else {
        return true;
    };
    // SAFETY: this CPU's slot of a live array entry, and a helper without arguments. (Only
    // a PREEMPT_RT kernel can interleave two programs on a CPU: a lost update there lets one
    // refusal more through.)
    unsafe { (*budget).take(bpf_ktime_get_ns()) }
}

/// Returns the refusal [`within_budget`] spent, when it could not be built after all.
#[inline(always)]
pub fn give_back(origin: Origin) {
    if let Some(budget) = REFUSAL_BUDGET.get_ptr_mut(budget_index(origin)) {
        // SAFETY: as in `within_budget`.
        unsafe { (*budget).give_back() };
    }
}

#[inline(always)]
fn budget_index(origin: Origin) -> u32 {
    match origin {
        Origin::Pod => refusal_budget::PODS,
        Origin::External => refusal_budget::EXTERNAL,
    }
}

/// Rewrites the packet into its refusal. `Err` if it cannot (a failed resize or write leaves
/// nothing worth sending).
#[inline(always)]
pub fn refuse(hook: &impl Hook, packet: &Packet) -> Result<(), ()> {
    if packet.proto == proto::TCP {
        tcp_reset(hook, packet)
    } else {
        destination_unreachable(hook, packet, ICMP_PORT_UNREACHABLE, 0)
    }
}

/// Rewrites a translated packet that is too big for its path, DF set, into the ICMP
/// fragmentation needed (RFC 1191) its sender can act on: from the address it sent to, quoting
/// the packet as it was sent, with the path's MTU. Not held to a budget: Linux does not limit
/// these either (`icmpv4_mask_allow`, "don't limit PMTU discovery"), and each answers a larger
/// packet.
#[inline(always)]
pub fn fragmentation_needed(hook: &impl Hook, packet: &Packet, mtu: u16) -> Result<(), ()> {
    untranslate(hook, packet)?;
    destination_unreachable(hook, packet, ICMP_FRAGMENTATION_NEEDED, mtu)
}

/// Puts back the addresses and ports `packet` arrived with (it still names them), checksums
/// included.
#[inline(always)]
fn untranslate(hook: &impl Hook, packet: &Packet) -> Result<(), ()> {
    let (l3, l4) = (packet.l3_offset, packet.l4_offset);
    // One copy, brought up to date between the two rewrites (stack is scarce here).
    let mut current = *packet;
    current.src_ip_be = hook.load(l3 + ipv4_field::SRC)?;
    current.dst_ip_be = hook.load(l3 + ipv4_field::DST)?;
    current.src_port_be = hook.load(l4)?;
    current.dst_port_be = hook.load(l4 + 2)?;
    nat::rewrite(hook, &current, End::Source, packet.src_ip_be, packet.src_port_be)?;
    current.src_ip_be = packet.src_ip_be;
    current.src_port_be = packet.src_port_be;
    nat::rewrite(hook, &current, End::Destination, packet.dst_ip_be, packet.dst_port_be)
}

/// The IPv4 header of a refusal: from the address the client spoke to, back to the client.
#[inline(always)]
fn reply_ip_header(packet: &Packet, payload_len: usize, protocol: u8) -> Ipv4Header {
    let mut ip = Ipv4Header {
        version_ihl: 0x45,
        total_len_be: ((20 + payload_len) as u16).to_be(),
        // Refusals are small, and Linux sets DF on the RSTs it sends itself.
        frags_be: IPV4_DF_BE,
        ttl: DEFAULT_TTL,
        proto: protocol,
        src_be: packet.dst_ip_be,
        dst_be: packet.src_ip_be,
        ..Ipv4Header::default()
    };
    // SAFETY: the header is 20 bytes, 4-byte aligned, read as ten 16-bit words.
    let words = unsafe { &*core::ptr::from_ref(&ip).cast::<[u16; 10]>() };
    ip.check = !csum::fold(csum::sum_words(words));
    ip
}

/// Swaps the Ethernet source and destination so the frame goes back where it came from.
#[inline(always)]
fn swap_macs(hook: &impl Hook) -> Result<(), ()> {
    let macs: [u8; 12] = hook.load(0)?;
    let swapped: [u8; 12] = core::array::from_fn(|i| macs[(i + 6) % 12]);
    hook.store(0, &swapped)
}

/// RFC 793 reset generation: answer a segment with ACK by `seq = its ack`; answer one without
/// by `ack = its seq + its length`, SYN and FIN counting one each.
#[inline(always)]
fn tcp_reset(hook: &impl Hook, packet: &Packet) -> Result<(), ()> {
    let l4 = packet.l4_offset;
    let seq_be: u32 = hook.load(l4 + 4)?;
    let ack_be: u32 = hook.load(l4 + 8)?;
    let doff: u8 = hook.load(l4 + 12)?;
    let header_len = usize::from(doff >> 4) * 4 + (packet.l4_offset - packet.l3_offset);
    let payload = u32::from(packet.total_len).saturating_sub(header_len as u32);

    let mut tcp = TcpHeader {
        src_port_be: packet.dst_port_be,
        dst_port_be: packet.src_port_be,
        data_offset: 5 << 4,
        ..TcpHeader::default()
    };
    if packet.flags & tcp_flags::ACK != 0 {
        tcp.seq_be = ack_be;
        tcp.flags = tcp_flags::RST;
    } else {
        let syn_fin = u32::from(packet.flags & tcp_flags::SYN != 0)
            + u32::from(packet.flags & tcp_flags::FIN != 0);
        tcp.ack_be = u32::from_be(seq_be).wrapping_add(payload + syn_fin).to_be();
        tcp.flags = tcp_flags::RST | tcp_flags::ACK;
    }
    let ip = reply_ip_header(packet, 20, proto::TCP);
    // SAFETY: 20 bytes, 4-byte aligned, as ten words.
    let words = unsafe { &*core::ptr::from_ref(&tcp).cast::<[u16; 10]>() };
    let pseudo = csum::add32(csum::add32(0, ip.src_be), ip.dst_be)
        + u64::from(u16::from(proto::TCP).to_be())
        + u64::from(20u16.to_be());
    tcp.check = !csum::fold(pseudo + csum::sum_words(words));

    let l3 = packet.l3_offset;
    swap_macs(hook)?;
    hook.resize(l3 + 40)?;
    hook.store(l3, &ip)?;
    hook.store(l3 + 20, &tcp)
}

/// An ICMP destination unreachable of `code` about `packet`, with `mtu` (fragmentation needed's
/// next-hop MTU, else 0) in the header's second word.
#[inline(always)]
fn destination_unreachable(
    hook: &impl Hook,
    packet: &Packet,
    code: u8,
    mtu: u16,
) -> Result<(), ()> {
    let l3 = packet.l3_offset;
    // The offending datagram's header and 8 bytes of its payload; the parser guarantees both
    // are inside the frame for TCP and UDP.
    let quote_len = (packet.l4_offset - l3) + 8;
    if quote_len > MAX_QUOTE {
        return Err(());
    }
    let mut icmp = IcmpError {
        kind: ICMP_DEST_UNREACHABLE,
        code,
        check: 0,
        rest_be: u32::from(mtu).to_be(),
        quote: [0; MAX_QUOTE / 4],
    };
    // In 4-byte words with a constant bound: a variable-length copy the verifier accepts. The
    // quote length is a multiple of 4 (IHL words + 8).
    for (i, word) in icmp.quote.iter_mut().enumerate() {
        if i * 4 >= quote_len {
            break;
        }
        *word = hook.load(l3 + i * 4)?;
    }
    let icmp_len = 8 + quote_len;
    // SAFETY: the struct is 4-byte aligned and 76 bytes long: 38 words; unused quote bytes are 0
    // and do not change the sum.
    let words = unsafe { &*core::ptr::from_ref(&icmp).cast::<[u16; (8 + MAX_QUOTE) / 2]>() };
    icmp.check = !csum::fold(csum::sum_words(words));
    let ip = reply_ip_header(packet, icmp_len, proto::ICMP);

    swap_macs(hook)?;
    hook.resize(l3 + 20 + icmp_len)?;
    hook.store(l3, &ip)?;
    store_prefix(hook, l3 + 20, &icmp, icmp_len)
}

/// Writes the first `len` bytes of `icmp` (the whole struct may be longer than the message).
#[inline(always)]
fn store_prefix(hook: &impl Hook, offset: usize, icmp: &IcmpError, len: usize) -> Result<(), ()> {
    // Stores in fixed 4-byte steps: the quote length is always a multiple of 4 (IHL words + 8).
    // SAFETY: the struct is 4-byte aligned and a whole number of words.
    let words = unsafe { &*core::ptr::from_ref(icmp).cast::<[u32; (8 + MAX_QUOTE) / 4]>() };
    for (i, word) in words.iter().enumerate() {
        if i * 4 >= len {
            break;
        }
        hook.store(offset + i * 4, word)?;
    }
    Ok(())
}
