//! What the application's threads and the control thread share: the command queue, the
//! open-connection count, the disconnect state and the message queue.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use cluster_ipc::proto::{ListenRequest, ListenerId};

use crate::listener::Listener;
use crate::message::{Inbox, Message};
use crate::{Error, WorkerOptions};

/// How many bytes of user messages may wait for the control thread.
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

/// What app threads ask the control thread to do.
pub(crate) enum Command {
    /// Send an encoded user message.
    Send(Vec<u8>),
    /// Ask the primary to listen, and answer on `reply`.
    Listen {
        request: ListenRequest,
        addr: SocketAddr,
        reply: SyncSender<Result<Listener, Error>>,
    },
    /// Ask the primary to start a replacement, then disconnect.
    Retire {
        reply: SyncSender<Result<(), Error>>,
    },
    /// Disconnect of the worker's own accord.
    Disconnect,
    /// The application closed a listener; tell the primary.
    CloseListener(ListenerId),
}

#[derive(Default)]
struct Commands {
    queue: VecDeque<Command>,
    user_bytes: usize,
    /// The control thread has stopped: nothing queued now would ever run.
    closed: bool,
}

type DisconnectCallback = Box<dyn FnOnce(DisconnectReason) + Send>;
type MessageCallback = Box<dyn Fn(Message) + Send>;

#[derive(Default)]
struct Lifecycle {
    reason: Option<DisconnectReason>,
    callbacks: Vec<DisconnectCallback>,
    /// The control thread has finished and released everything it held.
    finished: bool,
}

struct Messages {
    inbox: Inbox,
    callback: Option<MessageCallback>,
    /// The control channel is closed: no more messages will come.
    closed: bool,
}

/// The state of one worker, shared by its handles, listeners, streams and control thread.
pub(crate) struct WorkerState {
    pub(crate) id: u64,
    pub(crate) slot: u32,
    pub(crate) primary_pid: u32,
    pub(crate) drain_timeout: Duration,
    pub(crate) options: WorkerOptions,
    /// The control channel's frame limit, to refuse an oversized message at `send`.
    pub(crate) control_limits: cluster_ipc::Limits,
    commands: Mutex<Commands>,
    waker: mio::Waker,
    connections: Mutex<usize>,
    connections_changed: Condvar,
    disconnecting: AtomicBool,
    load_report_due: AtomicBool,
    lifecycle: Mutex<Lifecycle>,
    lifecycle_changed: Condvar,
    messages: Mutex<Messages>,
    message_arrived: Condvar,
    port_zero_listens: AtomicU32,
    control_thread: OnceLock<ThreadId>,
    control_join: Mutex<Option<JoinHandle<()>>>,
}

/// Locks a mutex whose data stays consistent even if a holder panicked (every critical
/// section here is a few plain assignments), so a panic in one app thread cannot wedge the
/// worker.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Waits on `condvar` until `done` holds or `deadline` passes; returns the guard and whether
/// `done` held.
fn wait_until<'a, T>(
    condvar: &Condvar,
    mut guard: MutexGuard<'a, T>,
    deadline: Instant,
    mut done: impl FnMut(&T) -> bool,
) -> (MutexGuard<'a, T>, bool) {
    loop {
        if done(&guard) {
            return (guard, true);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (guard, false);
        }
        guard = condvar
            .wait_timeout(guard, left)
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .0;
    }
}

/// Runs an application callback on the control thread; a panic in it is logged and goes no
/// further, so that one bad callback cannot take the worker's control thread down.
fn run_callback(what: &'static str, callback: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(callback)).is_err() {
        tracing::error!(callback = what, "a worker callback panicked");
    }
}

/// A deadline `timeout` from now, saturating far in the future instead of overflowing.
pub(crate) fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365))
}

pub(crate) struct Identity {
    pub(crate) id: u64,
    pub(crate) slot: u32,
    pub(crate) primary_pid: u32,
    pub(crate) drain_timeout: Duration,
}

impl WorkerState {
    pub(crate) fn new(
        identity: Identity,
        options: WorkerOptions,
        control_limits: cluster_ipc::Limits,
        waker: mio::Waker,
    ) -> WorkerState {
        WorkerState {
            id: identity.id,
            slot: identity.slot,
            primary_pid: identity.primary_pid,
            drain_timeout: identity.drain_timeout,
            messages: Mutex::new(Messages {
                inbox: Inbox::new(options.message_queue_len),
                callback: None,
                closed: false,
            }),
            options,
            control_limits,
            commands: Mutex::default(),
            waker,
            connections: Mutex::new(0),
            connections_changed: Condvar::new(),
            disconnecting: AtomicBool::new(false),
            load_report_due: AtomicBool::new(false),
            lifecycle: Mutex::default(),
            lifecycle_changed: Condvar::new(),
            message_arrived: Condvar::new(),
            port_zero_listens: AtomicU32::new(0),
            control_thread: OnceLock::new(),
            control_join: Mutex::new(None),
        }
    }

    // ----- the control thread itself -----

    /// Keeps the control thread's handle, for [`wait_finished`](Self::wait_finished) to join.
    pub(crate) fn set_control_join_handle(&self, handle: JoinHandle<()>) {
        *lock(&self.control_join) = Some(handle);
    }

    /// Called by the control thread when it starts.
    pub(crate) fn register_control_thread(&self) {
        let _ = self.control_thread.set(std::thread::current().id());
    }

    /// True on the control thread, where waiting for the control thread would never end.
    pub(crate) fn on_control_thread(&self) -> bool {
        self.control_thread.get() == Some(&std::thread::current().id())
    }

    /// Called by the control thread as its very last step.
    pub(crate) fn mark_finished(&self) {
        lock(&self.lifecycle).finished = true;
        self.lifecycle_changed.notify_all();
    }

    pub(crate) fn wait_finished(&self, deadline: Instant) -> bool {
        let guard = lock(&self.lifecycle);
        let (guard, finished) = wait_until(&self.lifecycle_changed, guard, deadline, |state| {
            state.finished
        });
        drop(guard);
        if finished && !self.on_control_thread() {
            // The thread said it is done; joining makes sure it has dropped what it held.
            if let Some(handle) = lock(&self.control_join).take() {
                let _ = handle.join();
            }
        }
        finished
    }

    fn wake(&self) {
        if let Err(err) = self.waker.wake() {
            tracing::error!(error = %err, "cannot wake the worker's control thread");
        }
    }

    // ----- commands -----

    /// Queues a command for the control thread and wakes it.
    pub(crate) fn push(&self, command: Command) -> Result<(), Error> {
        let mut commands = lock(&self.commands);
        if commands.closed {
            return Err(Error::ChannelClosed);
        }
        if let Command::Send(body) = &command {
            let queued = commands.user_bytes;
            if queued + body.len() > MAX_QUEUED_SEND_BYTES && queued > 0 {
                return Err(Error::SendQueueFull {
                    queued,
                    max: MAX_QUEUED_SEND_BYTES,
                });
            }
            commands.user_bytes += body.len();
        }
        commands.queue.push_back(command);
        drop(commands);
        self.wake();
        Ok(())
    }

    pub(crate) fn pop_command(&self) -> Option<Command> {
        let mut commands = lock(&self.commands);
        let command = commands.queue.pop_front()?;
        if let Command::Send(body) = &command {
            commands.user_bytes -= body.len();
        }
        Some(command)
    }

    /// Puts back a command the control thread could not carry out yet, keeping its place.
    pub(crate) fn unpop_command(&self, command: Command) {
        let mut commands = lock(&self.commands);
        if let Command::Send(body) = &command {
            commands.user_bytes += body.len();
        }
        commands.queue.push_front(command);
    }

    /// Refuses every later command and hands back the ones still queued.
    pub(crate) fn close_commands(&self) -> VecDeque<Command> {
        let mut commands = lock(&self.commands);
        commands.closed = true;
        commands.user_bytes = 0;
        std::mem::take(&mut commands.queue)
    }

    /// The `index` of the next listen on port 0.
    pub(crate) fn next_port_zero_index(&self) -> u32 {
        self.port_zero_listens.fetch_add(1, Ordering::Relaxed)
    }

    // ----- open connections -----

    pub(crate) fn connection_opened(&self) {
        *lock(&self.connections) += 1;
        self.load_changed();
    }

    pub(crate) fn connection_closed(&self) {
        let mut open = lock(&self.connections);
        *open = open.saturating_sub(1);
        let idle = *open == 0;
        drop(open);
        if idle {
            self.connections_changed.notify_all();
            // A disconnecting worker exits when it is idle; its control thread decides.
            if self.is_disconnecting() {
                self.wake();
            }
        }
        self.load_changed();
    }

    /// Asks the control thread for a load report, once per batch of changes.
    fn load_changed(&self) {
        if self.options.load_reports == Some(true)
            && !self.load_report_due.swap(true, Ordering::AcqRel)
        {
            self.wake();
        }
    }

    /// True (once) when the open-connection count changed since the last call.
    pub(crate) fn take_load_report_due(&self) -> bool {
        self.load_report_due.swap(false, Ordering::AcqRel)
    }

    /// Whether a load report waits (without taking it).
    pub(crate) fn load_report_due(&self) -> bool {
        self.load_report_due.load(Ordering::Acquire)
    }

    pub(crate) fn open_connections(&self) -> usize {
        *lock(&self.connections)
    }

    pub(crate) fn wait_idle(&self, deadline: Instant) -> bool {
        let guard = lock(&self.connections);
        wait_until(&self.connections_changed, guard, deadline, |open| {
            *open == 0
        })
        .1
    }

    // ----- disconnect -----

    pub(crate) fn is_disconnecting(&self) -> bool {
        self.disconnecting.load(Ordering::Acquire)
    }

    pub(crate) fn disconnect_reason(&self) -> Option<DisconnectReason> {
        lock(&self.lifecycle).reason
    }

    /// Records that the worker is disconnecting (once) and runs the callbacks. Returns false
    /// if it already was.
    pub(crate) fn publish_disconnect(&self, reason: DisconnectReason) -> bool {
        let mut lifecycle = lock(&self.lifecycle);
        if lifecycle.reason.is_some() {
            return false;
        }
        lifecycle.reason = Some(reason);
        let callbacks = std::mem::take(&mut lifecycle.callbacks);
        self.disconnecting.store(true, Ordering::Release);
        drop(lifecycle);
        self.lifecycle_changed.notify_all();
        for callback in callbacks {
            run_callback("disconnect", || callback(reason));
        }
        true
    }

    pub(crate) fn on_disconnect(&self, callback: DisconnectCallback) {
        let mut lifecycle = lock(&self.lifecycle);
        match lifecycle.reason {
            Some(reason) => {
                drop(lifecycle);
                callback(reason);
            }
            None => lifecycle.callbacks.push(callback),
        }
    }

    pub(crate) fn wait_disconnecting(&self, deadline: Instant) -> bool {
        let guard = lock(&self.lifecycle);
        wait_until(&self.lifecycle_changed, guard, deadline, |state| {
            state.reason.is_some()
        })
        .1
    }

    // ----- messages -----

    /// Hands a message from the primary to the callback, or queues it.
    pub(crate) fn deliver(&self, message: Message) {
        let mut messages = lock(&self.messages);
        let Some(callback) = messages.callback.take() else {
            messages.inbox.push(message);
            drop(messages);
            self.message_arrived.notify_one();
            return;
        };
        // Never run application code under a lock it could want.
        drop(messages);
        run_callback("message", || callback(message));
        let mut messages = lock(&self.messages);
        if messages.callback.is_none() {
            messages.callback = Some(callback);
        }
    }

    pub(crate) fn set_message_callback(&self, callback: MessageCallback) {
        lock(&self.messages).callback = Some(callback);
    }

    /// No more messages will come. Drops the callback too: it may hold a [`Worker`]
    /// handle, and with it this state, which would otherwise never be freed.
    ///
    /// [`Worker`]: crate::Worker
    pub(crate) fn close_messages(&self) {
        let mut messages = lock(&self.messages);
        messages.closed = true;
        let callback = messages.callback.take();
        drop(messages);
        self.message_arrived.notify_all();
        drop(callback);
    }

    pub(crate) fn recv_message(&self, deadline: Instant) -> Result<Option<Message>, Error> {
        let guard = lock(&self.messages);
        let (mut messages, _) = wait_until(&self.message_arrived, guard, deadline, |state| {
            state.closed || !state.inbox.is_empty()
        });
        match messages.inbox.pop() {
            Some(message) => Ok(Some(message)),
            None if messages.closed => Err(Error::ChannelClosed),
            None => Ok(None),
        }
    }
}

impl std::fmt::Debug for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerState")
            .field("id", &self.id)
            .field("slot", &self.slot)
            .field("primary_pid", &self.primary_pid)
            .field("disconnecting", &self.is_disconnecting())
            .finish_non_exhaustive()
    }
}
