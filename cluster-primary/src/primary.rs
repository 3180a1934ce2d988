//! The primary's event loop, and a handle to steer it from other threads.

use std::ffi::OsString;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::time::{Duration, Instant};

use cluster_ipc::ErrorChain;
use cluster_ipc::WorkerId;
use cluster_ipc::proto::{Encoded, ToWorker};
use mio::{Events, Interest, Poll, Waker};
use serde::Serialize;

use crate::cluster::Cluster;
use crate::control::server::ControlServer;
use crate::control::{Failure, FailureKind, failure_line, success_line};
use crate::shell::{SIGNALS, Source, WAKER};
use crate::supervisor::{Ending, Fatal};
use crate::{Error, Signal};

mod requests;

use requests::fields;

/// The signals the primary handles (see the README's signal table).
const HANDLED_SIGNALS: [i32; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGHUP,
    libc::SIGTTIN,
    libc::SIGTTOU,
];
/// How often the loop reaps when it relies on SIGCHLD, which coalesces.
const SIGCHLD_POLL: Duration = Duration::from_millis(500);
use crate::config::{Builder, Config};
use crate::event::{Event, Status};

/// A cluster's primary process: it owns the listening sockets, starts and watches the
/// workers, and hands them connections. Made by [`Builder`](crate::Builder); runs with
/// [`run`](Primary::run).
pub struct Primary {
    poll: Poll,
    cluster: Cluster,
    commands: Receiver<Command>,
    handle: Handle,
    /// Who waits for the end of a roll-out, by its number.
    rollout_waiters: Vec<(u64, Waiter)>,
    /// The control socket, while the primary runs with one.
    control: Option<ControlServer>,
}

/// Someone waiting for a roll-out to end.
enum Waiter {
    /// A [`Handle::reload`] call.
    Handle(SyncSender<Result<(), Error>>),
    /// A control socket client, by id.
    Control(u64),
}

/// What a [`Handle`] asks the loop to do.
enum Command {
    Stop {
        graceful: bool,
    },
    Send {
        worker: WorkerId,
        message: Encoded<ToWorker>,
    },
    Broadcast {
        message: Encoded<ToWorker>,
    },
    Disconnect {
        worker: WorkerId,
    },
    Status {
        reply: SyncSender<Status>,
    },
    Reload {
        reply: SyncSender<Result<(), Error>>,
    },
    SetWorkers {
        count: usize,
        reply: SyncSender<Result<(), Error>>,
    },
    Fork {
        env: Vec<(OsString, OsString)>,
        reply: SyncSender<Result<WorkerId, Error>>,
    },
}

impl Primary {
    pub(crate) fn new(config: Config) -> Result<Primary, Error> {
        let poll = Poll::new().map_err(|source| Error::io("epoll_create", source))?;
        let registry = poll
            .registry()
            .try_clone()
            .map_err(|source| Error::io("dup", source))?;
        let waker =
            Waker::new(poll.registry(), WAKER).map_err(|source| Error::io("eventfd", source))?;
        let (sender, commands) = mpsc::channel();
        let limits = config.control_limits;
        let cluster = Cluster::new(config, registry);
        Ok(Primary {
            poll,
            cluster,
            commands,
            handle: Handle {
                sender,
                waker: Arc::new(waker),
                limits,
            },
            rollout_waiters: Vec::new(),
            control: None,
        })
    }

    /// A handle to steer the running primary from other threads.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Runs the cluster on the calling thread until it stops: starts the workers, then serves
    /// them, calling `on_event` for everything that happens. It returns once the cluster was
    /// stopped (by a signal, [`Cluster::stop`] or [`Handle::stop`]) and every worker is gone,
    /// or when respawning is off and the last worker exited.
    ///
    /// It returns `Ok` only for a clean end: a stop that had to kill workers gives
    /// [`Error::StopNotClean`], a worker that could not boot [`Error::BootFailed`], workers
    /// that kept failing [`Error::CrashLoop`].
    ///
    /// Workers are spawned from this thread only: their parent-death signal follows the
    /// thread that spawned them, so call this on a thread that lives as long as the cluster.
    ///
    /// The loop is the shell of the supervisor core: it waits, reads and decodes, feeds the
    /// core, carries out its actions and sleeps until its next deadline; it decides nothing.
    pub fn run(mut self, mut on_event: impl FnMut(&mut Cluster, Event)) -> Result<(), Error> {
        raise_fd_limit();
        if self.cluster.shell.config.handle_signals {
            self.install_signals()?;
        }
        self.open_control_socket()?;
        self.log_start();
        self.cluster.core.start(Instant::now());
        self.cluster.pump();
        let mut events = Events::with_capacity(256);
        loop {
            self.dispatch_events(&mut on_event);
            if self.cluster.core.is_finished() && self.cluster.events.is_empty() {
                break;
            }
            let timeout = self.poll_timeout();
            if let Err(err) = self.poll.poll(&mut events, timeout) {
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::io("epoll_wait", err));
            }
            for event in events.iter() {
                self.on_ready(event);
            }
            for listener in self.cluster.accept_ready() {
                self.cluster
                    .shell
                    .accept_turn(listener, &mut self.cluster.core);
                self.cluster.pump();
            }
            let now = Instant::now();
            self.cluster.core.handle_timeout(now);
            if self.cluster.shell.sigchld {
                // Signals coalesce and a handler may be installed late: poll too.
                self.cluster.shell.try_reap_all(&mut self.cluster.core);
            }
            self.cluster.pump();
            self.run_commands();
        }
        self.dispatch_events(&mut on_event);
        self.answer_rollout_waiters_at_the_end();
        match self.cluster.core.ending() {
            Ending::Clean => {
                tracing::info!("primary stopped");
                Ok(())
            }
            Ending::Forced { killed } => {
                tracing::warn!(killed, "primary stopped; workers had to be killed");
                Err(Error::StopNotClean { killed })
            }
            Ending::Fatal(Fatal::BootFailed { worker, exit_code }) => {
                Err(Error::BootFailed { worker, exit_code })
            }
            Ending::Fatal(Fatal::CrashLoop {
                failures,
                within,
                last,
            }) => Err(Error::CrashLoop {
                failures,
                within,
                last,
            }),
            Ending::Fatal(Fatal::ListenFailed { addr, errno }) => {
                Err(Error::ListenFailed { addr, errno })
            }
            Ending::Fatal(Fatal::ProgramNotExecutable { errno }) => {
                Err(Error::ProgramNotExecutable {
                    program: self.cluster.shell.config.program.clone(),
                    errno,
                })
            }
        }
    }

    fn install_signals(&mut self) -> Result<(), Error> {
        let mut signals = signal_hook_mio::v1_0::Signals::new(HANDLED_SIGNALS)
            .map_err(|source| Error::io("install signal handlers", source))?;
        self.cluster
            .shell
            .registry
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(|source| Error::io("register signals", source))?;
        self.cluster.shell.signals = Some(signals);
        Ok(())
    }

    fn poll_timeout(&self) -> Option<Duration> {
        if self.cluster.has_accepts_waiting() {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        let sigchld_poll = self.cluster.shell.sigchld.then(|| now + SIGCHLD_POLL);
        [self.cluster.core.poll_timeout(), sigchld_poll]
            .into_iter()
            .flatten()
            .min()
            .map(|at| at.saturating_duration_since(now))
    }

    /// Hands queued events to the application; what it does may queue more.
    fn dispatch_events(&mut self, on_event: &mut impl FnMut(&mut Cluster, Event)) {
        loop {
            while let Some(event) = self.cluster.next_event() {
                self.notify_rollout_waiters(&event);
                on_event(&mut self.cluster, event);
                self.cluster.pump();
            }
            if !self.cluster.core.has_no_workers() || self.cluster.on_all_gone.is_empty() {
                return;
            }
            for done in std::mem::take(&mut self.cluster.on_all_gone) {
                done(&mut self.cluster);
                self.cluster.pump();
            }
        }
    }

    fn on_ready(&mut self, event: &mio::event::Event) {
        let Some(source) = self.cluster.shell.source(event.token()) else {
            return;
        };
        let cluster = &mut self.cluster;
        match source {
            Source::Waker => self.run_commands(),
            Source::Signals => self.on_signals(),
            Source::Listener(listener) => cluster.shell.accept_turn(listener, &mut cluster.core),
            Source::Control(worker) => {
                cluster.shell.read_control(worker, &mut cluster.core);
                if event.is_writable() {
                    cluster.shell.flush_control(worker);
                }
            }
            Source::Handoff(worker, listener) => {
                cluster
                    .shell
                    .read_handoff(worker, listener, &mut cluster.core);
            }
            Source::Pidfd(worker) => cluster.shell.try_reap(worker, &mut cluster.core),
            Source::ControlSocket => self.accept_control_clients(),
            Source::ControlClient(client) => {
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    self.serve_control_client(client);
                }
                if event.is_writable() {
                    if let Some(control) = self.control.as_mut() {
                        control.flush(client);
                    }
                }
                self.forget_closed_control_clients();
            }
        }
        self.cluster.pump();
    }

    fn on_signals(&mut self) {
        let Some(signals) = self.cluster.shell.signals.as_mut() else {
            return;
        };
        let pending: Vec<i32> = signals.pending().collect();
        let now = Instant::now();
        for signal in pending {
            let name = Signal::from_raw(signal);
            match signal {
                libc::SIGTERM | libc::SIGINT => {
                    // The first asks for a graceful stop; a second one, while stopping, for
                    // an immediate one.
                    let graceful = !self.cluster.core.is_stopping();
                    tracing::info!(signal = %name, graceful, "stop requested");
                    self.cluster.core.stop(true, now);
                }
                libc::SIGQUIT => {
                    tracing::info!(signal = %name, "immediate stop requested");
                    self.cluster.core.stop(false, now);
                }
                libc::SIGHUP => {
                    tracing::info!(signal = %name, "rolling restart requested");
                    if let Err(refusal) = self.cluster.core.reload(now) {
                        tracing::warn!(?refusal, "rolling restart refused");
                    }
                }
                libc::SIGTTIN | libc::SIGTTOU => self.scale_by_signal(signal == libc::SIGTTIN, now),
                libc::SIGCHLD => self.cluster.shell.try_reap_all(&mut self.cluster.core),
                _ => {}
            }
        }
        self.cluster.pump();
    }

    /// SIGTTIN: one worker more; SIGTTOU: one fewer, never below one.
    fn scale_by_signal(&mut self, up: bool, now: Instant) {
        let from = self.cluster.core.target_workers();
        let to = if up { from + 1 } else { from.saturating_sub(1) };
        if to == 0 {
            tracing::warn!("SIGTTOU ignored: the cluster runs one worker, the fewest it can");
            return;
        }
        if let Err(refusal) = self.cluster.core.set_workers(to, now) {
            tracing::warn!(?refusal, from, to, "scaling refused");
        }
    }

    /// Answers those waiting for a roll-out that just ended.
    fn notify_rollout_waiters(&mut self, event: &Event) {
        let (id, aborted) = match event {
            Event::RolloutFinished { rollout } => (*rollout, None),
            Event::RolloutAborted { rollout, reason } => (*rollout, Some(reason.clone())),
            _ => return,
        };
        let (done, waiting) = std::mem::take(&mut self.rollout_waiters)
            .into_iter()
            .partition(|(waiting_for, _)| *waiting_for == id);
        self.rollout_waiters = waiting;
        for (_, waiter) in done {
            match waiter {
                Waiter::Handle(reply) => {
                    let answer = match &aborted {
                        None => Ok(()),
                        Some(reason) => Err(Error::RolloutAborted {
                            reason: reason.clone(),
                        }),
                    };
                    let _ = reply.try_send(answer);
                }
                Waiter::Control(client) => {
                    let line = match &aborted {
                        None => success_line(fields([("rollout", id.into())])),
                        Some(reason) => failure_line(&Failure::new(
                            FailureKind::RolloutAborted,
                            format!("the roll-out was aborted: {reason}"),
                        )),
                    };
                    self.reply_control(client, &line);
                }
            }
        }
    }

    /// The primary stops: whoever still waits for a roll-out hears that it will not end.
    fn answer_rollout_waiters_at_the_end(&mut self) {
        for (_, waiter) in std::mem::take(&mut self.rollout_waiters) {
            match waiter {
                Waiter::Handle(reply) => {
                    let _ = reply.try_send(Err(Error::NotRunning));
                }
                Waiter::Control(client) => {
                    let failure =
                        Failure::new(FailureKind::NotRunning, "the primary stopped first");
                    self.reply_control(client, &failure_line(&failure));
                }
            }
        }
    }

    fn run_commands(&mut self) {
        while let Ok(command) = self.commands.try_recv() {
            let cluster = &mut self.cluster;
            let result = match command {
                Command::Stop { graceful } => {
                    cluster.stop(graceful);
                    Ok(())
                }
                Command::Send { worker, message } => cluster.send_encoded(worker, &message),
                Command::Broadcast { message } => cluster.broadcast_encoded(&message).map(drop),
                Command::Disconnect { worker } => cluster.disconnect(worker),
                Command::Status { reply } => {
                    let _ = reply.try_send(cluster.status());
                    Ok(())
                }
                Command::Reload { reply } => {
                    match cluster.reload() {
                        Ok(id) => self.rollout_waiters.push((id, Waiter::Handle(reply))),
                        Err(err) => {
                            let _ = reply.try_send(Err(err));
                        }
                    }
                    Ok(())
                }
                Command::SetWorkers { count, reply } => {
                    let _ = reply.try_send(cluster.set_workers(count));
                    Ok(())
                }
                Command::Fork { env, reply } => {
                    let _ = reply.try_send(cluster.fork(env));
                    Ok(())
                }
            };
            if let Err(err) = result {
                tracing::warn!(error = %ErrorChain(&err), "a command from a handle failed");
            }
        }
    }
}

impl Builder {
    /// Checks the settings, resolves the program, and makes the primary.
    pub fn build(self) -> Result<Primary, Error> {
        Primary::new(self.settle()?)
    }
}

/// Steers a running [`Primary`] from any thread. Commands are carried out by the primary's
/// loop, in order; a handle whose primary stopped answers [`Error::NotRunning`].
#[derive(Clone)]
pub struct Handle {
    sender: Sender<Command>,
    waker: Arc<Waker>,
    limits: cluster_ipc::Limits,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle").finish_non_exhaustive()
    }
}

impl Handle {
    fn command(&self, command: Command) -> Result<(), Error> {
        self.sender.send(command).map_err(|_| Error::NotRunning)?;
        self.waker
            .wake()
            .map_err(|source| Error::io("wake the primary", source))
    }

    /// Stops the cluster (see [`Cluster::stop`]).
    pub fn stop(&self, graceful: bool) -> Result<(), Error> {
        self.command(Command::Stop { graceful })
    }

    /// Sends a user message to one worker. A message over the message limit is refused here,
    /// with an error that names the limit; a failure in the loop (no such worker, a full send
    /// queue) is logged there.
    pub fn send<T: Serialize + ?Sized>(&self, worker: WorkerId, msg: &T) -> Result<(), Error> {
        let message = self.encode_user(msg)?;
        self.command(Command::Send { worker, message })
    }

    /// Sends a user message to every worker.
    pub fn broadcast<T: Serialize + ?Sized>(&self, msg: &T) -> Result<(), Error> {
        let message = self.encode_user(msg)?;
        self.command(Command::Broadcast { message })
    }

    fn encode_user<T: Serialize + ?Sized>(&self, msg: &T) -> Result<Encoded<ToWorker>, Error> {
        crate::cluster::encode_user(msg, &self.limits)
    }

    /// Asks a worker to disconnect (see [`Cluster::disconnect`]).
    pub fn disconnect(&self, worker: WorkerId) -> Result<(), Error> {
        self.command(Command::Disconnect { worker })
    }

    /// Rolls every worker (see [`Cluster::reload`]) and waits until the roll-out is over:
    /// `Ok` once every worker was replaced, [`Error::RolloutAborted`] with the reason when a
    /// replacement failed (the old workers keep serving), [`Error::NotRunning`] if the
    /// primary stopped first. Call it from another thread than the primary's (not from the
    /// event hook, which runs on the primary's thread and would wait for itself).
    pub fn reload(&self) -> Result<(), Error> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.command(Command::Reload { reply })?;
        answer.recv().map_err(|_| Error::NotRunning)?
    }

    /// Sets the number of workers (see [`Cluster::set_workers`]); returns once the primary
    /// took the order (the new workers start, the removed ones drain, after that).
    pub fn set_workers(&self, count: usize) -> Result<(), Error> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.command(Command::SetWorkers { count, reply })?;
        answer.recv().map_err(|_| Error::NotRunning)?
    }

    /// Starts one more worker with `env` added to its environment (see [`Cluster::fork`]);
    /// returns its id once it is being started.
    pub fn fork<I, K, V>(&self, env: I) -> Result<WorkerId, Error>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<OsString>,
        V: Into<OsString>,
    {
        let env = env.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        let (reply, answer) = mpsc::sync_channel(1);
        self.command(Command::Fork { env, reply })?;
        answer.recv().map_err(|_| Error::NotRunning)?
    }

    /// A snapshot of the cluster, waiting at most `timeout` for the loop to answer: a loop
    /// too busy to answer in time gives [`Error::TimedOut`], a stopped one
    /// [`Error::NotRunning`].
    pub fn status(&self, timeout: Duration) -> Result<Status, Error> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.command(Command::Status { reply })?;
        answer.recv_timeout(timeout).map_err(|err| match err {
            mpsc::RecvTimeoutError::Timeout => Error::TimedOut {
                op: "status",
                timeout,
            },
            mpsc::RecvTimeoutError::Disconnected => Error::NotRunning,
        })
    }
}

/// Raises the soft limit on open files to the hard limit: the primary holds every
/// connection it has not yet handed out, and every handoff socket.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(err) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %ErrorChain(&err), soft, hard, "could not raise the open-files limit");
            }
        }
        Ok(_) => {}
        Err(err) => {
            tracing::warn!(error = %ErrorChain(&err), "could not read the open-files limit")
        }
    }
}
