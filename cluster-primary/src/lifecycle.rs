//! Workers' lives: spawning, reaping, replacing, and stopping the whole cluster; the timers
//! that drive them.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use cluster_ipc::{ListenerId, SlotId, WorkerId};
use mio::Interest;
use mio::unix::SourceFd;

use crate::cluster::{Cluster, Leaving, Registered, Source, Worker, pid_of};
use crate::event::{Event, ExitStatus, WorkerState};
use crate::spawn::spawn_worker;

/// A worker that exits sooner than this after its start, or before it listened, counts as a
/// failed start of its slot.
const STABLE_UPTIME: Duration = Duration::from_secs(1);
/// The first delay before respawning a slot that keeps failing; it doubles up to the cap.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How long to wait before respawning a slot after `failures` failed starts in a row: at once
/// for the first, then 100 ms, 200 ms, ... up to 5 s, so that a worker that cannot start
/// never turns into a tight fork loop.
pub(crate) fn respawn_delay(failures: u32) -> Duration {
    match failures {
        0 | 1 => Duration::ZERO,
        n => FIRST_BACKOFF
            .saturating_mul(1 << (n - 2).min(16))
            .min(MAX_BACKOFF),
    }
}

impl Cluster {
    /// Starts the configured number of workers, one per slot.
    pub(crate) fn spawn_all(&mut self) {
        for slot in 0..self.slots.len() as u32 {
            self.spawn_into(SlotId(slot));
        }
    }

    /// Starts a worker in `slot`. A failed spawn counts as a failed start of the slot.
    pub(crate) fn spawn_into(&mut self, slot: SlotId) {
        let id = WorkerId(self.next_worker);
        self.next_worker += 1;
        let spawned = match spawn_worker(&self.config, id, slot) {
            Ok(spawned) => spawned,
            Err(err) => {
                tracing::error!(%err, %slot, "could not start a worker");
                self.slot_failed(slot);
                return;
            }
        };
        let pid = spawned.child.id();
        let control_token = self.allocate_token(Source::Control(id));
        let control = match Registered::new(&self.registry, spawned.control, control_token) {
            Ok(control) => Some(control),
            Err(err) => {
                tracing::error!(%err, "could not watch a worker's channel");
                None
            }
        };
        let pidfd = spawned.pidfd.and_then(|pidfd| {
            let token = self.allocate_token(Source::Pidfd(id));
            match self.registry.register(
                &mut SourceFd(&pidfd.as_raw_fd()),
                token,
                Interest::READABLE,
            ) {
                Ok(()) => Some((pidfd, token)),
                Err(err) => {
                    tracing::warn!(%err, "could not watch a pidfd; falling back to SIGCHLD");
                    self.release_token(token);
                    None
                }
            }
        });
        if pidfd.is_none() {
            self.watch_sigchld();
        }
        let now = Instant::now();
        let worker = Worker {
            id,
            slot,
            pid,
            child: spawned.child,
            pidfd,
            control,
            state: WorkerState::Starting,
            spawned_at: now,
            reached_listening: false,
            leaving: Leaving::default(),
            kill_at: None,
            handoffs: BTreeMap::new(),
            shared: Default::default(),
            connections_handed: 0,
            reported_open: None,
            disconnect_reported: false,
            reaped: false,
        };
        tracing::info!(worker = %id, pid, %slot, "worker started");
        self.workers.insert(id, worker);
        if let Some(state) = self.slots.get_mut(slot.0 as usize) {
            state.worker = Some(id);
            state.respawn_at = None;
        }
        self.events.push_back(Event::Fork {
            worker: id,
            pid,
            slot,
        });
        if self.workers.get(&id).is_some_and(|w| w.control.is_none()) {
            self.control_closed(id);
        }
    }

    fn watch_sigchld(&mut self) {
        if self.sigchld {
            return;
        }
        let added = match &self.signals {
            Some(signals) => signals.add_signal(libc::SIGCHLD).is_ok(),
            None => match signal_hook_mio::v1_0::Signals::new([libc::SIGCHLD]) {
                Ok(mut signals) => {
                    let registered = self
                        .registry
                        .register(&mut signals, crate::cluster::SIGNALS, Interest::READABLE)
                        .is_ok();
                    self.signals = Some(signals);
                    registered
                }
                Err(_) => false,
            },
        };
        if !added {
            tracing::error!(
                "cannot watch SIGCHLD; workers are reaped only when their channel closes"
            );
        }
        self.sigchld = true;
    }

    /// Reaps a worker if it exited.
    pub(crate) fn try_reap(&mut self, id: WorkerId) {
        let Some(worker) = self.workers.get_mut(&id).filter(|worker| !worker.reaped) else {
            return;
        };
        match worker.child.try_wait() {
            Ok(Some(status)) => self.worker_exited(id, status.into()),
            Ok(None) => {}
            Err(err) => tracing::warn!(worker = %id, %err, "waitpid failed"),
        }
    }

    /// Tries to reap every worker (SIGCHLD coalesces, so one signal may stand for several).
    pub(crate) fn try_reap_all(&mut self) {
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            self.try_reap(id);
        }
    }

    /// A worker process is gone: read what its sockets still hold, tell the application, and
    /// decide about its slot. The worker stays listed until its `Exit` event is delivered
    /// ([`Cluster::forget_exited`]).
    fn worker_exited(&mut self, id: WorkerId, status: ExitStatus) {
        // Its channel ends now; read it to the end so that nothing it said is lost and the
        // Disconnect event comes before Exit.
        self.on_control_readable(id);
        self.control_closed(id);
        self.drain_handoffs(id);
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        worker.reaped = true;
        // Its pid may be reused from now on: never signal it again.
        worker.kill_at = None;
        let pidfd = worker.pidfd.take();
        let after_disconnect = worker.leaving.is_leaving();
        let pid = worker.pid;
        if let Some((pidfd, token)) = pidfd {
            let _ = self.registry.deregister(&mut SourceFd(&pidfd.as_raw_fd()));
            self.release_token(token);
        }
        if status.success() || after_disconnect {
            tracing::info!(worker = %id, pid, %status, after_disconnect, "worker exited");
        } else {
            tracing::warn!(worker = %id, pid, %status, "worker exited");
        }
        self.events.push_back(Event::Exit {
            worker: id,
            pid,
            status,
            after_disconnect,
        });
        self.settle_slot(id);
    }

    /// Forgets a reaped worker, as its `Exit` event goes to the application.
    pub(crate) fn forget_exited(&mut self, id: WorkerId) {
        if self.workers.get(&id).is_some_and(|worker| worker.reaped) {
            self.workers.remove(&id);
        }
    }

    /// Frees the worker's slot and refills it, unless the primary itself asked the worker to
    /// go (a requested disconnect or a stop). A worker that left of its own accord (its
    /// `disconnect()`, or a SIGTERM from an operator) is replaced once it is gone, so the
    /// cluster keeps its size; one that retired was replaced before it left.
    fn settle_slot(&mut self, id: WorkerId) {
        let Some(worker) = self.workers.get(&id) else {
            return;
        };
        let slot = worker.slot;
        let Some(state) = self.slots.get_mut(slot.0 as usize) else {
            return;
        };
        if state.worker != Some(worker.id) {
            return; // Its slot went to a replacement already (it retired).
        }
        state.worker = None;
        let stable = worker.reached_listening && worker.spawned_at.elapsed() >= STABLE_UPTIME;
        state.failures = if stable { 0 } else { state.failures + 1 };
        if worker.leaving.asked || !self.config.respawn || self.stopping {
            return;
        }
        self.schedule_respawn(slot);
    }

    fn slot_failed(&mut self, slot: SlotId) {
        if let Some(state) = self.slots.get_mut(slot.0 as usize) {
            state.worker = None;
            state.failures += 1;
        }
        if self.config.respawn && !self.stopping {
            self.schedule_respawn(slot);
        }
    }

    fn schedule_respawn(&mut self, slot: SlotId) {
        let Some(state) = self.slots.get_mut(slot.0 as usize) else {
            return;
        };
        let delay = respawn_delay(state.failures);
        self.restarts += 1;
        if delay.is_zero() {
            self.spawn_into(slot);
        } else {
            tracing::warn!(
                %slot,
                failures = state.failures,
                ?delay,
                "slot keeps failing; backing off"
            );
            state.respawn_at = Some(Instant::now() + delay);
        }
    }

    /// Begins stopping: no more accepting, every worker asked to disconnect (or killed, when
    /// not graceful or already stopping).
    pub(crate) fn begin_stop(&mut self, graceful: bool) {
        let graceful = graceful && !self.stopping;
        let now = Instant::now();
        self.stopping = true;
        for slot in &mut self.slots {
            slot.respawn_at = None;
        }
        let listener_ids: Vec<ListenerId> = self.listeners.keys().copied().collect();
        for listener_id in listener_ids {
            self.set_accepting(listener_id, false);
        }
        let ids: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|worker| !worker.reaped)
            .map(|worker| worker.id)
            .collect();
        tracing::info!(graceful, workers = ids.len(), "stopping");
        for id in ids {
            if graceful {
                let _ = self.disconnect(id);
            } else if let Some(worker) = self.workers.get_mut(&id) {
                worker.leaving.asked = true;
                worker.kill_at = Some(now);
            }
        }
        self.kill_overdue(now);
    }

    /// SIGKILLs (the process group of) every worker whose time is up.
    fn kill_overdue(&mut self, now: Instant) {
        for worker in self.workers.values_mut() {
            if worker.kill_at.is_some_and(|at| at <= now) {
                tracing::warn!(worker = %worker.id, pid = worker.pid, "killing worker");
                let _ = nix::sys::signal::killpg(pid_of(worker.pid), nix::sys::signal::SIGKILL);
                let _ = nix::sys::signal::kill(pid_of(worker.pid), nix::sys::signal::SIGKILL);
                worker.kill_at = None;
            }
        }
    }

    /// Workers that did not say Hello in time are killed; their exit counts as a failed start.
    fn enforce_start_timeout(&mut self, now: Instant) {
        let start_timeout = self.config.start_timeout;
        for worker in self.workers.values_mut() {
            if worker.state == WorkerState::Starting
                && worker.kill_at.is_none()
                && worker.spawned_at + start_timeout <= now
            {
                tracing::error!(worker = %worker.id, "no Hello within the start timeout");
                worker.kill_at = Some(now);
            }
        }
    }

    /// Does whatever is due at `now`.
    pub(crate) fn on_time(&mut self, now: Instant) {
        self.enforce_start_timeout(now);
        self.kill_overdue(now);
        self.resume_after_fd_backoff(now);
        let due: Vec<SlotId> = (0..self.slots.len() as u32)
            .filter(|&slot| {
                self.slots[slot as usize]
                    .respawn_at
                    .is_some_and(|at| at <= now)
            })
            .map(SlotId)
            .collect();
        for slot in due {
            if !self.stopping {
                self.spawn_into(slot);
            }
        }
        if self.sigchld {
            // Signals coalesce and a handler may be installed late: poll too.
            self.try_reap_all();
        }
    }

    /// The next time something is due.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let start_timeout = self.config.start_timeout;
        let workers = self.workers.values().flat_map(|worker| {
            let start = (worker.state == WorkerState::Starting && worker.kill_at.is_none())
                .then(|| worker.spawned_at + start_timeout);
            [worker.kill_at, start]
        });
        let slots = self.slots.iter().map(|slot| slot.respawn_at);
        let listeners = self
            .listeners
            .values()
            .map(|listener| match &listener.delivery {
                crate::listen::Delivery::RoundRobin(d) => d.fd_backoff_until,
                crate::listen::Delivery::Shared => None,
            });
        let sigchld_poll = self
            .sigchld
            .then(|| Instant::now() + Duration::from_millis(500));
        workers
            .chain(slots)
            .chain(listeners)
            .chain([sigchld_poll])
            .flatten()
            .min()
    }

    /// True once no worker is left and none will be started: the cluster stopped, or
    /// respawning is off and the last worker exited.
    pub(crate) fn is_finished(&self) -> bool {
        let none_coming = self.stopping
            || (!self.config.respawn && self.slots.iter().all(|slot| slot.respawn_at.is_none()));
        self.workers.is_empty() && none_coming
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn respawn_backs_off_from_the_second_failure_and_is_capped() {
        assert_eq!(respawn_delay(0), Duration::ZERO);
        assert_eq!(respawn_delay(1), Duration::ZERO);
        assert_eq!(respawn_delay(2), Duration::from_millis(100));
        assert_eq!(respawn_delay(3), Duration::from_millis(200));
        assert_eq!(respawn_delay(10), MAX_BACKOFF);
        assert_eq!(respawn_delay(u32::MAX), MAX_BACKOFF);
    }
}
