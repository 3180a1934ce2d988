//! Least-connections dispatch: the worker with the lightest load takes the next connection.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::num::NonZeroU32;

use crate::Config;
use crate::credit::{Core, Selector, WorkerKey, dispatch_via_core};

/// Least-connections dispatch with the same credit window as [`RoundRobin`](crate::RoundRobin).
///
/// Each connection goes to the worker with credit that has the fewest connections, counting
/// what it last reported open ([`Dispatch::load_report`](crate::Dispatch::load_report)), what
/// it acked since that report (open at the worker but not yet in any report) and what it has
/// in flight. Among workers with the same count the turn goes round: the one that waited
/// longest (since joining, since its last turn, or since it got credit back) goes first. The
/// window, return, drain, leave, back-pressure and shutdown rules are those of `RoundRobin`.
///
/// Because it picks by load, the order of acks does not move it: with acks in rounds between
/// bursts of connections (and no load reports), delivered counts differ by at most one, plus
/// the returns, plus a window for every round in which a backlog ran out, which no policy
/// can avoid. See the crate docs.
///
/// Choosing a worker is O(log n): the workers with credit sit in a binary heap keyed by
/// (load, turn order). Inputs that name a worker pay one O(log n) lookup of its id, and a
/// load report one heap insertion.
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

impl Place {
    /// The place as one number that sorts the same way.
    fn rank(self) -> u128 {
        (u128::from(self.load) << 64) | u128::from(self.turn)
    }
}

/// A heap entry. It orders by rank alone, reversed so the heap yields the lowest first: one
/// comparison of one number, without the branches of a tuple comparison, which matters
/// because the heap compares on every level of every turn. Ranks are unique per worker (each
/// turn number is given out once), so ordering by rank alone is consistent with equality.
#[derive(Debug, Clone, Copy)]
struct Entry {
    rank: u128,
    key: WorkerKey,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.rank == other.rank
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        other.rank.cmp(&self.rank)
    }
}

/// The workers with credit, ordered by [`Place`].
///
/// A binary heap with lazy deletion: a worker's current place is kept by key, and a heap
/// entry that no longer matches it (the worker left the queue, or its load changed and a new
/// entry was pushed) is stale and skipped when it surfaces. That is cheaper per turn than an
/// ordered set, which matters because a turn is taken per connection.
#[derive(Debug, Default)]
pub(crate) struct LoadOrder {
    heap: BinaryHeap<Entry>,
    /// Each waiting worker's current place, by key; `None` for a worker not waiting.
    places: Vec<Option<Place>>,
    waiting: usize,
    next_turn: u64,
}

/// Stale entries are swept out once they outnumber live ones by this much, so the heap stays
/// within a constant factor of the number of waiting workers.
const STALE_SLACK: usize = 64;

impl LoadOrder {
    fn place_mut(&mut self, key: WorkerKey) -> &mut Option<Place> {
        if self.places.len() <= key {
            self.places.resize(key + 1, None);
        }
        &mut self.places[key]
    }

    fn is_current(places: &[Option<Place>], entry: Entry) -> bool {
        places.get(entry.key).copied().flatten().map(Place::rank) == Some(entry.rank)
    }

    fn enqueue(&mut self, place: Place, key: WorkerKey) {
        if self.place_mut(key).replace(place).is_none() {
            self.waiting += 1;
        }
        self.heap.push(Entry {
            rank: place.rank(),
            key,
        });
        self.sweep_if_stale();
    }

    fn sweep_if_stale(&mut self) {
        if self.heap.len() > 2 * self.waiting + STALE_SLACK {
            let places = &self.places;
            self.heap.retain(|entry| Self::is_current(places, *entry));
        }
    }
}

impl Selector for LoadOrder {
    fn push(&mut self, key: WorkerKey, load: u64) {
        let place = Place {
            load,
            turn: self.next_turn,
        };
        // A u64 of turns outlasts any process: 584 years at a billion turns a second.
        self.next_turn += 1;
        self.enqueue(place, key);
    }

    fn pop(&mut self) -> Option<WorkerKey> {
        while let Some(entry) = self.heap.pop() {
            if Self::is_current(&self.places, entry) {
                *self.place_mut(entry.key) = None;
                self.waiting -= 1;
                return Some(entry.key);
            }
        }
        None
    }

    fn remove(&mut self, key: WorkerKey) {
        if self.place_mut(key).take().is_some() {
            self.waiting -= 1;
            self.sweep_if_stale();
        }
    }

    fn reload(&mut self, key: WorkerKey, load: u64) {
        let Some(place) = *self.place_mut(key) else {
            return;
        };
        if place.load != load {
            // Same turn, new load: the worker keeps its place among equals.
            self.enqueue(Place { load, ..place }, key);
        }
    }

    fn is_empty(&self) -> bool {
        self.waiting == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Action, ConnId, Dispatch, WorkerId};

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

    #[test]
    fn stale_heap_entries_are_swept_and_never_chosen() {
        let mut order = LoadOrder::default();
        for key in 0..3 {
            order.push(key, 10);
        }
        // Many load changes without a turn leave stale entries behind.
        for round in 0..1_000u64 {
            for key in 0..3 {
                order.reload(key, 10 + (round + key as u64) % 7);
            }
        }
        assert!(
            order.heap.len() <= 2 * 3 + STALE_SLACK + 1,
            "{}",
            order.heap.len()
        );
        order.remove(1);
        order.reload(0, 5);
        order.reload(2, 5);
        // Equal loads: key 0 was queued first, so it goes first; key 1 is gone.
        assert_eq!(order.pop(), Some(0));
        assert_eq!(order.pop(), Some(2));
        assert_eq!(order.pop(), None);
        assert!(order.is_empty());
    }
}
