//! The first stage of both programs (parse and count) on well-formed, truncated and malformed
//! packets: every packet leaves untouched, with exactly the right counter incremented. The
//! well-formed ones are addressed outside the service CIDR, so they are not services' either.
//!
//! Frames shorter than an Ethernet header cannot be tested here: BPF_PROG_TEST_RUN itself
//! refuses inputs under 14 bytes (EINVAL), for XDP and tc alike.

use lb_common::stats::Reason;
use lb_tests::{
    checksum,
    datapath::{Datapath, Hook},
    node,
    packets::{L3, L4, Spec},
};

/// One packet and the reason the programs must count for it.
struct Case {
    name: String,
    frame: Vec<u8>,
    reason: Reason,
    hooks: &'static [Hook],
}

fn case(name: impl Into<String>, frame: Vec<u8>, reason: Reason) -> Case {
    Case { name: name.into(), frame, reason, hooks: &Hook::ALL }
}

/// A case only XDP can be given: for an IPv4 EtherType, BPF_PROG_TEST_RUN of an skb program
/// refuses (EINVAL) a frame without a full IPv4 header, so such a case runs through XDP only.
fn xdp_only(name: &str, frame: Vec<u8>, reason: Reason) -> Case {
    Case { name: name.into(), frame, reason, hooks: &[Hook::Xdp] }
}

fn tcp() -> Spec {
    Spec::tcp("10.244.1.5", 40_000, "10.244.2.10", 80)
}

/// `frame` with `bytes` written at `offset`.
fn patched(mut frame: Vec<u8>, offset: usize, bytes: &[u8]) -> Vec<u8> {
    frame[offset..offset + bytes.len()].copy_from_slice(bytes);
    frame
}

fn cut(mut frame: Vec<u8>, len: usize) -> Vec<u8> {
    frame.truncate(len);
    frame
}

/// Sets the IPv4 total length to `len`.
fn with_total_length(frame: Vec<u8>, len: u16) -> Vec<u8> {
    patched(frame, L3 + 2, &len.to_be_bytes())
}

fn well_formed_cases() -> Vec<Case> {
    let udp = Spec::udp("10.244.1.5", 5353, "10.244.2.15", 53);
    // A 42-byte UDP frame padded to Ethernet's 60-byte minimum, as a NIC delivers it.
    let mut padded = udp.clone().with_payload(&[]).build();
    padded.resize(60, 0);
    vec![
        case("TCP SYN", tcp().build(), Reason::NotService),
        case("UDP datagram", udp.build(), Reason::NotService),
        case(
            "ICMP echo request",
            Spec::icmp_echo("10.244.1.5", "10.244.2.10", 7).build(),
            Reason::NotService,
        ),
        case("TCP in an 802.1Q tag", tcp().with_vlan(100).build(), Reason::NotService),
        case("UDP in an 802.1Q tag", udp.clone().with_vlan(4094).build(), Reason::NotService),
        case("UDP with Ethernet padding after the datagram", padded, Reason::NotService),
        case("empty TCP payload", tcp().with_payload(&[]).build(), Reason::NotService),
    ]
}

/// Fragments not addressed to a service (see `fragments.rs` for those that are).
fn fragment_cases() -> Vec<Case> {
    let tcp_frame = tcp().build();
    vec![
        case(
            "first fragment (MF set): parsed as a whole datagram, ports and all",
            patched(tcp_frame.clone(), L3 + 6, &[0x20, 0x00]),
            Reason::NotService,
        ),
        case(
            "later fragment (offset 185) whose first was not translated",
            patched(tcp_frame.clone(), L3 + 6, &[0x00, 0xb9]),
            Reason::Fragment,
        ),
        case(
            "fragment of a protocol without ports (GRE)",
            patched(patched(tcp_frame, L3 + 6, &[0x20, 0x00]), L3 + 9, &[47]),
            Reason::Fragment,
        ),
    ]
}

/// IHL above 5: the L4 header starts after the options.
fn ip_option_cases() -> Vec<Case> {
    // NOP padding and an End-of-options list, as RFC 791 allows, in 4 to 40 bytes.
    let options = |len: usize| {
        let mut bytes = vec![1u8; len];
        bytes[len - 1] = 0;
        bytes
    };
    let mut cases = Vec::new();
    for (name, len) in [("4 bytes", 4), ("12 bytes", 12), ("40 bytes (IHL 15)", 40)] {
        cases.push(case(
            format!("TCP after {name} of IPv4 options"),
            tcp().with_ip_options(&options(len)).build(),
            Reason::NotService,
        ));
        cases.push(case(
            format!("UDP after {name} of IPv4 options"),
            Spec::udp("10.244.1.5", 5353, "10.244.2.15", 53).with_ip_options(&options(len)).build(),
            Reason::NotService,
        ));
    }
    // 40 bytes of options push the TCP header out of a datagram whose total length stops at
    // the options: the parser must use IHL, not assume 20 bytes.
    let opt = tcp().with_ip_options(&options(40)).with_payload(&[]).build();
    cases.push(case(
        "TCP header beyond a 60-byte IPv4 header's total length",
        with_total_length(opt, 60 + 10),
        Reason::TruncatedL4,
    ));
    cases
}

fn malformed_cases() -> Vec<Case> {
    let tcp_frame = tcp().build();
    let udp_frame = Spec::udp("10.244.1.5", 5353, "10.244.2.15", 53).build();
    let icmp_frame = Spec::icmp_echo("10.244.1.5", "10.244.2.10", 7).build();
    let tagged = tcp().with_vlan(7).build();
    vec![
        case("ARP", patched(tcp_frame.clone(), 12, &[0x08, 0x06]), Reason::NotIpv4),
        case("IPv6 EtherType", patched(tcp_frame.clone(), 12, &[0x86, 0xdd]), Reason::NotIpv4),
        case("802.1Q tag cut short", cut(tagged.clone(), 16), Reason::TruncatedVlan),
        case(
            "QinQ (stacked tags)",
            patched(tagged.clone(), 16, &[0x81, 0x00]),
            Reason::StackedVlan,
        ),
        case(
            "802.1ad outer tag over 802.1Q",
            patched(patched(tagged, 12, &[0x88, 0xa8]), 16, &[0x81, 0x00]),
            Reason::StackedVlan,
        ),
        xdp_only("IPv4 header cut short", cut(tcp_frame.clone(), L3 + 19), Reason::TruncatedIpv4),
        case(
            "IP version 6 in an IPv4 EtherType",
            patched(tcp_frame.clone(), L3, &[0x65]),
            Reason::BadIpv4Header,
        ),
        case("IHL of 4 words", patched(tcp_frame.clone(), L3, &[0x44]), Reason::BadIpv4Header),
        case(
            "IHL 15 with no room for options",
            patched(cut(tcp_frame.clone(), L3 + 20), L3, &[0x4f]),
            Reason::BadIpv4Length,
        ),
        case(
            "total length below the header",
            with_total_length(tcp_frame.clone(), 19),
            Reason::BadIpv4Length,
        ),
        case(
            "total length beyond the frame",
            with_total_length(tcp_frame.clone(), 1500),
            Reason::BadIpv4Length,
        ),
        case(
            "frame cut inside the TCP header",
            cut(tcp_frame.clone(), L4 + 10),
            Reason::BadIpv4Length,
        ),
        case(
            "DF set is not a fragment",
            patched(tcp_frame.clone(), L3 + 6, &[0x40, 0x00]),
            Reason::NotService,
        ),
        case("GRE", patched(tcp_frame.clone(), L3 + 9, &[47]), Reason::OtherL4),
        case("SCTP", patched(tcp_frame.clone(), L3 + 9, &[132]), Reason::OtherL4),
        case(
            "TCP header cut by the total length",
            with_total_length(cut(tcp_frame.clone(), L4 + 19), 20 + 19),
            Reason::TruncatedL4,
        ),
        case(
            "TCP data offset of 4 words",
            patched(tcp_frame.clone(), L4 + 12, &[0x40]),
            Reason::TruncatedL4,
        ),
        case(
            "TCP data offset beyond the datagram",
            patched(tcp_frame, L4 + 12, &[0xf0]),
            Reason::TruncatedL4,
        ),
        case(
            "UDP header cut short",
            with_total_length(cut(udp_frame.clone(), L4 + 7), 20 + 7),
            Reason::TruncatedL4,
        ),
        case(
            "UDP length below its header",
            patched(udp_frame.clone(), L4 + 4, &[0, 7]),
            Reason::TruncatedL4,
        ),
        case(
            "UDP length beyond the datagram",
            patched(udp_frame, L4 + 4, &[0x05, 0xdc]),
            Reason::TruncatedL4,
        ),
        case(
            "ICMP header cut short",
            with_total_length(cut(icmp_frame, L4 + 4), 20 + 4),
            Reason::TruncatedL4,
        ),
    ]
}

fn loaded() -> Datapath {
    let mut datapath = Datapath::load();
    datapath.apply(&[node::set_node_config()]);
    datapath
}

fn assert_passed_untouched(datapath: &mut Datapath, case: &Case) {
    for &hook in case.hooks {
        let run = datapath.run(hook, &case.frame);
        let context = format!("{} through {hook:?}", case.name);
        assert_eq!(run.return_code, hook.pass_code(), "{context}: verdict");
        assert_eq!(run.output, case.frame, "{context}: packet must leave untouched");
        let counted: Vec<_> = run.counted.non_zero().collect();
        assert_eq!(counted, vec![(case.reason.name(), 1)], "{context}: counters");
    }
}

#[test]
fn well_formed_packets_pass_untouched_and_are_counted_by_protocol() {
    let mut datapath = loaded();
    for case in well_formed_cases() {
        checksum::assert_valid(&case.frame);
        assert_passed_untouched(&mut datapath, &case);
    }
}

#[test]
fn ipv4_options_are_skipped_using_ihl() {
    let mut datapath = loaded();
    for case in ip_option_cases() {
        assert_passed_untouched(&mut datapath, &case);
    }
}

#[test]
fn fragments_not_for_a_service_pass_untouched() {
    let mut datapath = loaded();
    for case in fragment_cases() {
        assert_passed_untouched(&mut datapath, &case);
    }
}

#[test]
fn truncated_and_malformed_packets_pass_untouched_with_their_reason() {
    let mut datapath = loaded();
    for case in malformed_cases() {
        assert!(
            case.reason != Reason::NotService || case.name.contains("DF"),
            "{}: a malformed case must name a failure reason",
            case.name
        );
        assert_passed_untouched(&mut datapath, &case);
    }
}

#[test]
fn every_malformed_reason_is_exercised() {
    let covered: Vec<Reason> =
        malformed_cases().iter().chain(&ip_option_cases()).map(|c| c.reason).collect();
    for &reason in Reason::ALL {
        // Frames under 14 bytes cannot be fed to BPF_PROG_TEST_RUN (see the module comment).
        if reason.is_malformed() && reason != Reason::TruncatedEthernet {
            assert!(covered.contains(&reason), "no case exercises {}", reason.name());
        }
    }
}
