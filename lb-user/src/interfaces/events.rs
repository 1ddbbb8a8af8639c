//! Interface events: a netlink route socket subscribed to link changes (`RTMGRP_LINK`). Nothing is
//! parsed: any message means "the interfaces may have changed", and the caller compares what
//! exists with what is attached. An overrun socket (ENOBUFS: events were lost) means the same.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use tokio::io::{Interest, unix::AsyncFd};

use crate::error::{Error, Result};

/// `RTMGRP_LINK` (include/uapi/linux/rtnetlink.h): link added, changed or removed.
const RTMGRP_LINK: u32 = 1;

pub struct LinkEvents {
    socket: AsyncFd<OwnedFd>,
}

impl LinkEvents {
    /// Subscribes in the calling thread's network namespace. Subscribe before looking at the
    /// interfaces, so that no change falls between the look and the subscription.
    pub fn subscribe() -> Result<Self> {
        let error = |source: io::Error| Error::Link {
            what: "subscribing to interface events (netlink)".into(),
            source: source.into(),
        };
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(error(io::Error::last_os_error()));
        }
        // SAFETY: a new descriptor that nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        #[expect(
            clippy::cast_possible_truncation,
            reason = "AF_NETLINK (16) and the size of sockaddr_nl (12) are small constants"
        )]
        let (family, length) = (
            libc::AF_NETLINK as libc::sa_family_t,
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        );
        // SAFETY: a zeroed sockaddr_nl is valid; bind reads exactly its size.
        let bound = unsafe {
            let mut address: libc::sockaddr_nl = std::mem::zeroed();
            address.nl_family = family;
            address.nl_groups = RTMGRP_LINK;
            libc::bind(socket.as_raw_fd(), (&raw const address).cast(), length)
        };
        if bound < 0 {
            return Err(error(io::Error::last_os_error()));
        }
        // SAFETY: the AsyncFd owns the descriptor, which stays open and the same until it drops.
        let socket = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
            .map_err(|failed| error(failed.into()))?;
        Ok(Self { socket })
    }

    /// Waits for the next batch of link events and consumes all that are queued.
    pub async fn changed(&mut self) -> Result<()> {
        let error = |source: io::Error| Error::Link {
            what: "reading interface events".into(),
            source: source.into(),
        };
        let mut ready = self.socket.readable().await.map_err(error)?;
        let mut buffer = [0_u8; 16 * 1024];
        loop {
            // SAFETY: recv writes at most `buffer.len()` bytes into the buffer.
            let received = unsafe {
                libc::recv(
                    self.socket.get_ref().as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    0,
                )
            };
            if received >= 0 {
                continue;
            }
            let failure = io::Error::last_os_error();
            match failure.kind() {
                io::ErrorKind::WouldBlock => {
                    ready.clear_ready();
                    return Ok(());
                }
                io::ErrorKind::Interrupted => {}
                // Events were lost: the caller looks at everything anyway.
                _ if failure.raw_os_error() == Some(libc::ENOBUFS) => {}
                _ => return Err(error(failure)),
            }
        }
    }
}
