//! Conntrack ageing: the programs and the daemon's collector read the same clock (jiffies) and
//! apply the same timeouts. An entry past its timeout is a new flow to the programs, and the
//! collector deletes exactly such entries; live ones, refreshed or closing, stay. TCP flows are
//! opening (short timeout) until the first packet without SYN or RST, in either direction,
//! ends that state in both their entries; a FIN half-closes a direction, and both FINs or a RST
//! close both entries. The two entries of a flow are refreshed together, and a forward entry
//! whose reply entry the LRU evicted writes it again. When the daemon unprograms a backend of
//! a frontend, the purge takes its sticky clients with it, and its UDP flows once the endpoint
//! no longer serves (found by address, since its backend id may be reused).

use lb_common::{
    conntrack::{
        CLAIMED, OTHER_TIMEOUT_S, TCP_CLOSING_TIMEOUT_S, TCP_OPENING_TIMEOUT_S, TCP_TIMEOUT_S,
        TcpState, tcp_state, twin_key,
    },
    maps::{ConntrackKey, ConntrackValue, ct_flags, proto},
    stats::Reason,
};
use lb_tests::{
    datapath::{Datapath, Hook},
    fixtures::{EXTERNAL_CLIENT, POD, seeded},
    node::NODE_IP,
    packets::{Spec, TcpFields, endpoints},
    services::Frontend,
};
use lb_user::{
    clock, conntrack_gc,
    maps::{KernelMaps, Purged, ip_be},
    reconcile::Forget,
};

/// Every conntrack entry of the flows from `POD:port`, forward and reply.
fn entries_of(maps: &KernelMaps, port: u16) -> Vec<(ConntrackKey, ConntrackValue)> {
    let port_be = port.to_be();
    let mut entries = maps.conntrack().expect("conntrack");
    entries.retain(|(key, _)| key.src_port_be == port_be || key.dst_port_be == port_be);
    entries
}

/// Moves every entry of the flows from `POD:port` `seconds` into the past.
fn age(datapath: &mut Datapath, port: u16, seconds: u64) {
    let maps = datapath.maps();
    for (key, mut value) in entries_of(maps, port) {
        value.last_seen -= clock::seconds_to_jiffies(seconds);
        maps.write_conntrack(&key, &value).expect("ageing an entry");
    }
}

fn send(datapath: &mut Datapath, packet: &Spec) -> Reason {
    send_through(datapath, Hook::Tc, packet).0
}

/// Runs `packet` through `hook`; returns its one reason and the packet as it left.
fn send_through(datapath: &mut Datapath, hook: Hook, packet: &Spec) -> (Reason, Vec<u8>) {
    let run = datapath.run(hook, &packet.build());
    let counted: Vec<_> = run.counted.non_zero().collect();
    assert_eq!(counted.len(), 1, "one reason per packet: {counted:?}");
    let reason = Reason::ALL.iter().copied().find(|r| r.name() == counted[0].0);
    (reason.expect("a known reason"), run.output)
}

/// `packet` with other TCP flags (and no SYN unless `syn`).
fn with_flags(packet: &Spec, syn: bool, rst: bool) -> Spec {
    packet.clone().with_tcp(TcpFields { syn, rst, ack: Some(1), ..TcpFields::default() })
}

/// The reply to `request` from the backend it was sent to, as `output` (the translated
/// request) shows it, with the given flags.
fn reply_to(request: &Spec, output: &[u8], syn: bool, rst: bool) -> Spec {
    with_flags(&answer_to(request, output), syn, rst)
}

/// `request` turned around: from the backend it was sent to, to its client as `output` (the
/// translated request) shows them.
fn answer_to(request: &Spec, output: &[u8]) -> Spec {
    let ((client, client_port), (backend, backend_port)) = endpoints(output);
    request.clone().with_addresses(
        &backend.to_string(),
        backend_port,
        &client.to_string(),
        client_port,
    )
}

/// The entries of the flows on `port`, forward entry first.
fn forward_first(maps: &KernelMaps, port: u16) -> Vec<ConntrackValue> {
    let mut entries = entries_of(maps, port);
    entries.sort_by_key(|(_, value)| value.flags & ct_flags::REPLY);
    entries.into_iter().map(|(_, value)| value).collect()
}

/// Whether each entry of the flows on `port` is opening, forward entry first.
fn opening(maps: &KernelMaps, port: u16) -> Vec<bool> {
    forward_first(maps, port).iter().map(|value| value.opening != 0).collect()
}

#[test]
fn a_udp_flow_quiet_past_its_timeout_is_new_to_the_programs() {
    let mut datapath = seeded();
    let query = Spec::udp(POD, 40_100, "10.96.0.10", 53);
    assert_eq!(send(&mut datapath, &query), Reason::ForwardNew);
    age(&mut datapath, 40_100, OTHER_TIMEOUT_S - 5);
    assert_eq!(send(&mut datapath, &query), Reason::ForwardEstablished, "still inside its timeout");
    age(&mut datapath, 40_100, OTHER_TIMEOUT_S + 5);
    assert_eq!(send(&mut datapath, &query), Reason::ForwardNew, "past its timeout");
}

#[test]
fn the_collector_removes_dead_entries_and_keeps_live_ones() {
    let mut datapath = seeded();
    // A quiet UDP flow past its timeout, a TCP flow closed (both FINs) for longer than the
    // closing timeout, one reset a moment ago, an established one idle for an hour, one
    // half-closed (the client's FIN only) for an hour, and two that never got past their SYN:
    // one for longer than the opening timeout, one for less.
    let udp = Spec::udp(POD, 40_200, "10.96.0.10", 53);
    let syn = |port| Spec::tcp(POD, port, "10.96.45.10", 80);
    assert_eq!(send(&mut datapath, &udp), Reason::ForwardNew);
    let mut requests = Vec::new();
    for port in [40_201, 40_202, 40_203, 40_204, 40_205, 40_206] {
        let (reason, request) = send_through(&mut datapath, Hook::Tc, &syn(port));
        assert_eq!(reason, Reason::ForwardNew);
        requests.push(request);
    }
    for port in [40_201, 40_206] {
        assert_eq!(send(&mut datapath, &syn(port).fin()), Reason::ForwardEstablished);
    }
    let backend_fin = reply_to(&syn(40_201), &requests[0], false, false).fin();
    assert_eq!(send(&mut datapath, &backend_fin), Reason::ReplyTranslated);
    let reset = with_flags(&syn(40_202), false, true);
    assert_eq!(send(&mut datapath, &reset), Reason::ForwardEstablished);
    let ack = with_flags(&syn(40_203), false, false);
    assert_eq!(send(&mut datapath, &ack), Reason::ForwardEstablished);
    age(&mut datapath, 40_200, OTHER_TIMEOUT_S + 1);
    age(&mut datapath, 40_201, TCP_CLOSING_TIMEOUT_S + 1);
    age(&mut datapath, 40_202, 1);
    age(&mut datapath, 40_203, 3600);
    age(&mut datapath, 40_204, TCP_OPENING_TIMEOUT_S + 1);
    age(&mut datapath, 40_205, TCP_OPENING_TIMEOUT_S - 10);
    age(&mut datapath, 40_206, 3600);

    let before = datapath.maps().conntrack().expect("conntrack").len();
    assert_eq!(before, 14, "two entries per flow");
    let now = clock::jiffies_now().expect("jiffies");
    let pass = datapath.collect_conntrack(now);
    let maps = datapath.maps();
    // The UDP flow, the stale opening one and the closed one go whole. The recent opening
    // flow's two entries are counted as opening.
    assert_eq!(pass, conntrack_gc::Pass { scanned: 14, removed: 6, opening: 2 });
    assert!(entries_of(maps, 40_204).is_empty(), "a SYN nobody followed up is gone");
    assert_eq!(opening(maps, 40_205), [true, true], "a SYN of a moment ago is kept");
    assert!(entries_of(maps, 40_200).is_empty(), "the dead UDP flow is gone");
    assert!(entries_of(maps, 40_201).is_empty(), "both FINs: both entries closing, gone");
    assert_eq!(entries_of(maps, 40_202).len(), 2, "reset a moment ago: kept");
    assert_eq!(entries_of(maps, 40_203).len(), 2, "idle an hour: well within six");
    assert_eq!(entries_of(maps, 40_206).len(), 2, "half-closed an hour: well within six");

    let established =
        syn(40_203).with_tcp(TcpFields { syn: false, ack: Some(1), ..TcpFields::default() });
    assert_eq!(send(&mut datapath, &established), Reason::ForwardEstablished);
}

#[test]
fn the_first_packet_without_syn_ends_the_opening_state_of_both_entries() {
    let mut datapath = seeded();
    // Pod to ClusterIP on tc: the client's handshake ACK ends it.
    let syn = Spec::tcp(POD, 40_300, "10.96.45.10", 80);
    let (reason, request) = send_through(&mut datapath, Hook::Tc, &syn);
    assert_eq!(reason, Reason::ForwardNew);
    assert_eq!(opening(datapath.maps(), 40_300), [true, true], "a SYN opens");
    let syn_ack = reply_to(&syn, &request, true, false);
    assert_eq!(send(&mut datapath, &syn_ack), Reason::ReplyTranslated);
    assert_eq!(opening(datapath.maps(), 40_300), [true, true], "a SYN-ACK still opens");
    assert_eq!(send(&mut datapath, &with_flags(&syn, false, false)), Reason::ForwardEstablished);
    assert_eq!(opening(datapath.maps(), 40_300), [false, false], "the ACK established both");

    // The backend speaking first ends it from the reply side.
    let syn = Spec::tcp(POD, 40_301, "10.96.45.10", 80);
    let (_, request) = send_through(&mut datapath, Hook::Tc, &syn);
    let data = reply_to(&syn, &request, false, false);
    assert_eq!(send(&mut datapath, &data), Reason::ReplyTranslated);
    assert_eq!(opening(datapath.maps(), 40_301), [false, false], "established by the reply");

    // A backend's reset ends nothing: the flow never opened.
    let syn = Spec::tcp(POD, 40_302, "10.96.45.10", 80);
    let (_, request) = send_through(&mut datapath, Hook::Tc, &syn);
    let reset = reply_to(&syn, &request, false, true);
    assert_eq!(send(&mut datapath, &reset), Reason::ReplyTranslated);
    assert_eq!(opening(datapath.maps(), 40_302), [true, true], "a reset is not an opening");
}

#[test]
fn a_masqueraded_flow_is_established_in_both_entries_too() {
    let mut datapath = seeded();
    // From outside to NodePort 30380, whose backend is remote: SNAT to the node.
    let syn = Spec::tcp(EXTERNAL_CLIENT, 40_400, NODE_IP, 30_380);
    let (reason, request) = send_through(&mut datapath, Hook::Xdp, &syn);
    assert_eq!(reason, Reason::ForwardNew);
    let ((snat_ip, snat_port), _) = endpoints(&request);
    assert_eq!(snat_ip.to_string(), NODE_IP, "masqueraded");
    let entries = |datapath: &mut Datapath| {
        let mut flags: Vec<_> = datapath
            .maps()
            .conntrack()
            .expect("conntrack")
            .into_iter()
            .filter(|(key, _)| {
                key.src_port_be == 40_400u16.to_be() || key.dst_port_be == snat_port.to_be()
            })
            .map(|(_, value)| (value.flags & ct_flags::REPLY != 0, value.opening != 0))
            .collect();
        flags.sort_unstable();
        flags
    };
    assert_eq!(entries(&mut datapath), [(false, true), (true, true)], "both opening");
    let ack = with_flags(&syn, false, false);
    assert_eq!(send_through(&mut datapath, Hook::Xdp, &ack).0, Reason::ForwardEstablished);
    assert_eq!(entries(&mut datapath), [(false, false), (true, false)], "both established");
}

#[test]
fn the_answer_to_a_syn_retransmitted_for_a_minute_is_still_translated() {
    let mut datapath = seeded();
    let syn = Spec::tcp(POD, 40_500, "10.96.45.10", 80);
    let (reason, request) = send_through(&mut datapath, Hook::Tc, &syn);
    assert_eq!(reason, Reason::ForwardNew);
    // Linux's last SYN retransmission, 63 s after the first: it refreshes the forward entry
    // only; the backend's answer must still find the reply entry.
    age(&mut datapath, 40_500, 63);
    assert_eq!(send(&mut datapath, &syn), Reason::ForwardEstablished, "the retransmitted SYN");
    let syn_ack = reply_to(&syn, &request, true, false);
    assert_eq!(send(&mut datapath, &syn_ack), Reason::ReplyTranslated, "its late answer");
}

#[test]
fn an_entry_an_earlier_version_marked_closing_stays_closing() {
    let mut datapath = seeded();
    let syn = Spec::tcp(POD, 40_500, "10.96.45.10", 80);
    assert_eq!(send(&mut datapath, &syn), Reason::ForwardNew);
    assert_eq!(send(&mut datapath, &with_flags(&syn, false, false)), Reason::ForwardEstablished);
    // What versions before the state bytes wrote at a FIN: a flag bit.
    let maps = datapath.maps();
    for (key, mut value) in entries_of(maps, 40_500) {
        value.flags |= ct_flags::CLOSING;
        maps.write_conntrack(&key, &value).expect("marking an entry closing");
    }
    assert_eq!(send(&mut datapath, &syn), Reason::ForwardNew, "a SYN on a closing tuple is new");
}

#[test]
fn an_entry_an_earlier_version_marked_opening_stays_opening_until_its_handshake_ends() {
    let mut datapath = seeded();
    let syn = |port| Spec::tcp(POD, port, "10.96.45.10", 80);
    // What versions before the state bytes wrote at a SYN: a flag bit, and a zero byte.
    for port in [40_600, 40_601] {
        assert_eq!(send(&mut datapath, &syn(port)), Reason::ForwardNew);
        let maps = datapath.maps();
        for (key, mut value) in entries_of(maps, port) {
            value.opening = 0;
            value.flags |= ct_flags::OPENING;
            maps.write_conntrack(&key, &value).expect("marking an entry opening the old way");
        }
    }
    // A SYN nobody followed up goes after the opening timeout, not after six hours.
    age(&mut datapath, 40_600, TCP_OPENING_TIMEOUT_S + 1);
    let now = clock::jiffies_now().expect("jiffies");
    let pass = datapath.collect_conntrack(now);
    let maps = datapath.maps();
    assert_eq!(pass, conntrack_gc::Pass { scanned: 4, removed: 2, opening: 2 });
    assert!(entries_of(maps, 40_600).is_empty(), "a stale half-open flow is gone");

    // The handshake's last ACK establishes both entries, bit and byte.
    assert_eq!(
        send(&mut datapath, &with_flags(&syn(40_601), false, false)),
        Reason::ForwardEstablished
    );
    let states: Vec<_> = entries_of(datapath.maps(), 40_601)
        .iter()
        .map(|(_, value)| (value.opening, value.flags & ct_flags::OPENING))
        .collect();
    assert_eq!(states, [(0, 0), (0, 0)], "established");
}

/// What a reconcile hands the purge when the backends of these flows (forward entries) left
/// their frontends and no longer serve: the pairs' sticky clients, and the flows by address.
fn removed(flows: &[ConntrackValue]) -> Forget {
    Forget {
        affinities: flows.iter().map(|value| (value.service_id, value.backend_id)).collect(),
        flows: flows
            .iter()
            .map(|value| (value.service_id, (value.translated_ip_be, value.translated_port_be)))
            .collect(),
    }
}

#[test]
fn an_unprogrammed_backend_loses_its_udp_flows_and_its_sticky_clients_keeps_its_tcp_flows() {
    let mut datapath = seeded();
    // A DNS query (frontend 2), and a connection to the ClientIP-affinity frontend 12.
    assert_eq!(send(&mut datapath, &Spec::udp(POD, 40_700, "10.96.0.10", 53)), Reason::ForwardNew);
    let syn = Spec::tcp(POD, 40_701, "10.96.45.11", 80);
    assert_eq!(send(&mut datapath, &syn), Reason::ForwardNew);
    let forward_of = |maps: &KernelMaps, port| {
        let entries = entries_of(maps, port);
        entries.into_iter().map(|(_, value)| value).find(|value| value.flags & ct_flags::REPLY == 0)
    };
    let maps = datapath.maps();
    let (udp, tcp) = (forward_of(maps, 40_700), forward_of(maps, 40_701));
    let (Some(udp), Some(tcp)) = (udp, tcp) else {
        panic!("both flows are tracked: {udp:?} {tcp:?}");
    };
    let sticky = |maps: &KernelMaps| -> Vec<(u32, u32)> {
        let affinities = maps.affinities().expect("affinity entries");
        affinities.iter().map(|(key, value)| (key.service_id, value.backend_id)).collect()
    };
    assert_eq!(sticky(maps), [(tcp.service_id, tcp.backend_id)], "the client sticks to it");

    // Other frontends' pairs touch nothing, the flows' own backend ids included: an id may
    // name another endpoint by now, and only the address counts for flows.
    let elsewhere =
        |value: ConntrackValue| ConntrackValue { service_id: value.service_id + 1000, ..value };
    let purged = maps.purge(&removed(&[elsewhere(udp), elsewhere(tcp)])).expect("purging");
    assert_eq!(purged, Purged::default());
    let other_endpoint = ConntrackValue { translated_port_be: 9u16.to_be(), ..udp };
    let mut by_id_only = removed(&[other_endpoint]);
    by_id_only.affinities.clear();
    assert_eq!(maps.purge(&by_id_only).expect("purging"), Purged::default());

    let purged = maps.purge(&removed(&[udp, tcp])).expect("purging");
    assert_eq!(purged, Purged { flows: 2, affinities: 1 }, "both entries of the UDP flow");
    assert!(entries_of(maps, 40_700).is_empty(), "the UDP flow moves to a live backend");
    assert_eq!(entries_of(maps, 40_701).len(), 2, "the TCP connection may still finish");
    assert!(sticky(maps).is_empty(), "no client sticks to a backend its service no longer has");
}

/// The TCP state of each entry of the flows on `port`, forward entry first.
fn states(maps: &KernelMaps, port: u16) -> Vec<TcpState> {
    forward_first(maps, port).iter().map(tcp_state).collect()
}

#[test]
fn a_fin_half_closes_and_both_fins_or_a_reset_close_both_entries() {
    use TcpState::{Closing, Established, HalfClosed};
    let mut datapath = seeded();
    let open = |datapath: &mut Datapath, port| {
        let syn = Spec::tcp(POD, port, "10.96.45.10", 80);
        let (_, request) = send_through(datapath, Hook::Tc, &syn);
        assert_eq!(send(datapath, &with_flags(&syn, false, false)), Reason::ForwardEstablished);
        (syn, request)
    };
    // The client shuts down its side; the backend goes on answering for as long as it likes.
    let (syn, request) = open(&mut datapath, 40_800);
    assert_eq!(send(&mut datapath, &syn.fin()), Reason::ForwardEstablished);
    assert_eq!(states(datapath.maps(), 40_800), [HalfClosed, Established]);
    let answer = reply_to(&syn, &request, false, false);
    assert_eq!(send(&mut datapath, &answer), Reason::ReplyTranslated);
    assert_eq!(states(datapath.maps(), 40_800), [HalfClosed, Established], "still half-closed");
    // Its FIN closes both entries.
    assert_eq!(send(&mut datapath, &answer.fin()), Reason::ReplyTranslated);
    assert_eq!(states(datapath.maps(), 40_800), [Closing, Closing]);

    // A reset from either side closes both at once.
    let (syn, request) = open(&mut datapath, 40_801);
    let reset = reply_to(&syn, &request, false, true);
    assert_eq!(send(&mut datapath, &reset), Reason::ReplyTranslated);
    assert_eq!(states(datapath.maps(), 40_801), [Closing, Closing]);

    // Both FINs seen on two CPUs at once leave both entries half-closed: the next packet
    // closes them.
    let (syn, _) = open(&mut datapath, 40_802);
    let maps = datapath.maps();
    for (key, mut value) in entries_of(maps, 40_802) {
        value.closing = lb_common::maps::closing::HALF_CLOSED;
        maps.write_conntrack(&key, &value).expect("half-closing an entry");
    }
    assert_eq!(send(&mut datapath, &with_flags(&syn, false, false)), Reason::ForwardEstablished);
    assert_eq!(states(datapath.maps(), 40_802), [Closing, Closing]);
}

#[test]
fn a_flow_first_seen_at_a_reset_is_closing_and_at_an_ack_opening() {
    let mut datapath = seeded();
    let stray = Spec::tcp(POD, 40_810, "10.96.45.10", 80);
    assert_eq!(send(&mut datapath, &with_flags(&stray, false, true)), Reason::ForwardNew);
    assert_eq!(states(datapath.maps(), 40_810), [TcpState::Closing, TcpState::Closing]);
    let picked_up = Spec::tcp(POD, 40_811, "10.96.45.10", 80);
    assert_eq!(send(&mut datapath, &with_flags(&picked_up, false, false)), Reason::ForwardNew);
    assert_eq!(states(datapath.maps(), 40_811), [TcpState::Opening, TcpState::Opening]);
    // Its next packet shows the connection is there: established, as one a SYN opened.
    let next = with_flags(&picked_up, false, false);
    assert_eq!(send(&mut datapath, &next), Reason::ForwardEstablished);
    assert_eq!(states(datapath.maps(), 40_811), [TcpState::Established, TcpState::Established]);
}

/// The collector deletes through the kernel's `lb_reap`, which deletes an entry only if it is
/// still expired there: not one a packet refreshed since the collector's walk, nor one a new
/// flow is taking over (claimed), whose delete would free its tuple for a third flow.
#[test]
fn the_reaper_deletes_only_what_is_still_expired() {
    let mut datapath = seeded();
    let key = |port: u16| {
        let (pod, vip) = (POD.parse().expect("address"), "10.96.0.10".parse().expect("address"));
        ConntrackKey::new(ip_be(pod), ip_be(vip), port.to_be(), 53u16.to_be(), proto::UDP)
    };
    let now = clock::jiffies_now().expect("jiffies");
    let expired = now - clock::seconds_to_jiffies(OTHER_TIMEOUT_S + 5);
    let maps = datapath.maps();
    for (port, last_seen) in [(41_001, expired), (41_002, now), (41_003, CLAIMED)] {
        let value = ConntrackValue { last_seen, ..ConntrackValue::default() };
        maps.write_conntrack(&key(port), &value).expect("an entry");
    }
    let reaper = datapath.reaper();
    let removed = [41_001, 41_002, 41_003, 41_004]
        .map(|port| reaper.remove_if_expired(&key(port)).expect("running the reaper"));
    assert_eq!(removed, [true, false, false, false], "expired, live, claimed, absent");
    let left: Vec<bool> = [41_001, 41_002, 41_003]
        .iter()
        .map(|&port| datapath.maps().conntrack_entry(&key(port)).expect("read").is_some())
        .collect();
    assert_eq!(left, [false, true, true]);
}

/// A FIN after a long quiet spell refreshes both entries, as any packet does. The reply entry,
/// left behind, would expire first: the backend's answers to the half-closed connection would
/// go untranslated, and the reply tuple to a new flow.
#[test]
fn a_fin_after_a_quiet_spell_refreshes_both_entries() {
    let mut datapath = seeded();
    let syn = Spec::tcp(POD, 40_830, "10.96.45.10", 80);
    let (_, request) = send_through(&mut datapath, Hook::Tc, &syn);
    assert_eq!(send(&mut datapath, &with_flags(&syn, false, false)), Reason::ForwardEstablished);
    age(&mut datapath, 40_830, TCP_TIMEOUT_S - 5);
    assert_eq!(send(&mut datapath, &syn.fin()), Reason::ForwardEstablished);
    age(&mut datapath, 40_830, 10);
    let answer = reply_to(&syn, &request, false, false);
    assert_eq!(send(&mut datapath, &answer), Reason::ReplyTranslated, "its reply entry lives");
}

#[test]
fn the_two_entries_of_a_flow_age_together() {
    // A one-way UDP stream: only the forward entry sees packets, and its reply entry, which
    // would hold a SNAT port, must live as long.
    let mut datapath = seeded();
    let datagram = Spec::udp(POD, 40_820, "10.96.0.10", 53);
    assert_eq!(send(&mut datapath, &datagram), Reason::ForwardNew);
    age(&mut datapath, 40_820, OTHER_TIMEOUT_S - 5);
    assert_eq!(send(&mut datapath, &datagram), Reason::ForwardEstablished);
    age(&mut datapath, 40_820, 10);
    let now = clock::jiffies_now().expect("jiffies");
    datapath.collect_conntrack(now);
    assert_eq!(entries_of(datapath.maps(), 40_820).len(), 2, "both refreshed 10 s ago");
}

/// The forward entry's key of `packet`'s flow, and the entry.
fn forward_entry(
    maps: &KernelMaps,
    packet: &Spec,
    proto_number: u8,
) -> (ConntrackKey, ConntrackValue) {
    let ((src, src_port), (dst, dst_port)) = endpoints(&packet.build());
    let key =
        ConntrackKey::new(ip_be(src), ip_be(dst), src_port.to_be(), dst_port.to_be(), proto_number);
    let entry = maps.conntrack_entry(&key).expect("lookup");
    (key, entry.expect("the flow's forward entry"))
}

/// Moves the forward entry of `packet`'s flow `seconds` into the past.
fn age_forward(datapath: &mut Datapath, packet: &Spec, proto_number: u8, seconds: u64) {
    let (key, mut value) = forward_entry(datapath.maps(), packet, proto_number);
    value.last_seen -= clock::seconds_to_jiffies(seconds);
    datapath.maps().write_conntrack(&key, &value).expect("ageing an entry");
}

/// A pod asks two frontends of one backend (UDP 53 at 10.244.1.15) from one socket.
fn two_frontends_of_one_backend(datapath: &mut Datapath) -> [&'static str; 2] {
    let vips = ["10.96.9.1", "10.96.9.2"];
    for (id, vip) in [(901, vips[0]), (902, vips[1])] {
        datapath
            .apply(&Frontend::new(id, vip, 53, proto::UDP).backend("10.244.1.15", 53, true).ops());
    }
    vips
}

/// The SYNs of two TCP flows, from `port` and the next one: pod to ClusterIP, and from outside
/// to NodePort 30380 (remote backend: masqueraded).
fn two_tcp_flows(port: u16) -> [(Hook, Spec); 2] {
    [
        (Hook::Tc, Spec::tcp(POD, port, "10.96.45.10", 80)),
        (Hook::Xdp, Spec::tcp(EXTERNAL_CLIENT, port + 1, NODE_IP, 30_380)),
    ]
}

/// Opens the flow of `syn` and ends its handshake; returns the SYN as translated, and the ACK.
fn establish(datapath: &mut Datapath, hook: Hook, syn: &Spec) -> (Vec<u8>, Spec) {
    let (_, request) = send_through(datapath, hook, syn);
    let ack = with_flags(syn, false, false);
    assert_eq!(send_through(datapath, hook, &ack).0, Reason::ForwardEstablished);
    (request, ack)
}

/// A full map's LRU evicts one entry at a time, and may take one half of a live flow. A flow
/// whose reply entry went writes it again, the same as its first packet wrote it, at its next
/// forward packet a second on: its replies are translated again.
#[test]
fn a_flow_whose_reply_entry_was_evicted_writes_it_again() {
    let mut datapath = seeded();
    for (hook, syn) in two_tcp_flows(40_900) {
        let (request, ack) = establish(&mut datapath, hook, &syn);
        let answer = reply_to(&syn, &request, false, false);
        evict_reply_entry_then_resend(&mut datapath, hook, &ack, proto::TCP, &answer);
    }
    // UDP, and the second flow of one client socket to two frontends of one backend: its
    // reply tuple held by the first, it has a new source port, its address kept.
    for (vip, masqueraded) in
        two_frontends_of_one_backend(&mut datapath).into_iter().zip([false, true])
    {
        let query = Spec::udp(POD, 40_902, vip, 53);
        let (reason, request) = send_through(&mut datapath, Hook::Tc, &query);
        assert_eq!(reason, Reason::ForwardNew, "{vip}");
        let (_, forward) = forward_entry(datapath.maps(), &query, proto::UDP);
        assert_eq!(forward.flags & ct_flags::SNAT != 0, masqueraded, "{vip}");
        let answer = answer_to(&query, &request);
        evict_reply_entry_then_resend(&mut datapath, Hook::Tc, &query, proto::UDP, &answer);
    }
}

/// Removes the reply entry of `packet`'s established flow, then sends `packet` a few seconds
/// on: the entry must be back as it was, and `answer` translated.
fn evict_reply_entry_then_resend(
    datapath: &mut Datapath,
    hook: Hook,
    packet: &Spec,
    proto_number: u8,
    answer: &Spec,
) {
    let (key, forward) = forward_entry(datapath.maps(), packet, proto_number);
    let reply_key = twin_key(&key, &forward);
    let reply = datapath.maps().conntrack_entry(&reply_key).expect("lookup");
    let reply = reply.expect("the reply entry");
    let removed = datapath.maps().remove_conntrack(&[reply_key]).expect("evicting");
    assert_eq!(removed, 1, "{key:?}: its reply entry evicted");
    age_forward(datapath, packet, proto_number, 5);

    assert_eq!(send_through(datapath, hook, packet).0, Reason::ForwardEstablished, "{key:?}");
    let restored = datapath.maps().conntrack_entry(&reply_key).expect("lookup");
    let restored = restored.unwrap_or_else(|| panic!("{key:?}: no reply entry written"));
    let content = |value: ConntrackValue| ConntrackValue { last_seen: 0, ..value };
    assert_eq!(content(restored), content(reply), "{key:?}: the entry its first packet wrote");
    assert_eq!(send_through(datapath, hook, answer).0, Reason::ReplyTranslated, "{key:?}: answer");
}

/// A flow whose reply entry went, and whose reply tuple another flow took since (a masqueraded
/// flow's port handed to a new flow), is forgotten at its next packet a second on: its next one
/// opens it anew on a source port of its own, rather than reach the backend on the other
/// flow's connection.
#[test]
fn a_flow_whose_reply_tuple_another_flow_took_is_opened_anew() {
    let mut datapath = seeded();
    for (hook, syn) in two_tcp_flows(40_910) {
        let (request, ack) = establish(&mut datapath, hook, &syn);
        let (key, forward) = forward_entry(datapath.maps(), &ack, proto::TCP);
        let reply_key = twin_key(&key, &forward);
        let reply = datapath.maps().conntrack_entry(&reply_key).expect("lookup");
        // Another flow's: replies from another frontend.
        let theirs =
            ConntrackValue { translated_port_be: 8080u16.to_be(), ..reply.expect("reply entry") };
        datapath.maps().write_conntrack(&reply_key, &theirs).expect("another flow's entry");
        age_forward(&mut datapath, &ack, proto::TCP, 5);

        let (reason, _) = send_through(&mut datapath, hook, &ack);
        assert_eq!(reason, Reason::ForwardEstablished, "{key:?}: this one as before");
        let maps = datapath.maps();
        let now = clock::jiffies_now().expect("jiffies");
        let forgotten = maps.conntrack_entry(&key).expect("lookup").expect("left to the collector");
        let age = now - forgotten.last_seen;
        assert!(age > clock::seconds_to_jiffies(TCP_TIMEOUT_S), "{key:?}: expired, {age} jiffies");
        let left = maps.conntrack_entry(&reply_key).expect("lookup");
        assert_eq!(left, Some(theirs), "{key:?}: theirs as it was");
        let (reason, anew) = send_through(&mut datapath, hook, &ack);
        assert_eq!(reason, Reason::ForwardNew, "{key:?}");
        let ((was_ip, was_port), _) = endpoints(&request);
        let ((source_ip, source_port), _) = endpoints(&anew);
        assert_eq!(source_ip, was_ip, "{key:?}: from the same address");
        assert_ne!(source_port, was_port, "{key:?}: on a port of its own: the tuple is theirs");
    }
}
