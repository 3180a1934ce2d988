//! The only place in this crate with `unsafe`: registering a listener's readiness fd with
//! tokio's reactor (the `tokio` feature), which tokio makes an `unsafe` call because it cannot
//! check that the fd outlives the registration.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::Listener;

/// A listener, as `AsyncFd` wants it: by its raw readiness fd.
#[derive(Debug)]
pub(crate) struct Readiness(pub(crate) Listener);

impl AsRawFd for Readiness {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Registers `listener`'s readiness fd for reading. Must be called inside a runtime with I/O
/// enabled (it panics otherwise).
pub(crate) fn register(listener: Listener) -> io::Result<AsyncFd<Readiness>> {
    // SAFETY: the fd is the listener's own readiness fd (the handoff socket's poll fd, or a
    // shared listener's private epoll instance), an `OwnedFd` inside the listener's core that
    // is chosen when the listener is made and closed only when the core is dropped (closing
    // the listener does not close it). The `Readiness` owns the `Listener`, which holds the
    // core, so the fd stays open and the same for as long as the `AsyncFd` owns it, and every
    // `as_raw_fd` returns it.
    let registered =
        unsafe { AsyncFd::register_with_interest(Readiness(listener), Interest::READABLE) };
    registered.map_err(|err| err.into_parts().1)
}
