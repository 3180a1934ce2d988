//! The worker handle: starting (environment, handshake, control thread) and what the
//! application calls.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, sync_channel};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cluster_ipc::frame::HEADER_LEN;
use cluster_ipc::proto::{Control, ListenAddr, ListenMode, ListenRequest, PROTOCOL_VERSION};
use cluster_ipc::{Channel, Kind, Limits, encode_message};
use serde::Serialize;

use crate::control::{ControlLoop, WAKER};
use crate::listener::Listener;
use crate::message::Message;
use crate::state::{Command, DisconnectReason, Identity, WorkerState, deadline_after};
use crate::{Error, IPC_FD_ENV, WORKER_ID_ENV, WORKER_SLOT_ENV};

/// How much longer than the request timeout an application thread waits for the control
/// thread, which enforces the timeout itself and normally answers first.
const REPLY_GRACE: Duration = Duration::from_secs(1);

/// How long [`Worker::disconnect`] waits for the control thread to close the listeners.
const DISCONNECT_WAIT: Duration = Duration::from_secs(10);

/// Set by the first [`Worker::start`] of this process.
static STARTED: AtomicBool = AtomicBool::new(false);

/// The worker [`Worker::start`] started, for [`Worker::current`].
static CURRENT: OnceLock<Worker> = OnceLock::new();

/// How a worker talks to its primary and when it exits.
///
/// ```
/// use std::time::Duration;
/// use cluster_worker::WorkerOptions;
///
/// let options = WorkerOptions::new()
///     .handshake_timeout(Duration::from_secs(5))
///     .exit_when_disconnected(false);
/// # let _ = options;
/// ```
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub(crate) handshake_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) exit_when_disconnected: bool,
    pub(crate) handle_sigterm: Option<bool>,
    pub(crate) load_reports: Option<bool>,
    pub(crate) message_queue_len: usize,
}

impl Default for WorkerOptions {
    fn default() -> WorkerOptions {
        WorkerOptions {
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            exit_when_disconnected: true,
            handle_sigterm: None,
            load_reports: None,
            message_queue_len: 1024,
        }
    }
}

impl WorkerOptions {
    /// The defaults: 10 s for the handshake and for each request, exit once disconnected and
    /// idle, `SIGTERM` handled and load reported by [`Worker::start`] (not by
    /// [`Worker::connect`]), up to 1024 unread messages.
    pub fn new() -> WorkerOptions {
        WorkerOptions::default()
    }

    /// How long to wait for the primary's answer to `Hello`.
    #[must_use]
    pub fn handshake_timeout(mut self, timeout: Duration) -> WorkerOptions {
        self.handshake_timeout = timeout;
        self
    }

    /// How long to wait for the primary's answer to a request (listen, retire).
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> WorkerOptions {
        self.request_timeout = timeout;
        self
    }

    /// Whether the worker exits the process (code 0) by itself once it is disconnecting and
    /// its last connection closed, or at the drain timeout. On by default; embedders and
    /// tests that want to keep the process turn it off and use [`Worker::wait_idle`].
    #[must_use]
    pub fn exit_when_disconnected(mut self, exit: bool) -> WorkerOptions {
        self.exit_when_disconnected = exit;
        self
    }

    /// Whether `SIGTERM` makes the worker disconnect (instead of killing the process). By
    /// default [`Worker::start`] handles it and [`Worker::connect`] does not.
    #[must_use]
    pub fn handle_sigterm(mut self, handle: bool) -> WorkerOptions {
        self.handle_sigterm = Some(handle);
        self
    }

    /// Whether the worker tells the primary how many connections it has open (`LoadReport`,
    /// at most one every 10 ms, when the count changed), for least-connections dispatch. By
    /// default [`Worker::start`] does and [`Worker::connect`] does not.
    #[must_use]
    pub fn load_reports(mut self, report: bool) -> WorkerOptions {
        self.load_reports = Some(report);
        self
    }

    /// How many messages from the primary may wait for [`Worker::recv_message`]; beyond it
    /// the oldest is dropped (with a warning).
    #[must_use]
    pub fn message_queue_len(mut self, len: usize) -> WorkerOptions {
        self.message_queue_len = len.max(1);
        self
    }
}

/// True when this process was started as a cluster worker (the control channel's fd is named
/// in [`IPC_FD_ENV`]).
pub fn is_worker() -> bool {
    std::env::var_os(IPC_FD_ENV).is_some()
}

/// A running worker: a cheap, cloneable handle shared by the application's threads.
///
/// The worker's control thread owns the channel to the primary; the handle's methods queue
/// work for it and, where there is an answer, wait for it (bounded by the request timeout).
/// Callbacks ([`on_message`](Worker::on_message), [`on_disconnect`](Worker::on_disconnect))
/// run on that thread: they should be quick, and the calls that wait for the control thread
/// ([`listen`](Worker::listen), [`retire`](Worker::retire)) fail there with
/// [`Error::OnControlThread`].
#[derive(Debug, Clone)]
pub struct Worker {
    state: Arc<WorkerState>,
}

impl Worker {
    /// Starts the worker side of this process, once: reads [`WORKER_ID_ENV`] and
    /// [`WORKER_SLOT_ENV`], adopts the control channel named by [`IPC_FD_ENV`], says `Hello`
    /// and starts the control thread, with `SIGTERM` handled unless the options say otherwise.
    ///
    /// Returns `Ok(None)` when this process is not a worker. A second call in one process
    /// fails with [`Error::AlreadyStarted`] ([`Worker::current`] returns the first one's
    /// worker).
    pub fn start(options: WorkerOptions) -> Result<Option<Worker>, Error> {
        if !is_worker() {
            return Ok(None);
        }
        if STARTED.swap(true, Ordering::AcqRel) {
            return Err(Error::AlreadyStarted);
        }
        let id: u64 = env_number(WORKER_ID_ENV)?;
        if id == 0 {
            return Err(Error::Env {
                var: WORKER_ID_ENV,
                reason: "worker ids start at 1",
            });
        }
        let slot: u32 = env_number(WORKER_SLOT_ENV)?;
        let channel = cluster_ipc::process::adopt_from_env(IPC_FD_ENV, Limits::default())?.ok_or(
            Error::Env {
                var: IPC_FD_ENV,
                reason: "not set",
            },
        )?;
        let options = WorkerOptions {
            handle_sigterm: Some(options.handle_sigterm.unwrap_or(true)),
            load_reports: Some(options.load_reports.unwrap_or(true)),
            ..options
        };
        let worker = Worker::connect(channel, id, slot, options)?;
        let _ = CURRENT.set(worker.clone());
        Ok(Some(worker))
    }

    /// The worker [`start`](Worker::start) started in this process, if any.
    pub fn current() -> Option<Worker> {
        CURRENT.get().cloned()
    }

    /// Runs the worker side over a channel that is already open, with no environment: says
    /// `Hello` as worker `id` in `slot` and starts the control thread. This is for embedding
    /// (a process that gets its channel some other way) and for tests, which drive it against
    /// a primary of their own in the same process. `SIGTERM` is handled only if the options
    /// ask for it.
    pub fn connect(
        mut channel: Channel,
        id: u64,
        slot: u32,
        options: WorkerOptions,
    ) -> Result<Worker, Error> {
        let welcome = handshake(&mut channel, id, options.handshake_timeout)?;
        let poll = mio::Poll::new().map_err(|err| Error::io("epoll_create", err))?;
        let waker = mio::Waker::new(poll.registry(), WAKER)
            .map_err(|err| Error::io("eventfd (waker)", err))?;
        let identity = Identity {
            id,
            slot,
            primary_pid: welcome.primary_pid,
            drain_timeout: welcome.drain_timeout,
        };
        let handle_sigterm = options.handle_sigterm.unwrap_or(false);
        let options = WorkerOptions {
            load_reports: Some(options.load_reports.unwrap_or(false)),
            ..options
        };
        let limits = *channel.limits();
        let state = Arc::new(WorkerState::new(identity, options, limits, waker));
        let control = ControlLoop::new(Arc::clone(&state), poll, channel, handle_sigterm)?;
        let handle = std::thread::Builder::new()
            .name(format!("cluster-worker-{id}"))
            .spawn(move || control.run())
            .map_err(|err| Error::io("spawn the control thread", err))?;
        state.set_control_join_handle(handle);
        tracing::info!(
            id,
            slot,
            primary_pid = welcome.primary_pid,
            "worker connected to its primary"
        );
        Ok(Worker { state })
    }

    /// This worker's id (from 1, never reused).
    pub fn id(&self) -> u64 {
        self.state.id
    }

    /// The slot this worker fills (a replacement takes its predecessor's slot).
    pub fn slot(&self) -> u32 {
        self.state.slot
    }

    /// The primary's process id, from the handshake.
    pub fn primary_pid(&self) -> u32 {
        self.state.primary_pid
    }

    /// How long a disconnecting worker may take to finish its connections, from the
    /// handshake.
    pub fn drain_timeout(&self) -> Duration {
        self.state.drain_timeout
    }

    /// Asks the primary to listen on `addr` and returns the listener it granted.
    ///
    /// `mode` picks round-robin or shared delivery (`None`: the primary's choice). As in
    /// Node, every worker's first listen on port 0 gets the same port; a second listen on
    /// port 0 by the same worker gets another. A refusal keeps the primary's errno, so the
    /// `io::Error` it converts to has the kind a plain `bind` would give
    /// ([`AddrInUse`](std::io::ErrorKind::AddrInUse), ...). A disconnecting worker refuses to
    /// listen ([`Error::Disconnecting`]).
    pub fn listen(&self, addr: SocketAddr, mode: Option<ListenMode>) -> Result<Listener, Error> {
        self.refuse_on_control_thread("listen")?;
        if self.state.is_disconnecting() {
            return Err(Error::Disconnecting);
        }
        let index = if addr.port() == 0 {
            self.state.next_port_zero_index()
        } else {
            0
        };
        let request = ListenRequest {
            addr: ListenAddr::Tcp(addr),
            mode,
            index,
            backlog: None,
        };
        let (reply, answer) = sync_channel(1);
        self.state.push(Command::Listen {
            request,
            addr,
            reply,
        })?;
        self.wait_answer("listen", &answer)
    }

    /// Sends `msg` to the primary as a user message. It is encoded here, so a message over
    /// the frame limit fails at once with [`Error::MessageTooLarge`]; the control thread sends
    /// it in order with everything else. Fails with [`Error::SendQueueFull`] when too much
    /// waits for a primary that is not reading, and with [`Error::ChannelClosed`] once the
    /// primary is gone.
    pub fn send<T: Serialize + ?Sized>(&self, msg: &T) -> Result<(), Error> {
        let limits = self.state.control_limits;
        let mut frame = Vec::new();
        encode_message(&mut frame, Kind::User, 0, None, 0, msg, &limits).map_err(
            |err| match err {
                cluster_ipc::Error::FrameTooLarge { len, max } => {
                    Error::MessageTooLarge { len, max }
                }
                cluster_ipc::Error::Encode(err) => Error::Encode(err),
                other => Error::Ipc(other),
            },
        )?;
        let body = frame.split_off(HEADER_LEN);
        self.state.push(Command::Send(body))
    }

    /// Waits up to `timeout` for a message from the primary: `Ok(None)` if none came, an
    /// error once the channel is closed and every message was read. Messages go to the
    /// callback instead once [`on_message`](Worker::on_message) set one.
    pub fn recv_message(&self, timeout: Duration) -> Result<Option<Message>, Error> {
        self.state.recv_message(deadline_after(timeout))
    }

    /// A message from the primary if one is waiting.
    pub fn try_recv_message(&self) -> Result<Option<Message>, Error> {
        self.state.recv_message(Instant::now())
    }

    /// Hands every later message from the primary to `callback` (on the control thread)
    /// instead of queueing it. Messages already queued stay for
    /// [`recv_message`](Worker::recv_message). A second call replaces the callback.
    pub fn on_message(&self, callback: impl Fn(Message) + Send + 'static) {
        self.state.set_message_callback(Box::new(callback));
    }

    /// Disconnects of the worker's own accord: tells the primary (`Disconnecting`), closes
    /// every listener (a round-robin one gives back the connections it had not handed out),
    /// and lets open connections finish; then, if the worker exits by itself, exits. Returns
    /// once the listeners are closed (waiting at most a few seconds); from a callback it
    /// returns at once and the disconnect follows.
    pub fn disconnect(&self) {
        if self.state.push(Command::Disconnect).is_err() {
            // The control thread is gone, and disconnected before it went.
            return;
        }
        if !self.state.on_control_thread() {
            self.state
                .wait_disconnecting(deadline_after(DISCONNECT_WAIT));
        }
    }

    /// Asks the primary to start a replacement first (`Retire`), waits for its ack, and
    /// disconnects. The worker disconnects even when the primary does not answer in time or
    /// is gone; the error then says so.
    pub fn retire(&self) -> Result<(), Error> {
        self.refuse_on_control_thread("retire")?;
        let (reply, answer) = sync_channel(1);
        self.state.push(Command::Retire { reply })?;
        self.wait_answer("retire", &answer)
    }

    /// True once the worker is disconnecting (its listeners are closed by then).
    pub fn is_disconnecting(&self) -> bool {
        self.state.is_disconnecting()
    }

    /// Why the worker is disconnecting, once it is.
    pub fn disconnect_reason(&self) -> Option<DisconnectReason> {
        self.state.disconnect_reason()
    }

    /// Runs `callback` once when the worker starts disconnecting (at once, on this thread, if
    /// it already has), after its listeners are closed: the place for a server to stop
    /// keep-alive and finish.
    pub fn on_disconnect(&self, callback: impl FnOnce(DisconnectReason) + Send + 'static) {
        self.state.on_disconnect(Box::new(callback));
    }

    /// Waits up to `timeout` for the worker to be disconnecting; true if it is.
    pub fn wait_disconnecting(&self, timeout: Duration) -> bool {
        self.state.wait_disconnecting(deadline_after(timeout))
    }

    /// How many accepted [`Stream`](crate::Stream)s are open.
    pub fn open_connections(&self) -> usize {
        self.state.open_connections()
    }

    /// Waits until no accepted connection is open, or `deadline`; true if none is.
    pub fn wait_idle(&self, deadline: Instant) -> bool {
        self.state.wait_idle(deadline)
    }

    /// Waits up to `timeout` for the control thread to end, which it does once the control
    /// channel has closed (when the worker does not exit by itself); true if it has, and has
    /// released everything it held.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        self.state.wait_finished(deadline_after(timeout))
    }

    fn refuse_on_control_thread(&self, op: &'static str) -> Result<(), Error> {
        if self.state.on_control_thread() {
            return Err(Error::OnControlThread { op });
        }
        Ok(())
    }

    fn wait_answer<T>(
        &self,
        op: &'static str,
        answer: &Receiver<Result<T, Error>>,
    ) -> Result<T, Error> {
        let timeout = self.state.options.request_timeout;
        match answer.recv_timeout(timeout.saturating_add(REPLY_GRACE)) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => Err(Error::TimedOut { op, timeout }),
            Err(RecvTimeoutError::Disconnected) => Err(Error::ChannelClosed),
        }
    }
}

/// What the primary said in `Welcome`.
struct Welcome {
    primary_pid: u32,
    drain_timeout: Duration,
}

/// Says `Hello` and waits for `Welcome`.
fn handshake(channel: &mut Channel, id: u64, timeout: Duration) -> Result<Welcome, Error> {
    const CONTEXT: &str = "the handshake";
    let hello = Control::Hello {
        worker_id: id,
        pid: std::process::id(),
        protocol_version: PROTOCOL_VERSION,
    };
    let reply = channel
        .call(Kind::Control, &hello, &[], Some(deadline_after(timeout)))
        .map_err(|err| match err {
            cluster_ipc::Error::TimedOut { .. } => Error::HandshakeTimedOut { timeout },
            cluster_ipc::Error::Closed => Error::ChannelClosed,
            other => Error::Ipc(other),
        })?;
    if reply.kind() != Kind::Control {
        return Err(Error::protocol(CONTEXT, "a user message answered Hello"));
    }
    let message: Control = reply
        .decode()
        .map_err(|err| Error::protocol(CONTEXT, crate::error::error_chain(&err)))?;
    match message {
        Control::Welcome {
            primary_pid,
            protocol_version: PROTOCOL_VERSION,
            drain_timeout_ms,
        } => Ok(Welcome {
            primary_pid,
            drain_timeout: Duration::from_millis(drain_timeout_ms),
        }),
        Control::Welcome {
            protocol_version, ..
        } => Err(Error::VersionMismatch {
            worker: PROTOCOL_VERSION,
            primary: protocol_version,
        }),
        Control::Refused { reason } => Err(Error::Refused { reason }),
        other => Err(Error::protocol(
            CONTEXT,
            format!("unexpected reply {other:?}"),
        )),
    }
}

/// A decimal number from the environment.
fn env_number<T: std::str::FromStr>(var: &'static str) -> Result<T, Error> {
    let value = std::env::var_os(var).ok_or(Error::Env {
        var,
        reason: "not set",
    })?;
    value
        .to_str()
        .and_then(|text| text.trim().parse().ok())
        .ok_or(Error::Env {
            var,
            reason: "not a decimal number",
        })
}

// Keep the public handle usable from any thread.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Worker>();
    assert_send_sync::<Listener>();
    assert_send_sync::<crate::Stream>();
};
