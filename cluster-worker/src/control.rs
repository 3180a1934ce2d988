//! The control thread: the one owner of the control channel.
//!
//! A mio loop over three sources: the control channel, a waker that application threads use
//! after queueing a [`Command`], and (optionally) a self-pipe written on `SIGTERM`. Each turn
//! it reads every frame there is, runs every queued command, expires requests, flushes, and
//! decides whether a disconnecting worker may exit; then it sleeps until the next event or
//! deadline. Application threads never touch the channel.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use cluster_ipc::proto::{Control, ListenGranted, ListenerId};
use cluster_ipc::{Channel, Completion, Frame, Kind, Requests};
use mio::{Events, Interest, Poll, Token};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::Error;
use crate::error::error_chain;
use crate::listener::{Listener, ListenerCore};
use crate::message::Message;
use crate::signal::SigtermPipe;
use crate::state::{Command, DisconnectReason, WorkerState, deadline_after};

pub(crate) const CHANNEL: Token = Token(0);
pub(crate) const WAKER: Token = Token(1);
const SIGTERM: Token = Token(2);

/// User messages may fill the channel's outgoing queue only this far, so that control
/// messages (`CloseListener`, `Disconnecting`) always have room behind them.
const USER_QUEUE_SHARE: usize = 3 * 1024 * 1024;

/// The least time between two load reports.
const LOAD_REPORT_INTERVAL: Duration = Duration::from_millis(10);

/// How long an exiting worker waits for its last frames to leave.
const EXIT_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// A request waiting for the primary's reply.
enum Pending {
    Listen {
        addr: SocketAddr,
        reply: SyncSender<Result<Listener, Error>>,
    },
    Retire {
        reply: SyncSender<Result<(), Error>>,
    },
}

/// The control thread's state.
pub(crate) struct ControlLoop {
    worker: Arc<WorkerState>,
    poll: Poll,
    channel: Channel,
    channel_open: bool,
    registered_for_write: bool,
    sigterm: Option<SigtermPipe>,
    requests: Requests<Pending>,
    /// Listeners to close on disconnect. Weak: a listener the application dropped is gone.
    listeners: BTreeMap<ListenerId, Weak<ListenerCore>>,
    disconnecting_since: Option<Instant>,
    /// When the last load report went, and what it said.
    last_load_report: Option<(Instant, u32)>,
}

impl ControlLoop {
    /// Registers the channel (and `SIGTERM`, if asked) with `poll`, whose registry already
    /// holds the worker's waker.
    pub(crate) fn new(
        worker: Arc<WorkerState>,
        poll: Poll,
        mut channel: Channel,
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
            requests: Requests::new(),
            listeners: BTreeMap::new(),
            disconnecting_since: None,
            last_load_report: None,
        })
    }

    /// Runs until the channel closes (and, when the worker exits by itself, until it exits).
    pub(crate) fn run(self) {
        let worker = Arc::clone(&self.worker);
        let span = tracing::info_span!("worker", id = worker.id, slot = worker.slot);
        let _entered = span.enter();
        worker.register_control_thread();
        let exit_when_disconnected = worker.options.exit_when_disconnected;
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_loop()));
        // Everything the loop owned (channel, poll, signal pipe) is dropped by now, even
        // after a panic: the primary has seen the channel close.
        if outcome.is_err() {
            tracing::error!("the worker's control thread panicked");
            for command in worker.close_commands() {
                fail_command(command, || Error::ChannelClosed);
            }
            worker.close_messages();
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
                tracing::error!(error = %err, "the worker's control loop cannot poll");
                self.on_channel_closed(&cluster_ipc::Error::Closed);
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
        self.run_commands();
        self.report_load();
        self.requests.on_time(Instant::now());
        self.complete_requests();
        self.flush();
        self.exit_when_drained();
    }

    fn next_timeout(&self) -> Option<Duration> {
        let drain = self
            .disconnecting_since
            .filter(|_| self.worker.options.exit_when_disconnected)
            .map(|since| since + self.worker.drain_timeout);
        let report = self
            .last_load_report
            .filter(|_| self.channel_open && self.worker.load_report_due())
            .map(|(at, _)| at + LOAD_REPORT_INTERVAL);
        [self.requests.next_deadline(), drain, report]
            .into_iter()
            .flatten()
            .min()
            .map(|at| at.saturating_duration_since(Instant::now()))
    }

    // ----- the channel -----

    fn receive(&mut self) {
        while self.channel_open {
            match self.channel.try_recv() {
                Ok(Some(frame)) => self.on_frame(frame),
                Ok(None) => break,
                Err(err) => self.on_channel_closed(&err),
            }
        }
    }

    fn on_frame(&mut self, frame: Frame) {
        // Replies complete their requests; everything else comes back.
        let Some(frame) = self.requests.on_frame(frame) else {
            return;
        };
        match frame.kind() {
            Kind::User => self.worker.deliver(Message::new(frame.body)),
            Kind::Control => match frame.decode::<Control>() {
                Ok(Control::Disconnect) => {
                    tracing::info!("the primary asked this worker to disconnect");
                    self.begin_disconnect(DisconnectReason::Primary);
                }
                Ok(Control::Heartbeat) => self.send_control(Some(frame.seq()), &Control::Ack),
                Ok(other) => {
                    tracing::warn!(message = ?other, "ignoring an unexpected control message")
                }
                Err(err) => tracing::warn!(
                    error = %error_chain(&err),
                    "ignoring a control message this worker cannot decode"
                ),
            },
        }
    }

    /// Sends a control message that needs no answer (dropped if the primary is gone).
    fn send_control(&mut self, ack: Option<u64>, message: &Control) {
        if !self.channel_open {
            return;
        }
        if let Err(err) = self.channel.send(Kind::Control, ack, message, &[]) {
            self.on_send_error(&err, "a control message");
        }
    }

    fn on_send_error(&mut self, err: &cluster_ipc::Error, what: &'static str) {
        if self.channel.is_closed() {
            self.on_channel_closed(err);
        } else {
            tracing::warn!(error = %error_chain(err), "could not send {what} to the primary");
        }
    }

    fn flush(&mut self) {
        if !self.channel_open {
            return;
        }
        if let Err(err) = self.channel.flush() {
            self.on_channel_closed(&err);
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
                Err(err) => tracing::error!(error = %err, "cannot reregister the control channel"),
            }
        }
    }

    /// The primary is gone (end of file) or the channel broke: fail what waits on it and
    /// disconnect.
    fn on_channel_closed(&mut self, err: &cluster_ipc::Error) {
        if !self.channel_open {
            return;
        }
        self.channel_open = false;
        match err {
            cluster_ipc::Error::Closed => tracing::info!("the primary closed the control channel"),
            err => tracing::error!(error = %error_chain(err), "the control channel failed"),
        }
        let _ = self.poll.registry().deregister(&mut self.channel);
        self.requests.on_closed();
        self.complete_requests();
        for command in self.worker.close_commands() {
            fail_command(command, || Error::ChannelClosed);
        }
        self.worker.close_messages();
        self.begin_disconnect(DisconnectReason::ChannelClosed);
    }

    // ----- commands from application threads -----

    fn run_commands(&mut self) {
        while let Some(command) = self.worker.pop_command() {
            if let Err(command) = self.run_command(command) {
                // The channel is full for now: keep the command's place and retry once the
                // channel drains.
                self.worker.unpop_command(command);
                break;
            }
        }
    }

    /// Carries out one command; gives it back if the channel has no room for it now.
    fn run_command(&mut self, command: Command) -> Result<(), Command> {
        match command {
            Command::Send(body) => return self.send_user(body),
            Command::Listen {
                request,
                addr,
                reply,
            } => {
                if self.disconnecting_since.is_some() {
                    let _ = reply.try_send(Err(Error::Disconnecting));
                    return Ok(());
                }
                let message = Control::Listen(request.clone());
                if let Err(Pending::Listen { addr, reply }) =
                    self.send_request(&message, Pending::Listen { addr, reply })
                {
                    return Err(Command::Listen {
                        request,
                        addr,
                        reply,
                    });
                }
            }
            Command::Retire { reply } => {
                if self.disconnecting_since.is_some() {
                    let _ = reply.try_send(Err(Error::Disconnecting));
                    return Ok(());
                }
                if let Err(Pending::Retire { reply }) =
                    self.send_request(&Control::Retire, Pending::Retire { reply })
                {
                    return Err(Command::Retire { reply });
                }
            }
            Command::Disconnect => self.begin_disconnect(DisconnectReason::Requested),
            Command::CloseListener(listener) => {
                self.listeners.remove(&listener);
                self.send_control(None, &Control::CloseListener { listener });
            }
        }
        Ok(())
    }

    fn send_user(&mut self, body: Vec<u8>) -> Result<(), Command> {
        if !self.channel_open {
            return Ok(());
        }
        if self.channel.queued_bytes() > 0
            && self.channel.queued_bytes() + body.len() > USER_QUEUE_SHARE
        {
            return Err(Command::Send(body));
        }
        match self.channel.send_raw(Kind::User, None, &body, &[]) {
            Ok(_) => Ok(()),
            Err(cluster_ipc::Error::SendQueueFull { .. }) => Err(Command::Send(body)),
            Err(err) => {
                self.on_send_error(&err, "a message");
                Ok(())
            }
        }
    }

    /// Sends a request; gives `pending` back when the channel has no room for it now.
    fn send_request(&mut self, message: &Control, pending: Pending) -> Result<(), Pending> {
        if !self.channel_open {
            fail_pending(pending, Error::ChannelClosed);
            return Ok(());
        }
        let seq = match self.channel.send(Kind::Control, None, message, &[]) {
            Ok(seq) => seq,
            Err(cluster_ipc::Error::SendQueueFull { .. }) => return Err(pending),
            Err(err) => {
                self.on_send_error(&err, "a request");
                let error = if self.channel_open {
                    Error::Ipc(err)
                } else {
                    Error::ChannelClosed
                };
                fail_pending(pending, error);
                return Ok(());
            }
        };
        let deadline = deadline_after(self.worker.options.request_timeout);
        // A fresh seq is never pending; should the table refuse it anyway, the caller's
        // reply channel drops with the entry and the caller hears that the channel closed.
        if let Err(err) = self.requests.register(seq, pending, Some(deadline)) {
            tracing::error!(error = %err, "cannot track a request");
        }
        Ok(())
    }

    /// Tells the primary the open-connection count when it changed, at most once per
    /// [`LOAD_REPORT_INTERVAL`] (a later turn sends what is still due).
    fn report_load(&mut self) {
        if !self.channel_open || !self.worker.load_report_due() {
            return;
        }
        let now = Instant::now();
        if let Some((at, _)) = self.last_load_report {
            if now < at + LOAD_REPORT_INTERVAL {
                return;
            }
        }
        self.worker.take_load_report_due();
        let open = u32::try_from(self.worker.open_connections()).unwrap_or(u32::MAX);
        if self.last_load_report.map(|(_, sent)| sent) == Some(open) {
            return;
        }
        self.last_load_report = Some((now, open));
        self.send_control(
            None,
            &Control::LoadReport {
                open_connections: open,
            },
        );
    }

    // ----- replies -----

    fn complete_requests(&mut self) {
        while let Some(Completion { key, outcome, .. }) = self.requests.poll_completion() {
            match key {
                Pending::Listen { addr, reply } => {
                    let result = outcome
                        .map_err(|err| request_error("listen", err, &self.worker))
                        .and_then(|frame| self.finish_listen(addr, frame));
                    // If the caller gave up, the listener drops here and closes itself.
                    let _ = reply.try_send(result);
                }
                Pending::Retire { reply } => {
                    let result = outcome
                        .map_err(|err| request_error("retire", err, &self.worker))
                        .and_then(|frame| expect_ack(&frame));
                    if let Err(err) = &result {
                        tracing::warn!(error = %err, "retiring without the primary's ack");
                    }
                    self.begin_disconnect(DisconnectReason::Retired);
                    let _ = reply.try_send(result);
                }
            }
        }
    }

    fn finish_listen(&mut self, addr: SocketAddr, frame: Frame) -> Result<Listener, Error> {
        const CONTEXT: &str = "listening";
        let message: Control = frame
            .decode()
            .map_err(|err| Error::protocol(CONTEXT, error_chain(&err)))?;
        match message {
            Control::ListenGranted(granted) => self.set_up_listener(&granted, frame.fds),
            Control::ListenRefused(refused) => Err(Error::ListenRefused {
                addr,
                errno: refused.errno,
                message: refused.message,
            }),
            other => Err(Error::protocol(
                CONTEXT,
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
                self.send_control(None, &Control::CloseListener { listener: id });
                return Err(err);
            }
        };
        if self.disconnecting_since.is_some() {
            if listener.core().shut() {
                self.send_control(None, &Control::CloseListener { listener: id });
            }
            return Err(Error::Disconnecting);
        }
        self.listeners.insert(id, Arc::downgrade(listener.core()));
        let local_addr = granted.local_addr.clone();
        self.send_control(
            None,
            &Control::Listening {
                listener: id,
                local_addr,
            },
        );
        tracing::info!(
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
        tracing::info!(?reason, "disconnecting");
        if reason.announce() {
            self.send_control(None, &Control::Disconnecting);
        }
        for (id, listener) in std::mem::take(&mut self.listeners) {
            if let Some(core) = listener.upgrade() {
                if core.shut() {
                    self.send_control(None, &Control::CloseListener { listener: id });
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
            self.exit_if_asked("the drain timeout passed");
        }
    }

    fn exit_if_asked(&mut self, why: &'static str) {
        if !self.worker.options.exit_when_disconnected {
            return;
        }
        self.flush_before_exit();
        tracing::info!(why, "worker exiting");
        std::process::exit(0);
    }

    /// Gives the frames still queued (say, `CloseListener`) a moment to leave.
    fn flush_before_exit(&mut self) {
        let deadline = deadline_after(EXIT_FLUSH_TIMEOUT);
        while self.channel_open && self.channel.wants_write() {
            match self.channel.flush() {
                Ok(true) | Err(_) => return,
                Ok(false) => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let millis = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(self.channel.as_fd(), PollFlags::POLLOUT)];
            let _ = poll(&mut fds, PollTimeout::from(millis));
        }
    }

    /// The loop is over (the channel closed and the worker does not exit by itself): fail
    /// whatever still waits.
    fn finish(mut self) {
        self.requests.on_closed();
        self.complete_requests();
        for command in self.worker.close_commands() {
            fail_command(command, || Error::ChannelClosed);
        }
        self.worker.close_messages();
        tracing::debug!("control thread finished");
    }
}

fn fail_command(command: Command, error: impl Fn() -> Error) {
    match command {
        Command::Listen { reply, .. } => {
            let _ = reply.try_send(Err(error()));
        }
        Command::Retire { reply } => {
            let _ = reply.try_send(Err(error()));
        }
        Command::Send(_) | Command::Disconnect | Command::CloseListener(_) => {}
    }
}

fn fail_pending(pending: Pending, error: Error) {
    match pending {
        Pending::Listen { reply, .. } => {
            let _ = reply.try_send(Err(error));
        }
        Pending::Retire { reply } => {
            let _ = reply.try_send(Err(error));
        }
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

fn expect_ack(frame: &Frame) -> Result<(), Error> {
    match frame.decode::<Control>() {
        Ok(Control::Ack) => Ok(()),
        Ok(other) => Err(Error::protocol(
            "retiring",
            format!("unexpected reply {other:?}"),
        )),
        Err(err) => Err(Error::protocol("retiring", error_chain(&err))),
    }
}
