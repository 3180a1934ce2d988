//! The primary's state, and what the application can do with it from its event hook.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::os::fd::OwnedFd;
use std::time::Instant;

use cluster_ipc::proto::{Encoded, PrimaryControl, PrimaryHandoff, ToWorker};
use cluster_ipc::{Channel, ListenerId, SlotId, UserMessage, WorkerId};
use mio::{Interest, Registry, Token};
use serde::Serialize;

use crate::config::Config;
use crate::event::{Event, Status, WorkerInfo, WorkerState};
use crate::listen::{Delivery, ListenKey, Listener};
use crate::{Error, Signal};

/// What a registered token stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Waker,
    Signals,
    Listener(ListenerId),
    Control(WorkerId),
    Handoff(WorkerId, ListenerId),
    Pidfd(WorkerId),
}

pub(crate) const WAKER: Token = Token(0);
pub(crate) const SIGNALS: Token = Token(1);

/// A channel registered in the loop, with the interest it is registered for.
pub(crate) struct Registered<P> {
    pub(crate) channel: Channel<P>,
    pub(crate) token: Token,
    pub(crate) writable: bool,
}

impl<P> Registered<P> {
    /// Registers `channel` for reading under `token`.
    pub(crate) fn new(
        registry: &Registry,
        mut channel: Channel<P>,
        token: Token,
    ) -> Result<Registered<P>, Error> {
        registry
            .register(&mut channel, token, Interest::READABLE)
            .map_err(|source| Error::io("register channel", source))?;
        Ok(Registered {
            channel,
            token,
            writable: false,
        })
    }

    /// Sends what the channel's queue holds, as far as the socket takes it, and keeps the
    /// interest in step. A failure surfaces at the next read of the channel.
    pub(crate) fn flush(&mut self, registry: &Registry) {
        let _ = self.channel.flush();
        self.update_interest(registry);
    }

    /// Asks for writable events exactly while frames wait in the channel's queue.
    pub(crate) fn update_interest(&mut self, registry: &Registry) {
        let wants = self.channel.wants_write() && !self.channel.is_send_closed();
        if wants == self.writable {
            return;
        }
        let interest = if wants {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        match registry.reregister(&mut self.channel, self.token, interest) {
            Ok(()) => self.writable = wants,
            Err(err) => tracing::warn!(%err, "could not change a channel's interest"),
        }
    }

    pub(crate) fn deregister(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.channel);
    }
}

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

/// One worker process.
pub(crate) struct Worker {
    pub(crate) id: WorkerId,
    pub(crate) slot: SlotId,
    pub(crate) pid: u32,
    pub(crate) child: std::process::Child,
    pub(crate) pidfd: Option<(OwnedFd, Token)>,
    pub(crate) control: Option<Registered<PrimaryControl>>,
    pub(crate) state: WorkerState,
    pub(crate) spawned_at: Instant,
    pub(crate) reached_listening: bool,
    pub(crate) leaving: Leaving,
    /// Killed (SIGKILL to its process group) at this time unless it exited first.
    pub(crate) kill_at: Option<Instant>,
    /// Round-robin listeners: the handoff socket for each, by listener id.
    pub(crate) handoffs: BTreeMap<ListenerId, Registered<PrimaryHandoff>>,
    /// Shared listeners it holds.
    pub(crate) shared: BTreeSet<ListenerId>,
    pub(crate) connections_handed: u64,
    /// The open-connection count it last reported.
    pub(crate) reported_open: Option<u32>,
    /// The `Disconnect` event was sent.
    pub(crate) disconnect_reported: bool,
    /// Reaped: the process is gone and its `Exit` event is queued. The worker stays listed,
    /// disconnected, until the event is delivered, so that a hook handling its `Disconnect`
    /// (delivered first) always finds it.
    pub(crate) reaped: bool,
}

/// One worker slot: the configured number of workers is the number of slots.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    pub(crate) worker: Option<WorkerId>,
    /// Workers of this slot that failed in a row (exited before listening, or within a
    /// second of their start).
    pub(crate) failures: u32,
    pub(crate) respawn_at: Option<Instant>,
}

/// What runs once no worker is left (see [`Cluster::disconnect_all`]).
pub(crate) type AllGone = Box<dyn FnOnce(&mut Cluster)>;

/// The primary's view of the cluster. The application's event hook gets `&mut Cluster` to
/// look around and act: send messages, disconnect or kill workers, stop.
pub struct Cluster {
    pub(crate) config: Config,
    pub(crate) registry: Registry,
    pub(crate) tokens: BTreeMap<Token, Source>,
    next_token: usize,
    pub(crate) workers: BTreeMap<WorkerId, Worker>,
    pub(crate) next_worker: u64,
    pub(crate) slots: Vec<Slot>,
    pub(crate) listeners: BTreeMap<ListenerId, Listener>,
    pub(crate) listener_keys: BTreeMap<ListenKey, ListenerId>,
    pub(crate) next_listener: u64,
    /// Round-robin listeners with connections left to accept (accepting is bounded per turn
    /// so that one busy listener cannot starve the rest of the loop).
    pub(crate) accept_ready: BTreeSet<ListenerId>,
    pub(crate) events: VecDeque<Event>,
    pub(crate) stopping: bool,
    pub(crate) ready_sent: bool,
    pub(crate) restarts: u64,
    pub(crate) on_all_gone: Vec<AllGone>,
    pub(crate) primary_pid: u32,
    /// Signals, when the primary handles any (its own, or SIGCHLD for want of pidfds).
    pub(crate) signals: Option<signal_hook_mio::v1_0::Signals>,
    pub(crate) sigchld: bool,
}

impl Cluster {
    pub(crate) fn new(config: Config, registry: Registry) -> Cluster {
        let slots = (0..config.workers).map(|_| Slot::default()).collect();
        Cluster {
            config,
            registry,
            tokens: BTreeMap::new(),
            next_token: 2,
            workers: BTreeMap::new(),
            next_worker: 1,
            slots,
            listeners: BTreeMap::new(),
            listener_keys: BTreeMap::new(),
            next_listener: 1,
            accept_ready: BTreeSet::new(),
            events: VecDeque::new(),
            stopping: false,
            ready_sent: false,
            restarts: 0,
            on_all_gone: Vec::new(),
            primary_pid: std::process::id(),
            signals: None,
            sigchld: false,
        }
    }

    pub(crate) fn allocate_token(&mut self, source: Source) -> Token {
        let token = Token(self.next_token);
        self.next_token += 1;
        self.tokens.insert(token, source);
        token
    }

    pub(crate) fn release_token(&mut self, token: Token) {
        self.tokens.remove(&token);
    }

    /// The workers whose `Exit` event has not been delivered yet, by id (a worker that is
    /// gone but whose `Exit` is still to come is listed as [`WorkerState::Disconnected`]).
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.workers
            .values()
            .map(|worker| self.info(worker))
            .collect()
    }

    /// One worker whose `Exit` event has not been delivered yet.
    pub fn worker(&self, id: WorkerId) -> Option<WorkerInfo> {
        self.workers.get(&id).map(|worker| self.info(worker))
    }

    fn info(&self, worker: &Worker) -> WorkerInfo {
        WorkerInfo {
            id: worker.id,
            pid: worker.pid,
            slot: worker.slot,
            state: worker.state,
            uptime: worker.spawned_at.elapsed(),
            connections_handed: worker.connections_handed,
            in_flight: self.in_flight(worker.id),
            open_connections: worker.reported_open,
        }
    }

    fn in_flight(&self, id: WorkerId) -> usize {
        self.listeners
            .values()
            .filter_map(|listener| match &listener.delivery {
                Delivery::RoundRobin(dispatcher) => dispatcher.policy.in_flight(id),
                Delivery::Shared => None,
            })
            .sum()
    }

    /// A snapshot of the whole cluster.
    pub fn status(&self) -> Status {
        let pending = self
            .listeners
            .values()
            .map(|listener| match &listener.delivery {
                Delivery::RoundRobin(dispatcher) => dispatcher.policy.pending_len(),
                Delivery::Shared => 0,
            })
            .sum();
        Status {
            workers: self.workers(),
            restarts: self.restarts,
            listening: self
                .listeners
                .values()
                .map(|listener| listener.local_addr)
                .collect(),
            pending_connections: pending,
            stopping: self.stopping,
        }
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
        let control = online_control(&mut self.workers, id)?;
        control.channel.send_encoded(None, message, &[])?;
        control.update_interest(&self.registry);
        Ok(())
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
        let limits = &self.config.control_limits;
        let user = UserMessage::encode(msg, limits)?;
        Ok(Encoded::new(&ToWorker::User(user), limits)?)
    }

    /// Sends an encoded message to every worker that said Hello and is not disconnected.
    pub(crate) fn broadcast_encoded(
        &mut self,
        message: &Encoded<ToWorker>,
    ) -> Result<usize, Error> {
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        let mut sent = 0;
        for id in ids {
            match self.send_encoded(id, message) {
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
        let shutdown_timeout = self.config.shutdown_timeout;
        let worker = self
            .workers
            .get_mut(&id)
            .filter(|worker| !worker.reaped)
            .ok_or(Error::NoSuchWorker { worker: id })?;
        if worker.leaving.asked {
            return Ok(());
        }
        worker.leaving.asked = true;
        let deadline = Instant::now() + shutdown_timeout;
        worker.kill_at = Some(worker.kill_at.map_or(deadline, |at| at.min(deadline)));
        match worker.state {
            WorkerState::Starting => {
                // No Hello yet, so no one reads the channel: SIGTERM means the same thing.
                let _ = nix::sys::signal::kill(pid_of(worker.pid), nix::sys::signal::SIGTERM);
            }
            WorkerState::Disconnected => {}
            WorkerState::Online | WorkerState::Listening | WorkerState::Disconnecting => {
                worker.state = WorkerState::Disconnecting;
                if let Some(control) = worker.control.as_mut() {
                    if let Err(err) = control.channel.send(None, &ToWorker::Disconnect, &[]) {
                        tracing::debug!(worker = %id, %err, "could not send Disconnect");
                    }
                    control.update_interest(&self.registry);
                }
            }
        }
        self.stop_dispatching_to(id);
        Ok(())
    }

    /// Asks every worker to disconnect; `on_done` runs once none is left.
    pub fn disconnect_all(&mut self, on_done: impl FnOnce(&mut Cluster) + 'static) {
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            let _ = self.disconnect(id);
        }
        self.on_all_gone.push(Box::new(on_done));
    }

    /// Sends a signal to a worker process. A worker that dies of it is replaced, unless the
    /// primary had asked it to disconnect.
    pub fn kill(&mut self, id: WorkerId, signal: Signal) -> Result<(), Error> {
        let worker = self
            .workers
            .get(&id)
            .filter(|worker| !worker.reaped)
            .ok_or(Error::NoSuchWorker { worker: id })?;
        let signal = nix::sys::signal::Signal::try_from(signal.as_raw())
            .map_err(|errno| Error::io("kill", errno.into()))?;
        nix::sys::signal::kill(pid_of(worker.pid), signal)
            .map_err(|errno| Error::io("kill", errno.into()))
    }

    /// Stops the cluster: stop accepting, disconnect every worker, kill what is left after the
    /// shutdown timeout, then return from [`Primary::run`](crate::Primary::run). With
    /// `graceful` false, or when already stopping, every worker is killed at once.
    pub fn stop(&mut self, graceful: bool) {
        self.begin_stop(graceful);
    }

    /// True once the cluster is stopping.
    pub fn is_stopping(&self) -> bool {
        self.stopping
    }
}

/// The control channel of a worker that said Hello and has not disconnected.
fn online_control(
    workers: &mut BTreeMap<WorkerId, Worker>,
    id: WorkerId,
) -> Result<&mut Registered<PrimaryControl>, Error> {
    let worker = workers
        .get_mut(&id)
        .ok_or(Error::NoSuchWorker { worker: id })?;
    if worker.state == WorkerState::Starting {
        return Err(Error::NoSuchWorker { worker: id });
    }
    worker
        .control
        .as_mut()
        .ok_or(Error::NoSuchWorker { worker: id })
}

pub(crate) fn pid_of(pid: u32) -> nix::unistd::Pid {
    nix::unistd::Pid::from_raw(pid as libc::pid_t)
}
