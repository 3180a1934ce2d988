//! The listeners the supervisor opened, and the connections it holds for the round-robin ones
//! (by id: the fds are the shell's).

use core::net::SocketAddr;
use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroU32;
use std::time::Instant;

use cluster_ipc::proto::{ListenMode, ListenRefused};
use cluster_ipc::{ConnId, ListenerId, WorkerId};
use cluster_sched::{Action as Decision, Dispatch, LeastConnections, RoundRobin as InTurn};

use crate::config::Policy;

/// What makes two listen requests the same listener: the address asked for, plus the
/// worker's port-0 counter when the port is 0 (so that every worker's first `:0` shares one
/// port, as in Node, and one worker can still ask `:0` twice and get two).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ListenKey {
    pub(crate) addr: SocketAddr,
    pub(crate) port_zero_index: Option<u32>,
}

impl ListenKey {
    pub(crate) fn new(addr: SocketAddr, index: u32) -> ListenKey {
        ListenKey {
            addr,
            port_zero_index: (addr.port() == 0).then_some(index),
        }
    }
}

/// One listener.
#[derive(Debug)]
pub(crate) struct Listener {
    pub(crate) key: ListenKey,
    pub(crate) mode: ListenMode,
    /// The address bound; `None` while the bind's answer is awaited.
    pub(crate) local_addr: Option<SocketAddr>,
    /// Workers that were granted it and have not left it.
    pub(crate) members: BTreeSet<WorkerId>,
    /// Listen requests that wait for the bind: the worker, its request's seq, the mode.
    waiting: Vec<(WorkerId, u64, ListenMode)>,
    pub(crate) round_robin: Option<RoundRobin>,
}

/// The round-robin side of a listener: the policy, and every connection it holds.
pub(crate) struct RoundRobin {
    policy: Box<dyn Dispatch + Send>,
    /// Registered for accepting (as the supervisor last told the shell).
    pub(crate) accepting: bool,
    /// Accept is off until then after the process ran out of fds.
    pub(crate) fd_backoff_until: Option<Instant>,
}

impl std::fmt::Debug for RoundRobin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoundRobin")
            .field("pending", &self.policy.pending_len())
            .field("accepting", &self.accepting)
            .field("fd_backoff_until", &self.fd_backoff_until)
            .finish_non_exhaustive()
    }
}

/// What a policy decided, grouped: one batch per worker (in the order the policy chose), the
/// connections to close, and whether accepting should change.
#[derive(Debug, Default)]
pub(crate) struct Decided {
    pub(crate) handoffs: Vec<(WorkerId, Vec<ConnId>)>,
    pub(crate) close: Vec<ConnId>,
    pub(crate) accept: Option<bool>,
}

impl RoundRobin {
    pub(crate) fn new(policy: Policy, window: NonZeroU32) -> RoundRobin {
        let policy: Box<dyn Dispatch + Send> = match policy {
            Policy::RoundRobin => Box::new(InTurn::new(window)),
            Policy::LeastConnections => Box::new(LeastConnections::new(window)),
        };
        RoundRobin {
            policy,
            accepting: false,
            fd_backoff_until: None,
        }
    }

    pub(crate) fn incoming(&mut self, conn: ConnId) {
        self.policy.incoming(conn);
    }

    /// Connections a worker gave back: ahead of the others, in their order.
    pub(crate) fn requeue_front(&mut self, conns: &[ConnId]) {
        self.policy.requeue_front(conns);
    }

    pub(crate) fn worker_joined(&mut self, worker: WorkerId) -> Result<(), cluster_sched::Error> {
        self.policy.worker_joined(worker)
    }

    pub(crate) fn drain(&mut self, worker: WorkerId) {
        if self.policy.workers().contains(&worker) {
            let _ = self.policy.worker_draining(worker);
        }
    }

    pub(crate) fn worker_left(&mut self, worker: WorkerId) -> Result<(), cluster_sched::Error> {
        self.policy.worker_left(worker)
    }

    pub(crate) fn acked(
        &mut self,
        worker: WorkerId,
        count: usize,
    ) -> Result<Vec<ConnId>, cluster_sched::Error> {
        self.policy.acked(worker, count)
    }

    pub(crate) fn load_report(
        &mut self,
        worker: WorkerId,
        open: u32,
    ) -> Result<(), cluster_sched::Error> {
        self.policy.load_report(worker, open)
    }

    pub(crate) fn shutdown(&mut self) {
        self.policy.shutdown();
    }

    pub(crate) fn is_accept_paused(&self) -> bool {
        self.policy.is_accept_paused()
    }

    pub(crate) fn in_flight(&self, worker: WorkerId) -> Option<usize> {
        self.policy.in_flight(worker)
    }

    #[cfg(test)]
    pub(crate) fn in_flight_conns(&self, worker: WorkerId) -> Vec<ConnId> {
        self.policy.in_flight_conns(worker).unwrap_or_default()
    }

    #[cfg(test)]
    pub(crate) fn pending_conns(&self) -> Vec<ConnId> {
        self.policy.pending_conns()
    }

    pub(crate) fn pending_len(&self) -> usize {
        self.policy.pending_len()
    }

    /// Drains the policy's decisions.
    pub(crate) fn take_actions(&mut self) -> Decided {
        let mut decided = Decided::default();
        while let Some(action) = self.policy.poll_action() {
            match action {
                Decision::Handoff { worker, conns } => {
                    match decided.handoffs.iter_mut().find(|(w, _)| *w == worker) {
                        Some((_, batch)) => batch.extend(conns),
                        None => decided.handoffs.push((worker, conns)),
                    }
                }
                Decision::Close(conn) => decided.close.push(conn),
                Decision::PauseAccept => decided.accept = Some(false),
                Decision::ResumeAccept => decided.accept = Some(true),
            }
        }
        decided
    }
}

/// Every listener, by id and by key.
#[derive(Debug, Default)]
pub(crate) struct Listeners {
    by_id: BTreeMap<ListenerId, Listener>,
    by_key: BTreeMap<ListenKey, ListenerId>,
    next: u64,
}

impl Listeners {
    pub(crate) fn open(
        &mut self,
        key: ListenKey,
        mode: ListenMode,
        round_robin: Option<RoundRobin>,
    ) -> ListenerId {
        self.next += 1;
        let id = ListenerId(self.next);
        self.by_id.insert(
            id,
            Listener {
                key,
                mode,
                local_addr: None,
                members: BTreeSet::new(),
                waiting: Vec::new(),
                round_robin,
            },
        );
        self.by_key.insert(key, id);
        id
    }

    pub(crate) fn by_key(&self, key: ListenKey) -> Option<ListenerId> {
        self.by_key.get(&key).copied()
    }

    pub(crate) fn is_bound(&self, id: ListenerId) -> bool {
        self.by_id.get(&id).is_some_and(|l| l.local_addr.is_some())
    }

    pub(crate) fn wait_for_bind(
        &mut self,
        id: ListenerId,
        worker: WorkerId,
        ack: u64,
        mode: ListenMode,
    ) {
        if let Some(listener) = self.by_id.get_mut(&id) {
            listener.waiting.push((worker, ack, mode));
        }
    }

    /// Records a bind's answer and gives back the requests that waited for it. A failed bind
    /// forgets the listener: a later request tries again.
    pub(crate) fn bound(
        &mut self,
        id: ListenerId,
        result: Result<SocketAddr, ListenRefused>,
    ) -> Vec<(WorkerId, u64, ListenMode)> {
        let Some(listener) = self.by_id.get_mut(&id) else {
            return Vec::new();
        };
        let waiting = std::mem::take(&mut listener.waiting);
        match result {
            Ok(addr) => {
                tracing::info!(listener = id.0, %addr, mode = ?listener.mode, "listening");
                listener.local_addr = Some(addr);
            }
            Err(_) => {
                let key = listener.key;
                self.by_id.remove(&id);
                self.by_key.remove(&key);
            }
        }
        waiting
    }

    pub(crate) fn get(&self, id: ListenerId) -> Option<&Listener> {
        self.by_id.get(&id)
    }

    pub(crate) fn round_robin(&mut self, id: ListenerId) -> Option<&mut RoundRobin> {
        self.by_id.get_mut(&id)?.round_robin.as_mut()
    }

    pub(crate) fn join(&mut self, id: ListenerId, worker: WorkerId) {
        if let Some(listener) = self.by_id.get_mut(&id) {
            listener.members.insert(worker);
        }
    }

    pub(crate) fn leave(&mut self, id: ListenerId, worker: WorkerId) {
        if let Some(listener) = self.by_id.get_mut(&id) {
            listener.members.remove(&worker);
        }
    }

    pub(crate) fn ids(&self) -> Vec<ListenerId> {
        self.by_id.keys().copied().collect()
    }

    /// The addresses bound.
    pub(crate) fn addrs(&self) -> Vec<SocketAddr> {
        self.by_id.values().filter_map(|l| l.local_addr).collect()
    }

    /// Connections accepted and not yet handed to a worker.
    pub(crate) fn pending(&self) -> usize {
        self.by_id
            .values()
            .filter_map(|l| l.round_robin.as_ref())
            .map(RoundRobin::pending_len)
            .sum()
    }

    /// Connections handed to `worker` and not yet acknowledged.
    pub(crate) fn in_flight(&self, worker: WorkerId) -> usize {
        self.by_id
            .values()
            .filter_map(|l| l.round_robin.as_ref())
            .filter_map(|rr| rr.in_flight(worker))
            .sum()
    }

    /// When each paused listener may accept again.
    pub(crate) fn fd_backoffs(&self) -> impl Iterator<Item = Option<Instant>> + '_ {
        self.by_id
            .values()
            .filter_map(|l| l.round_robin.as_ref())
            .map(|rr| rr.fd_backoff_until)
    }

    /// Ends the fd backoffs that are over; returns their listeners.
    pub(crate) fn fd_backoff_over(&mut self, now: Instant) -> Vec<ListenerId> {
        let mut over = Vec::new();
        for (&id, listener) in &mut self.by_id {
            if let Some(rr) = listener.round_robin.as_mut() {
                if rr.fd_backoff_until.is_some_and(|at| at <= now) {
                    rr.fd_backoff_until = None;
                    over.push(id);
                }
            }
        }
        over
    }

    /// Every listener, for the tests' invariant checks.
    #[cfg(test)]
    pub(crate) fn all(&self) -> impl Iterator<Item = (ListenerId, &Listener)> {
        self.by_id.iter().map(|(&id, listener)| (id, listener))
    }
}
