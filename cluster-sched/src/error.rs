//! The crate's error type.

use crate::{ConnId, SlotId, WorkerId};

/// An input that names something the state machine does not hold.
///
/// Every error leaves the state machine exactly as it was, so the caller may log it and go on.
/// They are the primary's bugs or races (a message from a worker that has just been removed),
/// never reasons to panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The worker never joined, or has already left.
    #[error("{worker} is not known here")]
    UnknownWorker {
        /// The worker named by the input.
        worker: WorkerId,
    },
    /// The worker has already joined.
    #[error("{worker} has already joined")]
    DuplicateWorker {
        /// The worker named by the input.
        worker: WorkerId,
    },
    /// The worker acknowledged more connections than it has in flight.
    #[error("{worker} acknowledged {acked} connections but has only {in_flight} in flight")]
    AckExceedsInFlight {
        /// The acknowledging worker.
        worker: WorkerId,
        /// How many connections the ack covered.
        acked: usize,
        /// How many the worker actually had in flight.
        in_flight: usize,
    },
    /// The worker returned a connection that is not in flight at it (or returned one twice).
    #[error("{conn} is not in flight at {worker}")]
    NotInFlight {
        /// The returning worker.
        worker: WorkerId,
        /// The first connection that was not in flight there.
        conn: ConnId,
    },
    /// The reuse-port slot does not exist.
    #[error("{slot} does not exist")]
    UnknownSlot {
        /// The slot named by the input.
        slot: SlotId,
    },
    /// The reuse-port slot is already held by a worker.
    #[error("{slot} is already held by {holder}")]
    SlotOccupied {
        /// The slot named by the input.
        slot: SlotId,
        /// The worker holding it.
        holder: WorkerId,
    },
    /// The worker already holds a reuse-port slot; a worker holds at most one.
    #[error("{worker} already holds {slot}")]
    WorkerHoldsSlot {
        /// The worker named by the input.
        worker: WorkerId,
        /// The slot it holds.
        slot: SlotId,
    },
    /// The worker holds no reuse-port slot.
    #[error("{worker} holds no slot")]
    WorkerHoldsNoSlot {
        /// The worker named by the input.
        worker: WorkerId,
    },
}
