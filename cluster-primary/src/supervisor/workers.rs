//! What the supervisor knows of each worker and each slot.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::time::Instant;

use cluster_ipc::{ListenerId, SlotId, WorkerId};

use crate::event::{Memory, WorkerState};

/// Why a worker is on its way out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Leaving {
    /// The primary asked it to disconnect.
    pub(crate) asked: bool,
    /// It said it was disconnecting (or retiring) by itself.
    pub(crate) by_itself: bool,
    /// Its replacement was started when it retired.
    pub(crate) replaced: bool,
}

impl Leaving {
    pub(crate) fn is_leaving(&self) -> bool {
        self.asked || self.by_itself
    }
}

/// One worker, from its spawn until its `Exit` event is taken.
#[derive(Debug)]
pub(crate) struct Worker {
    pub(crate) id: WorkerId,
    pub(crate) slot: SlotId,
    /// Known once the process started.
    pub(crate) pid: Option<u32>,
    pub(crate) state: WorkerState,
    pub(crate) spawned_at: Instant,
    pub(crate) reached_listening: bool,
    pub(crate) leaving: Leaving,
    /// The control channel is open: messages can be sent and will be read.
    pub(crate) control_open: bool,
    /// Reaped: its `Exit` event is queued, and its pid belongs to nobody now.
    pub(crate) reaped: bool,
    /// Killed (SIGKILL to its process group) at this time unless it exited first.
    pub(crate) kill_at: Option<Instant>,
    /// SIGKILL was sent: no timer applies to it any more (its exit is on its way).
    pub(crate) killed: bool,
    /// Round-robin listeners it has a handoff socket for.
    pub(crate) handoffs: BTreeSet<ListenerId>,
    /// Shared listeners it holds.
    pub(crate) shared: BTreeSet<ListenerId>,
    /// Connections handed to it (sent over its handoff sockets), acknowledged or not.
    pub(crate) connections_handed: u64,
    /// Connections it acknowledged.
    pub(crate) connections_acked: u64,
    /// The open-connection count it last reported.
    pub(crate) reported_open: Option<u32>,
    /// The `Disconnect` event was given.
    pub(crate) disconnect_reported: bool,
    /// When its serving path last said it was alive (`None` until it first did).
    pub(crate) heartbeat_at: Option<Instant>,
    /// The connections it said it accepted, in its last heartbeat.
    pub(crate) reported_connections: u64,
    /// The listeners it said it listens on.
    pub(crate) listening_on: BTreeSet<ListenerId>,
    /// Since when it holds handed connections without acknowledging any.
    pub(crate) stalled_since: Option<Instant>,
    /// Why the primary is killing it for its own fault (hung, no Hello in time, a protocol
    /// violation): its exit counts as a failure.
    pub(crate) fault: Option<String>,
    /// The worker started to take over its slot (a roll-out, a recycling, a hang).
    pub(crate) replaced_by: Option<WorkerId>,
    /// Recycle it once it took this many connections (`u64::MAX`: only for memory; `None`:
    /// not at all, or done).
    pub(crate) recycle_at: Option<u64>,
    /// Its memory, as last measured.
    pub(crate) memory: Option<Memory>,
}

impl Worker {
    pub(crate) fn new(id: WorkerId, slot: SlotId, now: Instant) -> Worker {
        Worker {
            id,
            slot,
            pid: None,
            state: WorkerState::Starting,
            spawned_at: now,
            reached_listening: false,
            leaving: Leaving::default(),
            control_open: true,
            reaped: false,
            kill_at: None,
            killed: false,
            handoffs: BTreeSet::new(),
            shared: BTreeSet::new(),
            connections_handed: 0,
            connections_acked: 0,
            reported_open: None,
            disconnect_reported: false,
            heartbeat_at: None,
            reported_connections: 0,
            listening_on: BTreeSet::new(),
            stalled_since: None,
            fault: None,
            replaced_by: None,
            recycle_at: None,
            memory: None,
        }
    }

    /// Moves the kill deadline to `deadline` if that is sooner.
    pub(crate) fn kill_no_later_than(&mut self, deadline: Instant) {
        if !self.reaped {
            self.kill_at = Some(self.kill_at.map_or(deadline, |at| at.min(deadline)));
        }
    }
}

/// One worker slot: the configured number of workers is the number of slots.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    pub(crate) worker: Option<WorkerId>,
    /// Workers of this slot that failed in a row (exited before listening, or within a
    /// second of their start).
    pub(crate) failures: u32,
    pub(crate) respawn_at: Option<Instant>,
    /// Workers started in it to replace one that exited.
    pub(crate) restarts: u64,
    /// Variables added to the environment of its workers (`fork(env)`).
    pub(crate) env: Vec<(OsString, OsString)>,
}
