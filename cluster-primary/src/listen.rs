//! The primary's listening sockets and the connections it holds for them.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::num::NonZeroU32;
use std::os::fd::OwnedFd;

use cluster_ipc::proto::ListenMode;
use cluster_ipc::{ConnId, ListenerId, WorkerId};
use cluster_sched::{Action, Dispatch, LeastConnections, RoundRobin};

use crate::config::Policy;
use nix::sys::socket::{
    self, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, sockopt,
};

/// What makes two listen requests the same listener: the address asked for, plus the
/// worker's port-0 counter when the port is 0 (so that every worker's first `:0` shares one
/// port, as in Node, and one worker can still ask `:0` twice and get two).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ListenKey {
    pub(crate) addr: SocketAddr,
    pub(crate) port_zero_index: Option<u32>,
}

impl ListenKey {
    pub(crate) fn new(addr: SocketAddr, index: u32) -> ListenKey {
        ListenKey {
            addr,
            port_zero_index: (addr.port() == 0).then_some(index),
        }
    }
}

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

/// One listening socket of the primary and everything that hangs off it.
pub(crate) struct Listener {
    pub(crate) id: ListenerId,
    pub(crate) local_addr: SocketAddr,
    pub(crate) mode: ListenMode,
    pub(crate) socket: mio::net::TcpListener,
    /// The token it is registered under while the primary accepts on it.
    pub(crate) token: mio::Token,
    /// Workers that were granted this listener and have not closed it.
    pub(crate) members: BTreeSet<WorkerId>,
    pub(crate) delivery: Delivery,
}

/// How a listener's connections reach workers.
pub(crate) enum Delivery {
    /// Workers accept on the socket themselves.
    Shared,
    /// The primary accepts and hands connections out.
    RoundRobin(Dispatcher),
}

/// The round-robin side of a listener: the policy and the connections the primary holds
/// (pending, or handed out and not yet acknowledged).
pub(crate) struct Dispatcher {
    pub(crate) policy: Box<dyn Dispatch + Send>,
    pub(crate) conns: BTreeMap<ConnId, Held>,
    next_conn: u64,
    /// Registered for accepting: false while accept is paused (every worker saturated, or
    /// out of fds, or the cluster is stopping).
    pub(crate) accepting: bool,
    /// Accept is off until then after EMFILE/ENFILE.
    pub(crate) fd_backoff_until: Option<std::time::Instant>,
}

impl Dispatcher {
    pub(crate) fn new(policy: Policy, window: NonZeroU32) -> Dispatcher {
        let policy: Box<dyn Dispatch + Send> = match policy {
            Policy::RoundRobin => Box::new(RoundRobin::new(window)),
            Policy::LeastConnections => Box::new(LeastConnections::new(window)),
        };
        Dispatcher {
            policy,
            conns: BTreeMap::new(),
            next_conn: 1,
            accepting: false,
            fd_backoff_until: None,
        }
    }

    /// Takes ownership of an accepted connection and queues it with the policy.
    pub(crate) fn incoming(&mut self, fd: OwnedFd, peer: SocketAddr) {
        let id = self.adopt(Held {
            fd,
            peer: Some(peer),
        });
        self.policy.incoming(id);
    }

    /// Takes back connections a worker returned (acked but never served), ahead of the
    /// others, in their order.
    pub(crate) fn returned(&mut self, fds: Vec<OwnedFd>) {
        let ids: Vec<ConnId> = fds
            .into_iter()
            .map(|fd| self.adopt(Held { fd, peer: None }))
            .collect();
        self.policy.requeue_front(&ids);
    }

    fn adopt(&mut self, held: Held) -> ConnId {
        let id = ConnId(self.next_conn);
        self.next_conn += 1;
        self.conns.insert(id, held);
        id
    }

    /// Drains the policy's actions: handoffs grouped into one batch per worker (in the order
    /// the policy chose them), connections to close, and whether accepting should end up on
    /// or off.
    pub(crate) fn take_actions(&mut self) -> Actions {
        let mut actions = Actions::default();
        while let Some(action) = self.policy.poll_action() {
            match action {
                Action::Handoff { worker, conns } => {
                    match actions.handoffs.iter_mut().find(|(w, _)| *w == worker) {
                        Some((_, batch)) => batch.extend(conns),
                        None => actions.handoffs.push((worker, conns)),
                    }
                }
                Action::Close(conn) => actions.close.push(conn),
                Action::PauseAccept => actions.accept = Some(false),
                Action::ResumeAccept => actions.accept = Some(true),
            }
        }
        actions
    }
}

/// A connection the primary holds: its copy of the socket, and the peer's address when
/// `accept` reported it.
pub(crate) struct Held {
    pub(crate) fd: OwnedFd,
    pub(crate) peer: Option<SocketAddr>,
}

/// What a dispatcher asks the primary to do.
#[derive(Debug, Default)]
pub(crate) struct Actions {
    pub(crate) handoffs: Vec<(WorkerId, Vec<ConnId>)>,
    pub(crate) close: Vec<ConnId>,
    pub(crate) accept: Option<bool>,
}
