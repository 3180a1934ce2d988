//! How evenly the policies spread connections.
//!
//! - Prompt acks (each handoff answered before the next connection arrives): delivered counts
//!   differ by at most 1, and by at most 1 plus the number of returns when workers return
//!   some connections instead of acking them. A worker that acks a batch and then gives it
//!   back unserved ([`Dispatch::requeue_front`], under fresh ids) counts as returning it: the
//!   connections were not served there, and they go out again at the front of the queue.
//! - Acks in rounds (connections arrive in bursts; between bursts every worker acks all it
//!   holds, in any order, and may return some instead): delivered counts differ by at most
//!   the window plus the returns.
//! - No bound holds for *every* schedule, on purpose: a worker that stops acking gets nothing
//!   beyond its window, and that is the back-pressure the window exists for.

use std::collections::BTreeMap;
use std::num::NonZeroU32;

use cluster_sched::{Action, ConnId, Dispatch, LeastConnections, RoundRobin, WorkerId};
use proptest::prelude::*;

/// What a run ended with: delivered connections per worker, and how many were returned.
#[derive(Debug, Default)]
pub struct Tally {
    pub delivered: BTreeMap<WorkerId, u64>,
    pub returns: u64,
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
enum RoundOp {
    Incoming,
    /// Every worker acks everything it holds, in an order rotated by this much; a worker may
    /// first return the oldest of them (when `return_first` says so for its position).
    AckRound {
        rotate: u8,
        return_first: u8,
    },
}

fn round_op() -> impl Strategy<Value = RoundOp> {
    prop_oneof![
        4 => Just(RoundOp::Incoming),
        1 => (any::<u8>(), any::<u8>())
            .prop_map(|(rotate, return_first)| RoundOp::AckRound { rotate, return_first }),
    ]
}

fn ack_round(
    dispatcher: &mut dyn Dispatch,
    workers: u64,
    rotate: u8,
    return_first: u8,
    tally: &mut Tally,
) {
    for position in 0..workers {
        let worker = WorkerId((position + u64::from(rotate)) % workers + 1);
        let held = dispatcher.in_flight_conns(worker).unwrap();
        let mut count = held.len();
        if return_first & (1 << (position % 8)) != 0 && !held.is_empty() {
            dispatcher.returned(worker, &held[..1]).unwrap();
            tally.returns += 1;
            count -= 1;
        }
        dispatcher.acked(worker, count).unwrap();
        *tally.delivered.entry(worker).or_default() += count as u64;
        let _ = dispatcher.take_actions();
    }
}

fn in_rounds(dispatcher: &mut dyn Dispatch, workers: u64, ops: &[RoundOp]) -> Tally {
    join_all(dispatcher, workers);
    let mut tally = Tally::default();
    let mut next_conn = 0;
    for op in ops {
        match *op {
            RoundOp::Incoming => {
                dispatcher.incoming(ConnId(next_conn));
                next_conn += 1;
                let _ = dispatcher.take_actions();
            }
            RoundOp::AckRound {
                rotate,
                return_first,
            } => ack_round(dispatcher, workers, rotate, return_first, &mut tally),
        }
    }
    // A last round without returns, until nothing is left anywhere.
    while (1..=workers).any(|w| dispatcher.in_flight(WorkerId(w)) != Some(0)) {
        ack_round(dispatcher, workers, 0, 0, &mut tally);
    }
    tally
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

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
    fn acks_in_rounds_deliver_within_the_window_plus_the_returns(
        least_connections in any::<bool>(),
        workers in 1u64..=8,
        window in 1u32..=4,
        ops in prop::collection::vec(round_op(), 0..300),
    ) {
        let tally = in_rounds(&mut *make(least_connections, window), workers, &ops);
        let bound = u64::from(window) + tally.returns;
        prop_assert!(tally.spread(workers) <= bound, "{:?}", tally);
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
