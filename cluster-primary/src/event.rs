//! What the primary tells the application.

use std::net::SocketAddr;
use std::time::Duration;

use cluster_ipc::{SlotId, WorkerId};
use serde::{Serialize, Serializer};

use crate::Signal;

/// A user message from a worker: the body as sent, to decode into the sender's type (the
/// cluster's one user-message type, from `cluster-ipc`).
pub use cluster_ipc::UserMessage as Message;

/// Something that happened in the cluster, in the order it happened. For one worker the order
/// is always `Fork`, `Online`, `Listening` (once per listener), `Disconnect`, `Exit`; a worker
/// that never got that far skips the steps it did not reach.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A worker process was started.
    Fork {
        /// The new worker's id (ids start at 1 and are never reused).
        worker: WorkerId,
        /// Its process id.
        pid: u32,
        /// The slot it fills (a replacement takes the slot of the worker it replaces).
        slot: SlotId,
    },
    /// A worker said Hello.
    Online {
        /// Which worker.
        worker: WorkerId,
    },
    /// A worker is listening on an address.
    Listening {
        /// Which worker.
        worker: WorkerId,
        /// The address it listens on (the real port, when `:0` was asked).
        addr: SocketAddr,
    },
    /// Every one of the configured number of workers listens (sent once, the first time).
    Ready {
        /// Every address some worker listens on.
        addrs: Vec<SocketAddr>,
    },
    /// A worker sent a message.
    Message {
        /// Which worker.
        worker: WorkerId,
        /// What it sent.
        message: Message,
    },
    /// A worker's control channel closed. The worker is still listed (in
    /// [`Cluster::workers`](crate::Cluster::workers), as
    /// [`WorkerState::Disconnected`]) until its `Exit` event.
    Disconnect {
        /// Which worker.
        worker: WorkerId,
    },
    /// A worker process ended and was reaped.
    Exit {
        /// Which worker.
        worker: WorkerId,
        /// Its process id.
        pid: u32,
        /// How it ended.
        status: ExitStatus,
        /// True when it was asked to disconnect, or disconnected or retired of its own
        /// accord, before it exited (Node's `exitedAfterDisconnect`).
        after_disconnect: bool,
    },
    /// A worker was declared hung: its un-acknowledged connections went to other workers,
    /// it gets SIGABRT then SIGKILL, and a replacement.
    Hung {
        /// Which worker.
        worker: WorkerId,
        /// What gave it away.
        reason: String,
    },
    /// A rolling restart began.
    RolloutStarted {
        /// The roll-out's number (from 1).
        rollout: u64,
        /// How many workers it replaces.
        workers: usize,
    },
    /// A replacement of the roll-out is ready and the worker it replaces was asked to leave.
    RolloutStep {
        /// The roll-out's number.
        rollout: u64,
        /// The worker replaced (draining now).
        old: WorkerId,
        /// Its replacement.
        new: WorkerId,
        /// Workers replaced so far.
        done: usize,
        /// Workers to replace in all.
        total: usize,
    },
    /// Every worker of the roll-out was replaced.
    RolloutFinished {
        /// The roll-out's number.
        rollout: u64,
    },
    /// The roll-out stopped before the end; the workers it had not replaced keep serving.
    RolloutAborted {
        /// The roll-out's number.
        rollout: u64,
        /// Why (a replacement that did not become ready, a stop, ...).
        reason: String,
    },
    /// The number of workers changed.
    Scaled {
        /// The number before.
        from: usize,
        /// The number now.
        to: usize,
    },
    /// A worker is being replaced to keep it fresh: its replacement starts, then it drains.
    Recycling {
        /// Which worker.
        worker: WorkerId,
        /// Why (connections taken, memory).
        reason: String,
    },
}

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(Signal),
}

impl ExitStatus {
    /// True for a clean exit (code 0).
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(code) => write!(f, "exit code {code}"),
            ExitStatus::Signal(signal) => write!(f, "killed by {signal}"),
        }
    }
}

impl From<std::process::ExitStatus> for ExitStatus {
    fn from(status: std::process::ExitStatus) -> ExitStatus {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => ExitStatus::Code(code),
            (None, Some(signal)) => ExitStatus::Signal(Signal::from_raw(signal)),
            // Neither: stopped or continued, which waitpid without WUNTRACED never reports.
            (None, None) => ExitStatus::Code(-1),
        }
    }
}

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum WorkerState {
    /// Spawned, no Hello yet.
    Starting,
    /// Said Hello.
    Online,
    /// Listens on at least one address.
    Listening,
    /// Asked to disconnect, or disconnecting of its own accord.
    Disconnecting,
    /// Its control channel closed; waiting to be reaped, or reaped and its `Exit` event not
    /// yet delivered.
    Disconnected,
}

/// How much memory a worker uses, from `/proc/PID/smaps_rollup`, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Memory {
    /// Proportional set size: private pages, plus each shared page divided by the number of
    /// processes that share it.
    pub pss: u64,
    /// Unique set size: private pages only (what the process would give back if it ended).
    pub uss: u64,
}

impl Memory {
    /// Memory of these sizes.
    pub fn new(pss: u64, uss: u64) -> Memory {
        Memory { pss, uss }
    }
}

fn as_millis<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_u64(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

fn as_optional_millis<S: Serializer>(
    duration: &Option<Duration>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match duration {
        Some(duration) => as_millis(duration, serializer),
        None => serializer.serialize_none(),
    }
}

/// A snapshot of one worker. Serialized (for the control socket, logs, dashboards) with its
/// durations in milliseconds, as `uptime_ms` and `heartbeat_age_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct WorkerInfo {
    /// Its id.
    pub id: WorkerId,
    /// Its process id.
    pub pid: u32,
    /// Its slot.
    pub slot: SlotId,
    /// Where it is in its life.
    pub state: WorkerState,
    /// How long ago it was spawned.
    #[serde(rename = "uptime_ms", serialize_with = "as_millis")]
    pub uptime: Duration,
    /// How many connections were handed to it (round-robin listeners), acknowledged or not.
    pub connections_handed: u64,
    /// How many of them it acknowledged: it took them (round-robin listeners).
    pub connections_acked: u64,
    /// Connections handed to it and not yet acknowledged (round-robin listeners): the
    /// primary still holds its copies, and gives them to another worker if this one leaves.
    pub in_flight: usize,
    /// The connections it has open, as it last reported them (only under
    /// [`Policy::LeastConnections`](crate::Policy::LeastConnections), which asks for reports).
    pub open_connections: Option<u32>,
    /// How many workers its slot started to replace one that exited.
    pub restarts: u64,
    /// How long ago its serving path last sent a heartbeat (`None`: never yet).
    #[serde(rename = "heartbeat_age_ms", serialize_with = "as_optional_millis")]
    pub heartbeat_age: Option<Duration>,
    /// Its memory as last measured (`None` until measured).
    pub memory: Option<Memory>,
}

/// A snapshot of the whole cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Status {
    /// The primary's process id.
    pub pid: u32,
    /// The live workers, by id.
    pub workers: Vec<WorkerInfo>,
    /// How many workers were started to replace one that exited.
    pub restarts: u64,
    /// The addresses the primary listens on.
    pub listening: Vec<SocketAddr>,
    /// Connections the primary accepted and has not handed to a worker yet.
    pub pending_connections: usize,
    /// True once the cluster is stopping.
    pub stopping: bool,
    /// The number of workers the cluster keeps running.
    pub target_workers: usize,
    /// The rolling restart in progress: its number, and workers replaced / to replace.
    pub rollout: Option<RolloutProgress>,
    /// What the primary did since it started, counted.
    pub counters: Counters,
}

/// What the primary did since it started: monotonic counters, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Counters {
    /// Connections the primary accepted on its round-robin listeners.
    pub accepted: u64,
    /// Connections handed to workers (one connection handed again after its worker died
    /// counts again).
    pub handed: u64,
    /// Connections workers acknowledged: taken by a worker, the primary's copy closed.
    pub acked: u64,
    /// Handed connections a worker never took (it died or hung first), put back in the
    /// queue for another worker (or closed, when the cluster is stopping: those count in
    /// `closed_on_stop` too).
    pub redispatched: u64,
    /// Connections workers took and gave back unserved, for another worker: keep-alive
    /// connections handed back at a request boundary by a draining worker, and connections
    /// a worker that closed its listener had not served yet.
    pub returned: u64,
    /// Connections the primary closed unserved because the cluster stopped.
    pub closed_on_stop: u64,
    /// Workers that exited, for any reason.
    pub exits: u64,
    /// Workers whose exit counted as a failure (a crash, a fault signal, hung, a boot
    /// failure).
    pub failures: u64,
}

/// How far a rolling restart got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RolloutProgress {
    /// The roll-out's number.
    pub rollout: u64,
    /// Workers replaced so far.
    pub done: usize,
    /// Workers to replace in all.
    pub total: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_serializes_with_durations_in_milliseconds() {
        let status = Status {
            pid: 4241,
            workers: vec![WorkerInfo {
                id: WorkerId(3),
                pid: 4242,
                slot: SlotId(1),
                state: WorkerState::Listening,
                uptime: Duration::from_millis(1500),
                connections_handed: 12,
                connections_acked: 10,
                in_flight: 2,
                open_connections: None,
                restarts: 1,
                heartbeat_age: Some(Duration::from_millis(250)),
                memory: Some(Memory::new(2048, 1024)),
            }],
            restarts: 1,
            listening: vec!["127.0.0.1:8080".parse().unwrap()],
            pending_connections: 0,
            stopping: false,
            target_workers: 2,
            rollout: Some(RolloutProgress {
                rollout: 1,
                done: 1,
                total: 2,
            }),
            counters: Counters {
                accepted: 12,
                ..Counters::default()
            },
        };
        let json = serde_json::to_value(&status).unwrap();
        let worker = &json["workers"][0];
        assert_eq!(worker["id"], 3);
        assert_eq!(worker["state"], "listening");
        assert_eq!(worker["uptime_ms"], 1500);
        assert_eq!(worker["heartbeat_age_ms"], 250);
        assert_eq!(worker["memory"]["uss"], 1024);
        assert_eq!(json["listening"][0], "127.0.0.1:8080");
        assert_eq!(json["rollout"]["done"], 1);
        assert_eq!(worker["connections_handed"], 12);
        assert_eq!(worker["connections_acked"], 10);
        assert_eq!(json["counters"]["accepted"], 12);
    }
}
