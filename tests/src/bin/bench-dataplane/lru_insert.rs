//! What one insert into a kernel LRU hash map costs, the map shaped like the conntrack map the
//! packet paths run against: conntrack keys and values, [`CONNTRACK_CAPACITY`] slots,
//! [`CONNTRACK_FILL`] live entries and more. A new flow inserts two (one entry per direction),
//! so this sizes what the first-packet figures spend in the kernel's map code (with random
//! keys, whose buckets are cold: a first packet's forward insert finds its bucket warm from the
//! lookup just before). Measured with a program of 23 instructions that inserts a random key on
//! every run, less the same program without the insert.

use lb_common::maps::{ConntrackKey, ConntrackValue};
use lb_tests::stand_in::{self, BPF_MAP_TYPE_LRU_HASH, Insn, Kind};

use crate::{CONNTRACK_CAPACITY, CONNTRACK_FILL, RawXdp, two_point};

/// Runs of the short and the long call: 500k inserts on top of the fill, so none evicts.
const RUNS: (u32, u32) = (100_000, 400_000);
/// 16 and 32 bytes (asserted in `lb_common::maps`): the stack layout below assumes them.
#[expect(clippy::cast_possible_truncation, reason = "16")]
const KEY_SIZE: u32 = size_of::<ConntrackKey>() as u32;
#[expect(clippy::cast_possible_truncation, reason = "32")]
const VALUE_SIZE: u32 = size_of::<ConntrackValue>() as u32;
/// Frame pointer, and the stack offsets of the key and the (zero) value.
const R10: u8 = 10;
const KEY_AT: i16 = -16;
const VALUE_AT: i16 = KEY_AT - 32;
const CALL: u8 = 0x85;
const GET_PRANDOM_U32: i32 = 7;
const MAP_UPDATE_ELEM: i32 = 2;
const PSEUDO_MAP_FD: u8 = 1;

/// ns one LRU insert adds to a program run.
pub fn insert_ns() -> f64 {
    let map = stand_in::create_map(BPF_MAP_TYPE_LRU_HASH, KEY_SIZE, VALUE_SIZE, CONNTRACK_CAPACITY);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&map);
    let inserting = RawXdp { fd: stand_in::load_ending_in_pass(Kind::Xdp, &program(Some(fd))) };
    let keys_only = RawXdp { fd: stand_in::load_ending_in_pass(Kind::Xdp, &program(None)) };
    inserting.run(CONNTRACK_FILL);
    let with_insert = two_point(RUNS, |runs| inserting.run(runs).1);
    let without = two_point(RUNS, |runs| keys_only.run(runs).1);
    with_insert - without
}

/// A random 8 bytes and a constant 8 as the key, a zero value, both on the stack, and, with a
/// map, `bpf_map_update_elem(map, key, value, BPF_ANY)`.
fn program(map_fd: Option<i32>) -> Vec<Insn> {
    let insn = |code, dst: u8, src: u8, off, imm| Insn { code, regs: dst | src << 4, off, imm };
    let mut insns = vec![
        insn(CALL, 0, 0, 0, GET_PRANDOM_U32),
        insn(0xbf, 6, 0, 0, 0),  // r6 = r0
        insn(0x67, 6, 0, 0, 32), // r6 <<= 32
        insn(CALL, 0, 0, 0, GET_PRANDOM_U32),
        insn(0x4f, 6, 0, 0, 0),           // r6 |= r0
        insn(0x7b, R10, 6, KEY_AT, 0),    // *(u64 *)(r10 + KEY_AT) = r6
        insn(0xb7, 1, 0, 0, 0x004c_5255), // r1 = "LRU"
        insn(0x7b, R10, 1, KEY_AT + 8, 0),
        insn(0xb7, 1, 0, 0, 0), // r1 = 0
    ];
    insns.extend([0, 8, 16, 24].map(|at| insn(0x7b, R10, 1, VALUE_AT + at, 0)));
    if let Some(fd) = map_fd {
        insns.extend([
            insn(0x18, 1, PSEUDO_MAP_FD, 0, fd), // r1 = map (two slots)
            insn(0, 0, 0, 0, 0),
            insn(0xbf, 2, R10, 0, 0), // r2 = r10 + KEY_AT
            insn(0x07, 2, 0, 0, i32::from(KEY_AT)),
            insn(0xbf, 3, R10, 0, 0), // r3 = r10 + VALUE_AT
            insn(0x07, 3, 0, 0, i32::from(VALUE_AT)),
            insn(0xb7, 4, 0, 0, 0), // r4 = BPF_ANY
            insn(CALL, 0, 0, 0, MAP_UPDATE_ELEM),
        ]);
    }
    insns
}
