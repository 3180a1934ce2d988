//! Conversations on a worker's control channel: handshake, listen requests, disconnects,
//! messages.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use cluster_ipc::proto::{
    Delivery as WireDelivery, Envelope, ListenAddr, ListenGranted, ListenMode, ListenRefused,
    ListenRequest, PROTOCOL_VERSION, ToPrimary, ToWorker, handoff_limits,
};
use cluster_ipc::{ListenerId, Transport, WorkerId};

use crate::cluster::{Cluster, Registered, Source};
use crate::config::Policy;
use crate::event::{Event, WorkerState};
use crate::listen::{Delivery, Dispatcher, ListenKey, Listener, bind_tcp};

/// What a listen request got: the reply, and the fd to attach to it.
type ListenOutcome = Result<(ListenGranted, OwnedFd), ListenRefused>;

impl Cluster {
    /// Reads everything the worker's control channel holds.
    pub(crate) fn on_control_readable(&mut self, id: WorkerId) {
        loop {
            let Some(control) = self.workers.get_mut(&id).and_then(|w| w.control.as_mut()) else {
                return;
            };
            match control.channel.try_recv() {
                Ok(Some(envelope)) => self.on_control_message(id, envelope),
                Ok(None) => break,
                Err(cluster_ipc::Error::Closed) => {
                    self.control_closed(id);
                    return;
                }
                Err(err) => {
                    self.protocol_violation(id, &format!("control channel: {err}"));
                    return;
                }
            }
        }
        self.flush_control(id);
    }

    pub(crate) fn flush_control(&mut self, id: WorkerId) {
        let Some(control) = self.workers.get_mut(&id).and_then(|w| w.control.as_mut()) else {
            return;
        };
        control.flush(&self.registry);
    }

    fn on_control_message(&mut self, id: WorkerId, envelope: Envelope<ToPrimary>) {
        let Some(state) = self.workers.get(&id).map(|worker| worker.state) else {
            return;
        };
        let seq = envelope.seq;
        match (state, envelope.msg) {
            (
                WorkerState::Starting,
                ToPrimary::Hello {
                    worker_id,
                    pid,
                    protocol_version,
                },
            ) => {
                self.on_hello(id, seq, worker_id, pid, protocol_version);
            }
            (WorkerState::Starting, other) => {
                self.protocol_violation(id, &format!("{other:?} before Hello"));
            }
            (_, ToPrimary::User(message)) => {
                self.events.push_back(Event::Message {
                    worker: id,
                    message,
                });
            }
            (_, ToPrimary::Listen(request)) => self.on_listen(id, seq, request),
            (
                _,
                ToPrimary::Listening {
                    listener,
                    local_addr,
                },
            ) => {
                self.on_listening(id, listener, local_addr);
            }
            (_, ToPrimary::CloseListener { listener }) => self.on_close_listener(id, listener),
            (_, ToPrimary::Disconnecting) => self.on_worker_leaving(id, false),
            (_, ToPrimary::Retire) => {
                self.on_worker_leaving(id, true);
                self.reply(id, seq, &ToWorker::Ack, &[]);
            }
            (_, ToPrimary::Ack) => {}
            (_, ToPrimary::LoadReport { open_connections }) => {
                self.on_load_report(id, open_connections);
            }
            (_, other @ ToPrimary::Hello { .. }) => {
                self.protocol_violation(id, &format!("unexpected {other:?}"))
            }
        }
    }

    fn on_hello(&mut self, id: WorkerId, seq: u64, worker_id: WorkerId, pid: u32, version: u32) {
        let refusal = if version != PROTOCOL_VERSION {
            Some(format!(
                "protocol version {version} is not the primary's {PROTOCOL_VERSION}: \
                 the worker runs a different build"
            ))
        } else if worker_id != id {
            Some(format!(
                "worker says it is {worker_id}, but it was started as {id}"
            ))
        } else {
            None
        };
        if let Some(reason) = refusal {
            tracing::error!(worker = %id, %reason, "refusing worker");
            self.reply(
                id,
                seq,
                &ToWorker::Refused {
                    reason: reason.clone(),
                },
                &[],
            );
            self.protocol_violation(id, &reason);
            return;
        }
        let welcome = ToWorker::Welcome {
            primary_pid: self.primary_pid,
            protocol_version: PROTOCOL_VERSION,
            drain_timeout_ms: u64::try_from(
                drain_timeout(self.config.shutdown_timeout).as_millis(),
            )
            .unwrap_or(u64::MAX),
            // The limits were checked to fit a u32 when they were made.
            max_message_len: u32::try_from(self.config.control_limits.max_message_len())
                .unwrap_or(u32::MAX),
            load_reports: self.config.policy == Policy::LeastConnections,
        };
        self.reply(id, seq, &welcome, &[]);
        if let Some(worker) = self.workers.get_mut(&id) {
            if worker.pid != pid {
                tracing::debug!(worker = %id, reported = pid, actual = worker.pid, "worker reports another pid");
            }
            worker.state = WorkerState::Online;
        }
        self.events.push_back(Event::Online { worker: id });
    }

    /// Sends a reply on a worker's control channel. A closed channel is not an error here:
    /// its end of file is handled where it is read.
    pub(crate) fn reply(&mut self, id: WorkerId, ack: u64, msg: &ToWorker, fds: &[BorrowedFd<'_>]) {
        let Some(control) = self.workers.get_mut(&id).and_then(|w| w.control.as_mut()) else {
            return;
        };
        if let Err(err) = control.channel.send(Some(ack), msg, fds) {
            tracing::debug!(worker = %id, %err, "could not reply");
        }
        control.update_interest(&self.registry);
    }

    fn on_listen(&mut self, id: WorkerId, seq: u64, request: ListenRequest) {
        match self.listen_for(id, &request) {
            Ok((granted, fd)) => {
                self.reply(id, seq, &ToWorker::ListenGranted(granted), &[fd.as_fd()]);
            }
            Err(refused) => {
                tracing::info!(worker = %id, errno = refused.errno, message = %refused.message, "listen refused");
                self.reply(id, seq, &ToWorker::ListenRefused(refused), &[]);
            }
        }
    }

    fn listen_for(&mut self, id: WorkerId, request: &ListenRequest) -> ListenOutcome {
        let leaving = self.workers.get(&id).is_none_or(|w| w.leaving.is_leaving());
        if leaving || self.stopping {
            return Err(refused(libc::ESHUTDOWN, "the worker is disconnecting"));
        }
        let addr = match &request.addr {
            ListenAddr::Tcp(addr) => *addr,
            other => {
                return Err(refused(
                    libc::EAFNOSUPPORT,
                    &format!("{other:?}: only TCP is served yet"),
                ));
            }
        };
        let mode = request.mode.unwrap_or(self.config.mode);
        if mode == ListenMode::ReusePort {
            return Err(refused(
                libc::EOPNOTSUPP,
                "reuse-port listeners are not served yet",
            ));
        }
        let key = ListenKey::new(addr, request.index);
        let listener_id = match self.listener_keys.get(&key) {
            Some(&existing) => existing,
            None => self.open_listener(key, mode)?,
        };
        self.join_listener(id, listener_id, mode)
    }

    fn open_listener(
        &mut self,
        key: ListenKey,
        mode: ListenMode,
    ) -> Result<ListenerId, ListenRefused> {
        let bind_error = |err: std::io::Error| {
            refused(
                err.raw_os_error().unwrap_or(libc::EINVAL),
                &format!("bind {}: {err}", key.addr),
            )
        };
        let socket = bind_tcp(key.addr, self.config.backlog).map_err(bind_error)?;
        let local_addr = socket.local_addr().map_err(bind_error)?;
        let id = ListenerId(self.next_listener);
        self.next_listener += 1;
        let token = self.allocate_token(Source::Listener(id));
        let delivery = match mode {
            ListenMode::RoundRobin => {
                Delivery::RoundRobin(Dispatcher::new(self.config.policy, self.config.window))
            }
            ListenMode::Shared | ListenMode::ReusePort => Delivery::Shared,
        };
        let listener = Listener {
            id,
            local_addr,
            mode,
            socket: mio::net::TcpListener::from_std(socket),
            token,
            members: Default::default(),
            delivery,
        };
        tracing::info!(listener = %id, addr = %local_addr, ?mode, "listening");
        self.listeners.insert(id, listener);
        self.listener_keys.insert(key, id);
        if mode == ListenMode::RoundRobin {
            self.set_accepting(id, true);
        }
        Ok(id)
    }

    fn join_listener(
        &mut self,
        id: WorkerId,
        listener_id: ListenerId,
        mode: ListenMode,
    ) -> ListenOutcome {
        let Some(listener) = self.listeners.get(&listener_id) else {
            return Err(refused(libc::EINVAL, "listener vanished"));
        };
        let addr = listener.local_addr;
        if listener.mode != mode {
            let message = format!("{addr} is already listened in {:?} mode", listener.mode);
            return Err(refused(libc::EADDRINUSE, &message));
        }
        if listener.members.contains(&id) {
            return Err(refused(
                libc::EADDRINUSE,
                &format!("this worker already listens on {addr}"),
            ));
        }
        let (delivery, fd) = match mode {
            ListenMode::RoundRobin => self.join_round_robin(id, listener_id)?,
            ListenMode::Shared | ListenMode::ReusePort => self.join_shared(id, listener_id)?,
        };
        let granted = ListenGranted {
            listener: listener_id,
            local_addr: ListenAddr::Tcp(addr),
            delivery,
        };
        Ok((granted, fd))
    }

    fn join_shared(
        &mut self,
        id: WorkerId,
        listener_id: ListenerId,
    ) -> Result<(WireDelivery, OwnedFd), ListenRefused> {
        let listener = self
            .listeners
            .get_mut(&listener_id)
            .ok_or_else(|| refused(libc::EINVAL, "listener vanished"))?;
        let fd = listener
            .socket
            .as_fd()
            .try_clone_to_owned()
            .map_err(|err| {
                refused(
                    err.raw_os_error().unwrap_or(libc::EMFILE),
                    "could not duplicate the socket",
                )
            })?;
        listener.members.insert(id);
        if let Some(worker) = self.workers.get_mut(&id) {
            worker.shared.insert(listener_id);
        }
        Ok((WireDelivery::Shared, fd))
    }

    fn join_round_robin(
        &mut self,
        id: WorkerId,
        listener_id: ListenerId,
    ) -> Result<(WireDelivery, OwnedFd), ListenRefused> {
        let window = self.config.window.get();
        let (ours, theirs) =
            cluster_ipc::Channel::pair_with(Transport::SeqPacket, handoff_limits(window))
                .map_err(|err| refused(libc::EMFILE, &format!("handoff socket: {err}")))?;
        let ours = ours.into_protocol();
        let token = self.allocate_token(Source::Handoff(id, listener_id));
        let handoff = match Registered::new(&self.registry, ours, token) {
            Ok(handoff) => handoff,
            Err(err) => {
                self.release_token(token);
                return Err(refused(libc::ENOMEM, &format!("handoff socket: {err}")));
            }
        };
        let Some(worker) = self.workers.get_mut(&id) else {
            return Err(refused(libc::ESHUTDOWN, "the worker is gone"));
        };
        worker.handoffs.insert(listener_id, handoff);
        if let Some(listener) = self.listeners.get_mut(&listener_id) {
            listener.members.insert(id);
            if let Delivery::RoundRobin(dispatcher) = &mut listener.delivery {
                if let Err(err) = dispatcher.policy.worker_joined(id) {
                    tracing::error!(worker = %id, %err, "scheduler refused a worker");
                }
            }
        }
        self.apply_actions(listener_id);
        Ok((WireDelivery::Handoff { window }, theirs.into_fd()))
    }

    fn on_listening(&mut self, id: WorkerId, listener: ListenerId, local_addr: ListenAddr) {
        let holds = self
            .workers
            .get(&id)
            .is_some_and(|w| w.handoffs.contains_key(&listener) || w.shared.contains(&listener));
        let Some(addr) = self
            .listeners
            .get(&listener)
            .map(|l| l.local_addr)
            .filter(|_| holds)
        else {
            self.protocol_violation(
                id,
                &format!("Listening on {listener:?}, which it was not granted"),
            );
            return;
        };
        if local_addr != ListenAddr::Tcp(addr) {
            tracing::debug!(worker = %id, ?local_addr, %addr, "worker reports another address");
        }
        if let Some(worker) = self.workers.get_mut(&id) {
            if worker.state == WorkerState::Online {
                worker.state = WorkerState::Listening;
            }
            worker.reached_listening = true;
        }
        self.events.push_back(Event::Listening { worker: id, addr });
        self.check_ready();
    }

    fn check_ready(&mut self) {
        if self.ready_sent {
            return;
        }
        let listening = self
            .workers
            .values()
            .filter(|w| w.state == WorkerState::Listening && !w.leaving.is_leaving())
            .count();
        if listening >= self.config.workers {
            self.ready_sent = true;
            let addrs = self.listeners.values().map(|l| l.local_addr).collect();
            self.events.push_back(Event::Ready { addrs });
        }
    }

    fn on_close_listener(&mut self, id: WorkerId, listener_id: ListenerId) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        if worker.shared.remove(&listener_id) {
            if let Some(listener) = self.listeners.get_mut(&listener_id) {
                listener.members.remove(&id);
            }
        } else if worker.handoffs.contains_key(&listener_id) {
            // The handoff socket's end of file follows; until then send it nothing more.
            self.drain_worker_in(listener_id, id);
        }
    }

    fn on_worker_leaving(&mut self, id: WorkerId, retiring: bool) {
        let shutdown_timeout = self.config.shutdown_timeout;
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        worker.leaving.by_itself = true;
        if worker.state != WorkerState::Disconnected {
            worker.state = WorkerState::Disconnecting;
        }
        // A worker that leaves by itself gets the same time to finish as one that was asked.
        let deadline = std::time::Instant::now() + shutdown_timeout;
        worker.kill_at = Some(worker.kill_at.map_or(deadline, |at| at.min(deadline)));
        let slot = worker.slot;
        let replace = retiring && !worker.leaving.replaced;
        if replace {
            worker.leaving.replaced = true;
        }
        self.stop_dispatching_to(id);
        if replace && !self.stopping {
            tracing::info!(worker = %id, %slot, "worker retires; starting its replacement");
            self.spawn_into(slot);
        }
    }

    /// A worker's open-connection count, for the least-connections policy of every listener
    /// it takes connections from.
    fn on_load_report(&mut self, id: WorkerId, open: u32) {
        if let Some(worker) = self.workers.get_mut(&id) {
            worker.reported_open = Some(open);
        }
        for listener_id in self.round_robin_listeners_of(id) {
            if let Some(Delivery::RoundRobin(dispatcher)) = self
                .listeners
                .get_mut(&listener_id)
                .map(|l| &mut l.delivery)
            {
                if let Err(err) = dispatcher.policy.load_report(id, open) {
                    tracing::debug!(worker = %id, %err, "load report for a worker the policy does not know");
                }
            }
            self.apply_actions(listener_id);
        }
    }

    /// A worker broke the protocol: log it, stop talking to it, and kill it; its exit will
    /// be handled like a crash (it is replaced).
    pub(crate) fn protocol_violation(&mut self, id: WorkerId, what: &str) {
        tracing::error!(worker = %id, what, "protocol violation; killing the worker");
        if let Some(worker) = self.workers.get(&id) {
            if !worker.reaped {
                let _ = nix::sys::signal::killpg(
                    crate::cluster::pid_of(worker.pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        self.stop_dispatching_to(id);
        self.control_closed(id);
    }

    /// The worker's control channel reached its end: the worker is gone or going. Read what
    /// its handoff sockets still hold, let its listeners forget it, tell the application.
    pub(crate) fn control_closed(&mut self, id: WorkerId) {
        let shutdown_timeout = self.config.shutdown_timeout;
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        let Some(mut control) = worker.control.take() else {
            return;
        };
        control.deregister(&self.registry);
        let token = control.token;
        drop(control);
        worker.state = WorkerState::Disconnected;
        // A process that closed its channel but lingers is killed after the grace period.
        let deadline = std::time::Instant::now() + shutdown_timeout;
        worker.kill_at = Some(worker.kill_at.map_or(deadline, |at| at.min(deadline)));
        let shared: Vec<ListenerId> = std::mem::take(&mut worker.shared).into_iter().collect();
        self.release_token(token);
        for listener_id in shared {
            if let Some(listener) = self.listeners.get_mut(&listener_id) {
                listener.members.remove(&id);
            }
        }
        self.stop_dispatching_to(id);
        self.report_disconnect(id);
    }

    pub(crate) fn report_disconnect(&mut self, id: WorkerId) {
        if let Some(worker) = self.workers.get_mut(&id) {
            if !worker.disconnect_reported {
                worker.disconnect_reported = true;
                self.events.push_back(Event::Disconnect { worker: id });
            }
        }
    }
}

/// The time a worker gives itself to finish: a little less than the shutdown timeout after
/// which the primary kills it, so that a worker that runs out of time exits by itself rather
/// than racing the SIGKILL.
fn drain_timeout(shutdown_timeout: std::time::Duration) -> std::time::Duration {
    let margin = (shutdown_timeout / 10).min(std::time::Duration::from_secs(1));
    shutdown_timeout - margin
}

fn refused(errno: i32, message: &str) -> ListenRefused {
    ListenRefused {
        errno,
        message: message.to_owned(),
    }
}
