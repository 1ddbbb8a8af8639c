//! ICMP errors about translated flows are translated back (BPF_PROG_TEST_RUN on the seeded
//! tables): fragmentation needed from a router towards a masqueraded NodePort backend reaches
//! the external client quoting the packet it sent; port unreachable from a backend reaches the
//! pod from the service address; an error about a reply reaches the backend; the node's own
//! error, from its address in the pod network, reaches the pod. Expected bytes
//! are built independently by etherparse from the packets the client and backend really sent.

use etherparse::{Icmpv4Type, PacketBuilder, icmpv4::DestUnreachableHeader};
use lb_common::stats::Reason;
use lb_tests::{
    checksum,
    datapath::{Datapath, Hook},
    fixtures::{EXTERNAL_CLIENT, POD, seeded},
    packets::{CLIENT_MAC, L3, NODE_MAC, Spec, endpoints},
};

/// The first 28 bytes of an IPv4 datagram without options: its header and 8 bytes of L4.
fn quote(frame: &[u8]) -> Vec<u8> {
    frame[L3..L3 + 28].to_vec()
}

fn icmp_frame(src: &str, dst: &str, kind: Icmpv4Type, quoted: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(addr(src).octets(), addr(dst).octets(), 64)
        .icmpv4(kind)
        .write(&mut frame, quoted)
        .expect("ICMP frame");
    frame
}

fn addr(text: &str) -> std::net::Ipv4Addr {
    text.parse().expect("address")
}

fn frag_needed() -> Icmpv4Type {
    Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
        next_hop_mtu: 1400,
    })
}

fn port_unreachable() -> Icmpv4Type {
    Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port)
}

fn assert_translated(
    datapath: &mut Datapath,
    hook: Hook,
    input: &[u8],
    expected: &[u8],
    what: &str,
) {
    let run = datapath.run(hook, input);
    assert_eq!(run.return_code, hook.forward_code(), "{what}: verdict");
    let counted: Vec<_> = run.counted.non_zero().collect();
    assert_eq!(counted, vec![(Reason::IcmpErrorTranslated.name(), 1)], "{what}: counters");
    assert_eq!(run.output, expected, "{what}: exact bytes");
    checksum::assert_icmp_valid(&run.output);
}

#[test]
fn fragmentation_needed_towards_a_masqueraded_backend_reaches_the_client() {
    let mut datapath = seeded();
    let request = Spec::tcp(EXTERNAL_CLIENT, 50_000, "192.168.1.63", 30380).build();
    let run = datapath.run(Hook::Xdp, &request);
    let ((snat_ip, _), _) = endpoints(&run.output);
    assert_eq!(snat_ip.to_string(), "192.168.1.63", "the flow is masqueraded");
    // A router on the way to the backend cannot forward the translated packet.
    let error = icmp_frame("10.244.2.1", "192.168.1.63", frag_needed(), &quote(&run.output));
    let expected = icmp_frame("10.244.2.1", EXTERNAL_CLIENT, frag_needed(), &quote(&request));
    assert_translated(&mut datapath, Hook::Xdp, &error, &expected, "frag needed");
}

#[test]
fn port_unreachable_from_a_backend_reaches_the_pod_from_the_service_address() {
    let mut datapath = seeded();
    let request = Spec::udp(POD, 5353, "10.96.0.10", 53).build();
    let run = datapath.run(Hook::Tc, &request);
    let (_, (backend, _)) = endpoints(&run.output);
    let hook = if backend == addr("10.244.1.15") { Hook::Tc } else { Hook::Xdp };
    let sent = quote(&run.output);
    let error = icmp_frame(&backend.to_string(), POD, port_unreachable(), &sent);
    // The quoted UDP checksum is not translated (no receiver checks it): it stays as sent.
    let mut expected_quote = quote(&request);
    expected_quote[26..28].copy_from_slice(&sent[26..28]);
    let expected = icmp_frame("10.96.0.10", POD, port_unreachable(), &expected_quote);
    assert_translated(&mut datapath, hook, &error, &expected, "port unreachable");
}

#[test]
fn an_error_about_a_reply_reaches_the_backend() {
    let mut datapath = seeded();
    let request = Spec::udp(POD, 5354, "10.96.0.10", 53).build();
    let run = datapath.run(Hook::Tc, &request);
    let (_, (backend, backend_port)) = endpoints(&run.output);
    let reply = Spec::udp(&backend.to_string(), backend_port, POD, 5354)
        .with_macs(NODE_MAC, CLIENT_MAC)
        .build();
    let reply_hook = if backend == addr("10.244.1.15") { Hook::Tc } else { Hook::Xdp };
    let translated_reply = datapath.run(reply_hook, &reply).output;
    // The pod's socket is gone: its host answers the translated reply with port unreachable.
    let sent = quote(&translated_reply);
    let error = icmp_frame(POD, "10.96.0.10", port_unreachable(), &sent);
    let mut expected_quote = quote(&reply);
    expected_quote[26..28].copy_from_slice(&sent[26..28]);
    let expected = icmp_frame(POD, &backend.to_string(), port_unreachable(), &expected_quote);
    assert_translated(&mut datapath, Hook::Tc, &error, &expected, "error about a reply");
}

/// With a bridge CNI the node's address towards its pods lies in the pod network (flannel's
/// `cni0`, 10.244.1.1 here), and it is the source of the errors the node's stack sends pods:
/// one about a translated packet, on its way out to the pod, still reaches the pod's socket.
#[test]
fn the_nodes_own_error_from_a_pod_network_address_reaches_the_pod() {
    let mut datapath = seeded();
    let request = Spec::udp(POD, 5355, "10.96.0.10", 53).build();
    let run = datapath.run(Hook::Tc, &request);
    let sent = quote(&run.output);
    let host_unreachable = || Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Host);
    let error = icmp_frame("10.244.1.1", POD, host_unreachable(), &sent);
    let mut expected_quote = quote(&request);
    expected_quote[26..28].copy_from_slice(&sent[26..28]);
    let expected = icmp_frame("10.244.1.1", POD, host_unreachable(), &expected_quote);
    assert_translated(&mut datapath, Hook::TcReply, &error, &expected, "the node's own error");
}

#[test]
fn an_error_about_an_unknown_flow_is_not_translated() {
    let mut datapath = seeded();
    let stranger = Spec::udp(POD, 7000, "10.244.2.99", 53).build();
    let error = icmp_frame("10.244.2.99", POD, port_unreachable(), &quote(&stranger));
    let run = datapath.run(Hook::Tc, &error);
    assert_eq!(run.return_code, Hook::Tc.pass_code());
    assert_eq!(run.output, error, "untouched");
}
