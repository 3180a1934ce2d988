//! Round-robin with a credit window: Node's `RoundRobinHandle`, pipelined.

use std::collections::VecDeque;
use std::num::NonZeroU32;

use crate::Config;
use crate::credit::{Core, Selector, WorkerKey, dispatch_via_core};

/// Round-robin dispatch with a credit window per worker.
///
/// Workers that have credit (fewer than `window` connections in flight, not draining) wait in
/// a rotation and take pending connections one per turn, oldest connection first. A worker
/// that takes a turn and still has credit goes to the back of the rotation; one that has run
/// out leaves it, and rejoins at the back when an ack or a return gives it credit again. A
/// worker that joins starts at the back with full credit.
///
/// With `window = 1` this hands out exactly what Node's `RoundRobinHandle` hands out
/// ("oldest idle worker first"), minus Node's weak spots: connections a leaving worker had in
/// flight are dispatched again instead of leaked, and accept pauses instead of queueing
/// without bound.
///
/// # Fairness
///
/// Turns follow the order in which workers get credit back, which is the order of their
/// acks. With each handoff acked before the next connection arrives, delivered counts differ
/// by at most one. With acks in rounds between bursts of connections, they differ by at most
/// one, plus a window for every round in which a backlog ran out (whoever acks first takes
/// the rest of it, as under any policy), plus one for every round in which workers acked out
/// of the order they were served (the early acker takes the next turn, as in Node), plus one
/// per returned connection. So a worker that keeps acking first, even at window 1, gains
/// without limit; [`LeastConnections`](crate::LeastConnections) is not moved by the ack
/// order. See the crate docs.
///
/// Choosing a worker is O(1). An input that names a worker (an ack, a return, a join) pays
/// one O(log n) lookup of its id. A worker leaving or starting to drain while it waits for a
/// turn costs O(n), which is fine because that happens per worker, not per connection.
///
/// Use it through the [`Dispatch`](crate::Dispatch) trait; see the crate docs for an example.
#[derive(Debug)]
pub struct RoundRobin {
    core: Core<Rotation>,
}

impl RoundRobin {
    /// A round-robin dispatcher with this window and the default pending bound.
    #[must_use]
    pub fn new(window: NonZeroU32) -> Self {
        Self::with_config(Config::new(window))
    }

    /// A round-robin dispatcher with this configuration.
    #[must_use]
    pub fn with_config(config: Config) -> Self {
        Self {
            core: Core::new(config, Rotation::default()),
        }
    }
}

dispatch_via_core!(RoundRobin);

/// The rotation: the workers with credit, in the order their turns come.
#[derive(Debug, Default)]
pub(crate) struct Rotation {
    queue: VecDeque<WorkerKey>,
}

impl Selector for Rotation {
    fn push(&mut self, key: WorkerKey, _load: u64) {
        self.queue.push_back(key);
    }

    fn pop(&mut self) -> Option<WorkerKey> {
        self.queue.pop_front()
    }

    fn remove(&mut self, key: WorkerKey) {
        self.queue.retain(|&waiting| waiting != key);
    }

    fn reload(&mut self, _key: WorkerKey, _load: u64) {}

    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Action, ConnId, Dispatch, Error, PendingBound, WorkerId};

    fn window(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    fn handoff(worker: u64, conns: &[u64]) -> Action {
        Action::Handoff {
            worker: WorkerId(worker),
            conns: conns.iter().copied().map(ConnId).collect(),
        }
    }

    fn with_workers(window_size: u32, workers: u64) -> RoundRobin {
        let mut rr = RoundRobin::new(window(window_size));
        for id in 1..=workers {
            rr.worker_joined(WorkerId(id)).unwrap();
        }
        assert!(rr.take_actions().is_empty());
        rr
    }

    #[test]
    fn takes_turns_one_connection_each_rather_than_filling_one_worker() {
        let mut rr = with_workers(3, 2);
        for conn in 0..4 {
            rr.incoming(ConnId(conn));
        }
        assert_eq!(
            rr.take_actions(),
            vec![
                handoff(1, &[0]),
                handoff(2, &[1]),
                handoff(1, &[2]),
                handoff(2, &[3])
            ]
        );
    }

    #[test]
    fn one_step_sends_one_batch_per_worker_in_turn_order() {
        let mut rr = RoundRobin::new(window(4));
        rr.worker_joined(WorkerId(3)).unwrap();
        for conn in 0..4 {
            rr.incoming(ConnId(conn));
        }
        let _ = rr.take_actions();
        rr.worker_joined(WorkerId(1)).unwrap();
        rr.worker_joined(WorkerId(2)).unwrap();
        rr.worker_left(WorkerId(3)).unwrap();
        assert_eq!(
            rr.take_actions(),
            vec![handoff(1, &[0, 2]), handoff(2, &[1, 3])]
        );
    }

    #[test]
    fn a_joining_worker_takes_what_waited_for_it() {
        let mut rr = RoundRobin::new(window(3));
        for conn in 0..5 {
            rr.incoming(ConnId(conn));
        }
        // With no worker the bound is one window: accept pauses at the third connection.
        assert_eq!(rr.take_actions(), vec![Action::PauseAccept]);
        rr.worker_joined(WorkerId(1)).unwrap();
        assert_eq!(
            rr.take_actions(),
            vec![handoff(1, &[0, 1, 2]), Action::ResumeAccept]
        );
        assert_eq!(rr.pending_conns(), vec![ConnId(3), ConnId(4)]);
    }

    #[test]
    fn a_worker_out_of_credit_rejoins_at_the_back_after_an_ack() {
        let mut rr = with_workers(1, 3);
        for conn in 0..3 {
            rr.incoming(ConnId(conn));
        }
        let _ = rr.take_actions();
        assert_eq!(rr.acked(WorkerId(1), 1).unwrap(), vec![ConnId(0)]);
        rr.acked(WorkerId(3), 1).unwrap();
        rr.incoming(ConnId(3));
        rr.incoming(ConnId(4));
        assert_eq!(rr.take_actions(), vec![handoff(1, &[3]), handoff(3, &[4])]);
    }

    #[test]
    fn a_leaving_worker_gives_its_connections_back_in_order_to_the_front() {
        let mut rr = with_workers(2, 1);
        for conn in 0..4 {
            rr.incoming(ConnId(conn));
        }
        assert_eq!(
            rr.take_actions(),
            vec![handoff(1, &[0]), handoff(1, &[1]), Action::PauseAccept]
        );
        rr.worker_left(WorkerId(1)).unwrap();
        assert_eq!(
            rr.pending_conns(),
            vec![ConnId(0), ConnId(1), ConnId(2), ConnId(3)]
        );
        assert!(
            rr.take_actions().is_empty(),
            "nothing is closed for lack of workers"
        );
        rr.worker_joined(WorkerId(2)).unwrap();
        assert_eq!(rr.take_actions(), vec![handoff(2, &[0, 1])]);
    }

    #[test]
    fn a_draining_worker_gets_nothing_new_but_may_still_ack() {
        let mut rr = with_workers(2, 2);
        rr.incoming(ConnId(0));
        rr.incoming(ConnId(1));
        rr.worker_draining(WorkerId(2)).unwrap();
        rr.worker_draining(WorkerId(2)).unwrap();
        for conn in 2..5 {
            rr.incoming(ConnId(conn));
        }
        // One worker can take connections, so the bound is one window (two).
        assert_eq!(
            rr.take_actions(),
            vec![
                handoff(1, &[0]),
                handoff(2, &[1]),
                handoff(1, &[2]),
                Action::PauseAccept
            ]
        );
        assert_eq!(rr.pending_conns(), vec![ConnId(3), ConnId(4)]);
        assert_eq!(
            rr.acked(WorkerId(1), 2).unwrap(),
            vec![ConnId(0), ConnId(2)]
        );
        assert_eq!(
            rr.take_actions(),
            vec![handoff(1, &[3, 4]), Action::ResumeAccept]
        );
        assert_eq!(rr.acked(WorkerId(2), 1).unwrap(), vec![ConnId(1)]);
        assert!(rr.take_actions().is_empty());
        let status = rr.worker_status(WorkerId(2)).unwrap();
        assert!(status.draining);
        assert_eq!((status.in_flight, status.credit), (0, 0));
    }

    #[test]
    fn bad_acks_and_returns_are_errors_that_change_nothing() {
        let mut rr = with_workers(2, 1);
        rr.incoming(ConnId(7));
        let _ = rr.take_actions();
        assert_eq!(
            rr.acked(WorkerId(1), 2),
            Err(Error::AckExceedsInFlight {
                worker: WorkerId(1),
                acked: 2,
                in_flight: 1
            })
        );
        assert_eq!(
            rr.acked(WorkerId(9), 1),
            Err(Error::UnknownWorker {
                worker: WorkerId(9)
            })
        );
        assert_eq!(
            rr.returned(WorkerId(1), &[ConnId(7), ConnId(8)]),
            Err(Error::NotInFlight {
                worker: WorkerId(1),
                conn: ConnId(8)
            })
        );
        assert_eq!(
            rr.returned(WorkerId(1), &[ConnId(7), ConnId(7)]),
            Err(Error::NotInFlight {
                worker: WorkerId(1),
                conn: ConnId(7)
            })
        );
        assert_eq!(
            rr.worker_joined(WorkerId(1)),
            Err(Error::DuplicateWorker {
                worker: WorkerId(1)
            })
        );
        assert_eq!(rr.in_flight_conns(WorkerId(1)), Some(vec![ConnId(7)]));
        assert!(rr.take_actions().is_empty());
    }

    #[test]
    fn pauses_only_when_out_of_credit_and_the_queue_is_full() {
        // Two workers with window 1: the default bound is two pending connections.
        let mut rr = with_workers(1, 2);
        for conn in 0..4 {
            rr.incoming(ConnId(conn));
        }
        assert_eq!(
            rr.take_actions(),
            vec![handoff(1, &[0]), handoff(2, &[1]), Action::PauseAccept]
        );
        rr.acked(WorkerId(2), 1).unwrap();
        assert_eq!(
            rr.take_actions(),
            vec![handoff(2, &[2]), Action::ResumeAccept]
        );
    }

    #[test]
    fn a_zero_bound_pauses_before_any_worker_joins() {
        let config = Config::new(window(1)).with_pending_bound(PendingBound::Fixed(0));
        let mut rr = RoundRobin::with_config(config);
        assert_eq!(rr.take_actions(), vec![Action::PauseAccept]);
        rr.worker_joined(WorkerId(1)).unwrap();
        assert_eq!(rr.take_actions(), vec![Action::ResumeAccept]);
    }

    #[test]
    fn shutdown_closes_what_waits_and_what_comes_back() {
        let mut rr = with_workers(1, 1);
        for conn in 0..3 {
            rr.incoming(ConnId(conn));
        }
        let _ = rr.take_actions();
        rr.shutdown();
        rr.shutdown();
        rr.incoming(ConnId(3));
        rr.worker_left(WorkerId(1)).unwrap();
        assert_eq!(
            rr.take_actions(),
            vec![
                Action::Close(ConnId(1)),
                Action::Close(ConnId(2)),
                Action::Close(ConnId(3)),
                Action::Close(ConnId(0))
            ]
        );
        assert!(rr.is_shut_down());
    }

    #[test]
    fn delivered_connections_that_come_back_go_out_before_older_pending_ones() {
        // A bound no test step reaches, so that only handoffs come out.
        let config = Config::new(window(2)).with_pending_bound(PendingBound::Fixed(100));
        let mut rr = RoundRobin::with_config(config);
        rr.worker_joined(WorkerId(1)).unwrap();
        rr.worker_joined(WorkerId(2)).unwrap();
        for conn in 0..8 {
            rr.incoming(ConnId(conn));
        }
        let _ = rr.take_actions();
        assert_eq!(
            rr.acked(WorkerId(1), 2).unwrap(),
            vec![ConnId(0), ConnId(2)]
        );
        assert_eq!(rr.take_actions(), vec![handoff(1, &[4, 5])]);
        // Worker 1 closes its listener: `worker_left` puts 4 and 5 back, and 0 and 2, acked
        // but never passed to its application, come back under the fresh ids 10 and 12.
        // Those were accepted first, so they are first in line.
        rr.worker_left(WorkerId(1)).unwrap();
        rr.requeue_front(&[ConnId(10), ConnId(12)]);
        assert!(rr.take_actions().is_empty(), "nobody has credit");
        assert_eq!(
            rr.pending_conns(),
            [10, 12, 4, 5, 6, 7].map(ConnId).to_vec()
        );
        assert_eq!(
            rr.acked(WorkerId(2), 2).unwrap(),
            vec![ConnId(1), ConnId(3)]
        );
        assert_eq!(rr.take_actions(), vec![handoff(2, &[10, 12])]);
        rr.worker_joined(WorkerId(3)).unwrap();
        assert_eq!(rr.take_actions(), vec![handoff(3, &[4, 5])]);
        assert_eq!(rr.pending_conns(), vec![ConnId(6), ConnId(7)]);
    }

    #[test]
    fn delivered_connections_that_come_back_go_out_at_once_one_per_turn() {
        let mut rr = with_workers(2, 2);
        rr.requeue_front(&[ConnId(7), ConnId(8), ConnId(9)]);
        assert_eq!(
            rr.take_actions(),
            vec![handoff(1, &[7, 9]), handoff(2, &[8])]
        );
    }

    #[test]
    fn delivered_connections_that_come_back_after_shutdown_are_closed() {
        let mut rr = with_workers(1, 1);
        rr.incoming(ConnId(0));
        rr.incoming(ConnId(1));
        let _ = rr.take_actions();
        rr.shutdown();
        rr.requeue_front(&[ConnId(5), ConnId(6)]);
        assert_eq!(
            rr.take_actions(),
            vec![
                Action::Close(ConnId(1)),
                Action::Close(ConnId(5)),
                Action::Close(ConnId(6))
            ]
        );
        assert!(rr.pending_conns().is_empty());
    }

    #[test]
    fn works_as_a_trait_object() {
        let mut dispatchers: Vec<Box<dyn Dispatch>> = vec![
            Box::new(RoundRobin::new(window(1))),
            Box::new(crate::LeastConnections::new(window(1))),
        ];
        for dispatcher in &mut dispatchers {
            dispatcher.worker_joined(WorkerId(1)).unwrap();
            dispatcher.incoming(ConnId(1));
            assert_eq!(dispatcher.poll_action(), Some(handoff(1, &[1])));
            assert_eq!(dispatcher.poll_action(), None);
        }
    }
}
