//! What differs between the XDP and the tc program when they change a packet: checksum fix-ups
//! (tc must respect the skb's checksum offload state), growing or shrinking the packet, writing
//! bytes, and sending a packet back where it came from.

use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::{bpf_redirect, bpf_xdp_adjust_tail, bpf_xdp_load_bytes, bpf_xdp_store_bytes},
    programs::{TcContext, XdpContext},
};

use crate::{
    csum,
    frame::{Frame, ptr_at_mut},
};

/// How a changed word enters the L4 checksum.
#[derive(Clone, Copy)]
pub struct L4Csum {
    /// The word is part of the IPv4 pseudo-header (an address), not of the L4 header (a port).
    pub pseudo_header: bool,
    /// UDP: a zero checksum means "none" and must stay zero; a computed zero is sent as 0xffff.
    pub udp: bool,
}

pub trait Hook: Frame + EbpfContext {
    /// Updates the IPv4 header checksum at `offset` for a 32-bit word changed `from` -> `to`.
    fn fix_l3_csum(&self, offset: usize, from: u32, to: u32) -> Result<(), ()>;
    /// Updates the L4 checksum at `offset` for a word of `size` (2 or 4) bytes changed
    /// `from` -> `to`.
    fn fix_l4_csum(
        &self,
        offset: usize,
        from: u32,
        to: u32,
        size: u8,
        kind: L4Csum,
    ) -> Result<(), ()>;
    /// Updates the L4 checksum at `offset` for an address (pseudo-header) and a port changed
    /// `from` -> `to`: one translated end of a TCP or UDP packet.
    #[inline(always)]
    fn fix_l4_csum_endpoint(
        &self,
        offset: usize,
        from: (u32, u16),
        to: (u32, u16),
        udp: bool,
    ) -> Result<(), ()> {
        self.fix_l4_csum(offset, from.0, to.0, 4, L4Csum { pseudo_header: true, udp })?;
        if from.1 == to.1 {
            return Ok(());
        }
        self.fix_l4_csum(
            offset,
            u32::from(from.1),
            u32::from(to.1),
            2,
            L4Csum { pseudo_header: false, udp },
        )
    }
    /// Makes the packet `len` bytes long, adding or removing bytes at the tail.
    fn resize(&self, len: usize) -> Result<(), ()>;
    /// Writes `value`'s bytes at `offset`.
    fn store<T>(&self, offset: usize, value: &T) -> Result<(), ()>;
    /// Reads a `T` at `offset` through the kernel's copy helper: no packet pointer, so nothing
    /// for the verifier to lose track of in long functions.
    fn load<T: Copy>(&self, offset: usize) -> Result<T, ()>;
    /// Sends the (rewritten) packet back out of the interface it arrived on; returns the hook's
    /// return code for that.
    fn bounce(&self) -> i32;
    /// The interface the packet arrived on.
    fn ingress_ifindex(&self) -> u32;
    /// Whether the packet carries a VLAN tag outside its bytes (tc: the kernel moves a received
    /// frame's outer tag into the skb before tc ingress runs).
    fn vlan_tag_outside_frame(&self) -> bool;
}

impl Hook for XdpContext {
    fn fix_l3_csum(&self, offset: usize, from: u32, to: u32) -> Result<(), ()> {
        let check: *mut u16 = ptr_at_mut(self, offset).ok_or(())?;
        // SAFETY: `ptr_at_mut` checked the two bytes are inside the packet.
        unsafe { *check = csum::replace32(*check, from, to) };
        Ok(())
    }

    fn fix_l4_csum(
        &self,
        offset: usize,
        from: u32,
        to: u32,
        size: u8,
        kind: L4Csum,
    ) -> Result<(), ()> {
        let check: *mut u16 = ptr_at_mut(self, offset).ok_or(())?;
        // SAFETY: `ptr_at_mut` checked the two bytes are inside the packet.
        unsafe {
            if kind.udp && *check == 0 {
                return Ok(());
            }
            let updated = if size == 4 {
                csum::replace32(*check, from, to)
            } else {
                csum::replace16(*check, from as u16, to as u16)
            };
            *check = if kind.udp && updated == 0 { 0xffff } else { updated };
        }
        Ok(())
    }

    /// Both words in one read-modify-write of the checksum: this is the per-packet path of
    /// every established flow.
    fn fix_l4_csum_endpoint(
        &self,
        offset: usize,
        from: (u32, u16),
        to: (u32, u16),
        udp: bool,
    ) -> Result<(), ()> {
        let check: *mut u16 = ptr_at_mut(self, offset).ok_or(())?;
        // SAFETY: `ptr_at_mut` checked the two bytes are inside the packet.
        unsafe {
            if udp && *check == 0 {
                return Ok(());
            }
            let updated = csum::replace16(csum::replace32(*check, from.0, to.0), from.1, to.1);
            *check = if udp && updated == 0 { 0xffff } else { updated };
        }
        Ok(())
    }

    fn resize(&self, len: usize) -> Result<(), ()> {
        let delta = len as i32 - Frame::len(self) as i32;
        // SAFETY: the helper only needs the context pointer the kernel handed us.
        let rc = unsafe { bpf_xdp_adjust_tail(self.ctx, delta) };
        if rc == 0 { Ok(()) } else { Err(()) }
    }

    fn store<T>(&self, offset: usize, value: &T) -> Result<(), ()> {
        // SAFETY: the helper bounds-checks `offset + size` against the packet itself.
        let rc = unsafe {
            bpf_xdp_store_bytes(
                self.ctx,
                offset as u32,
                core::ptr::from_ref(value).cast_mut().cast(),
                core::mem::size_of::<T>() as u32,
            )
        };
        if rc == 0 { Ok(()) } else { Err(()) }
    }

    fn load<T: Copy>(&self, offset: usize) -> Result<T, ()> {
        let mut value = core::mem::MaybeUninit::<T>::uninit();
        // SAFETY: the helper writes exactly size_of::<T>() bytes or fails.
        let rc = unsafe {
            bpf_xdp_load_bytes(
                self.ctx,
                offset as u32,
                value.as_mut_ptr().cast(),
                core::mem::size_of::<T>() as u32,
            )
        };
        // SAFETY: a zero return code means every byte was written.
        if rc == 0 { Ok(unsafe { value.assume_init() }) } else { Err(()) }
    }

    fn bounce(&self) -> i32 {
        aya_ebpf::bindings::xdp_action::XDP_TX as i32
    }

    fn ingress_ifindex(&self) -> u32 {
        XdpContext::ingress_ifindex(self) as u32
    }

    fn vlan_tag_outside_frame(&self) -> bool {
        // A tag the NIC stripped is not known here (no metadata kfunc is used): such a frame
        // looks untagged, and the FIB lookup routes it as the untagged interface's.
        false
    }
}

impl Hook for TcContext {
    fn fix_l3_csum(&self, offset: usize, from: u32, to: u32) -> Result<(), ()> {
        self.l3_csum_replace(offset, u64::from(from), u64::from(to), 4).map_err(|_| ())
    }

    fn fix_l4_csum(
        &self,
        offset: usize,
        from: u32,
        to: u32,
        size: u8,
        kind: L4Csum,
    ) -> Result<(), ()> {
        // The helper, unlike a plain write, leaves CHECKSUM_PARTIAL skbs (locally generated,
        // offloaded) consistent: there the field holds only the pseudo-header sum.
        let mut flags = u64::from(size);
        if kind.pseudo_header {
            flags |= u64::from(BPF_F_PSEUDO_HDR);
        }
        if kind.udp {
            flags |= u64::from(BPF_F_MARK_MANGLED_0);
        }
        self.l4_csum_replace(offset, u64::from(from), u64::from(to), flags).map_err(|_| ())
    }

    fn resize(&self, len: usize) -> Result<(), ()> {
        self.change_tail(len as u32, 0).map_err(|_| ())
    }

    fn store<T>(&self, offset: usize, value: &T) -> Result<(), ()> {
        TcContext::store(self, offset, value, 0).map_err(|_| ())
    }

    fn load<T: Copy>(&self, offset: usize) -> Result<T, ()> {
        TcContext::load(self, offset).map_err(|_| ())
    }

    fn bounce(&self) -> i32 {
        // Egress of the interface the packet came in on: back towards the pod.
        // SAFETY: plain helper call.
        unsafe { bpf_redirect(self.ingress_ifindex(), 0) as i32 }
    }

    fn ingress_ifindex(&self) -> u32 {
        let skb = self.as_ptr().cast::<__sk_buff>();
        // SAFETY: reads the ifindex field of the skb the kernel handed us; on ingress that is
        // the interface it arrived on.
        unsafe { (*skb).ifindex }
    }

    fn vlan_tag_outside_frame(&self) -> bool {
        let skb = self.as_ptr().cast::<__sk_buff>();
        // SAFETY: reads a field of the skb the kernel handed us.
        unsafe { (*skb).vlan_present != 0 }
    }
}
