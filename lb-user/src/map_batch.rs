//! `BPF_MAP_UPDATE_BATCH` (Linux 5.6), which aya 0.16 does not offer: many entries of one map
//! in one system call. A first sync of 100k services writes over two million entries; one call
//! each costs about 2 us, most of it the system call itself.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use aya::Pod;

/// `BPF_MAP_UPDATE_BATCH` in `enum bpf_cmd` (linux/bpf.h).
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

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
    let mut done = 0;
    while done < keys.len() {
        let count = u32::try_from(keys.len() - done).unwrap_or(u32::MAX);
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr().expose_provenance() as u64,
            values: values[done..].as_ptr().expose_provenance() as u64,
            count,
            map_fd: u32::try_from(map.as_raw_fd()).map_err(io::Error::other)?,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a live, fully initialised `batch` member of `union bpf_attr`, and
        // its pointers cover `count` keys and values of the map's sizes, alive for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                std::ptr::from_mut(&mut attr),
                std::mem::size_of::<BatchAttr>(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // The kernel may stop early (a pending signal); `count` says how far it got.
        done += attr.count as usize;
        if attr.count == 0 {
            return Err(io::Error::other("BPF_MAP_UPDATE_BATCH wrote nothing"));
        }
    }
    Ok(())
}
