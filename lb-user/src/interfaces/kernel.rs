//! What the kernel says about interfaces and pinned links: which interfaces exist in this
//! network namespace, and which interface a pinned XDP or tcx link is attached to. aya answers
//! neither (its `LinkInfo` keeps the interface to itself), so these are the two system calls.

use std::{collections::BTreeMap, ffi::CStr, os::fd::FromRawFd as _, os::fd::OwnedFd, path::Path};

use crate::error::{Error, Result};

/// The interfaces of the calling thread's network namespace, by name, with their indexes.
pub fn present() -> Result<BTreeMap<String, u32>> {
    // SAFETY: if_nameindex returns a heap array ending in a zeroed entry, or null on failure; it
    // is read up to that entry and freed once.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            let source = std::io::Error::last_os_error();
            return Err(Error::Link {
                what: "listing the interfaces".into(),
                source: source.into(),
            });
        }
        let mut interfaces = BTreeMap::new();
        let mut entry = list;
        while (*entry).if_index != 0 {
            let name = CStr::from_ptr((*entry).if_name).to_string_lossy().into_owned();
            interfaces.insert(name, (*entry).if_index);
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
        Ok(interfaces)
    }
}

/// `BPF_OBJ_GET` and `BPF_OBJ_GET_INFO_BY_FD` (include/uapi/linux/bpf.h).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// The interface index a pinned XDP or tcx bpf_link is attached to; 0 once its interface is
/// gone (the kernel keeps such a link, detached, for as long as it is pinned).
pub fn pinned_link_ifindex(pin: &Path) -> Result<u32> {
    let link = open_pin(pin)?;
    // struct bpf_link_info: type, id, prog_id, then a union aligned to 8 bytes whose `xdp` and
    // `tcx` members both begin with the interface index (byte 16, the fifth u32).
    let mut info = [0_u32; 16];
    let mut attr = [0_u64; 2];
    attr[0] = u64::from(fd_number(&link)) | (size_of_val(&info) as u64) << 32;
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map_err(|source| Error::Link {
        what: format!("reading the link pinned at {}", pin.display()),
        source: source.into(),
    })?;
    Ok(info[4])
}

fn open_pin(pin: &Path) -> Result<OwnedFd> {
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::io(pin)(std::io::ErrorKind::InvalidInput.into()))?;
    // union bpf_attr for BPF_OBJ_GET: pathname, then bpf_fd and file_flags (zero).
    let mut attr = [path.as_ptr() as u64, 0];
    let fd = bpf(BPF_OBJ_GET, &mut attr).map_err(Error::io(pin))?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fd_number(fd: &OwnedFd) -> u32 {
    use std::os::fd::AsRawFd as _;
    u32::try_from(fd.as_raw_fd()).expect("descriptors are not negative")
}

fn bpf(command: libc::c_long, attr: &mut [u64; 2]) -> std::io::Result<i32> {
    // SAFETY: `attr` is a zero-padded `union bpf_attr` prefix of the size passed, valid for the
    // call; pointers in it point to live buffers of the sizes given.
    let result = unsafe {
        libc::syscall(libc::SYS_bpf, command, attr.as_mut_ptr(), size_of_val(attr) as libc::c_ulong)
    };
    if result < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(i32::try_from(result).expect("a descriptor or zero"))
    }
}
