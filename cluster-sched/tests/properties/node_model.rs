//! Node's `RoundRobinHandle`, written naively from its algorithm (lib/internal/cluster/
//! round_robin_handle.js), and the proof that `RoundRobin` with `window = 1` hands out the
//! same connections to the same workers in the same order.
//!
//! The comparison covers what Node does well: workers joining, connections arriving, acks,
//! and idle workers leaving. It leaves out what Node gets wrong on purpose (a worker leaving
//! with a connection in flight: Node leaks it, we re-dispatch it) and what Node lacks
//! (draining, pending bound, delivered connections that come back through `requeue_front`).

use std::collections::{BTreeSet, VecDeque};
use std::num::NonZeroU32;

use cluster_sched::{Action, ConnId, Dispatch, RoundRobin, WorkerId};
use proptest::prelude::*;

/// Node's state: `all` workers, the `free` FIFO of idle ones, the `handles` FIFO of pending
/// connections, and the one connection each busy worker has not answered yet.
#[derive(Debug, Default)]
struct NodeRoundRobinHandle {
    all: BTreeSet<WorkerId>,
    free: VecDeque<WorkerId>,
    handles: VecDeque<ConnId>,
    busy: Vec<Sent>,
    sent: Vec<Sent>,
}

impl NodeRoundRobinHandle {
    /// `add(worker)`: once listening, `handoff(worker)` "in case there are connections pending".
    fn add(&mut self, worker: WorkerId) {
        self.all.insert(worker);
        self.handoff(worker);
    }

    /// `remove(worker)`: forget it. (When the last worker leaves, Node also closes the
    /// listener, so clients are refused until a worker listens again and a fresh handle
    /// starts; this model keeps the handle, as our primary keeps its listener. An idle worker
    /// means nothing was waiting, so no queued connection is affected.)
    fn remove(&mut self, worker: WorkerId) {
        self.all.remove(&worker);
        self.free.retain(|&w| w != worker);
    }

    /// `distribute(err, handle)`: queue it, then hand off to the first free worker if any.
    fn distribute(&mut self, conn: ConnId) {
        self.handles.push_back(conn);
        if let Some(worker) = self.free.pop_front() {
            self.handoff(worker);
        }
    }

    /// `handoff(worker)`: send the first pending connection, or go back to the free FIFO.
    fn handoff(&mut self, worker: WorkerId) {
        if !self.all.contains(&worker) {
            return;
        }
        match self.handles.pop_front() {
            None => self.free.push_back(worker),
            Some(conn) => {
                self.busy.push((worker, conn));
                self.sent.push((worker, conn));
            }
        }
    }

    /// The worker's reply `accepted: true`: close the copy, then `handoff(worker)` again.
    fn accepted(&mut self, worker: WorkerId) {
        self.busy.retain(|&(w, _)| w != worker);
        self.handoff(worker);
    }

    fn is_busy(&self, worker: WorkerId) -> bool {
        self.busy.iter().any(|&(w, _)| w == worker)
    }
}

#[derive(Debug, Clone)]
enum NodeOp {
    Join,
    Incoming,
    Ack(u8),
    LeaveIdle(u8),
}

fn node_op() -> impl Strategy<Value = NodeOp> {
    prop_oneof![
        2 => Just(NodeOp::Join),
        6 => Just(NodeOp::Incoming),
        6 => any::<u8>().prop_map(NodeOp::Ack),
        1 => any::<u8>().prop_map(NodeOp::LeaveIdle),
    ]
}

fn handoffs(actions: Vec<Action>) -> impl Iterator<Item = Sent> {
    actions.into_iter().flat_map(|action| match action {
        Action::Handoff { worker, conns } => conns.into_iter().map(|c| (worker, c)).collect(),
        _ => Vec::new(),
    })
}

/// One connection handed to one worker.
type Sent = (WorkerId, ConnId);

/// Runs the same events through Node's model and `RoundRobin` (window 1) and returns the two
/// handoff sequences.
fn both_sequences(ops: &[NodeOp]) -> (Vec<Sent>, Vec<Sent>) {
    let mut node = NodeRoundRobinHandle::default();
    let mut ours = RoundRobin::new(NonZeroU32::MIN);
    let mut ours_sent = Vec::new();
    let mut next_worker = 1;
    let mut next_conn = 1;
    for op in ops {
        let workers: Vec<WorkerId> = node.all.iter().copied().collect();
        let pick = |i: u8| (!workers.is_empty()).then(|| workers[i as usize % workers.len()]);
        match *op {
            NodeOp::Join => {
                let worker = WorkerId(next_worker);
                next_worker += 1;
                node.add(worker);
                ours.worker_joined(worker).unwrap();
            }
            NodeOp::Incoming => {
                let conn = ConnId(next_conn);
                next_conn += 1;
                node.distribute(conn);
                ours.incoming(conn);
            }
            NodeOp::Ack(i) => {
                let Some(worker) = pick(i).filter(|w| node.is_busy(*w)) else {
                    continue;
                };
                node.accepted(worker);
                ours.acked(worker, 1).unwrap();
            }
            NodeOp::LeaveIdle(i) => {
                let Some(worker) = pick(i).filter(|w| !node.is_busy(*w)) else {
                    continue;
                };
                node.remove(worker);
                ours.worker_left(worker).unwrap();
            }
        }
        ours_sent.extend(handoffs(ours.take_actions()));
    }
    (node.sent, ours_sent)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn window_one_hands_out_exactly_what_node_does(
        ops in prop::collection::vec(node_op(), 1..200),
    ) {
        let (node, ours) = both_sequences(&ops);
        prop_assert_eq!(node, ours);
    }
}

#[test]
fn the_comparison_can_tell_a_different_order() {
    // Guard against a vacuous comparison: Node's order is "oldest idle worker first", so
    // after worker 1 acks, worker 2 (idle for longer) must take the next connection.
    let ops = [
        NodeOp::Join,
        NodeOp::Join,
        NodeOp::Incoming,
        NodeOp::Ack(0),
        NodeOp::Incoming,
    ];
    let (node, ours) = both_sequences(&ops);
    let expected = vec![(WorkerId(1), ConnId(1)), (WorkerId(2), ConnId(2))];
    assert_eq!(node, expected);
    assert_eq!(ours, expected);
}
