//! Least-connections dispatch: the worker with the lightest load takes the next connection.

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroU32;

use crate::credit::{Core, Selector, dispatch_via_core};
use crate::{Config, WorkerId};

/// Least-connections dispatch with the same credit window as [`RoundRobin`](crate::RoundRobin).
///
/// Each connection goes to the worker with credit that has the fewest connections, counting
/// what it last reported open ([`Dispatch::load_report`](crate::Dispatch::load_report)), what
/// it acked since that report (open at the worker but not yet in any report) and what it has
/// in flight. Among workers with the same count the turn goes round: the one that waited
/// longest (since joining, since its last turn, or since it got credit back) goes first. The
/// window, return, drain, leave, back-pressure and shutdown rules are those of `RoundRobin`.
///
/// Choosing a worker is O(log n): the workers with credit sit in an ordered set keyed by
/// (load, turn order).
#[derive(Debug)]
pub struct LeastConnections {
    core: Core<LoadOrder>,
}

impl LeastConnections {
    /// A least-connections dispatcher with this window and the default pending bound.
    #[must_use]
    pub fn new(window: NonZeroU32) -> Self {
        Self::with_config(Config::new(window))
    }

    /// A least-connections dispatcher with this configuration.
    #[must_use]
    pub fn with_config(config: Config) -> Self {
        Self {
            core: Core::new(config, LoadOrder::default()),
        }
    }
}

dispatch_via_core!(LeastConnections);

/// Where a waiting worker sorts: lightest load first, then longest wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Place {
    load: u64,
    /// Taken from a counter each time the worker (re)starts waiting, so ties go round.
    turn: u64,
}

/// The workers with credit, ordered by [`Place`].
#[derive(Debug, Default)]
pub(crate) struct LoadOrder {
    order: BTreeSet<(Place, WorkerId)>,
    places: BTreeMap<WorkerId, Place>,
    next_turn: u64,
}

impl Selector for LoadOrder {
    fn push(&mut self, worker: WorkerId, load: u64) {
        let place = Place {
            load,
            turn: self.next_turn,
        };
        self.next_turn += 1;
        if let Some(old) = self.places.insert(worker, place) {
            // The core never pushes a worker that is already waiting; keep one place anyway.
            self.order.remove(&(old, worker));
        }
        self.order.insert((place, worker));
    }

    fn pop(&mut self) -> Option<WorkerId> {
        let (_, worker) = self.order.pop_first()?;
        self.places.remove(&worker);
        Some(worker)
    }

    fn remove(&mut self, worker: WorkerId) {
        if let Some(place) = self.places.remove(&worker) {
            self.order.remove(&(place, worker));
        }
    }

    fn reload(&mut self, worker: WorkerId, load: u64) {
        let Some(place) = self.places.get_mut(&worker) else {
            return;
        };
        self.order.remove(&(*place, worker));
        place.load = load;
        self.order.insert((*place, worker));
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Action, ConnId, Dispatch};

    fn handoff(worker: u64, conns: &[u64]) -> Action {
        Action::Handoff {
            worker: WorkerId(worker),
            conns: conns.iter().copied().map(ConnId).collect(),
        }
    }

    fn with_workers(window: u32, workers: u64) -> LeastConnections {
        let mut lc = LeastConnections::new(NonZeroU32::new(window).unwrap());
        for id in 1..=workers {
            lc.worker_joined(WorkerId(id)).unwrap();
        }
        lc
    }

    #[test]
    fn picks_the_worker_with_the_fewest_open_connections() {
        let mut lc = with_workers(4, 3);
        lc.load_report(WorkerId(1), 5).unwrap();
        lc.load_report(WorkerId(2), 1).unwrap();
        lc.load_report(WorkerId(3), 3).unwrap();
        for conn in 0..4 {
            lc.incoming(ConnId(conn));
        }
        // Loads 5/1/3: worker 2 takes turns until it reaches 3, then ties go round (3 waited
        // longer than 2, which just had a turn).
        assert_eq!(
            lc.take_actions(),
            vec![
                handoff(2, &[0]),
                handoff(2, &[1]),
                handoff(3, &[2]),
                handoff(2, &[3])
            ]
        );
    }

    #[test]
    fn ties_go_round_robin() {
        let mut lc = with_workers(1, 3);
        let mut order = Vec::new();
        for conn in 0..6 {
            lc.incoming(ConnId(conn));
            if let Some(Action::Handoff { worker, conns }) = lc.poll_action() {
                order.push(worker.0);
                lc.acked(worker, conns.len()).unwrap();
                // Each worker closes the connection at once, so loads stay equal.
                lc.load_report(worker, 0).unwrap();
            }
        }
        assert_eq!(order, vec![1, 2, 3, 1, 2, 3]);
    }

    #[test]
    fn acked_connections_count_as_open_until_the_next_report() {
        let mut lc = with_workers(1, 2);
        lc.incoming(ConnId(0));
        lc.acked(WorkerId(1), 1).unwrap();
        lc.incoming(ConnId(1));
        lc.incoming(ConnId(2));
        lc.acked(WorkerId(2), 1).unwrap();
        lc.incoming(ConnId(3));
        // Worker 1 had one open (acked, unreported), worker 2 too after its ack; then worker 1
        // holds conn 2 in flight, so conn 3 goes to worker 2.
        assert_eq!(
            lc.take_actions(),
            vec![
                handoff(1, &[0]),
                handoff(2, &[1]),
                handoff(1, &[2]),
                handoff(2, &[3])
            ]
        );
    }

    #[test]
    fn a_return_lowers_the_load_of_a_waiting_worker() {
        let mut lc = with_workers(3, 2);
        for conn in 0..2 {
            lc.incoming(ConnId(conn));
        }
        lc.load_report(WorkerId(2), 1).unwrap();
        let _ = lc.take_actions();
        // Worker 1: load 1 (conn 0 in flight). Worker 2: load 2 (conn 1 + one open).
        lc.returned(WorkerId(2), &[ConnId(1)]).unwrap();
        // Conn 1 goes back out: loads 1 and 1, and worker 1 has waited longer.
        assert_eq!(lc.take_actions(), vec![handoff(1, &[1])]);
    }
}
