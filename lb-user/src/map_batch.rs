//! The batch commands of bpf(2) (Linux 5.6), which aya 0.16 does not offer: many entries of
//! one map in one system call. One call per entry costs about 2 us, most of it the system call
//! itself: a first sync of 100k services writes over two million entries, and a conntrack
//! collection walks up to a million.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use aya::Pod;

/// `BPF_MAP_LOOKUP_BATCH` in `enum bpf_cmd` (linux/bpf.h).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// `BPF_MAP_UPDATE_BATCH` in `enum bpf_cmd` (linux/bpf.h).
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// `BPF_MAP_DELETE_BATCH` in `enum bpf_cmd` (linux/bpf.h).
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The `batch` member of `union bpf_attr` (linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Writes `keys[i] -> values[i]` into the map behind `map` (whose key and value sizes must be
/// those of `K` and `V`). On an error, the entries before the failing one are written.
///
/// # Panics
/// If `keys` and `values` differ in length.
pub fn update<K: Pod, V: Pod>(map: BorrowedFd<'_>, keys: &[K], values: &[V]) -> io::Result<()> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let map_fd = raw_fd(map)?;
    let mut done = 0;
    while done < keys.len() {
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr().expose_provenance() as u64,
            values: values[done..].as_ptr().expose_provenance() as u64,
            count: u32::try_from(keys.len() - done).unwrap_or(u32::MAX),
            map_fd,
            ..BatchAttr::default()
        };
        // SAFETY: the pointers cover `count` keys and values of the map's sizes, borrowed for
        // the call.
        unsafe { call(BPF_MAP_UPDATE_BATCH, &mut attr) }?;
        // The kernel may stop early (a pending signal); `count` says how far it got.
        done += attr.count as usize;
        if attr.count == 0 {
            return Err(io::Error::other("BPF_MAP_UPDATE_BATCH wrote nothing"));
        }
    }
    Ok(())
}

/// Reads every entry of the map behind `map` (a plain or LRU hash map, or an array; not a
/// per-CPU one; key and value sizes those of `K` and `V`), up to `per_call` entries a call.
///
/// For a hash map the kernel hands out whole buckets, each under its lock, so an entry that
/// the programs insert or evict meanwhile is either read whole or not at all; none is read
/// twice. For an array the cursor is the last index read, a `u32` as well.
pub fn lookup<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    per_call: usize,
) -> io::Result<(Vec<K>, Vec<V>)> {
    let map_fd = raw_fd(map)?;
    let mut keys = Vec::new();
    let mut values = Vec::new();
    // The kernel writes into these and `count` says how many it wrote. Initialised memory
    // keeps that sound whatever `count` holds after an error (older kernels leave it as passed
    // on some early returns).
    let mut room_keys: Vec<K> = zeroed(per_call.max(1));
    let mut room_values: Vec<V> = zeroed(per_call.max(1));
    // A hash map's cursor is the index of the next bucket to read; none starts at the first.
    let mut cursor: Option<u32> = None;
    loop {
        let mut next = 0u32;
        let mut attr = BatchAttr {
            in_batch: cursor
                .as_ref()
                .map_or(0, |c| std::ptr::from_ref(c).expose_provenance() as u64),
            out_batch: std::ptr::from_mut(&mut next).expose_provenance() as u64,
            keys: room_keys.as_mut_ptr().expose_provenance() as u64,
            values: room_values.as_mut_ptr().expose_provenance() as u64,
            count: u32::try_from(room_keys.len()).unwrap_or(u32::MAX),
            map_fd,
            ..BatchAttr::default()
        };
        // SAFETY: the key and value pointers cover `count` entries of `room_keys` and
        // `room_values`, the cursors are live `u32`s, all of them borrowed for the call.
        let outcome = unsafe { call(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let read = (attr.count as usize).min(room_keys.len());
        match outcome {
            // A call that succeeds has read at least one bucket; this guards against a loop.
            Ok(()) if read == 0 => {
                return Err(io::Error::other("BPF_MAP_LOOKUP_BATCH read nothing"));
            }
            Ok(()) => cursor = Some(next),
            // Past the last bucket; this last call may still have read some.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                keys.extend_from_slice(&room_keys[..read]);
                values.extend_from_slice(&room_values[..read]);
                return Ok((keys, values));
            }
            // One bucket holds more entries than there is room for: nothing was read, so the
            // cursor stays and the call goes again with twice the room.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                room_keys = zeroed(room_keys.len().saturating_mul(2));
                room_values = zeroed(room_values.len().saturating_mul(2));
                continue;
            }
            Err(e) => return Err(e),
        }
        keys.extend_from_slice(&room_keys[..read]);
        values.extend_from_slice(&room_values[..read]);
    }
}

/// Deletes `keys` from the hash map behind `map` (key size that of `K`); returns how many were
/// there. A key already gone (evicted by the LRU, or deleted by the programs) is skipped, not
/// an error.
pub fn delete<K: Pod>(map: BorrowedFd<'_>, keys: &[K]) -> io::Result<usize> {
    let map_fd = raw_fd(map)?;
    let mut done = 0;
    let mut deleted = 0;
    while done < keys.len() {
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr().expose_provenance() as u64,
            count: u32::try_from(keys.len() - done).unwrap_or(u32::MAX),
            map_fd,
            ..BatchAttr::default()
        };
        // SAFETY: the key pointer covers `count` keys of the map's size, borrowed for the call.
        let outcome = unsafe { call(BPF_MAP_DELETE_BATCH, &mut attr) };
        // `count` is how many keys went before the call stopped, at the end or at a failure.
        let went = (attr.count as usize).min(keys.len() - done);
        done += went;
        deleted += went;
        match outcome {
            Ok(()) if went == 0 => {
                return Err(io::Error::other("BPF_MAP_DELETE_BATCH deleted nothing"));
            }
            Ok(()) => {}
            // The kernel stops at the first missing key: step over it and go on after it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => done += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

/// `n` zeroed `T`s, for the kernel to write into.
fn zeroed<T: Pod>(n: usize) -> Vec<T> {
    // SAFETY: every sequence of initialised bytes is a valid `Pod` value, zeros included.
    vec![unsafe { std::mem::zeroed::<T>() }; n]
}

fn raw_fd(map: BorrowedFd<'_>) -> io::Result<u32> {
    u32::try_from(map.as_raw_fd()).map_err(io::Error::other)
}

/// Issues batch command `cmd`. The kernel updates `attr.count` (and the cursor `out_batch`
/// points to) on errors too.
///
/// # Safety
/// Every pointer in `attr` must be valid for what `cmd` does with it for the whole call: `keys`
/// and `values` for `count` entries of the map's key and value sizes, `in_batch` and
/// `out_batch` (when not zero) for one cursor each.
unsafe fn call(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a live, fully initialised `batch` member of `union bpf_attr`, and the
    // caller vouches for the memory its pointers name.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}
