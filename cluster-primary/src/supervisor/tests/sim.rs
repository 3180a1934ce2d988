//! A deterministic simulator: one [`Supervisor`], scripted workers and a fake clock.
//!
//! The simulator carries out the supervisor's actions the way the real shell does, with
//! nothing real behind them: a spawn is answered with a made-up pid, a bind with an address
//! at once, a grant opens a simulated handoff socket, a handoff puts connection ids in it, a
//! SIGKILL ends the worker. Scripted workers say Hello, listen, ack, return, leave and die
//! when the script (or a test) says so. Time moves only when a test lets it pass.
//!
//! Beside that, it keeps its own ledger of every connection and of every worker, built only
//! from what it fed in and what the actions said, and checks the supervisor against it: as
//! each action is carried out (nothing handed to a worker that is leaving, nothing released
//! twice, no signal to a reaped worker, respawns no sooner than the backoff, events in
//! order, a worker asked to leave only once another in its slot is ready or within the
//! roll-out's unavailable count, a hung worker really hung) and in [`Sim::check`] whenever
//! the supervisor is idle (every connection in exactly one place, the policy's view
//! included; no more replacements beside their workers than the surge and recycling allow;
//! a hung worker holds nothing). It follows replacements on its own: a worker spawned
//! while its slot's worker still serves replaces that one, which keeps the slot if the
//! replacement fails. What it finds goes to [`Sim::violations`].

use core::net::{Ipv4Addr, SocketAddr};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use cluster_ipc::proto::{
    Delivery, HandoffToPrimary, ListenAddr, ListenGranted, ListenMode, ListenRefused,
    ListenRequest, PROTOCOL_VERSION, ToPrimary, ToWorker,
};
use cluster_ipc::{ConnId, ListenerId, SlotId, WorkerId};

use crate::config::Respawn;
use crate::event::{Event, ExitStatus, WorkerState};
use crate::signal::Signal;
use crate::supervisor::{Action, Ending, Refusal, Settings, Supervisor};

/// The address the default script listens on.
pub(super) const PORT: u16 = 8000;

/// A loopback TCP address.
pub(super) fn addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// How long a slot that failed `failures` times in a row waits before its respawn, as the
/// design says it (written here again rather than taken from the core): at once for the
/// first failure, then 100 ms, doubling, capped at 5 s.
pub(super) fn expected_backoff(failures: u32) -> Duration {
    if failures <= 1 {
        return Duration::ZERO;
    }
    let millis = 100u64.saturating_mul(1 << (failures - 2).min(20));
    Duration::from_millis(millis.min(5_000))
}

/// A rule the supervisor must keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Property {
    /// (a) Every accepted connection is in exactly one place: pending in its listener's
    /// policy, in flight at one live worker that holds the listener, served by a worker after
    /// its ack (the primary's copy released), or closed by a stop; none lost, none in two
    /// places, none released twice, none released while un-acked.
    Conservation,
    /// (b) Nothing handed to a worker that is gone, leaving, unknown, or closing that
    /// listener.
    HandoffToLeaving,
    /// More connections in flight at a worker than the window.
    Window,
    /// (c) More workers than slots, or a cluster that does not come back to its size.
    Convergence,
    /// (d) A timer left in the past after `handle_timeout`, or timers that never settle.
    Timers,
    /// A slot respawned sooner than its backoff allows, or refilled after the primary emptied
    /// it.
    Respawn,
    /// A listener holds connections, or does not accept, while a worker that serves it has
    /// credit (outside a stop and an fd backoff).
    Liveness,
    /// A signal to a reaped worker (its pid may be another process's now) or an unknown one.
    Signals,
    /// A worker's events out of order, a second `Ready`, a worker listed wrongly.
    Events,
    /// Accept toggled out of turn, on for an unbound listener, or on while stopping.
    Accept,
    /// `Finished` given while a worker lives, not given when due, or followed by actions.
    Finish,
    /// The core's queries disagree with its actions, or a malformed action.
    Bookkeeping,
    /// A worker being replaced (roll-out, recycling) asked to leave before its replacement
    /// listens on everything it held, beyond the roll-out's unavailable count; more
    /// replacements beside their workers than the surge allows; a serving worker asked to
    /// leave for no reason; fewer ready workers than a test's floor.
    Rollout,
    /// A worker declared hung that was not (it acked within the hang timeout, or its
    /// heartbeats did not stop while it served), or one that still holds connections once
    /// declared.
    Hung,
}

/// One broken rule.
#[derive(Debug, Clone)]
pub(super) struct Violation {
    pub(super) property: Property,
    /// Fake time since the start.
    pub(super) at: Duration,
    pub(super) detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} at {:?}: {}", self.property, self.at, self.detail)
    }
}

/// What a scripted worker says when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Hello {
    /// A correct Hello, at once.
    Auto,
    /// Nothing: the start timeout must deal with it.
    Never,
    /// A Hello with another protocol version.
    WrongVersion,
    /// A Hello claiming another worker id.
    WrongId,
}

/// What a scripted worker does when told to disconnect (or sent SIGTERM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OnDisconnect {
    /// Reads and acks what it was handed, then exits with code 0.
    AckAndExit,
    /// Exits with code 0 at once, leaving its handoff sockets unread.
    Exit,
    /// Ignores it: only a SIGKILL ends it.
    Hang,
}

/// How one scripted worker behaves on its own. Tests and property ops make it do the rest
/// (ack, return, die, ...).
#[derive(Debug, Clone)]
pub(super) struct Script {
    /// The spawn fails: the process never exists.
    pub(super) spawn_fails: bool,
    /// The OS's reason when the spawn fails (`None`: a failure without an errno).
    pub(super) spawn_errno: Option<i32>,
    pub(super) hello: Hello,
    /// What it asks to listen on after its Welcome, in order.
    pub(super) listen: Vec<(SocketAddr, Option<ListenMode>)>,
    /// It says `Listening` as soon as a listener is granted.
    pub(super) send_listening: bool,
    /// It acks every batch as soon as it arrives.
    pub(super) auto_ack: bool,
    /// The shell fails to make the fds of its grants.
    pub(super) grant_fails: bool,
    pub(super) on_disconnect: OnDisconnect,
}

impl Default for Script {
    fn default() -> Script {
        Script {
            spawn_fails: false,
            spawn_errno: None,
            hello: Hello::Auto,
            listen: vec![(addr(PORT), None)],
            send_listening: true,
            auto_ack: false,
            grant_fails: false,
            on_disconnect: OnDisconnect::AckAndExit,
        }
    }
}

impl Script {
    /// The default script, listening on these addresses instead.
    pub(super) fn listening_on(addrs: &[SocketAddr]) -> Script {
        Script {
            listen: addrs.iter().map(|&a| (a, None)).collect(),
            ..Script::default()
        }
    }
}

/// Where a connection is, as far as the simulator's own ledger says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Place {
    /// Accepted (or returned) and held by the primary, waiting for a worker.
    Pending,
    /// Handed to this worker, not acked.
    InFlight(WorkerId),
    /// Acked by this worker, which serves it.
    Served(WorkerId),
    /// Closed by the primary without a worker (a stop).
    Closed,
    /// Must be released: the fds of a malformed return.
    ToRelease,
    /// Gone from the cluster: served to the end, returned under a new id, or lost with its
    /// worker after the ack.
    Gone,
}

/// One accepted connection in the ledger.
#[derive(Debug, Clone, Copy)]
pub(super) struct Conn {
    pub(super) listener: ListenerId,
    pub(super) place: Place,
    /// The primary's copy of the fd is open.
    pub(super) held: bool,
}

/// A scripted worker.
#[derive(Debug)]
pub(super) struct SimWorker {
    pub(super) id: WorkerId,
    pub(super) slot: SlotId,
    pub(super) pid: u32,
    pub(super) script: Script,
    pub(super) spawned_at: Instant,
    /// Its process runs.
    pub(super) alive: bool,
    /// `handle_exited` was called for it.
    pub(super) reaped: bool,
    /// Its end of the control channel is open: it can still send.
    pub(super) control_open: bool,
    /// It was welcomed.
    pub(super) online: bool,
    /// The supervisor knows it is on its way out: it was asked to go (Disconnect, SIGTERM,
    /// SIGKILL, a closed channel), or said it leaves, or is gone.
    pub(super) leaving: bool,
    /// It sent `Listening` for a listener it was granted.
    pub(super) listened: bool,
    next_seq: u64,
    port_zero: u32,
    /// Listen requests without a reply yet, by seq.
    pub(super) requests: BTreeMap<u64, SocketAddr>,
    /// Everything it received on its control channel.
    pub(super) inbox: Vec<(Option<u64>, ToWorker)>,
    /// Listeners granted to it, with their address and delivery.
    pub(super) granted: BTreeMap<ListenerId, (SocketAddr, Delivery)>,
    /// Listen requests refused, with the refusal.
    pub(super) refused: Vec<(SocketAddr, ListenRefused)>,
    /// Its open handoff sockets (as the supervisor sees them): the connections handed and
    /// not acked, oldest first.
    pub(super) handoffs: BTreeMap<ListenerId, VecDeque<ConnId>>,
    /// Listeners it said `CloseListener` for.
    pub(super) closing: BTreeSet<ListenerId>,
    pub(super) signals: Vec<Signal>,
    /// Listeners it said `Listening` for.
    pub(super) listening: BTreeSet<ListenerId>,
    /// The worker that served its slot when it was spawned: it is that one's replacement.
    pub(super) replaces: Option<WorkerId>,
    /// What the worker it replaces held when it was spawned: it is ready once it listens on
    /// all of it.
    pub(super) needs: BTreeSet<ListenerId>,
    /// It was asked to leave before another worker of its slot was ready (the roll-out's
    /// unavailable count).
    pub(super) asked_early: bool,
    /// What it held when it was asked to leave.
    pub(super) held_when_asked: BTreeSet<ListenerId>,
    /// When it last sent a heartbeat.
    pub(super) heartbeat_at: Option<Instant>,
    /// When it was first handed a connection.
    pub(super) first_handed: Option<Instant>,
    /// When it last acked a connection.
    pub(super) last_ack: Option<Instant>,
    /// It was declared hung.
    pub(super) hung: bool,
}

impl SimWorker {
    /// It is a replacement not ready yet: it was not welcomed, or does not listen on
    /// everything the worker it replaces held.
    pub(super) fn on_trial(&self) -> bool {
        self.replaces.is_some() && !(self.online && self.needs.is_subset(&self.listening))
    }

    /// The seq of the reply-bearing message it sent last.
    fn take_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }
}

#[derive(Debug, Default)]
struct SimSlot {
    /// The worker spawned into it last, while it lives.
    occupant: Option<WorkerId>,
    /// The worker the occupant replaces, while it serves: it keeps the slot if its
    /// replacement fails.
    previous: Option<WorkerId>,
    /// Failed starts in a row (exit before listening or within a second, or spawn failure).
    failures: u32,
    /// When its last occupant ended, if it has none now.
    vacated_at: Option<Instant>,
    /// The primary asked its occupant to go: it must stay empty.
    emptied: bool,
}

/// A bound listener.
#[derive(Debug)]
pub(super) struct SimListener {
    pub(super) addr: SocketAddr,
    pub(super) accepting: bool,
    /// Clients waiting in the kernel's backlog.
    pub(super) backlog: usize,
}

/// Something a worker (or the kernel) does in answer to an action, after the actions queued
/// so far are carried out.
#[derive(Debug, Clone, Copy)]
enum Reaction {
    Hello(WorkerId),
    Listen(WorkerId),
    Listening(WorkerId, ListenerId),
    AckAll(WorkerId, ListenerId),
    Disconnect(WorkerId),
    Sigterm(WorkerId),
    Die(WorkerId, ExitStatus),
    Feed(ListenerId),
}

/// The simulator.
pub(super) struct Sim {
    pub(super) sup: Supervisor,
    pub(super) start: Instant,
    pub(super) now: Instant,
    pub(super) workers: BTreeMap<WorkerId, SimWorker>,
    pub(super) conns: BTreeMap<ConnId, Conn>,
    pub(super) listeners: BTreeMap<ListenerId, SimListener>,
    /// Scripts for the next spawns, in order; then `default_script`.
    pub(super) scripts: VecDeque<Script>,
    pub(super) default_script: Script,
    /// Binds of these addresses fail with this.
    pub(super) bind_errors: BTreeMap<SocketAddr, ListenRefused>,
    /// Binds wait for [`Sim::answer_binds`] instead of being answered at once.
    pub(super) defer_binds: bool,
    deferred_binds: Vec<(ListenerId, SocketAddr)>,
    /// Connections accepted per `handle_accepted` call at most.
    pub(super) accept_batch: usize,
    /// A dying worker's channels reach their end before its exit is seen (as when the
    /// shell reads them first); otherwise `handle_exited` alone tells the supervisor.
    pub(super) eof_first: bool,
    /// Every action, with the fake time it came out.
    pub(super) log: Vec<(Duration, Action)>,
    pub(super) events: Vec<(Duration, Event)>,
    /// Each worker's state (as `workers(now)` lists it) while its `Disconnect` event is
    /// carried out.
    pub(super) disconnect_states: Vec<(WorkerId, Option<WorkerState>)>,
    pub(super) violations: Vec<Violation>,
    pub(super) stopped: bool,
    pub(super) finished: bool,
    /// Respawns that had to wait for a backoff.
    pub(super) delayed_respawns: usize,
    /// The workers that acked each connection, in order (a connection is delivered once
    /// when one worker acked it).
    pub(super) acked_by: BTreeMap<ConnId, Vec<WorkerId>>,
    /// After every action, at least this many workers must serve and listen on every
    /// listener (outside a stop).
    pub(super) min_ready: Option<usize>,
    /// While `min_ready` is set: the most workers serving (alive, not leaving) once the
    /// simulation settled, and the fewest ready after any action.
    pub(super) peak_serving: usize,
    pub(super) low_ready: usize,
    /// The core stopped by itself (a fatal failure).
    pub(super) self_stopped: bool,
    /// A roll-out was started: replacements may run beside their workers, up to the surge.
    pub(super) rollout_seen: bool,
    /// Workers a `Recycling` event named.
    pub(super) recycling: BTreeSet<WorkerId>,
    /// Workers the application asked to disconnect.
    app_asked: BTreeSet<WorkerId>,
    /// Connections handed back.
    pub(super) handed_back: usize,
    reactions: VecDeque<Reaction>,
    in_pump: bool,
    /// When each listener may accept again after running out of fds.
    fd_backoff_until: BTreeMap<ListenerId, Instant>,
    slots: BTreeMap<SlotId, SimSlot>,
    event_rank: BTreeMap<WorkerId, u8>,
    ready: usize,
    next_conn: u64,
    next_port: u16,
}

impl Sim {
    pub(super) fn new(settings: Settings) -> Sim {
        let start = Instant::now();
        Sim {
            sup: Supervisor::new(settings),
            start,
            now: start,
            workers: BTreeMap::new(),
            conns: BTreeMap::new(),
            listeners: BTreeMap::new(),
            scripts: VecDeque::new(),
            default_script: Script::default(),
            bind_errors: BTreeMap::new(),
            defer_binds: false,
            deferred_binds: Vec::new(),
            accept_batch: 1,
            eof_first: false,
            log: Vec::new(),
            events: Vec::new(),
            disconnect_states: Vec::new(),
            violations: Vec::new(),
            stopped: false,
            finished: false,
            delayed_respawns: 0,
            acked_by: BTreeMap::new(),
            min_ready: None,
            peak_serving: 0,
            low_ready: usize::MAX,
            self_stopped: false,
            rollout_seen: false,
            recycling: BTreeSet::new(),
            app_asked: BTreeSet::new(),
            handed_back: 0,
            reactions: VecDeque::new(),
            in_pump: false,
            fd_backoff_until: BTreeMap::new(),
            slots: BTreeMap::new(),
            event_rank: BTreeMap::new(),
            ready: 0,
            next_conn: 1,
            next_port: 40_000,
        }
    }

    /// A simulator whose workers all follow `script`.
    pub(super) fn with_script(settings: Settings, script: Script) -> Sim {
        let mut sim = Sim::new(settings);
        sim.default_script = script;
        sim
    }

    pub(super) fn settings(&self) -> &Settings {
        self.sup.settings()
    }

    /// Fake time since the start.
    pub(super) fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    fn violation(&mut self, property: Property, detail: String) {
        let at = self.elapsed();
        self.violations.push(Violation {
            property,
            at,
            detail,
        });
    }

    /// Panics with every violation found so far, if any.
    #[track_caller]
    pub(super) fn assert_clean(&mut self) {
        self.check();
        if !self.violations.is_empty() {
            let list: Vec<String> = self.violations.iter().map(ToString::to_string).collect();
            panic!("{} violations:\n{}", list.len(), list.join("\n"));
        }
    }

    pub(super) fn broke(&self, property: Property) -> bool {
        self.violations.iter().any(|v| v.property == property)
    }

    // ----- driving -----

    /// Starts the cluster and carries out everything that follows at once.
    pub(super) fn start(&mut self) {
        self.sup.start(self.now);
        self.pump();
    }

    /// Carries out the supervisor's actions, and the workers' answers to them, until
    /// nothing is left to do without time passing. Called from inside a reaction (an input
    /// a worker makes on its own), it only carries out the actions: the outer pump goes on
    /// with the reactions, one at a time, in order.
    pub(super) fn pump(&mut self) {
        if self.in_pump {
            return self.drain_actions();
        }
        self.in_pump = true;
        let mut settled = false;
        for _ in 0..100_000 {
            self.drain_actions();
            match self.reactions.pop_front() {
                Some(reaction) => self.react(reaction),
                None => {
                    settled = true;
                    break;
                }
            }
        }
        self.in_pump = false;
        self.resolve_early_asks();
        if self.min_ready.is_some() {
            // Within one batch of actions a replacement may start just before the worker it
            // replaces is asked to leave: only what stays counts.
            self.peak_serving = self.peak_serving.max(self.serving().len());
        }
        if !settled {
            self.violation(Property::Bookkeeping, "the simulation never settles".into());
        }
    }

    fn drain_actions(&mut self) {
        while let Some(action) = self.sup.poll_action() {
            self.carry_out(action);
        }
    }

    /// Lets `by` pass, handling every timeout on the way at its time.
    pub(super) fn advance(&mut self, by: Duration) {
        let target = self.now + by;
        for _ in 0..10_000 {
            match self.sup.poll_timeout() {
                Some(at) if at <= target && !self.finished => {
                    self.now = self.now.max(at);
                    self.fire();
                }
                _ => {
                    self.now = target;
                    return;
                }
            }
        }
        self.violation(Property::Timers, "timers never settle".into());
        self.now = target;
    }

    /// Lets time pass to the next timeout and handles it; false if there is none.
    /// Once `Finished`, the shell has returned: no more timeouts.
    pub(super) fn next_timeout(&mut self) -> bool {
        match self.sup.poll_timeout().filter(|_| !self.finished) {
            Some(at) => {
                self.now = self.now.max(at);
                self.fire();
                true
            }
            None => false,
        }
    }

    /// `handle_timeout` now, then (d): nothing it had to do may be left in the past.
    fn fire(&mut self) {
        self.sup.handle_timeout(self.now);
        // Replacements past their readiness timeout failed, even those the primary could not
        // tell (their channel closed: no Disconnect goes out).
        let overdue: Vec<WorkerId> = (self.workers.values())
            .filter(|w| w.alive && w.on_trial())
            .filter(|w| w.spawned_at + self.settings().readiness_timeout <= self.now)
            .map(|w| w.id)
            .collect();
        for worker in overdue {
            self.replacement_given_up(worker);
        }
        if let Some(next) = self.sup.poll_timeout() {
            if next <= self.now {
                let late = self.now - next;
                self.violation(
                    Property::Timers,
                    format!("after handle_timeout the next timeout is {late:?} in the past"),
                );
            }
        }
        self.pump();
    }

    /// From now on nothing breaks: new workers are well behaved, binds succeed. Workers
    /// already started keep their scripts.
    pub(super) fn calm(&mut self) {
        self.scripts.clear();
        self.bind_errors.clear();
        self.default_script.spawn_fails = false;
        self.default_script.hello = Hello::Auto;
        self.default_script.grant_fails = false;
        self.default_script.send_listening = true;
    }

    /// Lets time pass through every timeout until none is left.
    pub(super) fn settle(&mut self) {
        for _ in 0..1_000 {
            self.pump();
            if !self.next_timeout() {
                return;
            }
        }
        self.violation(Property::Timers, "timers never settle".into());
    }

    // ----- what workers and clients do -----

    /// The worker sends a control message; its seq.
    pub(super) fn say(&mut self, worker: WorkerId, msg: ToPrimary) -> u64 {
        let Some(w) = self.workers.get_mut(&worker) else {
            return 0;
        };
        let seq = w.take_seq();
        match &msg {
            ToPrimary::Disconnecting | ToPrimary::Retire if w.online => w.leaving = true,
            ToPrimary::CloseListener { listener } => {
                w.closing.insert(*listener);
            }
            _ => {}
        }
        self.sup.handle_control(worker, seq, msg, self.now);
        self.pump();
        seq
    }

    /// The worker asks to listen on `addr` (counting its port-0 requests, as a worker
    /// does); the seq of its request.
    pub(super) fn listen(
        &mut self,
        worker: WorkerId,
        addr: SocketAddr,
        mode: Option<ListenMode>,
    ) -> u64 {
        let Some(w) = self.workers.get_mut(&worker) else {
            return 0;
        };
        let index = if addr.port() == 0 {
            w.port_zero += 1;
            w.port_zero - 1
        } else {
            0
        };
        w.requests.insert(w.next_seq + 1, addr);
        let request = ListenRequest {
            addr: ListenAddr::Tcp(addr),
            mode,
            index,
        };
        self.say(worker, ToPrimary::Listen(request))
    }

    /// `count` clients connect to the listener: accepted now if it accepts, else they wait
    /// in the backlog until it does.
    pub(super) fn connect(&mut self, listener: ListenerId, count: usize) {
        let Some(l) = self.listeners.get_mut(&listener) else {
            return;
        };
        l.backlog += count;
        self.reactions.push_back(Reaction::Feed(listener));
        self.pump();
    }

    /// Accepting on the listener runs out of fds.
    pub(super) fn fds_exhausted(&mut self, listener: ListenerId) {
        self.fd_backoff_until
            .insert(listener, self.now + Duration::from_millis(100));
        self.sup.handle_fds_exhausted(listener, self.now);
        self.pump();
    }

    /// The listener bound for `addr`'s port.
    pub(super) fn listener_at(&self, addr: SocketAddr) -> ListenerId {
        self.listeners
            .iter()
            .find(|(_, l)| l.addr == addr)
            .map(|(&id, _)| id)
            .unwrap_or_else(|| panic!("nothing bound at {addr}"))
    }

    /// The only listener.
    pub(super) fn the_listener(&self) -> ListenerId {
        assert_eq!(self.listeners.len(), 1, "{:?}", self.listeners);
        *self.listeners.keys().next().unwrap()
    }

    /// What the worker was handed on the listener and did not ack yet, oldest first.
    pub(super) fn in_flight(&self, worker: WorkerId, listener: ListenerId) -> Vec<ConnId> {
        self.workers
            .get(&worker)
            .and_then(|w| w.handoffs.get(&listener))
            .map(|q| q.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The worker acks its `count` oldest connections on the listener (over its handoff
    /// socket).
    pub(super) fn ack(&mut self, worker: WorkerId, listener: ListenerId, count: usize) {
        let Some(queue) = self
            .workers
            .get_mut(&worker)
            .and_then(|w| w.handoffs.get_mut(&listener))
        else {
            return;
        };
        let count = count.min(queue.len());
        let acked: Vec<ConnId> = queue.drain(..count).collect();
        if let Some(w) = self.workers.get_mut(&worker).filter(|_| count > 0) {
            w.last_ack = Some(self.now);
        }
        for conn in acked {
            if let Some(entry) = self.conns.get_mut(&conn) {
                entry.place = Place::Served(worker);
            }
            self.acked_by.entry(conn).or_default().push(worker);
        }
        let msg = HandoffToPrimary::ConnectionsAck {
            count: count as u32,
        };
        self.sup
            .handle_handoff(worker, listener, msg, Vec::new(), self.now);
        self.pump();
    }

    /// The worker acks everything it was handed, on every listener.
    pub(super) fn ack_all(&mut self, worker: WorkerId) {
        let listeners: Vec<ListenerId> = self
            .workers
            .get(&worker)
            .map(|w| w.handoffs.keys().copied().collect())
            .unwrap_or_default();
        for listener in listeners {
            let count = self.in_flight(worker, listener).len();
            if count > 0 {
                self.ack(worker, listener, count);
            }
        }
    }

    /// An ack the worker sends whatever it holds (a late or stray one): the ledger does not
    /// move.
    pub(super) fn raw_ack(&mut self, worker: WorkerId, listener: ListenerId, count: u32) {
        let msg = HandoffToPrimary::ConnectionsAck { count };
        self.sup
            .handle_handoff(worker, listener, msg, Vec::new(), self.now);
        self.pump();
    }

    /// The worker gives back connections it had acked; the shell gives their fds new ids,
    /// returned in the same order.
    pub(super) fn give_back(
        &mut self,
        worker: WorkerId,
        listener: ListenerId,
        conns: &[ConnId],
    ) -> Vec<ConnId> {
        let mut fresh = Vec::new();
        for conn in conns {
            let entry = self.conns.get_mut(conn).unwrap();
            assert_eq!(
                entry.place,
                Place::Served(worker),
                "{conn} is not served by {worker}"
            );
            entry.place = Place::Gone;
            fresh.push(self.new_conn(listener, Place::Pending));
        }
        let msg = HandoffToPrimary::ConnectionsReturned {
            count: conns.len() as u32,
        };
        self.sup
            .handle_handoff(worker, listener, msg, fresh.clone(), self.now);
        self.pump();
        fresh
    }

    /// The worker returns connections with a count that does not match the fds attached: a
    /// protocol violation; the fds must be released.
    pub(super) fn bad_return(&mut self, worker: WorkerId, listener: ListenerId) {
        let fds = vec![self.new_conn(listener, Place::ToRelease)];
        let msg = HandoffToPrimary::ConnectionsReturned { count: 2 };
        self.sup
            .handle_handoff(worker, listener, msg, fds, self.now);
        self.pump();
    }

    fn new_conn(&mut self, listener: ListenerId, place: Place) -> ConnId {
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        self.conns.insert(
            conn,
            Conn {
                listener,
                place,
                held: true,
            },
        );
        conn
    }

    /// The worker's handoff socket for the listener ends (after a `CloseListener`), or
    /// breaks with `error`.
    pub(super) fn close_handoff(
        &mut self,
        worker: WorkerId,
        listener: ListenerId,
        error: Option<&str>,
    ) {
        self.handoff_ended(worker, listener);
        self.sup
            .handle_handoff_closed(worker, listener, error, self.now);
        self.pump();
    }

    /// The ledger side of a handoff socket's end: what was in flight there goes back to the
    /// primary (which still holds the fds).
    fn handoff_ended(&mut self, worker: WorkerId, listener: ListenerId) {
        if let Some(w) = self.workers.get_mut(&worker) {
            w.handoffs.remove(&listener);
        }
        for conn in self.conns.values_mut() {
            if conn.place == Place::InFlight(worker) && conn.listener == listener {
                conn.place = Place::Pending;
            }
        }
    }

    /// The worker closes its control channel (or it breaks, with `error`) while its process
    /// lingers.
    pub(super) fn close_control(&mut self, worker: WorkerId, error: Option<&str>) {
        if let Some(w) = self.workers.get_mut(&worker) {
            w.control_open = false;
            w.leaving = true;
        }
        self.sup.handle_control_closed(worker, error, self.now);
        self.pump();
    }

    /// The worker's process ends with `status`; the shell reads what its channels held
    /// (their ends too when `eof_first`), then reaps it.
    pub(super) fn exit(&mut self, worker: WorkerId, status: ExitStatus) {
        self.exit_and_then(worker, status, |_, _| {});
    }

    /// Like [`Sim::exit`], with `then` fed to the supervisor right after `handle_exited`,
    /// before any action is carried out (a late input in the same loop turn).
    pub(super) fn exit_and_then(
        &mut self,
        worker: WorkerId,
        status: ExitStatus,
        then: impl FnOnce(&mut Supervisor, Instant),
    ) {
        let Some(w) = self.workers.get_mut(&worker).filter(|w| w.alive) else {
            return;
        };
        w.alive = false;
        w.leaving = true;
        let control_was_open = std::mem::replace(&mut w.control_open, false);
        let handoffs: Vec<ListenerId> = w.handoffs.keys().copied().collect();
        if self.eof_first {
            if control_was_open {
                self.sup.handle_control_closed(worker, None, self.now);
                self.drain_actions();
            }
            for listener in handoffs {
                self.handoff_ended(worker, listener);
                self.sup
                    .handle_handoff_closed(worker, listener, None, self.now);
                self.drain_actions();
            }
        }
        self.reap(worker, status);
        then(&mut self.sup, self.now);
        self.pump();
    }

    fn reap(&mut self, worker: WorkerId, status: ExitStatus) {
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        w.reaped = true;
        w.handoffs.clear();
        let (slot, stable) = (
            w.slot,
            w.listened && self.now - w.spawned_at >= Duration::from_secs(1),
        );
        for conn in self.conns.values_mut() {
            if conn.place == Place::InFlight(worker) {
                conn.place = Place::Pending;
            } else if conn.place == Place::Served(worker) {
                conn.place = Place::Gone;
            }
        }
        self.slot_lost(slot, worker, stable);
        self.sup.handle_exited(worker, status, self.now);
    }

    /// The primary gives up on a replacement not ready yet (asks it to leave, or it hung):
    /// the worker it was to replace keeps the slot if it still serves; otherwise the slot is
    /// empty from now on, one more failure.
    fn replacement_given_up(&mut self, worker: WorkerId) {
        let Some(w) = self.workers.get(&worker) else {
            return;
        };
        let on_trial = w.alive && w.on_trial();
        if !on_trial || self.stopped {
            return;
        }
        let slot = w.slot;
        if self
            .slots
            .get(&slot)
            .is_some_and(|s| s.occupant == Some(worker))
        {
            self.slot_lost(slot, worker, false);
        }
    }

    /// The slot's worker is gone (or never started): a replacement's predecessor that still
    /// serves keeps the slot; otherwise the slot is empty, one more failure unless the
    /// worker was `stable`.
    fn slot_lost(&mut self, slot: SlotId, worker: WorkerId, stable: bool) {
        let now = self.now;
        let previous = (self.slots.get(&slot))
            .and_then(|state| state.previous)
            .filter(|p| self.workers.get(p).is_some_and(|w| w.alive && !w.leaving));
        let state = self.slots.entry(slot).or_default();
        if state.previous == Some(worker) {
            state.previous = None;
        }
        if state.occupant != Some(worker) {
            return;
        }
        state.previous = None;
        if previous.is_some() {
            state.occupant = previous;
            return;
        }
        state.occupant = None;
        state.failures = if stable { 0 } else { state.failures + 1 };
        state.vacated_at = Some(now);
    }

    /// The worker dies (crashes) now.
    pub(super) fn crash(&mut self, worker: WorkerId) {
        self.exit(worker, ExitStatus::Signal(Signal::SIGSEGV));
    }

    /// Stops the cluster.
    pub(super) fn stop(&mut self, graceful: bool) {
        self.stopped = true;
        self.sup.stop(graceful, self.now);
        self.pump();
    }

    /// Asks one worker to disconnect (the application's `disconnect()`).
    pub(super) fn disconnect(&mut self, worker: WorkerId) -> Result<(), Refusal> {
        let result = self.sup.disconnect(worker, self.now);
        let reaped = self.workers.get(&worker).is_none_or(|w| w.reaped);
        if result.is_ok() == reaped {
            self.violation(
                Property::Bookkeeping,
                format!("disconnect({worker}) answered {result:?} for a worker reaped={reaped}"),
            );
        }
        self.app_asked.insert(worker);
        if let (Ok(()), Some(w)) = (result, self.workers.get(&worker)) {
            // A replacement not ready yet fails when disconnected: its slot goes back to the
            // worker it was to replace if that one still serves, or is refilled as after a
            // failure. Only a worker that has its slot to itself empties it.
            if w.on_trial() {
                self.replacement_given_up(worker);
            } else {
                let state = self.slots.entry(w.slot).or_default();
                if state.occupant == Some(worker) {
                    state.emptied = true;
                }
            }
        }
        self.pump();
        result
    }

    /// A rolling restart (the application's `reload()`).
    pub(super) fn reload(&mut self) -> Result<u64, Refusal> {
        let result = self.sup.reload(self.now);
        self.pump();
        result
    }

    /// The application sets the number of workers: the slots past it are forgotten (their
    /// workers drain), new ones start empty.
    pub(super) fn set_workers(&mut self, count: usize) -> Result<(), Refusal> {
        let result = self.sup.set_workers(count, self.now);
        if result.is_ok() {
            self.slots.retain(|slot, _| (slot.0 as usize) < count);
            // The early asks of the slots that went end with them (a slot added again later
            // is a new one).
            for w in self.workers.values_mut() {
                if w.slot.0 as usize >= count {
                    w.asked_early = false;
                }
            }
        }
        self.pump();
        result
    }

    /// The application forks one more worker, with `env`.
    pub(super) fn fork(
        &mut self,
        env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    ) -> Result<WorkerId, Refusal> {
        let result = self.sup.fork(env, self.now);
        self.pump();
        result
    }

    /// The worker sends a heartbeat, saying it accepted `connections` in all.
    pub(super) fn heartbeat(&mut self, worker: WorkerId, connections: u64) {
        if let Some(w) = self.workers.get_mut(&worker).filter(|w| w.control_open) {
            w.heartbeat_at = Some(self.now);
        }
        self.say(worker, ToPrimary::Heartbeat { connections });
    }

    /// The worker says `Listening` for one listener it was granted.
    pub(super) fn say_listening_on(&mut self, worker: WorkerId, listener: ListenerId) {
        self.reactions
            .push_back(Reaction::Listening(worker, listener));
        self.pump();
    }

    /// The worker says `Listening` for every listener it was granted and did not say it for
    /// yet (a script without `send_listening` waits for this).
    pub(super) fn say_listening(&mut self, worker: WorkerId) {
        let Some(w) = self.workers.get(&worker) else {
            return;
        };
        let due: Vec<ListenerId> = (w.granted.keys())
            .filter(|l| !w.listening.contains(l))
            .copied()
            .collect();
        for listener in due {
            self.reactions
                .push_back(Reaction::Listening(worker, listener));
        }
        self.pump();
    }

    /// A draining worker hands back `conn`, a keep-alive connection it served, between two
    /// requests; the shell gives it a new id (returned).
    pub(super) fn hand_back(
        &mut self,
        worker: WorkerId,
        listener: ListenerId,
        conn: ConnId,
    ) -> ConnId {
        let entry = self.conns.get_mut(&conn).unwrap();
        assert_eq!(
            entry.place,
            Place::Served(worker),
            "{conn} is not served by {worker}"
        );
        entry.place = Place::Gone;
        self.handed_back += 1;
        let fresh = self.new_conn(listener, Place::Pending);
        self.sup
            .handle_handed_back(worker, listener, Some(fresh), self.now);
        self.pump();
        fresh
    }

    /// The shell measured the worker's memory: `uss` bytes of its own.
    pub(super) fn memory(&mut self, worker: WorkerId, uss: u64) {
        let memory = crate::event::Memory::new(uss, uss);
        self.sup.handle_memory(worker, memory, self.now);
        self.pump();
    }

    // ----- queries -----

    /// Every worker ever spawned (whose spawn did not fail), by id.
    pub(super) fn spawned(&self) -> Vec<WorkerId> {
        self.workers.keys().copied().collect()
    }

    /// The workers whose process runs.
    pub(super) fn alive(&self) -> Vec<WorkerId> {
        self.workers
            .values()
            .filter(|w| w.alive)
            .map(|w| w.id)
            .collect()
    }

    /// The workers whose process runs and that are not on their way out.
    pub(super) fn serving(&self) -> Vec<WorkerId> {
        self.workers
            .values()
            .filter(|w| w.alive && !w.leaving)
            .map(|w| w.id)
            .collect()
    }

    /// When each `Spawn` into the slot came out.
    pub(super) fn spawn_times(&self, slot: SlotId) -> Vec<Duration> {
        self.log
            .iter()
            .filter(|(_, a)| matches!(a, Action::Spawn { slot: s, .. } if *s == slot))
            .map(|(at, _)| *at)
            .collect()
    }

    /// Every connection handed to the worker, in order.
    pub(super) fn handed_to(&self, worker: WorkerId) -> Vec<ConnId> {
        self.log
            .iter()
            .filter_map(|(_, a)| match a {
                Action::HandOff {
                    worker: w, conns, ..
                } if *w == worker => Some(conns.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// Every connection released, in order (with repeats, if any).
    pub(super) fn released(&self) -> Vec<ConnId> {
        self.log
            .iter()
            .filter_map(|(_, a)| match a {
                Action::Release { conns } => Some(conns.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// The signals sent to the worker, in order.
    pub(super) fn signals_to(&self, worker: WorkerId) -> Vec<Signal> {
        self.workers
            .get(&worker)
            .map(|w| w.signals.clone())
            .unwrap_or_default()
    }

    /// The events that concern the worker, in order.
    pub(super) fn events_of(&self, worker: WorkerId) -> Vec<Event> {
        self.events
            .iter()
            .filter(|(_, e)| event_worker(e) == Some(worker))
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// Where the ledger has each connection now.
    pub(super) fn places(&self) -> BTreeMap<ConnId, Place> {
        self.conns
            .iter()
            .map(|(&c, conn)| (c, conn.place))
            .collect()
    }

    /// Every action so far, one line each, for comparing runs.
    pub(super) fn transcript(&self) -> Vec<String> {
        self.log
            .iter()
            .map(|(at, action)| format!("{at:?} {action:?}"))
            .collect()
    }

    // ----- carrying out actions -----

    fn carry_out(&mut self, action: Action) {
        let at = self.elapsed();
        self.log.push((at, action.clone()));
        if self.finished {
            self.violation(Property::Finish, format!("{action:?} after Finished"));
        }
        if !self.stopped && self.sup.is_stopping() {
            // The core stopped by itself (a boot failure, a crash loop).
            self.stopped = true;
            self.self_stopped = true;
        }
        match &action {
            Action::Send {
                worker,
                msg: ToWorker::Disconnect,
                ..
            }
            | Action::Signal {
                worker,
                signal: Signal::SIGTERM,
                ..
            } => {
                self.check_asked_to_leave(*worker);
                self.replacement_given_up(*worker);
            }
            Action::Signal {
                worker,
                signal: Signal::SIGABRT,
                ..
            } => self.replacement_given_up(*worker),
            _ => {}
        }
        match action {
            Action::Spawn { worker, slot, .. } => self.on_spawn(worker, slot),
            Action::MeasureMemory { .. } => {}
            Action::Send { worker, ack, msg } => self.on_send(worker, ack, msg),
            Action::Bind { listener, addr } => self.on_bind(listener, addr),
            Action::Grant {
                worker,
                ack,
                listener,
                local_addr,
                delivery,
            } => self.on_grant(worker, ack, listener, local_addr, delivery),
            Action::HandOff {
                worker,
                listener,
                conns,
            } => self.on_handoff(worker, listener, &conns),
            Action::Release { conns } => {
                for conn in conns {
                    self.on_release(conn);
                }
            }
            Action::Accept { listener, on } => self.on_accept(listener, on),
            Action::CloseHandoff { worker, .. } | Action::CloseControl { worker } => {
                if !self.workers.contains_key(&worker) {
                    self.violation(Property::Bookkeeping, format!("{action:?}: unknown worker"));
                }
                match (&action, self.workers.get_mut(&worker)) {
                    (Action::CloseControl { .. }, Some(w)) => {
                        w.control_open = false;
                        w.leaving = true;
                    }
                    // The primary closed its end first (a hung worker): what was in flight
                    // there is the primary's again, and the worker can ack none of it.
                    (&Action::CloseHandoff { listener, .. }, Some(_)) => {
                        self.handoff_ended(worker, listener);
                    }
                    _ => {}
                }
            }
            Action::Signal {
                worker,
                signal,
                group: _,
            } => self.on_signal(worker, signal),
            Action::Event(event) => self.on_event(event),
            Action::Finished => self.on_finished(),
        }
        self.check_floor();
    }

    /// A worker is asked to leave (Disconnect, or SIGTERM before its Hello). Outside a stop,
    /// the application's command, a scale-down and a replacement that is not ready (it
    /// failed), another worker of its slot must be ready: serve and listen on everything
    /// it held. Workers of up to the roll-out's unavailable count of slots may be asked
    /// earlier; each counts until its slot has such a worker, it is gone (or its slot), or
    /// the roll-out is aborted (the slot is refilled as after a failure then, and the core
    /// counts it no more).
    fn check_asked_to_leave(&mut self, old: WorkerId) {
        let target = self.settings().workers;
        let unavailable = self.settings().rollout.unavailable as usize;
        let Some(o) = self.workers.get(&old) else {
            return;
        };
        let on_trial = o.on_trial();
        let exempt = self.stopped
            || self.app_asked.contains(&old)
            || o.leaving
            || !o.alive
            || on_trial
            || o.slot.0 as usize >= target;
        if exempt {
            return;
        }
        let held = self.held_by(old);
        let early = !self.has_ready_peer(old, &held);
        if let Some(o) = self.workers.get_mut(&old) {
            o.asked_early = early;
            o.held_when_asked = held;
        }
        if !early {
            return;
        }
        let slot = self.workers[&old].slot;
        if self
            .slots
            .get(&slot)
            .is_some_and(|s| s.occupant == Some(old))
        {
            // Its replacement failed before the ask came out (a spawn that failed at once):
            // the core emptied the slot at that failure, as this ask does now.
            self.slot_lost(slot, old, false);
        }
        self.resolve_early_asks();
        let out: BTreeSet<SlotId> = (self.workers.values())
            .filter(|w| w.asked_early && w.alive && (w.slot.0 as usize) < target)
            .map(|w| w.slot)
            .collect();
        if out.len() > unavailable {
            let detail = format!(
                "{old} asked to leave while nobody else in its slot listens on {:?}: \
                 {out:?} are out early, {unavailable} may be",
                self.workers[&old].held_when_asked
            );
            self.violation(Property::Rollout, detail);
        }
    }

    /// Workers asked to leave early whose slot has a ready worker now count no more, even if
    /// that one leaves later (by itself, or crashing: no ask of the primary's).
    fn resolve_early_asks(&mut self) {
        let resolved: Vec<WorkerId> = (self.workers.values())
            .filter(|w| w.asked_early && self.has_ready_peer(w.id, &w.held_when_asked))
            .map(|w| w.id)
            .collect();
        for worker in resolved {
            if let Some(w) = self.workers.get_mut(&worker) {
                w.asked_early = false;
            }
        }
    }

    /// The listeners the worker holds: its handoff sockets, the shared listeners it was
    /// granted and did not close.
    fn held_by(&self, worker: WorkerId) -> BTreeSet<ListenerId> {
        let Some(w) = self.workers.get(&worker) else {
            return BTreeSet::new();
        };
        let shared = (w.granted.iter())
            .filter(|(l, (_, d))| *d == Delivery::Shared && !w.closing.contains(l))
            .map(|(&l, _)| l);
        w.handoffs.keys().copied().chain(shared).collect()
    }

    /// Another worker of the worker's slot serves and listens on all of `held`.
    fn has_ready_peer(&self, worker: WorkerId, held: &BTreeSet<ListenerId>) -> bool {
        let Some(slot) = self.workers.get(&worker).map(|w| w.slot) else {
            return false;
        };
        self.workers.values().any(|w| {
            w.id != worker
                && w.slot == slot
                && w.alive
                && !w.leaving
                && held.is_subset(&w.listening)
        })
    }

    /// After every action: at least `min_ready` workers serve and listen on every listener.
    fn check_floor(&mut self) {
        let Some(floor) = self.min_ready.filter(|_| !self.stopped) else {
            return;
        };
        let ready = self.ready_workers().len();
        self.low_ready = self.low_ready.min(ready);
        if ready < floor {
            let detail = format!("{ready} workers ready, fewer than {floor}");
            self.violation(Property::Rollout, detail);
            // Once is enough.
            self.min_ready = None;
        }
    }

    /// The workers that serve and listen on every listener.
    pub(super) fn ready_workers(&self) -> Vec<WorkerId> {
        (self.workers.values())
            .filter(|w| w.alive && !w.leaving && !w.listening.is_empty())
            .filter(|w| self.listeners.keys().all(|l| w.listening.contains(l)))
            .map(|w| w.id)
            .collect()
    }

    fn on_spawn(&mut self, worker: WorkerId, slot: SlotId) {
        if self.workers.contains_key(&worker) {
            self.violation(Property::Bookkeeping, format!("{worker} spawned twice"));
            return;
        }
        if slot.0 as usize >= self.settings().workers {
            self.violation(
                Property::Bookkeeping,
                format!("spawn into {slot}, no such slot"),
            );
        }
        if self.stopped {
            self.violation(
                Property::Respawn,
                format!("{worker} spawned while stopping"),
            );
        }
        let now = self.now;
        // A worker still serves the slot: the new one is its replacement. (Not necessarily
        // the last one spawned there: a failed replacement gives the slot back at once,
        // while it still lives.)
        let replaces = (self.workers.values())
            .rev()
            .find(|w| w.slot == slot && w.alive && !w.leaving)
            .map(|w| w.id);
        let needs = replaces.map(|o| self.held_by(o)).unwrap_or_default();
        let state = self.slots.entry(slot).or_default();
        state.previous = replaces;
        let mut complaints = Vec::new();
        if state.emptied {
            complaints.push(format!(
                "{worker} spawned into {slot}, which the primary emptied"
            ));
        }
        let mut delayed = false;
        if let Some(vacated) = state.vacated_at {
            let due = vacated + expected_backoff(state.failures);
            delayed = due > vacated;
            if now < due {
                complaints.push(format!(
                    "{slot} respawned {:?} after its occupant ended; {} failures want {:?}",
                    now - vacated,
                    state.failures,
                    expected_backoff(state.failures)
                ));
            }
        }
        state.vacated_at = None;
        state.occupant = Some(worker);
        self.delayed_respawns += usize::from(delayed);
        for complaint in complaints {
            self.violation(Property::Respawn, complaint);
        }
        let script = self
            .scripts
            .pop_front()
            .unwrap_or_else(|| self.default_script.clone());
        if script.spawn_fails {
            self.slot_lost(slot, worker, false);
            self.sup
                .handle_spawn_failed(worker, script.spawn_errno, now);
            return;
        }
        let pid = 10_000 + worker.0 as u32;
        let hello = script.hello;
        self.workers.insert(
            worker,
            SimWorker {
                id: worker,
                slot,
                pid,
                script,
                spawned_at: now,
                alive: true,
                reaped: false,
                control_open: true,
                online: false,
                leaving: false,
                listened: false,
                next_seq: 0,
                port_zero: 0,
                requests: BTreeMap::new(),
                inbox: Vec::new(),
                granted: BTreeMap::new(),
                refused: Vec::new(),
                handoffs: BTreeMap::new(),
                closing: BTreeSet::new(),
                signals: Vec::new(),
                listening: BTreeSet::new(),
                replaces,
                needs,
                asked_early: false,
                held_when_asked: BTreeSet::new(),
                heartbeat_at: None,
                first_handed: None,
                last_ack: None,
                hung: false,
            },
        );
        self.sup.handle_spawned(worker, pid);
        if hello != Hello::Never {
            self.reactions.push_back(Reaction::Hello(worker));
        }
    }

    fn on_send(&mut self, worker: WorkerId, ack: Option<u64>, msg: ToWorker) {
        let Some(w) = self.workers.get_mut(&worker) else {
            self.violation(
                Property::Bookkeeping,
                format!("{msg:?} to unknown {worker}"),
            );
            return;
        };
        if matches!(msg, ToWorker::Disconnect) {
            w.leaving = true;
        }
        if !w.alive || !w.control_open {
            return; // Nobody reads it.
        }
        w.inbox.push((ack, msg.clone()));
        match msg {
            ToWorker::Welcome { .. } => {
                w.online = true;
                self.reactions.push_back(Reaction::Listen(worker));
            }
            ToWorker::ListenRefused(refused) => {
                if let Some(addr) = ack.and_then(|seq| w.requests.remove(&seq)) {
                    w.refused.push((addr, refused));
                }
            }
            ToWorker::Disconnect => self.reactions.push_back(Reaction::Disconnect(worker)),
            ToWorker::ListenGranted(_) => {
                self.violation(
                    Property::Bookkeeping,
                    "ListenGranted sent without its fd (not as a Grant)".into(),
                );
            }
            _ => {}
        }
    }

    /// Answers the binds that [`Sim::defer_binds`] held back.
    pub(super) fn answer_binds(&mut self) {
        for (listener, addr) in std::mem::take(&mut self.deferred_binds) {
            self.bind_now(listener, addr);
        }
        self.pump();
    }

    fn on_bind(&mut self, listener: ListenerId, addr: SocketAddr) {
        if self.defer_binds {
            self.deferred_binds.push((listener, addr));
        } else {
            self.bind_now(listener, addr);
        }
    }

    fn bind_now(&mut self, listener: ListenerId, addr: SocketAddr) {
        if self.listeners.contains_key(&listener) {
            self.violation(Property::Bookkeeping, format!("{listener} bound twice"));
        }
        let result = match self.bind_errors.get(&addr) {
            Some(refused) => Err(refused.clone()),
            None => {
                let mut bound = addr;
                if addr.port() == 0 {
                    bound.set_port(self.next_port);
                    self.next_port += 1;
                }
                self.listeners.insert(
                    listener,
                    SimListener {
                        addr: bound,
                        accepting: false,
                        backlog: 0,
                    },
                );
                Ok(bound)
            }
        };
        let now = self.now;
        self.sup.handle_bound(listener, result, now);
    }

    fn on_grant(
        &mut self,
        worker: WorkerId,
        ack: u64,
        listener: ListenerId,
        local_addr: SocketAddr,
        delivery: Delivery,
    ) {
        let window = self.settings().window.get();
        let bound = self.listeners.get(&listener).map(|l| l.addr);
        let Some(w) = self.workers.get_mut(&worker) else {
            self.violation(Property::Bookkeeping, format!("grant to unknown {worker}"));
            return;
        };
        if w.script.grant_fails {
            let refused = ListenRefused {
                errno: ListenRefused::invalid("").errno,
                message: "no fds".into(),
            };
            self.sup.handle_grant_failed(worker, ack, listener, refused);
            return;
        }
        w.requests.remove(&ack);
        w.granted.insert(listener, (local_addr, delivery));
        w.closing.remove(&listener);
        let send_listening = w.script.send_listening;
        // A replacement on its way must listen on this one too.
        for n in self.workers.values_mut() {
            if n.replaces == Some(worker) && n.alive && n.on_trial() {
                n.needs.insert(listener);
            }
        }
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        let mut complaints = Vec::new();
        if let Delivery::Handoff { window: granted } = delivery {
            w.handoffs.insert(listener, VecDeque::new());
            if granted != window {
                complaints.push(format!("granted window {granted}, configured {window}"));
            }
        }
        if w.alive && w.control_open {
            let granted = ListenGranted {
                listener,
                local_addr: ListenAddr::Tcp(local_addr),
                delivery,
            };
            w.inbox.push((Some(ack), ToWorker::ListenGranted(granted)));
            if send_listening {
                self.reactions
                    .push_back(Reaction::Listening(worker, listener));
            }
        }
        if bound != Some(local_addr) {
            complaints.push(format!(
                "{listener} granted as {local_addr}, bound as {bound:?}"
            ));
        }
        for detail in complaints {
            self.violation(Property::Bookkeeping, detail);
        }
    }

    fn on_handoff(&mut self, worker: WorkerId, listener: ListenerId, conns: &[ConnId]) {
        let window = self.settings().window.get() as usize;
        if conns.is_empty() {
            self.violation(Property::Bookkeeping, format!("empty handoff to {worker}"));
        }
        let mut complaints = Vec::new();
        match self.workers.get(&worker) {
            None => complaints.push((Property::HandoffToLeaving, "an unknown worker".into())),
            Some(w) => {
                let why = if w.reaped {
                    Some("reaped")
                } else if w.leaving {
                    Some("on its way out")
                } else if w.closing.contains(&listener) {
                    Some("closing that listener")
                } else {
                    None
                };
                if let Some(why) = why {
                    complaints.push((Property::HandoffToLeaving, format!("{worker}, {why}")));
                }
                if !w.handoffs.contains_key(&listener) {
                    complaints.push((
                        Property::HandoffToLeaving,
                        format!("{worker}, which has no handoff socket for {listener}"),
                    ));
                }
            }
        }
        for &conn in conns {
            match self.conns.get_mut(&conn) {
                Some(entry)
                    if entry.place == Place::Pending
                        && entry.listener == listener
                        && entry.held =>
                {
                    entry.place = Place::InFlight(worker);
                }
                other => complaints.push((
                    Property::Conservation,
                    format!("handed {conn} to {worker} on {listener}, but it was {other:?}"),
                )),
            }
        }
        let mut auto_ack = false;
        if let Some(w) = self.workers.get_mut(&worker) {
            w.first_handed.get_or_insert(self.now);
            if let Some(queue) = w.handoffs.get_mut(&listener) {
                queue.extend(conns.iter().copied());
                if queue.len() > window {
                    complaints.push((
                        Property::Window,
                        format!("{worker} has {} in flight, window {window}", queue.len()),
                    ));
                }
            }
            auto_ack = w.script.auto_ack && w.alive;
        }
        for (property, detail) in complaints {
            self.violation(property, format!("{conns:?} handed to {detail}"));
        }
        if auto_ack {
            self.reactions.push_back(Reaction::AckAll(worker, listener));
        }
    }

    fn on_release(&mut self, conn: ConnId) {
        let stopped = self.stopped;
        let Some(entry) = self.conns.get_mut(&conn) else {
            self.violation(Property::Conservation, format!("released unknown {conn}"));
            return;
        };
        if !entry.held {
            let detail = format!("{conn} released twice (it was {:?})", entry.place);
            self.violation(Property::Conservation, detail);
            return;
        }
        entry.held = false;
        let complaint = match entry.place {
            Place::Served(_) | Place::Gone | Place::Closed => None,
            Place::ToRelease => {
                entry.place = Place::Closed;
                None
            }
            Place::Pending => {
                entry.place = Place::Closed;
                (!stopped).then(|| format!("pending {conn} closed while not stopping"))
            }
            Place::InFlight(worker) => Some(format!(
                "{conn} released while in flight at {worker}, un-acked"
            )),
        };
        if let Some(detail) = complaint {
            self.violation(Property::Conservation, detail);
        }
    }

    fn on_accept(&mut self, listener: ListenerId, on: bool) {
        let stopped = self.stopped;
        let Some(l) = self.listeners.get_mut(&listener) else {
            self.violation(
                Property::Accept,
                format!("accept {on} on unbound {listener}"),
            );
            return;
        };
        let twice = l.accepting == on;
        l.accepting = on;
        let feed = on && l.backlog > 0;
        if twice {
            self.violation(Property::Accept, format!("accept {on} on {listener} twice"));
        }
        if on && stopped {
            self.violation(
                Property::Accept,
                format!("accept on {listener} while stopping"),
            );
        }
        if feed {
            self.reactions.push_back(Reaction::Feed(listener));
        }
    }

    fn on_signal(&mut self, worker: WorkerId, signal: Signal) {
        let Some(w) = self.workers.get_mut(&worker) else {
            self.violation(Property::Signals, format!("{signal} to unknown {worker}"));
            return;
        };
        if w.reaped {
            self.violation(
                Property::Signals,
                format!("{signal} to {worker} after it was reaped"),
            );
            return;
        }
        w.signals.push(signal);
        w.leaving = true;
        if !w.alive {
            return;
        }
        if signal == Signal::SIGKILL {
            self.reactions
                .push_back(Reaction::Die(worker, ExitStatus::Signal(signal)));
        } else if signal == Signal::SIGTERM {
            self.reactions.push_back(Reaction::Sigterm(worker));
        }
    }

    fn on_event(&mut self, event: Event) {
        let at = self.elapsed();
        self.events.push((at, event.clone()));
        let mut complaints = Vec::new();
        if let Some((worker, rank, repeats)) = event_rank(&event) {
            let last = self.event_rank.insert(worker, rank);
            let in_order = match last {
                None => rank == 0,
                Some(last) => rank > last || (rank == last && repeats),
            };
            if !in_order {
                complaints.push(format!("{event:?} after rank {last:?} for {worker}"));
            }
            if !self.workers.contains_key(&worker) {
                complaints.push(format!("{event:?} about unknown {worker}"));
            }
        }
        match &event {
            Event::Fork { worker, pid, slot } => {
                let known = self.workers.get(worker).map(|w| (w.pid, w.slot));
                if known != Some((*pid, *slot)) {
                    complaints.push(format!("{event:?}, but the sim has {known:?}"));
                }
            }
            Event::Ready { addrs } => {
                self.ready += 1;
                if self.ready > 1 {
                    complaints.push("a second Ready".into());
                }
                let listening = self.workers.values().filter(|w| w.listened).count();
                if listening < self.settings().workers || addrs.is_empty() {
                    complaints.push(format!(
                        "Ready with {listening} workers listening, addrs {addrs:?}"
                    ));
                }
            }
            Event::Disconnect { worker } => {
                // What an application's hook that asks `workers()` finds at this moment.
                let state = (self.sup.workers(self.now).iter())
                    .find(|info| info.id == *worker)
                    .map(|info| info.state);
                self.disconnect_states.push((*worker, state));
                if state != Some(WorkerState::Disconnected) {
                    complaints.push(format!("{worker} listed as {state:?} at its Disconnect"));
                }
            }
            Event::Exit { worker, pid, .. } => {
                // The shell delivers it (to the application) and tells the core.
                self.sup.handle_exit_delivered(*worker);
                if !self
                    .workers
                    .get(worker)
                    .is_some_and(|w| w.reaped && w.pid == *pid)
                {
                    complaints.push(format!("{event:?} for a worker not reaped"));
                }
                if self.sup.worker(*worker, self.now).is_some() {
                    complaints.push(format!("{worker} still listed once its Exit is taken"));
                }
            }
            Event::Hung { worker, reason } => self.on_hung(*worker, reason),
            Event::Recycling { worker, .. } => {
                self.recycling.insert(*worker);
            }
            Event::RolloutStarted { .. } => self.rollout_seen = true,
            Event::RolloutAborted { .. } => {
                for w in self.workers.values_mut() {
                    w.asked_early = false;
                }
            }
            _ => {}
        }
        for detail in complaints {
            self.violation(Property::Events, detail);
        }
    }

    /// A worker declared hung must have been: it holds connections it was handed at least
    /// the hang timeout ago and acked none for that long, or it serves, sent heartbeats and
    /// none for that long.
    fn on_hung(&mut self, worker: WorkerId, reason: &str) {
        let Some(timeout) = self.settings().hang_timeout else {
            return self.violation(Property::Hung, format!("{worker} hung with no timeout"));
        };
        let now = self.now;
        let in_flight = (self.conns.values())
            .filter(|c| c.place == Place::InFlight(worker))
            .count();
        let Some(w) = self.workers.get_mut(&worker) else {
            return self.violation(Property::Hung, format!("unknown {worker} hung"));
        };
        w.hung = true;
        let long_ago = |at: Option<Instant>| at.is_none_or(|at| at + timeout <= now);
        let stalled = in_flight > 0
            && w.first_handed.is_some()
            && long_ago(w.first_handed)
            && long_ago(w.last_ack);
        let silent = w.alive
            && !w.leaving
            && w.control_open
            && w.heartbeat_at.is_some()
            && long_ago(w.heartbeat_at);
        if !stalled && !silent {
            let detail = format!(
                "{worker} declared hung ({reason}) with {in_flight} in flight, handed first at \
                 {:?}, last ack at {:?}, last heartbeat at {:?}, leaving: {}",
                w.first_handed.map(|at| at - self.start),
                w.last_ack.map(|at| at - self.start),
                w.heartbeat_at.map(|at| at - self.start),
                w.leaving
            );
            self.violation(Property::Hung, detail);
        }
    }

    fn on_finished(&mut self) {
        self.finished = true;
        let alive = self.alive();
        let unreaped: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| !w.reaped)
            .map(|w| w.id)
            .collect();
        if !unreaped.is_empty() || !alive.is_empty() {
            self.violation(
                Property::Finish,
                format!("Finished while {unreaped:?} are not reaped"),
            );
        }
        if !self.sup.is_finished() {
            self.violation(Property::Finish, "Finished but not is_finished()".into());
        }
    }

    // ----- what workers do on their own -----

    fn react(&mut self, reaction: Reaction) {
        if self.finished {
            return; // The shell has returned: nobody accepts or reads any more.
        }
        let worker = match reaction {
            Reaction::Feed(listener) => return self.feed(listener),
            Reaction::Hello(w)
            | Reaction::Listen(w)
            | Reaction::Listening(w, _)
            | Reaction::AckAll(w, _)
            | Reaction::Disconnect(w)
            | Reaction::Sigterm(w)
            | Reaction::Die(w, _) => w,
        };
        let Some(w) = self.workers.get(&worker).filter(|w| w.alive) else {
            return;
        };
        let (script, pid, online, control_open) =
            (w.script.clone(), w.pid, w.online, w.control_open);
        match reaction {
            Reaction::Feed(_) => {}
            Reaction::Hello(_) if control_open => {
                let (worker_id, protocol_version) = match script.hello {
                    Hello::WrongVersion => (worker, PROTOCOL_VERSION + 1),
                    Hello::WrongId => (WorkerId(worker.0 + 1000), PROTOCOL_VERSION),
                    Hello::Auto | Hello::Never => (worker, PROTOCOL_VERSION),
                };
                let hello = ToPrimary::Hello {
                    worker_id,
                    pid,
                    protocol_version,
                };
                self.say(worker, hello);
            }
            Reaction::Listen(_) if control_open => {
                for (addr, mode) in script.listen {
                    self.listen(worker, addr, mode);
                }
            }
            Reaction::Listening(_, listener) if control_open => {
                let w = self.workers.get_mut(&worker).unwrap();
                if let Some(&(local_addr, _)) = w.granted.get(&listener) {
                    w.listened = true;
                    w.listening.insert(listener);
                    let msg = ToPrimary::Listening {
                        listener,
                        local_addr: ListenAddr::Tcp(local_addr),
                    };
                    self.say(worker, msg);
                }
            }
            Reaction::AckAll(_, listener) => {
                let count = self.in_flight(worker, listener).len();
                if count > 0 {
                    self.ack(worker, listener, count);
                }
            }
            Reaction::Disconnect(_) => self.leave(worker, script.on_disconnect),
            Reaction::Sigterm(_) => {
                if online || script.on_disconnect == OnDisconnect::Hang {
                    self.leave(worker, script.on_disconnect);
                } else {
                    // No handler yet: the default disposition ends it.
                    self.exit(worker, ExitStatus::Signal(Signal::SIGTERM));
                }
            }
            Reaction::Die(_, status) => self.exit(worker, status),
            Reaction::Hello(_) | Reaction::Listen(_) | Reaction::Listening(..) => {}
        }
    }

    fn leave(&mut self, worker: WorkerId, how: OnDisconnect) {
        match how {
            OnDisconnect::AckAndExit => {
                self.ack_all(worker);
                self.exit(worker, ExitStatus::Code(0));
            }
            OnDisconnect::Exit => self.exit(worker, ExitStatus::Code(0)),
            OnDisconnect::Hang => {}
        }
    }

    /// The shell's accept loop: while the listener accepts, take clients from the backlog in
    /// batches, telling the supervisor after each.
    fn feed(&mut self, listener: ListenerId) {
        loop {
            let batch = self.accept_batch.max(1);
            let Some(l) = self
                .listeners
                .get_mut(&listener)
                .filter(|l| l.accepting && l.backlog > 0)
            else {
                return;
            };
            let count = batch.min(l.backlog);
            l.backlog -= count;
            let conns: Vec<ConnId> = (0..count)
                .map(|_| self.new_conn(listener, Place::Pending))
                .collect();
            self.sup.handle_accepted(listener, &conns);
            self.drain_actions();
        }
    }

    // ----- the invariants on an idle supervisor -----

    /// Checks the state the last input left, once everything it caused was carried out:
    /// (a) every connection where the ledger has it, in the core's policies too; the
    /// core's queries; accepting off while stopping, and on (with nothing pending) while a
    /// worker has credit otherwise; no more workers than slots.
    pub(super) fn check(&mut self) {
        let mut complaints: Vec<(Property, String)> = Vec::new();
        self.check_conservation(&mut complaints);
        self.check_bookkeeping(&mut complaints);
        if self.stopped {
            for (id, l) in &self.listeners {
                if l.accepting {
                    let detail = format!("{id} still accepts while stopping");
                    complaints.push((Property::Accept, detail));
                }
            }
        } else {
            self.check_liveness(&mut complaints);
        }
        self.check_slots(&mut complaints);
        self.check_counters(&mut complaints);
        for w in self.workers.values().filter(|w| w.hung && !w.reaped) {
            let held = self.in_flight_at(w.id);
            let core = self
                .sup
                .worker(w.id, self.now)
                .map_or(0, |info| info.in_flight);
            if held + core > 0 {
                let detail = format!("hung {} still holds {held} ({core} by the core)", w.id);
                complaints.push((Property::Hung, detail));
            }
        }
        for (property, detail) in complaints {
            self.violation(property, detail);
        }
    }

    /// The core's counters add up: every connection it handed out was acked, put back for
    /// another worker, or is still in flight.
    fn check_counters(&self, complaints: &mut Vec<(Property, String)>) {
        let status = self.sup.status(self.now);
        let counters = status.counters;
        let in_flight: usize = status.workers.iter().map(|w| w.in_flight).sum();
        let accounted = counters.acked + counters.redispatched + in_flight as u64;
        if counters.handed != accounted {
            let detail = format!(
                "handed {} != acked {} + redispatched {} + in flight {in_flight}",
                counters.handed, counters.acked, counters.redispatched
            );
            complaints.push((Property::Conservation, detail));
        }
        let acked: u64 = status.workers.iter().map(|w| w.connections_acked).sum();
        if acked > counters.acked {
            let detail = format!("workers acked {acked}, the counter says {}", counters.acked);
            complaints.push((Property::Conservation, detail));
        }
    }

    /// The connections in flight at the worker, by the ledger.
    pub(super) fn in_flight_at(&self, worker: WorkerId) -> usize {
        (self.conns.values())
            .filter(|c| c.place == Place::InFlight(worker))
            .count()
    }

    /// No more workers than slots, but for replacements beside the workers they replace: at
    /// most the roll-out's surge of them (once a roll-out started), and one for each worker
    /// being recycled; none in a slot that was scaled away, never three in a slot.
    fn check_slots(&self, complaints: &mut Vec<(Property, String)>) {
        let slots = self.settings().workers;
        let mut by_slot: BTreeMap<SlotId, Vec<WorkerId>> = BTreeMap::new();
        for w in self.workers.values().filter(|w| w.alive && !w.leaving) {
            by_slot.entry(w.slot).or_default().push(w.id);
        }
        let (mut surging, mut recycling) = (0, 0);
        for (slot, workers) in &by_slot {
            if slot.0 as usize >= slots {
                let detail = format!("{workers:?} serve in {slot}, past the {slots} slots");
                complaints.push((Property::Convergence, detail));
            }
            match workers[..] {
                [_] => {}
                [old, _] if self.recycling.contains(&old) => recycling += 1,
                [_, _] => surging += 1,
                _ => {
                    let detail = format!("{workers:?} serve in {slot}");
                    complaints.push((Property::Convergence, detail));
                }
            }
        }
        let surge = if self.rollout_seen {
            self.settings().rollout.surge as usize
        } else {
            0
        };
        if surging > surge {
            let detail = format!("{surging} slots have two workers serving, surge {surge}");
            complaints.push((Property::Rollout, detail));
        }
        let serving = self.serving().len();
        let core = self.sup.live_or_starting();
        let most = slots + surge + recycling;
        if serving > most || core > most {
            complaints.push((
                Property::Convergence,
                format!(
                    "{serving} workers serving ({core} by the core) for {slots} slots, \
                     {surge} surge, {recycling} recycling"
                ),
            ));
        }
    }

    /// (a): the ledger and the core's policies hold the same connections in the same places,
    /// each once; a connection in flight is at a live worker that holds its listener; one
    /// that was served or closed has had its fd released.
    fn check_conservation(&self, complaints: &mut Vec<(Property, String)>) {
        let mut pending: BTreeMap<ConnId, ListenerId> = BTreeMap::new();
        let mut in_flight: BTreeMap<ConnId, (ListenerId, WorkerId)> = BTreeMap::new();
        for (id, listener) in self.sup.listeners_for_tests().all() {
            let Some(rr) = &listener.round_robin else {
                continue;
            };
            for conn in rr.pending_conns() {
                if pending.insert(conn, id).is_some() {
                    complaints.push((Property::Conservation, format!("{conn} pending twice")));
                }
            }
            for &worker in self.workers.keys() {
                for conn in rr.in_flight_conns(worker) {
                    let twice = pending.contains_key(&conn)
                        || in_flight.insert(conn, (id, worker)).is_some();
                    if twice {
                        let detail = format!("{conn} in two places in the core");
                        complaints.push((Property::Conservation, detail));
                    }
                }
            }
        }
        for (&conn, entry) in &self.conns {
            let core = match (pending.get(&conn), in_flight.get(&conn)) {
                (Some(l), _) => format!("pending on {l}"),
                (None, Some((l, w))) => format!("in flight on {l} at {w}"),
                (None, None) => "nowhere".to_owned(),
            };
            let fine = match entry.place {
                Place::Pending => entry.held && pending.get(&conn) == Some(&entry.listener),
                Place::InFlight(worker) => {
                    let holder = self.workers.get(&worker);
                    let holds = holder
                        .is_some_and(|w| !w.reaped && w.handoffs.contains_key(&entry.listener));
                    entry.held && holds && in_flight.get(&conn) == Some(&(entry.listener, worker))
                }
                Place::Served(_) | Place::Gone | Place::Closed => {
                    !entry.held && !pending.contains_key(&conn) && !in_flight.contains_key(&conn)
                }
                Place::ToRelease => false,
            };
            if !fine {
                complaints.push((
                    Property::Conservation,
                    format!(
                        "{conn} of {}: the sim has it {:?} (fd held: {}), the core {core}",
                        entry.listener, entry.place, entry.held
                    ),
                ));
            }
        }
        for conn in pending.keys().chain(in_flight.keys()) {
            if !self.conns.contains_key(conn) {
                complaints.push((
                    Property::Conservation,
                    format!("the core holds unknown {conn}"),
                ));
            }
        }
    }

    /// What the core reports (status, worker list) agrees with the ledger.
    fn check_bookkeeping(&self, complaints: &mut Vec<(Property, String)>) {
        let status = self.sup.status(self.now);
        let sim_pending = self
            .conns
            .values()
            .filter(|c| c.place == Place::Pending)
            .count();
        if status.pending_connections != sim_pending {
            complaints.push((
                Property::Bookkeeping,
                format!(
                    "status says {} pending, the sim {sim_pending}",
                    status.pending_connections
                ),
            ));
        }
        for info in &status.workers {
            let sim_in_flight = self
                .conns
                .values()
                .filter(|c| c.place == Place::InFlight(info.id))
                .count();
            if info.in_flight != sim_in_flight {
                complaints.push((
                    Property::Bookkeeping,
                    format!(
                        "{} listed with {} in flight, the sim has {sim_in_flight}",
                        info.id, info.in_flight
                    ),
                ));
            }
        }
        for (id, state, reaped, _) in self.sup.worker_states() {
            let known = self.workers.get(&id);
            let agrees = known.is_some_and(|w| {
                w.reaped == reaped
                    && (state != WorkerState::Starting || !w.online)
                    && (!w.online
                        || w.leaving
                        || matches!(state, WorkerState::Online | WorkerState::Listening))
            });
            if !agrees {
                complaints.push((
                    Property::Bookkeeping,
                    format!(
                        "the core lists {id} as {state:?} (reaped: {reaped}), the sim has {:?}",
                        known.map(|w| (w.online, w.leaving, w.reaped))
                    ),
                ));
            }
        }
    }

    /// A worker that serves a listener and has credit leaves nothing pending there, and the
    /// listener accepts (unless it ran out of fds a moment ago).
    fn check_liveness(&self, complaints: &mut Vec<(Property, String)>) {
        let window = self.settings().window.get() as usize;
        for (&id, listener) in &self.listeners {
            let with_credit = self.workers.values().find(|w| {
                w.alive
                    && !w.leaving
                    && !w.closing.contains(&id)
                    && w.handoffs
                        .get(&id)
                        .is_some_and(|queue| queue.len() < window)
            });
            let Some(worker) = with_credit else {
                continue;
            };
            let pending = self
                .conns
                .values()
                .filter(|c| c.listener == id && c.place == Place::Pending)
                .count();
            if pending > 0 {
                complaints.push((
                    Property::Liveness,
                    format!("{pending} pending on {id} while {} has credit", worker.id),
                ));
            }
            let backoff = self
                .fd_backoff_until
                .get(&id)
                .is_some_and(|&until| self.now < until);
            if !listener.accepting && !backoff {
                complaints.push((
                    Property::Liveness,
                    format!("{id} does not accept while {} has credit", worker.id),
                ));
            }
        }
    }

    /// (c) Once nothing breaks and time has passed through every timeout: the cluster has
    /// its size again (less the slots the primary emptied), or it finished when it had to.
    pub(super) fn check_converged(&mut self) {
        let settings = self.settings().clone();
        let emptied = self.slots.values().filter(|s| s.emptied).count();
        let serving = self.serving();
        let core = self.sup.live_or_starting();
        let mut complaints = Vec::new();
        if self.self_stopped && !matches!(self.sup.ending(), Ending::Fatal(_)) {
            let detail = format!("stopped by itself, ending {:?}", self.sup.ending());
            complaints.push(detail);
        }
        if self.stopped {
            if !self.finished || !self.alive().is_empty() {
                complaints.push(format!(
                    "stopped, but finished={} with {:?} alive",
                    self.finished,
                    self.alive()
                ));
            }
            if let Some(conn) = self.conns.iter().find(|(_, c)| c.held) {
                complaints.push(format!("stopped, but the primary still holds {conn:?}"));
            }
        } else if settings.respawn == Respawn::Always {
            let target = settings.workers - emptied;
            if serving.len() != target || core != target {
                complaints.push(format!(
                    "{} serving ({serving:?}), {core} by the core; want {target} \
                     ({emptied} slots emptied)",
                    serving.len()
                ));
            }
        } else if serving.len() > settings.workers || (self.alive().is_empty() != self.finished) {
            complaints.push(format!(
                "respawn off: {serving:?} serving, finished={}",
                self.finished
            ));
        }
        for detail in complaints {
            self.violation(Property::Convergence, detail);
        }
    }
}

/// The worker an event concerns.
pub(super) fn event_worker(event: &Event) -> Option<WorkerId> {
    event_rank(event).map(|(worker, _, _)| worker)
}

/// Where an event sits in a worker's life, and whether it may repeat: Fork, Online,
/// Listening and Message (any number), Disconnect, Exit.
fn event_rank(event: &Event) -> Option<(WorkerId, u8, bool)> {
    match *event {
        Event::Fork { worker, .. } => Some((worker, 0, false)),
        Event::Online { worker } => Some((worker, 1, false)),
        Event::Listening { worker, .. } | Event::Message { worker, .. } => Some((worker, 2, true)),
        Event::Disconnect { worker } => Some((worker, 3, false)),
        Event::Exit { worker, .. } => Some((worker, 4, false)),
        _ => None,
    }
}
