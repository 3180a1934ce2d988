//! Binding the primary's listening sockets.

use std::io;
use std::net::{SocketAddr, TcpListener};

use nix::sys::socket::{
    self, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, sockopt,
};

/// Binds and listens on a TCP address: close-on-exec, non-blocking (connections are
/// accepted non-blocking; a shared socket is used non-blocking by every worker),
/// `SO_REUSEADDR` as servers expect.
pub(crate) fn bind_tcp(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
    let fd = socket::socket(family, SockType::Stream, flags, None)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    match addr {
        SocketAddr::V4(v4) => socket::bind(raw, &SockaddrIn::from(v4))?,
        SocketAddr::V6(v6) => socket::bind(raw, &SockaddrIn6::from(v6))?,
    }
    let backlog =
        Backlog::new(i32::try_from(backlog).unwrap_or(i32::MAX)).unwrap_or(Backlog::MAXCONN);
    socket::listen(&fd, backlog)?;
    Ok(TcpListener::from(fd))
}
