//! Conntrack ageing: the programs and the daemon's collector read the same clock (jiffies) and
//! apply the same timeouts. An entry past its timeout is a new flow to the programs, and the
//! collector deletes exactly such entries; live ones, refreshed or closing, stay.

use lb_common::{
    conntrack::{OTHER_TIMEOUT_S, TCP_CLOSING_TIMEOUT_S},
    maps::{ConntrackKey, ConntrackValue, ct_flags},
    stats::Reason,
};
use lb_tests::{
    datapath::{Datapath, Hook},
    fixtures::{POD, seeded},
    packets::{Spec, TcpFields},
};
use lb_user::{clock, conntrack_gc, maps::KernelMaps};

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
    let run = datapath.run(Hook::Tc, &packet.build());
    let counted: Vec<_> = run.counted.non_zero().collect();
    assert_eq!(counted.len(), 1, "one reason per packet: {counted:?}");
    Reason::ALL.iter().copied().find(|r| r.name() == counted[0].0).expect("a known reason")
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
    // A quiet UDP flow past its timeout, a TCP flow closing for longer than the closing
    // timeout, one that closed a moment ago, and an established one idle for an hour.
    let udp = Spec::udp(POD, 40_200, "10.96.0.10", 53);
    let syn = |port| Spec::tcp(POD, port, "10.96.45.10", 80);
    let fin = |port| {
        syn(port).with_tcp(TcpFields {
            syn: false,
            fin: true,
            ack: Some(1),
            ..TcpFields::default()
        })
    };
    assert_eq!(send(&mut datapath, &udp), Reason::ForwardNew);
    for port in [40_201, 40_202, 40_203] {
        assert_eq!(send(&mut datapath, &syn(port)), Reason::ForwardNew);
    }
    for port in [40_201, 40_202] {
        assert_eq!(send(&mut datapath, &fin(port)), Reason::ForwardEstablished);
    }
    age(&mut datapath, 40_200, OTHER_TIMEOUT_S + 1);
    age(&mut datapath, 40_201, TCP_CLOSING_TIMEOUT_S + 1);
    age(&mut datapath, 40_202, 1);
    age(&mut datapath, 40_203, 3600);

    let maps = datapath.maps();
    let before = maps.conntrack().expect("conntrack").len();
    assert_eq!(before, 8, "two entries per flow");
    let now = clock::jiffies_now().expect("jiffies");
    let pass = conntrack_gc::collect(maps, now).expect("collecting");
    // The UDP flow goes whole; of the closing flow only the forward entry had seen the FIN.
    assert_eq!(pass, conntrack_gc::Pass { scanned: 8, removed: 3 });
    assert!(entries_of(maps, 40_200).is_empty(), "the dead UDP flow is gone");
    let closing: Vec<_> = entries_of(maps, 40_201);
    assert_eq!(closing.len(), 1, "{closing:?}");
    assert!(closing[0].1.flags & ct_flags::REPLY != 0, "the reply entry, not closing, stays");
    assert_eq!(entries_of(maps, 40_202).len(), 2, "closed a moment ago: kept");
    assert_eq!(entries_of(maps, 40_203).len(), 2, "idle an hour: well within six");

    let established =
        syn(40_203).with_tcp(TcpFields { syn: false, ack: Some(1), ..TcpFields::default() });
    assert_eq!(send(&mut datapath, &established), Reason::ForwardEstablished);
}
