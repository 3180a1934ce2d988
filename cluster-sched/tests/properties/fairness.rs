//! How evenly the policies spread connections.
//!
//! - Prompt acks (each handoff answered before the next connection arrives): delivered counts
//!   differ by at most 1, and by at most 1 plus the number of returns when workers return
//!   some connections instead of acking them. A worker that acks a batch and then gives it
//!   back unserved ([`Dispatch::requeue_front`], under fresh ids) counts as returning it: the
//!   connections were not served there, and they go out again at the front of the queue.
//! - Acks in rounds (connections arrive in bursts; between bursts every worker acks all it
//!   holds, in some order, and may return some instead): delivered counts differ by at most
//!   1 plus the returns, plus a window for every round in which a backlog ran out, plus, for
//!   round-robin, one for every round in which the workers did not ack in the order they
//!   were handed their connections ([`rounds_bound`] says why). No bound in the window alone
//!   holds: whoever acks first when a backlog runs out takes the rest of it, and
//!   round-robin's turns follow the ack order, so a schedule that repeats either widens the
//!   gap without limit.
//! - No bound holds for *every* schedule, on purpose: a worker that stops acking gets nothing
//!   beyond its window, and that is the back-pressure the window exists for.

use std::collections::BTreeMap;
use std::num::NonZeroU32;

use cluster_sched::{Action, ConnId, Dispatch, LeastConnections, RoundRobin, WorkerId};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

/// What a run ended with: delivered connections per worker, how many were returned, and, for
/// acks in rounds, what the schedule did that the bound on the spread depends on.
#[derive(Debug, Default)]
pub struct Tally {
    pub delivered: BTreeMap<WorkerId, u64>,
    pub returns: u64,
    /// Ack rounds that started with connections waiting and ended with none.
    pub backlog_rounds: u64,
    /// Ack rounds in which the workers holding connections did not ack in the order they
    /// were handed the oldest of them.
    pub out_of_order_rounds: u64,
}

impl Tally {
    /// The largest difference between two workers' delivered counts.
    pub fn spread(&self, workers: u64) -> u64 {
        let count = |id| self.delivered.get(&WorkerId(id)).copied().unwrap_or(0);
        let counts: Vec<u64> = (1..=workers).map(count).collect();
        counts.iter().max().unwrap_or(&0) - counts.iter().min().unwrap_or(&0)
    }
}

pub fn make(least_connections: bool, window: u32) -> Box<dyn Dispatch> {
    let window = NonZeroU32::new(window).unwrap();
    if least_connections {
        Box::new(LeastConnections::new(window))
    } else {
        Box::new(RoundRobin::new(window))
    }
}

fn join_all(dispatcher: &mut dyn Dispatch, workers: u64) {
    for id in 1..=workers {
        dispatcher.worker_joined(WorkerId(id)).unwrap();
    }
}

fn handoffs(actions: Vec<Action>) -> Vec<(WorkerId, Vec<ConnId>)> {
    actions
        .into_iter()
        .filter_map(|action| match action {
            Action::Handoff { worker, conns } => Some((worker, conns)),
            _ => None,
        })
        .collect()
}

/// How a worker answers one handoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Ack,
    Return,
    /// Ack, then hand the connections back unserved, as a worker closing its listener does
    /// with connections it received but did not pass to its application.
    AckThenRequeue,
}

pub fn answer() -> impl Strategy<Value = Answer> {
    prop_oneof![
        8 => Just(Answer::Ack),
        1 => Just(Answer::Return),
        1 => Just(Answer::AckThenRequeue),
    ]
}

/// Every handoff is answered at once, as the next of `answers` says (acked once they run
/// out).
pub fn prompt(
    dispatcher: &mut dyn Dispatch,
    workers: u64,
    conns: u64,
    answers: &[Answer],
) -> Tally {
    join_all(dispatcher, workers);
    let mut tally = Tally::default();
    let mut answers = answers.iter();
    // The primary gives requeued fds ids it has never used.
    let mut fresh = (conns..).map(ConnId);
    for conn in 0..conns {
        dispatcher.incoming(ConnId(conn));
        loop {
            let batch = handoffs(dispatcher.take_actions());
            if batch.is_empty() {
                break;
            }
            for (worker, conns) in batch {
                let count = conns.len() as u64;
                match answers.next().copied().unwrap_or(Answer::Ack) {
                    Answer::Ack => {
                        dispatcher.acked(worker, conns.len()).unwrap();
                        *tally.delivered.entry(worker).or_default() += count;
                    }
                    Answer::Return => {
                        dispatcher.returned(worker, &conns).unwrap();
                        tally.returns += count;
                    }
                    Answer::AckThenRequeue => {
                        dispatcher.acked(worker, conns.len()).unwrap();
                        let again: Vec<ConnId> = fresh.by_ref().take(conns.len()).collect();
                        dispatcher.requeue_front(&again);
                        tally.returns += count;
                    }
                }
            }
        }
    }
    tally
}

#[derive(Debug, Clone)]
pub enum RoundOp {
    Incoming,
    /// Every worker acks everything it holds, in an order rotated by this much; a worker may
    /// first return the oldest of them (when `return_first` says so for its position).
    AckRound {
        rotate: u8,
        return_first: u8,
    },
}

pub fn round_op() -> impl Strategy<Value = RoundOp> {
    prop_oneof![
        4 => Just(RoundOp::Incoming),
        1 => (any::<u8>(), any::<u8>())
            .prop_map(|(rotate, return_first)| RoundOp::AckRound { rotate, return_first }),
    ]
}

/// The order in which the workers ack in an ack round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOrder {
    /// By worker id, starting `rotate` places along: any order a schedule likes, the same
    /// worker first every time included.
    Rotated,
    /// In the order the workers were handed the oldest connection they hold (by handoff
    /// action), as when every worker answers as fast as the others; `rotate` is ignored.
    /// Workers that hold nothing come last.
    Handoff,
}

/// An ack-round run in progress.
struct Rounds<'a> {
    dispatcher: &'a mut dyn Dispatch,
    workers: u64,
    order: AckOrder,
    /// For each connection handed out, the number of the handoff action that last carried it.
    handed_in: BTreeMap<ConnId, u64>,
    handoffs: u64,
    tally: Tally,
}

impl Rounds<'_> {
    /// Takes the dispatcher's actions, noting which handoff carried which connection.
    fn settle(&mut self) {
        for (_, conns) in handoffs(self.dispatcher.take_actions()) {
            self.handoffs += 1;
            for conn in conns {
                self.handed_in.insert(conn, self.handoffs);
            }
        }
    }

    /// The handoff that carried the oldest connection this worker holds.
    fn oldest(&self, worker: WorkerId) -> Option<u64> {
        let held = self.dispatcher.in_flight_conns(worker).unwrap();
        held.first().map(|conn| self.handed_in[conn])
    }

    fn ack_round(&mut self, rotate: u8, return_first: u8) {
        let workers = self.workers;
        let mut order: Vec<WorkerId> = (0..workers)
            .map(|position| WorkerId((position + u64::from(rotate)) % workers + 1))
            .collect();
        if self.order == AckOrder::Handoff {
            order.sort_by_key(|&worker| self.oldest(worker).unwrap_or(u64::MAX));
        }
        let oldest: Vec<u64> = order.iter().filter_map(|&w| self.oldest(w)).collect();
        if oldest.windows(2).any(|pair| pair[0] > pair[1]) {
            self.tally.out_of_order_rounds += 1;
        }
        let backlog = self.dispatcher.pending_len() > 0;
        for (position, worker) in order.into_iter().enumerate() {
            let held = self.dispatcher.in_flight_conns(worker).unwrap();
            let mut count = held.len();
            if return_first & (1 << (position % 8)) != 0 && !held.is_empty() {
                self.dispatcher.returned(worker, &held[..1]).unwrap();
                self.tally.returns += 1;
                count -= 1;
            }
            self.dispatcher.acked(worker, count).unwrap();
            *self.tally.delivered.entry(worker).or_default() += count as u64;
            self.settle();
        }
        if backlog && self.dispatcher.pending_len() == 0 {
            self.tally.backlog_rounds += 1;
        }
    }
}

/// Connections arrive and ack rounds happen as `ops` says; then ack rounds without returns
/// (in the same `order`, rotated by 0) until nothing is left anywhere.
pub fn in_rounds(
    dispatcher: &mut dyn Dispatch,
    workers: u64,
    ops: &[RoundOp],
    order: AckOrder,
) -> Tally {
    join_all(dispatcher, workers);
    let mut rounds = Rounds {
        dispatcher,
        workers,
        order,
        handed_in: BTreeMap::new(),
        handoffs: 0,
        tally: Tally::default(),
    };
    rounds.settle();
    let mut next_conn = 0;
    for op in ops {
        match *op {
            RoundOp::Incoming => {
                rounds.dispatcher.incoming(ConnId(next_conn));
                next_conn += 1;
                rounds.settle();
            }
            RoundOp::AckRound {
                rotate,
                return_first,
            } => rounds.ack_round(rotate, return_first),
        }
    }
    while (1..=workers).any(|w| rounds.dispatcher.in_flight(WorkerId(w)) != Some(0)) {
        rounds.ack_round(0, 0);
    }
    rounds.tally
}

/// The most that delivered counts may differ by after a run of acks in rounds:
/// `1 + returns + window × backlog_rounds`, plus `out_of_order_rounds` for round-robin.
///
/// The bound this replaces, `window + returns`, fails for every policy that never leaves a
/// connection waiting while a worker has credit, and for round-robin even without a backlog:
/// the backlog and the out-of-order terms below grow without limit in schedules this harness
/// generates (CI found one; see `the_schedule_ci_found_exceeds_the_window_but_not_the_bound`).
/// Why each term is there (the tests after the properties reach each one, so the bound is
/// tight):
///
/// - `1`: a handoff made while several workers have credit is the policy's choice, and goes
///   to the least-loaded one (least-connections) or the one that has waited longest for a
///   turn (round-robin). With no backlog and acks in handoff order, round-robin's workers get
///   credit back in the order they were served, so its rotation stays the order of service,
///   and either policy keeps counts within one, as under prompt acks.
/// - `window × backlog_rounds`: a connection waits only while every worker is out of credit.
///   Then an ack gives the acker alone credit, and work conservation hands it what waits, up
///   to its window. A round that starts and ends with a backlog refills every worker by what
///   it acked and changes nothing; in the round in which the backlog runs out, the workers
///   that acked before it ran out got up to a window each, the others nothing. No decision
///   of the policy is involved, so no work-conserving policy avoids it: if the same worker
///   acks first each time, the gap widens by a window per such round, for both policies.
/// - `out_of_order_rounds`, round-robin only: round-robin serves workers in the order they
///   get credit back (Node's "oldest idle worker first", exactly so at window 1), so the ack
///   order becomes the turn order. A round in which a worker served later acks before one
///   served earlier moves it ahead in the rotation, worth one connection; repeated, that
///   widens the gap without limit at any window, window 1 (Node's own order) included, even
///   with no backlog. Least-connections picks by load, which the ack order does not change.
/// - `returns`: a returned connection is served elsewhere, one each.
///
/// This is a sketch, not a proof; the properties below check it on random schedules.
pub fn rounds_bound(least_connections: bool, window: u32, tally: &Tally) -> u64 {
    let disorder = if least_connections {
        0
    } else {
        tally.out_of_order_rounds
    };
    1 + tally.returns + u64::from(window) * tally.backlog_rounds + disorder
}

/// 256 cases unless `PROPTEST_CASES` says otherwise. A failing case's seed is saved to
/// `fairness.proptest-regressions` beside this file, which is under version control, and
/// every seed in it is replayed before any new case. (Proptest's default place would be
/// `tests/proptest-regressions/fairness.txt`, because `main.rs` is in this directory.)
fn config() -> ProptestConfig {
    let persistence = FileFailurePersistence::WithSource("proptest-regressions");
    ProptestConfig {
        failure_persistence: Some(Box::new(persistence)),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn prompt_acks_deliver_within_one(
        least_connections in any::<bool>(),
        workers in 1u64..=16,
        window in 1u32..=4,
        conns in 0u64..400,
    ) {
        let tally = prompt(&mut *make(least_connections, window), workers, conns, &[]);
        prop_assert!(tally.spread(workers) <= 1, "{:?}", tally);
    }

    #[test]
    fn prompt_acks_with_returns_deliver_within_one_plus_the_returns(
        least_connections in any::<bool>(),
        workers in 1u64..=16,
        window in 1u32..=4,
        conns in 0u64..300,
        answers in prop::collection::vec(answer(), 0..300),
    ) {
        let tally = prompt(&mut *make(least_connections, window), workers, conns, &answers);
        prop_assert!(tally.spread(workers) <= 1 + tally.returns, "{:?}", tally);
    }

    #[test]
    fn acks_in_rounds_deliver_within_one_plus_backlogs_disorder_and_returns(
        least_connections in any::<bool>(),
        workers in 1u64..=8,
        window in 1u32..=4,
        ops in prop::collection::vec(round_op(), 0..300),
    ) {
        let dispatcher = &mut *make(least_connections, window);
        let tally = in_rounds(dispatcher, workers, &ops, AckOrder::Rotated);
        let bound = rounds_bound(least_connections, window, &tally);
        prop_assert!(tally.spread(workers) <= bound, "bound {}: {:?}", bound, tally);
    }

    #[test]
    fn acks_in_rounds_in_handoff_order_deliver_within_one_plus_backlogs_and_returns(
        least_connections in any::<bool>(),
        workers in 1u64..=8,
        window in 1u32..=4,
        ops in prop::collection::vec(round_op(), 0..300),
    ) {
        let dispatcher = &mut *make(least_connections, window);
        let tally = in_rounds(dispatcher, workers, &ops, AckOrder::Handoff);
        prop_assert_eq!(tally.out_of_order_rounds, 0);
        let bound = rounds_bound(least_connections, window, &tally);
        prop_assert!(tally.spread(workers) <= bound, "bound {}: {:?}", bound, tally);
    }
}

#[test]
fn a_worker_that_stops_acking_gets_only_its_window() {
    for least_connections in [false, true] {
        let mut dispatcher = make(least_connections, 3);
        join_all(&mut *dispatcher, 2);
        let mut delivered = 0;
        for conn in 0..100 {
            dispatcher.incoming(ConnId(conn));
            for (worker, conns) in handoffs(dispatcher.take_actions()) {
                if worker == WorkerId(2) {
                    dispatcher.acked(worker, conns.len()).unwrap();
                    delivered += conns.len();
                }
            }
        }
        assert_eq!(dispatcher.in_flight(WorkerId(1)), Some(3));
        assert_eq!(delivered, 97);
    }
}

#[test]
fn window_one_alternates_strictly_under_prompt_acks() {
    let mut rr = make(false, 1);
    join_all(&mut *rr, 3);
    let mut order = Vec::new();
    for conn in 0..6 {
        rr.incoming(ConnId(conn));
        for (worker, conns) in handoffs(rr.take_actions()) {
            order.push(worker.0);
            rr.acked(worker, conns.len()).unwrap();
        }
    }
    assert_eq!(order, vec![1, 2, 3, 1, 2, 3]);
}

fn ack_round(rotate: u8) -> RoundOp {
    RoundOp::AckRound {
        rotate,
        return_first: 0,
    }
}

fn counts(ones: u64, twos: u64) -> BTreeMap<WorkerId, u64> {
    BTreeMap::from([(WorkerId(1), ones), (WorkerId(2), twos)])
}

/// The schedule CI found against the bound this file used to claim (`window + returns`):
/// window 2, two workers; one connection, a round in which worker 2 acks first (holding
/// nothing), 14 more connections, then the closing rounds, by worker id. Worker 1 acks first
/// in the round in which the backlog runs out and takes its last two: 9 against 6. Both
/// policies hand out the same here, since with a backlog neither has a choice.
#[test]
fn the_schedule_ci_found_exceeds_the_window_but_not_the_bound() {
    let mut ops = vec![RoundOp::Incoming, ack_round(1)];
    ops.extend(std::iter::repeat_n(RoundOp::Incoming, 14));
    for least_connections in [false, true] {
        let tally = in_rounds(&mut *make(least_connections, 2), 2, &ops, AckOrder::Rotated);
        assert_eq!(tally.delivered, counts(9, 6));
        assert_eq!(tally.returns, 0);
        assert_eq!((tally.backlog_rounds, tally.out_of_order_rounds), (1, 1));
        assert_eq!(tally.spread(2), 3, "more than the window");
        assert!(tally.spread(2) <= rounds_bound(least_connections, 2, &tally));
    }
}

/// The `window × backlog_rounds` term is reached, by both policies: each cycle brings three
/// windows' worth of connections to two workers, so one window waits; worker 1 acks first,
/// is the only one with credit, and takes it. The gap widens by a window per cycle, without
/// limit.
#[test]
fn a_backlog_that_runs_out_goes_to_whoever_acks_first_under_either_policy() {
    for window in 1..=3 {
        for cycles in 0..4 {
            let mut ops = Vec::new();
            for _ in 0..cycles {
                ops.extend(std::iter::repeat_n(RoundOp::Incoming, 3 * window as usize));
                ops.extend([ack_round(0), ack_round(0)]);
            }
            for least_connections in [false, true] {
                let tally = in_rounds(
                    &mut *make(least_connections, window),
                    2,
                    &ops,
                    AckOrder::Rotated,
                );
                let window = u64::from(window);
                assert_eq!(
                    tally.delivered.get(&WorkerId(1)).copied().unwrap_or(0),
                    2 * window * cycles
                );
                assert_eq!(tally.spread(2), window * cycles);
                assert_eq!(tally.backlog_rounds, cycles);
            }
        }
    }
}

/// The `out_of_order_rounds` term is reached by round-robin, at window 1 (where its order is
/// Node's) and with no backlog: worker 1 always acks first, so it always gets credit back
/// first and takes the next turn. Least-connections, and round-robin with acks in handoff
/// order, stay within one on the same connections.
#[test]
fn round_robin_turns_follow_the_ack_order() {
    for cycles in 0..4 {
        let mut ops = vec![RoundOp::Incoming, ack_round(0)];
        for _ in 0..cycles {
            ops.extend([
                RoundOp::Incoming,
                RoundOp::Incoming,
                ack_round(0),
                RoundOp::Incoming,
                ack_round(0),
            ]);
        }
        let tally = in_rounds(&mut *make(false, 1), 2, &ops, AckOrder::Rotated);
        assert_eq!(tally.backlog_rounds, 0);
        assert_eq!(tally.out_of_order_rounds, cycles);
        assert_eq!(tally.spread(2), 1 + cycles);
        for (least_connections, order) in [
            (true, AckOrder::Rotated),
            (false, AckOrder::Handoff),
            (true, AckOrder::Handoff),
        ] {
            let tally = in_rounds(&mut *make(least_connections, 1), 2, &ops, order);
            assert!(
                tally.spread(2) <= 1,
                "{least_connections} {order:?}: {tally:?}"
            );
        }
    }
}
