//! Random event sequences through the simulator, checked after every step.
//!
//! A case is a configuration (1 to 4 workers, a window of 1 to 4, a policy, one or two
//! addresses, a respawn policy, a roll-out's surge and unavailable counts, a hang timeout or
//! none, recycling after some connections or not, ...) and up to 80 operations: clients
//! connect, workers ack, return, hand back, close a listener, die, exit, fail to boot, leave,
//! retire, send heartbeats or break the protocol, the primary disconnects a worker, reloads,
//! scales, forks or stops, time passes. Worker and listener numbers are taken modulo
//! what exists, so almost every operation does something. After every operation the
//! simulator's checks run ([`Sim::check`]: (a) conservation of connections, with the policy's
//! own view; nothing pending and accept on while a worker has credit; the bookkeeping the
//! core reports; no more workers than slots) besides the ones it makes as each action is
//! carried out ((b) no handoff to a worker that is leaving, gone or unknown; (d) no timer in
//! the past after `handle_timeout`; respawn backoff; signals; event order; a worker being
//! replaced asked to leave only once its replacement is ready, or within the unavailable
//! count; a hung worker really hung). At rest, no more replacements beside their workers than
//! the surge (and recycling) allows. At the end, nothing breaks any more (workers ack what
//! they are handed, if a hang timeout is set) and time passes through every timeout: (c)
//! the cluster is back to its size, or finished when it had to be.
//!
//! Failing seeds are saved to `properties.proptest-regressions` beside this file (under
//! version control) and replayed before any new case.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

use cluster_ipc::proto::{ListenAddr, ListenMode, ListenRefused, PROTOCOL_VERSION, ToPrimary};
use cluster_ipc::{ConnId, ListenerId, UserMessage, WorkerId};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{FileFailurePersistence, TestCaseError, TestRng, TestRunner};

use super::settings;
use super::sim::{Hello, OnDisconnect, PORT, Place, Property, Script, Sim, Violation, addr};
use crate::config::{Policy, Recycle, Respawn, Rollout};
use crate::event::{Event, ExitStatus};
use crate::signal::Signal;
use crate::supervisor::{Action, Sabotage, Settings};

/// This file, as proptest knows it: its seeds live beside it.
pub(super) const SOURCE: &str = file!();

/// A port whose binds fail.
const BIND_FAILS: u16 = 8009;

/// The cases a run makes unless `PROPTEST_CASES` says otherwise.
const CASES: u32 = 2_000;

/// One random event. Numbers that pick a worker or a listener are taken modulo those that
/// exist (as the simulator sees them).
#[derive(Debug, Clone)]
pub(super) enum Op {
    /// Clients connect.
    Connect { listener: u8, count: u8 },
    /// A worker acks some of what it was handed (possibly none).
    Ack { worker: u8, listener: u8, count: u8 },
    /// A worker gives back some of the connections it acked.
    Return { worker: u8, listener: u8, mask: u8 },
    /// A worker closes a listener: `CloseListener`, then its handoff socket ends.
    CloseListener { worker: u8, listener: u8 },
    /// A worker crashes; its channels' ends are seen first or not.
    Crash { worker: u8, eof_first: bool },
    /// A worker exits with code 0 without a word.
    Exit { worker: u8 },
    /// A worker says it disconnects.
    Disconnecting { worker: u8 },
    /// A worker asks to be replaced.
    Retire { worker: u8 },
    /// The application asks a worker (maybe one that is gone) to disconnect.
    PrimaryDisconnect { worker: u8 },
    /// A worker closes its control channel and lingers.
    CloseControl { worker: u8 },
    /// A worker breaks the protocol, one of six ways.
    Break { worker: u8, how: u8 },
    /// A worker asks to listen: on an address everyone listens on, another one, one whose
    /// bind fails, or port 0.
    Listen { worker: u8, which: u8 },
    /// A worker reports its load.
    LoadReport { worker: u8, open: u8 },
    /// A worker sends a message.
    Message { worker: u8 },
    /// Accepting runs out of fds.
    FdsExhausted { listener: u8 },
    /// The next spawn fails.
    NextSpawnFails,
    /// The next worker never says Hello.
    NextNeverSaysHello,
    /// The shell cannot make the fds of the next worker's grants.
    NextGrantFails,
    /// The next worker says Hello with another protocol version.
    NextWrongVersion,
    /// Time passes.
    Wait { millis: u16 },
    /// Time passes to the next timeout.
    NextTimeout,
    /// The cluster stops.
    Stop { graceful: bool },
    /// A rolling restart.
    Reload,
    /// The number of workers changes.
    Scale { to: u8 },
    /// One more worker, in a slot of its own.
    Fork,
    /// A worker hands back one of the connections it acked (any live worker's).
    HandBack { pick: u8 },
    /// A worker sends a heartbeat, counting this many connections.
    Heartbeat { worker: u8, connections: u8 },
    /// The next worker never says `Listening`.
    NextNeverListens,
    /// A worker that did not listen yet exits with the boot-failure code.
    BootFails { worker: u8 },
}

/// A configuration and the events to feed it.
#[derive(Debug, Clone)]
pub(super) struct Case {
    pub(super) workers: usize,
    pub(super) window: u32,
    pub(super) least_connections: bool,
    pub(super) shared: bool,
    pub(super) respawn: Respawn,
    pub(super) addrs: usize,
    pub(super) on_disconnect: OnDisconnect,
    pub(super) accept_batch: usize,
    /// The roll-out's surge and unavailable counts.
    pub(super) rollout: (u32, u32),
    pub(super) hang: bool,
    /// Recycle after this many connections, with this jitter.
    pub(super) recycle: Option<(u64, u64)>,
    pub(super) ops: Vec<Op>,
}

/// The hang timeout of the cases that have one.
const HANG_TIMEOUT: Duration = Duration::from_secs(2);

impl Case {
    fn settings(&self) -> Settings {
        Settings {
            window: NonZeroU32::new(self.window).unwrap_or(NonZeroU32::MIN),
            policy: if self.least_connections {
                Policy::LeastConnections
            } else {
                Policy::RoundRobin
            },
            mode: if self.shared {
                ListenMode::Shared
            } else {
                ListenMode::RoundRobin
            },
            respawn: self.respawn,
            rollout: Rollout {
                surge: self.rollout.0,
                unavailable: self.rollout.1,
            },
            hang_timeout: self.hang.then_some(HANG_TIMEOUT),
            recycle: Recycle {
                after_connections: self.recycle.map(|(after, _)| after),
                jitter: self.recycle.map_or(0, |(_, jitter)| jitter),
                max_memory: None,
            },
            ..settings(self.workers)
        }
    }
}

/// An operation: a union of unions, the likeliest arms first. A union forks the case RNG
/// (slow, in a debug build) for every arm before the one it picks, for every operation
/// generated: this order, and the rare operations grouped, keep that cheap.
fn op() -> impl Strategy<Value = Op> {
    let pick = any::<u8>;
    prop_oneof![
        12 => (pick(), 1u8..=4).prop_map(|(listener, count)| Op::Connect { listener, count }),
        10 => (pick(), pick(), pick())
            .prop_map(|(worker, listener, count)| Op::Ack { worker, listener, count }),
        11 => worker_op(),
        9 => lifecycle_op(),
        3 => (pick(), any::<bool>()).prop_map(|(worker, eof_first)| Op::Crash { worker, eof_first }),
        3 => Just(Op::NextTimeout),
        2 => (0u16..1_500).prop_map(|millis| Op::Wait { millis }),
        2 => (pick(), pick(), pick())
            .prop_map(|(worker, listener, mask)| Op::Return { worker, listener, mask }),
        4 => next_worker_op(),
    ]
}

/// What one worker does now and then, and running out of fds.
fn worker_op() -> impl Strategy<Value = Op> {
    let pick = any::<u8>;
    prop_oneof![
        (pick(), pick()).prop_map(|(worker, listener)| Op::CloseListener { worker, listener }),
        pick().prop_map(|worker| Op::Exit { worker }),
        pick().prop_map(|worker| Op::Disconnecting { worker }),
        pick().prop_map(|worker| Op::Retire { worker }),
        pick().prop_map(|worker| Op::PrimaryDisconnect { worker }),
        pick().prop_map(|worker| Op::CloseControl { worker }),
        (pick(), pick()).prop_map(|(worker, how)| Op::Break { worker, how }),
        (pick(), pick()).prop_map(|(worker, which)| Op::Listen { worker, which }),
        (pick(), 0u8..8).prop_map(|(worker, open)| Op::LoadReport { worker, open }),
        pick().prop_map(|worker| Op::Message { worker }),
        pick().prop_map(|listener| Op::FdsExhausted { listener }),
    ]
}

/// How the next worker goes wrong.
fn next_worker_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        Just(Op::NextSpawnFails),
        Just(Op::NextNeverSaysHello),
        Just(Op::NextGrantFails),
        Just(Op::NextWrongVersion),
    ]
}

/// Roll-outs, scaling, hand-backs, heartbeats and failed boots.
fn lifecycle_op() -> impl Strategy<Value = Op> {
    let pick = any::<u8>;
    prop_oneof![
        2 => Just(Op::Reload),
        2 => (pick(), 0u8..8).prop_map(|(worker, connections)| Op::Heartbeat { worker, connections }),
        1 => (1u8..=5).prop_map(|to| Op::Scale { to }),
        1 => Just(Op::Fork),
        2 => pick().prop_map(|pick| Op::HandBack { pick }),
        1 => Just(Op::NextNeverListens),
        1 => pick().prop_map(|worker| Op::BootFails { worker }),
    ]
}

/// Random cases; a quarter of them stop the cluster somewhere along the way.
pub(super) fn case() -> impl Strategy<Value = Case> {
    let on_disconnect = prop_oneof![
        3 => Just(OnDisconnect::AckAndExit),
        1 => Just(OnDisconnect::Exit),
        1 => Just(OnDisconnect::Hang),
    ];
    let respawn = prop_oneof![
        17 => Just(Respawn::Always),
        1 => Just(Respawn::OnFailure),
        2 => Just(Respawn::Never),
    ];
    // A roll-out needs a surge or an unavailable count (the configuration refuses neither).
    let rollout = prop_oneof![
        3 => Just((1, 0)),
        1 => Just((2, 0)),
        1 => Just((0, 1)),
        1 => Just((1, 1)),
    ];
    (
        (
            1usize..=4,
            1u32..=4,
            any::<bool>(),
            prop::bool::weighted(0.1),
        ),
        (respawn, 1usize..=2, on_disconnect, 1usize..=3),
        (
            rollout,
            prop::bool::weighted(0.3),
            prop::option::weighted(0.35, (2u64..=6, 0u64..=3)),
        ),
        prop::collection::vec(op(), 1..80),
        prop::option::weighted(0.25, (any::<prop::sample::Index>(), any::<bool>())),
    )
        .prop_map(
            |(
                (workers, window, least_connections, shared),
                (respawn, addrs, on_disconnect, accept_batch),
                (rollout, hang, recycle),
                mut ops,
                stop,
            )| {
                if let Some((at, graceful)) = stop {
                    ops.insert(at.index(ops.len() + 1), Op::Stop { graceful });
                }
                Case {
                    workers,
                    window,
                    least_connections,
                    shared,
                    respawn,
                    addrs,
                    on_disconnect,
                    accept_batch,
                    rollout,
                    hang,
                    recycle,
                    ops,
                }
            },
        )
}

/// Every violation of a run, with the step that caused it (0: the start; `ops.len() + 1`:
/// the end, once everything settled).
#[derive(Debug, Clone)]
pub(super) struct Failures(pub(super) Vec<(usize, Violation)>);

impl Failures {
    pub(super) fn broke(&self, property: Property) -> bool {
        self.0.iter().any(|(_, v)| v.property == property)
    }
}

impl fmt::Display for Failures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (step, violation) in self.0.iter().take(6) {
            writeln!(f, "step {step}: {violation}")?;
        }
        if self.0.len() > 6 {
            writeln!(f, "... and {} more", self.0.len() - 6)?;
        }
        Ok(())
    }
}

/// Runs a case, with `flaw` planted, and gives the simulator and every violation found.
pub(super) fn simulate(case: &Case, flaw: Option<Sabotage>) -> (Sim, Failures) {
    let addrs: Vec<_> = (0..case.addrs).map(|i| addr(8000 + i as u16)).collect();
    let script = Script {
        on_disconnect: case.on_disconnect,
        ..Script::listening_on(&addrs)
    };
    let mut sim = Sim::with_script(case.settings(), script);
    sim.accept_batch = case.accept_batch;
    let refused = ListenRefused {
        errno: ListenRefused::address_in_use("").errno,
        message: "taken".into(),
    };
    sim.bind_errors.insert(addr(BIND_FAILS), refused);
    if let Some(flaw) = flaw {
        sim.sup.sabotage(flaw);
    }
    let mut failures = Vec::new();
    let mut seen = 0;
    let mut collect = |sim: &mut Sim, step: usize| {
        sim.check();
        for violation in &sim.violations[seen..] {
            failures.push((step, violation.clone()));
        }
        seen = sim.violations.len();
    };
    sim.start();
    collect(&mut sim, 0);
    for (index, op) in case.ops.iter().enumerate() {
        apply(&mut sim, op);
        collect(&mut sim, index + 1);
    }
    sim.calm();
    if case.hang {
        // Workers that never ack would be found hung, and their replacements after them.
        sim.default_script.auto_ack = true;
    }
    sim.settle();
    sim.check_converged();
    collect(&mut sim, case.ops.len() + 1);
    (sim, Failures(failures))
}

/// Runs a case; every violation, if any.
pub(super) fn run_case(case: &Case, flaw: Option<Sabotage>) -> Result<(), Failures> {
    let (_, failures) = simulate(case, flaw);
    if failures.0.is_empty() {
        Ok(())
    } else {
        Err(failures)
    }
}

fn nth<T: Copy>(list: &[T], pick: u8) -> Option<T> {
    (!list.is_empty()).then(|| list[pick as usize % list.len()])
}

/// A worker whose process runs.
fn alive(sim: &Sim, pick: u8) -> Option<WorkerId> {
    nth(&sim.alive(), pick)
}

/// A worker that can still send on its control channel.
fn talking(sim: &Sim, pick: u8) -> Option<WorkerId> {
    let list: Vec<WorkerId> = sim
        .workers
        .values()
        .filter(|w| w.alive && w.control_open)
        .map(|w| w.id)
        .collect();
    nth(&list, pick)
}

/// One of the worker's handoff sockets.
fn handoff(sim: &Sim, worker: WorkerId, pick: u8) -> Option<ListenerId> {
    let list: Vec<ListenerId> = sim.workers[&worker].handoffs.keys().copied().collect();
    nth(&list, pick)
}

fn apply(sim: &mut Sim, op: &Op) {
    if sim.finished {
        return; // The shell has returned: nothing happens any more.
    }
    match *op {
        Op::Connect { listener, count } => {
            let listeners: Vec<ListenerId> = sim.listeners.keys().copied().collect();
            if let Some(l) = nth(&listeners, listener) {
                sim.connect(l, count as usize);
            }
        }
        Op::Ack {
            worker,
            listener,
            count,
        } => {
            let Some(w) = alive(sim, worker) else { return };
            let Some(l) = handoff(sim, w, listener) else {
                return;
            };
            let held = sim.in_flight(w, l).len();
            sim.ack(w, l, count as usize % (held + 1));
        }
        Op::Return {
            worker,
            listener,
            mask,
        } => {
            let Some(w) = alive(sim, worker) else { return };
            let Some(l) = handoff(sim, w, listener) else {
                return;
            };
            let served: Vec<_> = sim
                .conns
                .iter()
                .filter(|(_, c)| c.place == Place::Served(w) && c.listener == l)
                .map(|(&id, _)| id)
                .enumerate()
                .filter(|(i, _)| mask & (1 << (i % 8)) != 0)
                .map(|(_, id)| id)
                .collect();
            if !served.is_empty() {
                sim.give_back(w, l, &served);
            }
        }
        Op::CloseListener { worker, listener } => {
            let Some(w) = talking(sim, worker) else {
                return;
            };
            let Some(l) = handoff(sim, w, listener) else {
                return;
            };
            sim.say(w, ToPrimary::CloseListener { listener: l });
            if sim.workers[&w].alive {
                sim.close_handoff(w, l, None);
            }
        }
        Op::Crash { worker, eof_first } => {
            let Some(w) = alive(sim, worker) else { return };
            sim.eof_first = eof_first;
            sim.exit(w, ExitStatus::Signal(Signal::SIGSEGV));
        }
        Op::Exit { worker } => {
            let Some(w) = alive(sim, worker) else { return };
            sim.exit(w, ExitStatus::Code(0));
        }
        Op::Disconnecting { worker } => {
            if let Some(w) = talking(sim, worker) {
                sim.say(w, ToPrimary::Disconnecting);
            }
        }
        Op::Retire { worker } => {
            if let Some(w) = talking(sim, worker) {
                sim.say(w, ToPrimary::Retire);
            }
        }
        Op::PrimaryDisconnect { worker } => {
            if let Some(w) = nth(&sim.spawned(), worker) {
                let _ = sim.disconnect(w);
            }
        }
        Op::CloseControl { worker } => {
            if let Some(w) = talking(sim, worker) {
                sim.close_control(w, None);
            }
        }
        Op::Break { worker, how } => {
            let Some(w) = talking(sim, worker) else {
                return;
            };
            let socket = handoff(sim, w, how);
            match (how % 6, socket) {
                (0, _) => {
                    let pid = sim.workers[&w].pid;
                    let hello = ToPrimary::Hello {
                        worker_id: w,
                        pid,
                        protocol_version: PROTOCOL_VERSION,
                    };
                    // A second Hello (or, from a worker that has not said it, a first one).
                    sim.say(w, hello);
                }
                (2, Some(l)) => {
                    let held = sim.in_flight(w, l).len() as u32;
                    sim.raw_ack(w, l, held + 1);
                }
                (3, Some(l)) => sim.bad_return(w, l),
                (4, _) => sim.close_control(w, Some("garbage")),
                (5, Some(l)) => sim.close_handoff(w, l, Some("garbage")),
                _ => {
                    let listening = ToPrimary::Listening {
                        listener: ListenerId(999),
                        local_addr: ListenAddr::Tcp(addr(1)),
                    };
                    sim.say(w, listening);
                }
            }
        }
        Op::Listen { worker, which } => {
            if let Some(w) = talking(sim, worker) {
                let port = [PORT, PORT + 1, BIND_FAILS, 0][usize::from(which % 4)];
                sim.listen(w, addr(port), None);
            }
        }
        Op::LoadReport { worker, open } => {
            if let Some(w) = talking(sim, worker) {
                let report = ToPrimary::LoadReport {
                    open_connections: u32::from(open),
                };
                sim.say(w, report);
            }
        }
        Op::Message { worker } => {
            if let Some(w) = talking(sim, worker) {
                sim.say(w, ToPrimary::User(UserMessage::from_bytes(vec![worker])));
            }
        }
        Op::FdsExhausted { listener } => {
            let listeners: Vec<ListenerId> = sim.listeners.keys().copied().collect();
            if let Some(l) = nth(&listeners, listener) {
                sim.fds_exhausted(l);
            }
        }
        Op::NextSpawnFails => sim.scripts.push_back(Script {
            spawn_fails: true,
            ..sim.default_script.clone()
        }),
        Op::NextNeverSaysHello => sim.scripts.push_back(Script {
            hello: Hello::Never,
            ..sim.default_script.clone()
        }),
        Op::NextGrantFails => sim.scripts.push_back(Script {
            grant_fails: true,
            ..sim.default_script.clone()
        }),
        Op::NextWrongVersion => sim.scripts.push_back(Script {
            hello: Hello::WrongVersion,
            ..sim.default_script.clone()
        }),
        Op::Wait { millis } => sim.advance(Duration::from_millis(u64::from(millis))),
        Op::NextTimeout => {
            sim.next_timeout();
        }
        Op::Stop { graceful } => sim.stop(graceful),
        Op::Reload => {
            let _ = sim.reload();
        }
        Op::Scale { to } => {
            let _ = sim.set_workers(usize::from(to));
        }
        Op::Fork => {
            let _ = sim.fork(vec![("FORKED".into(), "1".into())]);
        }
        Op::HandBack { pick } => {
            let served: Vec<(WorkerId, ListenerId, ConnId)> = (sim.conns.iter())
                .filter_map(|(&id, c)| match c.place {
                    Place::Served(w) if sim.workers[&w].alive => Some((w, c.listener, id)),
                    _ => None,
                })
                .collect();
            if let Some((w, l, conn)) = nth(&served, pick) {
                sim.hand_back(w, l, conn);
            }
        }
        Op::Heartbeat {
            worker,
            connections,
        } => {
            if let Some(w) = talking(sim, worker) {
                sim.heartbeat(w, u64::from(connections));
            }
        }
        Op::NextNeverListens => sim.scripts.push_back(Script {
            send_listening: false,
            ..sim.default_script.clone()
        }),
        Op::BootFails { worker } => {
            let starting: Vec<WorkerId> = (sim.workers.values())
                .filter(|w| w.alive && !w.listened)
                .map(|w| w.id)
                .collect();
            if let Some(w) = nth(&starting, worker) {
                sim.exit(
                    w,
                    ExitStatus::Code(cluster_ipc::env::BOOT_FAILURE_EXIT_CODE),
                );
            }
        }
    }
}

/// `CASES` cases (or `PROPTEST_CASES`), failing seeds saved beside this file.
pub(super) fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(CASES))]

    #[test]
    fn the_supervisor_keeps_every_invariant(case in case()) {
        if let Err(failures) = run_case(&case, None) {
            return Err(TestCaseError::fail(failures.to_string()));
        }
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn runs_are_deterministic(case in case()) {
        let (first, _) = simulate(&case, None);
        let (second, _) = simulate(&case, None);
        prop_assert_eq!(first.transcript(), second.transcript());
    }
}

/// The generator reaches the states that matter, often enough for 2,000 cases to try each
/// many times: a guard against a generator that quietly stops exercising something.
#[test]
fn the_cases_reach_the_states_that_matter() {
    let mut runner = TestRunner::new_with_rng(
        ProptestConfig::default(),
        TestRng::deterministic_rng(ProptestConfig::default().rng_algorithm),
    );
    let strategy = case();
    let mut seen: BTreeMap<&str, u32> = BTreeMap::new();
    let total = 400;
    for _ in 0..total {
        let case = strategy.new_tree(&mut runner).unwrap().current();
        let (sim, failures) = simulate(&case, None);
        assert!(failures.0.is_empty(), "{failures}");
        let mut handed_to: BTreeMap<ConnId, BTreeSet<WorkerId>> = BTreeMap::new();
        for (_, action) in &sim.log {
            if let Action::HandOff { worker, conns, .. } = action {
                for conn in conns {
                    handed_to.entry(*conn).or_default().insert(*worker);
                }
            }
        }
        let exits_after_disconnect = sim.events.iter().any(|(_, e)| {
            matches!(
                e,
                Event::Exit {
                    after_disconnect: true,
                    ..
                }
            )
        });
        let has = |f: &dyn Fn(&Event) -> bool| sim.events.iter().any(|(_, e)| f(e));
        let places: Vec<Place> = sim.conns.values().map(|c| c.place).collect();
        let released_after_ack = sim
            .released()
            .iter()
            .any(|conn| matches!(sim.conns[conn].place, Place::Served(_) | Place::Gone));
        let features = [
            ("handed off", !handed_to.is_empty()),
            (
                "handed to a second worker",
                handed_to.values().any(|ws| ws.len() > 1),
            ),
            ("released after an ack", released_after_ack),
            ("closed by a stop", places.contains(&Place::Closed)),
            ("stopped", sim.stopped),
            (
                "accept paused",
                sim.log
                    .iter()
                    .any(|(_, a)| matches!(a, Action::Accept { on: false, .. })),
            ),
            (
                "killed",
                sim.log
                    .iter()
                    .any(|(_, a)| matches!(a, Action::Signal { .. })),
            ),
            ("respawned after a backoff", sim.delayed_respawns > 0),
            ("left after a disconnect", exits_after_disconnect),
            ("finished", sim.finished),
            (
                "more workers spawned than slots",
                sim.workers.len() > case.workers,
            ),
            (
                "rolled out",
                has(&|e| matches!(e, Event::RolloutFinished { .. })),
            ),
            (
                "two roll-outs",
                (sim.events.iter())
                    .filter(|(_, e)| matches!(e, Event::RolloutStarted { .. }))
                    .count()
                    >= 2,
            ),
            (
                "roll-out aborted, not by a stop",
                has(
                    &|e| matches!(e, Event::RolloutAborted { reason, .. } if !reason.contains("stopping")),
                ),
            ),
            ("scaled", has(&|e| matches!(e, Event::Scaled { .. }))),
            ("hung", has(&|e| matches!(e, Event::Hung { .. }))),
            ("recycled", has(&|e| matches!(e, Event::Recycling { .. }))),
            ("handed back", sim.handed_back > 0),
            ("stopped by itself", sim.self_stopped),
        ];
        for (name, hit) in features {
            *seen.entry(name).or_default() += u32::from(hit);
        }
    }
    eprintln!("{seen:#?}");
    for (name, hits) in seen {
        assert!(hits * 20 >= total, "only {hits} of {total} cases {name}");
    }
}
