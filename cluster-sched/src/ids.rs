//! Opaque identifiers. The things they name (processes, file descriptors, sockets) live in
//! the caller; this crate only ever sees the numbers.

use std::fmt;

/// A worker process, as the primary names it.
///
/// Ids are chosen by the caller. The primary starts at 1 and never reuses an id, so a
/// replacement worker always has a new one; the dispatchers rely on that only in that an id
/// that has left is simply unknown afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkerId(pub u64);

/// An accepted connection that the primary holds (the fd stays in the primary's own table).
///
/// Ids must be unique among the connections a dispatcher currently holds (pending or in
/// flight). The dispatchers do not check this: it would cost a set lookup per connection, and
/// the primary gets uniqueness for free from a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// A reuse-port slot: the index of one `SO_REUSEPORT` listening socket that the primary keeps
/// for the worker in that slot and for each of its replacements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotId(pub u32);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "worker {}", self.0)
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "connection {}", self.0)
    }
}

impl fmt::Display for SlotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "slot {}", self.0)
    }
}
