//! The worker handle: starting (environment, handshake, control thread) and what the
//! application calls.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cluster_ipc::proto::{
    Encoded, ListenAddr, ListenMode, ListenRequest, PROTOCOL_VERSION, ToPrimary, ToWorker,
    WorkerControl,
};
use cluster_ipc::{Channel, Limits, SlotId, UserMessage, WorkerId};
use serde::Serialize;

use crate::control::{ControlLoop, WAKER};
use crate::listener::Listener;
use crate::state::{
    Answer, Command, DisconnectReason, Identity, Ticket, WorkerState, deadline_after, lock,
};
use crate::{Error, Message};

/// How much longer than the request timeout an application thread waits for the control
/// thread, which enforces the timeout itself and normally answers first.
const REPLY_GRACE: Duration = Duration::from_secs(1);

/// How long [`Worker::disconnect`] waits for the control thread to close the listeners.
const DISCONNECT_WAIT: Duration = Duration::from_secs(10);

/// Held for the whole of a [`Worker::start`], so that two threads starting at once adopt the
/// channel once between them and the second hears [`Error::AlreadyStarted`].
static STARTING: Mutex<()> = Mutex::new(());

/// The worker [`Worker::start`] started, for [`Worker::current`]; set only by a start that
/// succeeded, so that a failed one does not make the next say [`Error::AlreadyStarted`].
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
    pub(crate) message_queue_len: usize,
}

impl Default for WorkerOptions {
    fn default() -> WorkerOptions {
        WorkerOptions {
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            exit_when_disconnected: true,
            handle_sigterm: None,
            message_queue_len: 1024,
        }
    }
}

impl WorkerOptions {
    /// The defaults: 10 s for the handshake and for each request, exit once disconnected and
    /// idle, `SIGTERM` handled by [`Worker::start`] (not by [`Worker::connect`]), up to 1024
    /// unread messages before the worker stops reading its channel.
    pub fn new() -> WorkerOptions {
        WorkerOptions::default()
    }

    /// How long to wait for the primary's answer to `Hello`.
    #[must_use]
    pub fn handshake_timeout(mut self, timeout: Duration) -> WorkerOptions {
        self.handshake_timeout = timeout;
        self
    }

    /// How long to wait for the primary's answer to a request (listen, retire), and how long
    /// [`Worker::send`] waits for room in a full send queue.
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> WorkerOptions {
        self.request_timeout = timeout;
        self
    }

    /// Whether the worker exits the process by itself once it is disconnecting and its last
    /// connection closed, or at the drain timeout, with the code set by
    /// [`Worker::set_exit_code`] (0 unless set). On by default; embedders and tests that
    /// want to keep the process turn it off and use [`Worker::wait_idle`].
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

    /// How many messages from the primary may wait for [`Worker::recv_message`] (at least
    /// one). No message is ever dropped: once this many wait, the worker stops reading its
    /// control channel until the application takes some (it reads on once half of them are
    /// taken), and the primary holds the rest in its send queue, refusing its own senders
    /// when that fills. While the worker does not read, it does not see the primary's other
    /// messages (replies, heartbeats, `Disconnect`) either, so an application that leaves
    /// messages unread should set an [`on_message`](Worker::on_message) callback instead.
    #[must_use]
    pub fn message_queue_len(mut self, len: usize) -> WorkerOptions {
        self.message_queue_len = len.max(1);
        self
    }
}

/// True when this process is a cluster worker: it was started by a primary and has not
/// adopted its channel yet ([`cluster_ipc::env::is_worker`]), or [`Worker::start`] succeeded
/// in it (adoption takes the contract's variables out of the environment).
pub fn is_worker() -> bool {
    CURRENT.get().is_some() || cluster_ipc::env::is_worker()
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
    pub(crate) state: Arc<WorkerState>,
}

impl Worker {
    /// Starts the worker side of this process, once: adopts the control channel and the
    /// worker's identity from the environment the primary set up
    /// ([`cluster_ipc::env::adopt_worker`], which also takes those variables out of the
    /// environment), says `Hello` and starts the control thread, with `SIGTERM` handled
    /// unless the options say otherwise. Call it early in `main`, before the program starts
    /// threads of its own.
    ///
    /// Returns `Ok(None)` when this process is not a worker, or no longer looks like one (an
    /// earlier start failed after taking the variables). A second call after a successful
    /// one fails with [`Error::AlreadyStarted`] ([`Worker::current`] returns the first one's
    /// worker).
    pub fn start(options: WorkerOptions) -> Result<Option<Worker>, Error> {
        let _starting = lock(&STARTING);
        if CURRENT.get().is_some() {
            return Err(Error::AlreadyStarted);
        }
        let adopted =
            cluster_ipc::env::adopt_worker(Limits::default()).map_err(Error::from_adoption)?;
        let Some((identity, channel)) = adopted else {
            return Ok(None);
        };
        let options = WorkerOptions {
            handle_sigterm: Some(options.handle_sigterm.unwrap_or(true)),
            ..options
        };
        let worker = Worker::connect(channel, identity.id, identity.slot, options)?;
        if worker.primary_pid() != identity.primary_pid {
            tracing::warn!(
                environment = identity.primary_pid,
                welcome = worker.primary_pid(),
                "the primary's Welcome names another process id than the environment"
            );
        }
        // Cannot be set already: `STARTING` is held and it was empty above.
        let _ = CURRENT.set(worker.clone());
        Ok(Some(worker))
    }

    /// The worker [`start`](Worker::start) started in this process, if any.
    pub fn current() -> Option<Worker> {
        CURRENT.get().cloned()
    }

    /// Runs the worker side over a control channel that is already open, with no
    /// environment: says `Hello` as worker `id` in `slot` and starts the control thread.
    /// This is for embedding (a process that gets its channel some other way) and for tests,
    /// which drive it against a primary of their own in the same process. `SIGTERM` is
    /// handled only if the options ask for it.
    pub fn connect(
        mut channel: Channel<WorkerControl>,
        id: WorkerId,
        slot: SlotId,
        options: WorkerOptions,
    ) -> Result<Worker, Error> {
        let welcome = handshake(&mut channel, id, options.handshake_timeout)?;
        // Both ends go by the primary's limit from now on, for what they send and accept.
        let announced = usize::try_from(welcome.max_message_len).unwrap_or(usize::MAX);
        channel.set_max_message_len(announced).map_err(Error::Ipc)?;
        let poll = mio::Poll::new().map_err(|err| Error::io("epoll_create", err))?;
        let waker = mio::Waker::new(poll.registry(), WAKER)
            .map_err(|err| Error::io("eventfd (waker)", err))?;
        let identity = Identity {
            id,
            slot,
            primary_pid: welcome.primary_pid,
            drain_timeout: welcome.drain_timeout,
            send_limits: *channel.limits(),
            load_reports: welcome.load_reports,
            heartbeat_interval: welcome.heartbeat_interval,
        };
        let handle_sigterm = options.handle_sigterm.unwrap_or(false);
        let state = Arc::new(WorkerState::new(identity, options, waker));
        let control = ControlLoop::new(Arc::clone(&state), poll, channel, handle_sigterm)?;
        let handle = std::thread::Builder::new()
            .name(format!("cluster-worker-{}", id.0))
            .spawn(move || control.run())
            .map_err(|err| Error::io("spawn the control thread", err))?;
        state.set_control_join_handle(handle);
        // The primary logs the start of each worker at info.
        tracing::debug!(
            id = id.0,
            slot = slot.0,
            primary_pid = welcome.primary_pid,
            "worker connected to its primary"
        );
        Ok(Worker { state })
    }

    /// This worker's id (from 1, never reused).
    pub fn id(&self) -> WorkerId {
        self.state.id
    }

    /// The slot this worker fills (a replacement takes its predecessor's slot).
    pub fn slot(&self) -> SlotId {
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

    /// The longest user message [`send`](Worker::send) takes, in encoded bytes (the message
    /// as it travels, a few bytes more than the application's value): the limit the primary
    /// announced in the handshake, which the control channel applies both ways.
    pub fn max_message_len(&self) -> usize {
        self.state.send_limits.max_message_len()
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
        };
        let ticket = self.state.push_request(|ticket| Command::Listen {
            request,
            addr,
            ticket,
        })?;
        match self.wait_answer("listen", ticket)? {
            Answer::Listener(listener) => Ok(listener),
            Answer::Retired => Err(Error::protocol("listening", "answered as a retire")),
        }
    }

    /// Sends `msg` to the primary as a user message; the control thread sends messages in
    /// the order they were given, and never drops one.
    ///
    /// The message is encoded here, so one over the message limit
    /// ([`max_message_len`](Worker::max_message_len)) fails at once with
    /// [`Error::MessageTooLarge`] and changes nothing else. While more than 4 MiB of
    /// messages wait for a primary that is not reading, `send` waits for room, up to the
    /// request timeout ([`WorkerOptions::request_timeout`]), then fails with
    /// [`Error::SendQueueFull`]; called from a worker callback (on the control thread, the
    /// one that makes room) it fails at once instead. Fails with [`Error::ChannelClosed`]
    /// once the primary is gone.
    pub fn send<T: Serialize + ?Sized>(&self, msg: &T) -> Result<(), Error> {
        let limits = &self.state.send_limits;
        let user = UserMessage::encode(msg, limits).map_err(Error::from_encoding)?;
        // The limit counts the message as it travels, with its envelope.
        let encoded = Encoded::new(&ToPrimary::User(user), limits).map_err(Error::from_encoding)?;
        let deadline = deadline_after(self.state.options.request_timeout);
        self.state.push_message(encoded, deadline)
    }

    /// Waits up to `timeout` for a message from the primary: `Ok(None)` if none came, an
    /// error once the channel is closed and every message was read. Messages go to the
    /// callback instead once [`on_message`](Worker::on_message) set one. Taking messages is
    /// what lets the worker read on when its inbox is full (see
    /// [`WorkerOptions::message_queue_len`]).
    pub fn recv_message(&self, timeout: Duration) -> Result<Option<Message>, Error> {
        self.state.recv_message(deadline_after(timeout))
    }

    /// A message from the primary if one is waiting.
    pub fn try_recv_message(&self) -> Result<Option<Message>, Error> {
        self.state.recv_message(Instant::now())
    }

    /// Hands every message from the primary to `callback` (on the control thread, in the
    /// order they arrive) instead of queueing it for
    /// [`recv_message`](Worker::recv_message). Messages that were already queued go to the
    /// callback first, so none is left behind however late the callback is set. A second
    /// call replaces the callback.
    pub fn on_message(&self, callback: impl Fn(Message) + Send + 'static) {
        self.state.set_message_callback(Box::new(callback));
    }

    /// Disconnects of the worker's own accord: tells the primary (`Disconnecting`), closes
    /// every listener (a round-robin one gives back the connections it had not handed out),
    /// and lets open connections finish; then, if the worker exits by itself, exits with the
    /// [exit code](Worker::set_exit_code). Returns once the listeners are closed (waiting at
    /// most a few seconds); from a callback it returns at once and the disconnect follows.
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
        let ticket = self
            .state
            .push_request(|ticket| Command::Retire { ticket })?;
        match self.wait_answer("retire", ticket)? {
            Answer::Retired => Ok(()),
            Answer::Listener(_) => Err(Error::protocol("retiring", "answered as a listen")),
        }
    }

    /// Sets the code the process exits with when the worker exits by itself after
    /// disconnecting (see [`WorkerOptions::exit_when_disconnected`]), whatever made it
    /// disconnect; 0 unless set. A worker whose work failed sets a non-zero code before it
    /// disconnects, so that the primary sees a failure, not a clean exit.
    pub fn set_exit_code(&self, code: i32) {
        self.state.set_exit_code(code);
    }

    /// True once the worker is disconnecting (its listeners are closed by then).
    pub fn is_disconnecting(&self) -> bool {
        self.state.is_disconnecting()
    }

    /// Why the worker is disconnecting, once it is.
    pub fn disconnect_reason(&self) -> Option<DisconnectReason> {
        self.state.disconnect_reason()
    }

    /// Why the control channel closed, when it failed instead of ending: the primary broke
    /// the protocol (a frame that does not belong on the control channel is
    /// [`cluster_ipc::Error::WrongKind`]) or the socket broke. `None` while the channel is
    /// open and after the primary simply closed it.
    pub fn channel_error(&self) -> Option<Arc<cluster_ipc::Error>> {
        self.state.channel_error()
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

    /// Tells the primary that this worker's serving path is alive, if a heartbeat is due: call
    /// it once per turn of an event loop, from the thread that serves.
    ///
    /// When the primary watches for hung workers (its `Welcome` asked for heartbeats), the
    /// worker sends one at most once per interval, and only when its serving path asks: every
    /// blocking accept on a cluster listener does (one that waits for a connection wakes once
    /// per interval for it), and so does this call; `try_accept` does not (an event loop calls
    /// it only when connections come, so an idle server would look hung). The worker's own
    /// control thread never sends one by itself, since its being alive says nothing of the
    /// server. Once a worker has sent one, the primary expects them: a server that stops
    /// (stuck in a handler, a long request on the accepting thread) is declared hung after the
    /// hang timeout, and killed and replaced. A server that never sends any is watched only
    /// through the connections handed to it and not taken.
    ///
    /// Cheap enough for every turn: an atomic load and a clock read (no system call) while
    /// no heartbeat is due, and never a wait: the control thread sends it.
    pub fn heartbeat(&self) {
        self.state.heartbeat();
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

    fn wait_answer(&self, op: &'static str, ticket: Ticket) -> Result<Answer, Error> {
        let timeout = self.state.options.request_timeout;
        let deadline = deadline_after(timeout.saturating_add(REPLY_GRACE));
        self.state
            .wait_answer(ticket, deadline)
            .unwrap_or(Err(Error::TimedOut { op, timeout }))
    }
}

/// What the primary said in `Welcome`.
struct Welcome {
    primary_pid: u32,
    drain_timeout: Duration,
    max_message_len: u32,
    load_reports: bool,
    heartbeat_interval: Option<Duration>,
}

/// Says `Hello` and waits for `Welcome`.
fn handshake(
    channel: &mut Channel<WorkerControl>,
    id: WorkerId,
    timeout: Duration,
) -> Result<Welcome, Error> {
    let hello = ToPrimary::Hello {
        worker_id: id,
        pid: std::process::id(),
        protocol_version: PROTOCOL_VERSION,
    };
    let reply = channel
        .call(&hello, &[], Some(deadline_after(timeout)))
        .map_err(|err| match err {
            cluster_ipc::Error::TimedOut { .. } => Error::HandshakeTimedOut { timeout },
            cluster_ipc::Error::Closed => Error::ChannelClosed,
            other => Error::Ipc(other),
        })?;
    match reply.msg {
        ToWorker::Welcome {
            primary_pid,
            protocol_version: PROTOCOL_VERSION,
            drain_timeout_ms,
            max_message_len,
            load_reports,
            heartbeat_interval_ms,
        } => Ok(Welcome {
            primary_pid,
            drain_timeout: Duration::from_millis(drain_timeout_ms),
            max_message_len,
            load_reports,
            heartbeat_interval: (heartbeat_interval_ms > 0)
                .then(|| Duration::from_millis(heartbeat_interval_ms)),
        }),
        ToWorker::Welcome {
            protocol_version, ..
        } => Err(Error::VersionMismatch {
            worker: PROTOCOL_VERSION,
            primary: protocol_version,
        }),
        ToWorker::Refused { reason } => Err(Error::Refused { reason }),
        other => Err(Error::protocol(
            "the handshake",
            format!("unexpected reply {other:?}"),
        )),
    }
}

// Keep the public handle usable from any thread.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Worker>();
    assert_send_sync::<Listener>();
    assert_send_sync::<crate::Stream>();
};
