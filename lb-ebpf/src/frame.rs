//! Bounds-checked access to packet bytes, the same for XDP and tc contexts.

use core::{mem::size_of, ptr::read_volatile};

use aya_ebpf::programs::{TcContext, XdpContext};

/// The bytes of one packet as a program sees them.
pub trait Frame {
    /// Address of the first byte (the Ethernet header).
    fn start(&self) -> usize;
    /// Address one past the last byte the program may read directly.
    fn end(&self) -> usize;
    /// Length of the whole packet, including any part not directly readable.
    fn len(&self) -> usize;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }

    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }

    #[inline(always)]
    fn len(&self) -> usize {
        // Volatile loads keep LLVM from relating this length to `start()`/`end()`: otherwise it
        // proves a later `ptr_at` check redundant (from a length check against this value) and
        // drops it, and the verifier, which only trusts comparisons against `data_end`, rejects
        // the access.
        // SAFETY: `ctx` points to the kernel's xdp_md for the duration of the program.
        let len = unsafe {
            let md = self.ctx;
            read_volatile(&raw const (*md).data_end) as usize
                - read_volatile(&raw const (*md).data) as usize
        };
        // Nor may it fold the length into other arithmetic: `x - (end - start)` reassociated
        // into `(x - end) + start` is pointer arithmetic on pkt_end, which the verifier refuses.
        core::hint::black_box(len)
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }

    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }

    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }
}

/// A pointer to a `T` at `offset` bytes into the frame, or `None` if it does not fit entirely
/// inside the directly readable bytes. The comparison is the one the verifier needs to see.
#[inline(always)]
pub fn ptr_at<T>(frame: &impl Frame, offset: usize) -> Option<*const T> {
    let start = frame.start();
    if start + offset + size_of::<T>() > frame.end() {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Like [`ptr_at`], for writing.
#[inline(always)]
pub fn ptr_at_mut<T>(frame: &impl Frame, offset: usize) -> Option<*mut T> {
    ptr_at::<T>(frame, offset).map(|p| p.cast_mut())
}
