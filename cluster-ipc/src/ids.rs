//! The ids every crate of a cluster speaks of: workers, slots, listeners and connections.
//!
//! They are plain numbers with a type each, so that a slot is never taken for a worker. The
//! primary hands them out: worker ids start at 1 and are never reused (a replacement gets a
//! new id and its predecessor's slot), listener ids are unique in one primary, and connection
//! ids are unique among the connections the primary holds.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A worker process, as the primary names it: from 1, never reused.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct WorkerId(pub u64);

/// A worker slot: the place in the cluster a worker fills. A replacement takes its
/// predecessor's slot (and, in reuse-port mode, its listening socket).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct SlotId(pub u32);

/// A listener the primary granted to a worker.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct ListenerId(pub u64);

/// An accepted connection that the primary holds (the fd stays in the primary's own table).
///
/// Ids must be unique among the connections a dispatcher currently holds (pending or in
/// flight); the primary gets that from a counter.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct ConnId(pub u64);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "worker {}", self.0)
    }
}

impl fmt::Display for SlotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "slot {}", self.0)
    }
}

impl fmt::Display for ListenerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "listener {}", self.0)
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "connection {}", self.0)
    }
}
