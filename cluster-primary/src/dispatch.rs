//! Round-robin delivery: accepting, handing connections down handoff sockets, acks, returns,
//! and taking back what a departed worker never acknowledged.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use cluster_ipc::proto::{Envelope, HandoffToPrimary, HandoffToWorker, PeerAddr};
use cluster_ipc::{ConnId, ListenerId, WorkerId};
use mio::Interest;

use crate::cluster::Cluster;
use crate::listen::{Delivery, Held};

/// At most this many connections are accepted from one listener per turn of the loop, so that
/// acks and other listeners are served in between.
const ACCEPTS_PER_TURN: usize = 128;
/// How long accepting pauses after the process ran out of fds.
const FD_EXHAUSTED_BACKOFF: Duration = Duration::from_millis(100);

impl Cluster {
    /// Registers or deregisters a round-robin listener for accepting.
    pub(crate) fn set_accepting(&mut self, listener_id: ListenerId, on: bool) {
        let stopping = self.stopping;
        let Some(listener) = self.listeners.get_mut(&listener_id) else {
            return;
        };
        let Delivery::RoundRobin(dispatcher) = &mut listener.delivery else {
            return;
        };
        let on = on
            && !stopping
            && dispatcher.fd_backoff_until.is_none()
            && !dispatcher.policy.is_accept_paused();
        if on == dispatcher.accepting {
            return;
        }
        if on {
            match self
                .registry
                .register(&mut listener.socket, listener.token, Interest::READABLE)
            {
                Ok(()) => dispatcher.accepting = true,
                Err(err) => tracing::error!(%err, "could not register a listener"),
            }
            // Registering a socket with clients already waiting reports it ready at once.
        } else {
            let _ = self.registry.deregister(&mut listener.socket);
            dispatcher.accepting = false;
            self.accept_ready.remove(&listener_id);
        }
    }

    /// Accepts up to a turn's worth of connections and hands them out.
    pub(crate) fn accept_turn(&mut self, listener_id: ListenerId) {
        let Some(listener) = self.listeners.get_mut(&listener_id) else {
            return;
        };
        let Delivery::RoundRobin(dispatcher) = &mut listener.delivery else {
            return;
        };
        let mut drained = false;
        for _ in 0..ACCEPTS_PER_TURN {
            if !dispatcher.accepting || dispatcher.policy.is_accept_paused() {
                drained = true;
                break;
            }
            match listener.socket.accept() {
                Ok((stream, peer)) => dispatcher.incoming(OwnedFd::from(stream), peer),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    drained = true;
                    break;
                }
                Err(err) if matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    tracing::warn!(%err, "out of file descriptors; pausing accept");
                    dispatcher.fd_backoff_until = Some(Instant::now() + FD_EXHAUSTED_BACKOFF);
                    let _ = self.registry.deregister(&mut listener.socket);
                    dispatcher.accepting = false;
                    drained = true;
                    break;
                }
                // The client gave up before we got to it, or a transient network error:
                // nothing to hand out, keep going.
                Err(err) => tracing::debug!(%err, "accept failed"),
            }
        }
        if drained {
            self.accept_ready.remove(&listener_id);
        } else {
            self.accept_ready.insert(listener_id);
        }
        self.apply_actions(listener_id);
    }

    /// Ends an fd-exhaustion pause that is due.
    pub(crate) fn resume_after_fd_backoff(&mut self, now: Instant) {
        let due: Vec<ListenerId> = self
            .listeners
            .values()
            .filter_map(|listener| match &listener.delivery {
                Delivery::RoundRobin(d) if d.fd_backoff_until.is_some_and(|at| at <= now) => {
                    Some(listener.id)
                }
                _ => None,
            })
            .collect();
        for listener_id in due {
            if let Some(Delivery::RoundRobin(d)) = self
                .listeners
                .get_mut(&listener_id)
                .map(|l| &mut l.delivery)
            {
                d.fd_backoff_until = None;
            }
            self.set_accepting(listener_id, true);
        }
    }

    /// Carries out what the listener's policy decided, until it has nothing more to say.
    pub(crate) fn apply_actions(&mut self, listener_id: ListenerId) {
        loop {
            let Some(listener) = self.listeners.get_mut(&listener_id) else {
                return;
            };
            let Delivery::RoundRobin(dispatcher) = &mut listener.delivery else {
                return;
            };
            let actions = dispatcher.take_actions();
            if actions.handoffs.is_empty() && actions.close.is_empty() && actions.accept.is_none() {
                return;
            }
            for conn in actions.close {
                dispatcher.conns.remove(&conn);
            }
            for (worker, conns) in actions.handoffs {
                self.hand_off(listener_id, worker, &conns);
            }
            if let Some(on) = actions.accept {
                self.set_accepting(listener_id, on);
            }
        }
    }

    /// Sends what the policy handed to a worker down its handoff socket, in frames of at most
    /// the socket's fd limit. The primary keeps its copies until the worker acks; if the
    /// worker can no longer be reached the batch stays in flight and comes back when its
    /// handoff socket reaches its end.
    fn hand_off(&mut self, listener_id: ListenerId, worker: WorkerId, conns: &[ConnId]) {
        let max_fds = self
            .workers
            .get(&worker)
            .and_then(|w| w.handoffs.get(&listener_id))
            .map_or(1, |handoff| handoff.channel.limits().max_fds().max(1));
        for batch in conns.chunks(max_fds) {
            self.hand_off_batch(listener_id, worker, batch);
        }
    }

    /// Sends one batch (one frame) down a worker's handoff socket.
    fn hand_off_batch(&mut self, listener_id: ListenerId, worker: WorkerId, conns: &[ConnId]) {
        let Some(listener) = self.listeners.get(&listener_id) else {
            return;
        };
        let Delivery::RoundRobin(dispatcher) = &listener.delivery else {
            return;
        };
        let held: Vec<&Held> = conns
            .iter()
            .filter_map(|id| dispatcher.conns.get(id))
            .collect();
        let fds: Vec<BorrowedFd<'_>> = held.iter().map(|held| held.fd.as_fd()).collect();
        // The peers' addresses save each worker a getpeername per connection; all or none,
        // so that they line up with the fds.
        let peers: Vec<PeerAddr> = held
            .iter()
            .map(|held| held.peer.map(PeerAddr))
            .collect::<Option<_>>()
            .unwrap_or_default();
        let Some(handoff) = self
            .workers
            .get_mut(&worker)
            .and_then(|w| w.handoffs.get_mut(&listener_id))
        else {
            tracing::error!(%worker, listener = %listener_id, "handoff to a worker without a handoff socket");
            return;
        };
        let batch = HandoffToWorker::Connections {
            count: fds.len() as u32,
            peers,
        };
        let sent = handoff.channel.send(None, &batch, &fds);
        handoff.update_interest(&self.registry);
        drop((fds, held));
        if let Err(err) = sent {
            tracing::debug!(%worker, %err, "handoff failed; the batch waits for the socket's end");
            self.drain_worker_in(listener_id, worker);
        }
    }

    /// Reads a handoff socket: acks and returned connections, up to its end.
    pub(crate) fn on_handoff_readable(&mut self, worker: WorkerId, listener_id: ListenerId) {
        loop {
            let Some(handoff) = self
                .workers
                .get_mut(&worker)
                .and_then(|w| w.handoffs.get_mut(&listener_id))
            else {
                return;
            };
            match handoff.channel.try_recv() {
                Ok(Some(envelope)) => {
                    if let Err(what) = self.on_handoff_message(worker, listener_id, envelope) {
                        // The worker is killed; keep reading, its end of file follows.
                        self.protocol_violation(worker, &what);
                    }
                }
                Ok(None) => break,
                Err(cluster_ipc::Error::Closed) => {
                    self.handoff_ended(worker, listener_id);
                    return;
                }
                Err(err) => {
                    self.protocol_violation(worker, &format!("handoff socket: {err}"));
                    self.handoff_ended(worker, listener_id);
                    return;
                }
            }
        }
        if let Some(handoff) = self
            .workers
            .get_mut(&worker)
            .and_then(|w| w.handoffs.get_mut(&listener_id))
        {
            handoff.flush(&self.registry);
        }
        self.apply_actions(listener_id);
    }

    fn on_handoff_message(
        &mut self,
        worker: WorkerId,
        listener_id: ListenerId,
        envelope: Envelope<HandoffToPrimary>,
    ) -> Result<(), String> {
        let Some(Delivery::RoundRobin(dispatcher)) = self
            .listeners
            .get_mut(&listener_id)
            .map(|l| &mut l.delivery)
        else {
            return Ok(());
        };
        match envelope.msg {
            HandoffToPrimary::ConnectionsAck { count } => {
                let acked = dispatcher
                    .policy
                    .acked(worker, count as usize)
                    .map_err(|err| format!("ack of {count}: {err}"))?;
                for conn in &acked {
                    // The worker has its own copy now; ours can go.
                    dispatcher.conns.remove(conn);
                }
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.connections_handed += acked.len() as u64;
                }
                Ok(())
            }
            HandoffToPrimary::ConnectionsReturned { count }
                if count as usize == envelope.fds.len() =>
            {
                dispatcher.returned(envelope.fds);
                Ok(())
            }
            HandoffToPrimary::ConnectionsReturned { count } => Err(format!(
                "{count} connections returned with {} fds",
                envelope.fds.len()
            )),
        }
    }

    /// A handoff socket reached its end (the worker closed its listener, or died): everything
    /// it sent has been read, so what is still un-acked was never received and goes to
    /// another worker.
    pub(crate) fn handoff_ended(&mut self, worker: WorkerId, listener_id: ListenerId) {
        let Some(mut handoff) = self
            .workers
            .get_mut(&worker)
            .and_then(|w| w.handoffs.remove(&listener_id))
        else {
            return;
        };
        handoff.deregister(&self.registry);
        self.release_token(handoff.token);
        drop(handoff);
        if let Some(listener) = self.listeners.get_mut(&listener_id) {
            listener.members.remove(&worker);
            if let Delivery::RoundRobin(dispatcher) = &mut listener.delivery {
                if let Err(err) = dispatcher.policy.worker_left(worker) {
                    tracing::error!(%worker, %err, "scheduler did not know a leaving worker");
                }
            }
        }
        self.apply_actions(listener_id);
    }

    /// Reads every handoff socket of a worker that is gone (reaped) to its end.
    pub(crate) fn drain_handoffs(&mut self, worker: WorkerId) {
        for listener_id in self.round_robin_listeners_of(worker) {
            self.on_handoff_readable(worker, listener_id);
            // The process is gone, so its end is closed and the read above reached it; if a
            // child of the worker still holds the socket, stop waiting for it.
            self.handoff_ended(worker, listener_id);
        }
    }

    /// Sends nothing more to this worker on this listener.
    pub(crate) fn drain_worker_in(&mut self, listener_id: ListenerId, worker: WorkerId) {
        if let Some(Delivery::RoundRobin(dispatcher)) = self
            .listeners
            .get_mut(&listener_id)
            .map(|l| &mut l.delivery)
        {
            if dispatcher.policy.workers().contains(&worker) {
                let _ = dispatcher.policy.worker_draining(worker);
            }
        }
        self.apply_actions(listener_id);
    }

    /// Sends nothing more to this worker on any listener.
    pub(crate) fn stop_dispatching_to(&mut self, worker: WorkerId) {
        for listener_id in self.round_robin_listeners_of(worker) {
            self.drain_worker_in(listener_id, worker);
        }
    }

    /// The round-robin listeners a worker holds a handoff socket for.
    pub(crate) fn round_robin_listeners_of(&self, worker: WorkerId) -> Vec<ListenerId> {
        self.workers
            .get(&worker)
            .map(|w| w.handoffs.keys().copied().collect())
            .unwrap_or_default()
    }
}
