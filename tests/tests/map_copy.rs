//! The two passes that carry a map's entries into its resized successor (`lb_user::maps::copy`),
//! on real pinned maps: the first copies what the old map holds (live conntrack entries only),
//! the second what the old programs changed since, without undoing what the new programs did
//! and without copying half a flow.

use aya::maps::{Map, MapData, PerCpuArray, PerCpuValues};
use lb_common::maps::{ConntrackKey, ConntrackValue, ServiceCounters, ct_flags, names, proto};
use lb_tests::pins::TestPins;
use lb_user::{
    clock,
    loader::{self, Capacities},
    maps::{
        KernelMaps,
        copy::{Copied, copy_all, copy_changes},
    },
};

/// A datapath's maps pinned under `pins`, of the given conntrack size.
fn pinned_maps(pins: &TestPins, conntrack: u32) -> KernelMaps {
    let capacities = Capacities { conntrack: Some(conntrack), ..Capacities::default() };
    drop(loader::load_pinned(pins.layout(), &capacities).expect("loading with pinned maps"));
    KernelMaps::from_pins(pins.layout()).expect("the pinned maps")
}

fn key(src: u32, src_port: u16, dst: u32, dst_port: u16) -> ConntrackKey {
    ConntrackKey {
        src_ip_be: src.to_be(),
        dst_ip_be: dst.to_be(),
        src_port_be: src_port.to_be(),
        dst_port_be: dst_port.to_be(),
        proto: proto::TCP,
        pad: [0; 3],
    }
}

/// The forward and reply entries of a flow from `client:port` to VIP 10.96.0.1:80 on backend
/// 10.244.0.`backend`:8080, seen at `now`.
fn flow(port: u16, backend: u32, now: u64) -> [(ConntrackKey, ConntrackValue); 2] {
    let (client, vip, backend_ip): (u32, u32, u32) =
        (0x0af4_0105, 0x0a60_0001, 0x0af4_0000 + backend);
    let forward = ConntrackValue {
        last_seen: now,
        backend_id: backend,
        service_id: 1,
        translated_ip_be: backend_ip.to_be(),
        translated_port_be: 8080u16.to_be(),
        ..ConntrackValue::default()
    };
    let reply = ConntrackValue {
        flags: ct_flags::REPLY,
        translated_ip_be: vip.to_be(),
        translated_port_be: 80u16.to_be(),
        ..forward
    };
    [(key(client, port, vip, 80), forward), (key(backend_ip, 8080, client, port), reply)]
}

fn write(maps: &mut KernelMaps, entries: &[(ConntrackKey, ConntrackValue)]) {
    for (key, value) in entries {
        maps.write_conntrack(key, value).expect("writing a conntrack entry");
    }
}

fn entry(maps: &KernelMaps, key: &ConntrackKey) -> Option<ConntrackValue> {
    maps.conntrack_entry(key).expect("reading a conntrack entry")
}

#[test]
fn the_second_pass_carries_what_the_old_programs_changed_and_keeps_what_the_new_ones_did() {
    let (old_pins, new_pins) = (TestPins::new(), TestPins::new());
    let (mut old, mut new) = (pinned_maps(&old_pins, 1_024), pinned_maps(&new_pins, 4_096));
    let (from, to) =
        (old_pins.layout().map(names::CONNTRACK), new_pins.layout().map(names::CONNTRACK));
    let now = clock::jiffies_now().expect("the clock");
    let opening = flow(40_000, 1, now).map(|(k, v)| (k, ConntrackValue { opening: 1, ..v }));
    let dead = flow(40_001, 1, now - clock::seconds_to_jiffies(7 * 3600));
    let refreshed = flow(40_004, 4, now);
    write(&mut old, &[opening, dead, refreshed].concat());

    let (copied, read) = copy_all(names::CONNTRACK, &from, &to).expect("the first pass");
    assert_eq!(copied, 4, "the live flows' entries, not the dead flow's");
    assert!(entry(&new, &dead[0].0).is_none(), "dead entries stay behind");

    // Meanwhile the old programs see the handshake end, refresh a flow, and open two flows;
    // the new programs give the reply tuple of one of them to a flow of their own.
    write(&mut old, &opening.map(|(k, v)| (k, ConntrackValue { opening: 0, ..v })));
    write(&mut old, &refreshed.map(|(k, v)| (k, ConntrackValue { last_seen: now + 100, ..v })));
    let (opened, clashing) = (flow(40_002, 2, now), flow(40_003, 3, now));
    write(&mut old, &[opened, clashing].concat());
    let theirs = ConntrackValue { backend_id: 9, ..clashing[1].1 };
    write(&mut new, &[(clashing[1].0, theirs)]);

    let late = copy_changes(names::CONNTRACK, &from, &to, &read).expect("the second pass");
    assert_eq!(late, 4, "two changed entries and one new flow's two; a refresh is not a change");
    for (key, value) in opening.map(|(k, v)| (k, ConntrackValue { opening: 0, ..v })) {
        assert_eq!(entry(&new, &key), Some(value), "the end of the handshake carried over");
    }
    for (key, value) in opened {
        assert_eq!(entry(&new, &key), Some(value), "a flow opened during the copy carried over");
    }
    assert_eq!(entry(&new, &clashing[1].0), Some(theirs), "the new programs' entry stays");
    assert!(entry(&new, &clashing[0].0).is_none(), "and the other half of the clash is left out");
}

#[test]
fn counts_made_during_the_copy_add_to_the_new_maps_own() {
    let (old_pins, new_pins) = (TestPins::new(), TestPins::new());
    let (_old, new) = (pinned_maps(&old_pins, 1_024), pinned_maps(&new_pins, 1_024));
    let (from, to) =
        (old_pins.layout().map(names::SERVICE_STATS), new_pins.layout().map(names::SERVICE_STATS));
    let counters = |pin| {
        let data = MapData::from_pin(pin).expect("the counters map");
        PerCpuArray::<_, ServiceCounters>::try_from(Map::PerCpuArray(data)).expect("per-CPU")
    };
    let cpus = aya::util::nr_cpus().expect("CPU count").get() as usize;
    let set = |pin, packets: u64| {
        let values = vec![ServiceCounters { packets, bytes: 100 * packets }; cpus];
        let values = PerCpuValues::try_from(values).expect("one value a CPU");
        counters(pin).set(3, values, 0).expect("setting counters");
    };
    set(&from, 10);
    let (copied, read) = copy_all(names::SERVICE_STATS, &from, &to).expect("the first pass");
    assert_eq!(copied, 1);
    assert!(matches!(read, Copied::Counters(_)));
    set(&from, 15);
    set(&to, 12);
    copy_changes(names::SERVICE_STATS, &from, &to, &read).expect("the second pass");
    let total = new.service_counters(3).expect("reading counters");
    assert_eq!(total.packets, 17 * cpus as u64, "12 copied and counted anew, 5 counted meanwhile");
}
