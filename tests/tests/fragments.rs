//! Fragmented TCP and UDP datagrams (RFC 791): the first fragment, which carries the ports, is
//! translated like a whole datagram, and the later ones get the same addresses. The packet
//! tables check each fragment's exact bytes against the expected translation of the whole
//! datagram, fragmented the way a sender would (so the L4 checksum in the first fragment is
//! right for the reassembled datagram); the end-to-end test sends datagrams larger than the
//! MTU through a ClusterIP and a NodePort with real sockets, and reads the fragmented answers.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use lb_common::stats::Reason;
use lb_tests::{
    daemon::{RunningDaemon, counter, scrape_metrics},
    datapath::{Datapath, Hook},
    fixtures::{EXTERNAL_CLIENT, HOST_NETWORK_VIP, POD, seeded},
    manifests::ManifestDir,
    netns::Netns,
    node::NODE_IP,
    packets::{
        CLIENT_MAC, L3, L4, NODE_MAC, Spec, TcpFields, fragmented, icmp_fragmentation_needed,
    },
    pins::TestPins,
    topology::{NODE_IP as DEMO_NODE_IP, Topology},
};

/// Bytes of the datagram's data in the first fragment: the L4 header and some payload.
const FIRST_LEN: usize = 48;

fn addr(text: &str) -> Ipv4Addr {
    text.parse().expect("address")
}

/// The (address, port) pairs of an untagged first fragment or whole datagram without IP
/// options, read from the bytes (etherparse leaves a fragment's L4 header unparsed).
fn ends(frame: &[u8]) -> ((Ipv4Addr, u16), (Ipv4Addr, u16)) {
    let ip = |at: usize| Ipv4Addr::new(frame[at], frame[at + 1], frame[at + 2], frame[at + 3]);
    let port = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    ((ip(L3 + 12), port(L4)), (ip(L3 + 16), port(L4 + 2)))
}

/// Runs both fragments of `datagram` through `hook` and checks that they come out as the
/// fragments of `expected` (the whole datagram as translated), counted as `first_reason` and
/// then as a translated later fragment.
fn assert_fragments_translated(
    datapath: &mut Datapath,
    hook: Hook,
    fragments: &[Vec<u8>; 2],
    expected: &Spec,
    id: u16,
    first_reason: Reason,
) {
    let want = fragmented(&expected.build(), id, FIRST_LEN);
    let run = datapath.run(hook, &fragments[0]);
    run.assert_outcome(hook.forward_code(), first_reason, "first fragment");
    assert_eq!(run.output, want[0], "first fragment: exact bytes");
    let run = datapath.run(hook, &fragments[1]);
    run.assert_outcome(hook.forward_code(), Reason::FragmentTranslated, "later fragment");
    assert_eq!(run.output, want[1], "later fragment: the first one's addresses, nothing else");
}

/// A payload that puts `ports` where a quote of the second fragment would be read for ports:
/// the worst case for an ICMP error about that fragment.
fn payload_with_ports_at_the_fragment_boundary(ports: (u16, u16), len: usize) -> Vec<u8> {
    let mut payload = vec![0x5a; len];
    let at = FIRST_LEN - 8;
    payload[at..at + 2].copy_from_slice(&ports.0.to_be_bytes());
    payload[at + 2..at + 4].copy_from_slice(&ports.1.to_be_bytes());
    payload
}

#[test]
fn a_fragmented_datagram_and_its_fragmented_answer_through_a_cluster_ip() {
    let mut datapath = seeded();
    let payload = payload_with_ports_at_the_fragment_boundary((5400, 53), 120);
    let request = Spec::udp(POD, 5400, "10.96.0.10", 53).with_payload(&payload);
    let fragments = fragmented(&request.build(), 0x4242, FIRST_LEN);
    let run = datapath.run(Hook::Tc, &fragments[0]);
    run.assert_outcome(Hook::Tc.forward_code(), Reason::ForwardNew, "first fragment");
    let (_, backend) = ends(&run.output);
    let sent = request.clone().with_addresses(POD, 5400, &backend.0.to_string(), 53);
    let sent = fragmented(&sent.build(), 0x4242, FIRST_LEN);
    assert_eq!(run.output, sent[0], "first fragment: exact bytes");
    let run = datapath.run(Hook::Tc, &fragments[1]);
    run.assert_outcome(Hook::Tc.forward_code(), Reason::FragmentTranslated, "later fragment");
    assert_eq!(run.output, sent[1], "later fragment: the first one's addresses, nothing else");
    let bytes: u64 = fragments.iter().map(|f| (f.len() - L3) as u64).sum();
    assert_eq!(datapath.service_counters(2), (2, bytes), "both fragments counted for the frontend");

    // The answer, fragmented too, enters through the pod's interface when the backend is
    // local, from the network when it is remote.
    let hook = if backend.0 == addr("10.244.1.15") { Hook::Tc } else { Hook::Xdp };
    let answer = request
        .clone()
        .with_addresses(&backend.0.to_string(), 53, POD, 5400)
        .with_macs(NODE_MAC, CLIENT_MAC)
        .with_payload(&[0xa5; 300]);
    let answer_fragments = fragmented(&answer.build(), 0x0777, FIRST_LEN);
    let expected = answer.with_addresses("10.96.0.10", 53, POD, 5400);
    assert_fragments_translated(
        &mut datapath,
        hook,
        &answer_fragments,
        &expected,
        0x0777,
        Reason::ReplyTranslated,
    );

    // An ICMP error quoting the later fragment (as sent to the backend) must not be read as
    // one about the flow: the bytes where its ports would be are payload, even when they
    // happen to equal the flow's ports.
    let quote = &sent[1][L3..L3 + 28];
    let error = icmp_fragmentation_needed(&backend.0.to_string(), POD, 1400, quote);
    let run = datapath.run(hook, &error);
    run.assert_outcome(hook.pass_code(), Reason::NotService, "ICMP error about a later fragment");
    assert_eq!(run.output, error, "untouched");
}

#[test]
fn masqueraded_fragments_get_the_snat_address_and_their_answers_the_client() {
    let mut datapath = seeded();
    let payload = vec![0x3c; 200];
    let request = Spec::tcp(EXTERNAL_CLIENT, 50_100, NODE_IP, 30380).with_payload(&payload);
    let fragments = fragmented(&request.build(), 0x1001, FIRST_LEN);
    let run = datapath.run(Hook::Xdp, &fragments[0]);
    run.assert_outcome(Hook::Xdp.forward_code(), Reason::ForwardNew, "first fragment");
    let ((snat_ip, snat_port), backend) = ends(&run.output);
    assert_eq!((snat_ip, backend), (addr(NODE_IP), (addr("10.244.2.11"), 80)));
    let expected = request.clone().with_addresses(NODE_IP, snat_port, "10.244.2.11", 80);
    assert_eq!(run.output, fragmented(&expected.build(), 0x1001, FIRST_LEN)[0]);
    let run = datapath.run(Hook::Xdp, &fragments[1]);
    run.assert_outcome(Hook::Xdp.forward_code(), Reason::FragmentTranslated, "later fragment");
    assert_eq!(run.output, fragmented(&expected.build(), 0x1001, FIRST_LEN)[1]);

    let tcp =
        TcpFields { syn: true, ack: Some(request.tcp.seq + 1), seq: 7, ..TcpFields::default() };
    let answer = request
        .clone()
        .with_addresses("10.244.2.11", 80, NODE_IP, snat_port)
        .with_macs(NODE_MAC, CLIENT_MAC)
        .with_tcp(tcp)
        .with_payload(&[0x77; 160]);
    let answer_fragments = fragmented(&answer.build(), 0x2002, FIRST_LEN);
    let expected = answer.with_addresses(NODE_IP, 30380, EXTERNAL_CLIENT, 50_100);
    assert_fragments_translated(
        &mut datapath,
        Hook::Xdp,
        &answer_fragments,
        &expected,
        0x2002,
        Reason::ReplyTranslated,
    );
}

#[test]
fn the_node_stacks_fragmented_answers_are_translated_on_their_way_out() {
    let mut datapath = seeded();
    let request = Spec::tcp(EXTERNAL_CLIENT, 50_200, HOST_NETWORK_VIP, 443);
    let run = datapath.run(Hook::Xdp, &request.build());
    run.assert_outcome(Hook::Xdp.forward_code(), Reason::ForwardNew, "to the node");
    let tcp =
        TcpFields { syn: true, ack: Some(request.tcp.seq + 1), seq: 9, ..TcpFields::default() };
    let answer = request
        .clone()
        .with_addresses(NODE_IP, 6443, EXTERNAL_CLIENT, 50_200)
        .with_macs(NODE_MAC, CLIENT_MAC)
        .with_tcp(tcp)
        .with_payload(&[0x42; 500]);
    let fragments = fragmented(&answer.build(), 0x3003, FIRST_LEN);
    let expected = answer.with_addresses(HOST_NETWORK_VIP, 443, EXTERNAL_CLIENT, 50_200);
    assert_fragments_translated(
        &mut datapath,
        Hook::TcReply,
        &fragments,
        &expected,
        0x3003,
        Reason::ReplyTranslated,
    );
}

#[test]
fn later_fragments_whose_first_was_not_translated_are_dropped_to_services_and_passed_elsewhere() {
    let mut datapath = seeded();
    let to_service = Spec::udp(POD, 5500, "10.96.0.10", 53).with_payload(&[1; 100]);
    let to_pod = Spec::udp(POD, 5501, "10.244.2.10", 53).with_payload(&[2; 100]);
    let refused = Spec::udp(POD, 5502, "10.96.45.12", 53).with_payload(&[3; 100]);
    for hook in Hook::ALL {
        // Out of order: the later fragment before its first.
        let fragments = fragmented(&to_service.build(), 0x5005, FIRST_LEN);
        let run = datapath.run(hook, &fragments[1]);
        run.assert_outcome(hook.drop_code(), Reason::DropFragmentUntracked, "before its first");

        let fragments = fragmented(&to_pod.build(), 0x5006, FIRST_LEN);
        for (fragment, reason) in fragments.iter().zip([Reason::NotService, Reason::Fragment]) {
            let run = datapath.run(hook, fragment);
            run.assert_outcome(hook.pass_code(), reason, "not a service's");
            assert_eq!(&run.output, fragment, "untouched");
        }

        // A first fragment refused (no endpoints) records nothing for the rest.
        let fragments = fragmented(&refused.build(), 0x5007, FIRST_LEN);
        let run = datapath.run(hook, &fragments[0]);
        run.assert_outcome(hook.bounce_code(), Reason::RejectNoEndpoints, "refused first");
        let run = datapath.run(hook, &fragments[1]);
        run.assert_outcome(hook.drop_code(), Reason::DropFragmentUntracked, "after a refusal");
    }
}

#[test]
fn a_datagram_reusing_an_identification_does_not_take_the_earlier_ones_addresses() {
    for hook in Hook::ALL {
        let mut datapath = seeded();
        let served = Spec::udp(POD, 5503, "10.96.0.10", 53).with_payload(&[4; 100]);
        let unserved = Spec::udp(POD, 5503, "10.96.0.10", 54).with_payload(&[5; 100]);
        let first = fragmented(&served.build(), 0x5008, FIRST_LEN);
        let run = datapath.run(hook, &first[0]);
        run.assert_outcome(hook.forward_code(), Reason::ForwardNew, "the first datagram");
        // The same source, destination, protocol and identification, refused.
        let second = fragmented(&unserved.build(), 0x5008, FIRST_LEN);
        let run = datapath.run(hook, &second[0]);
        run.assert_outcome(hook.bounce_code(), Reason::RejectUnservedPort, "the second");
        let run = datapath.run(hook, &second[1]);
        run.assert_outcome(hook.drop_code(), Reason::DropFragmentUntracked, "its later fragment");
    }
}

/// RFC 1858's tiny fragment: a first fragment too short for its TCP header does not parse and
/// is passed, and like a refused one it removes the record of an earlier datagram with its
/// source, destination, protocol and identification, which its later fragments would
/// otherwise follow.
#[test]
fn a_tiny_first_fragment_reusing_an_identification_leaves_no_record_behind() {
    for hook in Hook::ALL {
        let mut datapath = seeded();
        let served = Spec::tcp(POD, 5504, "10.96.45.10", 80).with_payload(&[7; 100]);
        let first = fragmented(&served.build(), 0x5009, FIRST_LEN);
        let run = datapath.run(hook, &first[0]);
        run.assert_outcome(hook.forward_code(), Reason::ForwardNew, "the first datagram");
        let tiny = Spec::tcp(POD, 5505, "10.96.45.10", 80).with_payload(&[8; 100]);
        let second = fragmented(&tiny.build(), 0x5009, 8);
        let run = datapath.run(hook, &second[0]);
        run.assert_outcome(hook.pass_code(), Reason::TruncatedL4, "8 bytes of TCP header");
        assert_eq!(run.output, second[0], "untouched");
        let run = datapath.run(hook, &second[1]);
        run.assert_outcome(hook.drop_code(), Reason::DropFragmentUntracked, "its later fragment");
    }
}

#[test]
fn records_of_arriving_datagrams_and_of_the_nodes_own_never_mix() {
    let mut datapath = seeded();
    let request = Spec::tcp(EXTERNAL_CLIENT, 50_300, NODE_IP, 30381).with_payload(&[6; 100]);
    let fragments = fragmented(&request.build(), 0x6006, FIRST_LEN);
    let run = datapath.run(Hook::Xdp, &fragments[0]);
    run.assert_outcome(Hook::Xdp.forward_code(), Reason::ForwardNew, "arriving first fragment");
    // The same key leaving the node: lb_tc_reply neither uses the arriving side's record nor
    // removes it (it counts only what it translates or drops).
    for fragment in [&fragments[1], &fragments[0]] {
        let run = datapath.run(Hook::TcReply, fragment);
        assert_eq!(run.return_code, Hook::TcReply.pass_code(), "leaving: passed");
        assert_eq!(&run.output, fragment, "leaving: untouched");
        assert_eq!(run.counted.non_zero().count(), 0, "leaving: not counted");
    }
    let run = datapath.run(Hook::Xdp, &fragments[1]);
    run.assert_outcome(Hook::Xdp.forward_code(), Reason::FragmentTranslated, "arriving later");
}

/// A UDP service reached from a pod and a NodePort reached from the external client, each with
/// datagrams too large for one packet: the pods answer with their name followed by the whole
/// request, so the answers are fragmented too, and are checked byte for byte.
#[test]
fn datagrams_larger_than_the_mtu_through_a_cluster_ip_and_a_node_port() {
    let topology = Topology::new("lbfrag");
    let _servers = topology.start_servers();
    let pins = TestPins::new();
    let manifests = ManifestDir::new();
    manifests.add_file("udp-node-port.yaml", UDP_NODE_PORT);
    let _daemon = RunningDaemon::start(&topology, &pins, manifests.path(), None);

    let client_pod = &topology.pod("client").netns;
    for size in [1500, 4000, 9000] {
        let answer = large_exchange(client_pod, "10.96.0.10:53", size);
        assert!(answer.starts_with("my-nginx-"), "{size} bytes through the ClusterIP: {answer}");
    }
    let node_port = format!("{DEMO_NODE_IP}:30053");
    for size in [3000, 9000] {
        let answer = large_exchange(&topology.client, &node_port, size);
        assert!(answer.starts_with("my-nginx-"), "{size} bytes through the NodePort: {answer}");
    }
    let metrics = scrape_metrics(&topology.node).expect("the metrics endpoint answers");
    let translated = counter(&metrics, "lb_datapath_packets_total{reason=\"fragment_translated\"}");
    // Every datagram and answer above is fragmented: at least one later fragment each way.
    assert!(translated >= Some(10), "{metrics}");
}

/// A NodePort for the pods' UDP servers (the demo's UDP service is a ClusterIP only).
const UDP_NODE_PORT: &str = "\
apiVersion: v1
kind: Service
metadata: {name: echo-udp-node-port, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.53
  selector: {run: my-nginx}
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 53, nodePort: 30053}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-udp-node-port-u1
  namespace: default
  labels: {kubernetes.io/service-name: echo-udp-node-port}
addressType: IPv4
endpoints:
- {addresses: [10.244.1.10], nodeName: node-a, conditions: {ready: true}}
- {addresses: [10.244.1.11], nodeName: node-a, conditions: {ready: true}}
ports:
- {name: dns, port: 53, protocol: UDP}
";

/// Sends a `size`-byte datagram from `netns` to `service` on a connected socket (so only
/// answers from the service address are read) and returns the answering pod's name, after
/// checking that the rest of the answer is the request, whole.
fn large_exchange(netns: &Netns, service: &str, size: usize) -> String {
    let service: SocketAddr = service.parse().expect("service address");
    let request: Vec<u8> = (b'a'..=b'z').cycle().take(size).collect();
    let answer = netns
        .enter(|| -> std::io::Result<Vec<u8>> {
            let socket = UdpSocket::bind(("0.0.0.0", 0))?;
            socket.connect(service)?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut buffer = vec![0u8; 65_536];
            // A lost datagram (the daemon may still be programming) is sent again.
            for _ in 0..5 {
                socket.send(&request)?;
                if let Ok(len) = socket.recv(&mut buffer) {
                    return Ok(buffer[..len].to_vec());
                }
            }
            Err(std::io::Error::other("no answer"))
        })
        .unwrap_or_else(|e| panic!("{size} bytes to {service}: {e}"));
    let name_len = answer
        .len()
        .checked_sub(size)
        .unwrap_or_else(|| panic!("{size} bytes to {service}: a {}-byte answer", answer.len()));
    assert_eq!(&answer[name_len..], request, "{size} bytes to {service}: the request echoed");
    String::from_utf8_lossy(&answer[..name_len]).into_owned()
}
