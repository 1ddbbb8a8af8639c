//! Programs of a few instructions loaded with bpf(2), since aya loads only object files: the
//! benchmark's floor (an empty XDP program, `r0 = verdict; exit`) and its yardsticks, and the
//! upgrade test's stand-ins for programs (and maps) an older version left behind.

use std::{
    ffi::CString,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use aya::{
    maps::{Map, MapData, PerCpuArray, PerCpuValues},
    programs::{Program, SchedClassifier, Xdp},
};
use aya_obj::programs::XdpAttachType;
use lb_common::{maps::names, stats::Reason};
use lb_user::{pins::PinLayout, program_names, upgrade};

/// The program types a stand-in can be.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// Returns `XDP_PASS`.
    Xdp,
    /// A tc classifier that returns `TC_ACT_OK` (tcx: pass).
    SchedCls,
}

impl Kind {
    /// (`bpf_prog_type`, `expected_attach_type`, the verdict that passes the packet on). An
    /// XDP program that is to replace another on a link must expect `BPF_XDP`, as aya's do.
    fn type_attach_and_verdict(self) -> (u32, u32, i32) {
        match self {
            Self::Xdp => (6, 37, 2),
            Self::SchedCls => (3, 0, 0),
        }
    }
}

/// `struct bpf_insn`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Insn {
    pub code: u8,
    /// `dst_reg` in the low nibble, `src_reg` in the high nibble.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

/// The `BPF_PROG_LOAD` part of `union bpf_attr` (linux/bpf.h), as far as this load needs it.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The `BPF_OBJ_PIN` part of `union bpf_attr`.
#[repr(C)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// The `BPF_MAP_CREATE` part of `union bpf_attr`.
#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
/// `BPF_MAP_TYPE_LRU_HASH`.
pub const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;

/// Loads `r0 = <kind's pass verdict>; exit`.
pub fn load(kind: Kind) -> OwnedFd {
    load_ending_in_pass(kind, &[])
}

/// Loads `body` followed by `r0 = <kind's pass verdict>; exit`.
pub fn load_ending_in_pass(kind: Kind, body: &[Insn]) -> OwnedFd {
    let (prog_type, expected_attach_type, verdict) = kind.type_attach_and_verdict();
    // BPF_ALU64 | BPF_MOV | BPF_K; BPF_JMP | BPF_EXIT.
    let insns: Vec<Insn> = body
        .iter()
        .copied()
        .chain([
            Insn { code: 0xb7, regs: 0, off: 0, imm: verdict },
            Insn { code: 0x95, regs: 0, off: 0, imm: 0 },
        ])
        .collect();
    let license = c"GPL";
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: u32::try_from(insns.len()).expect("a short program"),
        insns: address_of(&insns),
        license: address_of(license.to_bytes_with_nul()),
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: [0; 16],
        prog_ifindex: 0,
        expected_attach_type,
    };
    let fd = bpf(BPF_PROG_LOAD, &mut attr);
    assert!(fd >= 0, "BPF_PROG_LOAD of a {kind:?} stand-in: {}", std::io::Error::last_os_error());
    let fd = i32::try_from(fd).expect("a file descriptor");
    // SAFETY: the kernel just returned this descriptor, and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Creates a map of `map_type` (`BPF_MAP_TYPE_*`) with no flags.
pub fn create_map(map_type: u32, key_size: u32, value_size: u32, max_entries: u32) -> OwnedFd {
    let mut attr = MapCreateAttr { map_type, key_size, value_size, max_entries, map_flags: 0 };
    let fd = bpf(BPF_MAP_CREATE, &mut attr);
    assert!(fd >= 0, "BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
    // SAFETY: the kernel just returned this descriptor, and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).expect("a file descriptor")) }
}

/// Leaves the maps as a version that counted `reasons` verdict reasons and had no
/// `FRAGMENTS` and `REFUSAL_BUDGET` maps would have: neither map, and verdict counters of that
/// size, which counted `counted` (one reason's count) on one CPU.
pub fn put_older_maps(pins: &PinLayout, reasons: u32, counted: (Reason, u64)) {
    for name in [names::FRAGMENTS, names::REFUSAL_BUDGET] {
        std::fs::remove_file(pins.map(name)).unwrap_or_else(|e| panic!("unpin {name}: {e}"));
    }
    let map = create_map(BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, reasons);
    let stats = pins.map(names::STATS);
    std::fs::remove_file(&stats).expect("unpin STATS");
    pin(&map, &stats);
    let data = MapData::from_pin(&stats).expect("the older counters");
    let mut array: PerCpuArray<_, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(data)).expect("a per-CPU array");
    let cpus = aya::util::nr_cpus().expect("the number of CPUs").get();
    let mut values = vec![0; usize::try_from(cpus).expect("fits")];
    values[0] = counted.1;
    let values = PerCpuValues::try_from(values).expect("one value per CPU");
    array.set(counted.0.index(), values, 0).expect("an older count");
}

/// Pins a program or map at `path` on bpffs.
pub fn pin(object: &OwnedFd, path: &Path) {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).expect("a path without NUL");
    let mut attr = ObjPinAttr {
        pathname: address_of(c_path.as_bytes_with_nul()),
        bpf_fd: u32::try_from(object.as_raw_fd()).expect("fd"),
        file_flags: 0,
    };
    let rc = bpf(BPF_OBJ_PIN, &mut attr);
    assert!(rc == 0, "pinning at {}: {}", path.display(), std::io::Error::last_os_error());
}

/// bpf(2) with `attr`, a `repr(C)` prefix of `union bpf_attr` for `command`.
pub fn bpf<T>(command: libc::c_long, attr: &mut T) -> libc::c_long {
    // SAFETY: `attr` is a live, fully initialised `repr(C)` prefix of `union bpf_attr` for
    // `command`, and its size goes with it; the kernel reads and writes only that much.
    unsafe {
        libc::syscall(libc::SYS_bpf, command, std::ptr::from_mut(attr), std::mem::size_of::<T>())
    }
}

/// A buffer's address as bpf(2) takes it.
pub fn address_of<T>(data: &[T]) -> u64 {
    data.as_ptr().expose_provenance() as u64
}

/// Puts pass-everything stand-ins on the pinned XDP and tc attachments, as an older version
/// would have left its own programs there. Run it in the namespace of the interfaces: cls_bpf
/// filters (kernels without tcx) are found by interface name.
pub fn put_on_attachments(pins: &PinLayout) {
    for (name, kind) in [(program_names::XDP, Kind::Xdp), (program_names::TC, Kind::SchedCls)] {
        let mut program = pass_all(kind, pins, &format!("stand-in-{name}"));
        let attachments = upgrade::relink(&mut program, name, pins).expect("stand-in attached");
        assert!(attachments > 0, "{name} is attached somewhere");
    }
}

/// A pass-all stand-in of `kind` as an aya program, to attach. Staged through a pin named
/// `staging` under `pins`, removed once the program is open.
pub fn pass_all(kind: Kind, pins: &PinLayout, staging: &str) -> Program {
    let staged = pins.root().join(staging);
    pin(&load(kind), &staged);
    let program = match kind {
        Kind::Xdp => {
            Program::Xdp(Xdp::from_pin(&staged, XdpAttachType::Interface).expect("stand-in"))
        }
        Kind::SchedCls => {
            Program::SchedClassifier(SchedClassifier::from_pin(&staged).expect("stand-in"))
        }
    };
    std::fs::remove_file(&staged).expect("unpin the staging pin");
    program
}
