//! The decisions that replace workers while the cluster serves: rolling restarts, scaling,
//! recycling, hung workers, and the crash-loop guard.
//!
//! A *replacement* is the one mechanism under roll-outs and recycling: a new worker starts in
//! the old one's slot; once it listens on every listener the old one listened on, the old one
//! is asked to disconnect (it drains: its un-acked connections come back, idle keep-alive
//! connections are handed back, the rest finish). A replacement that exits, or is not ready
//! within the readiness timeout, is stopped and the old worker keeps its slot.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cluster_ipc::{ListenerId, SlotId, WorkerId};

#[cfg(test)]
use super::Sabotage;
use super::workers::{Slot, Worker};
use super::{Action, Refusal, Supervisor};
use crate::config::Respawn;
use crate::event::{Event, ExitStatus, Memory, RolloutProgress};
use crate::signal::Signal;

/// How long a hung worker has between SIGABRT and SIGKILL (time to write a core dump or a
/// backtrace).
pub(crate) const HUNG_KILL_GRACE: Duration = Duration::from_secs(2);
/// How often the primary measures its workers' memory when a memory limit is set.
pub(crate) const MEMORY_INTERVAL: Duration = Duration::from_secs(1);

/// Why the cluster stopped by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fatal {
    /// A worker exited with the boot-failure code before it listened.
    BootFailed { worker: WorkerId, exit_code: i32 },
    /// The crash-loop guard tripped.
    CrashLoop {
        failures: usize,
        within: Duration,
        last: String,
    },
    /// The primary cannot listen on an address a worker asked for, for a reason a respawn
    /// cannot fix (see [`unfixable_listen`]).
    ListenFailed { addr: SocketAddr, errno: i32 },
    /// The worker program cannot be executed (see [`unfixable_spawn`]).
    ProgramNotExecutable { errno: i32 },
}

impl Fatal {
    /// What kind of failure it is, in a few words (the error `run` returns has the details).
    fn kind(&self) -> &'static str {
        match self {
            Fatal::BootFailed { .. } => "worker boot failed",
            Fatal::CrashLoop { .. } => "crash loop",
            Fatal::ListenFailed { .. } => "cannot listen",
            Fatal::ProgramNotExecutable { .. } => "worker program cannot be executed",
        }
    }
}

/// Whether a bind that failed with `errno` would fail the same way on every retry: the
/// address is taken, forbidden, not this host's, or not an address at all. Anything else
/// (out of fds, out of memory) may pass, and goes the way of any worker failure.
pub(crate) fn unfixable_listen(errno: i32) -> bool {
    [
        libc::EADDRINUSE,
        libc::EACCES,
        libc::EPERM,
        libc::EADDRNOTAVAIL,
        libc::EAFNOSUPPORT,
        libc::EINVAL,
    ]
    .contains(&errno)
}

/// Whether a spawn that failed with `errno` would fail the same way on every retry: the
/// program is missing, not executable, or not a program. Out of processes or memory may pass.
pub(crate) fn unfixable_spawn(errno: i32) -> bool {
    [
        libc::ENOENT,
        libc::EACCES,
        libc::EPERM,
        libc::ENOEXEC,
        libc::ENOTDIR,
        libc::EISDIR,
        libc::ELOOP,
        libc::ENAMETOOLONG,
    ]
    .contains(&errno)
}

/// How the supervision ended, once [`Action::Finished`] was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ending {
    /// Every worker exited before its time ran out.
    Clean,
    /// Workers were killed by the stop (its time ran out, or it was immediate).
    Forced { killed: usize },
    /// The cluster stopped by itself for this reason.
    Fatal(Fatal),
}

/// What a replacement is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// A step of this roll-out.
    Rollout(u64),
    /// Recycling the old worker.
    Recycle,
    /// A step of a roll-out that was aborted: it finishes on its own.
    Detached,
}

/// A worker started to take over from another.
#[derive(Debug, Clone)]
pub(crate) struct Replacement {
    pub(crate) old: WorkerId,
    /// The listeners the old worker held: the new one is ready when it listens on all.
    needs: BTreeSet<ListenerId>,
    pub(crate) deadline: Instant,
    pub(crate) purpose: Purpose,
    /// The old worker was asked to leave at the start (the roll-out's unavailable count),
    /// not once this one was ready.
    old_first: bool,
}

/// A rolling restart in progress.
#[derive(Debug)]
pub(crate) struct Rollout {
    pub(crate) id: u64,
    /// The workers still to replace, in slot order.
    queue: VecDeque<WorkerId>,
    /// Replacements started and not ready yet.
    active: BTreeSet<WorkerId>,
    done: usize,
    total: usize,
}

/// The roll-out state: the one in progress, and a reload asked for meanwhile.
#[derive(Debug, Default)]
pub(crate) struct Rollouts {
    pub(crate) current: Option<Rollout>,
    /// A reload asked for while one was in progress: it starts when that one ends.
    queued: Option<u64>,
    last_id: u64,
    /// Replacements in progress, by the new worker.
    pub(crate) replacements: BTreeMap<WorkerId, Replacement>,
}

impl Rollouts {
    pub(crate) fn progress(&self) -> Option<RolloutProgress> {
        self.current.as_ref().map(|r| RolloutProgress {
            rollout: r.id,
            done: r.done,
            total: r.total,
        })
    }

    pub(crate) fn deadlines(&self) -> impl Iterator<Item = Instant> + '_ {
        self.replacements.values().map(|r| r.deadline)
    }
}

/// A number in `0..=jitter` that differs from worker to worker (splitmix64 of the id), so
/// that workers started together are not recycled together, and the same inputs still give
/// the same decisions.
pub(crate) fn jitter_for(worker: WorkerId, jitter: u64) -> u64 {
    if jitter == 0 {
        return 0;
    }
    let mut z = worker.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    z % (jitter + 1)
}

/// Whether the worker's heartbeats should still come: it serves, and its channel (which
/// carries them) is open. One that leaves may be too busy draining; one whose channel
/// closed cannot send them, and is killed after the shutdown timeout anyway.
fn sends_heartbeats(worker: &Worker) -> bool {
    !worker.leaving.is_leaving() && worker.control_open
}

/// What about an exit counts as the worker's own failure: `None` for a clean exit, an exit
/// the primary asked for, or a kill from outside.
pub(crate) fn failure_of(fault: Option<&str>, asked: bool, status: ExitStatus) -> Option<String> {
    if let Some(fault) = fault {
        return Some(fault.to_owned());
    }
    if asked {
        return None;
    }
    match status {
        ExitStatus::Code(0) => None,
        ExitStatus::Code(code) => Some(format!("exit code {code}")),
        ExitStatus::Signal(signal) if signal.is_fault() => Some(format!("killed by {signal}")),
        ExitStatus::Signal(_) => None,
    }
}

impl Supervisor {
    // ----- commands -----

    /// Starts a rolling restart of every worker there is now, and returns its number. While
    /// one is in progress, the new one waits for it (several reloads asked meanwhile are
    /// one).
    pub(crate) fn reload(&mut self, now: Instant) -> Result<u64, Refusal> {
        if self.stopping {
            return Err(Refusal::Stopping);
        }
        if self.rollouts.current.is_some() {
            if let Some(queued) = self.rollouts.queued {
                return Ok(queued);
            }
            self.rollouts.last_id += 1;
            let id = self.rollouts.last_id;
            self.rollouts.queued = Some(id);
            tracing::info!(
                rollout = id,
                "reload queued behind the roll-out in progress"
            );
            return Ok(id);
        }
        self.rollouts.last_id += 1;
        let id = self.rollouts.last_id;
        self.start_rollout(id, now);
        Ok(id)
    }

    fn start_rollout(&mut self, id: u64, now: Instant) {
        let mut old: Vec<(SlotId, WorkerId)> = self
            .workers
            .values()
            .filter(|w| self.may_replace(w.id))
            .map(|w| (w.slot, w.id))
            .collect();
        old.sort();
        let total = old.len();
        tracing::info!(rollout = id, workers = total, "rolling restart started");
        self.emit(Event::RolloutStarted {
            rollout: id,
            workers: total,
        });
        self.rollouts.current = Some(Rollout {
            id,
            queue: old.into_iter().map(|(_, worker)| worker).collect(),
            active: BTreeSet::new(),
            done: 0,
            total,
        });
        self.advance_rollout(now);
    }

    /// Starts as many steps as the roll-out's limits allow; ends it when nothing is left.
    ///
    /// The limits count every roll-out replacement not ready yet, the ones an aborted
    /// roll-out left to finish on their own too: the roll-out queued behind it starts at
    /// once, and must not surge beside them.
    fn advance_rollout(&mut self, now: Instant) {
        let limits = self.settings.rollout;
        loop {
            let Some(rollout) = self.rollouts.current.as_ref() else {
                return;
            };
            let (id, own) = (rollout.id, rollout.active.len());
            let stepping =
                || (self.rollouts.replacements.values()).filter(|r| r.purpose != Purpose::Recycle);
            if stepping().count() >= (limits.surge + limits.unavailable) as usize {
                return;
            }
            let surging = stepping().filter(|r| !r.old_first).count();
            let Some(old) = self
                .rollouts
                .current
                .as_mut()
                .and_then(|r| r.queue.pop_front())
            else {
                if own == 0 {
                    self.finish_rollout(None, now);
                }
                return;
            };
            if !self.may_replace(old) {
                // It left or was replaced meanwhile: its slot has a new worker already.
                if let Some(rollout) = self.rollouts.current.as_mut() {
                    rollout.total -= 1;
                }
                continue;
            }
            let old_first = surging >= limits.surge as usize;
            if let Some(new) = self.start_replacement(old, Purpose::Rollout(id), old_first, now) {
                if let Some(rollout) = self.rollouts.current.as_mut() {
                    rollout.active.insert(new);
                }
            }
        }
    }

    /// Ends the current roll-out (`aborted` says why it did not finish) and starts the one
    /// queued behind it.
    fn finish_rollout(&mut self, aborted: Option<String>, now: Instant) {
        let Some(rollout) = self.rollouts.current.take() else {
            return;
        };
        for new in &rollout.active {
            if let Some(replacement) = self.rollouts.replacements.get_mut(new) {
                replacement.purpose = Purpose::Detached;
            }
        }
        match aborted {
            None => {
                tracing::info!(
                    rollout = rollout.id,
                    workers = rollout.done,
                    "rolling restart finished"
                );
                self.emit(Event::RolloutFinished {
                    rollout: rollout.id,
                });
            }
            Some(reason) => {
                tracing::error!(rollout = rollout.id, done = rollout.done, total = rollout.total, %reason, "rolling restart aborted; the workers not yet replaced keep serving");
                self.emit(Event::RolloutAborted {
                    rollout: rollout.id,
                    reason,
                });
            }
        }
        if let Some(queued) = self.rollouts.queued.take() {
            if self.stopping {
                self.emit(Event::RolloutAborted {
                    rollout: queued,
                    reason: "the cluster is stopping".into(),
                });
            } else {
                self.start_rollout(queued, now);
            }
        }
    }

    /// Ends every roll-out because the cluster stops.
    pub(crate) fn abort_rollouts_for_stop(&mut self, now: Instant) {
        if self.rollouts.current.is_some() {
            self.finish_rollout(Some("the cluster is stopping".into()), now);
        }
        if let Some(queued) = self.rollouts.queued.take() {
            self.emit(Event::RolloutAborted {
                rollout: queued,
                reason: "the cluster is stopping".into(),
            });
        }
        self.rollouts.replacements.clear();
    }

    /// Sets the number of workers: new slots get a worker at once; the workers of removed
    /// slots drain and leave.
    pub(crate) fn set_workers(&mut self, count: usize, now: Instant) -> Result<(), Refusal> {
        if count == 0 {
            return Err(Refusal::NoWorkers);
        }
        if self.stopping {
            return Err(Refusal::Stopping);
        }
        let from = self.slots.len();
        if count == from {
            return Ok(());
        }
        if count > from {
            for _ in from..count {
                self.add_slot(Vec::new(), now);
            }
        } else {
            let removed: Vec<WorkerId> = self
                .workers
                .values()
                .filter(|w| !w.reaped && w.slot.0 as usize >= count)
                .map(|w| w.id)
                .collect();
            for worker in removed {
                if sabotaged!(self, ScaleDownKeepsWorkers) {
                    continue;
                }
                self.forget_replacement(worker);
                if let Some(rollout) = self.rollouts.current.as_mut() {
                    if let Some(at) = rollout.queue.iter().position(|&w| w == worker) {
                        rollout.queue.remove(at);
                        rollout.total -= 1;
                    }
                }
                self.ask_to_disconnect(worker, now);
            }
            self.slots.truncate(count);
            self.settings.workers = count;
            self.advance_rollout(now);
        }
        tracing::info!(from, to = count, "workers scaled");
        self.emit(Event::Scaled { from, to: count });
        self.check_finished();
        Ok(())
    }

    /// Starts one more worker, in a slot of its own (the cluster grows by one), with `env`
    /// added to its environment and to that of every worker that replaces it.
    pub(crate) fn fork(
        &mut self,
        env: Vec<(OsString, OsString)>,
        now: Instant,
    ) -> Result<WorkerId, Refusal> {
        if self.stopping {
            return Err(Refusal::Stopping);
        }
        let from = self.slots.len();
        let worker = self.add_slot(env, now);
        tracing::info!(worker = worker.0, from, to = from + 1, "worker forked");
        self.emit(Event::Scaled { from, to: from + 1 });
        Ok(worker)
    }

    fn add_slot(&mut self, env: Vec<(OsString, OsString)>, now: Instant) -> WorkerId {
        let slot = SlotId(self.slots.len() as u32);
        self.slots.push(Slot {
            env,
            ..Slot::default()
        });
        self.settings.workers = self.slots.len();
        self.spawn_into(slot, now)
    }

    // ----- replacements -----

    /// Whether `worker` may be replaced now: started, alive, serving, not leaving, not
    /// replaced already, not itself a replacement on trial. One whose process is not
    /// started yet (its `Spawn` is on its way) runs the program as it is now anyway.
    pub(crate) fn may_replace(&self, worker: WorkerId) -> bool {
        self.workers.get(&worker).is_some_and(|w| {
            w.pid.is_some()
                && !w.reaped
                && w.fault.is_none()
                && !w.leaving.is_leaving()
                && w.replaced_by.is_none()
                && w.control_open
        }) && !self.rollouts.replacements.contains_key(&worker)
    }

    /// Starts a replacement for `old` in its slot; returns the new worker.
    fn start_replacement(
        &mut self,
        old: WorkerId,
        purpose: Purpose,
        old_first: bool,
        now: Instant,
    ) -> Option<WorkerId> {
        let record = self.workers.get(&old)?;
        let needs: BTreeSet<ListenerId> = record.handoffs.union(&record.shared).copied().collect();
        let slot = record.slot;
        let new = self.spawn_into(slot, now);
        if let Some(record) = self.workers.get_mut(&old) {
            record.replaced_by = Some(new);
        }
        tracing::info!(
            old = old.0,
            new = new.0,
            slot = slot.0,
            ?purpose,
            "replacement started"
        );
        self.rollouts.replacements.insert(
            new,
            Replacement {
                old,
                needs,
                deadline: now + self.settings.readiness_timeout,
                purpose,
                old_first,
            },
        );
        if old_first {
            self.ask_to_disconnect(old, now);
        }
        Some(new)
    }

    /// A replacement might be ready: it listens on everything its predecessor held when it
    /// started, and holds now (a listener it opened since would have nobody left).
    pub(crate) fn check_replacement_ready(&mut self, new: WorkerId, now: Instant) {
        let Some(replacement) = self.rollouts.replacements.get(&new) else {
            return;
        };
        let held_now: BTreeSet<ListenerId> = (self.workers.get(&replacement.old))
            .filter(|w| !w.reaped)
            .map(|w| w.handoffs.union(&w.shared).copied().collect())
            .unwrap_or_default();
        let listens = |w: &Worker| {
            replacement.needs.is_subset(&w.listening_on) && held_now.is_subset(&w.listening_on)
        };
        let ready = self.workers.get(&new).is_some_and(|w| {
            w.control_open
                && !w.leaving.is_leaving()
                && (listens(w) || sabotaged!(self, RetireBeforeReady))
        });
        if !ready {
            return;
        }
        let Some(replacement) = self.rollouts.replacements.remove(&new) else {
            return;
        };
        let old = replacement.old;
        tracing::info!(
            old = old.0,
            new = new.0,
            "replacement ready; the old worker drains"
        );
        self.ask_to_disconnect(old, now);
        if let Purpose::Rollout(id) = replacement.purpose {
            if let Some(rollout) = self.rollouts.current.as_mut().filter(|r| r.id == id) {
                rollout.active.remove(&new);
                rollout.done += 1;
                let (done, total) = (rollout.done, rollout.total);
                tracing::info!(
                    rollout = id,
                    old = old.0,
                    new = new.0,
                    done,
                    total,
                    "roll-out step"
                );
                self.emit(Event::RolloutStep {
                    rollout: id,
                    old,
                    new,
                    done,
                    total,
                });
            }
            self.advance_rollout(now);
        }
    }

    /// A replacement failed (`why`): it is stopped, and the old worker keeps its slot if it
    /// still serves; a roll-out it belonged to is aborted.
    pub(crate) fn replacement_failed(&mut self, new: WorkerId, why: &str, now: Instant) {
        let Some(replacement) = self.rollouts.replacements.remove(&new) else {
            return;
        };
        let old = replacement.old;
        tracing::warn!(old = old.0, new = new.0, why, "replacement failed");
        self.ask_to_disconnect(new, now);
        let slot = self.workers.get(&new).map(|w| w.slot);
        // It keeps its slot only if it still serves: not one hung (being killed) or whose
        // channel closed, or the slot would wait for its death to be refilled.
        let old_serves = !replacement.old_first
            && self.workers.get(&old).is_some_and(|w| {
                !w.reaped && !w.leaving.is_leaving() && w.fault.is_none() && w.control_open
            });
        if let Some(record) = self.workers.get_mut(&old) {
            record.replaced_by = None;
            if replacement.purpose == Purpose::Recycle {
                // Recycling it again would fail the same way: keep it.
                record.recycle_at = None;
            }
        }
        if let Some(slot) = slot {
            if old_serves {
                if let Some(state) = self.slot_mut(slot) {
                    state.worker = Some(old);
                }
            } else if let Some(state) = self.slot_mut(slot) {
                // Nobody serves in this slot any more: refill it as after a failure.
                if state.worker == Some(new) {
                    state.worker = None;
                    state.failures += 1;
                    self.schedule_respawn(slot, new, now);
                }
            }
        }
        if let Purpose::Rollout(id) = replacement.purpose {
            if self.rollouts.current.as_ref().is_some_and(|r| r.id == id) {
                let reason = format!("replacement {new} for {old} failed: {why}");
                self.finish_rollout(Some(reason), now);
            }
        }
    }

    /// Forgets a replacement that no longer matters (its slot was removed).
    fn forget_replacement(&mut self, new: WorkerId) {
        if let Some(replacement) = self.rollouts.replacements.remove(&new) {
            if let Some(rollout) = self.rollouts.current.as_mut() {
                if rollout.active.remove(&new) {
                    rollout.total -= 1;
                }
            }
            if let Some(record) = self.workers.get_mut(&replacement.old) {
                record.replaced_by = None;
            }
        }
    }

    /// Replacements whose readiness time is up fail.
    pub(crate) fn replacements_overdue(&mut self, now: Instant) {
        let overdue: Vec<WorkerId> = self
            .rollouts
            .replacements
            .iter()
            .filter(|(_, r)| r.deadline <= now)
            .map(|(&new, _)| new)
            .collect();
        let timeout = self.settings.readiness_timeout;
        for new in overdue {
            if let Some(record) = self.workers.get_mut(&new) {
                record.fault = Some(format!("not ready within {timeout:?}"));
            }
            self.replacement_failed(new, &format!("not ready within {timeout:?}"), now);
        }
    }

    // ----- recycling -----

    /// Recycles the worker if it took its share of connections.
    pub(crate) fn maybe_recycle_after_connections(&mut self, worker: WorkerId, now: Instant) {
        let Some(record) = self.workers.get(&worker) else {
            return;
        };
        let taken = record.connections_acked.max(record.reported_connections);
        if record.recycle_at.is_some_and(|limit| taken >= limit) {
            self.recycle(worker, format!("took {taken} connections"), now);
        }
    }

    /// The worker's memory, as the shell measured it after [`Action::MeasureMemory`].
    pub(crate) fn handle_memory(&mut self, worker: WorkerId, memory: Memory, now: Instant) {
        let Some(record) = self.workers.get_mut(&worker) else {
            return;
        };
        record.memory = Some(memory);
        if record.recycle_at.is_none() {
            return; // It was recycled already, or its recycling failed.
        }
        if let Some(limit) = self.settings.recycle.max_memory.filter(|&l| memory.uss > l) {
            let reason = format!("uses {} bytes of its own, over {limit}", memory.uss);
            self.recycle(worker, reason, now);
        }
    }

    fn recycle(&mut self, worker: WorkerId, reason: String, now: Instant) {
        if self.stopping || !self.may_replace(worker) {
            return;
        }
        if let Some(record) = self.workers.get_mut(&worker) {
            record.recycle_at = None;
        }
        tracing::info!(worker = worker.0, %reason, "recycling worker");
        self.emit(Event::Recycling { worker, reason });
        self.start_replacement(worker, Purpose::Recycle, false, now);
    }

    /// Asks the shell to measure memory when it is time (only under a memory limit: a
    /// status measures on its own).
    pub(crate) fn measure_memory_if_due(&mut self, now: Instant) {
        if self.settings.recycle.max_memory.is_none() || self.memory_due.is_some_and(|at| at > now)
        {
            return;
        }
        self.memory_due = Some(now + MEMORY_INTERVAL);
        let workers: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| !w.reaped && w.pid.is_some())
            .map(|w| w.id)
            .collect();
        if !workers.is_empty() {
            self.actions.push_back(Action::MeasureMemory { workers });
        }
    }

    // ----- hung workers -----

    /// Declares hung the workers that held un-acked connections, or sent no heartbeat, for
    /// the hang timeout.
    pub(crate) fn check_hung(&mut self, now: Instant) {
        let Some(timeout) = self.settings.hang_timeout else {
            return;
        };
        for worker in self.workers.values_mut() {
            if self.listeners.in_flight(worker.id) == 0 {
                // What it held went elsewhere (a listener it closed): nothing to wait for.
                worker.stalled_since = None;
            }
        }
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for worker in ids {
            // One at a time: declaring one hung changes the others (its roll-out is
            // aborted, the one queued behind it asks workers to leave).
            if let Some(reason) = self.hang_of(worker, timeout, now) {
                self.declare_hung(worker, reason, now);
            }
        }
    }

    /// Why the worker is hung at `now`, if it is.
    fn hang_of(&self, worker: WorkerId, timeout: Duration, now: Instant) -> Option<String> {
        let w = self.workers.get(&worker)?;
        if w.reaped || w.fault.is_some() || w.killed {
            return None;
        }
        let held = self.listeners.in_flight(worker);
        if held > 0 && w.stalled_since.is_some_and(|since| since + timeout <= now) {
            Some(format!(
                "held {held} handed connections without acknowledging any for {timeout:?}"
            ))
        } else if sends_heartbeats(w) && w.heartbeat_at.is_some_and(|at| at + timeout <= now) {
            Some(format!("sent no heartbeat for {timeout:?}"))
        } else {
            None
        }
    }

    /// Starts the hang clock of the workers handed connections since it last looked (once
    /// every decision of the turn is taken, hung workers' redispatched connections too).
    pub(crate) fn stamp_stalls(&mut self, now: Instant) {
        if !std::mem::take(&mut self.stamp_stalls) || self.settings.hang_timeout.is_none() {
            return;
        }
        for worker in self.workers.values_mut() {
            if !worker.reaped
                && worker.fault.is_none()
                && !worker.killed
                && worker.stalled_since.is_none()
                && self.listeners.in_flight(worker.id) > 0
            {
                worker.stalled_since = Some(now);
            }
        }
    }

    /// When the hang clock must look at once: connections were handed out since it last
    /// did (`started_at`, in the past, means at once). A shell that runs
    /// [`handle_timeout`](Self::handle_timeout) only when it is due would otherwise never
    /// start the clock of a worker that takes connections and never acks them.
    pub(crate) fn stamp_due(&self) -> Option<Instant> {
        self.started_at
            .filter(|_| self.stamp_stalls && self.settings.hang_timeout.is_some())
    }

    /// The next time [`check_hung`](Self::check_hung) may find a hung worker.
    pub(crate) fn hang_deadlines(&self) -> impl Iterator<Item = Instant> + '_ {
        let timeout = self.settings.hang_timeout;
        self.workers
            .values()
            .filter(move |w| timeout.is_some() && !w.reaped && w.fault.is_none() && !w.killed)
            .flat_map(move |w| {
                let heartbeat = sends_heartbeats(w).then_some(w.heartbeat_at).flatten();
                [w.stalled_since, heartbeat]
                    .into_iter()
                    .flatten()
                    .filter_map(move |at| timeout.map(|t| at + t))
            })
    }

    fn declare_hung(&mut self, worker: WorkerId, reason: String, now: Instant) {
        // Its slot may have gone to another worker already (a replacement on its way, a
        // respawn after its own replacement failed): that one serves it.
        let owns_slot = self.owns_slot(worker);
        let Some(record) = self.workers.get_mut(&worker) else {
            return;
        };
        record.fault = Some(format!("hung: {reason}"));
        record.stalled_since = None;
        let (slot, leaving) = (record.slot, record.leaving.is_leaving());
        tracing::error!(worker = worker.0, pid = record.pid, %reason, "worker hung; its connections go to others, then SIGABRT, SIGKILL");
        self.emit(Event::Hung {
            worker,
            reason: reason.clone(),
        });
        // Nothing more for it; what it holds un-acked goes to the others now.
        for listener in self.handoffs_of(worker) {
            if sabotaged!(self, KeepHungConnections) {
                self.drain_worker_in(listener, worker);
                continue;
            }
            self.handoff_closed(worker, listener);
        }
        let shared: Vec<ListenerId> = self
            .workers
            .get_mut(&worker)
            .map(|w| std::mem::take(&mut w.shared).into_iter().collect())
            .unwrap_or_default();
        for listener in shared {
            self.listeners.leave(listener, worker);
        }
        self.actions.push_back(Action::Signal {
            worker,
            signal: Signal::SIGABRT,
            group: false,
        });
        if let Some(record) = self.workers.get_mut(&worker) {
            record.kill_no_later_than(now + HUNG_KILL_GRACE);
        }
        if self.rollouts.replacements.contains_key(&worker) {
            self.replacement_failed(worker, &format!("hung: {reason}"), now);
            return;
        }
        if !leaving && owns_slot && !self.stopping && self.settings.respawn != Respawn::Never {
            // Its replacement starts now, not when it is finally gone.
            let new = self.spawn_into(slot, now);
            if let Some(record) = self.workers.get_mut(&worker) {
                record.replaced_by = Some(new);
            }
            self.restarts += 1;
            if let Some(state) = self.slot_mut(slot) {
                state.restarts += 1;
            }
        }
    }

    // ----- the crash-loop guard and fatal failures -----

    /// Counts a failure; too many within the guard's window stop the cluster.
    pub(crate) fn count_failure(&mut self, why: &str, now: Instant) {
        let (limit, within) = self.settings.crash_loop;
        self.failure_times.push_back(now);
        while self
            .failure_times
            .front()
            .is_some_and(|&at| now.saturating_duration_since(at) > within)
        {
            self.failure_times.pop_front();
        }
        let failures = self.failure_times.len();
        if failures >= limit as usize && !self.stopping && !sabotaged!(self, CrashLoopNeverTrips) {
            self.fail(
                Fatal::CrashLoop {
                    failures,
                    within,
                    last: why.to_owned(),
                },
                now,
            );
        }
    }

    /// Stops the cluster for a failure that a respawn cannot fix. The cause is not logged
    /// here: the primary's `run` returns it, for the program to report once.
    pub(crate) fn fail(&mut self, fatal: Fatal, now: Instant) {
        if self.fatal.is_none() {
            tracing::warn!(
                failure = fatal.kind(),
                "a failure that respawning cannot fix; stopping the cluster"
            );
            self.fatal = Some(fatal);
        }
        self.stop(true, now);
    }

    /// How the supervision ended (meaningful once it finished).
    pub(crate) fn ending(&self) -> Ending {
        match &self.fatal {
            Some(fatal) => Ending::Fatal(fatal.clone()),
            None if self.forced_kills > 0 => Ending::Forced {
                killed: self.forced_kills,
            },
            None => Ending::Clean,
        }
    }
}
