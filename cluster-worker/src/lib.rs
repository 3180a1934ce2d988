//! The worker side of a cluster: what runs inside a worker process.
//!
//! # Overview
//!
//! A primary process owns the listening sockets and starts workers; a worker calls
//! [`Worker::listen`] as if it bound the address itself, and the primary answers. This crate
//! is that worker side:
//!
//! - [`Worker::start`] adopts the control channel and identity the primary passed down (the
//!   environment contract of [`cluster_ipc::env`]: [`IPC_FD_ENV`], [`WORKER_ID_ENV`],
//!   [`WORKER_SLOT_ENV`], [`PRIMARY_PID_ENV`]), says `Hello`, and starts the worker's
//!   *control thread*, which owns the channel from then on and drives the worker's one state
//!   machine (running, disconnecting, finished). [`Worker::connect`] does the same over a
//!   typed channel you already have (embedding, tests).
//! - [`Worker::listen`] returns a [`Listener`]: *round-robin* (the primary accepts and hands
//!   connections down a handoff socket in acked batches) or *shared* (every worker accepts on
//!   the one listening socket, one waiter woken per connection). Either gives [`Stream`]s,
//!   blocking ([`Listener::accept`], [`Listener::incoming`]) or not
//!   ([`Listener::try_accept`], and the listener is a `mio` event source).
//! - Heartbeats: when the primary watches for hung workers, every accept and
//!   [`Worker::heartbeat`] (which an event loop calls once per turn) tell it, at most once per
//!   interval, that the *serving path* is alive; the worker's own control thread never does.
//! - Keep-alive hand-back: a draining worker gives an idle connection back to the primary
//!   between two requests ([`Stream::hand_back`]), with the bytes it read of the next one; the
//!   primary gives it to another worker, whose [`Stream`] reads those bytes first.
//! - [`Worker::send`] and [`Worker::recv_message`] / [`Worker::on_message`] carry the
//!   application's own messages ([`Message`]) to and from the primary, in order, up to the
//!   message limit the primary announced, and never drop one: a full queue in either
//!   direction holds the sender back instead (see [`Worker::send`] and
//!   [`WorkerOptions::message_queue_len`]).
//! - Disconnect: [`Worker::disconnect`], the primary's `Disconnect`, `SIGTERM`, or the end of
//!   the control channel (the primary died, or broke the protocol) all take one path: the
//!   worker closes every listener (a round-robin listener returns the connections it had not
//!   handed out, for the primary to give to another worker), lets open connections finish,
//!   and exits the process once the last [`Stream`] is dropped, or at the drain timeout the
//!   primary announced, with the code set by [`Worker::set_exit_code`] (0 unless set).
//!   [`Worker::retire`] asks the primary to start a replacement first.
//!
//! Linux is the target: shared listeners use `EPOLLEXCLUSIVE` and are refused elsewhere
//! ([`Error::Unsupported`]).
//!
//! # Features
//!
//! `tokio` (off by default, and the only way this crate depends on tokio): an async accept for
//! hyper, axum and any tokio server. [`Listener::into_async`] gives an [`AsyncListener`],
//! whose `accept().await` keeps the blocking accept's semantics (acks before handing out,
//! heartbeats, [`NotConnected`](std::io::ErrorKind::NotConnected) once closed) and returns
//! [`AsyncStream`]s, which implement tokio's `AsyncRead`/`AsyncWrite`, count as open until
//! dropped and read a handed-back connection's bytes first. [`Worker::disconnected`] is a
//! future for graceful shutdown, and [`Worker::messages`] receives messages with `.await`
//! ([`Worker::send`] never needs to: it queues). Build the runtime after
//! [`Worker::start`], in the worker.
//!
//! ```no_run
//! # #[cfg(feature = "tokio")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use cluster_worker::{Worker, WorkerOptions};
//! use tokio::io::AsyncWriteExt;
//!
//! let Some(worker) = Worker::start(WorkerOptions::new())? else { return Ok(()) };
//! let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//! runtime.block_on(async {
//!     let listener = worker.listen("127.0.0.1:8080".parse()?, None)?.into_async()?;
//!     // Ends with `NotConnected` once the worker disconnects.
//!     while let Ok((mut stream, _peer)) = listener.accept().await {
//!         tokio::spawn(async move {
//!             let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi").await;
//!         });
//!     }
//!     Ok::<(), Box<dyn std::error::Error>>(())
//! })
//! # }
//! # #[cfg(not(feature = "tokio"))]
//! # fn main() {}
//! ```
//!
//! # Example
//!
//! A worker program, as the primary starts it:
//!
//! ```no_run
//! use std::io::Write;
//! use cluster_worker::{Worker, WorkerOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let Some(worker) = Worker::start(WorkerOptions::new())? else {
//!     eprintln!("not started by a cluster primary");
//!     return Ok(());
//! };
//! let listener = worker.listen("127.0.0.1:8080".parse()?, None)?;
//! // The loop ends when the worker disconnects, whoever asked.
//! for stream in listener.incoming() {
//!     let mut stream = stream?;
//!     stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi")?;
//! }
//! // Back from the loop: the worker exits by itself once `stream`s are all dropped.
//! worker.wait_idle(std::time::Instant::now() + worker.drain_timeout());
//! # Ok(())
//! # }
//! ```
//!
//! The same worker over a channel of your own, here against a stand-in primary in a thread
//! (this is how the tests drive it):
//!
//! ```
//! use std::time::{Duration, Instant};
//! use cluster_ipc::proto::{PROTOCOL_VERSION, PrimaryControl, ToPrimary, ToWorker};
//! use cluster_ipc::{Channel, Limits, SlotId, UserMessage, WorkerId};
//! use cluster_worker::{Worker, WorkerOptions};
//!
//! type BoxError = Box<dyn std::error::Error + Send + Sync>;
//!
//! # fn main() -> Result<(), BoxError> {
//! let (primary, worker_end) = Channel::pair()?;
//! let mut primary = primary.into_protocol::<PrimaryControl>();
//! let deadline = Some(Instant::now() + Duration::from_secs(5));
//! let stand_in = std::thread::spawn(move || -> Result<String, BoxError> {
//!     let hello = primary.recv(deadline)?;
//!     let welcome = ToWorker::Welcome {
//!         primary_pid: std::process::id(),
//!         protocol_version: PROTOCOL_VERSION,
//!         drain_timeout_ms: 5_000,
//!         max_message_len: 16 << 20,
//!         load_reports: false,
//!         heartbeat_interval_ms: 0,
//!     };
//!     primary.send(Some(hello.seq), &welcome, &[])?;
//!     let greeting = UserMessage::encode("hello, worker", &Limits::default())?;
//!     primary.send(None, &ToWorker::User(greeting), &[])?;
//!     match primary.recv(deadline)?.msg {
//!         ToPrimary::User(answer) => Ok(answer.decode::<String>()?),
//!         other => Err(format!("expected a user message, got {other:?}").into()),
//!     }
//! });
//!
//! let options = WorkerOptions::new().exit_when_disconnected(false);
//! let worker = Worker::connect(worker_end.into_protocol(), WorkerId(1), SlotId(0), options)?;
//! let message = worker.recv_message(Duration::from_secs(5))?.ok_or("no message")?;
//! assert_eq!(message.decode::<String>()?, "hello, worker");
//! worker.send("hello, primary")?;
//! let answer = stand_in.join().map_err(|_| "the stand-in panicked")??;
//! assert_eq!(answer, "hello, primary");
//!
//! // The stand-in is gone, and with it the channel: the worker disconnects.
//! assert!(worker.wait_disconnecting(Duration::from_secs(5)));
//! assert!(worker.wait_closed(Duration::from_secs(5)));
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
// The features section links to what the `tokio` feature adds; without it those links dangle.
#![cfg_attr(not(feature = "tokio"), allow(rustdoc::broken_intra_doc_links))]
// `unsafe` is denied everywhere but in `sys` (the `tokio` feature alone).
#![deny(unsafe_code)]
#![doc(test(attr(deny(warnings))))]

#[cfg(feature = "tokio")]
mod asynch;
mod control;
mod error;
mod listener;
mod signal;
mod state;
mod stream;
#[cfg(feature = "tokio")]
#[allow(unsafe_code)]
mod sys;
mod worker;

#[cfg(feature = "tokio")]
pub use asynch::{AsyncListener, AsyncMessages, AsyncStream};
pub use cluster_ipc::env::{IPC_FD_ENV, PRIMARY_PID_ENV, WORKER_ID_ENV, WORKER_SLOT_ENV};
pub use cluster_ipc::proto::ListenMode;
pub use cluster_ipc::{ListenerId, SlotId, WorkerId};
pub use error::Error;
pub use listener::{Incoming, Listener};
pub use state::DisconnectReason;
pub use stream::Stream;
pub use worker::{Worker, WorkerOptions, is_worker};

/// A message from the primary, still encoded: [`decode`](Message::decode) it as the type the
/// primary sent. The same type carries messages the other way inside the control protocol.
pub use cluster_ipc::UserMessage as Message;
