//! What the application can do with the cluster from its event hook, and the shell's side of
//! it: the fds, processes and channels behind the supervisor core's ids.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::time::Instant;

use cluster_ipc::proto::{Encoded, ToWorker};
use cluster_ipc::{ListenerId, UserMessage, WorkerId};
use mio::Registry;
use serde::Serialize;

use crate::config::Config;
use crate::event::{Event, Status, WorkerInfo};
use crate::shell::Shell;
use crate::supervisor::{Refusal, Settings, Supervisor};
use crate::{Error, Signal};

/// What runs once no worker is left (see [`Cluster::disconnect_all`]).
pub(crate) type AllGone = Box<dyn FnOnce(&mut Cluster)>;

/// The primary's view of the cluster. The application's event hook gets `&mut Cluster` to
/// look around and act: send messages, disconnect or kill workers, stop.
///
/// Every decision is the supervisor core's (`supervisor` module); this type asks it, and
/// carries out what it says with the shell's fds and processes.
pub struct Cluster {
    pub(crate) core: Supervisor,
    pub(crate) shell: Shell,
    /// Events to hand to the application, in order.
    pub(crate) events: VecDeque<Event>,
    pub(crate) on_all_gone: Vec<AllGone>,
}

impl Cluster {
    pub(crate) fn new(config: Config, registry: Registry) -> Cluster {
        Cluster {
            core: Supervisor::new(Settings::of(&config, std::process::id())),
            shell: Shell::new(config, registry),
            events: VecDeque::new(),
            on_all_gone: Vec::new(),
        }
    }

    /// Carries out everything the core decided, feeding it the answers that come at once
    /// (a spawned pid, a bind's address), until it has nothing more to say.
    pub(crate) fn pump(&mut self) {
        while let Some(action) = self.core.poll_action() {
            let now = Instant::now();
            if let Some(event) = self.shell.carry_out(action, &mut self.core, now) {
                self.events.push_back(event);
            }
        }
    }

    /// The workers whose `Exit` event has not been delivered yet, by id (a worker that is
    /// gone but whose `Exit` is still to come is listed as
    /// [`WorkerState::Disconnected`](crate::WorkerState::Disconnected)).
    pub fn workers(&self) -> Vec<WorkerInfo> {
        let mut workers = self.core.workers(Instant::now());
        measure_memory(&mut workers);
        workers
    }

    /// One worker whose `Exit` event has not been delivered yet.
    pub fn worker(&self, id: WorkerId) -> Option<WorkerInfo> {
        let mut info = self.core.worker(id, Instant::now())?;
        measure_memory(std::slice::from_mut(&mut info));
        Some(info)
    }

    /// A snapshot of the whole cluster.
    pub fn status(&self) -> Status {
        let mut status = self.core.status(Instant::now());
        measure_memory(&mut status.workers);
        status
    }

    /// Sends a user message to one worker. A message longer than the message limit
    /// ([`Builder::max_message_len`](crate::Builder::max_message_len)) is refused with an
    /// error that names the limit; a worker that does not read fast enough makes this fail
    /// with a full send queue once too much waits for it. Nothing is dropped silently.
    pub fn send<T: Serialize + ?Sized>(&mut self, id: WorkerId, msg: &T) -> Result<(), Error> {
        let message = self.encode_user(msg)?;
        self.send_encoded(id, &message)
    }

    /// Sends an already encoded control message to one worker.
    pub(crate) fn send_encoded(
        &mut self,
        id: WorkerId,
        message: &Encoded<ToWorker>,
    ) -> Result<(), Error> {
        self.core
            .may_send(id)
            .map_err(|refusal| refused(refusal, id))?;
        self.shell.send_encoded(id, message)
    }

    /// Sends a user message to every worker that said Hello and is not disconnected.
    /// Returns how many got it. A message over the message limit is refused before any is
    /// sent.
    pub fn broadcast<T: Serialize + ?Sized>(&mut self, msg: &T) -> Result<usize, Error> {
        let message = self.encode_user(msg)?;
        self.broadcast_encoded(&message)
    }

    /// Encodes a user message once, as the `User` control message every worker gets,
    /// refusing one over the message limit before anything is queued.
    pub(crate) fn encode_user<T: Serialize + ?Sized>(
        &self,
        msg: &T,
    ) -> Result<Encoded<ToWorker>, Error> {
        encode_user(msg, &self.shell.config.control_limits)
    }

    /// Sends an encoded message to every worker that said Hello and is not disconnected.
    pub(crate) fn broadcast_encoded(
        &mut self,
        message: &Encoded<ToWorker>,
    ) -> Result<usize, Error> {
        let mut sent = 0;
        for id in self.core.reachable_workers() {
            match self.shell.send_encoded(id, message) {
                Ok(()) => sent += 1,
                Err(Error::NoSuchWorker { .. } | Error::Ipc(cluster_ipc::Error::Closed)) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(sent)
    }

    /// Asks a worker to disconnect: it stops taking connections, finishes the ones it has and
    /// exits; after the shutdown timeout it is killed. It is not replaced.
    pub fn disconnect(&mut self, id: WorkerId) -> Result<(), Error> {
        let result = self.core.disconnect(id, Instant::now());
        self.pump();
        result.map_err(|refusal| refused(refusal, id))
    }

    /// Asks every worker to disconnect; `on_done` runs once none is left.
    pub fn disconnect_all(&mut self, on_done: impl FnOnce(&mut Cluster) + 'static) {
        for info in self.workers() {
            let _ = self.core.disconnect(info.id, Instant::now());
        }
        self.pump();
        self.on_all_gone.push(Box::new(on_done));
    }

    /// Sends a signal to a worker process. A worker that dies of it is replaced, unless the
    /// primary had asked it to disconnect.
    pub fn kill(&mut self, id: WorkerId, signal: Signal) -> Result<(), Error> {
        self.core
            .may_signal(id)
            .map_err(|refusal| refused(refusal, id))?;
        self.shell.signal(id, signal, false)
    }

    /// Stops the cluster: stop accepting, disconnect every worker, kill what is left after the
    /// shutdown timeout, then return from [`Primary::run`](crate::Primary::run). With
    /// `graceful` false, or when already stopping, every worker is killed at once.
    pub fn stop(&mut self, graceful: bool) {
        self.core.stop(graceful, Instant::now());
        self.pump();
    }

    /// Starts a rolling restart: every worker running now is replaced, by default one at a
    /// time (see [`Builder::rollout`](crate::Builder::rollout)): its replacement starts,
    /// and once it listens on every address the old one did, the old one drains and leaves.
    /// A replacement that fails aborts the roll-out and the old workers keep serving.
    /// Returns the roll-out's number, which the `Rollout*` events carry; a roll-out asked
    /// for while one is in progress starts when that one ends (several are one).
    pub fn reload(&mut self) -> Result<u64, Error> {
        let result = self.core.reload(Instant::now());
        self.pump();
        result.map_err(|refusal| refused(refusal, WorkerId(0)))
    }

    /// Sets the number of workers (at least one): new slots get a worker at once, the
    /// workers of removed slots (the highest) drain and leave.
    pub fn set_workers(&mut self, count: usize) -> Result<(), Error> {
        let result = self.core.set_workers(count, Instant::now());
        self.pump();
        result.map_err(|refusal| refused(refusal, WorkerId(0)))
    }

    /// Starts one more worker (Node's `cluster.fork(env)`): the cluster grows by one slot,
    /// and this worker, and any that replaces it, gets `env` added to its environment.
    pub fn fork<I, K, V>(&mut self, env: I) -> Result<WorkerId, Error>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<OsString>,
        V: Into<OsString>,
    {
        let env = env.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        let result = self.core.fork(env, Instant::now());
        self.pump();
        result.map_err(|refusal| refused(refusal, WorkerId(0)))
    }

    /// True once the cluster is stopping.
    pub fn is_stopping(&self) -> bool {
        self.core.is_stopping()
    }

    /// Hands the next event to the application: the core forgets a worker as its `Exit`
    /// goes out (and the shell lets go of what it still held of it).
    pub(crate) fn next_event(&mut self) -> Option<Event> {
        let event = self.events.pop_front()?;
        if let Event::Exit { worker, .. } = &event {
            self.core.handle_exit_delivered(*worker);
            self.shell.forget(*worker);
        }
        Some(event)
    }

    /// The listeners with connections left to accept.
    pub(crate) fn accept_ready(&self) -> Vec<ListenerId> {
        self.shell.accept_ready.iter().copied().collect()
    }

    /// Whether the loop should not sleep.
    pub(crate) fn has_accepts_waiting(&self) -> bool {
        !self.shell.accept_ready.is_empty()
    }
}

/// Encodes a user message once, as the `User` control message a worker gets, under the
/// control channels' limits: one over the message limit is refused before anything is queued.
pub(crate) fn encode_user<T: Serialize + ?Sized>(
    msg: &T,
    limits: &cluster_ipc::Limits,
) -> Result<Encoded<ToWorker>, Error> {
    let user = UserMessage::encode(msg, limits)?;
    Ok(Encoded::new(&ToWorker::User(user), limits)?)
}

/// Fills in the workers' memory, measured now (a snapshot is rare; reading a small `/proc`
/// file per worker is cheap next to it).
fn measure_memory(workers: &mut [WorkerInfo]) {
    for worker in workers.iter_mut().filter(|w| w.pid != 0) {
        if let Some(memory) = crate::memory::of_process(worker.pid) {
            worker.memory = Some(memory);
        }
    }
}

fn refused(refusal: Refusal, worker: WorkerId) -> Error {
    match refusal {
        Refusal::NoSuchWorker => Error::NoSuchWorker { worker },
        Refusal::Stopping => Error::Stopping,
        Refusal::NoWorkers => Error::InvalidConfig {
            reason: "a cluster needs at least one worker".into(),
        },
    }
}
