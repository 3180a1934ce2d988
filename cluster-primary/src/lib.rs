//! The primary process of a cluster: it owns the listening sockets, starts N worker
//! processes, hands them connections, replaces the ones that die, and stops them in order.
//!
//! # Core and shell
//!
//! The primary is two layers, the way `quinn-proto` splits QUIC from its sockets:
//!
//! - **The supervisor core** (the private `supervisor` module) holds every decision: workers
//!   by slot and their states, listeners, the connections it holds (pending, in flight to a
//!   worker, acknowledged) through `cluster-sched`, respawn and kill timers, the stop. It takes
//!   inputs as `handle_*` calls with the time passed in, and gives actions (spawn, send, bind,
//!   grant, hand off, release, accept on/off, signal, event) and its next deadline. It owns no
//!   fd, pid handle, socket or clock: processes and connections are ids in it, so it is tested
//!   without processes, by a simulator with scripted workers and a fake clock, property tests
//!   over random event sequences, and deliberately broken variants that the tests must catch.
//! - **The shell** ([`Primary::run`]'s single-threaded `mio` loop) maps the ids to fds and
//!   pids: it waits, reads and decodes, feeds the core, carries out its actions, and sleeps
//!   until its deadline. It decides nothing.
//!
//! One connection's path, round-robin, with the side that does each step:
//!
//! ```text
//!  client ──connect──▶ listening socket
//!                           │ shell: accept4 (a turn's worth), keeps the fd as ConnId c
//!                           ▼
//!                      core.handle_accepted(listener, [c])
//!                           │ core: the policy picks a worker with credit (or keeps c
//!                           │       pending; with no credit anywhere, accept pauses)
//!                           ▼
//!                      Action::HandOff { worker w, [c, ...] }
//!                           │ shell: one sendmsg of the batch's fds down w's handoff socket;
//!                           │        keeps its copy of c
//!                           ▼
//!  worker w: recvmsg, ConnectionsAck ──▶ core.handle_handoff(w, Ack)
//!                           │ core: c is w's now
//!                           ▼
//!                      Action::Release { [c] }   shell: closes its copy
//!
//!  If w dies first: the shell reads w's sockets to their end (acks that raced the exit
//!  count), then core.handle_exited(w): c, never acknowledged, goes to another worker.
//! ```
//!
//! # Overview
//!
//! - [`Builder`] sets the cluster up (how many workers, which program, round-robin or shared
//!   listeners, the credit window, timeouts) and makes a [`Primary`].
//! - [`Primary::run`] runs a single-threaded `mio` loop on the calling thread: listeners,
//!   control channels, handoff sockets, pidfds (or SIGCHLD), signals and timers. It calls your
//!   hook with an [`Event`] for everything that happens (fork, online, listening, ready,
//!   message, disconnect, exit) and a [`Cluster`] to act on (send, broadcast, disconnect,
//!   kill, status, stop). A [`Handle`] does the same from other threads.
//! - Workers are fork+exec'd (never a bare fork) from the loop thread, each in its own process
//!   group, with their control channel at fd 3 ([`IPC_FD_ENV`]), their id and slot in the
//!   environment ([`WORKER_ID_ENV`], [`WORKER_SLOT_ENV`]) and SIGTERM as their parent-death
//!   signal. The worker side is `cluster-worker`.
//! - Round-robin listeners: only the primary accepts, and hands connections down a handoff
//!   socket per (worker, listener), with up to `window` un-acknowledged per worker
//!   (`cluster-sched` decides who gets what). The primary keeps its copy of each connection
//!   until the worker acknowledges it, so a worker that dies or closes its listener loses
//!   nothing: what it never acknowledged goes to another worker. When every worker is
//!   saturated the primary stops accepting and the kernel's backlog holds new clients. Shared
//!   listeners: the listening socket itself goes to every worker.
//! - A worker that exits unexpectedly is replaced at once, then with a capped backoff if its
//!   slot keeps failing ([`Respawn`] says which exits are replaced). A worker that exits with
//!   [`BOOT_FAILURE_EXIT_CODE`] before it listens stops the cluster, and so do too many
//!   failures in a row ([`Builder::crash_loop`]): [`Primary::run`] returns an error naming the
//!   cause instead of respawning forever.
//! - Zero-downtime operations, decided by the core and driven by signals, the [`Handle`] or
//!   the [`Cluster`]: rolling restarts ([`Handle::reload`], SIGHUP; a replacement starts, and
//!   its predecessor drains once it listens on the same addresses; [`Rollout`]), scaling
//!   ([`Handle::set_workers`], SIGTTIN, SIGTTOU; [`Handle::fork`]), recycling after a number of
//!   connections or past a memory limit ([`Recycle`]), and hung workers
//!   ([`Builder::hang_timeout`]: un-acknowledged connections go to others, then SIGABRT,
//!   SIGKILL and a replacement).
//! - Failures a respawn cannot fix stop the cluster at once: a listen the primary cannot make
//!   (address in use, permission denied, not this host's address) gives
//!   [`Error::ListenFailed`], a worker program that cannot be executed
//!   [`Error::ProgramNotExecutable`]. `run` returns the error without logging it: the program
//!   reports it once ([`cluster_ipc::ErrorChain`] prints it with its causes).
//! - Operators: [`Builder::control_socket`] serves a Unix socket (mode 0600, peers checked by
//!   uid) with line-delimited JSON requests for status, metrics, reload, scale and stop
//!   ([`control`] documents the protocol; `clusterctl` in `cluster-net` is its client), and
//!   [`Status::to_prometheus`] gives the counters as Prometheus text. The libraries log
//!   through `tracing` (the primary's lifecycle at info, trouble at warn and error, nothing
//!   per connection) and never install a subscriber.
//! - SIGTERM or SIGINT stop the cluster gracefully (a second one, or SIGQUIT, at once);
//!   workers get the shutdown timeout to finish, then SIGKILL. `run` returns `Ok` only for a
//!   clean stop.
//!
//! # Example
//!
//! ```no_run
//! use cluster_primary::{Builder, Event};
//!
//! let primary = Builder::new().workers(4).build()?;
//! primary.run(|cluster, event| match event {
//!     Event::Ready { addrs } => println!("ready on {addrs:?}"),
//!     Event::Exit { worker, status, .. } => eprintln!("worker {worker} exited: {status:?}"),
//!     Event::Message { worker, message } => {
//!         let text: String = message.decode().unwrap_or_default();
//!         let _ = cluster.broadcast(&format!("{worker} says {text}"));
//!     }
//!     _ => {}
//! })?;
//! # Ok::<(), cluster_primary::Error>(())
//! ```
#![deny(missing_docs)]

mod cluster;
mod config;
pub mod control;
mod error;
mod event;
mod listen;
mod memory;
mod primary;
mod shell;
mod signal;
mod spawn;
mod supervisor;
mod sys;

pub use cluster::Cluster;
pub use cluster_ipc::env::{BOOT_FAILURE_EXIT_CODE, DRAIN_TIMEOUT_EXIT_CODE};
pub use cluster_ipc::env::{IPC_FD, IPC_FD_ENV, PRIMARY_PID_ENV, WORKER_ID_ENV, WORKER_SLOT_ENV};
pub use cluster_ipc::proto::ListenMode;
pub use cluster_ipc::{ListenerId, SlotId, WorkerId};
pub use config::{
    Builder, DEFAULT_BACKLOG, DEFAULT_CRASH_LOOP_FAILURES, DEFAULT_CRASH_LOOP_WITHIN,
    DEFAULT_HANG_TIMEOUT, DEFAULT_READINESS_TIMEOUT, DEFAULT_SHUTDOWN_TIMEOUT,
    DEFAULT_START_TIMEOUT, DEFAULT_WINDOW, MAX_WINDOW, Policy, Recycle, Respawn, Rollout,
};
pub use error::Error;
pub use event::{
    Counters, Event, ExitStatus, Memory, Message, RolloutProgress, Status, WorkerInfo, WorkerState,
};
pub use primary::{Handle, Primary};
pub use signal::Signal;
