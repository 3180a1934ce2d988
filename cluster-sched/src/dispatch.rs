//! The interface every dispatch policy offers: inputs in, actions out.

use std::num::NonZeroU32;

use crate::{ConnId, Error, WorkerId};

/// Something the caller must do, produced by a dispatcher and taken with
/// [`Dispatch::poll_action`].
///
/// Actions come out in the order they must be carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send these connections to the worker, in this order, as one batch (one `sendmsg`).
    ///
    /// They stay in flight, counting against the worker's window, until the worker acks or
    /// returns them (or leaves). The caller keeps its own copy of each fd until then.
    Handoff {
        /// The worker that takes the connections.
        worker: WorkerId,
        /// The connections, oldest first. Never empty.
        conns: Vec<ConnId>,
    },
    /// Close the caller's copy of this connection; no worker will get it. Only produced after
    /// [`Dispatch::shutdown`], never because workers are gone.
    Close(ConnId),
    /// Stop accepting (deregister the listener) so that clients wait in the kernel's backlog.
    PauseAccept,
    /// Accept again.
    ResumeAccept,
}

/// When the pending queue is long enough to stop accepting.
///
/// Accept pauses only when no worker has credit *and* this many connections are pending;
/// the bound is a trigger, not a limit: connections that arrive while paused (the caller's
/// accept loop may already have taken them) are still queued, never dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PendingBound {
    /// One window per worker that can take connections (not draining), counting at least one
    /// worker, recomputed as workers come and go. With no workers at all this keeps `window`
    /// connections ready for the next worker and leaves the rest in the kernel's backlog.
    #[default]
    PerWorker,
    /// A fixed number of pending connections. `Fixed(0)` pauses as soon as no worker has
    /// credit, so the primary never queues anything itself.
    Fixed(usize),
}

/// How a dispatcher is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// How many un-acked connections a worker may hold. `1` reproduces Node's
    /// `RoundRobinHandle`; more lets handoffs pipeline.
    pub window: NonZeroU32,
    /// When to pause accepting.
    pub pending_bound: PendingBound,
}

impl Config {
    /// A configuration with this window and the default pending bound
    /// ([`PendingBound::PerWorker`]).
    #[must_use]
    pub const fn new(window: NonZeroU32) -> Self {
        Self {
            window,
            pending_bound: PendingBound::PerWorker,
        }
    }

    /// The same configuration with another pending bound.
    #[must_use]
    pub const fn with_pending_bound(mut self, pending_bound: PendingBound) -> Self {
        self.pending_bound = pending_bound;
        self
    }
}

/// What a dispatcher knows about one worker, for status reports and tests.
///
/// Not `#[non_exhaustive]`, so that implementations of [`Dispatch`] outside this crate (test
/// doubles, wrappers) can build one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerStatus {
    /// Connections handed to the worker and not yet acked or returned.
    pub in_flight: usize,
    /// How many more connections it may be handed now (zero while draining).
    pub credit: usize,
    /// Whether it has been told to drain (it gets nothing new).
    pub draining: bool,
    /// The open-connection count from its last load report (zero before the first).
    pub reported_open: u32,
}

/// A connection dispatch policy as a pure state machine.
///
/// The caller (normally the primary, one dispatcher per listener) feeds it inputs as they
/// happen and, after each input, takes actions with [`poll_action`](Self::poll_action) until
/// it returns `None`, carrying each out in order. Nothing here does I/O or reads a clock, so a
/// run is a pure function of its inputs. The trait is object-safe, so a primary can hold
/// `Box<dyn Dispatch>` and choose the policy per listener.
///
/// Inputs that name an unknown worker, or a connection that is not where the input says,
/// return an [`Error`] and change nothing.
///
/// The rules every implementation here keeps, checked by the crate's property tests:
/// every connection is in exactly one place (pending, in flight at one live worker,
/// delivered, or closed); no connection goes to a worker that has left or is draining; no
/// worker ever has more than `window` connections in flight; no connection waits while some
/// worker has credit; pending connections go out oldest first; and accept is paused only
/// while no worker has credit, with pause and resume strictly alternating.
pub trait Dispatch {
    /// A worker is ready for connections. It joins with full credit, behind the workers already
    /// waiting for a turn, and at once takes pending connections if there are any.
    ///
    /// # Errors
    ///
    /// [`Error::DuplicateWorker`] if it has already joined.
    fn worker_joined(&mut self, worker: WorkerId) -> Result<(), Error>;

    /// A worker is shutting down: it gets nothing new, but what it has in flight still waits for
    /// its ack or return. Draining a worker twice is harmless.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownWorker`] if it is not here.
    fn worker_draining(&mut self, worker: WorkerId) -> Result<(), Error>;

    /// A worker is gone (exited, or closed its listener). Its un-acked connections go back to
    /// the front of the pending queue, in the order it was handed them, and are dispatched
    /// again at once.
    ///
    /// Call this only after every ack the worker sent has been fed in (the primary reads the
    /// handoff socket to EOF first), or a connection could be served twice.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownWorker`] if it is not here.
    fn worker_left(&mut self, worker: WorkerId) -> Result<(), Error>;

    /// The listener accepted a connection. It goes to the back of the pending queue, and out
    /// at once if some worker has credit.
    fn incoming(&mut self, conn: ConnId);

    /// Connections that were delivered (acked) and came back unserved, for example from a
    /// worker that closed its listener with connections it had received but not yet handed
    /// to its application. They are older than anything pending, so they go to the front of
    /// the pending queue, in their order, and out at once if some worker has credit. After
    /// [`shutdown`](Dispatch::shutdown) they are closed.
    fn requeue_front(&mut self, conns: &[ConnId]);

    /// A worker acknowledged its `count` oldest in-flight connections: they are delivered, and
    /// the caller may close its copies of exactly the connections returned here. The worker's
    /// credit comes back.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownWorker`] if it is not here, [`Error::AckExceedsInFlight`] if `count` is
    /// more than it has in flight.
    fn acked(&mut self, worker: WorkerId, count: usize) -> Result<Vec<ConnId>, Error>;

    /// A worker gives back connections it had in flight but will not serve. They go to the
    /// front of the pending queue, in the order the worker was handed them, and out again at
    /// once, to another worker if one has credit.
    ///
    /// A worker that returns connections because it is saturated should also be drained, or
    /// it may be handed them again when it is the only worker with credit.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownWorker`] if it is not here, [`Error::NotInFlight`] if any of `conns` is
    /// not in flight at it (or appears twice).
    fn returned(&mut self, worker: WorkerId, conns: &[ConnId]) -> Result<(), Error>;

    /// A worker reports how many connections it has open. Used by
    /// [`LeastConnections`](crate::LeastConnections); recorded but otherwise ignored by
    /// [`RoundRobin`](crate::RoundRobin).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownWorker`] if it is not here.
    fn load_report(&mut self, worker: WorkerId, open: u32) -> Result<(), Error>;

    /// The listener is closing: every pending connection becomes [`Action::Close`], and so does
    /// every connection that arrives, is returned, or comes back from a leaving worker later.
    /// Connections in flight still wait for their worker's ack. No `PauseAccept` or
    /// `ResumeAccept` follows. Calling it again does nothing.
    fn shutdown(&mut self);

    /// The next action to carry out, or `None` when there is nothing to do until the next input.
    #[must_use]
    fn poll_action(&mut self) -> Option<Action>;

    /// Takes every queued action, in order. A convenience over
    /// [`poll_action`](Self::poll_action).
    #[must_use]
    fn take_actions(&mut self) -> Vec<Action> {
        std::iter::from_fn(|| self.poll_action()).collect()
    }

    /// The configuration this dispatcher was built with.
    fn config(&self) -> Config;

    /// How many connections wait for a worker.
    fn pending_len(&self) -> usize;

    /// The waiting connections, oldest (next to go out) first.
    fn pending_conns(&self) -> Vec<ConnId>;

    /// The number of pending connections at which accept pauses when no worker has credit,
    /// as things stand now.
    fn pending_bound(&self) -> usize;

    /// Whether accept is paused (the last accept action was `PauseAccept`).
    fn is_accept_paused(&self) -> bool;

    /// Whether [`shutdown`](Self::shutdown) has been called.
    fn is_shut_down(&self) -> bool;

    /// The live workers (joined and not left, draining included), by id.
    fn workers(&self) -> Vec<WorkerId>;

    /// How many live workers there are, draining included.
    fn worker_count(&self) -> usize;

    /// What is known about one worker, or `None` if it is not here.
    fn worker_status(&self, worker: WorkerId) -> Option<WorkerStatus>;

    /// How many connections a worker has in flight, or `None` if it is not here.
    fn in_flight(&self, worker: WorkerId) -> Option<usize> {
        self.worker_status(worker).map(|status| status.in_flight)
    }

    /// The connections a worker has in flight, oldest first, or `None` if it is not here.
    fn in_flight_conns(&self, worker: WorkerId) -> Option<Vec<ConnId>>;
}
