//! Opaque identifiers. The things they name (processes, file descriptors, sockets) live in
//! the caller; this crate only ever sees the numbers.
//!
//! They are the cluster's one id vocabulary, defined in `cluster-ipc` and re-exported here:
//! the primary, its workers and its dispatchers all speak of the same `WorkerId`. Ids are
//! chosen by the caller; the dispatchers rely only on a worker id that has left being unknown
//! afterwards, and on connection ids being unique among the connections they hold.

pub use cluster_ipc::ids::{ConnId, SlotId, WorkerId};
