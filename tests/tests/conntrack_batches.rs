//! The conntrack map is read and cleared in batches: a walk returns exactly what the map holds,
//! however its buckets fall across the calls, and a batched removal skips keys already gone.
//!
//! The map is made smaller than the default (64Ki buckets for 50k entries), so that many
//! buckets hold several entries.

use std::{
    collections::HashMap,
    os::fd::{AsFd as _, OwnedFd},
};

use aya::{Ebpf, maps::Map};
use lb_common::maps::{ConntrackKey, ConntrackValue, names, proto};
use lb_tests::node;
use lb_user::{
    clock, conntrack_gc,
    loader::{self, Capacities},
    map_batch,
    maps::{KernelMaps, MapWriter as _},
};

const CAPACITY: u32 = 65_536;
const ENTRIES: u32 = 50_000;

/// Private maps with a small conntrack map, a second descriptor of that map for the
/// wrapper-level calls, and the programs (the collector's reaper among them). All close when
/// dropped, which frees the maps.
fn small_conntrack() -> (KernelMaps, OwnedFd, Ebpf) {
    let capacities = Capacities { conntrack: Some(CAPACITY), ..Capacities::default() };
    let mut ebpf = loader::load_private_with(&capacities)
        .unwrap_or_else(|e| panic!("loading the programs (root and BTF needed): {e:?}"));
    let fd = match ebpf.map(names::CONNTRACK) {
        Some(Map::LruHashMap(data)) => data.fd().as_fd().try_clone_to_owned().expect("dup"),
        other => panic!("CONNTRACK is not an LRU hash map: {other:?}"),
    };
    let mut maps = KernelMaps::take_from(&mut ebpf).expect("datapath maps");
    // The collector's reaper judges expiry by the node's tick rate, as the programs do.
    maps.apply(&node::set_node_config()).expect("the node configuration");
    (maps, fd, ebpf)
}

/// Flow `n`'s forward key; keys past [`ENTRIES`] are never written.
fn key(n: u32) -> ConntrackKey {
    ConntrackKey {
        src_ip_be: (0x0a00_0000 + n).to_be(),
        dst_ip_be: 0x0a60_000a_u32.to_be(),
        src_port_be: u16::try_from(30_000 + n % 20_000).expect("port").to_be(),
        dst_port_be: 53u16.to_be(),
        proto: if n.is_multiple_of(2) { proto::UDP } else { proto::TCP },
        pad: [0; 3],
    }
}

/// A value that names its flow, so that a value read under the wrong key shows.
fn value(n: u32, last_seen: u64) -> ConntrackValue {
    ConntrackValue {
        last_seen,
        backend_id: n,
        service_id: n / 7,
        translated_ip_be: (0x0af4_0000 + n).to_be(),
        ..ConntrackValue::default()
    }
}

/// Writes flows `0..count`, `last_seen(n)` apiece; returns what the map should hold.
fn fill(
    fd: &OwnedFd,
    count: u32,
    last_seen: impl Fn(u32) -> u64,
) -> HashMap<ConntrackKey, ConntrackValue> {
    let written: HashMap<_, _> = (0..count).map(|n| (key(n), value(n, last_seen(n)))).collect();
    let (keys, values): (Vec<_>, Vec<_>) = written.iter().map(|(k, v)| (*k, *v)).unzip();
    map_batch::update(fd.as_fd(), &keys, &values).expect("filling the conntrack map");
    written
}

/// The walk as a map, checking that no entry came twice.
fn as_map(entries: Vec<(ConntrackKey, ConntrackValue)>) -> HashMap<ConntrackKey, ConntrackValue> {
    let count = entries.len();
    let map: HashMap<_, _> = entries.into_iter().collect();
    assert_eq!(map.len(), count, "an entry was read twice");
    map
}

#[test]
fn a_walk_returns_exactly_the_entries_written() {
    let (maps, fd, _programs) = small_conntrack();
    let written = fill(&fd, ENTRIES, |_| 1);

    let walked = as_map(maps.conntrack().expect("walking the conntrack map"));
    assert_eq!(walked.len(), written.len());
    assert!(walked == written, "the walk differs from what was written");

    // One entry of room a call: every bucket holding several entries refuses it at first, and
    // the walk must grow its room rather than skip or repeat that bucket.
    let (keys, values) = map_batch::lookup::<ConntrackKey, ConntrackValue>(fd.as_fd(), 1)
        .expect("walking one entry a call");
    let walked = as_map(keys.into_iter().zip(values).collect());
    assert!(walked == written, "the walk with growing room differs from what was written");
}

#[test]
fn a_batched_removal_removes_exactly_the_present_keys() {
    let (mut maps, fd, _programs) = small_conntrack();
    let present = 10_000;
    let written = fill(&fd, present, |_| 1);

    // Every even flow, with missing keys around them: at the start, in runs, alone, at the
    // end, and a key listed twice (gone by its second turn).
    let missing = |n: u32| key(ENTRIES + n);
    let mut doomed: Vec<ConntrackKey> = (0..3).map(missing).collect();
    for n in (0..present).step_by(2) {
        doomed.push(key(n));
        if n.is_multiple_of(100) {
            doomed.extend((0..n % 7).map(|i| missing(n + i)));
        }
        if n == 5_000 {
            doomed.push(key(0));
        }
    }
    doomed.push(missing(present));

    let removed = maps.remove_conntrack(&doomed).expect("removing in batches");
    assert_eq!(removed, present as usize / 2, "only the even flows were there");
    let left = as_map(maps.conntrack().expect("walking the conntrack map"));
    let odd: HashMap<_, _> = written.into_iter().filter(|(_, v)| v.backend_id % 2 == 1).collect();
    assert!(left == odd, "exactly the odd flows stay");
    assert_eq!(
        maps.remove_conntrack(&doomed).expect("removing again"),
        0,
        "nothing left to remove"
    );
}

#[test]
fn the_collector_removes_exactly_the_dead_among_many() {
    let (maps, fd, ebpf) = small_conntrack();
    let now = clock::jiffies_now().expect("jiffies");
    // Every fifth flow quiet for two hours: dead if UDP (a minute), alive if TCP (six hours).
    let quiet = now - clock::seconds_to_jiffies(7_200);
    let written = fill(&fd, ENTRIES, |n| if n.is_multiple_of(5) { quiet } else { now });

    let reaper = conntrack_gc::Reaper::of(&ebpf).expect("the reaper program");
    let pass = conntrack_gc::collect(&maps, &reaper, now).expect("collecting");
    let dead = |k: &ConntrackKey, v: &ConntrackValue| v.last_seen == quiet && k.proto == proto::UDP;
    let expected_dead = written.iter().filter(|(k, v)| dead(k, v)).count();
    assert_eq!(
        pass,
        conntrack_gc::Pass { scanned: ENTRIES as usize, removed: expected_dead, opening: 0 },
        "every flow scanned, the quiet UDP ones removed"
    );
    let left = as_map(maps.conntrack().expect("walking the conntrack map"));
    let live: HashMap<_, _> = written.into_iter().filter(|(k, v)| !dead(k, v)).collect();
    assert!(left == live, "exactly the live entries stay");
}
