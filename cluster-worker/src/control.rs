//! The control thread: the one owner of the control channel, and the one driver of the
//! worker's state.
//!
//! A mio loop over three sources: the control channel, a waker that application threads use
//! after queueing a [`Command`] or making room in a full inbox, and (optionally) a self-pipe
//! written on `SIGTERM`. Each turn it reads what the channel holds (unless the inbox is full:
//! then it leaves the rest in the socket, and the primary's send queue, until the
//! application reads), runs the queued commands, expires requests, flushes, and decides
//! whether a disconnecting worker may exit; then it sleeps until the next event or deadline.
//! Application threads never touch the channel.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use cluster_ipc::ErrorChain;
use cluster_ipc::proto::{Encoded, Envelope, ListenGranted, ToPrimary, ToWorker, WorkerControl};
use cluster_ipc::{Channel, Completion, ListenerId, Requests};
use mio::{Events, Interest, Poll, Token};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::Error;
use crate::listener::{Listener, ListenerCore};
use crate::signal::SigtermPipe;
use crate::state::{Answer, Command, DisconnectReason, Ticket, WorkerState, deadline_after};

pub(crate) const CHANNEL: Token = Token(0);
pub(crate) const WAKER: Token = Token(1);
const SIGTERM: Token = Token(2);

/// User messages may fill the channel's outgoing queue only this far, so that control
/// messages (`CloseListener`, `Disconnecting`) always have room behind them.
const USER_QUEUE_SHARE: usize = 3 * 1024 * 1024;

/// How long an exiting worker waits for its last frames to leave.
const EXIT_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The least time between two load reports.
const LOAD_REPORT_INTERVAL: Duration = Duration::from_millis(10);

/// A request waiting for the primary's reply, and the ticket its caller waits on.
enum Pending {
    Listen { addr: SocketAddr, ticket: Ticket },
    Retire { ticket: Ticket },
}

/// The control thread's state.
pub(crate) struct ControlLoop {
    worker: Arc<WorkerState>,
    poll: Poll,
    channel: Channel<WorkerControl>,
    channel_open: bool,
    registered_for_write: bool,
    sigterm: Option<SigtermPipe>,
    requests: Requests<Pending, Envelope<ToWorker>>,
    /// Listeners to close on disconnect. Weak: a listener the application dropped is gone.
    listeners: BTreeMap<ListenerId, Weak<ListenerCore>>,
    disconnecting_since: Option<Instant>,
    /// When the last load report went.
    last_load_report: Option<Instant>,
}

impl ControlLoop {
    /// Registers the channel (and `SIGTERM`, if asked) with `poll`, whose registry already
    /// holds the worker's waker.
    pub(crate) fn new(
        worker: Arc<WorkerState>,
        poll: Poll,
        mut channel: Channel<WorkerControl>,
        handle_sigterm: bool,
    ) -> Result<ControlLoop, Error> {
        poll.registry()
            .register(&mut channel, CHANNEL, Interest::READABLE)
            .map_err(|err| Error::io("epoll_ctl (control channel)", err))?;
        let sigterm = if handle_sigterm {
            let mut pipe = SigtermPipe::register()?;
            poll.registry()
                .register(pipe.source(), SIGTERM, Interest::READABLE)
                .map_err(|err| Error::io("epoll_ctl (signal pipe)", err))?;
            Some(pipe)
        } else {
            None
        };
        Ok(ControlLoop {
            worker,
            poll,
            channel,
            channel_open: true,
            registered_for_write: false,
            sigterm,
            requests: Requests::default(),
            listeners: BTreeMap::new(),
            disconnecting_since: None,
            last_load_report: None,
        })
    }

    /// Runs until the channel closes (and, when the worker exits by itself, until it exits).
    pub(crate) fn run(self) {
        let worker = Arc::clone(&self.worker);
        let span = tracing::info_span!("worker", id = worker.id.0, slot = worker.slot.0);
        let _entered = span.enter();
        worker.register_control_thread();
        let exit_when_disconnected = worker.options.exit_when_disconnected;
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_loop()));
        // Everything the loop owned (channel, poll, signal pipe) is dropped by now, even
        // after a panic: the primary has seen the channel close.
        if outcome.is_err() {
            tracing::error!("the worker's control thread panicked");
            worker.close_channel(None);
            worker.publish_disconnect(DisconnectReason::ChannelClosed);
            if exit_when_disconnected {
                // The worker cannot drain without its control thread; exit as a panic would.
                std::process::exit(101);
            }
        }
        worker.mark_finished();
    }

    fn run_loop(mut self) {
        let mut events = Events::with_capacity(16);
        loop {
            self.turn();
            if !self.channel_open && !self.worker.options.exit_when_disconnected {
                break;
            }
            let timeout = self.next_timeout();
            if let Err(err) = self.poll.poll(&mut events, timeout) {
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %ErrorChain(&err), "the worker's control loop cannot poll");
                self.on_channel_closed(cluster_ipc::Error::Closed);
                self.exit_if_asked("the control loop failed");
                break;
            }
            let signalled = events.iter().any(|event| event.token() == SIGTERM);
            if signalled && self.sigterm.as_mut().is_some_and(SigtermPipe::drain) {
                tracing::info!("SIGTERM received");
                self.begin_disconnect(DisconnectReason::Signal);
            }
        }
        self.finish();
    }

    /// One turn: everything that can be done now.
    fn turn(&mut self) {
        self.receive();
        // Flush first: commands held back by a full channel go as soon as it drains.
        self.flush();
        // Before the commands, which may stop at a full channel: a due heartbeat does not
        // wait behind them.
        self.send_heartbeat();
        self.run_commands();
        self.report_load();
        self.requests.on_time(Instant::now());
        self.complete_requests();
        self.flush();
        self.exit_when_drained();
    }

    /// Tells the primary the open-connection count when it changed, at most once per
    /// [`LOAD_REPORT_INTERVAL`] (the timeout brings a later turn for what is still due).
    fn report_load(&mut self) {
        if !self.channel_open || !self.worker.load_reports {
            return;
        }
        let now = Instant::now();
        if self
            .last_load_report
            .is_some_and(|at| now < at + LOAD_REPORT_INTERVAL)
        {
            return;
        }
        let Some(open) = self.worker.take_load_change() else {
            return;
        };
        // Sent even when the count is what it was: connections came and went since, and the
        // primary counts what it handed over since the last report until the next one.
        let open = u32::try_from(open).unwrap_or(u32::MAX);
        self.last_load_report = Some(now);
        self.send_control(
            None,
            &ToPrimary::LoadReport {
                open_connections: open,
            },
        );
    }

    /// Sends the heartbeat the serving path asked for, if it did (see
    /// [`WorkerState::heartbeat`]): this thread never sends one on its own account.
    fn send_heartbeat(&mut self) {
        let Some(connections) = self.worker.take_heartbeat() else {
            return;
        };
        self.send_control(None, &ToPrimary::Heartbeat { connections });
    }

    fn next_timeout(&self) -> Option<Duration> {
        let drain = self
            .disconnecting_since
            .filter(|_| self.worker.options.exit_when_disconnected)
            .map(|since| since + self.worker.drain_timeout);
        let report = self
            .last_load_report
            .filter(|_| self.channel_open && self.worker.load_report_due())
            .map(|at| at + LOAD_REPORT_INTERVAL);
        [self.requests.next_deadline(), drain, report]
            .into_iter()
            .flatten()
            .min()
            .map(|at| at.saturating_duration_since(Instant::now()))
    }

    // ----- the channel -----

    /// Reads what the channel holds, as long as the inbox has room: a full inbox leaves the
    /// rest unread (the application's next `recv_message` wakes this thread). Nothing is
    /// lost while the loop is not reading: mio reports readiness only on change, but every
    /// turn reads again, whatever woke it.
    fn receive(&mut self) {
        self.worker.deliver_queued();
        let mut may_read = self.worker.may_read_messages();
        while self.channel_open && may_read {
            match self.channel.try_recv() {
                Ok(Some(envelope)) => may_read = self.on_envelope(envelope),
                Ok(None) => break,
                Err(err) => self.on_channel_closed(err),
            }
        }
    }

    /// Handles one message from the primary; returns whether to read on.
    fn on_envelope(&mut self, envelope: Envelope<ToWorker>) -> bool {
        // Replies complete their requests; everything else comes back.
        let Some(envelope) = self.requests.on_frame(envelope) else {
            return true;
        };
        match envelope.msg {
            ToWorker::User(message) => return self.worker.deliver(message),
            ToWorker::Disconnect => {
                // The primary logs the decision; this side of it is detail.
                tracing::debug!("the primary asked this worker to disconnect");
                self.begin_disconnect(DisconnectReason::Primary);
            }
            ToWorker::Heartbeat => self.send_control(Some(envelope.seq), &ToPrimary::Ack),
            other => {
                tracing::warn!(message = ?other, "ignoring an unexpected message from the primary")
            }
        }
        true
    }

    /// Sends a control message that needs no answer (dropped if the primary is gone).
    fn send_control(&mut self, ack: Option<u64>, message: &ToPrimary) {
        if !self.channel_open {
            return;
        }
        if let Err(err) = self.channel.send(ack, message, &[]) {
            self.on_send_error(err, "a control message");
        }
    }

    fn on_send_error(&mut self, err: cluster_ipc::Error, what: &'static str) {
        if self.channel.is_closed() {
            self.on_channel_closed(err);
        } else {
            tracing::warn!(error = %ErrorChain(&err), "could not send {what} to the primary");
        }
    }

    fn flush(&mut self) {
        if !self.channel_open {
            return;
        }
        if let Err(err) = self.channel.flush() {
            self.on_channel_closed(err);
            return;
        }
        let wants_write = self.channel.wants_write();
        if wants_write != self.registered_for_write {
            let interest = if wants_write {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            match self
                .poll
                .registry()
                .reregister(&mut self.channel, CHANNEL, interest)
            {
                Ok(()) => self.registered_for_write = wants_write,
                Err(err) => {
                    tracing::error!(error = %ErrorChain(&err), "cannot reregister the control channel")
                }
            }
        }
    }

    /// The primary is gone (end of file) or the channel broke (a protocol error from the
    /// primary, such as a frame of the wrong kind, which the channel has already closed
    /// itself for): fail what waits on it and disconnect. Says why once.
    fn on_channel_closed(&mut self, err: cluster_ipc::Error) {
        if !self.channel_open {
            return;
        }
        self.channel_open = false;
        let failure = match err {
            cluster_ipc::Error::Closed => {
                tracing::info!("the primary closed the control channel");
                None
            }
            err => {
                tracing::error!(error = %ErrorChain(&err), "the control channel failed");
                Some(err)
            }
        };
        let _ = self.poll.registry().deregister(&mut self.channel);
        self.requests.on_closed();
        self.complete_requests();
        self.worker.close_channel(failure);
        self.begin_disconnect(DisconnectReason::ChannelClosed);
    }

    // ----- commands from application threads -----

    /// Runs the queued commands in order, until one finds no room in the channel: it and
    /// the ones after it go back to the queue for a later turn. Returns true when every
    /// command taken was carried out.
    fn run_commands(&mut self) -> bool {
        let mut commands = self.worker.take_commands();
        if commands.is_empty() {
            return true;
        }
        let mut sent_bytes = 0;
        while let Some(command) = commands.pop_front() {
            let bytes = command.send_bytes();
            match self.run_command(command) {
                Ok(()) => sent_bytes += bytes,
                Err(command) => {
                    commands.push_front(command);
                    break;
                }
            }
        }
        let all_done = commands.is_empty();
        self.worker.commands_done(commands, sent_bytes);
        all_done
    }

    /// Carries out one command; gives it back if the channel has no room for it now. Once
    /// the channel is closed every command fails (or, for the ones nobody waits on, is
    /// dropped).
    fn run_command(&mut self, command: Command) -> Result<(), Command> {
        match command {
            Command::Send(message) => return self.send_user(message),
            Command::Listen {
                request,
                addr,
                ticket,
            } => {
                if self.disconnecting_since.is_some() {
                    self.worker.answer(ticket, Err(Error::Disconnecting));
                    return Ok(());
                }
                let message = ToPrimary::Listen(request.clone());
                if !self.send_request(&message, Pending::Listen { addr, ticket }) {
                    return Err(Command::Listen {
                        request,
                        addr,
                        ticket,
                    });
                }
            }
            Command::Retire { ticket } => {
                if self.disconnecting_since.is_some() {
                    self.worker.answer(ticket, Err(Error::Disconnecting));
                    return Ok(());
                }
                if !self.send_request(&ToPrimary::Retire, Pending::Retire { ticket }) {
                    return Err(Command::Retire { ticket });
                }
            }
            Command::Disconnect => self.begin_disconnect(DisconnectReason::Requested),
            Command::CloseListener(listener) => {
                self.listeners.remove(&listener);
                self.send_control(None, &ToPrimary::CloseListener { listener });
            }
            Command::HandBack { message, fd } => return self.send_hand_back(message, fd),
        }
        Ok(())
    }

    /// Sends a connection back to the primary; gives the command back if the channel has no
    /// room for it now. Once the channel is closed or broken nobody can take the connection:
    /// it is closed here (its client sees the end of the stream and may try again).
    fn send_hand_back(&mut self, message: Encoded<ToPrimary>, fd: OwnedFd) -> Result<(), Command> {
        if !self.channel_open {
            return Ok(());
        }
        match self.channel.send_encoded(None, &message, &[fd.as_fd()]) {
            // Sent, or queued with a duplicate of the fd: this copy closes here.
            Ok(_) => Ok(()),
            Err(cluster_ipc::Error::SendQueueFull { .. }) => Err(Command::HandBack { message, fd }),
            Err(err) => {
                self.on_send_error(err, "a handed-back connection");
                Ok(())
            }
        }
    }

    fn send_user(&mut self, message: Encoded<ToPrimary>) -> Result<(), Command> {
        if !self.channel_open {
            return Ok(());
        }
        let queued = self.channel.queued_bytes();
        if queued > 0 && queued + message.body().len() > USER_QUEUE_SHARE {
            return Err(Command::Send(message));
        }
        match self.channel.send_encoded(None, &message, &[]) {
            Ok(_) => Ok(()),
            Err(cluster_ipc::Error::SendQueueFull { .. }) => Err(Command::Send(message)),
            Err(err) => {
                // `send` checked the message against limits no larger than the channel's,
                // so only a broken channel gets here.
                self.on_send_error(err, "a message");
                Ok(())
            }
        }
    }

    /// Sends a request and tracks its reply. Returns false, keeping nothing, when the channel
    /// has no room for it now; any other failure is answered to the caller at once.
    fn send_request(&mut self, message: &ToPrimary, pending: Pending) -> bool {
        if !self.channel_open {
            self.fail_pending(pending, Error::ChannelClosed);
            return true;
        }
        let seq = match self.channel.send(None, message, &[]) {
            Ok(seq) => seq,
            Err(cluster_ipc::Error::SendQueueFull { .. }) => return false,
            Err(err) => {
                let error = if self.channel.is_closed() {
                    self.on_channel_closed(err);
                    Error::ChannelClosed
                } else if matches!(err, cluster_ipc::Error::Closed) {
                    // The primary stopped reading; its end of file follows.
                    Error::ChannelClosed
                } else {
                    tracing::warn!(error = %ErrorChain(&err), "could not send a request");
                    Error::Ipc(err)
                };
                self.fail_pending(pending, error);
                return true;
            }
        };
        let deadline = deadline_after(self.worker.options.request_timeout);
        // A fresh seq is never pending; should the table refuse it anyway, the caller hears
        // nothing and gives up at its own deadline.
        if let Err(err) = self.requests.register(seq, pending, Some(deadline)) {
            tracing::error!(error = %ErrorChain(&err), "cannot track a request");
        }
        true
    }

    fn fail_pending(&self, pending: Pending, error: Error) {
        let ticket = match pending {
            Pending::Listen { ticket, .. } | Pending::Retire { ticket } => ticket,
        };
        self.worker.answer(ticket, Err(error));
    }

    // ----- replies -----

    fn complete_requests(&mut self) {
        while let Some(Completion { key, outcome, .. }) = self.requests.poll_completion() {
            match key {
                Pending::Listen { addr, ticket } => {
                    let result = outcome
                        .map_err(|err| request_error("listen", err, &self.worker))
                        .and_then(|reply| self.finish_listen(addr, reply))
                        .map(Answer::Listener);
                    // If the caller gave up, the listener drops there and closes itself.
                    self.worker.answer(ticket, result);
                }
                Pending::Retire { ticket } => {
                    let result = outcome
                        .map_err(|err| request_error("retire", err, &self.worker))
                        .and_then(expect_ack)
                        .map(|()| Answer::Retired);
                    if let Err(err) = &result {
                        tracing::warn!(error = %ErrorChain(err), "retiring without the primary's ack");
                    }
                    self.begin_disconnect(DisconnectReason::Retired);
                    self.worker.answer(ticket, result);
                }
            }
        }
    }

    fn finish_listen(
        &mut self,
        addr: SocketAddr,
        reply: Envelope<ToWorker>,
    ) -> Result<Listener, Error> {
        match reply.msg {
            ToWorker::ListenGranted(granted) => self.set_up_listener(&granted, reply.fds),
            ToWorker::ListenRefused(refused) => Err(Error::ListenRefused {
                addr,
                errno: refused.errno,
                message: refused.message,
            }),
            other => Err(Error::protocol(
                "listening",
                format!("unexpected reply {other:?}"),
            )),
        }
    }

    fn set_up_listener(
        &mut self,
        granted: &ListenGranted,
        fds: Vec<OwnedFd>,
    ) -> Result<Listener, Error> {
        let id = granted.listener;
        let listener = match <[OwnedFd; 1]>::try_from(fds) {
            Ok([fd]) => Listener::from_grant(Arc::clone(&self.worker), granted, fd),
            Err(fds) => Err(Error::protocol(
                "listening",
                format!("a grant must carry one fd, not {}", fds.len()),
            )),
        };
        let listener = match listener {
            Ok(listener) => listener,
            Err(err) => {
                // The primary granted it; it must hear that this worker will not use it.
                self.send_control(None, &ToPrimary::CloseListener { listener: id });
                return Err(err);
            }
        };
        if self.disconnecting_since.is_some() {
            if listener.core().shut() {
                self.send_control(None, &ToPrimary::CloseListener { listener: id });
            }
            return Err(Error::Disconnecting);
        }
        self.listeners.insert(id, Arc::downgrade(listener.core()));
        let local_addr = granted.local_addr.clone();
        self.send_control(
            None,
            &ToPrimary::Listening {
                listener: id,
                local_addr,
            },
        );
        // The primary logs its listeners at info; each worker's is detail.
        tracing::debug!(
            listener = id.0,
            addr = %listener.core().local_addr(),
            round_robin = listener.is_round_robin(),
            "listening"
        );
        Ok(listener)
    }

    // ----- disconnect and exit -----

    /// The one graceful path, whatever asked for it: refuse new listeners, tell the primary
    /// (when the worker decided by itself), close every listener, then let the application
    /// know. Open connections finish on their own.
    fn begin_disconnect(&mut self, reason: DisconnectReason) {
        if self.disconnecting_since.is_some() {
            return;
        }
        self.disconnecting_since = Some(Instant::now());
        if reason == DisconnectReason::Primary {
            tracing::debug!(?reason, "disconnecting");
        } else {
            // The worker's own decision: the primary learns it only from here.
            tracing::info!(?reason, "disconnecting");
        }
        if reason.announce() {
            self.send_control(None, &ToPrimary::Disconnecting);
        }
        for (id, listener) in std::mem::take(&mut self.listeners) {
            if let Some(core) = listener.upgrade() {
                if core.shut() {
                    self.send_control(None, &ToPrimary::CloseListener { listener: id });
                }
            }
        }
        self.worker.publish_disconnect(reason);
    }

    /// A disconnecting worker that was asked to exit by itself does so once its last
    /// connection closes, or at the drain timeout.
    fn exit_when_drained(&mut self) {
        let Some(since) = self.disconnecting_since else {
            return;
        };
        if !self.worker.options.exit_when_disconnected {
            return;
        }
        let open = self.worker.open_connections();
        if open == 0 {
            self.exit_if_asked("every connection is finished");
        } else if since.elapsed() >= self.worker.drain_timeout {
            tracing::warn!(
                open,
                drain_timeout = ?self.worker.drain_timeout,
                "connections still open at the drain timeout: exiting anyway"
            );
            if self.worker.exit_code() == 0 {
                // Not a clean exit: clients were cut off.
                self.worker
                    .set_exit_code(cluster_ipc::env::DRAIN_TIMEOUT_EXIT_CODE);
            }
            self.exit_if_asked("the drain timeout passed");
        }
    }

    /// Exits the process with the worker's exit code, if the worker exits by itself.
    fn exit_if_asked(&mut self, why: &'static str) {
        if !self.worker.options.exit_when_disconnected {
            return;
        }
        self.flush_before_exit();
        let code = self.worker.exit_code();
        // The primary logs every exit with its status; a failing one is worth a line here too.
        if code == 0 {
            tracing::debug!(why, code, "worker exiting");
        } else {
            tracing::warn!(why, code, "worker exiting");
        }
        std::process::exit(code);
    }

    /// Gives what is still queued a moment to leave: the application's messages waiting for
    /// room in the channel (a disconnect from the primary or a signal does not wait behind
    /// them), and the frames in the channel's own queue (say, `CloseListener`). Nothing the
    /// application sent before the worker exits is dropped while the primary reads.
    fn flush_before_exit(&mut self) {
        let deadline = deadline_after(EXIT_FLUSH_TIMEOUT);
        while self.channel_open {
            let commands_done = self.run_commands();
            match self.channel.flush() {
                Err(_) => return,
                Ok(true) if commands_done => return,
                Ok(_) => {}
            }
            let Some(left) = cluster_ipc::deadline::left(deadline) else {
                return;
            };
            let mut fds = [PollFd::new(self.channel.as_fd(), PollFlags::POLLOUT)];
            let _ = poll(
                &mut fds,
                PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX),
            );
        }
    }

    /// The loop is over (the channel closed and the worker does not exit by itself): fail
    /// whatever still waits.
    fn finish(mut self) {
        self.requests.on_closed();
        self.complete_requests();
        self.worker.close_channel(None);
        tracing::debug!("control thread finished");
    }
}

/// Why a request got no reply, as the caller should see it.
fn request_error(op: &'static str, err: cluster_ipc::Error, worker: &WorkerState) -> Error {
    match err {
        cluster_ipc::Error::Closed => Error::ChannelClosed,
        cluster_ipc::Error::TimedOut { .. } => Error::TimedOut {
            op,
            timeout: worker.options.request_timeout,
        },
        other => Error::Ipc(other),
    }
}

fn expect_ack(reply: Envelope<ToWorker>) -> Result<(), Error> {
    match reply.msg {
        ToWorker::Ack => Ok(()),
        other => Err(Error::protocol(
            "retiring",
            format!("unexpected reply {other:?}"),
        )),
    }
}
