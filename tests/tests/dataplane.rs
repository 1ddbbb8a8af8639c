//! The service datapath on crafted packets (BPF_PROG_TEST_RUN, maps seeded directly): DNAT,
//! conntrack, reverse NAT, SNAT, refusals, drops and policies, with exact output bytes built
//! independently by etherparse and checksums recomputed from scratch.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use etherparse::{Icmpv4Type, PacketBuilder, icmpv4::DestUnreachableHeader};
use lb_common::{
    maps::{
        AffinityKey, AffinityValue, ConntrackKey, RefusalBudget, ServiceKey, ServiceValue, proto,
        scope, service_flags as flag,
    },
    stats::Reason,
};
use lb_tests::{
    checksum,
    datapath::{self, Hook},
    fixtures::{self, EXTERNAL_CLIENT, HOST_NETWORK_VIP, LB_IP, POD, seeded},
    node::{NODE_IP, SNAT_PORT_MAX, SNAT_PORT_MIN},
    packets::{CLIENT_MAC, L3, NODE_MAC, Spec, TcpFields, endpoints},
    services::Frontend,
};
use lb_user::maps::{MapOp, ip_be};

fn addr(text: &str) -> Ipv4Addr {
    text.parse().expect("address")
}

/// A reply of the backend at `from` to the client at `to`, with the request's MACs reversed.
fn reply_of(request: &Spec, from: (Ipv4Addr, u16), to: (Ipv4Addr, u16)) -> Spec {
    let tcp =
        TcpFields { syn: true, ack: Some(request.tcp.seq + 1), seq: 5000, ..TcpFields::default() };
    request
        .clone()
        .with_addresses(&from.0.to_string(), from.1, &to.0.to_string(), to.1)
        .with_macs(NODE_MAC, CLIENT_MAC)
        .with_tcp(tcp)
}

#[test]
fn pod_to_cluster_ip_is_translated_and_its_replies_reverse_translated() {
    let mut datapath = seeded();
    let request = Spec::tcp(POD, 40_000, "10.96.45.10", 80);
    let run = datapath.run(Hook::Tc, &request.build());
    run.assert_outcome(Hook::Tc.forward_code(), Reason::ForwardNew, "first packet");
    let (src, backend) = endpoints(&run.output);
    assert_eq!(src, (addr(POD), 40_000), "a pod's source is kept");
    assert!(
        [(addr("10.244.1.10"), 80), (addr("10.244.2.10"), 80)].contains(&backend),
        "{backend:?}"
    );
    let expected = request.clone().with_addresses(POD, 40_000, &backend.0.to_string(), 80);
    assert_eq!(run.output, expected.build(), "exact bytes after DNAT");
    checksum::assert_valid(&run.output);

    let next = request.clone().with_tcp(TcpFields {
        syn: false,
        ack: Some(5001),
        seq: 1001,
        ..TcpFields::default()
    });
    let run = datapath.run(Hook::Tc, &next.build());
    run.assert_outcome(Hook::Tc.forward_code(), Reason::ForwardEstablished, "second packet");
    assert_eq!(endpoints(&run.output).1, backend, "conntrack keeps the flow on its backend");

    // The reply enters through the pod's interface when the backend is local, from the
    // network (XDP) when it is remote.
    let hook = if backend.0 == addr("10.244.1.10") { Hook::Tc } else { Hook::Xdp };
    let reply = reply_of(&request, backend, (addr(POD), 40_000));
    let run = datapath.run(hook, &reply.build());
    run.assert_outcome(hook.forward_code(), Reason::ReplyTranslated, "reply");
    let expected = reply.with_addresses("10.96.45.10", 80, POD, 40_000);
    assert_eq!(run.output, expected.build(), "exact bytes after reverse NAT");
    checksum::assert_valid(&run.output);
    assert_eq!(datapath.service_counters(1).0, 2, "both client packets counted for the frontend");
}

#[test]
fn a_flow_that_outlives_its_frontend_answers_from_the_address_its_client_knows() {
    let mut datapath = seeded();
    let request = Spec::tcp(POD, 40_010, "10.96.45.10", 80);
    let run = datapath.run(Hook::Tc, &request.build());
    run.assert_outcome(Hook::Tc.forward_code(), Reason::ForwardNew, "first packet");
    let backend = endpoints(&run.output).1;

    // The Service goes and its frontend id (1) goes to another frontend, as the daemon reuses
    // ids; the TCP flow is left to finish.
    let gone = Frontend::new(1, "10.96.45.10", 80, proto::TCP);
    let successor =
        Frontend::new(1, "10.96.45.99", 8080, proto::TCP).backend("10.244.1.77", 80, true);
    datapath.apply(&[MapOp::RemoveService { key: gone.key() }]);
    datapath.apply(&successor.ops());

    let hook = if backend.0 == addr("10.244.1.10") { Hook::Tc } else { Hook::Xdp };
    let reply = reply_of(&request, backend, (addr(POD), 40_010));
    let run = datapath.run(hook, &reply.build());
    run.assert_outcome(hook.forward_code(), Reason::ReplyTranslated, "reply");
    let expected = reply.with_addresses("10.96.45.10", 80, POD, 40_010);
    assert_eq!(run.output, expected.build(), "from the address the client spoke to");
}

#[test]
fn flows_spread_over_every_backend() {
    let mut datapath = seeded();
    let mut chosen = BTreeSet::new();
    for port in 40_000..40_064 {
        let run = datapath.run(Hook::Tc, &Spec::udp(POD, port, "10.96.0.10", 53).build());
        run.assert_outcome(Hook::Tc.forward_code(), Reason::ForwardNew, "UDP to the DNS ClusterIP");
        checksum::assert_valid(&run.output);
        chosen.insert(endpoints(&run.output).1);
    }
    let expected: BTreeSet<_> = [(addr("10.244.1.15"), 53), (addr("10.244.2.15"), 53)].into();
    assert_eq!(chosen, expected);
}

#[test]
fn udp_replies_are_reverse_translated() {
    let mut datapath = seeded();
    let request = Spec::udp(POD, 5353, "10.96.0.10", 53);
    let run = datapath.run(Hook::Tc, &request.build());
    let (_, backend) = endpoints(&run.output);
    let reply = request
        .clone()
        .with_addresses(&backend.0.to_string(), 53, POD, 5353)
        .with_macs(NODE_MAC, CLIENT_MAC)
        .with_payload(b"answer");
    let hook = if backend.0 == addr("10.244.1.15") { Hook::Tc } else { Hook::Xdp };
    let run = datapath.run(hook, &reply.build());
    run.assert_outcome(hook.forward_code(), Reason::ReplyTranslated, "UDP reply");
    assert_eq!(run.output, reply.with_addresses("10.96.0.10", 53, POD, 5353).build());
    checksum::assert_valid(&run.output);
}

/// One client socket asks two frontends that share their one backend (a resolver asking two
/// services of the same DNS pods from one port): the two flows' replies share a tuple
/// (backend -> client). As netfilter does, the second flow gets another source port (its
/// address kept), so each flow's replies come back from the frontend it spoke to.
#[test]
fn two_flows_of_one_client_socket_to_one_backend_keep_their_replies_apart() {
    let mut datapath = seeded();
    let backend = (addr("10.244.1.15"), 53);
    for (id, vip) in [(901, "10.96.9.1"), (902, "10.96.9.2")] {
        datapath
            .apply(&Frontend::new(id, vip, 53, proto::UDP).backend("10.244.1.15", 53, true).ops());
    }
    let first = Spec::udp(POD, 5353, "10.96.9.1", 53);
    let run = datapath.run(Hook::Tc, &first.build());
    run.assert_outcome(Hook::Tc.forward_code(), Reason::ForwardNew, "first frontend");
    assert_eq!(endpoints(&run.output), ((addr(POD), 5353), backend), "source kept");

    let second = Spec::udp(POD, 5353, "10.96.9.2", 53);
    let run = datapath.run(Hook::Tc, &second.build());
    run.assert_outcome(Hook::Tc.forward_code(), Reason::ForwardNew, "second frontend");
    let ((source_ip, source_port), to) = endpoints(&run.output);
    assert_eq!((source_ip, to), (addr(POD), backend), "the client's address kept");
    assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&source_port), "new port {source_port}");
    assert_eq!(
        run.output,
        second.clone().with_addresses(POD, source_port, "10.244.1.15", 53).build()
    );
    checksum::assert_valid(&run.output);

    for (request, client_port, vip) in
        [(&first, 5353, "10.96.9.1"), (&second, source_port, "10.96.9.2")]
    {
        let reply = reply_of(request, backend, (addr(POD), client_port)).with_payload(b"answer");
        let run = datapath.run(Hook::Tc, &reply.build());
        run.assert_outcome(Hook::Tc.forward_code(), Reason::ReplyTranslated, vip);
        assert_eq!(run.output, reply.with_addresses(vip, 53, POD, 5353).build(), "from {vip}");
        checksum::assert_valid(&run.output);
    }
    // Each flow's next packet keeps its translation.
    let run = datapath.run(Hook::Tc, &second.build());
    run.assert_outcome(Hook::Tc.forward_code(), Reason::ForwardEstablished, "second again");
    assert_eq!(endpoints(&run.output), ((addr(POD), source_port), backend));

    // The first flow's forward entry gone, its reply entry left: made again, the flow takes
    // its own reply tuple back, its source kept.
    let forward_key = ConntrackKey::new(
        ip_be(addr(POD)),
        ip_be(addr("10.96.9.1")),
        5353u16.to_be(),
        53u16.to_be(),
        proto::UDP,
    );
    assert_eq!(datapath.maps().remove_conntrack(&[forward_key]).expect("remove"), 1);
    let run = datapath.run(Hook::Tc, &first.build());
    run.assert_outcome(Hook::Tc.forward_code(), Reason::ForwardNew, "first again");
    assert_eq!(endpoints(&run.output), ((addr(POD), 5353), backend), "source kept");
    // So does the second, on the port it was given.
    let forward_key = ConntrackKey { dst_ip_be: ip_be(addr("10.96.9.2")), ..forward_key };
    assert_eq!(datapath.maps().remove_conntrack(&[forward_key]).expect("remove"), 1);
    let run = datapath.run(Hook::Tc, &second.build());
    run.assert_outcome(Hook::Tc.forward_code(), Reason::ForwardNew, "second again, made again");
    assert_eq!(endpoints(&run.output), ((addr(POD), source_port), backend), "its port kept");
}

#[test]
fn node_port_to_a_remote_backend_is_masqueraded_and_reversed() {
    let mut datapath = seeded();
    let request = Spec::tcp(EXTERNAL_CLIENT, 50_000, NODE_IP, 30380);
    let run = datapath.run(Hook::Xdp, &request.build());
    run.assert_outcome(Hook::Xdp.forward_code(), Reason::ForwardNew, "NodePort");
    let ((snat_ip, snat_port), backend) = endpoints(&run.output);
    assert_eq!(backend, (addr("10.244.2.11"), 80));
    assert_eq!(snat_ip, addr(NODE_IP), "source masqueraded to the node");
    assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&snat_port), "SNAT port {snat_port} in range");
    let expected = request.clone().with_addresses(NODE_IP, snat_port, "10.244.2.11", 80);
    assert_eq!(run.output, expected.build());
    checksum::assert_valid(&run.output);

    let reply = reply_of(&request, backend, (addr(NODE_IP), snat_port));
    let run = datapath.run(Hook::Xdp, &reply.build());
    run.assert_outcome(Hook::Xdp.forward_code(), Reason::ReplyTranslated, "reply to the SNAT port");
    assert_eq!(run.output, reply.with_addresses(NODE_IP, 30380, EXTERNAL_CLIENT, 50_000).build());
    checksum::assert_valid(&run.output);

    // The forward entry gone (evicted under pressure), the reply entry left: the client's next
    // segment makes the flow again, on its own SNAT port, which the backend's connection knows.
    let forward_key = node_port_flow(50_000);
    assert_eq!(datapath.maps().remove_conntrack(&[forward_key]).expect("remove"), 1);
    let next = request.with_tcp(mid_flow());
    let run = datapath.run(Hook::Xdp, &next.build());
    run.assert_outcome(Hook::Xdp.forward_code(), Reason::ForwardNew, "made again");
    assert_eq!(run.output, next.with_addresses(NODE_IP, snat_port, "10.244.2.11", 80).build());
}

/// The forward conntrack key of a TCP flow from the external client's `port` to NodePort
/// 30380.
fn node_port_flow(port: u16) -> ConntrackKey {
    let (client, node) = (ip_be(addr(EXTERNAL_CLIENT)), ip_be(addr(NODE_IP)));
    ConntrackKey::new(client, node, port.to_be(), 30380u16.to_be(), proto::TCP)
}

/// The client's next segment after a handshake (the backend's SYN-ACK at seq 5000).
fn mid_flow() -> TcpFields {
    TcpFields { syn: false, ack: Some(5001), seq: 1001, ..TcpFields::default() }
}

/// A masqueraded flow that got a later SNAT port candidate (the first was taken), and then
/// lost its forward entry: made again by its next segment, it finds its own port, though the
/// first candidate is free by then.
#[test]
fn a_masqueraded_flow_made_again_finds_its_own_port_among_the_candidates() {
    let mut datapath = seeded();
    let request = Spec::tcp(EXTERNAL_CLIENT, 50_100, NODE_IP, 30380);
    let backend = "10.244.2.11";
    let forward_key = node_port_flow(50_100);
    let reply_key = |snat_port: u16| {
        ConntrackKey::new(
            ip_be(addr(backend)),
            ip_be(addr(NODE_IP)),
            80u16.to_be(),
            snat_port.to_be(),
            proto::TCP,
        )
    };
    let snat_port_of = |run: &lb_tests::datapath::Run| endpoints(&run.output).0.1;
    let first = snat_port_of(&datapath.run(Hook::Xdp, &request.build()));

    // Another live flow on the first candidate, and the flow made again: the second.
    let maps = datapath.maps();
    let mut other = maps.conntrack_entry(&reply_key(first)).expect("read").expect("reply entry");
    other.nat_port_be = 50_199u16.to_be();
    maps.remove_conntrack(&[forward_key, reply_key(first)]).expect("remove the flow");
    maps.write_conntrack(&reply_key(first), &other).expect("another flow's entry");
    let second = snat_port_of(&datapath.run(Hook::Xdp, &request.build()));
    assert_ne!(second, first, "the first candidate is taken");

    // The other flow gone, and this one's forward entry: its next segment keeps its port.
    let maps = datapath.maps();
    assert_eq!(maps.remove_conntrack(&[reply_key(first), forward_key]).expect("remove"), 2);
    let run = datapath.run(Hook::Xdp, &request.with_tcp(mid_flow()).build());
    run.assert_outcome(Hook::Xdp.forward_code(), Reason::ForwardNew, "made again");
    assert_eq!(snat_port_of(&run), second, "its own port, not the free first candidate");
}

/// The flow hash picks the backend (modulo the slot count) and the first SNAT port candidate:
/// taken from the same bits, a slot count and a port range with a common factor (3 here, and
/// in the default range of 4536 ports) would give each backend's flows only part of the range.
#[test]
fn the_masqueraded_flows_of_every_backend_spread_over_the_whole_snat_range() {
    let mut datapath = seeded();
    let backends = ["10.244.2.21", "10.244.2.22", "10.244.2.23"];
    let mut node_port = Frontend::new(903, NODE_IP, 30999, proto::TCP).flags(flag::EXTERNAL);
    for ip in backends {
        node_port = node_port.backend(ip, 80, false);
    }
    datapath.apply(&node_port.ops());
    let range = u32::from(SNAT_PORT_MAX - SNAT_PORT_MIN) + 1;
    assert_eq!(range % 3, 0, "the test's range shares the factor 3 with the slot count");
    let mut residues: BTreeMap<Ipv4Addr, BTreeSet<u16>> = BTreeMap::new();
    for client_port in 0..120 {
        let request = Spec::tcp(EXTERNAL_CLIENT, 20_000 + client_port, NODE_IP, 30999);
        let run = datapath.run(Hook::Xdp, &request.build());
        run.assert_outcome(Hook::Xdp.forward_code(), Reason::ForwardNew, "NodePort");
        let ((_, snat_port), (backend, _)) = endpoints(&run.output);
        residues.entry(backend).or_default().insert((snat_port - SNAT_PORT_MIN) % 3);
    }
    assert_eq!(residues.len(), 3, "every backend has flows: {residues:?}");
    for (backend, seen) in &residues {
        assert_eq!(seen.len(), 3, "{backend}: SNAT ports in every third of the range: {seen:?}");
    }
}

#[test]
fn node_port_to_a_local_backend_keeps_the_client_address() {
    let mut datapath = seeded();
    let request = Spec::tcp(EXTERNAL_CLIENT, 50_001, NODE_IP, 30381);
    let run = datapath.run(Hook::Xdp, &request.build());
    run.assert_outcome(Hook::Xdp.forward_code(), Reason::ForwardNew, "NodePort, local backend");
    assert_eq!(
        run.output,
        request.clone().with_addresses(EXTERNAL_CLIENT, 50_001, "10.244.1.11", 80).build()
    );
    let reply = reply_of(&request, (addr("10.244.1.11"), 80), (addr(EXTERNAL_CLIENT), 50_001));
    let run = datapath.run(Hook::Tc, &reply.build());
    run.assert_outcome(
        Hook::Tc.forward_code(),
        Reason::ReplyTranslated,
        "reply from the local pod",
    );
    assert_eq!(run.output, reply.with_addresses(NODE_IP, 30381, EXTERNAL_CLIENT, 50_001).build());
}

#[test]
fn a_cluster_ip_from_outside_is_masqueraded_unless_its_backend_is_the_node_itself() {
    let mut datapath = seeded();
    // kube-proxy's masquerade of sources outside the cluster, to a pod backend.
    let request = Spec::tcp(EXTERNAL_CLIENT, 50_010, "10.96.45.10", 80);
    let run = datapath.run(Hook::Xdp, &request.build());
    run.assert_outcome(Hook::Xdp.forward_code(), Reason::ForwardNew, "to pods");
    let ((snat_ip, _), _) = endpoints(&run.output);
    assert_eq!(snat_ip, addr(NODE_IP), "masqueraded");

    // To the node's own stack: the client's address is kept, and the reply, which leaves by
    // the external interface's egress, is translated there.
    let request = Spec::tcp(EXTERNAL_CLIENT, 50_011, HOST_NETWORK_VIP, 443);
    let run = datapath.run(Hook::Xdp, &request.build());
    run.assert_outcome(Hook::Xdp.forward_code(), Reason::ForwardNew, "to the node");
    let expected = request.clone().with_addresses(EXTERNAL_CLIENT, 50_011, NODE_IP, 6443);
    assert_eq!(run.output, expected.build());
    checksum::assert_valid(&run.output);
    let reply = reply_of(&request, (addr(NODE_IP), 6443), (addr(EXTERNAL_CLIENT), 50_011));
    let run = datapath.run(Hook::TcReply, &reply.build());
    run.assert_outcome(Hook::TcReply.forward_code(), Reason::ReplyTranslated, "reply");
    let expected = reply.with_addresses(HOST_NETWORK_VIP, 443, EXTERNAL_CLIENT, 50_011);
    assert_eq!(run.output, expected.build());
    checksum::assert_valid(&run.output);
}

#[test]
fn hairpin_is_masqueraded_so_the_reply_comes_back() {
    let mut datapath = seeded();
    let request = Spec::tcp("10.244.1.10", 40_100, "10.96.45.14", 80);
    let run = datapath.run(Hook::Tc, &request.build());
    run.assert_outcome(Hook::Tc.forward_code(), Reason::ForwardNew, "hairpin");
    let ((snat_ip, snat_port), backend) = endpoints(&run.output);
    assert_eq!((snat_ip, backend), (addr(NODE_IP), (addr("10.244.1.10"), 80)));
    assert_eq!(
        run.output,
        request.clone().with_addresses(NODE_IP, snat_port, "10.244.1.10", 80).build()
    );
    let reply = reply_of(&request, backend, (addr(NODE_IP), snat_port));
    let run = datapath.run(Hook::Tc, &reply.build());
    run.assert_outcome(Hook::Tc.forward_code(), Reason::ReplyTranslated, "hairpin reply");
    assert_eq!(run.output, reply.with_addresses("10.96.45.14", 80, "10.244.1.10", 40_100).build());
    checksum::assert_valid(&run.output);
}

/// The RST a refused SYN from `client:port` to `vip:vport` must get (RFC 793: ack = seq + 1).
fn expected_reset(client: &str, port: u16, vip: &str, vport: u16) -> Vec<u8> {
    let tcp =
        TcpFields { syn: false, ack: Some(1001 + 5), rst: true, fin: false, seq: 0, window: 0 };
    Spec::tcp(vip, vport, client, port)
        .with_macs(NODE_MAC, CLIENT_MAC)
        .with_payload(&[])
        .with_tcp(tcp)
        .build()
}

/// The ICMP port unreachable a refused datagram must get: from the VIP, quoting the
/// datagram's IPv4 header and first 8 payload bytes.
fn expected_port_unreachable(datagram: &[u8], client: &str, vip: &str) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(NODE_MAC, CLIENT_MAC)
        .ipv4(addr(vip).octets(), addr(client).octets(), 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port))
        .write(&mut frame, &datagram[L3..L3 + 28])
        .expect("ICMP frame");
    frame
}

#[test]
fn no_endpoints_and_unserved_ports_are_refused_at_once() {
    let mut datapath = seeded();
    for hook in Hook::ALL {
        let syn = Spec::tcp(POD, 40_200, "10.96.45.12", 80).build();
        let run = datapath.run(hook, &syn);
        run.assert_outcome(hook.bounce_code(), Reason::RejectNoEndpoints, "TCP, no endpoints");
        assert_eq!(
            run.output,
            expected_reset(POD, 40_200, "10.96.45.12", 80),
            "{hook:?}: RST bytes"
        );
        checksum::assert_valid(&run.output);

        let datagram = Spec::udp(POD, 40_201, "10.96.45.12", 53).build();
        let run = datapath.run(hook, &datagram);
        run.assert_outcome(hook.bounce_code(), Reason::RejectNoEndpoints, "UDP, no endpoints");
        assert_eq!(
            run.output,
            expected_port_unreachable(&datagram, POD, "10.96.45.12"),
            "{hook:?}: ICMP bytes"
        );
        checksum::assert_valid(&run.output);

        let https = Spec::tcp(POD, 40_202, "10.96.45.10", 443).build();
        let run = datapath.run(hook, &https);
        run.assert_outcome(hook.bounce_code(), Reason::RejectUnservedPort, "ClusterIP, port 443");
        assert_eq!(run.output, expected_reset(POD, 40_202, "10.96.45.10", 443));

        let udp80 = Spec::udp(POD, 40_203, "10.96.45.10", 80).build();
        let run = datapath.run(hook, &udp80);
        run.assert_outcome(hook.bounce_code(), Reason::RejectUnservedPort, "ClusterIP, UDP");
        assert_eq!(run.output, expected_port_unreachable(&udp80, POD, "10.96.45.10"));
    }
}

#[test]
fn refusals_beyond_a_cpus_budget_are_dropped_and_counted() {
    let mut datapath = seeded();
    datapath::stay_on_this_cpu();
    // One a second after a burst of three, for pods and for the outside world each.
    datapath.set_refusal_budget(RefusalBudget::new(1, 3));
    let syn = |port| Spec::tcp(POD, port, "10.96.45.12", 80).build();
    let datagram = Spec::udp(POD, 40_211, "10.96.45.12", 53).build();
    let sides = [
        ("pods", [Hook::Tc, Hook::Tc, Hook::Tc, Hook::Tc]),
        ("outside", [Hook::Xdp, Hook::TcExternal, Hook::Xdp, Hook::TcExternal]),
    ];
    for (side, hooks) in sides {
        for (port, hook) in (40_220..).zip(&hooks[..3]) {
            let run = datapath.run(*hook, &syn(port));
            run.assert_outcome(hook.bounce_code(), Reason::RejectNoEndpoints, side);
            assert_eq!(run.output, expected_reset(POD, port, "10.96.45.12", 80), "{side}");
        }
        let run = datapath.run(hooks[3], &datagram);
        run.assert_outcome(hooks[3].drop_code(), Reason::DropRefusalRateLimited, side);
        assert_eq!(run.output, datagram, "{side}: dropped as it came");
    }
    // A reset is never answered: dropped as before, whatever the budget.
    let tcp = TcpFields { syn: false, rst: true, ..TcpFields::default() };
    let rst = Spec::tcp(POD, 40_215, "10.96.45.12", 80).with_tcp(tcp).build();
    datapath.run(Hook::Tc, &rst).assert_outcome(
        Hook::Tc.drop_code(),
        Reason::RejectNoEndpoints,
        "a reset",
    );

    // A second refills one refusal, and only one (the next is due a second after it).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let run = datapath.run(Hook::Tc, &datagram);
    run.assert_outcome(Hook::Tc.bounce_code(), Reason::RejectNoEndpoints, "refilled");
    assert_eq!(run.output, expected_port_unreachable(&datagram, POD, "10.96.45.12"));
    let run = datapath.run(Hook::Tc, &syn(40_216));
    run.assert_outcome(Hook::Tc.drop_code(), Reason::DropRefusalRateLimited, "one refilled");

    // Written again (a daemon's start): a full burst.
    datapath.set_refusal_budget(RefusalBudget::new(1, 3));
    for port in 40_217..40_220 {
        let run = datapath.run(Hook::Tc, &syn(port));
        run.assert_outcome(Hook::Tc.bounce_code(), Reason::RejectNoEndpoints, "rewritten");
    }
}

#[test]
fn a_reset_to_a_refused_service_is_dropped_not_answered() {
    let mut datapath = seeded();
    let tcp = TcpFields { syn: false, rst: true, ..TcpFields::default() };
    let rst = Spec::tcp(POD, 40_204, "10.96.45.12", 80).with_tcp(tcp).build();
    let run = datapath.run(Hook::Tc, &rst);
    run.assert_outcome(Hook::Tc.drop_code(), Reason::RejectNoEndpoints, "RST");
}

#[test]
fn drops_by_policy_and_unallocated_addresses() {
    let mut datapath = seeded();
    let cases = [
        (
            "unallocated service address",
            Hook::Tc,
            Spec::tcp(POD, 40_300, "10.96.99.99", 80),
            Reason::DropUnallocatedVip,
        ),
        (
            "externalTrafficPolicy Local, no local endpoint",
            Hook::Xdp,
            Spec::tcp(EXTERNAL_CLIENT, 40_301, NODE_IP, 30400),
            Reason::DropNoLocalEndpoint,
        ),
        (
            "internalTrafficPolicy Local, no local endpoint",
            Hook::Tc,
            Spec::tcp(POD, 40_302, "10.96.45.22", 80),
            Reason::DropNoLocalEndpoint,
        ),
        (
            "outside loadBalancerSourceRanges",
            Hook::Xdp,
            Spec::tcp("203.0.113.200", 40_303, "198.51.100.10", 80),
            Reason::DropSourceRange,
        ),
        (
            "ping to a ClusterIP",
            Hook::Tc,
            Spec::icmp_echo(POD, "10.96.45.10", 9),
            Reason::DropIcmpToVip,
        ),
    ];
    for (name, hook, spec, reason) in cases {
        let run = datapath.run(hook, &spec.build());
        run.assert_outcome(hook.drop_code(), reason, name);
    }
}

#[test]
fn a_frontend_whose_slots_hold_no_backend_drops_and_counts_it() {
    let mut datapath = seeded();
    // Frontend entries without their slots, which the daemon never leaves: a run of zeroed
    // slots (backend id 0), and a run past the end of the array.
    let frontend = |vip: &str, service_id: u32, slot_base: u32| MapOp::UpsertService {
        key: ServiceKey {
            vip_be: ip_be(addr(vip)),
            port_be: 80u16.to_be(),
            proto: proto::TCP,
            scope: scope::EXTERNAL,
        },
        value: ServiceValue {
            service_id,
            slot_base,
            slot_count: 3,
            affinity_timeout_s: 0,
            flags: 0,
            pad: [0; 2],
        },
    };
    datapath
        .apply(&[frontend("10.96.77.1", 900, 1_000_000), frontend("10.96.77.2", 901, u32::MAX)]);
    for (name, vip) in [("zeroed slots", "10.96.77.1"), ("slots past the array", "10.96.77.2")] {
        for hook in Hook::ALL {
            let run = datapath.run(hook, &Spec::tcp(POD, 40_500, vip, 80).build());
            run.assert_outcome(hook.drop_code(), Reason::DropBackendMissing, name);
        }
    }
}

#[test]
fn addresses_and_ports_that_are_not_services_pass_untouched() {
    let mut datapath = seeded();
    for (name, spec) in [
        ("a pod address", Spec::tcp(POD, 40_400, "10.244.2.10", 80)),
        ("a node port no service holds", Spec::tcp(EXTERNAL_CLIENT, 40_401, NODE_IP, 30_999)),
        ("ssh to the node", Spec::tcp(EXTERNAL_CLIENT, 40_402, NODE_IP, 22)),
    ] {
        for hook in Hook::ALL {
            let frame = spec.build();
            let run = datapath.run(hook, &frame);
            run.assert_outcome(hook.pass_code(), Reason::NotService, name);
            assert_eq!(run.output, frame, "{name}: untouched");
        }
    }
}

#[test]
fn pods_reaching_a_local_policy_node_port_use_every_endpoint() {
    let mut datapath = seeded();
    let request = Spec::tcp(POD, 40_500, NODE_IP, 30400);
    let run = datapath.run(Hook::Tc, &request.build());
    run.assert_outcome(Hook::Tc.forward_code(), Reason::ForwardNew, "pod to an ETP-Local NodePort");
    let ((src, _), backend) = endpoints(&run.output);
    assert_eq!(backend, (addr("10.244.2.30"), 80), "the cluster-wide (internal scope) backend set");
    assert_eq!(src, addr(NODE_IP), "a remote backend behind a NodePort is masqueraded");
}

#[test]
fn load_balancer_ip_from_an_allowed_source_is_forwarded() {
    let mut datapath = seeded();
    let request = Spec::tcp(EXTERNAL_CLIENT, 40_600, "198.51.100.10", 80);
    let run = datapath.run(Hook::Xdp, &request.build());
    run.assert_outcome(Hook::Xdp.forward_code(), Reason::ForwardNew, "LB IP, allowed source");
    assert_eq!(
        run.output,
        request.with_addresses(EXTERNAL_CLIENT, 40_600, "10.244.1.50", 80).build()
    );
}

#[test]
fn client_ip_affinity_keeps_every_flow_of_a_client_on_one_backend() {
    let mut datapath = seeded();
    let mut chosen = BTreeSet::new();
    for port in 41_000..41_032 {
        let run = datapath.run(Hook::Tc, &Spec::tcp(POD, port, "10.96.45.11", 80).build());
        run.assert_outcome(Hook::Tc.forward_code(), Reason::ForwardNew, "sticky service");
        chosen.insert(endpoints(&run.output).1);
    }
    assert_eq!(chosen.len(), 1, "one backend for every flow of the client: {chosen:?}");
    let mut others = BTreeSet::new();
    for client in 1..=32 {
        let run = datapath.run(
            Hook::Tc,
            &Spec::tcp(&format!("10.244.3.{client}"), 41_000, "10.96.45.11", 80).build(),
        );
        others.insert(endpoints(&run.output).1);
    }
    assert_eq!(others.len(), 3, "other clients still spread over every backend: {others:?}");
}

/// ClientIP affinity holds for `timeoutSeconds` after the client's last new flow: an entry
/// that old is not followed, and the new flow's choice replaces it.
#[test]
fn a_client_affinity_older_than_its_timeout_is_not_followed() {
    let mut datapath = seeded();
    let sticky =
        fixtures::frontends().into_iter().find(|f| f.vip == "10.96.45.11").expect("sticky");
    let own: BTreeSet<(Ipv4Addr, u16)> =
        sticky.backends.iter().map(|&(ip, port, _)| (addr(ip), port)).collect();
    // A backend of another frontend: a flow that goes there followed the entry.
    let elsewhere = fixtures::frontends().into_iter().find(|f| f.vip == LB_IP).expect("LB");
    let (elsewhere_ip, elsewhere_port, _) = elsewhere.backends[0];
    let key = AffinityKey { client_ip_be: ip_be(addr(POD)), service_id: sticky.service_id };
    let hz = u64::from(lb_user::clock::jiffies_per_second());
    let now = lb_user::clock::jiffies_now().expect("jiffies");
    let timeout = u64::from(sticky.affinity_timeout_s) * hz;
    // Half a timeout either side of it: no wait between here and the program's run matters.
    for (age, followed) in [(timeout / 2, true), (timeout + timeout / 2, false)] {
        let entry = AffinityValue {
            last_used: now - age,
            backend_id: elsewhere.backend_id(0),
            pad: [0; 4],
        };
        datapath.maps().write_affinity(&key, &entry).expect("affinity entry");
        let port = if followed { 41_100 } else { 41_101 };
        let run = datapath.run(Hook::Tc, &Spec::tcp(POD, port, sticky.vip, 80).build());
        run.assert_outcome(Hook::Tc.forward_code(), Reason::ForwardNew, "sticky service");
        let backend = endpoints(&run.output).1;
        if followed {
            assert_eq!(backend, (addr(elsewhere_ip), elsewhere_port), "a fresh entry is followed");
        } else {
            assert!(own.contains(&backend), "{backend:?}: chosen afresh among {own:?}");
            let renewed = datapath.maps().affinities().expect("affinities");
            let (_, value) = renewed.iter().find(|(k, _)| *k == key).expect("the client's entry");
            assert!(value.last_used >= now && value.backend_id != elsewhere.backend_id(0));
        }
    }
}

#[test]
fn a_new_syn_after_a_closed_flow_starts_a_new_flow() {
    let mut datapath = seeded();
    let request = Spec::tcp(POD, 40_700, "10.96.45.10", 80);
    let run = datapath.run(Hook::Tc, &request.build());
    let ((client, client_port), (backend, backend_port)) = endpoints(&run.output);
    let run = datapath.run(Hook::Tc, &request.fin().build());
    run.assert_outcome(Hook::Tc.forward_code(), Reason::ForwardEstablished, "FIN");
    let answer = request.clone().with_addresses(
        &backend.to_string(),
        backend_port,
        &client.to_string(),
        client_port,
    );
    let run = datapath.run(Hook::Tc, &answer.fin().build());
    run.assert_outcome(Hook::Tc.forward_code(), Reason::ReplyTranslated, "the backend's FIN");
    let run = datapath.run(Hook::Tc, &request.build());
    run.assert_outcome(Hook::Tc.forward_code(), Reason::ForwardNew, "SYN on a closing tuple");
}
