//! The properties have teeth: deliberately broken policies, run through the same checkers,
//! must be caught, each by the property it breaks.

use std::num::NonZeroU32;

use cluster_sched::{
    Action, Config, ConnId, Dispatch, Error, LeastConnections, RoundRobin, WorkerId, WorkerStatus,
};
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestError, TestRng, TestRunner};

use crate::fairness::{AckOrder, Tally, in_rounds, prompt, round_op, rounds_bound};
use crate::harness::{Op, Property, Scenario, check_run, scenario};

/// One way to get dispatch wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flaw {
    /// Treats a leaving worker's in-flight connections as delivered (Node leaks them).
    ForgetsLeaversInFlight,
    /// Does not hear that a worker left, and keeps handing it connections.
    IgnoresLeave,
    /// Does not hear that a worker drains, and keeps handing it connections.
    IgnoresDrain,
    /// Lets each worker hold one more connection than the window.
    WiderWindow,
    /// Lets a joining worker take pending connections only when the next one arrives.
    DefersJoin,
    /// Never tells the caller to resume accepting.
    DropsResume,
    /// Closes what waits when the last worker leaves, as Node does.
    ClosesWhenLastWorkerLeaves,
    /// Queues delivered connections that came back behind those already waiting, as if
    /// they had just been accepted.
    RequeuesAtTheBack,
    /// Puts delivered connections that came back at the front one by one, which reverses
    /// them.
    RequeuesReversed,
    /// Neither queues nor closes delivered connections that come back after shutdown, so
    /// their fds leak.
    LeaksRequeuedAfterShutdown,
    /// Least-connections fooled by load reports, before every connection, that make worker 1
    /// look idle: it fills worker 1 whenever worker 1 has credit.
    FillsFirstWorker,
}

/// A correct `RoundRobin` (`LeastConnections` for [`Flaw::FillsFirstWorker`]) behind a
/// wrapper that introduces one flaw.
struct Flawed {
    inner: Box<dyn Dispatch>,
    claimed: Config,
    flaw: Flaw,
    deferred_joins: Vec<WorkerId>,
}

impl Flawed {
    fn new(config: Config, flaw: Flaw) -> Self {
        let actual = match flaw {
            Flaw::WiderWindow => {
                let wider = NonZeroU32::new(config.window.get() + 1).unwrap();
                Config::new(wider).with_pending_bound(config.pending_bound)
            }
            _ => config,
        };
        let inner: Box<dyn Dispatch> = match flaw {
            Flaw::FillsFirstWorker => Box::new(LeastConnections::with_config(actual)),
            _ => Box::new(RoundRobin::with_config(actual)),
        };
        Self {
            inner,
            claimed: config,
            flaw,
            deferred_joins: Vec::new(),
        }
    }
}

impl Dispatch for Flawed {
    fn worker_joined(&mut self, worker: WorkerId) -> Result<(), Error> {
        if self.flaw == Flaw::DefersJoin {
            self.deferred_joins.push(worker);
            return Ok(());
        }
        self.inner.worker_joined(worker)
    }

    fn worker_draining(&mut self, worker: WorkerId) -> Result<(), Error> {
        if self.flaw == Flaw::IgnoresDrain {
            return Ok(());
        }
        self.inner.worker_draining(worker)
    }

    fn worker_left(&mut self, worker: WorkerId) -> Result<(), Error> {
        match self.flaw {
            Flaw::IgnoresLeave => return Ok(()),
            Flaw::ForgetsLeaversInFlight => {
                // Draining first so the ack cannot pull in new connections.
                self.inner.worker_draining(worker)?;
                let in_flight = self.inner.in_flight(worker).unwrap_or(0);
                self.inner.acked(worker, in_flight)?;
            }
            _ => {}
        }
        self.inner.worker_left(worker)?;
        if self.flaw == Flaw::ClosesWhenLastWorkerLeaves && self.inner.worker_count() == 0 {
            self.inner.shutdown();
        }
        Ok(())
    }

    fn incoming(&mut self, conn: ConnId) {
        for worker in std::mem::take(&mut self.deferred_joins) {
            self.inner.worker_joined(worker).unwrap();
        }
        if self.flaw == Flaw::FillsFirstWorker {
            for worker in self.inner.workers() {
                let open = if worker == WorkerId(1) { 0 } else { 1000 };
                self.inner.load_report(worker, open).unwrap();
            }
        }
        self.inner.incoming(conn);
    }

    fn requeue_front(&mut self, conns: &[ConnId]) {
        match self.flaw {
            Flaw::RequeuesAtTheBack => {
                for &conn in conns {
                    self.inner.incoming(conn);
                }
            }
            Flaw::RequeuesReversed => {
                let reversed: Vec<ConnId> = conns.iter().rev().copied().collect();
                self.inner.requeue_front(&reversed);
            }
            Flaw::LeaksRequeuedAfterShutdown if self.inner.is_shut_down() => {}
            _ => self.inner.requeue_front(conns),
        }
    }

    fn acked(&mut self, worker: WorkerId, count: usize) -> Result<Vec<ConnId>, Error> {
        self.inner.acked(worker, count)
    }

    fn returned(&mut self, worker: WorkerId, conns: &[ConnId]) -> Result<(), Error> {
        self.inner.returned(worker, conns)
    }

    fn load_report(&mut self, worker: WorkerId, open: u32) -> Result<(), Error> {
        self.inner.load_report(worker, open)
    }

    fn shutdown(&mut self) {
        self.inner.shutdown();
    }

    fn poll_action(&mut self) -> Option<Action> {
        loop {
            let action = self.inner.poll_action()?;
            if !(self.flaw == Flaw::DropsResume && action == Action::ResumeAccept) {
                return Some(action);
            }
        }
    }

    fn config(&self) -> Config {
        self.claimed
    }

    fn pending_len(&self) -> usize {
        self.inner.pending_len()
    }

    fn pending_conns(&self) -> Vec<ConnId> {
        self.inner.pending_conns()
    }

    fn pending_bound(&self) -> usize {
        self.inner.pending_bound()
    }

    fn is_accept_paused(&self) -> bool {
        self.inner.is_accept_paused()
    }

    fn is_shut_down(&self) -> bool {
        self.inner.is_shut_down()
    }

    fn workers(&self) -> Vec<WorkerId> {
        self.inner.workers()
    }

    fn worker_count(&self) -> usize {
        self.inner.worker_count()
    }

    fn worker_status(&self, worker: WorkerId) -> Option<WorkerStatus> {
        self.inner.worker_status(worker)
    }

    fn in_flight_conns(&self, worker: WorkerId) -> Option<Vec<ConnId>> {
        self.inner.in_flight_conns(worker)
    }
}

fn runner(cases: u32) -> TestRunner {
    let config = ProptestConfig {
        cases,
        failure_persistence: None,
        max_shrink_iters: 256,
        ..ProptestConfig::default()
    };
    // A fixed seed: a test that must fail must not depend on luck.
    let rng = TestRng::deterministic_rng(config.rng_algorithm);
    TestRunner::new_with_rng(config, rng)
}

/// Runs the property checker over random scenarios and requires it to catch `flaw` as a
/// violation of `property`.
fn assert_caught(flaw: Flaw, property: Property) {
    let result = runner(1000).run(&scenario(4, 120), |scenario: Scenario| {
        let mut flawed = Flawed::new(scenario.config, flaw);
        match check_run(&mut flawed, &scenario) {
            Err(failure) if failure.broke(property) => {
                Err(TestCaseError::fail(failure.to_string()))
            }
            _ => Ok(()),
        }
    });
    match result {
        Err(TestError::Fail(reason, minimal)) => {
            eprintln!("{flaw:?} caught as {property:?}: {reason}\nminimal: {minimal:?}");
        }
        other => panic!("{flaw:?} was not caught as {property:?}: {other:?}"),
    }
}

#[test]
fn forgetting_a_leaving_workers_connections_breaks_conservation() {
    assert_caught(Flaw::ForgetsLeaversInFlight, Property::Conservation);
}

#[test]
fn handing_to_a_worker_that_left_is_caught() {
    assert_caught(Flaw::IgnoresLeave, Property::HandoffToGone);
}

#[test]
fn handing_to_a_draining_worker_is_caught() {
    assert_caught(Flaw::IgnoresDrain, Property::HandoffToDraining);
}

#[test]
fn exceeding_the_window_is_caught() {
    assert_caught(Flaw::WiderWindow, Property::Window);
}

#[test]
fn leaving_connections_pending_while_a_worker_has_credit_is_caught() {
    assert_caught(Flaw::DefersJoin, Property::WorkConserving);
}

#[test]
fn never_resuming_is_caught() {
    assert_caught(Flaw::DropsResume, Property::PauseResume);
}

#[test]
fn closing_for_lack_of_workers_is_caught() {
    assert_caught(
        Flaw::ClosesWhenLastWorkerLeaves,
        Property::ClosedWithoutShutdown,
    );
}

#[test]
fn requeueing_behind_what_waits_is_caught() {
    assert_caught(Flaw::RequeuesAtTheBack, Property::Fifo);
}

#[test]
fn requeueing_in_reverse_is_caught() {
    assert_caught(Flaw::RequeuesReversed, Property::Fifo);
}

#[test]
fn leaking_requeued_connections_after_shutdown_is_caught() {
    assert_caught(
        Flaw::LeaksRequeuedAfterShutdown,
        Property::PendingAfterShutdown,
    );
}

#[test]
fn a_known_bad_sequence_fails_the_checker_and_passes_the_real_policy() {
    let scenario = Scenario {
        config: Config::new(NonZeroU32::new(2).unwrap()),
        ops: vec![Op::Join, Op::Incoming, Op::Join, Op::Leave(0)],
    };
    let failure = check_run(
        &mut Flawed::new(scenario.config, Flaw::ForgetsLeaversInFlight),
        &scenario,
    )
    .expect_err("the flawed policy loses connection 1");
    assert!(failure.broke(Property::Conservation), "{failure}");
    assert!(check_run(&mut RoundRobin::with_config(scenario.config), &scenario).is_ok());
}

/// Least-connections fooled by load reports that always make the first worker look idle:
/// it fills worker 1 whenever it has credit, which the fairness check must catch.
struct FillsFirstWorker(LeastConnections);

impl FillsFirstWorker {
    fn skew(&mut self) {
        for worker in self.0.workers() {
            let open = if worker == WorkerId(1) { 0 } else { 1000 };
            self.0.load_report(worker, open).unwrap();
        }
    }
}

fn prompt_with_skew(workers: u64, window: u32, conns: u64) -> Tally {
    let mut lc = FillsFirstWorker(LeastConnections::new(NonZeroU32::new(window).unwrap()));
    for id in 1..=workers {
        lc.0.worker_joined(WorkerId(id)).unwrap();
    }
    let mut tally = Tally::default();
    for conn in 0..conns {
        lc.skew();
        lc.0.incoming(ConnId(conn));
        for action in lc.0.take_actions() {
            if let Action::Handoff { worker, conns } = action {
                lc.0.acked(worker, conns.len()).unwrap();
                *tally.delivered.entry(worker).or_default() += conns.len() as u64;
            }
        }
    }
    tally
}

#[test]
fn filling_one_worker_first_fails_the_fairness_check() {
    let strategy = (2u64..=16, 1u32..=4, 0u64..400);
    let result = runner(256).run(&strategy, |(workers, window, conns)| {
        let tally = prompt_with_skew(workers, window, conns);
        prop_assert!(tally.spread(workers) <= 1, "{:?}", tally);
        Ok(())
    });
    assert!(
        result.is_err(),
        "the fairness check let a greedy policy pass"
    );
    // And the same check passes the honest policy on the same sizes.
    let tally = prompt(&mut LeastConnections::new(NonZeroU32::MIN), 4, 100, &[]);
    assert!(tally.spread(4) <= 1);
}

/// The bound for acks in rounds has teeth: a policy that fills worker 1 whenever it can
/// breaks it, with acks in handoff order and in any order, even when allowed round-robin's
/// extra one per round acked out of handoff order.
#[test]
fn filling_one_worker_first_fails_the_rounds_bound() {
    for order in [AckOrder::Handoff, AckOrder::Rotated] {
        let strategy = (
            2u64..=8,
            1u32..=4,
            prop::collection::vec(round_op(), 0..300),
        );
        let result = runner(256).run(&strategy, |(workers, window, ops)| {
            let config = Config::new(NonZeroU32::new(window).unwrap());
            let mut greedy = Flawed::new(config, Flaw::FillsFirstWorker);
            let tally = in_rounds(&mut greedy, workers, &ops, order);
            let bound = rounds_bound(false, window, &tally);
            prop_assert!(
                tally.spread(workers) <= bound,
                "bound {}: {:?}",
                bound,
                tally
            );
            Ok(())
        });
        match result {
            Err(TestError::Fail(reason, minimal)) => {
                eprintln!("greedy caught with acks {order:?}: {reason}\nminimal: {minimal:?}");
            }
            other => panic!("the rounds bound let a greedy policy pass ({order:?}): {other:?}"),
        }
    }
}
