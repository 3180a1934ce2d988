//! The supervisor core: every decision the primary takes, as a plain state machine.
//!
//! It owns no fd, pid handle, socket or clock. Processes and connections are ids in it
//! ([`WorkerId`], [`ListenerId`], [`ConnId`]); the shell (the mio loop in `primary.rs` and
//! `shell.rs`) maps them to the processes, sockets and fds behind them. Inputs are `handle_*`
//! calls with the time passed in (`now`); outputs are [`Action`]s taken with
//! [`Supervisor::poll_action`], in the order they must be carried out, and the next deadline
//! from [`Supervisor::poll_timeout`]. Nothing here can block, fail on I/O or race: the same
//! inputs give the same actions, which is what lets the tests drive it with scripted workers
//! and a fake clock.

mod listeners;
mod workers;

#[cfg(test)]
mod tests;

use core::net::SocketAddr;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ffi::OsString;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use cluster_ipc::proto::{
    Delivery as WireDelivery, HandoffToPrimary, ListenAddr, ListenMode, ListenRefused,
    ListenRequest, PROTOCOL_VERSION, ToPrimary, ToWorker,
};
use cluster_ipc::{ConnId, ErrorChain, ListenerId, SlotId, WorkerId};

use crate::config::{Config, Policy, Recycle, Respawn, Rollout as RolloutLimits};
use crate::event::{Counters, Event, ExitStatus, Status, WorkerInfo, WorkerState};
use crate::signal::Signal;

pub(crate) use lifecycle::{Ending, Fatal};
use lifecycle::{Rollouts, failure_of, jitter_for};
pub(crate) use listeners::ListenKey;
use listeners::{Listeners, RoundRobin};
use workers::{Slot, Worker};

/// A worker that exits sooner than this after its start, or before it listened, counts as a
/// failed start of its slot.
pub(crate) const STABLE_UPTIME: Duration = Duration::from_secs(1);
/// The first delay before respawning a slot that keeps failing; it doubles up to the cap.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest delay before respawning a slot.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long accepting pauses after the process ran out of fds.
const FD_EXHAUSTED_BACKOFF: Duration = Duration::from_millis(100);

/// How long to wait before respawning a slot after `failures` failed starts in a row: at once
/// for the first, then 100 ms, 200 ms, ... up to 5 s, so that a worker that cannot start
/// never turns into a tight fork loop.
pub(crate) fn respawn_delay(failures: u32) -> Duration {
    match failures {
        0 | 1 => Duration::ZERO,
        n => FIRST_BACKOFF
            .saturating_mul(1 << (n - 2).min(16))
            .min(MAX_BACKOFF),
    }
}

/// The time a worker gives itself to finish: a little less than the shutdown timeout after
/// which the primary kills it, so that a worker that runs out of time exits by itself rather
/// than racing the SIGKILL.
pub(crate) fn drain_timeout(shutdown_timeout: Duration) -> Duration {
    let margin = (shutdown_timeout / 10).min(Duration::from_secs(1));
    shutdown_timeout - margin
}

/// What the supervisor needs to know of the configuration.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) workers: usize,
    pub(crate) mode: ListenMode,
    pub(crate) policy: Policy,
    pub(crate) window: NonZeroU32,
    pub(crate) start_timeout: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) respawn: Respawn,
    pub(crate) max_message_len: u32,
    pub(crate) primary_pid: u32,
    /// A worker that holds un-acked connections, or sends no heartbeat, for this long is hung.
    pub(crate) hang_timeout: Option<Duration>,
    /// The crash-loop guard: this many failures within this long stop the cluster.
    pub(crate) crash_loop: (u32, Duration),
    pub(crate) readiness_timeout: Duration,
    pub(crate) rollout: RolloutLimits,
    pub(crate) recycle: Recycle,
}

impl Settings {
    /// What the supervisor needs of a configuration, for the primary `primary_pid`.
    pub(crate) fn of(config: &Config, primary_pid: u32) -> Settings {
        Settings {
            workers: config.workers,
            mode: config.mode,
            policy: config.policy,
            window: config.window,
            start_timeout: config.start_timeout,
            shutdown_timeout: config.shutdown_timeout,
            respawn: config.respawn,
            // The limits were checked to fit a u32 when they were made.
            max_message_len: u32::try_from(config.control_limits.max_message_len())
                .unwrap_or(u32::MAX),
            primary_pid,
            hang_timeout: config.hang_timeout,
            crash_loop: config.crash_loop,
            readiness_timeout: config.readiness_timeout,
            rollout: config.rollout,
            recycle: config.recycle,
        }
    }

    /// How often workers send heartbeats: four in each hang timeout, so that one late
    /// heartbeat is not a hang.
    pub(crate) fn heartbeat_interval(&self) -> Option<Duration> {
        self.hang_timeout.map(|timeout| timeout / 4)
    }
}

/// Something the shell must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Start worker `worker` in `slot`, with `env` added to its environment, then say
    /// [`Supervisor::handle_spawned`] or [`Supervisor::handle_spawn_failed`].
    Spawn {
        worker: WorkerId,
        slot: SlotId,
        env: Vec<(OsString, OsString)>,
    },
    /// Measure these workers' memory and say [`Supervisor::handle_memory`] for each.
    MeasureMemory { workers: Vec<WorkerId> },
    /// Send a control message on the worker's channel (a reply when `ack` is set). A closed
    /// channel is not an error: its end of file comes as its own input.
    Send {
        worker: WorkerId,
        ack: Option<u64>,
        msg: ToWorker,
    },
    /// Bind and listen on `addr` for `listener`; answer at once with
    /// [`Supervisor::handle_bound`].
    Bind {
        listener: ListenerId,
        addr: SocketAddr,
    },
    /// Grant `listener` to `worker`: make the fd that goes with the reply (a handoff socket
    /// for round-robin, the listening socket for shared) and send
    /// `ListenGranted { listener, local_addr, delivery }` as the reply to `ack`; if the fd
    /// cannot be made, say [`Supervisor::handle_grant_failed`] instead.
    Grant {
        worker: WorkerId,
        ack: u64,
        listener: ListenerId,
        local_addr: SocketAddr,
        delivery: WireDelivery,
    },
    /// Send these connections down the worker's handoff socket for `listener`, in frames of
    /// at most its fd limit. Keep the copies until released.
    HandOff {
        worker: WorkerId,
        listener: ListenerId,
        conns: Vec<ConnId>,
    },
    /// Close the primary's copies of these connections: acknowledged by a worker (which has
    /// its own copy now), or dropped because the listener stopped.
    Release { conns: Vec<ConnId> },
    /// Accept on the listener (register it), or stop (deregister it).
    Accept { listener: ListenerId, on: bool },
    /// Send nothing more on this handoff socket and close it.
    CloseHandoff {
        worker: WorkerId,
        listener: ListenerId,
    },
    /// Close the worker's control channel (after a protocol violation).
    CloseControl { worker: WorkerId },
    /// Send `signal` to the worker's process, or to its whole process group.
    Signal {
        worker: WorkerId,
        signal: Signal,
        group: bool,
    },
    /// Tell the application.
    Event(Event),
    /// Nothing is left to supervise: [`Primary::run`](crate::Primary::run) returns.
    Finished,
}

/// Why the supervisor refuses a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// No such worker, or it is gone (or not yet online, for a send).
    NoSuchWorker,
    /// The cluster is stopping.
    Stopping,
    /// A cluster needs at least one worker.
    NoWorkers,
}

/// Deliberate flaws the tests plant to prove they catch them (as `cluster-sched`'s
/// sabotaged policies do); none exists outside the tests.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sabotage {
    /// A worker's end does not give its un-acked connections back to the policy.
    ForgetRedispatchOnDeath,
    /// A disconnecting worker keeps getting connections.
    HandToDisconnecting,
    /// An ack releases its connections twice.
    CountAckTwice,
    /// A failing slot is respawned at once, every time.
    SkipBackoff,
    /// A stop forgets pending connections instead of closing them.
    DropPendingOnStop,
    /// A replacement is ready as soon as it says Hello, listening or not: the worker it
    /// replaces drains too early.
    RetireBeforeReady,
    /// A hung worker keeps its un-acked connections until it dies.
    KeepHungConnections,
    /// A scale-down forgets the workers of the slots it removes instead of draining them.
    ScaleDownKeepsWorkers,
    /// The crash-loop guard never trips.
    CrashLoopNeverTrips,
}

/// True when the tests planted `flaw`; always false outside them.
macro_rules! sabotaged {
    ($supervisor:expr, $flaw:ident) => {{
        #[cfg(test)]
        let planted = $supervisor.sabotage == Some(Sabotage::$flaw);
        #[cfg(not(test))]
        let planted = false;
        planted
    }};
}

// Declared after `sabotaged!`, which it uses (a macro is seen only below its definition).
mod lifecycle;

/// The primary's whole decision state.
#[derive(Debug)]
pub(crate) struct Supervisor {
    settings: Settings,
    workers: BTreeMap<WorkerId, Worker>,
    next_worker: u64,
    slots: Vec<Slot>,
    listeners: Listeners,
    stopping: bool,
    finished: bool,
    ready_sent: bool,
    restarts: u64,
    /// What happened to connections and workers so far, for status and metrics.
    counters: Counters,
    actions: VecDeque<Action>,
    rollouts: Rollouts,
    /// When recent failures happened, for the crash-loop guard.
    failure_times: VecDeque<Instant>,
    /// Why the cluster stopped by itself.
    fatal: Option<Fatal>,
    /// Workers the stop had to kill.
    forced_kills: usize,
    /// Connections were handed out since the hang clock last looked.
    stamp_stalls: bool,
    /// When [`start`](Self::start) was called: an instant surely past.
    started_at: Option<Instant>,
    /// When to measure the workers' memory next.
    memory_due: Option<Instant>,
    /// Listeners whose policy has inputs it has not decided on yet.
    dispatch_due: BTreeSet<ListenerId>,
    /// Listeners whose accepting may have to change.
    accept_due: BTreeSet<ListenerId>,
    #[cfg(test)]
    sabotage: Option<Sabotage>,
}

impl Supervisor {
    /// A supervisor with nothing started yet.
    pub(crate) fn new(settings: Settings) -> Supervisor {
        let slots = (0..settings.workers).map(|_| Slot::default()).collect();
        Supervisor {
            settings,
            workers: BTreeMap::new(),
            next_worker: 1,
            slots,
            listeners: Listeners::default(),
            stopping: false,
            finished: false,
            ready_sent: false,
            restarts: 0,
            counters: Counters::default(),
            actions: VecDeque::new(),
            rollouts: Rollouts::default(),
            failure_times: VecDeque::new(),
            fatal: None,
            forced_kills: 0,
            stamp_stalls: false,
            started_at: None,
            memory_due: None,
            dispatch_due: BTreeSet::new(),
            accept_due: BTreeSet::new(),
            #[cfg(test)]
            sabotage: None,
        }
    }

    // ----- outputs -----

    /// The next thing to do.
    ///
    /// What the listeners' policies decide is worked out here, when everything else is taken:
    /// the inputs that came since (every ack a read of a handoff socket found, every
    /// connection a turn accepted) go into one decision, so handoffs go out in batches.
    pub(crate) fn poll_action(&mut self) -> Option<Action> {
        if self.actions.is_empty() {
            self.dispatch_due();
        }
        self.actions.pop_front()
    }

    /// The worker's `Exit` event is being delivered: it is forgotten now. Until then a
    /// reaped worker stays listed (as disconnected), so that whoever handles its
    /// `Disconnect` event finds it.
    pub(crate) fn handle_exit_delivered(&mut self, worker: WorkerId) {
        if self.workers.get(&worker).is_some_and(|w| w.reaped) {
            self.workers.remove(&worker);
        }
    }

    /// The earliest time [`handle_timeout`](Supervisor::handle_timeout) has something to do.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let start_timeout = self.settings.start_timeout;
        let workers = self.workers.values().flat_map(|worker| {
            let start = (worker.state == WorkerState::Starting
                && worker.kill_at.is_none()
                && !worker.killed)
                .then(|| worker.spawned_at + start_timeout);
            [worker.kill_at, start]
        });
        let slots = self.slots.iter().map(|slot| slot.respawn_at);
        let lifecycle = self
            .rollouts
            .deadlines()
            .chain(self.hang_deadlines())
            .chain(self.stamp_due())
            .chain(self.memory_due.filter(|_| !self.stopping))
            .map(Some);
        workers
            .chain(slots)
            .chain(self.listeners.fd_backoffs())
            .chain(lifecycle)
            .flatten()
            .min()
    }

    /// True once [`Action::Finished`] was given.
    pub(crate) fn is_finished(&self) -> bool {
        self.finished
    }

    // ----- inputs: time and life -----

    /// Starts the configured number of workers, one per slot.
    pub(crate) fn start(&mut self, now: Instant) {
        self.started_at = Some(now);
        for slot in 0..self.slots.len() {
            self.spawn_into(SlotId(slot as u32), now);
        }
        if self.settings.recycle.max_memory.is_some() {
            self.memory_due = Some(now);
        }
        self.check_finished();
    }

    /// Does whatever is due at `now`: start timeouts, kills, respawns, the end of an fd
    /// backoff.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        let start_timeout = self.settings.start_timeout;
        for worker in self.workers.values_mut() {
            if worker.state == WorkerState::Starting
                && worker.kill_at.is_none()
                && !worker.killed
                && !worker.reaped
                && worker.spawned_at + start_timeout <= now
            {
                tracing::error!(worker = worker.id.0, "no Hello within the start timeout");
                worker.fault = Some(format!("no Hello within {start_timeout:?}"));
                worker.kill_at = Some(now);
            }
        }
        self.kill_overdue(now);
        self.replacements_overdue(now);
        self.check_hung(now);
        if !self.stopping {
            self.measure_memory_if_due(now);
        }
        for listener in self.listeners.fd_backoff_over(now) {
            self.set_accepting(listener);
        }
        let due: Vec<SlotId> = (0..self.slots.len())
            .filter(|&slot| self.slots[slot].respawn_at.is_some_and(|at| at <= now))
            .map(|slot| SlotId(slot as u32))
            .collect();
        for slot in due {
            if let Some(state) = self.slot_mut(slot) {
                state.respawn_at = None;
            }
            if !self.stopping {
                self.spawn_into(slot, now);
            }
        }
        self.stamp_stalls(now);
        self.check_finished();
    }

    /// The worker's process started, as `pid`.
    pub(crate) fn handle_spawned(&mut self, worker: WorkerId, pid: u32) {
        let Some(record) = self.workers.get_mut(&worker) else {
            return;
        };
        record.pid = Some(pid);
        let (slot, asked) = (record.slot, record.leaving.asked);
        tracing::info!(worker = worker.0, pid, slot = slot.0, "worker started");
        self.emit(Event::Fork { worker, pid, slot });
        if asked {
            // Asked to go (a stop) before its process existed: it could not be told then.
            self.actions.push_back(Action::Signal {
                worker,
                signal: Signal::SIGTERM,
                group: false,
            });
        }
    }

    /// The worker's process could not be started (the OS said `errno`, when it said
    /// anything); nothing of it exists. A program that cannot be executed stops the cluster,
    /// unless only a roll-out's replacement failed: the roll-out is aborted and the workers
    /// already running keep serving.
    pub(crate) fn handle_spawn_failed(
        &mut self,
        worker: WorkerId,
        errno: Option<i32>,
        now: Instant,
    ) {
        let why = "its program could not be started";
        let replacement = self.rollouts.replacements.contains_key(&worker);
        if replacement {
            self.replacement_failed(worker, why, now);
        }
        let Some(record) = self.workers.remove(&worker) else {
            return;
        };
        if !replacement {
            // Stopping first, so that the slot is not refilled with what cannot run.
            if let Some(errno) = errno.filter(|&errno| lifecycle::unfixable_spawn(errno)) {
                self.fail(Fatal::ProgramNotExecutable { errno }, now);
            }
            self.slot_failed(record.slot, worker, now);
        }
        self.count_failure(why, now);
        self.check_finished();
    }

    /// The worker's process is gone (reaped) with `status`. Whatever its channels held has
    /// been read by now.
    pub(crate) fn handle_exited(&mut self, worker: WorkerId, status: ExitStatus, now: Instant) {
        self.control_closed(worker, now);
        for listener in self.handoffs_of(worker) {
            self.handoff_closed(worker, listener);
        }
        let Some(record) = self.workers.get_mut(&worker).filter(|w| !w.reaped) else {
            return;
        };
        record.reaped = true;
        // Its pid may be reused from now on: never signal it again.
        record.kill_at = None;
        let after_disconnect = record.leaving.is_leaving();
        let pid = record.pid.unwrap_or(0);
        let failure = failure_of(record.fault.as_deref(), record.leaving.asked, status);
        if self.stopping && status == ExitStatus::Code(cluster_ipc::env::DRAIN_TIMEOUT_EXIT_CODE) {
            // It gave up at its drain timeout and cut its clients off: not a clean stop.
            self.forced_kills += 1;
        }
        let boot_failed = status == ExitStatus::Code(cluster_ipc::env::BOOT_FAILURE_EXIT_CODE)
            && !record.reached_listening
            && !record.leaving.asked;
        self.counters.exits += 1;
        self.counters.failures += u64::from(failure.is_some());
        // A signal nobody here sent (an operator's kill, the OOM killer) is worth a warning
        // even when it is no failure of the worker's own.
        let killed_from_outside = !record.leaving.asked && matches!(status, ExitStatus::Signal(_));
        match &failure {
            Some(why) => tracing::warn!(worker = worker.0, pid, %status, why, "worker failed"),
            None if killed_from_outside => {
                tracing::warn!(worker = worker.0, pid, %status, "worker killed")
            }
            None => {
                tracing::info!(worker = worker.0, pid, %status, after_disconnect, "worker exited")
            }
        }
        self.emit(Event::Exit {
            worker,
            pid,
            status,
            after_disconnect,
        });
        if self.rollouts.replacements.contains_key(&worker) {
            let why = failure
                .clone()
                .unwrap_or_else(|| format!("{status} before it was ready"));
            let why = if boot_failed {
                format!("worker boot failed: {why}")
            } else {
                why
            };
            self.replacement_failed(worker, &why, now);
        } else if boot_failed && !self.stopping {
            let exit_code = cluster_ipc::env::BOOT_FAILURE_EXIT_CODE;
            self.fail(Fatal::BootFailed { worker, exit_code }, now);
        }
        if let Some(why) = &failure {
            if !self.stopping {
                self.count_failure(why, now);
            }
        }
        self.settle_slot(worker, failure.is_some(), now);
        self.check_finished();
    }

    // ----- inputs: the control channel -----

    /// A message from the worker's control channel.
    pub(crate) fn handle_control(
        &mut self,
        worker: WorkerId,
        seq: u64,
        msg: ToPrimary,
        now: Instant,
    ) {
        let Some(state) = self
            .workers
            .get(&worker)
            .filter(|w| w.control_open)
            .map(|w| w.state)
        else {
            return;
        };
        match (state, msg) {
            (
                WorkerState::Starting,
                ToPrimary::Hello {
                    worker_id,
                    pid,
                    protocol_version,
                },
            ) => self.on_hello(worker, seq, worker_id, pid, protocol_version, now),
            (WorkerState::Starting, other) => {
                self.protocol_violation(worker, &format!("{other:?} before Hello"), now);
            }
            (_, ToPrimary::User(message)) => self.emit(Event::Message { worker, message }),
            (_, ToPrimary::Listen(request)) => self.on_listen(worker, seq, &request),
            (
                _,
                ToPrimary::Listening {
                    listener,
                    local_addr,
                },
            ) => self.on_listening(worker, listener, &local_addr, now),
            (_, ToPrimary::CloseListener { listener }) => self.on_close_listener(worker, listener),
            (_, ToPrimary::Disconnecting) => self.on_worker_leaving(worker, false, now),
            (_, ToPrimary::Retire) => {
                self.on_worker_leaving(worker, true, now);
                self.send(worker, Some(seq), ToWorker::Ack);
            }
            (_, ToPrimary::Ack) => {}
            (_, ToPrimary::LoadReport { open_connections }) => {
                self.on_load_report(worker, open_connections);
            }
            (_, ToPrimary::Heartbeat { connections }) => {
                self.on_heartbeat(worker, connections, now)
            }
            (_, ToPrimary::HandBack { listener, .. }) => {
                // The shell takes a `HandBack` with its connection to `handle_handed_back`;
                // one that reaches here came without it.
                self.protocol_violation(
                    worker,
                    &format!("HandBack on {listener} without exactly one connection"),
                    now,
                );
            }
            (_, other @ ToPrimary::Hello { .. }) => {
                self.protocol_violation(worker, &format!("unexpected {other:?}"), now);
            }
        }
    }

    /// The worker's control channel reached its end, or broke (`error`): a broken one is a
    /// protocol violation and the worker is killed.
    pub(crate) fn handle_control_closed(
        &mut self,
        worker: WorkerId,
        error: Option<&str>,
        now: Instant,
    ) {
        match error {
            Some(what) => self.protocol_violation(worker, &format!("control channel: {what}"), now),
            None => self.control_closed(worker, now),
        }
    }

    /// The answer to [`Action::Bind`]: the address actually bound, or why not.
    pub(crate) fn handle_bound(
        &mut self,
        listener: ListenerId,
        result: Result<SocketAddr, ListenRefused>,
        now: Instant,
    ) {
        self.on_bound(listener, result, now);
    }

    /// The fd of an [`Action::Grant`] could not be made: the worker's request is refused.
    pub(crate) fn handle_grant_failed(
        &mut self,
        worker: WorkerId,
        ack: u64,
        listener: ListenerId,
        refused: ListenRefused,
    ) {
        // Handoffs decided behind the grant would go down a socket that was never made: drop
        // them; the policy takes their connections back as the worker leaves the listener.
        self.apply_dispatch(listener);
        self.actions.retain(|action| {
            !matches!(action, Action::HandOff { worker: w, listener: l, .. }
                if *w == worker && *l == listener)
        });
        self.leave_listener(worker, listener);
        self.refuse_listen(worker, ack, refused);
    }

    // ----- inputs: round-robin delivery -----

    /// Connections accepted on a listener, with the ids the shell gave them.
    pub(crate) fn handle_accepted(&mut self, listener: ListenerId, conns: &[ConnId]) {
        let Some(rr) = self.listeners.round_robin(listener) else {
            // Not a round-robin listener (or gone): nobody will take them.
            self.actions.push_back(Action::Release {
                conns: conns.to_vec(),
            });
            return;
        };
        for &conn in conns {
            rr.incoming(conn);
        }
        self.counters.accepted += conns.len() as u64;
        self.dispatch_later(listener);
    }

    /// Accepting on the listener failed for want of fds: pause it for a moment.
    pub(crate) fn handle_fds_exhausted(&mut self, listener: ListenerId, now: Instant) {
        if let Some(rr) = self.listeners.round_robin(listener) {
            tracing::warn!(
                listener = listener.0,
                "out of file descriptors; pausing accept"
            );
            rr.fd_backoff_until = Some(now + FD_EXHAUSTED_BACKOFF);
        }
        self.set_accepting(listener);
    }

    /// A message from the worker's handoff socket for `listener`; `returned` are the ids the
    /// shell gave to the connections that came with a `ConnectionsReturned`.
    pub(crate) fn handle_handoff(
        &mut self,
        worker: WorkerId,
        listener: ListenerId,
        msg: HandoffToPrimary,
        returned: Vec<ConnId>,
        now: Instant,
    ) {
        let outcome = match msg {
            HandoffToPrimary::ConnectionsAck { count } => self.on_ack(worker, listener, count, now),
            HandoffToPrimary::ConnectionsReturned { count } if count as usize == returned.len() => {
                self.counters.returned += returned.len() as u64;
                if let Some(rr) = self.listeners.round_robin(listener) {
                    rr.requeue_front(&returned);
                } else {
                    self.actions.push_back(Action::Release { conns: returned });
                }
                self.dispatch_later(listener);
                Ok(())
            }
            HandoffToPrimary::ConnectionsReturned { count } => {
                let fds = returned.len();
                self.actions.push_back(Action::Release { conns: returned });
                Err(format!("{count} connections returned with {fds} fds"))
            }
        };
        if let Err(what) = outcome {
            self.protocol_violation(worker, &format!("handoff socket: {what}"), now);
        }
    }

    /// The worker's handoff socket for `listener` reached its end (or broke: `error`, a
    /// protocol violation). Everything it sent has been read, so what is still un-acked was
    /// never received and goes to another worker.
    pub(crate) fn handle_handoff_closed(
        &mut self,
        worker: WorkerId,
        listener: ListenerId,
        error: Option<&str>,
        now: Instant,
    ) {
        if let Some(what) = error {
            self.protocol_violation(worker, &format!("handoff socket: {what}"), now);
        }
        self.handoff_closed(worker, listener);
        self.check_finished();
    }

    /// A connection a draining worker handed back between two requests (`conn`, the id the
    /// shell gave it, which keeps the bytes the worker had read), or `None` when the
    /// `HandBack` came without exactly one fd. It goes to the front of the listener's queue,
    /// for another worker; with no round-robin listener left to take it, it is closed.
    pub(crate) fn handle_handed_back(
        &mut self,
        worker: WorkerId,
        listener: ListenerId,
        conn: Option<ConnId>,
        now: Instant,
    ) {
        let Some(conn) = conn else {
            self.protocol_violation(
                worker,
                &format!("HandBack on {listener} without exactly one connection"),
                now,
            );
            return;
        };
        self.counters.returned += 1;
        let open = !self.stopping && self.listeners.get(listener).is_some();
        match self.listeners.round_robin(listener).filter(|_| open) {
            Some(rr) => {
                rr.requeue_front(&[conn]);
                self.dispatch_later(listener);
            }
            None => self
                .actions
                .push_back(Action::Release { conns: vec![conn] }),
        }
    }

    // ----- inputs: commands from the application -----

    /// Stops the cluster: stop accepting, close what is pending, disconnect every worker,
    /// kill what is left after the shutdown timeout. Not graceful, or when already stopping:
    /// kill every worker at once.
    pub(crate) fn stop(&mut self, graceful: bool, now: Instant) {
        let graceful = graceful && !self.stopping;
        self.stopping = true;
        for slot in &mut self.slots {
            slot.respawn_at = None;
        }
        self.abort_rollouts_for_stop(now);
        self.withdraw_spawns();
        for listener in self.listeners.ids() {
            self.change_policy(listener, RoundRobin::shutdown);
            // The policy says nothing about accepting once shut down: turn it off here.
            self.set_accepting(listener);
        }
        let ids = self.live_workers();
        tracing::info!(graceful, workers = ids.len(), "stopping");
        for id in ids {
            if graceful {
                self.ask_to_disconnect(id, now);
            } else if let Some(worker) = self.workers.get_mut(&id) {
                worker.leaving.asked = true;
                worker.kill_at = Some(now);
                if worker.pid.is_none() && !worker.killed {
                    // Never started: nothing to kill, but the stop was not clean.
                    self.forced_kills += 1;
                }
            }
        }
        self.kill_overdue(now);
        self.check_finished();
    }

    /// Asks a worker to disconnect: it stops taking connections, finishes the ones it has and
    /// exits; after the shutdown timeout it is killed. It is not replaced.
    ///
    /// A replacement not ready yet fails at once (its roll-out is aborted): the worker it was
    /// to replace keeps the slot, or the slot is refilled if that one no longer serves, as
    /// after any failed replacement. Decided now, not at its readiness timeout, so that what
    /// happens to the slot does not depend on what the application does meanwhile.
    pub(crate) fn disconnect(&mut self, worker: WorkerId, now: Instant) -> Result<(), Refusal> {
        if self.workers.get(&worker).is_none_or(|w| w.reaped) {
            return Err(Refusal::NoSuchWorker);
        }
        if self.rollouts.replacements.contains_key(&worker) {
            // It is asked to disconnect there.
            self.replacement_failed(worker, "disconnected by the application", now);
        } else {
            self.ask_to_disconnect(worker, now);
        }
        self.check_finished();
        Ok(())
    }

    /// Whether a signal may be sent to the worker (it is not reaped: its pid is its own).
    pub(crate) fn may_signal(&self, worker: WorkerId) -> Result<(), Refusal> {
        match self.workers.get(&worker) {
            Some(record) if !record.reaped && record.pid.is_some() => Ok(()),
            _ => Err(Refusal::NoSuchWorker),
        }
    }

    /// Whether the worker takes messages: it said Hello and its channel is open.
    pub(crate) fn may_send(&self, worker: WorkerId) -> Result<(), Refusal> {
        match self.workers.get(&worker) {
            Some(record) if record.control_open && record.state != WorkerState::Starting => Ok(()),
            _ => Err(Refusal::NoSuchWorker),
        }
    }

    /// The workers that take messages, by id.
    pub(crate) fn reachable_workers(&self) -> Vec<WorkerId> {
        self.workers
            .keys()
            .copied()
            .filter(|&id| self.may_send(id).is_ok())
            .collect()
    }

    // ----- queries -----

    /// The workers whose `Exit` has not been taken yet, by id.
    pub(crate) fn workers(&self, now: Instant) -> Vec<WorkerInfo> {
        self.workers
            .values()
            .map(|worker| self.info(worker, now))
            .collect()
    }

    /// One worker whose `Exit` has not been taken yet.
    pub(crate) fn worker(&self, id: WorkerId, now: Instant) -> Option<WorkerInfo> {
        self.workers.get(&id).map(|worker| self.info(worker, now))
    }

    fn info(&self, worker: &Worker, now: Instant) -> WorkerInfo {
        let restarts = self
            .slots
            .get(worker.slot.0 as usize)
            .map_or(0, |slot| slot.restarts);
        WorkerInfo {
            id: worker.id,
            pid: worker.pid.unwrap_or(0),
            slot: worker.slot,
            state: worker.state,
            uptime: now.saturating_duration_since(worker.spawned_at),
            connections_handed: worker.connections_handed,
            connections_acked: worker.connections_acked,
            in_flight: self.listeners.in_flight(worker.id),
            open_connections: worker.reported_open,
            restarts,
            heartbeat_age: worker
                .heartbeat_at
                .map(|at| now.saturating_duration_since(at)),
            memory: worker.memory,
        }
    }

    /// A snapshot of the whole cluster.
    pub(crate) fn status(&self, now: Instant) -> Status {
        Status {
            pid: self.settings.primary_pid,
            workers: self.workers(now),
            restarts: self.restarts,
            listening: self.listeners.addrs(),
            pending_connections: self.listeners.pending(),
            stopping: self.stopping,
            target_workers: self.slots.len(),
            rollout: self.rollouts.progress(),
            counters: self.counters,
        }
    }

    /// The number of workers the cluster keeps.
    pub(crate) fn target_workers(&self) -> usize {
        self.slots.len()
    }

    /// True once the cluster is stopping.
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping
    }

    /// True when no worker is listed.
    pub(crate) fn has_no_workers(&self) -> bool {
        self.workers.is_empty()
    }

    // ----- the control conversation -----

    fn on_hello(
        &mut self,
        worker: WorkerId,
        seq: u64,
        claimed: WorkerId,
        pid: u32,
        version: u32,
        now: Instant,
    ) {
        let refusal = if version != PROTOCOL_VERSION {
            Some(format!(
                "protocol version {version} is not the primary's {PROTOCOL_VERSION}: \
                 the worker runs a different build"
            ))
        } else if claimed != worker {
            Some(format!(
                "worker says it is {claimed}, but it was started as {worker}"
            ))
        } else {
            None
        };
        if let Some(reason) = refusal {
            tracing::error!(worker = worker.0, %reason, "refusing worker");
            self.send(
                worker,
                Some(seq),
                ToWorker::Refused {
                    reason: reason.clone(),
                },
            );
            self.protocol_violation(worker, &reason, now);
            return;
        }
        let welcome = ToWorker::Welcome {
            primary_pid: self.settings.primary_pid,
            protocol_version: PROTOCOL_VERSION,
            drain_timeout_ms: u64::try_from(
                drain_timeout(self.settings.shutdown_timeout).as_millis(),
            )
            .unwrap_or(u64::MAX),
            max_message_len: self.settings.max_message_len,
            load_reports: self.settings.policy == Policy::LeastConnections,
            heartbeat_interval_ms: self.settings.heartbeat_interval().map_or(0, |every| {
                u64::try_from(every.as_millis()).unwrap_or(u64::MAX)
            }),
        };
        self.send(worker, Some(seq), welcome);
        if let Some(record) = self.workers.get_mut(&worker) {
            // A pid namespace can make the worker's own pid differ from the one we know.
            tracing::debug!(worker = worker.0, known = ?record.pid, reported = pid, "worker online");
            record.state = WorkerState::Online;
        }
        self.emit(Event::Online { worker });
        self.check_replacement_ready(worker, now);
    }

    fn on_listen(&mut self, worker: WorkerId, seq: u64, request: &ListenRequest) {
        let (key, mode) = match self.check_listen(worker, request) {
            Ok(found) => found,
            Err(refused) => return self.refuse_listen(worker, seq, refused),
        };
        let listener = match self.listeners.by_key(key) {
            Some(existing) => existing,
            None => {
                let dispatch = (mode == ListenMode::RoundRobin)
                    .then(|| RoundRobin::new(self.settings.policy, self.settings.window));
                let listener = self.listeners.open(key, mode, dispatch);
                self.actions.push_back(Action::Bind {
                    listener,
                    addr: key.addr,
                });
                listener
            }
        };
        if self.listeners.is_bound(listener) {
            self.join_and_grant(worker, seq, listener, mode);
        } else {
            // The bind's answer is on its way: join then.
            self.listeners.wait_for_bind(listener, worker, seq, mode);
        }
    }

    /// The answer to a bind: the workers waiting for it join, or are refused. A bind that
    /// no retry can fix (the address is taken, forbidden, not this host's) stops the
    /// cluster, unless only roll-out replacements asked for it: a new version that listens
    /// somewhere it cannot aborts its roll-out, and the old workers keep serving.
    fn on_bound(
        &mut self,
        listener: ListenerId,
        result: Result<SocketAddr, ListenRefused>,
        now: Instant,
    ) {
        let addr = self.listeners.get(listener).map(|l| l.key.addr);
        let waiting = self.listeners.bound(listener, result.clone());
        let refused = match result {
            Ok(_) => {
                for (worker, ack, mode) in waiting {
                    self.join_and_grant(worker, ack, listener, mode);
                }
                return;
            }
            Err(refused) => refused,
        };
        let fatal = addr.filter(|_| {
            lifecycle::unfixable_listen(refused.errno)
                && !self.stopping
                && waiting
                    .iter()
                    .any(|(worker, _, _)| !self.rollouts.replacements.contains_key(worker))
        });
        let refused = match fatal {
            Some(addr) => {
                let errno = refused.errno;
                // The workers are told to go first, so that the refusal reaches workers that
                // know they are leaving: they end quietly, and the cause is reported once,
                // by the primary. They still get the errno, as a bind of their own would.
                self.fail(Fatal::ListenFailed { addr, errno }, now);
                ListenRefused {
                    errno,
                    message: format!(
                        "the cluster is stopping: the primary cannot listen on {addr}"
                    ),
                }
            }
            None => refused,
        };
        for (worker, ack, _) in waiting {
            self.refuse_listen(worker, ack, refused.clone());
        }
    }

    fn join_and_grant(
        &mut self,
        worker: WorkerId,
        ack: u64,
        listener: ListenerId,
        mode: ListenMode,
    ) {
        if self
            .workers
            .get(&worker)
            .is_none_or(|w| w.leaving.is_leaving() || !w.control_open || w.fault.is_some())
        {
            return self.refuse_listen(
                worker,
                ack,
                ListenRefused::shutting_down("the worker is disconnecting"),
            );
        }
        match self.join_listener(worker, listener, mode) {
            Ok((local_addr, delivery)) => {
                self.actions.push_back(Action::Grant {
                    worker,
                    ack,
                    listener,
                    local_addr,
                    delivery,
                });
                self.set_accepting(listener);
                self.dispatch_later(listener);
            }
            Err(refused) => self.refuse_listen(worker, ack, refused),
        }
    }

    fn refuse_listen(&mut self, worker: WorkerId, ack: u64, refused: ListenRefused) {
        tracing::info!(worker = worker.0, errno = refused.errno, message = %refused.message, "listen refused");
        self.send(worker, Some(ack), ToWorker::ListenRefused(refused));
    }

    /// Whether the worker may listen on what it asks for: the key and the mode, or why not.
    fn check_listen(
        &self,
        worker: WorkerId,
        request: &ListenRequest,
    ) -> Result<(ListenKey, ListenMode), ListenRefused> {
        // A worker being killed for a fault (hung) is on its way out too, though nobody asked
        // it to disconnect: its new listeners would only hold connections until it dies.
        let leaving = self
            .workers
            .get(&worker)
            .is_none_or(|w| w.leaving.is_leaving() || w.fault.is_some());
        // A stop asks every worker to leave (and any started while it stops), so this covers
        // the stop too.
        if leaving {
            return Err(ListenRefused::shutting_down("the worker is disconnecting"));
        }
        let addr = match &request.addr {
            ListenAddr::Tcp(addr) => *addr,
            other => {
                return Err(ListenRefused::family_not_supported(format!(
                    "{other:?}: only TCP is served yet"
                )));
            }
        };
        let mode = request.mode.unwrap_or(self.settings.mode);
        if mode == ListenMode::ReusePort {
            return Err(ListenRefused::not_supported(
                "reuse-port listeners are not served yet",
            ));
        }
        Ok((ListenKey::new(addr, request.index), mode))
    }

    fn join_listener(
        &mut self,
        worker: WorkerId,
        listener: ListenerId,
        mode: ListenMode,
    ) -> Result<(SocketAddr, WireDelivery), ListenRefused> {
        let record = self
            .listeners
            .get(listener)
            .ok_or_else(|| ListenRefused::invalid("listener vanished"))?;
        let local_addr = record.local_addr.unwrap_or(record.key.addr);
        if record.mode != mode {
            let message = format!("{local_addr} is already listened in {:?} mode", record.mode);
            return Err(ListenRefused::address_in_use(message));
        }
        if record.members.contains(&worker) {
            return Err(ListenRefused::address_in_use(format!(
                "this worker already listens on {local_addr}"
            )));
        }
        self.listeners.join(listener, worker);
        let delivery = match mode {
            ListenMode::RoundRobin => {
                if let Some(record) = self.workers.get_mut(&worker) {
                    record.handoffs.insert(listener);
                }
                // What the policy decided before goes out now; what it decides for the new
                // worker waits for the grant, which brings its handoff socket.
                self.apply_dispatch(listener);
                if let Some(rr) = self.listeners.round_robin(listener) {
                    if let Err(err) = rr.worker_joined(worker) {
                        tracing::error!(worker = worker.0, error = %ErrorChain(&err), "scheduler refused a worker");
                    }
                }
                WireDelivery::Handoff {
                    window: self.settings.window.get(),
                }
            }
            ListenMode::Shared | ListenMode::ReusePort => {
                if let Some(record) = self.workers.get_mut(&worker) {
                    record.shared.insert(listener);
                }
                WireDelivery::Shared
            }
        };
        Ok((local_addr, delivery))
    }

    /// Undoes a join whose grant could not be sent.
    fn leave_listener(&mut self, worker: WorkerId, listener: ListenerId) {
        if let Some(record) = self.workers.get_mut(&worker) {
            record.shared.remove(&listener);
        }
        if self
            .workers
            .get(&worker)
            .is_some_and(|w| w.handoffs.contains(&listener))
        {
            self.handoff_closed(worker, listener);
        }
        self.listeners.leave(listener, worker);
    }

    fn on_listening(
        &mut self,
        worker: WorkerId,
        listener: ListenerId,
        local_addr: &ListenAddr,
        now: Instant,
    ) {
        let holds = self
            .workers
            .get(&worker)
            .is_some_and(|w| w.handoffs.contains(&listener) || w.shared.contains(&listener));
        let Some(addr) = self
            .listeners
            .get(listener)
            .and_then(|l| l.local_addr)
            .filter(|_| holds)
        else {
            self.protocol_violation(
                worker,
                &format!("Listening on {listener}, which it was not granted"),
                now,
            );
            return;
        };
        tracing::debug!(worker = worker.0, reported = ?local_addr, %addr, "worker listening");
        if let Some(record) = self.workers.get_mut(&worker) {
            if record.state == WorkerState::Online {
                record.state = WorkerState::Listening;
            }
            record.reached_listening = true;
            record.listening_on.insert(listener);
        }
        self.emit(Event::Listening { worker, addr });
        self.check_ready();
        self.check_replacement_ready(worker, now);
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
        if listening >= self.settings.workers {
            self.ready_sent = true;
            let addrs = self.listeners.addrs();
            self.emit(Event::Ready { addrs });
        }
    }

    fn on_close_listener(&mut self, worker: WorkerId, listener: ListenerId) {
        let Some(record) = self.workers.get_mut(&worker) else {
            return;
        };
        if record.shared.remove(&listener) {
            self.listeners.leave(listener, worker);
        } else if record.handoffs.contains(&listener) {
            // The handoff socket's end of file follows; until then send it nothing more.
            self.drain_worker_in(listener, worker);
        }
    }

    fn on_worker_leaving(&mut self, worker: WorkerId, retiring: bool, now: Instant) {
        let shutdown_timeout = self.settings.shutdown_timeout;
        let on_trial = self.rollouts.replacements.contains_key(&worker);
        let owns_slot = self.owns_slot(worker);
        let Some(record) = self.workers.get_mut(&worker) else {
            return;
        };
        record.leaving.by_itself = true;
        if record.state != WorkerState::Disconnected {
            record.state = WorkerState::Disconnecting;
        }
        // A worker that leaves by itself gets the same time to finish as one that was asked.
        record.kill_no_later_than(now + shutdown_timeout);
        let slot = record.slot;
        // Asked to go by the primary, it is not replaced, even if it also asks to retire. Nor
        // is one whose slot went to another worker already (a roll-out's or a recycling's
        // replacement on its way, a respawn after its own replacement failed), or one that is
        // itself a replacement not ready yet: it failed, and the worker it was to replace
        // keeps the slot. Either way a second worker in the slot would stay for good.
        let replace =
            retiring && !record.leaving.replaced && !record.leaving.asked && owns_slot && !on_trial;
        if replace {
            record.leaving.replaced = true;
        }
        self.stop_dispatching_to(worker);
        if replace && !self.stopping {
            tracing::info!(
                worker = worker.0,
                slot = slot.0,
                "worker retires; starting its replacement"
            );
            self.spawn_into(slot, now);
        }
    }

    fn on_load_report(&mut self, worker: WorkerId, open: u32) {
        if let Some(record) = self.workers.get_mut(&worker) {
            record.reported_open = Some(open);
        }
        for listener in self.handoffs_of(worker) {
            if let Some(rr) = self.listeners.round_robin(listener) {
                if let Err(err) = rr.load_report(worker, open) {
                    tracing::debug!(worker = worker.0, error = %ErrorChain(&err), "load report for a worker the policy does not know");
                }
            }
            self.dispatch_later(listener);
        }
    }

    fn on_heartbeat(&mut self, worker: WorkerId, connections: u64, now: Instant) {
        if let Some(record) = self.workers.get_mut(&worker) {
            record.heartbeat_at = Some(now);
            record.reported_connections = record.reported_connections.max(connections);
        }
        self.maybe_recycle_after_connections(worker, now);
    }

    fn on_ack(
        &mut self,
        worker: WorkerId,
        listener: ListenerId,
        count: u32,
        now: Instant,
    ) -> Result<(), String> {
        let Some(rr) = self.listeners.round_robin(listener) else {
            return Ok(());
        };
        let acked = rr
            .acked(worker, count as usize)
            .map_err(|err| format!("ack of {count}: {err}"))?;
        self.counters.acked += acked.len() as u64;
        if let Some(record) = self.workers.get_mut(&worker) {
            record.connections_acked += acked.len() as u64;
            if !acked.is_empty() {
                // It makes progress: the hang clock starts again for what it still holds.
                record.stalled_since = None;
                self.stamp_stalls = true;
            }
        }
        self.maybe_recycle_after_connections(worker, now);
        if !acked.is_empty() {
            if sabotaged!(self, CountAckTwice) {
                self.actions.push_back(Action::Release {
                    conns: acked.clone(),
                });
            }
            // The worker has its own copies now; ours can go.
            self.actions.push_back(Action::Release { conns: acked });
        }
        self.dispatch_later(listener);
        Ok(())
    }

    /// A worker broke the protocol: log it, stop talking to it, and kill it; its exit will
    /// be handled like a crash (it is replaced).
    fn protocol_violation(&mut self, worker: WorkerId, what: &str, now: Instant) {
        if self.workers.get(&worker).is_none_or(|w| w.reaped) {
            return;
        }
        tracing::error!(
            worker = worker.0,
            what,
            "protocol violation; killing the worker"
        );
        if let Some(record) = self.workers.get_mut(&worker) {
            record
                .fault
                .get_or_insert_with(|| format!("protocol violation: {what}"));
        }
        let Some(record) = self.workers.get(&worker) else {
            return;
        };
        if record.pid.is_some() {
            self.actions.push_back(Action::Signal {
                worker,
                signal: Signal::SIGKILL,
                group: true,
            });
        }
        if record.control_open {
            self.actions.push_back(Action::CloseControl { worker });
        }
        self.stop_dispatching_to(worker);
        self.control_closed(worker, now);
    }

    /// The worker's control channel is gone: its shared listeners forget it, nothing more is
    /// dispatched to it, the application hears `Disconnect`.
    fn control_closed(&mut self, worker: WorkerId, now: Instant) {
        let shutdown_timeout = self.settings.shutdown_timeout;
        let Some(record) = self.workers.get_mut(&worker).filter(|w| w.control_open) else {
            return;
        };
        record.control_open = false;
        record.state = WorkerState::Disconnected;
        // A process that closed its channel but lingers is killed after the grace period.
        record.kill_no_later_than(now + shutdown_timeout);
        let shared: Vec<ListenerId> = std::mem::take(&mut record.shared).into_iter().collect();
        for listener in shared {
            self.listeners.leave(listener, worker);
        }
        self.stop_dispatching_to(worker);
        if let Some(record) = self.workers.get_mut(&worker) {
            if !record.disconnect_reported {
                record.disconnect_reported = true;
                self.emit(Event::Disconnect { worker });
            }
        }
    }

    // ----- round-robin dispatch -----

    /// Has the listener's policy decide at the next [`poll_action`](Self::poll_action).
    fn dispatch_later(&mut self, listener: ListenerId) {
        self.dispatch_due.insert(listener);
    }

    /// Takes the decisions of every policy that has new inputs, then settles accepting.
    fn dispatch_due(&mut self) {
        while let Some(listener) = self.dispatch_due.pop_first() {
            self.apply_dispatch(listener);
        }
        while let Some(listener) = self.accept_due.pop_first() {
            self.settle_accepting(listener);
        }
    }

    /// Changes who the listener's policy may hand connections to: what it decided before the
    /// change goes out first, what it decides because of it right after, so that no handoff
    /// decided for a worker that has since left is carried out after its socket closed.
    fn change_policy(&mut self, listener: ListenerId, change: impl FnOnce(&mut RoundRobin)) {
        self.apply_dispatch(listener);
        if let Some(rr) = self.listeners.round_robin(listener) {
            change(rr);
        }
        self.apply_dispatch(listener);
    }

    /// Carries out what the listener's policy decided.
    fn apply_dispatch(&mut self, listener: ListenerId) {
        let Some(rr) = self.listeners.round_robin(listener) else {
            return;
        };
        let decided = rr.take_actions();
        if self.stopping {
            self.counters.closed_on_stop += decided.close.len() as u64;
        }
        if !decided.close.is_empty() && !sabotaged!(self, DropPendingOnStop) {
            self.actions.push_back(Action::Release {
                conns: decided.close,
            });
        }
        for (worker, conns) in decided.handoffs {
            self.counters.handed += conns.len() as u64;
            if let Some(record) = self.workers.get_mut(&worker) {
                record.connections_handed += conns.len() as u64;
            }
            self.stamp_stalls = true;
            self.actions.push_back(Action::HandOff {
                worker,
                listener,
                conns,
            });
        }
        if decided.accept.is_some() {
            self.set_accepting(listener);
        }
    }

    /// Has the listener's accepting put where it should be at the next
    /// [`poll_action`](Self::poll_action), once: a pause and a resume decided within one
    /// batch of inputs cost no system call.
    fn set_accepting(&mut self, listener: ListenerId) {
        self.accept_due.insert(listener);
    }

    /// Puts the listener's accepting where it should be: on while it is round-robin, the
    /// policy has not paused it, the process has fds and the cluster is not stopping.
    fn settle_accepting(&mut self, listener: ListenerId) {
        let stopping = self.stopping;
        let Some(rr) = self.listeners.round_robin(listener) else {
            return;
        };
        let on = !stopping && rr.fd_backoff_until.is_none() && !rr.is_accept_paused();
        if on != rr.accepting {
            rr.accepting = on;
            self.actions.push_back(Action::Accept { listener, on });
        }
    }

    /// Sends nothing more to this worker on this listener.
    fn drain_worker_in(&mut self, listener: ListenerId, worker: WorkerId) {
        if sabotaged!(self, HandToDisconnecting) {
            return;
        }
        self.change_policy(listener, |rr| rr.drain(worker));
    }

    /// Sends nothing more to this worker on any listener.
    fn stop_dispatching_to(&mut self, worker: WorkerId) {
        for listener in self.handoffs_of(worker) {
            self.drain_worker_in(listener, worker);
        }
    }

    fn handoff_closed(&mut self, worker: WorkerId, listener: ListenerId) {
        let Some(record) = self.workers.get_mut(&worker) else {
            return;
        };
        if !record.handoffs.remove(&listener) {
            return;
        }
        // What the policy decided before (for this worker too) goes out before the socket
        // closes; what it then decides has the worker gone.
        self.apply_dispatch(listener);
        self.actions
            .push_back(Action::CloseHandoff { worker, listener });
        self.listeners.leave(listener, worker);
        if !sabotaged!(self, ForgetRedispatchOnDeath) {
            let unacked = self
                .listeners
                .round_robin(listener)
                .map(|rr| rr.in_flight(worker).unwrap_or(0));
            self.counters.redispatched += unacked.unwrap_or(0) as u64;
            self.change_policy(listener, |rr| {
                if let Err(err) = rr.worker_left(worker) {
                    tracing::error!(worker = worker.0, error = %ErrorChain(&err), "scheduler did not know a leaving worker");
                }
            });
        }
    }

    fn handoffs_of(&self, worker: WorkerId) -> Vec<ListenerId> {
        self.workers
            .get(&worker)
            .map(|w| w.handoffs.iter().copied().collect())
            .unwrap_or_default()
    }

    // ----- lifecycle -----

    /// Takes back the spawns the shell has not carried out yet (a stop decided while the
    /// start's spawns were queued): a worker that was never started needs no stopping.
    fn withdraw_spawns(&mut self) {
        let mut withdrawn = Vec::new();
        self.actions.retain(|action| match action {
            Action::Spawn { worker, .. } => {
                withdrawn.push(*worker);
                false
            }
            _ => true,
        });
        for worker in withdrawn {
            self.rollouts.replacements.remove(&worker);
            if let Some(record) = self.workers.remove(&worker) {
                if let Some(state) = self.slot_mut(record.slot) {
                    if state.worker == Some(worker) {
                        state.worker = None;
                    }
                }
            }
        }
    }

    fn spawn_into(&mut self, slot: SlotId, now: Instant) -> WorkerId {
        let worker = WorkerId(self.next_worker);
        self.next_worker += 1;
        let mut record = Worker::new(worker, slot, now);
        let recycle = self.settings.recycle;
        record.recycle_at = recycle
            .after_connections
            .map(|after| after.saturating_add(jitter_for(worker, recycle.jitter)));
        if recycle.max_memory.is_some() && record.recycle_at.is_none() {
            // Armed for the memory limit alone.
            record.recycle_at = Some(u64::MAX);
        }
        self.workers.insert(worker, record);
        let mut env = Vec::new();
        if let Some(state) = self.slot_mut(slot) {
            state.worker = Some(worker);
            state.respawn_at = None;
            env.clone_from(&state.env);
        }
        self.actions.push_back(Action::Spawn { worker, slot, env });
        worker
    }

    fn ask_to_disconnect(&mut self, worker: WorkerId, now: Instant) {
        let shutdown_timeout = self.settings.shutdown_timeout;
        let Some(record) = self.workers.get_mut(&worker).filter(|w| !w.reaped) else {
            return;
        };
        if record.leaving.asked {
            return;
        }
        record.leaving.asked = true;
        record.kill_no_later_than(now + shutdown_timeout);
        match record.state {
            WorkerState::Starting => {
                // No Hello yet, so no one reads the channel: SIGTERM means the same thing.
                if record.pid.is_some() {
                    self.actions.push_back(Action::Signal {
                        worker,
                        signal: Signal::SIGTERM,
                        group: false,
                    });
                }
            }
            WorkerState::Disconnected => {}
            WorkerState::Online | WorkerState::Listening | WorkerState::Disconnecting => {
                record.state = WorkerState::Disconnecting;
                self.send(worker, None, ToWorker::Disconnect);
            }
        }
        self.stop_dispatching_to(worker);
    }

    /// SIGKILLs (the process group of) every worker whose time is up.
    fn kill_overdue(&mut self, now: Instant) {
        let mut overdue = Vec::new();
        for worker in self.workers.values_mut() {
            if worker.kill_at.is_some_and(|at| at <= now) {
                worker.kill_at = None;
                if worker.pid.is_some() && !worker.reaped {
                    tracing::warn!(worker = worker.id.0, pid = worker.pid, "killing worker");
                    worker.killed = true;
                    overdue.push(worker.id);
                    if self.stopping {
                        self.forced_kills += 1;
                    }
                }
            }
        }
        for worker in overdue {
            self.actions.push_back(Action::Signal {
                worker,
                signal: Signal::SIGKILL,
                group: true,
            });
        }
    }

    /// Frees the worker's slot and refills it, unless the primary itself asked the worker to
    /// go (a requested disconnect or a stop). A worker that left of its own accord is
    /// replaced once it is gone, so the cluster keeps its size; one that retired was replaced
    /// before it left.
    ///
    /// A worker that did not stay up makes the next start of its slot wait longer; under
    /// [`Respawn::OnFailure`] only a `failed` one is replaced.
    fn settle_slot(&mut self, worker: WorkerId, failed: bool, now: Instant) {
        let Some(record) = self.workers.get(&worker) else {
            return;
        };
        let (slot, asked) = (record.slot, record.leaving.asked);
        let stable = record.reached_listening
            && now.saturating_duration_since(record.spawned_at) >= STABLE_UPTIME;
        let Some(state) = self.slot_mut(slot) else {
            return;
        };
        if state.worker != Some(worker) {
            return; // Its slot went to a replacement already (it retired, or was replaced).
        }
        state.worker = None;
        // A worker that stayed up ends a run of failures, whatever it died of: the next start
        // is at once.
        state.failures = if stable { 0 } else { state.failures + 1 };
        let respawn = match self.settings.respawn {
            Respawn::Always => true,
            Respawn::OnFailure => failed,
            Respawn::Never => false,
        };
        if asked || !respawn || self.stopping {
            return;
        }
        self.schedule_respawn(slot, worker, now);
    }

    /// `worker`'s process could not be started: its slot, if it still has it (a roll-out
    /// may have given it to a replacement meanwhile), is refilled as after a failure.
    fn slot_failed(&mut self, slot: SlotId, worker: WorkerId, now: Instant) {
        let Some(state) = self.slot_mut(slot).filter(|s| s.worker == Some(worker)) else {
            return;
        };
        state.worker = None;
        state.failures += 1;
        if self.settings.respawn != Respawn::Never && !self.stopping {
            self.schedule_respawn(slot, worker, now);
        }
    }

    /// Refills `slot`, which `gone` left, at once or after the backoff its failures earned.
    fn schedule_respawn(&mut self, slot: SlotId, gone: WorkerId, now: Instant) {
        let Some(failures) = self.slot_mut(slot).map(|state| state.failures) else {
            return;
        };
        let delay = if sabotaged!(self, SkipBackoff) {
            Duration::ZERO
        } else {
            respawn_delay(failures)
        };
        self.restarts += 1;
        if let Some(state) = self.slot_mut(slot) {
            state.restarts += 1;
        }
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        if failures > 1 {
            tracing::warn!(
                slot = slot.0,
                replaces = gone.0,
                failures,
                delay_ms,
                "respawning after a backoff: the slot keeps failing"
            );
        } else {
            tracing::info!(slot = slot.0, replaces = gone.0, delay_ms, "respawning");
        }
        if delay.is_zero() {
            self.spawn_into(slot, now);
        } else {
            if let Some(state) = self.slot_mut(slot) {
                state.respawn_at = Some(now + delay);
            }
        }
    }

    /// The worker is its slot's worker: no replacement or respawn took the slot over.
    fn owns_slot(&self, worker: WorkerId) -> bool {
        (self.workers.get(&worker))
            .and_then(|w| self.slots.get(w.slot.0 as usize))
            .is_some_and(|slot| slot.worker == Some(worker))
    }

    fn slot_mut(&mut self, slot: SlotId) -> Option<&mut Slot> {
        self.slots.get_mut(slot.0 as usize)
    }

    fn live_workers(&self) -> Vec<WorkerId> {
        self.workers
            .values()
            .filter(|worker| !worker.reaped)
            .map(|worker| worker.id)
            .collect()
    }

    /// Gives [`Action::Finished`] once no worker is left and none will be started: the
    /// cluster stopped, or respawning is off and the last worker exited.
    fn check_finished(&mut self) {
        if self.finished {
            return;
        }
        let none_coming = self.stopping
            || (self.settings.respawn != Respawn::Always
                && self.slots.iter().all(|slot| slot.respawn_at.is_none()));
        let none_left = self.workers.values().all(|worker| worker.reaped);
        if none_coming && none_left {
            // What the policies still have to say (closing what a stop left) comes first.
            self.dispatch_due();
            self.finished = true;
            self.actions.push_back(Action::Finished);
        }
    }

    // ----- output helpers -----

    fn send(&mut self, worker: WorkerId, ack: Option<u64>, msg: ToWorker) {
        if self.workers.get(&worker).is_some_and(|w| w.control_open) {
            self.actions.push_back(Action::Send { worker, ack, msg });
        }
    }

    fn emit(&mut self, event: Event) {
        self.actions.push_back(Action::Event(event));
    }
}

/// What the tests look at, and plant.
#[cfg(test)]
impl Supervisor {
    pub(crate) fn sabotage(&mut self, flaw: Sabotage) {
        self.sabotage = Some(flaw);
    }

    pub(crate) fn listeners_for_tests(&self) -> &Listeners {
        &self.listeners
    }

    /// The workers that serve or will: not gone, not leaving, not being killed for a fault
    /// (a hung worker waits for its SIGKILL), channel open (one closed lingers until its
    /// kill).
    pub(crate) fn live_or_starting(&self) -> usize {
        self.workers
            .values()
            .filter(|w| !w.reaped && !w.leaving.is_leaving() && w.fault.is_none() && w.control_open)
            .count()
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
    }

    pub(crate) fn worker_states(&self) -> Vec<(WorkerId, WorkerState, bool, bool)> {
        self.workers
            .values()
            .map(|w| (w.id, w.state, w.reaped, w.leaving.is_leaving()))
            .collect()
    }
}
