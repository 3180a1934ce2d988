//! What the application's threads and the control thread share: one state behind one lock.
//!
//! The control thread drives every transition of a worker ([`Phase`]: running, disconnecting,
//! finished; the channel open or closed) and is the only one that reads the channel.
//! Application threads only queue [`Command`]s, take messages, and wait, all of them on the
//! one condition variable in [`WorkerState::wait_until`]. Every critical section is a few
//! plain assignments: nothing blocks under the lock, no application callback runs under it,
//! and nothing whose drop could want the lock (a [`Listener`], a callback) is dropped under
//! it.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use cluster_ipc::ErrorChain;
use cluster_ipc::proto::{Encoded, ListenRequest, ToPrimary};
use cluster_ipc::{Limits, ListenerId, SlotId, WorkerId};

use crate::listener::Listener;
use crate::{Error, Message, WorkerOptions};

/// How many bytes of user messages may wait for the control thread to hand them to the
/// channel (one message of any allowed size always may, when none waits).
pub(crate) const MAX_QUEUED_SEND_BYTES: usize = 4 * 1024 * 1024;

/// Why a worker is disconnecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// The application called [`Worker::disconnect`](crate::Worker::disconnect).
    Requested,
    /// The application called [`Worker::retire`](crate::Worker::retire).
    Retired,
    /// The primary sent `Disconnect`.
    Primary,
    /// The process got `SIGTERM` (from the primary, a service manager, or as its parent-death
    /// signal).
    Signal,
    /// The control channel closed: the primary is gone, or broke the protocol.
    ChannelClosed,
}

impl DisconnectReason {
    /// True when the worker decided by itself and should tell the primary (`Disconnecting`),
    /// so that its exit is not taken for a crash.
    pub(crate) fn announce(self) -> bool {
        matches!(
            self,
            DisconnectReason::Requested | DisconnectReason::Retired | DisconnectReason::Signal
        )
    }
}

/// Where a worker is in its life. Only the control thread moves it, and only forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Connected and serving.
    Running,
    /// Listeners closed, open connections finishing.
    Disconnecting(DisconnectReason),
    /// The control thread has ended and released everything it held.
    Finished(DisconnectReason),
}

impl Phase {
    fn reason(self) -> Option<DisconnectReason> {
        match self {
            Phase::Running => None,
            Phase::Disconnecting(reason) | Phase::Finished(reason) => Some(reason),
        }
    }
}

/// Names one request an application thread waits on; its answer comes back under it.
pub(crate) type Ticket = u64;

/// What application threads ask the control thread to do.
pub(crate) enum Command {
    /// Send a user message, already encoded (and checked against the message limit).
    Send(Encoded<ToPrimary>),
    /// Ask the primary to listen; answer under `ticket` with [`Answer::Listener`].
    Listen {
        request: ListenRequest,
        addr: SocketAddr,
        ticket: Ticket,
    },
    /// Ask the primary to start a replacement, then disconnect; answer under `ticket` with
    /// [`Answer::Retired`].
    Retire { ticket: Ticket },
    /// Disconnect of the worker's own accord.
    Disconnect,
    /// The application closed a listener; tell the primary.
    CloseListener(ListenerId),
    /// Give a connection back to the primary: `HandBack`, encoded, with `fd` attached.
    HandBack {
        message: Encoded<ToPrimary>,
        fd: OwnedFd,
    },
}

impl Command {
    /// The bytes this command counts against [`MAX_QUEUED_SEND_BYTES`].
    pub(crate) fn send_bytes(&self) -> usize {
        match self {
            Command::Send(message) => message.body().len(),
            _ => 0,
        }
    }

    /// The ticket an application thread waits on for this command, if any.
    fn ticket(&self) -> Option<Ticket> {
        match self {
            Command::Listen { ticket, .. } | Command::Retire { ticket } => Some(*ticket),
            Command::Send(_)
            | Command::Disconnect
            | Command::CloseListener(_)
            | Command::HandBack { .. } => None,
        }
    }
}

/// The answer to a request an application thread waits on.
pub(crate) enum Answer {
    /// The listener the primary granted.
    Listener(Listener),
    /// The primary acked `Retire`.
    Retired,
}

type DisconnectCallback = Box<dyn FnOnce(DisconnectReason) + Send>;
type MessageCallback = Box<dyn Fn(Message) + Send>;

/// Everything about a worker that changes, behind [`WorkerState`]'s one lock.
struct Shared {
    phase: Phase,
    /// The control channel is open: commands can still run and messages still come.
    channel_open: bool,
    /// Why the channel closed, when it failed rather than ended.
    channel_error: Option<Arc<cluster_ipc::Error>>,
    /// Commands for the control thread, in order.
    commands: VecDeque<Command>,
    /// Bytes of user messages queued and not yet handed to the channel (including ones the
    /// control thread has taken from `commands` and is working on).
    queued_send_bytes: usize,
    /// Requests application threads wait on: `None` until answered. A waiter that gives up
    /// removes its entry, and an answer without an entry is dropped (a listener then closes).
    answers: BTreeMap<Ticket, Option<Result<Answer, Error>>>,
    next_ticket: Ticket,
    /// Accepted connections still open.
    open_connections: usize,
    /// The count changed since the control thread last reported it (load reports only).
    load_changed: bool,
    /// Messages from the primary waiting for `recv_message`, at most
    /// `options.message_queue_len`.
    inbox: VecDeque<Message>,
    /// The control thread stopped reading the channel because the inbox is full; whoever
    /// makes room must wake it.
    reading_paused: bool,
    /// Where messages go instead of the inbox. The control thread takes it out while it runs
    /// it, so that it never runs under the lock.
    message_callback: Option<MessageCallback>,
    disconnect_callbacks: Vec<DisconnectCallback>,
    /// How many listens on port 0 this worker made, for the next one's `index`.
    port_zero_listens: u32,
    /// The process's exit code when the worker exits by itself.
    exit_code: i32,
    control_thread: Option<ThreadId>,
    control_join: Option<JoinHandle<()>>,
}

/// Who a worker is, and the terms the primary set in its `Welcome`.
pub(crate) struct Identity {
    pub(crate) id: WorkerId,
    pub(crate) slot: SlotId,
    pub(crate) primary_pid: u32,
    pub(crate) drain_timeout: Duration,
    /// The limits an outgoing user message is encoded under: the control channel's, with the
    /// message limit the primary announced.
    pub(crate) send_limits: Limits,
    /// Tell the primary the open-connection count when it changes.
    pub(crate) load_reports: bool,
    /// How often the serving path says it is alive; `None`: the primary wants no heartbeats.
    pub(crate) heartbeat_interval: Option<Duration>,
}

/// The serving path's heartbeat, checked on every accept without a lock or a system call.
///
/// The application's threads ([`beat`](Heartbeat::beat)) decide that one is due and raise
/// `requested`; the control thread, woken for it, sends it (the way load reports go). The
/// control thread never decides one is due by itself: a worker whose serving path stopped
/// sends none, however alive its control thread is.
pub(crate) struct Heartbeat {
    /// The interval in nanoseconds; 0 when the primary wants no heartbeats.
    interval_ns: u64,
    /// What `next_due_ns` counts from.
    ///
    /// Nanoseconds, not milliseconds: a clock truncated to whole milliseconds lets two beats
    /// go up to a millisecond less than an interval apart (a beat at 10.9 ms, due again at
    /// "60", sent at 60.0 ms), which breaks "at most once per interval".
    epoch: Instant,
    /// When the next heartbeat is due, in nanoseconds since `epoch` (u64 lasts 584 years).
    /// 0 at first: the first accept says at once that the serving path is alive.
    next_due_ns: AtomicU64,
    /// A heartbeat is due and the control thread has not sent it yet.
    requested: AtomicBool,
    /// Connections accepted so far, on every listener.
    accepted: AtomicU64,
}

impl Heartbeat {
    fn new(interval: Option<Duration>) -> Heartbeat {
        let interval_ns = interval.map_or(0, |interval| {
            // A zero interval still means "wanted" (`None` is "no heartbeats").
            u64::try_from(interval.as_nanos())
                .unwrap_or(u64::MAX)
                .max(1)
        });
        Heartbeat {
            interval_ns,
            epoch: Instant::now(),
            next_due_ns: AtomicU64::new(0),
            requested: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
        }
    }

    /// Nanoseconds since `epoch`. `Instant::now` reads the monotonic clock through the vDSO
    /// on Linux: no system call.
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Raises `requested` if a heartbeat is due, at most once per interval whatever the
    /// number of threads; true if this call raised it (the control thread must be woken).
    fn beat(&self) -> bool {
        if self.interval_ns == 0 {
            return false;
        }
        let due = self.next_due_ns.load(Ordering::Relaxed);
        let now = self.now_ns();
        if now < due {
            return false;
        }
        // One of the threads that found it due wins; the others have nothing to do.
        if self
            .next_due_ns
            .compare_exchange(
                due,
                now.saturating_add(self.interval_ns),
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_err()
        {
            return false;
        }
        !self.requested.swap(true, Ordering::AcqRel)
    }

    /// How long until the next heartbeat is due; `None` when none are wanted.
    fn due_in(&self) -> Option<Duration> {
        if self.interval_ns == 0 {
            return None;
        }
        let due = self.next_due_ns.load(Ordering::Relaxed);
        Some(Duration::from_nanos(due.saturating_sub(self.now_ns())))
    }
}

/// The state of one worker, shared by its handles, listeners, streams and control thread.
pub(crate) struct WorkerState {
    pub(crate) id: WorkerId,
    pub(crate) slot: SlotId,
    pub(crate) primary_pid: u32,
    pub(crate) drain_timeout: Duration,
    pub(crate) send_limits: Limits,
    pub(crate) load_reports: bool,
    pub(crate) options: WorkerOptions,
    heartbeat: Heartbeat,
    shared: Mutex<Shared>,
    /// The one condition application threads wait on: notified on every change they may be
    /// waiting for.
    changed: Condvar,
    waker: mio::Waker,
    /// Set once the worker is disconnecting, for `Worker::disconnected` (made on first use).
    #[cfg(feature = "tokio")]
    pub(crate) disconnected: std::sync::OnceLock<Arc<tokio::sync::watch::Sender<bool>>>,
}

/// Locks a mutex whose data stays consistent even if a holder panicked (every critical
/// section here is a few plain assignments), so a panic in one app thread cannot wedge the
/// worker.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs an application callback on the control thread; a panic in it is logged and goes no
/// further, so that one bad callback cannot take the worker's control thread down.
fn run_callback(what: &'static str, callback: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(callback)).is_err() {
        tracing::error!(callback = what, "a worker callback panicked");
    }
}

pub(crate) use cluster_ipc::deadline::after as deadline_after;

impl WorkerState {
    pub(crate) fn new(
        identity: Identity,
        options: WorkerOptions,
        waker: mio::Waker,
    ) -> WorkerState {
        WorkerState {
            id: identity.id,
            slot: identity.slot,
            primary_pid: identity.primary_pid,
            drain_timeout: identity.drain_timeout,
            send_limits: identity.send_limits,
            load_reports: identity.load_reports,
            options,
            heartbeat: Heartbeat::new(identity.heartbeat_interval),
            shared: Mutex::new(Shared {
                phase: Phase::Running,
                channel_open: true,
                channel_error: None,
                commands: VecDeque::new(),
                queued_send_bytes: 0,
                answers: BTreeMap::new(),
                next_ticket: 1,
                open_connections: 0,
                load_changed: false,
                inbox: VecDeque::new(),
                reading_paused: false,
                message_callback: None,
                disconnect_callbacks: Vec::new(),
                port_zero_listens: 0,
                exit_code: 0,
                control_thread: None,
                control_join: None,
            }),
            changed: Condvar::new(),
            waker,
            #[cfg(feature = "tokio")]
            disconnected: std::sync::OnceLock::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        lock(&self.shared)
    }

    /// Waits, holding `shared` between checks, until `done` holds or `deadline` passes;
    /// returns the guard and whether `done` held. The one place an application thread waits.
    fn wait_until<'a>(
        &'a self,
        mut shared: MutexGuard<'a, Shared>,
        deadline: Instant,
        mut done: impl FnMut(&Shared) -> bool,
    ) -> (MutexGuard<'a, Shared>, bool) {
        loop {
            if done(&shared) {
                return (shared, true);
            }
            let Some(left) = cluster_ipc::deadline::left(deadline) else {
                return (shared, false);
            };
            shared = self
                .changed
                .wait_timeout(shared, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    fn notify(&self) {
        self.changed.notify_all();
    }

    fn wake(&self) {
        if let Err(err) = self.waker.wake() {
            tracing::error!(error = %ErrorChain(&err), "cannot wake the worker's control thread");
        }
    }

    // ----- the control thread itself -----

    /// Keeps the control thread's handle, for [`wait_finished`](Self::wait_finished) to join.
    pub(crate) fn set_control_join_handle(&self, handle: JoinHandle<()>) {
        self.lock().control_join = Some(handle);
    }

    /// Called by the control thread when it starts.
    pub(crate) fn register_control_thread(&self) {
        self.lock().control_thread = Some(std::thread::current().id());
    }

    /// True on the control thread, where waiting for the control thread would never end.
    pub(crate) fn on_control_thread(&self) -> bool {
        is_control_thread(&self.lock())
    }

    /// The control thread's very last step: the worker is finished, and every request still
    /// waiting fails.
    pub(crate) fn mark_finished(&self) {
        let mut shared = self.lock();
        let reason = shared
            .phase
            .reason()
            .unwrap_or(DisconnectReason::ChannelClosed);
        shared.phase = Phase::Finished(reason);
        shared.channel_open = false;
        for answer in shared.answers.values_mut() {
            answer.get_or_insert(Err(Error::ChannelClosed));
        }
        drop(shared);
        self.notify();
    }

    pub(crate) fn wait_finished(&self, deadline: Instant) -> bool {
        let shared = self.lock();
        let (mut shared, finished) =
            self.wait_until(shared, deadline, |s| matches!(s.phase, Phase::Finished(_)));
        let handle = if finished && !is_control_thread(&shared) {
            shared.control_join.take()
        } else {
            None
        };
        drop(shared);
        // The thread said it is done; joining makes sure it has dropped what it held.
        if let Some(handle) = handle {
            let _ = handle.join();
        }
        finished
    }

    // ----- commands -----

    /// Queues a command for the control thread, and wakes it if the queue was empty. A queue
    /// that was not empty needs no wake-up: whoever made it non-empty woke the thread, which
    /// has either not taken the queue since, or put commands back for want of room in the
    /// channel and comes back to them when the channel drains.
    pub(crate) fn push(&self, command: Command) -> Result<(), Error> {
        let shared = self.lock();
        if !shared.channel_open {
            return Err(Error::ChannelClosed);
        }
        self.push_locked(shared, command);
        Ok(())
    }

    fn push_locked(&self, mut shared: MutexGuard<'_, Shared>, command: Command) {
        let was_empty = shared.commands.is_empty();
        shared.queued_send_bytes += command.send_bytes();
        shared.commands.push_back(command);
        drop(shared);
        if was_empty {
            self.wake();
        }
    }

    /// Queues a `HandBack` with its connection for the control thread, if the channel is open
    /// (and, with `draining`, if the worker is disconnecting); gives the fd back if not. It
    /// never waits: the control thread sends it as soon as the channel has room.
    pub(crate) fn push_hand_back(
        &self,
        message: Encoded<ToPrimary>,
        fd: OwnedFd,
        draining: bool,
    ) -> Result<(), OwnedFd> {
        let shared = self.lock();
        if !shared.channel_open || (draining && shared.phase == Phase::Running) {
            return Err(fd);
        }
        self.push_locked(shared, Command::HandBack { message, fd });
        Ok(())
    }

    /// Queues a user message, waiting until `deadline` for room while too much waits
    /// already. On the control thread (from a callback) it never waits: only that thread
    /// makes room.
    pub(crate) fn push_message(
        &self,
        message: Encoded<ToPrimary>,
        deadline: Instant,
    ) -> Result<(), Error> {
        let len = message.body().len();
        let has_room = |shared: &Shared| {
            shared.queued_send_bytes == 0 || shared.queued_send_bytes + len <= MAX_QUEUED_SEND_BYTES
        };
        let shared = self.lock();
        let deadline = if is_control_thread(&shared) {
            Instant::now()
        } else {
            deadline
        };
        let (shared, _) = self.wait_until(shared, deadline, |s| !s.channel_open || has_room(s));
        if !shared.channel_open {
            return Err(Error::ChannelClosed);
        }
        if !has_room(&shared) {
            return Err(Error::SendQueueFull {
                queued: shared.queued_send_bytes,
                max: MAX_QUEUED_SEND_BYTES,
            });
        }
        self.push_locked(shared, Command::Send(message));
        Ok(())
    }

    /// Queues a request and returns the ticket its answer will come under.
    pub(crate) fn push_request(
        &self,
        command: impl FnOnce(Ticket) -> Command,
    ) -> Result<Ticket, Error> {
        let mut shared = self.lock();
        if !shared.channel_open {
            return Err(Error::ChannelClosed);
        }
        let ticket = shared.next_ticket;
        shared.next_ticket += 1;
        shared.answers.insert(ticket, None);
        self.push_locked(shared, command(ticket));
        Ok(ticket)
    }

    /// Waits until `deadline` for the answer under `ticket`; gives up on it after that (a
    /// late answer is dropped). `None` if none came.
    pub(crate) fn wait_answer(
        &self,
        ticket: Ticket,
        deadline: Instant,
    ) -> Option<Result<Answer, Error>> {
        let shared = self.lock();
        let (mut shared, _) = self.wait_until(shared, deadline, |s| {
            !matches!(s.answers.get(&ticket), Some(None))
        });
        let entry = shared.answers.remove(&ticket);
        drop(shared);
        // A missing entry cannot happen (only this waiter removes it); say the channel closed.
        entry.unwrap_or(Some(Err(Error::ChannelClosed)))
    }

    /// Hands the answer to the thread waiting under `ticket`. If that thread gave up, the
    /// answer is dropped here, outside the lock: a listener closes itself (and queues a
    /// command) when dropped.
    pub(crate) fn answer(&self, ticket: Ticket, answer: Result<Answer, Error>) {
        let mut shared = self.lock();
        let unclaimed = match shared.answers.get_mut(&ticket) {
            Some(slot) => {
                *slot = Some(answer);
                None
            }
            None => Some(answer),
        };
        drop(shared);
        self.notify();
        drop(unclaimed);
    }

    /// Takes every queued command, in order, for the control thread. Their bytes stay
    /// counted as queued until [`commands_done`](Self::commands_done).
    pub(crate) fn take_commands(&self) -> VecDeque<Command> {
        std::mem::take(&mut self.lock().commands)
    }

    /// The control thread is done with what it took: `sent_bytes` of user messages left the
    /// queue, and `unsent` (which the channel had no room for yet) go back to its front, in
    /// order.
    pub(crate) fn commands_done(&self, mut unsent: VecDeque<Command>, sent_bytes: usize) {
        let mut shared = self.lock();
        shared.queued_send_bytes = shared.queued_send_bytes.saturating_sub(sent_bytes);
        if shared.channel_open {
            unsent.append(&mut shared.commands);
            shared.commands = unsent;
            unsent = VecDeque::new();
        }
        let failed = fail_tickets(&mut shared, &unsent);
        drop(shared);
        if sent_bytes > 0 || failed {
            self.notify();
        }
    }

    /// The `index` of the next listen on port 0.
    pub(crate) fn next_port_zero_index(&self) -> u32 {
        let mut shared = self.lock();
        let index = shared.port_zero_listens;
        shared.port_zero_listens += 1;
        index
    }

    // ----- the channel -----

    /// The control channel is closed (`error` says why, when it failed rather than ended):
    /// every later command is refused, every queued one fails, and no more messages come.
    /// Drops the message callback too: it may hold a [`Worker`] handle, and with it this
    /// state, which would otherwise never be freed.
    ///
    /// [`Worker`]: crate::Worker
    pub(crate) fn close_channel(&self, error: Option<cluster_ipc::Error>) {
        let mut shared = self.lock();
        shared.channel_open = false;
        if shared.channel_error.is_none() {
            shared.channel_error = error.map(Arc::new);
        }
        let commands = std::mem::take(&mut shared.commands);
        fail_tickets(&mut shared, &commands);
        shared.queued_send_bytes = 0;
        shared.reading_paused = false;
        let callback = shared.message_callback.take();
        drop(shared);
        self.notify();
        drop((commands, callback));
    }

    pub(crate) fn channel_error(&self) -> Option<Arc<cluster_ipc::Error>> {
        self.lock().channel_error.clone()
    }

    // ----- the serving path's heartbeat -----

    /// Called from the serving path (every accept, [`Worker::heartbeat`]): if a heartbeat is
    /// due, has the control thread send one. Costs an atomic load and a clock read (vDSO)
    /// when none is due.
    ///
    /// [`Worker::heartbeat`]: crate::Worker::heartbeat
    pub(crate) fn heartbeat(&self) {
        if self.heartbeat.beat() {
            self.wake();
        }
    }

    /// How long a serving path that waits for a connection may sleep before it must beat;
    /// `None` when the primary wants no heartbeats.
    pub(crate) fn heartbeat_due_in(&self) -> Option<Duration> {
        self.heartbeat.due_in()
    }

    /// For the control thread: the `connections` of the heartbeat to send, if one was
    /// requested since it last looked.
    pub(crate) fn take_heartbeat(&self) -> Option<u64> {
        self.heartbeat
            .requested
            .swap(false, Ordering::AcqRel)
            .then(|| self.heartbeat.accepted.load(Ordering::Relaxed))
    }

    // ----- open connections -----

    pub(crate) fn connection_opened(&self) {
        self.heartbeat.accepted.fetch_add(1, Ordering::Relaxed);
        let mut shared = self.lock();
        shared.open_connections += 1;
        let report = self.load_changed(&mut shared);
        drop(shared);
        if report {
            self.wake();
        }
    }

    pub(crate) fn connection_closed(&self) {
        let mut shared = self.lock();
        shared.open_connections = shared.open_connections.saturating_sub(1);
        let idle = shared.open_connections == 0;
        let disconnecting = shared.phase != Phase::Running;
        let report = self.load_changed(&mut shared);
        drop(shared);
        if idle {
            self.notify();
        }
        // A disconnecting worker exits when it is idle; its control thread decides. A load
        // report is due once per batch of changes.
        if (idle && disconnecting) || report {
            self.wake();
        }
    }

    /// Marks the count changed for the next load report; true when the control thread must
    /// be woken for it (the first change since the last report).
    fn load_changed(&self, shared: &mut Shared) -> bool {
        self.load_reports && !std::mem::replace(&mut shared.load_changed, true)
    }

    /// The open-connection count, if it changed since the last call (load reports only).
    pub(crate) fn take_load_change(&self) -> Option<usize> {
        let mut shared = self.lock();
        std::mem::take(&mut shared.load_changed).then_some(shared.open_connections)
    }

    /// Whether a load report is due (without taking it).
    pub(crate) fn load_report_due(&self) -> bool {
        self.load_reports && self.lock().load_changed
    }

    pub(crate) fn open_connections(&self) -> usize {
        self.lock().open_connections
    }

    pub(crate) fn wait_idle(&self, deadline: Instant) -> bool {
        let shared = self.lock();
        self.wait_until(shared, deadline, |s| s.open_connections == 0)
            .1
    }

    // ----- disconnect and exit -----

    pub(crate) fn is_disconnecting(&self) -> bool {
        self.lock().phase != Phase::Running
    }

    pub(crate) fn disconnect_reason(&self) -> Option<DisconnectReason> {
        self.lock().phase.reason()
    }

    /// Moves the worker to disconnecting (once) and runs the callbacks. Returns false if it
    /// already was.
    pub(crate) fn publish_disconnect(&self, reason: DisconnectReason) -> bool {
        let mut shared = self.lock();
        if shared.phase != Phase::Running {
            return false;
        }
        shared.phase = Phase::Disconnecting(reason);
        let callbacks = std::mem::take(&mut shared.disconnect_callbacks);
        drop(shared);
        self.notify();
        for callback in callbacks {
            run_callback("disconnect", || callback(reason));
        }
        true
    }

    pub(crate) fn on_disconnect(&self, callback: DisconnectCallback) {
        let mut shared = self.lock();
        match shared.phase.reason() {
            Some(reason) => {
                drop(shared);
                callback(reason);
            }
            None => shared.disconnect_callbacks.push(callback),
        }
    }

    pub(crate) fn wait_disconnecting(&self, deadline: Instant) -> bool {
        let shared = self.lock();
        self.wait_until(shared, deadline, |s| s.phase != Phase::Running)
            .1
    }

    pub(crate) fn set_exit_code(&self, code: i32) {
        self.lock().exit_code = code;
    }

    pub(crate) fn exit_code(&self) -> i32 {
        self.lock().exit_code
    }

    // ----- messages from the primary -----

    /// True when the control thread may read the channel: a message callback takes
    /// messages, or the inbox has room. If not, the reader is marked paused, so that the
    /// thread that makes room wakes the control thread.
    pub(crate) fn may_read_messages(&self) -> bool {
        let mut shared = self.lock();
        let full = shared.message_callback.is_none() && shared.inbox.len() >= self.inbox_capacity();
        shared.reading_paused = full;
        !full
    }

    /// Hands a message from the primary to the callback, or queues it. Returns
    /// [`may_read_messages`](Self::may_read_messages) afterwards.
    pub(crate) fn deliver(&self, message: Message) -> bool {
        let mut shared = self.lock();
        if shared.message_callback.is_some() && !shared.inbox.is_empty() {
            // Messages queued before the callback was set go to it first, in order.
            shared.inbox.push_back(message);
            drop(shared);
            self.deliver_queued();
            return true;
        }
        let Some(callback) = shared.message_callback.take() else {
            shared.inbox.push_back(message);
            let full = shared.inbox.len() >= self.inbox_capacity();
            shared.reading_paused = full;
            drop(shared);
            self.notify();
            return !full;
        };
        drop(shared);
        self.run_message_callback(callback, message);
        true
    }

    /// Hands the queued messages to the message callback, oldest first, if one is set (the
    /// control thread, at the start of each turn: a callback set while messages were queued
    /// gets them before any later one).
    pub(crate) fn deliver_queued(&self) {
        loop {
            let mut shared = self.lock();
            if shared.message_callback.is_none() || shared.inbox.is_empty() {
                return;
            }
            let (Some(callback), Some(message)) =
                (shared.message_callback.take(), shared.inbox.pop_front())
            else {
                return;
            };
            drop(shared);
            self.run_message_callback(callback, message);
        }
    }

    /// Runs the message callback (taken out of the state) on `message`, then puts it back.
    fn run_message_callback(&self, callback: MessageCallback, message: Message) {
        // Never run application code under a lock it could want.
        run_callback("message", || callback(message));
        let mut shared = self.lock();
        // The application may have set another callback meanwhile; the newer one stays.
        let replaced = if shared.message_callback.is_none() && shared.channel_open {
            shared.message_callback = Some(callback);
            None
        } else {
            Some(callback)
        };
        drop(shared);
        drop(replaced);
    }

    pub(crate) fn set_message_callback(&self, callback: MessageCallback) {
        let mut shared = self.lock();
        if !shared.channel_open {
            // No message will come; keeping the callback would only keep what it holds.
            drop(shared);
            drop(callback);
            return;
        }
        let previous = shared.message_callback.replace(callback);
        let resume = std::mem::take(&mut shared.reading_paused);
        // Queued messages go to the callback, on the control thread's next turn.
        let queued = !shared.inbox.is_empty();
        drop(shared);
        drop(previous);
        if resume || queued {
            self.wake();
        }
    }

    /// The next message from the primary, waiting until `deadline`; an error once the channel
    /// is closed and the inbox empty. Taking a message from a full inbox lets the control
    /// thread read on, once the inbox is down to half (so that it reads in batches, not one
    /// message per wake-up).
    pub(crate) fn recv_message(&self, deadline: Instant) -> Result<Option<Message>, Error> {
        let shared = self.lock();
        let (mut shared, _) =
            self.wait_until(shared, deadline, |s| !s.inbox.is_empty() || !s.channel_open);
        let Some(message) = shared.inbox.pop_front() else {
            return if shared.channel_open {
                Ok(None)
            } else {
                Err(Error::ChannelClosed)
            };
        };
        let resume = shared.reading_paused && shared.inbox.len() <= self.inbox_capacity() / 2;
        if resume {
            shared.reading_paused = false;
        }
        drop(shared);
        if resume {
            self.wake();
        }
        Ok(Some(message))
    }

    fn inbox_capacity(&self) -> usize {
        self.options.message_queue_len.max(1)
    }
}

fn is_control_thread(shared: &Shared) -> bool {
    shared.control_thread == Some(std::thread::current().id())
}

/// Fails the requests of `commands` that will never run; true if there were any.
fn fail_tickets(shared: &mut Shared, commands: &VecDeque<Command>) -> bool {
    let mut failed = false;
    for ticket in commands.iter().filter_map(Command::ticket) {
        if let Some(slot) = shared.answers.get_mut(&ticket) {
            slot.get_or_insert(Err(Error::ChannelClosed));
            failed = true;
        }
    }
    failed
}

impl std::fmt::Debug for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerState")
            .field("id", &self.id)
            .field("slot", &self.slot)
            .field("primary_pid", &self.primary_pid)
            .field("phase", &self.lock().phase)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::Heartbeat;

    /// Calls `beat` until it raises a heartbeat; returns when the successful call started and
    /// when it returned, which bracket the clock reading it decided on.
    fn beat_when_due(heartbeat: &Heartbeat) -> (Instant, Instant) {
        loop {
            let before = Instant::now();
            if heartbeat.beat() {
                return (before, Instant::now());
            }
            std::hint::spin_loop();
        }
    }

    /// Regression: a clock truncated to whole milliseconds let beats go up to a millisecond
    /// less than an interval apart (CI saw three beats of a 50 ms interval within 99.7 ms).
    /// The bound is a lower one on a monotonic clock, so a slow machine cannot break it.
    #[test]
    fn beats_are_never_closer_than_one_interval() {
        let interval = Duration::from_millis(3);
        let heartbeat = Heartbeat::new(Some(interval));
        let (mut previous_start, _) = beat_when_due(&heartbeat);
        heartbeat
            .requested
            .store(false, std::sync::atomic::Ordering::Relaxed);
        for _ in 0..10 {
            let (started, returned) = beat_when_due(&heartbeat);
            assert!(
                returned - previous_start >= interval,
                "two heartbeats {:?} apart, interval {interval:?}",
                returned - previous_start
            );
            heartbeat
                .requested
                .store(false, std::sync::atomic::Ordering::Relaxed);
            previous_start = started;
        }
    }
}
