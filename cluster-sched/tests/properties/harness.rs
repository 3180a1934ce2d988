//! Random operation sequences, and a ledger that follows every connection independently of
//! the dispatcher under test and checks the crate's properties after every step.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::num::NonZeroU32;

use cluster_sched::{Action, Config, ConnId, Dispatch, Error, PendingBound, WorkerId};
use proptest::prelude::*;

/// One random event. Worker numbers are taken modulo the live workers (as the ledger sees
/// them), so most events are valid; a few are deliberately invalid.
#[derive(Debug, Clone)]
pub enum Op {
    Join,
    Drain(u8),
    Leave(u8),
    Incoming,
    /// This many connections (possibly none) that a worker had acked but not served come
    /// back. The primary gives their fds fresh ids, so they are new to the dispatcher, yet
    /// older than anything pending.
    RequeueFront(u8),
    Ack {
        worker: u8,
        count: u8,
    },
    Return {
        worker: u8,
        mask: u8,
    },
    Load {
        worker: u8,
        open: u8,
    },
    /// An ack for one more connection than the worker has in flight.
    BadAck(u8),
    /// An input naming a worker or connection the dispatcher does not hold.
    Stranger(u8),
    Shutdown,
}

/// A configuration and the events to feed it.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub config: Config,
    pub ops: Vec<Op>,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Join),
        1 => any::<u8>().prop_map(Op::Drain),
        1 => any::<u8>().prop_map(Op::Leave),
        10 => Just(Op::Incoming),
        2 => (0u8..4).prop_map(Op::RequeueFront),
        7 => (any::<u8>(), any::<u8>()).prop_map(|(worker, count)| Op::Ack { worker, count }),
        2 => (any::<u8>(), any::<u8>()).prop_map(|(worker, mask)| Op::Return { worker, mask }),
        2 => (any::<u8>(), 0u8..6).prop_map(|(worker, open)| Op::Load { worker, open }),
        1 => any::<u8>().prop_map(Op::BadAck),
        1 => any::<u8>().prop_map(Op::Stranger),
    ]
}

fn pending_bound() -> impl Strategy<Value = PendingBound> {
    prop_oneof![
        3 => Just(PendingBound::PerWorker),
        1 => (0usize..6).prop_map(PendingBound::Fixed),
    ]
}

pub fn config(max_window: u32) -> impl Strategy<Value = Config> {
    (1..=max_window, pending_bound()).prop_map(|(window, bound)| {
        Config::new(NonZeroU32::new(window).unwrap()).with_pending_bound(bound)
    })
}

/// Random scenarios; a quarter of them shut the listener down somewhere along the way.
pub fn scenario(max_window: u32, max_ops: usize) -> impl Strategy<Value = Scenario> {
    (
        config(max_window),
        prop::collection::vec(op(), 1..max_ops),
        prop::option::weighted(0.25, any::<prop::sample::Index>()),
    )
        .prop_map(|(config, mut ops, shutdown_at)| {
            if let Some(at) = shutdown_at {
                let at = at.index(ops.len() + 1);
                ops.insert(at, Op::Shutdown);
            }
            Scenario { config, ops }
        })
}

/// A concrete input, with real ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Joined(WorkerId),
    Draining(WorkerId),
    Left(WorkerId),
    Incoming(ConnId),
    /// Fresh ids for delivered connections that came back, oldest first.
    RequeuedFront(Vec<ConnId>),
    Acked(WorkerId, usize),
    Returned(WorkerId, Vec<ConnId>),
    Load(WorkerId, u32),
    Shutdown,
}

/// What an input call answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Unit(Result<(), Error>),
    Acked(Result<Vec<ConnId>, Error>),
}

/// Feeds one input and collects the actions it caused.
pub fn feed(dispatcher: &mut dyn Dispatch, input: &Input) -> (Reply, Vec<Action>) {
    let reply = match input {
        Input::Joined(worker) => Reply::Unit(dispatcher.worker_joined(*worker)),
        Input::Draining(worker) => Reply::Unit(dispatcher.worker_draining(*worker)),
        Input::Left(worker) => Reply::Unit(dispatcher.worker_left(*worker)),
        Input::Incoming(conn) => {
            dispatcher.incoming(*conn);
            Reply::Unit(Ok(()))
        }
        Input::RequeuedFront(conns) => {
            dispatcher.requeue_front(conns);
            Reply::Unit(Ok(()))
        }
        Input::Acked(worker, count) => Reply::Acked(dispatcher.acked(*worker, *count)),
        Input::Returned(worker, conns) => Reply::Unit(dispatcher.returned(*worker, conns)),
        Input::Load(worker, open) => Reply::Unit(dispatcher.load_report(*worker, *open)),
        Input::Shutdown => {
            dispatcher.shutdown();
            Reply::Unit(Ok(()))
        }
    };
    (reply, dispatcher.take_actions())
}

/// The property a run broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Property {
    /// A connection lost, duplicated, or somewhere other than where the ledger has it.
    Conservation,
    /// A connection handed to a worker that has left.
    HandoffToGone,
    /// A connection handed to a draining worker.
    HandoffToDraining,
    /// More than `window` connections in flight at one worker.
    Window,
    /// A connection pending while a live worker has credit.
    WorkConserving,
    /// Pending connections not handed out oldest first, or not re-queued at the front.
    Fifo,
    /// Pause/resume out of turn, paused while a worker has credit, or not paused when due.
    PauseResume,
    /// A connection closed although the listener was not shutting down.
    ClosedWithoutShutdown,
    /// A connection still pending after shutdown.
    PendingAfterShutdown,
    /// A bad input accepted, a good one refused, or an error that changed state.
    Errors,
    /// A getter disagreeing with what the actions said.
    Bookkeeping,
}

#[derive(Debug, Clone)]
pub struct Violation {
    pub property: Property,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.property, self.detail)
    }
}

/// Every violation found at one step.
#[derive(Debug, Clone)]
pub struct Failure {
    pub step: usize,
    pub input: Option<Input>,
    pub violations: Vec<Violation>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "step {} ({:?}):", self.step, self.input)?;
        for violation in &self.violations {
            write!(f, "\n  {violation}")?;
        }
        Ok(())
    }
}

/// The steps of a run that broke something, in order. The run goes on after a failure (the
/// ledger follows the actions, so later checks still mean something), so that a flaw is
/// also seen by the property it breaks later, not only by the first symptom.
#[derive(Debug, Clone)]
pub struct Failures(pub Vec<Failure>);

impl Failures {
    pub fn broke(&self, property: Property) -> bool {
        self.0
            .iter()
            .any(|failure| failure.violations.iter().any(|v| v.property == property))
    }
}

impl fmt::Display for Failures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for failure in self.0.iter().take(3) {
            writeln!(f, "{failure}")?;
        }
        if self.0.len() > 3 {
            writeln!(f, "... and {} more failing steps", self.0.len() - 3)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Pending,
    InFlight(WorkerId),
    Delivered,
    Closed,
}

#[derive(Debug, Default, Clone)]
struct LedgerWorker {
    in_flight: VecDeque<ConnId>,
    draining: bool,
}

/// Where every connection is, as far as the inputs and the dispatcher's actions say.
///
/// It knows nothing about how a policy chooses a worker; it only follows connections and
/// checks the rules every policy must keep.
#[derive(Debug, Clone)]
pub struct Ledger {
    window: usize,
    bound: PendingBound,
    places: BTreeMap<ConnId, Place>,
    pending: VecDeque<ConnId>,
    workers: BTreeMap<WorkerId, LedgerWorker>,
    paused: bool,
    shut_down: bool,
    next_worker: u64,
    next_conn: u64,
    /// Delivered connections per worker, for the fairness tests.
    pub delivered: BTreeMap<WorkerId, u64>,
    /// How many connections were returned in all.
    pub returns: u64,
}

type Violations = Vec<Violation>;

fn violation(list: &mut Violations, property: Property, detail: String) {
    list.push(Violation { property, detail });
}

impl Ledger {
    pub fn new(config: Config) -> Self {
        Self {
            window: config.window.get() as usize,
            bound: config.pending_bound,
            places: BTreeMap::new(),
            pending: VecDeque::new(),
            workers: BTreeMap::new(),
            paused: false,
            shut_down: false,
            next_worker: 1,
            next_conn: 1,
            delivered: BTreeMap::new(),
            returns: 0,
        }
    }

    fn live(&self, pick: u8) -> Option<WorkerId> {
        let live: Vec<WorkerId> = self.workers.keys().copied().collect();
        (!live.is_empty()).then(|| live[pick as usize % live.len()])
    }

    fn fresh_conn(&mut self) -> ConnId {
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        conn
    }

    /// Turns a random event into a concrete input, or `None` if it names a worker and there
    /// is none.
    pub fn resolve(&mut self, op: &Op) -> Option<Input> {
        Some(match *op {
            Op::Join => {
                let worker = WorkerId(self.next_worker);
                self.next_worker += 1;
                Input::Joined(worker)
            }
            Op::Drain(pick) => Input::Draining(self.live(pick)?),
            Op::Leave(pick) => Input::Left(self.live(pick)?),
            Op::Incoming => Input::Incoming(self.fresh_conn()),
            Op::RequeueFront(count) => {
                Input::RequeuedFront((0..count).map(|_| self.fresh_conn()).collect())
            }
            Op::Ack { worker, count } => {
                let worker = self.live(worker)?;
                let in_flight = self.workers[&worker].in_flight.len();
                Input::Acked(worker, count as usize % (in_flight + 1))
            }
            Op::Return { worker, mask } => {
                let worker = self.live(worker)?;
                let mut conns: Vec<ConnId> = (self.workers[&worker].in_flight.iter())
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << (i % 7)) != 0)
                    .map(|(_, &conn)| conn)
                    .collect();
                // The order a worker lists them in must not matter.
                if mask & 0x80 != 0 {
                    conns.reverse();
                }
                Input::Returned(worker, conns)
            }
            Op::Load { worker, open } => Input::Load(self.live(worker)?, u32::from(open)),
            Op::BadAck(pick) => match self.live(pick) {
                Some(worker) => Input::Acked(worker, self.workers[&worker].in_flight.len() + 1),
                None => Input::Acked(WorkerId(u64::MAX), 0),
            },
            Op::Stranger(kind) => self.stranger(kind),
            Op::Shutdown => Input::Shutdown,
        })
    }

    /// An input the dispatcher must refuse.
    fn stranger(&self, kind: u8) -> Input {
        let nobody = WorkerId(u64::MAX - u64::from(kind % 4));
        match (kind % 7, self.live(kind)) {
            (0, _) => Input::Draining(nobody),
            (1, _) => Input::Left(nobody),
            (2, _) => Input::Acked(nobody, 0),
            (3, _) => Input::Returned(nobody, Vec::new()),
            (4, _) => Input::Load(nobody, 1),
            (5, Some(worker)) => Input::Joined(worker),
            (_, Some(worker)) => Input::Returned(worker, vec![ConnId(u64::MAX)]),
            (_, None) => Input::Load(nobody, 0),
        }
    }

    /// The error the dispatcher must answer `input` with, or `None` if it is valid.
    fn expected_error(&self, input: &Input) -> Option<Error> {
        let unknown = |worker: &WorkerId| {
            (!self.workers.contains_key(worker)).then_some(Error::UnknownWorker { worker: *worker })
        };
        match input {
            Input::Joined(worker) => self
                .workers
                .contains_key(worker)
                .then_some(Error::DuplicateWorker { worker: *worker }),
            Input::Draining(worker) | Input::Left(worker) | Input::Load(worker, _) => {
                unknown(worker)
            }
            Input::Acked(worker, count) => unknown(worker).or_else(|| {
                let in_flight = self.workers[worker].in_flight.len();
                (*count > in_flight).then_some(Error::AckExceedsInFlight {
                    worker: *worker,
                    acked: *count,
                    in_flight,
                })
            }),
            Input::Returned(worker, conns) => unknown(worker).or_else(|| {
                let held = &self.workers[worker].in_flight;
                let mut seen = BTreeSet::new();
                conns
                    .iter()
                    .find(|conn| !held.contains(conn) || !seen.insert(**conn))
                    .map(|&conn| Error::NotInFlight {
                        worker: *worker,
                        conn,
                    })
            }),
            Input::Incoming(_) | Input::RequeuedFront(_) | Input::Shutdown => None,
        }
    }

    /// Checks what a dispatcher did on construction.
    pub fn observe_construction(
        &mut self,
        dispatcher: &dyn Dispatch,
        actions: &[Action],
    ) -> Result<(), Violations> {
        let mut found = Violations::new();
        self.apply_actions(&mut found, actions);
        self.check_state(&mut found, dispatcher);
        if found.is_empty() { Ok(()) } else { Err(found) }
    }

    /// Checks one step: the reply, the actions, then the state they leave.
    pub fn observe(
        &mut self,
        dispatcher: &dyn Dispatch,
        input: &Input,
        reply: &Reply,
        actions: &[Action],
    ) -> Result<(), Violations> {
        let mut found = Violations::new();
        match self.expected_error(input) {
            Some(expected) => self.check_refused(&mut found, expected, reply, actions),
            None => {
                self.apply_input(&mut found, input, reply);
                self.apply_actions(&mut found, actions);
            }
        }
        self.check_state(&mut found, dispatcher);
        if found.is_empty() { Ok(()) } else { Err(found) }
    }

    fn check_refused(
        &self,
        found: &mut Violations,
        expected: Error,
        reply: &Reply,
        actions: &[Action],
    ) {
        let error = match reply {
            Reply::Unit(result) => result.as_ref().err(),
            Reply::Acked(result) => result.as_ref().err(),
        };
        if error != Some(&expected) {
            violation(
                found,
                Property::Errors,
                format!("expected {expected:?}, got {reply:?}"),
            );
        }
        if !actions.is_empty() {
            violation(
                found,
                Property::Errors,
                format!("a refused input caused {actions:?}"),
            );
        }
    }

    fn apply_input(&mut self, found: &mut Violations, input: &Input, reply: &Reply) {
        let ok = match reply {
            Reply::Unit(result) => result.is_ok(),
            Reply::Acked(result) => result.is_ok(),
        };
        if !ok {
            violation(
                found,
                Property::Errors,
                format!("a valid input was refused: {reply:?}"),
            );
        }
        match input {
            Input::Joined(worker) => {
                self.workers.insert(*worker, LedgerWorker::default());
            }
            Input::Draining(worker) => {
                if let Some(entry) = self.workers.get_mut(worker) {
                    entry.draining = true;
                }
            }
            Input::Left(worker) => {
                if let Some(entry) = self.workers.remove(worker) {
                    self.requeue_front(entry.in_flight);
                }
            }
            Input::Incoming(conn) => {
                self.places.insert(*conn, Place::Pending);
                self.pending.push_back(*conn);
            }
            // New ids, but ahead of everything pending, in the order given. After shutdown
            // they are pending here like late arrivals, and the checks require them closed.
            Input::RequeuedFront(conns) => self.requeue_front(conns.iter().copied().collect()),
            Input::Acked(worker, count) => self.apply_ack(found, *worker, *count, reply),
            Input::Returned(worker, conns) => {
                if let Some(entry) = self.workers.get_mut(worker) {
                    let (back, keep) = entry.in_flight.iter().partition(|c| conns.contains(c));
                    entry.in_flight = keep;
                    self.returns += conns.len() as u64;
                    self.requeue_front(back);
                }
            }
            Input::Load(..) => {}
            Input::Shutdown => self.shut_down = true,
        }
    }

    fn apply_ack(&mut self, found: &mut Violations, worker: WorkerId, count: usize, reply: &Reply) {
        let Some(entry) = self.workers.get_mut(&worker) else {
            return;
        };
        let oldest: Vec<ConnId> = entry.in_flight.drain(..count).collect();
        if *reply != Reply::Acked(Ok(oldest.clone())) {
            violation(
                found,
                Property::Conservation,
                format!("ack of {count} at {worker:?} should deliver {oldest:?}, got {reply:?}"),
            );
        }
        for conn in oldest {
            self.places.insert(conn, Place::Delivered);
        }
        *self.delivered.entry(worker).or_default() += count as u64;
    }

    /// Connections taken back from a worker (in the order it was handed them), or delivered
    /// ones that came back (in the order given): to the front, keeping that order.
    fn requeue_front(&mut self, conns: VecDeque<ConnId>) {
        for conn in conns.into_iter().rev() {
            self.places.insert(conn, Place::Pending);
            self.pending.push_front(conn);
        }
    }

    fn apply_actions(&mut self, found: &mut Violations, actions: &[Action]) {
        self.check_fifo(found, actions);
        for action in actions {
            match action {
                Action::Handoff { worker, conns } => self.apply_handoff(found, *worker, conns),
                Action::Close(conn) => self.apply_close(found, *conn),
                Action::PauseAccept | Action::ResumeAccept => {
                    self.apply_accept(found, *action == Action::PauseAccept);
                }
            }
        }
    }

    /// The connections handed out in one step must be the oldest pending ones, and each
    /// batch must list them oldest first.
    fn check_fifo(&self, found: &mut Violations, actions: &[Action]) {
        let position = |conn: &ConnId| self.pending.iter().position(|p| p == conn);
        let mut handed = BTreeSet::new();
        for action in actions {
            let Action::Handoff { conns, .. } = action else {
                continue;
            };
            let positions: Vec<Option<usize>> = conns.iter().map(position).collect();
            if positions.windows(2).any(|pair| pair[0] >= pair[1]) {
                violation(
                    found,
                    Property::Fifo,
                    format!("batch {conns:?} not oldest first"),
                );
            }
            handed.extend(positions.into_iter().flatten());
        }
        if handed.iter().copied().ne(0..handed.len()) {
            violation(
                found,
                Property::Fifo,
                format!("handed pending positions {handed:?}, not the oldest ones"),
            );
        }
    }

    fn apply_handoff(&mut self, found: &mut Violations, worker: WorkerId, conns: &[ConnId]) {
        let Some(entry) = self.workers.get_mut(&worker) else {
            violation(
                found,
                Property::HandoffToGone,
                format!("{conns:?} to gone {worker:?}"),
            );
            return;
        };
        if entry.draining {
            violation(
                found,
                Property::HandoffToDraining,
                format!("{conns:?} to draining {worker:?}"),
            );
        }
        if conns.is_empty() {
            violation(
                found,
                Property::Bookkeeping,
                format!("empty handoff to {worker:?}"),
            );
        }
        for &conn in conns {
            match self.places.get(&conn) {
                Some(Place::Pending) => {
                    self.pending.retain(|&p| p != conn);
                    self.places.insert(conn, Place::InFlight(worker));
                    entry.in_flight.push_back(conn);
                }
                place => violation(
                    found,
                    Property::Conservation,
                    format!("handed {conn:?} to {worker:?} but it was {place:?}"),
                ),
            }
        }
        if entry.in_flight.len() > self.window {
            violation(
                found,
                Property::Window,
                format!(
                    "{worker:?} has {} in flight, window {}",
                    entry.in_flight.len(),
                    self.window
                ),
            );
        }
    }

    fn apply_close(&mut self, found: &mut Violations, conn: ConnId) {
        if !self.shut_down {
            violation(
                found,
                Property::ClosedWithoutShutdown,
                format!("closed {conn:?}"),
            );
        }
        match self.places.get(&conn) {
            Some(Place::Pending) => {
                self.pending.retain(|&p| p != conn);
                self.places.insert(conn, Place::Closed);
            }
            place => violation(
                found,
                Property::Conservation,
                format!("closed {conn:?} but it was {place:?}"),
            ),
        }
    }

    fn apply_accept(&mut self, found: &mut Violations, pause: bool) {
        if self.shut_down {
            violation(
                found,
                Property::PauseResume,
                "accept action after shutdown".into(),
            );
        }
        if pause == self.paused {
            violation(
                found,
                Property::PauseResume,
                format!(
                    "{} while already so",
                    if pause { "pause" } else { "resume" }
                ),
            );
        }
        self.paused = pause;
    }

    fn someone_has_credit(&self) -> bool {
        self.workers
            .values()
            .any(|w| !w.draining && w.in_flight.len() < self.window)
    }

    fn bound(&self) -> usize {
        match self.bound {
            PendingBound::PerWorker => {
                let active = self.workers.values().filter(|w| !w.draining).count();
                active.max(1) * self.window
            }
            PendingBound::Fixed(bound) => bound,
        }
    }

    /// The rules about the state a step leaves, and the dispatcher's getters against the ledger.
    fn check_state(&self, found: &mut Violations, dispatcher: &dyn Dispatch) {
        self.check_same_view(found, dispatcher);
        if !self.pending.is_empty() && self.someone_has_credit() {
            violation(
                found,
                Property::WorkConserving,
                format!("{:?} pending while a worker has credit", self.pending),
            );
        }
        if self.shut_down && !self.pending.is_empty() {
            violation(
                found,
                Property::PendingAfterShutdown,
                format!("{:?} pending after shutdown", self.pending),
            );
        }
        if !self.shut_down {
            let due = !self.someone_has_credit() && self.pending.len() >= self.bound();
            if self.paused != due {
                violation(
                    found,
                    Property::PauseResume,
                    format!(
                        "paused={} but credit={} pending={} bound={}",
                        self.paused,
                        self.someone_has_credit(),
                        self.pending.len(),
                        self.bound()
                    ),
                );
            }
        }
    }

    /// The dispatcher must hold exactly what the ledger says: the same pending connections in
    /// the same order, the same live workers, the same connections in flight at each.
    fn check_same_view(&self, found: &mut Violations, dispatcher: &dyn Dispatch) {
        let pending = dispatcher.pending_conns();
        if !pending.iter().eq(self.pending.iter()) {
            let same_set = pending.iter().collect::<BTreeSet<_>>()
                == self.pending.iter().collect::<BTreeSet<_>>();
            violation(
                found,
                if same_set {
                    Property::Fifo
                } else {
                    Property::Conservation
                },
                format!("dispatcher pending {pending:?}, ledger {:?}", self.pending),
            );
        }
        let workers: Vec<WorkerId> = self.workers.keys().copied().collect();
        if dispatcher.workers() != workers || dispatcher.worker_count() != workers.len() {
            violation(
                found,
                Property::Bookkeeping,
                format!(
                    "dispatcher workers {:?}, ledger {workers:?}",
                    dispatcher.workers()
                ),
            );
        }
        for (worker, entry) in &self.workers {
            let expected: Vec<ConnId> = entry.in_flight.iter().copied().collect();
            let held = dispatcher.in_flight_conns(*worker);
            if held.as_ref() != Some(&expected) {
                violation(
                    found,
                    Property::Conservation,
                    format!("{worker:?} in flight: dispatcher {held:?}, ledger {expected:?}"),
                );
            }
        }
        if dispatcher.is_accept_paused() != self.paused {
            violation(
                found,
                Property::Bookkeeping,
                format!("dispatcher paused={}", dispatcher.is_accept_paused()),
            );
        }
        if dispatcher.pending_len() != self.pending.len() {
            violation(found, Property::Bookkeeping, "pending_len disagrees".into());
        }
    }
}

/// Runs a scenario through a dispatcher, checking every step against the ledger.
pub fn check_run(dispatcher: &mut dyn Dispatch, scenario: &Scenario) -> Result<Ledger, Failures> {
    let mut ledger = Ledger::new(scenario.config);
    let mut failures = Vec::new();
    // Construction is step zero: only `Fixed(0)` may act then, by pausing at once.
    let initial = dispatcher.take_actions();
    if let Err(violations) = ledger.observe_construction(dispatcher, &initial) {
        failures.push(Failure {
            step: 0,
            input: None,
            violations,
        });
    }
    for (index, op) in scenario.ops.iter().enumerate() {
        let Some(input) = ledger.resolve(op) else {
            continue;
        };
        let (reply, actions) = feed(dispatcher, &input);
        if let Err(violations) = ledger.observe(dispatcher, &input, &reply, &actions) {
            failures.push(Failure {
                step: index + 1,
                input: Some(input),
                violations,
            });
        }
    }
    if failures.is_empty() {
        Ok(ledger)
    } else {
        Err(Failures(failures))
    }
}
