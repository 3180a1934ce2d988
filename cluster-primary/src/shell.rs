//! The shell: the fds, processes and channels behind the supervisor core's ids. It reads and
//! decodes, feeds the core, and carries out the core's actions; it decides nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::process::Child;
use std::time::Instant;

use cluster_ipc::proto::{
    Delivery as WireDelivery, Encoded, Envelope, HandoffToWorker, ListenAddr, ListenGranted,
    ListenRefused, MAX_UNREAD_LEN, PeerAddr, PrimaryControl, PrimaryHandoff, ToPrimary, ToWorker,
    handoff_limits,
};
use cluster_ipc::{Channel, ConnId, ErrorChain, ListenerId, Transport, WorkerId};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

use crate::config::Config;
use crate::event::{Event, ExitStatus};
use crate::listen::bind_tcp;
use crate::spawn::spawn_worker;
use crate::supervisor::{Action, Supervisor};
use crate::{Error, Signal};

/// At most this many connections are accepted from one listener per turn of the loop, so that
/// acks and other listeners are served in between.
const ACCEPTS_PER_TURN: usize = 128;

/// What a registered token stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Waker,
    Signals,
    Listener(ListenerId),
    Control(WorkerId),
    Handoff(WorkerId, ListenerId),
    Pidfd(WorkerId),
    /// The control socket's listener.
    ControlSocket,
    /// A control socket client.
    ControlClient(u64),
}

pub(crate) const WAKER: Token = Token(0);
pub(crate) const SIGNALS: Token = Token(1);

/// A channel registered in the loop, with the interest it is registered for.
pub(crate) struct Registered<P> {
    pub(crate) channel: Channel<P>,
    pub(crate) token: Token,
    pub(crate) writable: bool,
}

impl<P> Registered<P> {
    /// Registers `channel` for reading under `token`.
    fn new(
        registry: &Registry,
        mut channel: Channel<P>,
        token: Token,
    ) -> Result<Registered<P>, Error> {
        registry
            .register(&mut channel, token, Interest::READABLE)
            .map_err(|source| Error::io("register channel", source))?;
        Ok(Registered {
            channel,
            token,
            writable: false,
        })
    }

    /// Sends what the channel's queue holds, as far as the socket takes it, and keeps the
    /// interest in step. A failure surfaces at the next read of the channel.
    pub(crate) fn flush(&mut self, registry: &Registry) {
        let _ = self.channel.flush();
        self.update_interest(registry);
    }

    /// Asks for writable events exactly while frames wait in the channel's queue.
    fn update_interest(&mut self, registry: &Registry) {
        let wants = self.channel.wants_write() && !self.channel.is_send_closed();
        if wants == self.writable {
            return;
        }
        let interest = if wants {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        match registry.reregister(&mut self.channel, self.token, interest) {
            Ok(()) => self.writable = wants,
            Err(err) => {
                tracing::warn!(error = %ErrorChain(&err), "could not change a channel's interest")
            }
        }
    }

    fn deregister(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.channel);
    }
}

/// The shell's side of one worker: its process and its channels.
struct WorkerIo {
    child: Child,
    pid: u32,
    pidfd: Option<(OwnedFd, Token)>,
    control: Option<Registered<PrimaryControl>>,
    handoffs: BTreeMap<ListenerId, Registered<PrimaryHandoff>>,
    reaped: bool,
}

/// The shell's side of one listener.
struct ListenerIo {
    socket: mio::net::TcpListener,
    token: Token,
    /// Registered for accepting, as the core last said.
    accepting: bool,
}

/// A connection the primary holds: its copy of the socket, the peer's address when `accept`
/// reported it, and, for a connection a worker handed back, the bytes it had read and not
/// answered (empty otherwise), which go with it to the next worker.
struct Held {
    fd: OwnedFd,
    peer: Option<SocketAddr>,
    unread: Vec<u8>,
}

/// Everything the primary holds that the core names by id.
pub(crate) struct Shell {
    pub(crate) config: Config,
    pub(crate) registry: Registry,
    tokens: BTreeMap<Token, Source>,
    next_token: usize,
    workers: BTreeMap<WorkerId, WorkerIo>,
    listeners: BTreeMap<ListenerId, ListenerIo>,
    conns: BTreeMap<ConnId, Held>,
    next_conn: u64,
    /// Round-robin listeners with connections left to accept (accepting is bounded per turn
    /// so that one busy listener cannot starve the rest of the loop).
    pub(crate) accept_ready: BTreeSet<ListenerId>,
    /// Signals, when the primary handles any (its own, or SIGCHLD for want of pidfds).
    pub(crate) signals: Option<signal_hook_mio::v1_0::Signals>,
    pub(crate) sigchld: bool,
}

impl Shell {
    pub(crate) fn new(config: Config, registry: Registry) -> Shell {
        let mut tokens = BTreeMap::new();
        tokens.insert(WAKER, Source::Waker);
        tokens.insert(SIGNALS, Source::Signals);
        Shell {
            config,
            registry,
            tokens,
            next_token: 2,
            workers: BTreeMap::new(),
            listeners: BTreeMap::new(),
            conns: BTreeMap::new(),
            next_conn: 1,
            accept_ready: BTreeSet::new(),
            signals: None,
            sigchld: false,
        }
    }

    /// What `token` stands for.
    pub(crate) fn source(&self, token: Token) -> Option<Source> {
        self.tokens.get(&token).copied()
    }

    pub(crate) fn allocate_token(&mut self, source: Source) -> Token {
        let token = Token(self.next_token);
        self.next_token += 1;
        self.tokens.insert(token, source);
        token
    }

    pub(crate) fn release_token(&mut self, token: Token) {
        self.tokens.remove(&token);
    }

    fn hold(&mut self, fd: OwnedFd, peer: Option<SocketAddr>, unread: Vec<u8>) -> ConnId {
        let id = ConnId(self.next_conn);
        self.next_conn += 1;
        self.conns.insert(id, Held { fd, peer, unread });
        id
    }

    // ----- carrying out the core's actions -----

    /// Carries out one action; answers the core at once where the action asks for it. An
    /// event goes back to the caller, for the application.
    pub(crate) fn carry_out(
        &mut self,
        action: Action,
        core: &mut Supervisor,
        now: Instant,
    ) -> Option<Event> {
        match action {
            Action::Spawn { worker, slot, env } => match self.spawn(worker, slot, &env) {
                Ok(pid) => core.handle_spawned(worker, pid),
                Err(err) => {
                    tracing::error!(worker = worker.0, slot = slot.0, error = %ErrorChain(&err), "could not start a worker");
                    core.handle_spawn_failed(worker, err.raw_os_error(), now);
                }
            },
            Action::Send { worker, ack, msg } => self.send(worker, ack, &msg, &[]),
            Action::Bind { listener, addr } => {
                let result = self.bind(listener, addr);
                core.handle_bound(listener, result, now);
            }
            Action::Grant {
                worker,
                ack,
                listener,
                local_addr,
                delivery,
            } => {
                if let Err(refused) = self.grant(worker, ack, listener, local_addr, delivery) {
                    core.handle_grant_failed(worker, ack, listener, refused);
                }
            }
            Action::HandOff {
                worker,
                listener,
                conns,
            } => self.hand_off(worker, listener, &conns),
            Action::Release { conns } => {
                for conn in conns {
                    self.conns.remove(&conn);
                }
            }
            Action::Accept { listener, on } => self.set_accepting(listener, on),
            Action::CloseHandoff { worker, listener } => self.close_handoff(worker, listener),
            Action::CloseControl { worker } => self.close_control(worker),
            Action::Signal {
                worker,
                signal,
                group,
            } => {
                if let Err(err) = self.signal(worker, signal, group) {
                    tracing::debug!(worker = worker.0, error = %ErrorChain(&err), "could not signal a worker");
                }
            }
            Action::MeasureMemory { workers } => {
                for worker in workers {
                    let pid = self
                        .workers
                        .get(&worker)
                        .filter(|io| !io.reaped)
                        .map(|io| io.pid);
                    if let Some(memory) = pid.and_then(crate::memory::of_process) {
                        core.handle_memory(worker, memory, now);
                    }
                }
            }
            Action::Event(event) => return Some(event),
            Action::Finished => {}
        }
        None
    }

    fn spawn(
        &mut self,
        worker: WorkerId,
        slot: cluster_ipc::SlotId,
        env: &[(std::ffi::OsString, std::ffi::OsString)],
    ) -> Result<u32, Error> {
        let spawned = spawn_worker(&self.config, worker, slot, env)?;
        let pid = spawned.child.id();
        let control_token = self.allocate_token(Source::Control(worker));
        let control = match Registered::new(&self.registry, spawned.control, control_token) {
            Ok(control) => Some(control),
            Err(err) => {
                tracing::error!(error = %ErrorChain(&err), "could not watch a worker's channel");
                self.release_token(control_token);
                None
            }
        };
        let pidfd = spawned.pidfd.and_then(|pidfd| {
            let token = self.allocate_token(Source::Pidfd(worker));
            match self.registry.register(
                &mut SourceFd(&pidfd.as_raw_fd()),
                token,
                Interest::READABLE,
            ) {
                Ok(()) => Some((pidfd, token)),
                Err(err) => {
                    tracing::warn!(error = %ErrorChain(&err), "could not watch a pidfd; falling back to SIGCHLD");
                    self.release_token(token);
                    None
                }
            }
        });
        if pidfd.is_none() {
            self.watch_sigchld();
        }
        self.workers.insert(
            worker,
            WorkerIo {
                child: spawned.child,
                pid,
                pidfd,
                control,
                handoffs: BTreeMap::new(),
                reaped: false,
            },
        );
        Ok(pid)
    }

    fn watch_sigchld(&mut self) {
        if self.sigchld {
            return;
        }
        let added = match &self.signals {
            Some(signals) => signals.add_signal(libc::SIGCHLD).is_ok(),
            None => match signal_hook_mio::v1_0::Signals::new([libc::SIGCHLD]) {
                Ok(mut signals) => {
                    let registered = self
                        .registry
                        .register(&mut signals, SIGNALS, Interest::READABLE)
                        .is_ok();
                    self.signals = Some(signals);
                    registered
                }
                Err(_) => false,
            },
        };
        if !added {
            tracing::error!(
                "cannot watch SIGCHLD; workers are reaped only when their channel closes"
            );
        }
        self.sigchld = true;
    }

    fn send(&mut self, worker: WorkerId, ack: Option<u64>, msg: &ToWorker, fds: &[BorrowedFd<'_>]) {
        let Some(control) = control_of(&mut self.workers, worker) else {
            return;
        };
        if let Err(err) = control.channel.send(ack, msg, fds) {
            tracing::debug!(worker = worker.0, error = %ErrorChain(&err), "could not send to a worker");
        }
        control.update_interest(&self.registry);
    }

    /// Sends an encoded message to a worker the core said takes messages.
    pub(crate) fn send_encoded(
        &mut self,
        worker: WorkerId,
        message: &Encoded<ToWorker>,
    ) -> Result<(), Error> {
        let control =
            control_of(&mut self.workers, worker).ok_or(Error::NoSuchWorker { worker })?;
        let sent = control.channel.send_encoded(None, message, &[]);
        control.update_interest(&self.registry);
        sent.map(drop).map_err(Error::from)
    }

    fn bind(
        &mut self,
        listener: ListenerId,
        addr: SocketAddr,
    ) -> Result<SocketAddr, ListenRefused> {
        let bind_error = |err: io::Error| ListenRefused {
            errno: err.raw_os_error().unwrap_or(libc::EINVAL),
            message: err.to_string(),
        };
        let socket = bind_tcp(addr, self.config.backlog).map_err(bind_error)?;
        let local_addr = socket.local_addr().map_err(bind_error)?;
        let token = self.allocate_token(Source::Listener(listener));
        self.listeners.insert(
            listener,
            ListenerIo {
                socket: mio::net::TcpListener::from_std(socket),
                token,
                accepting: false,
            },
        );
        Ok(local_addr)
    }

    /// Makes the fd a grant carries and sends the grant; refuses when the fd cannot be made.
    fn grant(
        &mut self,
        worker: WorkerId,
        ack: u64,
        listener: ListenerId,
        local_addr: SocketAddr,
        delivery: WireDelivery,
    ) -> Result<(), ListenRefused> {
        let fd = match delivery {
            WireDelivery::Handoff { window } => self.open_handoff(worker, listener, window)?,
            WireDelivery::Shared | WireDelivery::ReusePort => self.dup_listener(listener)?,
        };
        let granted = ToWorker::ListenGranted(ListenGranted {
            listener,
            local_addr: ListenAddr::Tcp(local_addr),
            delivery,
        });
        self.send(worker, Some(ack), &granted, &[fd.as_fd()]);
        Ok(())
    }

    fn open_handoff(
        &mut self,
        worker: WorkerId,
        listener: ListenerId,
        window: u32,
    ) -> Result<OwnedFd, ListenRefused> {
        let (ours, theirs) = Channel::pair_with(Transport::SeqPacket, handoff_limits(window))
            .map_err(|err| refused(libc::EMFILE, &format!("handoff socket: {err}")))?;
        let token = self.allocate_token(Source::Handoff(worker, listener));
        let handoff = match Registered::new(&self.registry, ours.into_protocol(), token) {
            Ok(handoff) => handoff,
            Err(err) => {
                self.release_token(token);
                return Err(refused(libc::ENOMEM, &format!("handoff socket: {err}")));
            }
        };
        let Some(io) = self.workers.get_mut(&worker) else {
            self.release_token(token);
            return Err(refused(libc::ESHUTDOWN, "the worker is gone"));
        };
        io.handoffs.insert(listener, handoff);
        Ok(theirs.into_fd())
    }

    fn dup_listener(&self, listener: ListenerId) -> Result<OwnedFd, ListenRefused> {
        let io = self
            .listeners
            .get(&listener)
            .ok_or_else(|| refused(libc::EINVAL, "listener vanished"))?;
        io.socket.as_fd().try_clone_to_owned().map_err(|err| {
            refused(
                err.raw_os_error().unwrap_or(libc::EMFILE),
                "could not duplicate the socket",
            )
        })
    }

    /// Sends connections down a worker's handoff socket, in the order given: runs of plain
    /// connections in `Connections` frames of at most the socket's fd limit, and each
    /// connection that carries unread bytes (one a worker handed back) alone, as `Resumed`.
    /// The worker acks in the same order, which is how the core matches acks to connections.
    /// The copies stay held until the core releases them; if the worker can no longer be
    /// reached they come back when its handoff socket reaches its end.
    fn hand_off(&mut self, worker: WorkerId, listener: ListenerId, conns: &[ConnId]) {
        let Some(handoff) = self
            .workers
            .get_mut(&worker)
            .and_then(|io| io.handoffs.get_mut(&listener))
        else {
            tracing::error!(
                worker = worker.0,
                listener = listener.0,
                "handoff to a worker without a handoff socket"
            );
            return;
        };
        let max_fds = handoff.channel.limits().max_fds().max(1);
        let held: Vec<&Held> = conns.iter().filter_map(|id| self.conns.get(id)).collect();
        for frame in frames(&held, max_fds) {
            let sent = match frame {
                Frame::Batch(batch) => {
                    let fds: Vec<BorrowedFd<'_>> =
                        batch.iter().map(|held| held.fd.as_fd()).collect();
                    // The peers' addresses save each worker a getpeername per connection; all
                    // or none, so that they line up with the fds.
                    let peers: Vec<PeerAddr> = batch
                        .iter()
                        .map(|held| held.peer.map(PeerAddr))
                        .collect::<Option<_>>()
                        .unwrap_or_default();
                    let message = HandoffToWorker::Connections {
                        count: fds.len() as u32,
                        peers,
                    };
                    handoff.channel.send(None, &message, &fds)
                }
                Frame::Resumed(held) => {
                    let message = HandoffToWorker::Resumed {
                        peer: held.peer.map(PeerAddr),
                        unread: held.unread.clone(),
                    };
                    handoff.channel.send(None, &message, &[held.fd.as_fd()])
                }
            };
            if let Err(err) = sent {
                tracing::debug!(worker = worker.0, error = %ErrorChain(&err), "handoff failed; the batch waits for the socket's end");
                break;
            }
        }
        handoff.update_interest(&self.registry);
    }

    fn set_accepting(&mut self, listener: ListenerId, on: bool) {
        let Some(io) = self.listeners.get_mut(&listener) else {
            return;
        };
        if on == io.accepting {
            return;
        }
        if on {
            match self
                .registry
                .register(&mut io.socket, io.token, Interest::READABLE)
            {
                Ok(()) => io.accepting = true,
                Err(err) => {
                    tracing::error!(error = %ErrorChain(&err), "could not register a listener")
                }
            }
            // Registering a socket with clients already waiting reports it ready at once.
        } else {
            let _ = self.registry.deregister(&mut io.socket);
            io.accepting = false;
            self.accept_ready.remove(&listener);
        }
    }

    fn close_handoff(&mut self, worker: WorkerId, listener: ListenerId) {
        let Some(mut handoff) = self
            .workers
            .get_mut(&worker)
            .and_then(|io| io.handoffs.remove(&listener))
        else {
            return;
        };
        handoff.deregister(&self.registry);
        self.release_token(handoff.token);
    }

    fn close_control(&mut self, worker: WorkerId) {
        let Some(mut control) = self
            .workers
            .get_mut(&worker)
            .and_then(|io| io.control.take())
        else {
            return;
        };
        control.deregister(&self.registry);
        self.release_token(control.token);
    }

    /// Signals a worker's process (or its process group), unless it was reaped: its pid may
    /// belong to another process by then.
    pub(crate) fn signal(
        &self,
        worker: WorkerId,
        signal: Signal,
        group: bool,
    ) -> Result<(), Error> {
        let io = self
            .workers
            .get(&worker)
            .filter(|io| !io.reaped)
            .ok_or(Error::NoSuchWorker { worker })?;
        let number = nix::sys::signal::Signal::try_from(signal.as_raw())
            .map_err(|errno| Error::io("kill", errno.into()))?;
        let pid = nix::unistd::Pid::from_raw(io.pid as libc::pid_t);
        if group {
            let _ = nix::sys::signal::killpg(pid, number);
        }
        nix::sys::signal::kill(pid, number).map_err(|errno| Error::io("kill", errno.into()))
    }

    /// Lets go of a worker whose `Exit` went out.
    pub(crate) fn forget(&mut self, worker: WorkerId) {
        if let Some(io) = self.workers.remove(&worker) {
            for token in [io.control.map(|c| c.token), io.pidfd.map(|(_, t)| t)]
                .into_iter()
                .flatten()
                .chain(io.handoffs.values().map(|h| h.token))
            {
                self.tokens.remove(&token);
            }
        }
    }

    // ----- reading, and feeding the core -----

    /// Reads everything the worker's control channel holds.
    pub(crate) fn read_control(&mut self, worker: WorkerId, core: &mut Supervisor) {
        loop {
            let Some(control) = control_of(&mut self.workers, worker) else {
                return;
            };
            match control.channel.try_recv() {
                Ok(Some(envelope)) => self.on_control(worker, envelope, core),
                Ok(None) => break,
                Err(err) => {
                    let error =
                        (!matches!(err, cluster_ipc::Error::Closed)).then(|| err.to_string());
                    self.close_control(worker);
                    core.handle_control_closed(worker, error.as_deref(), Instant::now());
                    return;
                }
            }
        }
        self.flush_control(worker);
    }

    /// Feeds one control message to the core. A `HandBack`'s connection is held, with its
    /// unread bytes, and given to the core by id; a `HandBack` with other than exactly one fd,
    /// or with more unread bytes than the protocol allows (the next worker would refuse its
    /// `Resumed`), goes to the core without one, which takes that for the protocol violation
    /// it is. The fds of every other message are closed: none is meant to carry any.
    fn on_control(
        &mut self,
        worker: WorkerId,
        envelope: Envelope<ToPrimary>,
        core: &mut Supervisor,
    ) {
        let Envelope { seq, msg, fds, .. } = envelope;
        match msg {
            ToPrimary::HandBack { listener, unread } => {
                let conn = match <[OwnedFd; 1]>::try_from(fds) {
                    Ok([fd]) if unread.len() <= MAX_UNREAD_LEN => Some(self.hold(fd, None, unread)),
                    // Dropping them closes them.
                    _ => None,
                };
                core.handle_handed_back(worker, listener, conn, Instant::now());
            }
            msg => {
                drop(fds);
                core.handle_control(worker, seq, msg, Instant::now());
            }
        }
    }

    /// Sends what waits in the worker's control channel.
    pub(crate) fn flush_control(&mut self, worker: WorkerId) {
        if let Some(control) = control_of(&mut self.workers, worker) {
            control.flush(&self.registry);
        }
    }

    /// Reads a handoff socket: acks and returned connections, up to its end.
    pub(crate) fn read_handoff(
        &mut self,
        worker: WorkerId,
        listener: ListenerId,
        core: &mut Supervisor,
    ) {
        loop {
            let Some(handoff) = self
                .workers
                .get_mut(&worker)
                .and_then(|io| io.handoffs.get_mut(&listener))
            else {
                return;
            };
            match handoff.channel.try_recv() {
                Ok(Some(envelope)) => {
                    let returned = envelope
                        .fds
                        .into_iter()
                        .map(|fd| self.hold(fd, None, Vec::new()))
                        .collect();
                    core.handle_handoff(worker, listener, envelope.msg, returned, Instant::now());
                }
                Ok(None) => break,
                Err(err) => {
                    let error =
                        (!matches!(err, cluster_ipc::Error::Closed)).then(|| err.to_string());
                    core.handle_handoff_closed(worker, listener, error.as_deref(), Instant::now());
                    return;
                }
            }
        }
        if let Some(handoff) = self
            .workers
            .get_mut(&worker)
            .and_then(|io| io.handoffs.get_mut(&listener))
        {
            handoff.flush(&self.registry);
        }
    }

    /// Reaps the worker if it exited: reads what its channels still hold (so that nothing it
    /// said is lost and its `Disconnect` comes before its `Exit`), then tells the core.
    pub(crate) fn try_reap(&mut self, worker: WorkerId, core: &mut Supervisor) {
        let Some(io) = self.workers.get_mut(&worker).filter(|io| !io.reaped) else {
            return;
        };
        let status = match io.child.try_wait() {
            Ok(Some(status)) => ExitStatus::from(status),
            Ok(None) => return,
            Err(err) => {
                tracing::warn!(worker = worker.0, error = %ErrorChain(&err), "waitpid failed");
                return;
            }
        };
        io.reaped = true;
        if let Some((pidfd, token)) = io.pidfd.take() {
            let _ = self.registry.deregister(&mut SourceFd(&pidfd.as_raw_fd()));
            self.tokens.remove(&token);
        }
        self.read_control(worker, core);
        if control_of(&mut self.workers, worker).is_some() {
            // The process is gone, so the channel's end was read above; if a child of the
            // worker still holds it, stop waiting for it.
            self.close_control(worker);
        }
        let listeners: Vec<ListenerId> = self
            .workers
            .get(&worker)
            .map(|io| io.handoffs.keys().copied().collect())
            .unwrap_or_default();
        for listener in listeners {
            self.read_handoff(worker, listener, core);
        }
        core.handle_exited(worker, status, Instant::now());
    }

    /// Tries to reap every worker (SIGCHLD coalesces, so one signal may stand for several).
    pub(crate) fn try_reap_all(&mut self, core: &mut Supervisor) {
        let workers: Vec<WorkerId> = self.workers.keys().copied().collect();
        for worker in workers {
            self.try_reap(worker, core);
        }
    }

    /// Accepts up to a turn's worth of connections and gives them to the core.
    pub(crate) fn accept_turn(&mut self, listener: ListenerId, core: &mut Supervisor) {
        let mut accepted = Vec::new();
        let mut drained = false;
        let mut exhausted = false;
        if let Some(io) = self.listeners.get_mut(&listener) {
            for _ in 0..ACCEPTS_PER_TURN {
                if !io.accepting {
                    drained = true;
                    break;
                }
                match io.socket.accept() {
                    Ok((stream, peer)) => accepted.push((OwnedFd::from(stream), peer)),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                        drained = true;
                        break;
                    }
                    Err(err) if matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                        exhausted = true;
                        drained = true;
                        break;
                    }
                    // The client gave up before we got to it, or a transient network error:
                    // nothing to hand out, keep going.
                    Err(err) => tracing::debug!(error = %ErrorChain(&err), "accept failed"),
                }
            }
        } else {
            drained = true;
        }
        if drained {
            self.accept_ready.remove(&listener);
        } else {
            self.accept_ready.insert(listener);
        }
        let ids: Vec<ConnId> = accepted
            .into_iter()
            .map(|(fd, peer)| self.hold(fd, Some(peer), Vec::new()))
            .collect();
        if !ids.is_empty() {
            core.handle_accepted(listener, &ids);
        }
        if exhausted {
            core.handle_fds_exhausted(listener, Instant::now());
        }
    }
}

/// One frame of a hand-off: a batch of plain connections, or one with unread bytes.
enum Frame<'a> {
    Batch(&'a [&'a Held]),
    Resumed(&'a Held),
}

/// Splits connections into the frames that carry them, keeping their order: each run of
/// plain connections in batches of at most `max_fds`, each connection with unread bytes in a
/// frame of its own.
fn frames<'a>(held: &'a [&'a Held], max_fds: usize) -> impl Iterator<Item = Frame<'a>> + 'a {
    held.split_inclusive(|held| !held.unread.is_empty())
        .flat_map(move |run| {
            // Each run ends with the one connection with unread bytes, if it has one.
            let (plain, resumed) = match run.split_last() {
                Some((last, rest)) if !last.unread.is_empty() => (rest, Some(*last)),
                _ => (run, None),
            };
            plain
                .chunks(max_fds)
                .map(Frame::Batch)
                .chain(resumed.map(Frame::Resumed))
        })
}

fn control_of(
    workers: &mut BTreeMap<WorkerId, WorkerIo>,
    worker: WorkerId,
) -> Option<&mut Registered<PrimaryControl>> {
    workers.get_mut(&worker)?.control.as_mut()
}

fn refused(errno: i32, message: &str) -> ListenRefused {
    ListenRefused {
        errno,
        message: message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(unread: &[u8]) -> Held {
        let fd = OwnedFd::from(std::fs::File::open("/dev/null").expect("/dev/null"));
        Held {
            fd,
            peer: None,
            unread: unread.to_vec(),
        }
    }

    /// The frames of a hand-off as text: `B` and the unread bytes of each connection in a
    /// batch, `R` and those of a resumed one.
    fn shape(conns: &[Held], max_fds: usize) -> Vec<String> {
        let refs: Vec<&Held> = conns.iter().collect();
        frames(&refs, max_fds)
            .map(|frame| match frame {
                Frame::Batch(batch) => format!("B{}", batch.len()),
                Frame::Resumed(held) => format!("R{}", String::from_utf8_lossy(&held.unread)),
            })
            .collect()
    }

    #[test]
    fn connections_with_unread_bytes_go_alone_in_their_place() {
        let conns = [
            held(b""),
            held(b""),
            held(b"x"),
            held(b""),
            held(b"y"),
            held(b"z"),
            held(b""),
            held(b""),
            held(b""),
        ];
        assert_eq!(shape(&conns, 2), ["B2", "Rx", "B1", "Ry", "Rz", "B2", "B1"]);
        assert_eq!(shape(&conns[..2], 8), ["B2"]);
        assert_eq!(shape(&conns[2..3], 8), ["Rx"]);
        assert!(shape(&[], 8).is_empty());
    }
}
