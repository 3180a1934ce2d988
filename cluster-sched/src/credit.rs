//! What every credit-window policy shares: the workers' windows, the pending queue, batching,
//! back-pressure and shutdown. A policy only says whose turn it is (a [`Selector`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::{Action, Config, ConnId, Error, PendingBound, WorkerId, WorkerStatus};

/// A live worker's dense index into the roster, reused after it leaves.
///
/// Selectors and the dispatch loop work with keys, so a turn costs no map lookup: only an
/// input that names a worker by [`WorkerId`] pays for one.
pub(crate) type WorkerKey = usize;

/// Chooses whose turn it is among the workers that can take a connection.
///
/// The core keeps the selector holding exactly the workers that are not draining and have
/// credit, each once: it adds a worker when it gains credit (joining, or an ack or return
/// after it ran out), takes it out for a turn, and puts it back after the turn if it still
/// has credit. Which key a worker has must not matter to the order: keys are reused.
pub(crate) trait Selector {
    /// Adds a worker that can take a connection, behind those already waiting among equals.
    fn push(&mut self, key: WorkerKey, load: u64);

    /// Takes out the worker whose turn it is.
    fn pop(&mut self) -> Option<WorkerKey>;

    /// Takes out a worker that can no longer take connections (draining or gone).
    fn remove(&mut self, key: WorkerKey);

    /// A waiting worker's load changed; it keeps its place among equals.
    fn reload(&mut self, key: WorkerKey, load: u64);

    /// Whether no worker can take a connection.
    fn is_empty(&self) -> bool;
}

/// One live worker as the core sees it.
#[derive(Debug)]
struct WorkerEntry {
    id: WorkerId,
    /// Handed and not yet acked or returned, oldest first.
    in_flight: VecDeque<ConnId>,
    draining: bool,
    reported_open: u32,
    /// Connections acked since the last load report: open at the worker, but not yet in any
    /// report it sent, so counting them keeps least-connections from piling onto a worker
    /// between reports.
    delivered_since_report: u64,
    /// This worker's batch in the step being dispatched, so a step sends one batch per worker.
    batch: Option<usize>,
}

impl WorkerEntry {
    fn new(id: WorkerId) -> Self {
        Self {
            id,
            in_flight: VecDeque::new(),
            draining: false,
            reported_open: 0,
            delivered_since_report: 0,
            batch: None,
        }
    }

    fn can_take(&self, window: usize) -> bool {
        !self.draining && self.in_flight.len() < window
    }

    fn load(&self) -> u64 {
        let in_flight = u64::try_from(self.in_flight.len()).unwrap_or(u64::MAX);
        u64::from(self.reported_open)
            .saturating_add(self.delivered_since_report)
            .saturating_add(in_flight)
    }
}

/// The live workers: ids to keys, and entries by key.
#[derive(Debug, Default)]
struct Roster {
    keys: BTreeMap<WorkerId, WorkerKey>,
    entries: Vec<Option<WorkerEntry>>,
    free_keys: Vec<WorkerKey>,
}

impl Roster {
    fn key(&self, worker: WorkerId) -> Result<WorkerKey, Error> {
        self.keys
            .get(&worker)
            .copied()
            .ok_or(Error::UnknownWorker { worker })
    }

    fn get(&self, key: WorkerKey) -> Option<&WorkerEntry> {
        self.entries.get(key).and_then(Option::as_ref)
    }

    fn get_mut(&mut self, key: WorkerKey) -> Option<&mut WorkerEntry> {
        self.entries.get_mut(key).and_then(Option::as_mut)
    }

    /// Looks a worker up by id, for inputs that name one.
    fn find_mut(&mut self, worker: WorkerId) -> Result<(WorkerKey, &mut WorkerEntry), Error> {
        let key = self.key(worker)?;
        let entry = self.get_mut(key).ok_or(Error::UnknownWorker { worker })?;
        Ok((key, entry))
    }

    fn insert(&mut self, worker: WorkerId) -> Result<WorkerKey, Error> {
        if self.keys.contains_key(&worker) {
            return Err(Error::DuplicateWorker { worker });
        }
        let entry = Some(WorkerEntry::new(worker));
        let key = match self.free_keys.pop() {
            Some(key) => {
                if let Some(slot) = self.entries.get_mut(key) {
                    *slot = entry;
                }
                key
            }
            None => {
                self.entries.push(entry);
                self.entries.len() - 1
            }
        };
        self.keys.insert(worker, key);
        Ok(key)
    }

    fn remove(&mut self, worker: WorkerId) -> Result<(WorkerKey, WorkerEntry), Error> {
        let key = self.key(worker)?;
        let entry = self
            .entries
            .get_mut(key)
            .and_then(Option::take)
            .ok_or(Error::UnknownWorker { worker })?;
        self.keys.remove(&worker);
        self.free_keys.push(key);
        Ok((key, entry))
    }

    fn by_id(&self, worker: WorkerId) -> Option<&WorkerEntry> {
        self.key(worker).ok().and_then(|key| self.get(key))
    }

    fn ids(&self) -> impl Iterator<Item = WorkerId> + '_ {
        self.keys.keys().copied()
    }

    fn len(&self) -> usize {
        self.keys.len()
    }
}

/// The shared state machine, generic over whose turn it is.
#[derive(Debug)]
pub(crate) struct Core<S> {
    config: Config,
    workers: Roster,
    /// Live workers that are not draining, for the default pending bound.
    active_workers: usize,
    selector: S,
    pending: VecDeque<ConnId>,
    actions: VecDeque<Action>,
    accept_paused: bool,
    shut_down: bool,
    /// The batches of the step being dispatched, in the order each worker first got a turn.
    step_batches: Vec<(WorkerKey, Vec<ConnId>)>,
}

impl<S: Selector> Core<S> {
    pub(crate) fn new(config: Config, selector: S) -> Self {
        let mut core = Self {
            config,
            workers: Roster::default(),
            active_workers: 0,
            selector,
            pending: VecDeque::new(),
            actions: VecDeque::new(),
            accept_paused: false,
            shut_down: false,
            step_batches: Vec::new(),
        };
        // `PendingBound::Fixed(0)` means "paused whenever no worker has credit", which is
        // already true before the first worker joins.
        core.update_accept();
        core
    }

    fn window(&self) -> usize {
        usize::try_from(self.config.window.get()).unwrap_or(usize::MAX)
    }

    pub(crate) fn worker_joined(&mut self, worker: WorkerId) -> Result<(), Error> {
        let key = self.workers.insert(worker)?;
        tracing::trace!(worker = worker.0, "worker joined");
        self.active_workers += 1;
        self.selector.push(key, 0);
        self.finish_step();
        Ok(())
    }

    pub(crate) fn worker_draining(&mut self, worker: WorkerId) -> Result<(), Error> {
        let window = self.window();
        let (key, entry) = self.workers.find_mut(worker)?;
        if entry.draining {
            tracing::trace!(worker = worker.0, "worker already draining");
            return Ok(());
        }
        tracing::trace!(worker = worker.0, "worker draining");
        if entry.can_take(window) {
            self.selector.remove(key);
        }
        entry.draining = true;
        self.active_workers = self.active_workers.saturating_sub(1);
        self.finish_step();
        Ok(())
    }

    pub(crate) fn worker_left(&mut self, worker: WorkerId) -> Result<(), Error> {
        let window = self.window();
        let (key, entry) = self.workers.remove(worker)?;
        tracing::trace!(
            worker = worker.0,
            in_flight = entry.in_flight.len(),
            "worker left"
        );
        if !entry.draining {
            self.active_workers = self.active_workers.saturating_sub(1);
            if entry.can_take(window) {
                self.selector.remove(key);
            }
        }
        self.requeue_front(entry.in_flight);
        self.finish_step();
        Ok(())
    }

    pub(crate) fn incoming(&mut self, conn: ConnId) {
        if self.shut_down {
            self.actions.push_back(Action::Close(conn));
            return;
        }
        self.pending.push_back(conn);
        self.finish_step();
    }

    pub(crate) fn requeue_delivered(&mut self, conns: &[ConnId]) {
        tracing::trace!(requeued = conns.len(), "delivered connections came back");
        self.requeue_front(conns.iter().copied().collect());
        self.finish_step();
    }

    pub(crate) fn acked(&mut self, worker: WorkerId, count: usize) -> Result<Vec<ConnId>, Error> {
        let window = self.window();
        let (key, entry) = self.workers.find_mut(worker)?;
        let in_flight = entry.in_flight.len();
        if count > in_flight {
            return Err(Error::AckExceedsInFlight {
                worker,
                acked: count,
                in_flight,
            });
        }
        let could_take = entry.can_take(window);
        let delivered: Vec<ConnId> = entry.in_flight.drain(..count).collect();
        let delivered_len = u64::try_from(count).unwrap_or(u64::MAX);
        entry.delivered_since_report = entry.delivered_since_report.saturating_add(delivered_len);
        // An ack moves connections from "in flight" to "open at the worker", so the load of a
        // worker already waiting for a turn is unchanged; only one that was out of credit
        // needs to rejoin, at the back.
        if !could_take && entry.can_take(window) {
            self.selector.push(key, entry.load());
        }
        self.finish_step();
        Ok(delivered)
    }

    pub(crate) fn returned(&mut self, worker: WorkerId, conns: &[ConnId]) -> Result<(), Error> {
        let window = self.window();
        let (key, entry) = self.workers.find_mut(worker)?;
        let could_take = entry.can_take(window);
        let back = take_in_flight(worker, &mut entry.in_flight, conns)?;
        tracing::trace!(
            worker = worker.0,
            returned = back.len(),
            "connections returned"
        );
        // A worker still waiting for a turn keeps its place (with its lower load); one that
        // was out of credit rejoins at the back, as after an ack.
        if could_take {
            self.selector.reload(key, entry.load());
        } else if entry.can_take(window) {
            self.selector.push(key, entry.load());
        }
        self.requeue_front(back);
        self.finish_step();
        Ok(())
    }

    pub(crate) fn load_report(&mut self, worker: WorkerId, open: u32) -> Result<(), Error> {
        let window = self.window();
        let (key, entry) = self.workers.find_mut(worker)?;
        entry.reported_open = open;
        entry.delivered_since_report = 0;
        if entry.can_take(window) {
            self.selector.reload(key, entry.load());
        }
        // Nothing pending can be waiting while this worker has credit, so there is nothing to
        // dispatch and the accept state cannot change.
        Ok(())
    }

    pub(crate) fn shutdown(&mut self) {
        if self.shut_down {
            return;
        }
        tracing::trace!(pending = self.pending.len(), "shutdown");
        self.shut_down = true;
        self.actions
            .extend(self.pending.drain(..).map(Action::Close));
    }

    pub(crate) fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Puts connections taken back from a worker in front of the queue, keeping their order,
    /// or closes them if the listener is closing.
    fn requeue_front(&mut self, conns: VecDeque<ConnId>) {
        if self.shut_down {
            self.actions.extend(conns.into_iter().map(Action::Close));
            return;
        }
        for conn in conns.into_iter().rev() {
            self.pending.push_front(conn);
        }
    }

    fn finish_step(&mut self) {
        self.dispatch_pending();
        self.update_accept();
    }

    /// Hands out pending connections, oldest first, one per turn, while some worker can take
    /// one; then emits one batch per worker that got any.
    fn dispatch_pending(&mut self) {
        let window = self.window();
        while !self.pending.is_empty() {
            let Some(key) = self.selector.pop() else {
                break;
            };
            let Some(entry) = self.workers.get_mut(key) else {
                // The selector only ever holds live workers; skipping beats trusting a bug.
                tracing::trace!(key, "selector held a worker that is gone");
                continue;
            };
            let Some(conn) = self.pending.pop_front() else {
                break;
            };
            entry.in_flight.push_back(conn);
            let batch = *entry.batch.get_or_insert_with(|| {
                self.step_batches.push((key, Vec::new()));
                self.step_batches.len() - 1
            });
            if let Some((_, conns)) = self.step_batches.get_mut(batch) {
                conns.push(conn);
            }
            if entry.can_take(window) {
                self.selector.push(key, entry.load());
            }
        }
        self.emit_batches();
    }

    fn emit_batches(&mut self) {
        for (key, conns) in self.step_batches.drain(..) {
            let Some(entry) = self.workers.get_mut(key) else {
                continue;
            };
            entry.batch = None;
            tracing::trace!(worker = entry.id.0, conns = conns.len(), "handoff");
            self.actions.push_back(Action::Handoff {
                worker: entry.id,
                conns,
            });
        }
    }

    /// Pauses accept exactly when no worker has credit and the queue has reached its bound.
    fn update_accept(&mut self) {
        if self.shut_down {
            return;
        }
        let pause = self.selector.is_empty() && self.pending.len() >= self.pending_bound();
        if pause != self.accept_paused {
            self.accept_paused = pause;
            tracing::trace!(paused = pause, pending = self.pending.len(), "accept state");
            self.actions.push_back(if pause {
                Action::PauseAccept
            } else {
                Action::ResumeAccept
            });
        }
    }

    pub(crate) fn config(&self) -> Config {
        self.config
    }

    pub(crate) fn pending_len(&self) -> usize {
        self.pending.len()
    }

    pub(crate) fn pending_conns(&self) -> Vec<ConnId> {
        self.pending.iter().copied().collect()
    }

    pub(crate) fn pending_bound(&self) -> usize {
        match self.config.pending_bound {
            PendingBound::PerWorker => self.active_workers.max(1).saturating_mul(self.window()),
            PendingBound::Fixed(bound) => bound,
        }
    }

    pub(crate) fn is_accept_paused(&self) -> bool {
        self.accept_paused
    }

    pub(crate) fn is_shut_down(&self) -> bool {
        self.shut_down
    }

    pub(crate) fn workers(&self) -> Vec<WorkerId> {
        self.workers.ids().collect()
    }

    pub(crate) fn worker_count(&self) -> usize {
        self.workers.len()
    }

    pub(crate) fn worker_status(&self, worker: WorkerId) -> Option<WorkerStatus> {
        let window = self.window();
        self.workers.by_id(worker).map(|entry| WorkerStatus {
            in_flight: entry.in_flight.len(),
            credit: if entry.draining {
                0
            } else {
                window.saturating_sub(entry.in_flight.len())
            },
            draining: entry.draining,
            reported_open: entry.reported_open,
        })
    }

    pub(crate) fn in_flight_conns(&self, worker: WorkerId) -> Option<Vec<ConnId>> {
        self.workers
            .by_id(worker)
            .map(|entry| entry.in_flight.iter().copied().collect())
    }
}

/// Takes `conns` out of a worker's in-flight queue and returns them in the order the worker
/// was handed them, or, if any is not there (or is named twice), changes nothing and says which.
fn take_in_flight(
    worker: WorkerId,
    in_flight: &mut VecDeque<ConnId>,
    conns: &[ConnId],
) -> Result<VecDeque<ConnId>, Error> {
    let held: BTreeSet<ConnId> = in_flight.iter().copied().collect();
    let mut wanted = BTreeSet::new();
    for &conn in conns {
        if !held.contains(&conn) || !wanted.insert(conn) {
            return Err(Error::NotInFlight { worker, conn });
        }
    }
    let (back, keep) = in_flight.iter().partition(|conn| wanted.contains(conn));
    *in_flight = keep;
    Ok(back)
}

/// Implements [`Dispatch`](crate::Dispatch) for a policy type whose field `core` is a
/// [`Core`], so the two policies share one implementation without exposing it.
macro_rules! dispatch_via_core {
    ($policy:ty) => {
        impl $crate::Dispatch for $policy {
            fn worker_joined(&mut self, worker: $crate::WorkerId) -> Result<(), $crate::Error> {
                self.core.worker_joined(worker)
            }
            fn worker_draining(&mut self, worker: $crate::WorkerId) -> Result<(), $crate::Error> {
                self.core.worker_draining(worker)
            }
            fn worker_left(&mut self, worker: $crate::WorkerId) -> Result<(), $crate::Error> {
                self.core.worker_left(worker)
            }
            fn incoming(&mut self, conn: $crate::ConnId) {
                self.core.incoming(conn)
            }
            fn acked(
                &mut self,
                worker: $crate::WorkerId,
                count: usize,
            ) -> Result<Vec<$crate::ConnId>, $crate::Error> {
                self.core.acked(worker, count)
            }
            fn returned(
                &mut self,
                worker: $crate::WorkerId,
                conns: &[$crate::ConnId],
            ) -> Result<(), $crate::Error> {
                self.core.returned(worker, conns)
            }
            fn requeue_front(&mut self, conns: &[$crate::ConnId]) {
                self.core.requeue_delivered(conns)
            }
            fn load_report(
                &mut self,
                worker: $crate::WorkerId,
                open: u32,
            ) -> Result<(), $crate::Error> {
                self.core.load_report(worker, open)
            }
            fn shutdown(&mut self) {
                self.core.shutdown()
            }
            fn poll_action(&mut self) -> Option<$crate::Action> {
                self.core.poll_action()
            }
            fn config(&self) -> $crate::Config {
                self.core.config()
            }
            fn pending_len(&self) -> usize {
                self.core.pending_len()
            }
            fn pending_conns(&self) -> Vec<$crate::ConnId> {
                self.core.pending_conns()
            }
            fn pending_bound(&self) -> usize {
                self.core.pending_bound()
            }
            fn is_accept_paused(&self) -> bool {
                self.core.is_accept_paused()
            }
            fn is_shut_down(&self) -> bool {
                self.core.is_shut_down()
            }
            fn workers(&self) -> Vec<$crate::WorkerId> {
                self.core.workers()
            }
            fn worker_count(&self) -> usize {
                self.core.worker_count()
            }
            fn worker_status(&self, worker: $crate::WorkerId) -> Option<$crate::WorkerStatus> {
                self.core.worker_status(worker)
            }
            fn in_flight_conns(&self, worker: $crate::WorkerId) -> Option<Vec<$crate::ConnId>> {
                self.core.in_flight_conns(worker)
            }
        }
    };
}

pub(crate) use dispatch_via_core;
