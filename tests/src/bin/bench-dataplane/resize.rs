//! What resizing a full conntrack map costs (`lb_user::resize`): the two passes of
//! `lb_user::maps::copy` over pinned maps. The first runs before the programs move to the new
//! map, the second after, and until it is done a reply to a flow the old programs opened during
//! the first may reach a new program before its entries do.

use std::{os::fd::AsFd as _, time::Instant};

use aya::maps::MapData;
use lb_common::maps::names;
use lb_tests::pins::TestPins;
use lb_user::{
    loader::{self, Capacities},
    map_batch,
    maps::copy::{copy_all, copy_changes},
};

use super::{CONNTRACK_FILL, datapath_now, filler_key, flow_value};

/// The conntrack map resized: entries before and after.
pub const FROM_ENTRIES: u32 = super::CONNTRACK_CAPACITY;
pub const TO_ENTRIES: u32 = 2 * super::CONNTRACK_CAPACITY;

/// Seconds of the first and second pass moving [`CONNTRACK_FILL`] live entries from a map of
/// [`FROM_ENTRIES`] into one of [`TO_ENTRIES`], with nothing changing in between.
pub fn conntrack_passes_s() -> (f64, f64) {
    let (old, new) = (TestPins::new(), TestPins::new());
    for (pins, entries) in [(&old, FROM_ENTRIES), (&new, TO_ENTRIES)] {
        let capacities = Capacities { conntrack: Some(entries), ..Capacities::default() };
        drop(loader::load_pinned(pins.layout(), &capacities).expect("loading with pinned maps"));
    }
    let (from, to) = (old.layout().map(names::CONNTRACK), new.layout().map(names::CONNTRACK));
    let now = datapath_now();
    let keys: Vec<_> = (0..CONNTRACK_FILL).map(filler_key).collect();
    let values = vec![flow_value(1, 0, now); keys.len()];
    let map = MapData::from_pin(&from).expect("the old conntrack map");
    map_batch::update(map.fd().as_fd(), &keys, &values).expect("filling the old map");

    let started = Instant::now();
    let (copied, read) = copy_all(names::CONNTRACK, &from, &to).expect("the first pass");
    let first = started.elapsed().as_secs_f64();
    assert_eq!(copied, keys.len(), "every live entry copied");
    let started = Instant::now();
    let late = copy_changes(names::CONNTRACK, &from, &to, &read).expect("the second pass");
    let second = started.elapsed().as_secs_f64();
    assert_eq!(late, 0, "nothing changed in between");
    (first, second)
}
