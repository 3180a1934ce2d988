//! The worker side of a cluster: what runs inside a worker process.
//!
//! # Overview
//!
//! A primary process owns the listening sockets and starts workers; a worker calls
//! [`Worker::listen`] as if it bound the address itself, and the primary answers. This crate
//! is that worker side:
//!
//! - [`Worker::start`] adopts the control channel the primary passed down (its fd is named by
//!   [`IPC_FD_ENV`], the worker's id and slot by [`WORKER_ID_ENV`] and [`WORKER_SLOT_ENV`]),
//!   says `Hello`, and starts the worker's *control thread*, which owns the channel from then
//!   on. [`Worker::connect`] does the same over a channel you already have (embedding,
//!   tests).
//! - [`Worker::listen`] returns a [`Listener`]: *round-robin* (the primary accepts and hands
//!   connections down a handoff socket in acked batches) or *shared* (every worker accepts on
//!   the one listening socket, one waiter woken per connection). Either gives [`Stream`]s,
//!   blocking ([`Listener::accept`], [`Listener::incoming`]) or not
//!   ([`Listener::try_accept`], and the listener is a `mio` event source).
//! - [`Worker::send`] and [`Worker::recv_message`] / [`Worker::on_message`] carry the
//!   application's own messages to and from the primary.
//! - Disconnect: [`Worker::disconnect`], the primary's `Disconnect`, `SIGTERM`, or the end of
//!   the control channel (the primary died) all take one path: the worker closes every
//!   listener (a round-robin listener returns the connections it had not handed out, for the
//!   primary to give to another worker), lets open connections finish, and exits the
//!   process with code 0 once the last [`Stream`] is dropped, or at the drain timeout the
//!   primary announced. [`Worker::retire`] asks the primary to start a replacement first.
//!
//! Linux is the target: shared listeners use `EPOLLEXCLUSIVE` and are refused elsewhere
//! ([`Error::Unsupported`]).
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
//! use cluster_ipc::proto::{Control, PROTOCOL_VERSION};
//! use cluster_ipc::{Channel, Kind};
//! use cluster_worker::{Worker, WorkerOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (mut primary, worker_end) = Channel::pair()?;
//! let deadline = Some(Instant::now() + Duration::from_secs(5));
//! let stand_in = std::thread::spawn(move || -> Result<String, cluster_ipc::Error> {
//!     let hello = primary.recv(deadline)?;
//!     let welcome = Control::Welcome {
//!         primary_pid: std::process::id(),
//!         protocol_version: PROTOCOL_VERSION,
//!         drain_timeout_ms: 5_000,
//!     };
//!     primary.send(Kind::Control, Some(hello.seq()), &welcome, &[])?;
//!     primary.send(Kind::User, None, "hello, worker", &[])?;
//!     let answer = primary.recv(deadline)?;
//!     answer.decode::<String>()
//! });
//!
//! let options = WorkerOptions::new().exit_when_disconnected(false);
//! let worker = Worker::connect(worker_end, 1, 0, options)?;
//! let message = worker.recv_message(Duration::from_secs(5))?.expect("a message");
//! assert_eq!(message.decode::<String>()?, "hello, worker");
//! worker.send("hello, primary")?;
//! assert_eq!(stand_in.join().expect("no panic")?, "hello, primary");
//!
//! // The stand-in is gone, and with it the channel: the worker disconnects.
//! assert!(worker.wait_disconnecting(Duration::from_secs(5)));
//! assert!(worker.wait_closed(Duration::from_secs(5)));
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![doc(test(attr(deny(warnings))))]

mod control;
mod error;
mod listener;
mod message;
mod signal;
mod state;
mod stream;
mod worker;

pub use cluster_ipc::proto::{ListenMode, ListenerId};
pub use error::Error;
pub use listener::{Incoming, Listener};
pub use message::Message;
pub use state::DisconnectReason;
pub use stream::Stream;
pub use worker::{Worker, WorkerOptions, is_worker};

/// The environment variable holding the worker's id: a decimal `u64`, from 1.
pub const WORKER_ID_ENV: &str = "CLUSTER_WORKER_ID";

/// The environment variable holding the worker's slot: a decimal `u32`.
pub const WORKER_SLOT_ENV: &str = "CLUSTER_WORKER_SLOT";

/// The environment variable holding the fd number of the inherited control channel.
pub const IPC_FD_ENV: &str = "CLUSTER_IPC_FD";
