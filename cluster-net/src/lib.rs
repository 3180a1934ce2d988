//! One API for a clustered server: the same program runs as the primary, as each of its
//! workers, or alone.
//!
//! # Overview
//!
//! [`Cluster::builder`] sets the cluster up and [`run`](Builder::run) takes the worker's
//! code as a closure:
//!
//! - in the **primary** (the process you start) `run` supervises: it starts the workers (this
//!   same program again), owns the listening sockets, hands out connections, replaces workers
//!   that die and stops them all on SIGTERM or Ctrl-C. It never calls the closure. Primary
//!   hooks ([`Builder::on_event`]) see every [`Event`] with a [`PrimaryCluster`] to act on.
//! - in a **worker** `run` calls the closure; inside it [`TcpListener::bind`] is answered by
//!   the primary, so every worker "binds" the same port. When the closure returns (its
//!   `incoming()` loop ends once the worker is asked to disconnect), the worker finishes its
//!   open connections and exits.
//! - with **no cluster** ([`Builder::workers`]`(0)`) the closure runs in this process and
//!   `bind` is a plain bind: the single-process baseline, with no change to the code.
//!
//! The crates underneath are re-exported for everything beyond the common case: [`primary`],
//! [`worker`], [`ipc`] and [`sched`].
//!
//! # Features
//!
//! The `cli` feature builds `clusterctl`, the command-line client of the primary's control
//! socket: `clusterctl status` shows the workers and the cluster, and `reload`, `scale N`,
//! `stop` and `metrics` do what they say (`clusterctl --help`, or the binary's docs, tell
//! more). It brings in clap and serde_json for the binary alone; the library uses neither.
//!
//! The `tokio` feature adds [`tokio::TcpListener`] and [`tokio::TcpStream`] (async, answered
//! by the primary in a worker, plain tokio sockets alone), [`Builder::run_async`], which
//! builds a tokio runtime in each worker (and alone, never in the primary: see
//! [`Builder::runtime`]), [`Worker::disconnected`], a future for graceful shutdown, and
//! [`Worker::messages`]. The `axum` feature (which includes `tokio`) makes
//! [`tokio::TcpListener`] an `axum::serve::Listener`, so that a clustered axum server is:
//!
//! ```no_run
//! # #[cfg(feature = "axum")]
//! fn main() -> Result<(), cluster_net::Error> {
//!     let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello\n" }));
//!     cluster_net::Cluster::builder().run_async(|worker| async move {
//!         let listener = cluster_net::tokio::TcpListener::bind("127.0.0.1:3000")?;
//!         axum::serve(listener, app).with_graceful_shutdown(worker.disconnected()).await?;
//!         Ok(())
//!     })
//! }
//! # #[cfg(not(feature = "axum"))]
//! # fn main() {}
//! ```
//!
//! Neither feature is on by default: a program that does not ask for them does not build
//! tokio.
//!
//! # Example
//!
//! ```no_run
//! use std::io::{Read, Write};
//!
//! fn main() -> Result<(), cluster_net::Error> {
//!     cluster_net::Cluster::builder().workers(4).run(|worker| {
//!         let listener = cluster_net::TcpListener::bind("127.0.0.1:8080")?; // intercepted
//!         for stream in listener.incoming() {
//!             let mut stream = stream?;
//!             let mut request = [0u8; 1024];
//!             let _ = stream.read(&mut request)?;
//!             let body = format!("handled by worker {:?}\n", worker.id());
//!             write!(stream, "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len())?;
//!         }
//!         Ok(())
//!     })
//! }
//! ```
#![deny(missing_docs)]
// The features section links to what the `tokio` feature adds; without it those links dangle.
#![cfg_attr(not(feature = "tokio"), allow(rustdoc::broken_intra_doc_links))]
#![forbid(unsafe_code)]

mod net;
#[cfg(feature = "tokio")]
pub mod tokio;

use std::time::{Duration, Instant};

use serde::Serialize;

pub use cluster_ipc as ipc;
pub use cluster_ipc::ErrorChain;
pub use cluster_primary as primary;
pub use cluster_primary::{
    BOOT_FAILURE_EXIT_CODE, Cluster as PrimaryCluster, Event, ExitStatus, ListenMode, Policy,
    Recycle, Respawn, Rollout, Signal, SlotId, Status, WorkerId,
};
pub use cluster_sched as sched;
pub use cluster_worker as worker;
pub use cluster_worker::{DisconnectReason, Message};
pub use net::{TcpListener, TcpStream};

/// What can go wrong in a clustered program.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The primary failed.
    #[error(transparent)]
    Primary(#[from] cluster_primary::Error),
    /// The worker side failed.
    #[error(transparent)]
    Worker(#[from] cluster_worker::Error),
    /// An I/O operation of the application failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The operation needs a primary, and this process runs alone (`workers(0)`).
    #[error("{what} needs a cluster; this process runs alone")]
    NotClustered {
        /// What was attempted.
        what: &'static str,
    },
    /// The application's own error.
    #[error("{0}")]
    App(Box<dyn std::error::Error + Send + Sync>),
}

impl Error {
    /// Wraps an application error.
    pub fn app(err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
        Error::App(err.into())
    }
}

/// True in a process started as a cluster worker (by its primary: a program a worker starts
/// in turn runs alone).
pub fn is_worker() -> bool {
    cluster_worker::is_worker()
}

/// True in a process that is not a cluster worker (the primary, or a program running alone).
pub fn is_primary() -> bool {
    !is_worker()
}

/// This worker's id (from 1), or `None` outside a running worker.
pub fn worker_id() -> Option<WorkerId> {
    cluster_worker::Worker::current().map(|worker| worker.id())
}

/// Where the cluster is set up: the entry point.
#[derive(Debug, Clone, Copy)]
pub struct Cluster;

impl Cluster {
    /// A builder with the defaults: one worker per available CPU, round-robin.
    pub fn builder() -> Builder {
        Builder::default()
    }
}

type EventHook = Box<dyn FnMut(&mut PrimaryCluster, Event)>;

/// Sets up and runs a clustered program.
#[must_use]
pub struct Builder {
    primary: cluster_primary::Builder,
    workers: Option<usize>,
    on_event: Option<EventHook>,
    worker_options: cluster_worker::WorkerOptions,
    #[cfg(feature = "tokio")]
    runtime: Runtime,
}

/// The tokio runtime [`Builder::run_async`] builds in each worker (the `tokio` feature).
#[cfg(feature = "tokio")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Runtime {
    /// A multi-threaded runtime (the default), with this many worker threads (`None`:
    /// tokio's default, one per CPU; with several cluster workers per machine, fewer may
    /// serve better).
    MultiThread {
        /// How many threads; `None` for tokio's default.
        worker_threads: Option<usize>,
    },
    /// A runtime on the worker's main thread alone: with one cluster worker per CPU, the
    /// process-per-core layout.
    CurrentThread,
}

#[cfg(feature = "tokio")]
impl Default for Runtime {
    /// Multi-threaded, with tokio's default thread count.
    fn default() -> Runtime {
        Runtime::MultiThread {
            worker_threads: None,
        }
    }
}

#[cfg(feature = "tokio")]
impl Runtime {
    fn build(self) -> std::io::Result<::tokio::runtime::Runtime> {
        let mut builder = match self {
            Runtime::MultiThread { worker_threads } => {
                let mut builder = ::tokio::runtime::Builder::new_multi_thread();
                if let Some(threads) = worker_threads {
                    builder.worker_threads(threads.max(1));
                }
                builder
            }
            Runtime::CurrentThread => ::tokio::runtime::Builder::new_current_thread(),
        };
        builder.enable_all().build()
    }
}

impl Default for Builder {
    fn default() -> Builder {
        Builder {
            primary: cluster_primary::Builder::new(),
            workers: None,
            on_event: None,
            worker_options: cluster_worker::WorkerOptions::new(),
            #[cfg(feature = "tokio")]
            runtime: Runtime::default(),
        }
    }
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("primary", &self.primary)
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

impl Builder {
    /// How many workers (default: the available parallelism). 0 runs the closure in this
    /// process with no cluster.
    pub fn workers(mut self, count: usize) -> Builder {
        self.workers = Some(count);
        self
    }

    /// How listeners deliver connections: round-robin (default) or shared.
    pub fn mode(mut self, mode: ListenMode) -> Builder {
        self.primary = self.primary.mode(mode);
        self
    }

    /// The round-robin credit window per worker (see
    /// [`primary::DEFAULT_WINDOW`]).
    pub fn window(mut self, window: u32) -> Builder {
        self.primary = self.primary.window(window);
        self
    }

    /// Who gets the next connection of a round-robin listener: in turn (default) or the
    /// worker with the fewest open connections.
    pub fn policy(mut self, policy: Policy) -> Builder {
        self.primary = self.primary.policy(policy);
        self
    }

    /// The longest message the primary and its workers may send each other, in encoded
    /// bytes (default 16 MiB); a longer one is refused at `send` with an error naming it.
    pub fn max_message_len(mut self, len: usize) -> Builder {
        self.primary = self.primary.max_message_len(len);
        self
    }

    /// How long workers get to finish when they disconnect or the cluster stops.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Builder {
        self.primary = self.primary.shutdown_timeout(timeout);
        self
    }

    /// The hang timeout (see [`primary::Builder::hang_timeout`]; `None` turns hang detection
    /// off).
    pub fn hang_timeout(mut self, timeout: Option<Duration>) -> Builder {
        self.primary = self.primary.hang_timeout(timeout);
        self
    }

    /// When workers are replaced to keep them fresh (see [`Recycle`]).
    pub fn recycle(mut self, recycle: Recycle) -> Builder {
        self.primary = self.primary.recycle(recycle);
        self
    }

    /// Serves the control socket at `path` (see
    /// [`cluster_primary::Builder::control_socket`]); `clusterctl` talks to it.
    pub fn control_socket(mut self, path: impl Into<std::path::PathBuf>) -> Builder {
        self.primary = self.primary.control_socket(path);
        self
    }

    /// Any other primary setting (program, arguments, environment, respawn, signals, ...).
    pub fn primary(
        mut self,
        configure: impl FnOnce(cluster_primary::Builder) -> cluster_primary::Builder,
    ) -> Builder {
        self.primary = configure(self.primary);
        self
    }

    /// Worker-side settings (timeouts, message queue).
    pub fn worker_options(mut self, options: cluster_worker::WorkerOptions) -> Builder {
        self.worker_options = options;
        self
    }

    /// The primary's hook: called on the primary's loop for every [`Event`], with the
    /// cluster to act on (send, broadcast, disconnect, status, stop). Keep it quick.
    pub fn on_event(mut self, hook: impl FnMut(&mut PrimaryCluster, Event) + 'static) -> Builder {
        self.on_event = Some(Box::new(hook));
        self
    }

    /// Runs the program in whatever role this process has (see the crate docs). In a worker,
    /// an error from the closure, or a panic, is logged, the worker disconnects (its open
    /// connections finish) and the process exits with [`WORKER_FAILED_EXIT_CODE`], which the
    /// primary counts as a failure (for its backoff and crash-loop guard) and replaces; if
    /// the worker's own exit does not come first, the error is returned.
    pub fn run<F>(self, worker_main: F) -> Result<(), Error>
    where
        F: FnOnce(&Worker) -> Result<(), Error>,
    {
        if let Some(worker) = cluster_worker::Worker::start(self.worker_options)? {
            return run_worker(worker, worker_main);
        }
        match self.workers {
            Some(0) => worker_main(&Worker { inner: None }),
            count => {
                let primary = match count {
                    Some(count) => self.primary.workers(count),
                    None => self.primary,
                };
                let mut on_event = self.on_event;
                primary.build()?.run(move |cluster, event| {
                    if let Some(hook) = on_event.as_mut() {
                        hook(cluster, event);
                    }
                })?;
                Ok(())
            }
        }
    }
}

#[cfg(feature = "tokio")]
impl Builder {
    /// The tokio runtime [`run_async`](Builder::run_async) builds (default: multi-threaded,
    /// one thread per CPU).
    pub fn runtime(mut self, runtime: Runtime) -> Builder {
        self.runtime = runtime;
        self
    }

    /// [`run`](Builder::run) for async code (the `tokio` feature): in a worker, and with no
    /// cluster (`workers(0)`), it builds the tokio runtime (see
    /// [`runtime`](Builder::runtime)) and runs the future `worker_main` returns on it; in the
    /// primary it supervises as `run` does, and builds no runtime: the primary has no tokio
    /// thread. Everything `run` says of errors, panics and the worker's exit holds; the
    /// runtime is dropped (its tasks cancelled) when the future returns, before the worker
    /// waits for its open connections.
    ///
    /// Inside, [`tokio::TcpListener::bind`] is answered by the primary, and
    /// [`Worker::disconnected`] is the graceful-shutdown signal.
    pub fn run_async<F, Fut>(self, worker_main: F) -> Result<(), Error>
    where
        F: FnOnce(Worker) -> Fut,
        Fut: std::future::Future<Output = Result<(), Error>>,
    {
        let runtime = self.runtime;
        self.run(move |worker| {
            let runtime = runtime.build()?;
            let result = runtime.block_on(worker_main(worker.clone()));
            drop(runtime);
            result
        })
    }
}

fn run_worker<F>(worker: cluster_worker::Worker, worker_main: F) -> Result<(), Error>
where
    F: FnOnce(&Worker) -> Result<(), Error>,
{
    let context = Worker {
        inner: Some(worker.clone()),
    };
    let mut result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker_main(&context)))
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".to_owned());
                Err(Error::app(format!("the worker's code panicked: {what}")))
            });
    if let Err(err) = &result {
        if worker.is_disconnecting() {
            // The disconnect came first (a bind refused because the worker is leaving, an
            // accept on a closed listener): the way out, not a failure.
            tracing::info!(error = %ErrorChain(err), "the worker's code ended while disconnecting");
            result = Ok(());
        } else {
            tracing::error!(error = %ErrorChain(err), "the worker's code failed");
            // The worker exits by itself once drained; make that exit say it failed.
            worker.set_exit_code(WORKER_FAILED_EXIT_CODE);
        }
    }
    // Done accepting either way: finish what is open, then let the worker's control thread
    // end the process once what the worker sent has left (with code 1 after a failure).
    // Returning first would end the process from `main` and drop what is still queued.
    worker.disconnect();
    worker.wait_idle(Instant::now() + worker.drain_timeout());
    worker.wait_closed(EXIT_GRACE);
    result
}

/// How long a worker whose closure returned waits for its control thread to end the process
/// (it does once its messages have left), before `run` returns anyway.
const EXIT_GRACE: Duration = Duration::from_secs(10);

/// How long [`Worker::disconnected`] waits at most for the connections accepted before the
/// disconnect to be read from once.
#[cfg(feature = "tokio")]
const FIRST_READ_WAIT: Duration = Duration::from_secs(1);

/// The exit code of a worker whose closure returned an error.
pub const WORKER_FAILED_EXIT_CODE: i32 = 1;

/// The worker side as the closure sees it: a cluster worker, or this process alone. Cheap to
/// clone (a handle).
#[derive(Debug, Clone)]
pub struct Worker {
    inner: Option<cluster_worker::Worker>,
}

impl Worker {
    /// This worker's id (from 1); `None` when running alone.
    pub fn id(&self) -> Option<WorkerId> {
        self.inner.as_ref().map(cluster_worker::Worker::id)
    }

    /// True in a cluster worker, false when running alone.
    pub fn is_clustered(&self) -> bool {
        self.inner.is_some()
    }

    /// The underlying worker, for everything this facade does not cover.
    pub fn inner(&self) -> Option<&cluster_worker::Worker> {
        self.inner.as_ref()
    }

    /// Sends a message to the primary (its hook gets [`Event::Message`]).
    pub fn send<T: Serialize + ?Sized>(&self, msg: &T) -> Result<(), Error> {
        Ok(self.clustered("send")?.send(msg)?)
    }

    /// Calls `callback` (on the worker's control thread) for each message from the primary.
    pub fn on_message(&self, callback: impl Fn(Message) + Send + 'static) -> Result<(), Error> {
        self.clustered("on_message")?.on_message(callback);
        Ok(())
    }

    /// True once the worker is disconnecting: stop keep-alive and finish up.
    pub fn is_disconnecting(&self) -> bool {
        self.inner
            .as_ref()
            .is_some_and(cluster_worker::Worker::is_disconnecting)
    }

    /// Tells the primary that this worker's serving path is alive, if a heartbeat is due; a
    /// no-op when running alone. An event-loop server calls it once per turn of its loop.
    /// Accepting on a cluster listener does the same; a server that neither accepts nor
    /// calls this while it is busy is declared hung by the primary after the hang timeout
    /// (and replaced). See [`cluster_worker::Worker::heartbeat`].
    pub fn heartbeat(&self) {
        if let Some(worker) = &self.inner {
            worker.heartbeat();
        }
    }

    /// Stops taking connections, finishes the open ones, exits.
    pub fn disconnect(&self) {
        if let Some(worker) = &self.inner {
            worker.disconnect();
        }
    }

    /// Asks the primary to start a replacement, then disconnects (the seed's "suicide"
    /// pattern, with no gap in capacity).
    pub fn retire(&self) -> Result<(), Error> {
        Ok(self.clustered("retire")?.retire()?)
    }

    /// This worker is broken (a request handler panicked, a resource went bad) but can
    /// finish what it has: it retires (its replacement starts first), finishes its open
    /// connections, and exits with [`WORKER_FAILED_EXIT_CODE`], which the primary counts as
    /// a failure for its backoff and crash-loop guard.
    pub fn fail(&self) -> Result<(), Error> {
        let worker = self.clustered("fail")?;
        worker.set_exit_code(WORKER_FAILED_EXIT_CODE);
        Ok(worker.retire()?)
    }

    /// Resolves once the worker is disconnecting (the `tokio` feature), after its listeners
    /// are closed and every connection it accepted through [`tokio::TcpListener`] was read
    /// from once (or closed; a second at most): the signal for axum's
    /// `with_graceful_shutdown` (see [`cluster_worker::Worker::disconnected`]). The wait
    /// matters: a graceful shutdown closes at once a connection whose first request the
    /// server has not read, and a connection accepted just before the disconnect may be one,
    /// its request already on the way. Alone (`workers(0)`) it never resolves: such a
    /// program stops on its own terms, or is killed.
    #[cfg(feature = "tokio")]
    pub fn disconnected(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let disconnected = self
            .inner
            .as_ref()
            .map(cluster_worker::Worker::disconnected);
        async move {
            match disconnected {
                Some(disconnected) => {
                    disconnected.await;
                    tokio::first_reads_done(FIRST_READ_WAIT).await;
                }
                None => std::future::pending().await,
            }
        }
    }

    /// The messages from the primary, received with `.await` (the `tokio` feature; see
    /// [`cluster_worker::Worker::messages`], which replaces any
    /// [`on_message`](Worker::on_message) callback). [`send`](Worker::send) never needs to
    /// wait: it queues.
    #[cfg(feature = "tokio")]
    pub fn messages(&self) -> Result<cluster_worker::AsyncMessages, Error> {
        Ok(self.clustered("messages")?.messages())
    }

    fn clustered(&self, what: &'static str) -> Result<&cluster_worker::Worker, Error> {
        self.inner.as_ref().ok_or(Error::NotClustered { what })
    }
}
