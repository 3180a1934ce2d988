//! Frames with fd passing and seq/ack over Unix sockets: the transport of a cluster.
//!
//! # Overview
//!
//! - [`frame`]: a sans-IO codec. A frame is a fixed [`Header`] (magic, wire version,
//!   [`Kind`], `seq`, optional `ack`, fd count, body length) and a postcard body.
//!   [`encode_message`] writes into your buffer; a [`Decoder`] reads from bytes plus a queue of
//!   received fds and says [`Status::Complete`] or [`Status::Partial`]. A message longer than
//!   a frame travels in [`fragments`] that a [`Reassembler`] puts back together.
//! - [`Channel`]: one end of a connected `AF_UNIX` socket pair, `SOCK_SEQPACKET` on Linux
//!   (one frame per record, fds always with their frame) or a length-prefixed `SOCK_STREAM`
//!   elsewhere. It sends a frame and its borrowed fds in one `sendmsg` (`MSG_NOSIGNAL`),
//!   receives fds with `MSG_CMSG_CLOEXEC` straight into `OwnedFd`s, and closes itself on
//!   anything a broken or hostile peer can do (truncated control data, a wrong fd count,
//!   garbage) without leaking an fd. It works blocking (with deadlines) or in a `mio` loop.
//! - [`Requests`]: a sans-IO table that correlates replies (`ack`) with requests (`seq`),
//!   expires them at their deadlines, drops unknown acks with a trace, and fails every
//!   pending request when the channel closes.
//! - [`proto`]: the messages of a cluster, one type per channel and direction, and the
//!   [`Protocol`](proto::Protocol)s that make a [`Channel`] typed; applications' own messages
//!   ride inside them as [`UserMessage`]s.
//! - [`ids`]: the ids every crate of a cluster uses ([`WorkerId`], [`SlotId`],
//!   [`ListenerId`], [`ConnId`]).
//! - [`process`]: placing a channel end at a fixed fd number in a child `Command`, and adopting
//!   it in the child, once, from an environment variable; [`env`](mod@env): the environment contract
//!   between a primary and its workers.
//!
//! Limits ([`Limits`]) bound every frame and its fds on both ends, so nothing a peer sends can
//! make this crate panic, block forever or grow its memory without bound.
//!
//! # Example
//!
//! A request with a pipe end attached, and its reply:
//!
//! ```
//! use std::io::{Read, Write};
//! use std::os::fd::AsFd;
//! use cluster_ipc::{Channel, Kind};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (mut primary, mut worker) = Channel::pair()?;
//! let (reader, writer) = std::io::pipe()?;
//!
//! let seq = primary.send(Kind::User, None, "here is a pipe", &[writer.as_fd()])?;
//! drop(writer); // the frame holds what it needs; our copy can go
//!
//! let request = worker.recv(None)?;
//! assert_eq!(request.decode::<String>()?, "here is a pipe");
//! let mut pipe = std::fs::File::from(request.fds.into_iter().next().unwrap());
//! pipe.write_all(b"hello through a passed fd")?;
//! drop(pipe);
//! worker.send(Kind::User, Some(request.header.seq), &42u32, &[])?;
//!
//! let reply = primary.recv(None)?;
//! assert_eq!(reply.ack(), Some(seq));
//! assert_eq!(reply.decode::<u32>()?, 42);
//! let mut text = String::new();
//! std::io::BufReader::new(reader).read_to_string(&mut text)?;
//! assert_eq!(text, "hello through a passed fd");
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
#![doc(test(attr(deny(warnings))))]

mod channel;
pub mod deadline;
pub mod env;
mod error;
pub mod frame;
pub mod ids;
pub mod process;
pub mod proto;
mod request;
mod source;
mod sys;

#[doc(hidden)]
pub use mio as __mio;

pub use channel::{Channel, DEFAULT_MAX_QUEUED_BYTES, MAX_INBOX_FRAMES, Raw, Transport};
pub use error::{Error, ErrorChain};
pub use frame::{
    Decoder, Frame, Header, Kind, Limits, Reassembler, Status, encode_body, encode_message,
    encode_raw, fragments,
};
pub use ids::{ConnId, ListenerId, SlotId, WorkerId};
pub use proto::UserMessage;
pub use request::{Completion, Reply, Requests};
