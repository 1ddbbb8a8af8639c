//! What a new flow costs in the kernel's map code alone, the map shaped like the conntrack map
//! the packet paths run against: conntrack keys and values, [`CONNTRACK_CAPACITY`] slots,
//! [`CONNTRACK_FILL`] live entries and more. Two figures:
//! - one insert of a random key (a cold bucket);
//! - a new flow's least: a lookup that misses, the insert of that key (its bucket now warm),
//!   and the insert of a second random key, as a first packet looks its forward tuple up and
//!   then writes one entry per direction. No first-packet path can cost less while a flow is
//!   two entries in a kernel hash map.
//!
//! Each is measured with a program of a few dozen instructions that does its work with random
//! keys on every run, less the same program without the map calls.

use lb_common::maps::{ConntrackKey, ConntrackValue};
use lb_tests::stand_in::{self, BPF_MAP_TYPE_LRU_HASH, Insn, Kind};

use crate::{CONNTRACK_CAPACITY, CONNTRACK_FILL, RawXdp, TWO_POINT_TAKES, median, two_point};

/// Runs of the short and the long call: over [`TWO_POINT_TAKES`] takes, 480k inserts on top of
/// the fill, so none evicts.
const RUNS: (u32, u32) = (40_000, 120_000);
/// The same for the new-flow program, which inserts two keys a run.
const NEW_FLOW_RUNS: (u32, u32) = (20_000, 60_000);
/// 16 and 32 bytes (asserted in `lb_common::maps`): the stack layout below assumes them.
#[expect(clippy::cast_possible_truncation, reason = "16")]
const KEY_SIZE: u32 = size_of::<ConntrackKey>() as u32;
#[expect(clippy::cast_possible_truncation, reason = "32")]
const VALUE_SIZE: u32 = size_of::<ConntrackValue>() as u32;
/// Frame pointer, and the stack offsets of the keys and the (zero) value.
const R10: u8 = 10;
const KEY_AT: i16 = -16;
const VALUE_AT: i16 = KEY_AT - 32;
const SECOND_KEY_AT: i16 = VALUE_AT - 16;
const CALL: u8 = 0x85;
const GET_PRANDOM_U32: i32 = 7;
const MAP_LOOKUP_ELEM: i32 = 1;
const MAP_UPDATE_ELEM: i32 = 2;
const PSEUDO_MAP_FD: u8 = 1;

/// What a program run does with the map.
#[derive(Clone, Copy)]
enum Work {
    /// One insert of a random key.
    Insert,
    /// What the kernel's map code costs a new flow at the least: a lookup of a random key that
    /// misses (the forward tuple), its insert, and the insert of a second random key (the
    /// reply tuple).
    NewFlow,
}

/// ns one LRU insert adds to a program run.
pub fn insert_ns() -> f64 {
    added_ns(Work::Insert, RUNS)
}

/// ns a lookup that misses and two inserts add to a program run: the least a first packet
/// spends in conntrack, whatever the rest of its path.
pub fn new_flow_ns() -> f64 {
    added_ns(Work::NewFlow, NEW_FLOW_RUNS)
}

/// ns `work` adds to a run, over a map filled with [`CONNTRACK_FILL`] entries first: the median
/// of [`TWO_POINT_TAKES`] takes, each timing the program with the map calls and then the one
/// without.
fn added_ns(work: Work, runs: (u32, u32)) -> f64 {
    let map = stand_in::create_map(BPF_MAP_TYPE_LRU_HASH, KEY_SIZE, VALUE_SIZE, CONNTRACK_CAPACITY);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&map);
    let fill =
        RawXdp { fd: stand_in::load_ending_in_pass(Kind::Xdp, &program(Work::Insert, Some(fd))) };
    fill.run(CONNTRACK_FILL);
    let working = RawXdp { fd: stand_in::load_ending_in_pass(Kind::Xdp, &program(work, Some(fd))) };
    let keys_only = RawXdp { fd: stand_in::load_ending_in_pass(Kind::Xdp, &program(work, None)) };
    let takes = (0..TWO_POINT_TAKES).map(|_| {
        let with_work = two_point(runs, |runs| working.run(runs).1);
        with_work - two_point(runs, |runs| keys_only.run(runs).1)
    });
    median(takes.collect())
}

/// Random keys (a random 8 bytes and a constant 8) and a zero value on the stack, and, with a
/// map, `work` on it: `bpf_map_lookup_elem(map, key)`, `bpf_map_update_elem(map, key, value,
/// BPF_ANY)`.
fn program(work: Work, map_fd: Option<i32>) -> Vec<Insn> {
    let insn = |code, dst: u8, src: u8, off, imm| Insn { code, regs: dst | src << 4, off, imm };
    let random_key_at = |at: i16| {
        [
            insn(CALL, 0, 0, 0, GET_PRANDOM_U32),
            insn(0xbf, 6, 0, 0, 0),  // r6 = r0
            insn(0x67, 6, 0, 0, 32), // r6 <<= 32
            insn(CALL, 0, 0, 0, GET_PRANDOM_U32),
            insn(0x4f, 6, 0, 0, 0),           // r6 |= r0
            insn(0x7b, R10, 6, at, 0),        // *(u64 *)(r10 + at) = r6
            insn(0xb7, 1, 0, 0, 0x004c_5255), // r1 = "LRU"
            insn(0x7b, R10, 1, at + 8, 0),
        ]
    };
    let call_on_map = |fd, helper, key_at: i16| {
        [
            insn(0x18, 1, PSEUDO_MAP_FD, 0, fd), // r1 = map (two slots)
            insn(0, 0, 0, 0, 0),
            insn(0xbf, 2, R10, 0, 0), // r2 = r10 + key_at
            insn(0x07, 2, 0, 0, i32::from(key_at)),
            insn(0xbf, 3, R10, 0, 0), // r3 = r10 + VALUE_AT
            insn(0x07, 3, 0, 0, i32::from(VALUE_AT)),
            insn(0xb7, 4, 0, 0, 0), // r4 = BPF_ANY
            insn(CALL, 0, 0, 0, helper),
        ]
    };
    let mut insns = random_key_at(KEY_AT).to_vec();
    if let Work::NewFlow = work {
        insns.extend(random_key_at(SECOND_KEY_AT));
    }
    insns.push(insn(0xb7, 1, 0, 0, 0)); // r1 = 0
    insns.extend([0, 8, 16, 24].map(|at| insn(0x7b, R10, 1, VALUE_AT + at, 0)));
    let Some(fd) = map_fd else { return insns };
    match work {
        Work::Insert => insns.extend(call_on_map(fd, MAP_UPDATE_ELEM, KEY_AT)),
        Work::NewFlow => {
            insns.extend(call_on_map(fd, MAP_LOOKUP_ELEM, KEY_AT));
            insns.extend(call_on_map(fd, MAP_UPDATE_ELEM, KEY_AT));
            insns.extend(call_on_map(fd, MAP_UPDATE_ELEM, SECOND_KEY_AT));
        }
    }
    insns
}
