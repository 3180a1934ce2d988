//! A framed channel over an `AF_UNIX` socket, carrying fds with its frames.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrLike, SockaddrStorage};
use serde::Serialize;

use crate::Error;
use crate::frame::{
    Decoder, Frame, HEADER_LEN, Kind, Limits, Reassembler, Status, encode_body, fragments,
};
use crate::proto::{Encoded, Envelope, Message, Protocol};
use crate::sys::{self, CmsgBuffer};

/// The kind of socket under a [`Channel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `SOCK_SEQPACKET`: one `sendmsg` is one record, so a frame and its fds always arrive
    /// together. The default on Linux.
    SeqPacket,
    /// `SOCK_STREAM`: frames are delimited by their header's length and fds are matched to
    /// frames by the header's fd count. The fallback where `SOCK_SEQPACKET` is missing.
    Stream,
}

impl Transport {
    /// The best transport this platform has.
    pub const fn native() -> Transport {
        if cfg!(target_os = "linux") {
            Transport::SeqPacket
        } else {
            Transport::Stream
        }
    }

    fn sock_type(self) -> SockType {
        match self {
            Transport::SeqPacket => SockType::SeqPacket,
            Transport::Stream => SockType::Stream,
        }
    }
}

/// Room the kernel needs in the send buffer beyond a record's payload. A `SOCK_SEQPACKET`
/// record longer than the send buffer minus a small overhead fails with `EMSGSIZE`; this
/// margin is generous on purpose.
const SNDBUF_MARGIN: usize = 1024;

/// How many frames [`Channel::call`] sets aside while it waits for its reply.
pub const MAX_INBOX_FRAMES: usize = 4096;

/// How many bytes may wait in the outgoing queue of a channel by default, beyond room for
/// one message of the largest size the limits allow.
pub const DEFAULT_MAX_QUEUED_BYTES: usize = 4 * 1024 * 1024;

/// The protocol of an untyped channel: any `serde` type goes either way, in frames of a
/// [`Kind`] the caller picks. This is [`Channel`]'s default; a typed channel
/// (`Channel<P>` for a [`Protocol`] `P`) sends only `P::Send` and receives only `P::Recv`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raw;

#[derive(Debug)]
struct Outgoing {
    bytes: Vec<u8>,
    sent: usize,
    fds: Vec<OwnedFd>,
}

/// One end of a framed, fd-passing channel.
///
/// The socket is always non-blocking. [`send`](Channel::send) sends at once when it can and
/// otherwise queues the frame (with its own copies of the fds) for [`flush`](Channel::flush),
/// so it never blocks and never reorders; [`try_recv`](Channel::try_recv) returns `None` when
/// nothing is there. The blocking forms, [`send_blocking`](Channel::send_blocking),
/// [`recv`](Channel::recv) and [`call`](Channel::call), wait with `poll(2)` up to an optional
/// deadline. For an event loop, the channel is a [`mio::event::Source`]; register it for
/// `READABLE`, and for `WRITABLE` while [`wants_write`](Channel::wants_write) is true.
///
/// Every frame gets the next sequence number of this end (starting at 1); replies carry the
/// request's number as their `ack`. Any sign that the peer is gone or broke the protocol
/// closes the channel: the error is returned once, every later call returns
/// [`Error::Closed`], and no fd that arrived is left open.
///
/// A message longer than one frame travels as several (see [`frame`](crate::frame)): sending
/// splits it and receiving puts it back together, up to [`Limits::max_message_len`].
///
/// `P` is the channel's protocol: [`Raw`] (the default) sends and receives any `serde` type;
/// a [`Protocol`] such as [`proto::WorkerControl`](crate::proto::WorkerControl) makes the
/// channel typed, and [`into_protocol`](Channel::into_protocol) turns one into the other.
#[derive(Debug)]
pub struct Channel<P = Raw> {
    sock: OwnedFd,
    transport: Transport,
    decoder: Decoder,
    next_seq: u64,
    closed: bool,
    /// The peer stopped reading (`EPIPE`): nothing more can be sent, but what the peer sent
    /// before it left can still be read, up to end of file.
    send_closed: bool,
    recv_buf: Vec<u8>,
    /// Stream transport: bytes `recv_start..recv_end` of `recv_buf` are received, undecoded.
    recv_start: usize,
    recv_end: usize,
    /// Stream transport: fds received ahead of the frames that claim them.
    recv_fds: VecDeque<OwnedFd>,
    recv_cmsg: CmsgBuffer,
    send_cmsg: CmsgBuffer,
    encode_buf: Vec<u8>,
    outgoing: VecDeque<Outgoing>,
    queued_bytes: usize,
    max_queued_bytes: usize,
    /// Frames received by [`Channel::call`] while it waited for its reply.
    inbox: VecDeque<Frame>,
    /// The message whose fragments are arriving.
    reassembler: Reassembler,
    protocol: PhantomData<fn() -> P>,
}
impl Channel {
    /// A connected pair over the platform's native transport with default limits.
    pub fn pair() -> Result<(Channel, Channel), Error> {
        Channel::pair_with(Transport::native(), Limits::default())
    }

    /// A connected pair over `transport` with `limits` on both ends. Both sockets are
    /// created close-on-exec.
    pub fn pair_with(transport: Transport, limits: Limits) -> Result<(Channel, Channel), Error> {
        let (a, b) = socket::socketpair(
            AddressFamily::Unix,
            transport.sock_type(),
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .map_err(|errno| Error::errno("socketpair", errno))?;
        Ok((
            Channel::new(a, transport, limits)?,
            Channel::new(b, transport, limits)?,
        ))
    }

    /// Wraps a connected `AF_UNIX` socket (for example one inherited from a parent). Its type
    /// decides the transport; anything but a Unix `SOCK_SEQPACKET` or `SOCK_STREAM` socket is
    /// refused. The fd is made non-blocking and close-on-exec.
    pub fn from_fd(fd: OwnedFd, limits: Limits) -> Result<Channel, Error> {
        let transport = check_socket(fd.as_fd())?;
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|errno| Error::errno("fcntl(F_GETFL)", errno))?;
        let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))
            .map_err(|errno| Error::errno("fcntl(F_SETFL)", errno))?;
        sys::set_cloexec(fd.as_fd(), true)
            .map_err(|errno| Error::errno("fcntl(F_SETFD)", errno))?;
        Channel::new(fd, transport, limits)
    }

    fn new(sock: OwnedFd, transport: Transport, limits: Limits) -> Result<Channel, Error> {
        if transport == Transport::SeqPacket {
            ensure_send_buffer(sock.as_fd(), limits.max_frame_len())?;
        }
        // A stream reads in larger chunks than one frame so that small frames batch up.
        let recv_len = match transport {
            Transport::SeqPacket => limits.max_frame_len(),
            Transport::Stream => limits.max_frame_len().max(64 * 1024),
        };
        Ok(Channel {
            sock,
            transport,
            decoder: Decoder::new(limits),
            next_seq: 1,
            closed: false,
            send_closed: false,
            recv_buf: vec![0; recv_len],
            recv_start: 0,
            recv_end: 0,
            recv_fds: VecDeque::new(),
            recv_cmsg: CmsgBuffer::for_fds(limits.max_fds()),
            send_cmsg: CmsgBuffer::for_fds(limits.max_fds().min(16)),
            encode_buf: Vec::with_capacity(256),
            outgoing: VecDeque::new(),
            queued_bytes: 0,
            max_queued_bytes: default_max_queued_bytes(&limits),
            inbox: VecDeque::new(),
            reassembler: Reassembler::new(),
            protocol: PhantomData,
        })
    }
}

impl<P> Channel<P> {
    /// Sets how many bytes may wait in the outgoing queue before [`send`](Channel::send)
    /// refuses with [`Error::SendQueueFull`] (at least one frame's worth is always allowed).
    pub fn set_max_queued_bytes(&mut self, max: usize) {
        self.max_queued_bytes = max.max(self.decoder.limits().max_frame_len());
    }

    /// Changes the limit on one message's length, both for what this end sends and for what
    /// it accepts (for example once a handshake announced the peer's limit). The send queue's
    /// bound grows with it, so one message of the new size always fits.
    pub fn set_max_message_len(&mut self, max_message_len: usize) -> Result<(), Error> {
        let limits = self.limits().with_max_message_len(max_message_len)?;
        let default = default_max_queued_bytes(&limits);
        self.decoder = Decoder::new(limits);
        self.max_queued_bytes = self.max_queued_bytes.max(default);
        Ok(())
    }

    /// The same channel, speaking protocol `Q` from now on.
    pub fn into_protocol<Q>(self) -> Channel<Q> {
        Channel {
            sock: self.sock,
            transport: self.transport,
            decoder: self.decoder,
            next_seq: self.next_seq,
            closed: self.closed,
            send_closed: self.send_closed,
            recv_buf: self.recv_buf,
            recv_start: self.recv_start,
            recv_end: self.recv_end,
            recv_fds: self.recv_fds,
            recv_cmsg: self.recv_cmsg,
            send_cmsg: self.send_cmsg,
            encode_buf: self.encode_buf,
            outgoing: self.outgoing,
            queued_bytes: self.queued_bytes,
            max_queued_bytes: self.max_queued_bytes,
            inbox: self.inbox,
            reassembler: self.reassembler,
            protocol: PhantomData,
        }
    }

    /// The transport under this channel.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// The limits this end enforces.
    pub fn limits(&self) -> &Limits {
        self.decoder.limits()
    }

    /// The sequence number the next frame sent will carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// True once the channel has closed (peer gone, or a fatal error). A channel whose peer
    /// stopped reading can still deliver what the peer sent earlier: receive until
    /// [`Error::Closed`] to be sure nothing is left.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// True once nothing more can be sent (the peer stopped reading, or the channel closed).
    pub fn is_send_closed(&self) -> bool {
        self.closed || self.send_closed
    }

    /// True while frames wait in the outgoing queue: register for `WRITABLE` and call
    /// [`flush`](Channel::flush) when it fires.
    pub fn wants_write(&self) -> bool {
        !self.outgoing.is_empty()
    }

    /// Bytes waiting in the outgoing queue.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Gives the socket back, dropping anything queued.
    pub fn into_fd(self) -> OwnedFd {
        self.sock
    }

    /// Sends what the outgoing queue holds, as far as the socket takes it. Returns true when
    /// the queue is empty.
    pub fn flush(&mut self) -> Result<bool, Error> {
        if self.closed || self.send_closed {
            return Err(Error::Closed);
        }
        while let Some(mut out) = self.outgoing.pop_front() {
            let borrowed: Vec<BorrowedFd<'_>> = out.fds.iter().map(AsFd::as_fd).collect();
            let written = self.write_frame(&[IoSlice::new(&out.bytes[out.sent..])], &borrowed);
            drop(borrowed);
            let written = match written {
                Ok(written) => written,
                Err(err) => {
                    // A transient failure keeps the frame for the next flush; a fatal one
                    // already emptied the queue.
                    if !self.is_send_closed() {
                        self.outgoing.push_front(out);
                    }
                    return Err(err);
                }
            };
            if written > 0 {
                // Whatever was written carried the fds; never send them twice.
                out.fds.clear();
            }
            out.sent += written;
            self.queued_bytes -= written;
            if out.sent < out.bytes.len() {
                self.outgoing.push_front(out);
                return Ok(false);
            }
        }
        Ok(true)
    }
}

impl Channel<Raw> {
    /// Sends `msg` as a message of `kind`, replying to `ack` if given, with `fds` attached.
    /// Returns its sequence number.
    ///
    /// Never blocks: if the socket is full the message is queued, keeping order, with
    /// duplicates of the fds (the caller's fds may be closed as soon as this returns). A
    /// message over the message limit, too many fds, or a full queue is refused with an error
    /// and leaves the channel usable.
    pub fn send<T: Serialize + ?Sized>(
        &mut self,
        kind: Kind,
        ack: Option<u64>,
        msg: &T,
        fds: &[BorrowedFd<'_>],
    ) -> Result<u64, Error> {
        self.send_with(kind, ack, fds, |out, limits| encode_body(out, msg, limits))
    }

    /// Sends a message whose body is already encoded (for example one being forwarded), like
    /// [`send`](Channel::send) otherwise.
    pub fn send_raw(
        &mut self,
        kind: Kind,
        ack: Option<u64>,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<u64, Error> {
        self.send_body(kind, ack, body, fds)
    }

    /// Sends like [`send`](Channel::send), then waits until the whole queue is written or
    /// the deadline passes.
    pub fn send_blocking<T: Serialize + ?Sized>(
        &mut self,
        kind: Kind,
        ack: Option<u64>,
        msg: &T,
        fds: &[BorrowedFd<'_>],
        deadline: Option<Instant>,
    ) -> Result<u64, Error> {
        let seq = self.send(kind, ack, msg, fds)?;
        self.flush_until(deadline)?;
        Ok(seq)
    }

    /// Receives one message if one is there; `Ok(None)` when the socket has nothing now.
    /// Messages that [`call`](Channel::call) set aside come first.
    pub fn try_recv(&mut self) -> Result<Option<Frame>, Error> {
        self.try_recv_frame()
    }

    /// Receives one message, waiting up to `deadline` (for ever with `None`).
    pub fn recv(&mut self, deadline: Option<Instant>) -> Result<Frame, Error> {
        self.recv_frame(deadline)
    }

    /// Sends a request and waits for the message whose `ack` is its sequence number.
    /// Messages that arrive in the meantime are kept, in order, for the next
    /// [`try_recv`](Channel::try_recv) or [`recv`](Channel::recv).
    pub fn call<T: Serialize + ?Sized>(
        &mut self,
        kind: Kind,
        msg: &T,
        fds: &[BorrowedFd<'_>],
        deadline: Option<Instant>,
    ) -> Result<Frame, Error> {
        let seq = self.send_blocking(kind, None, msg, fds, deadline)?;
        self.wait_reply(seq, deadline)
    }
}

impl<P: Protocol> Channel<P> {
    /// Sends `msg`, replying to `ack` if given, with `fds` attached; returns its sequence
    /// number. Like the untyped [`send`](Channel::send) otherwise: never blocks, and a refusal
    /// leaves the channel usable.
    pub fn send(
        &mut self,
        ack: Option<u64>,
        msg: &P::Send,
        fds: &[BorrowedFd<'_>],
    ) -> Result<u64, Error> {
        self.send_with(P::Send::KIND, ack, fds, |out, limits| {
            encode_body(out, msg, limits)
        })
    }

    /// Sends a message encoded once for several channels (a broadcast).
    pub fn send_encoded(
        &mut self,
        ack: Option<u64>,
        msg: &Encoded<P::Send>,
        fds: &[BorrowedFd<'_>],
    ) -> Result<u64, Error> {
        self.send_body(P::Send::KIND, ack, msg.body(), fds)
    }

    /// Sends like [`send`](Channel::send), then waits until the whole queue is written or
    /// the deadline passes.
    pub fn send_blocking(
        &mut self,
        ack: Option<u64>,
        msg: &P::Send,
        fds: &[BorrowedFd<'_>],
        deadline: Option<Instant>,
    ) -> Result<u64, Error> {
        let seq = self.send(ack, msg, fds)?;
        self.flush_until(deadline)?;
        Ok(seq)
    }

    /// Receives one message if one is there; `Ok(None)` when the socket has nothing now. A
    /// frame of another kind than `P::Recv`'s ([`Error::WrongKind`]) or a body that does not
    /// decode ([`Error::Decode`]) is a protocol error, fatal for the channel.
    pub fn try_recv(&mut self) -> Result<Option<Envelope<P::Recv>>, Error> {
        match self.try_recv_frame()? {
            Some(frame) => self.typed(frame).map(Some),
            None => Ok(None),
        }
    }

    /// Receives one message, waiting up to `deadline` (for ever with `None`).
    pub fn recv(&mut self, deadline: Option<Instant>) -> Result<Envelope<P::Recv>, Error> {
        let frame = self.recv_frame(deadline)?;
        self.typed(frame)
    }

    /// Sends a request and waits for the message whose `ack` is its sequence number;
    /// messages that arrive in the meantime are kept, in order, for the next receive.
    pub fn call(
        &mut self,
        msg: &P::Send,
        fds: &[BorrowedFd<'_>],
        deadline: Option<Instant>,
    ) -> Result<Envelope<P::Recv>, Error> {
        let seq = self.send_blocking(None, msg, fds, deadline)?;
        let frame = self.wait_reply(seq, deadline)?;
        self.typed(frame)
    }

    fn typed(&mut self, frame: Frame) -> Result<Envelope<P::Recv>, Error> {
        let result = if frame.kind() == P::Recv::KIND {
            frame.decode().map(|msg| Envelope {
                seq: frame.header.seq,
                ack: frame.header.ack,
                msg,
                fds: frame.fds,
            })
        } else {
            Err(Error::WrongKind {
                expected: P::Recv::KIND,
                found: frame.kind(),
            })
        };
        // A peer that sends what does not belong here cannot be trusted with the rest.
        result.inspect_err(|_| self.close())
    }
}

impl<P> Channel<P> {
    /// Encodes a message body with `encode` into the reusable buffer and sends it.
    fn send_with(
        &mut self,
        kind: Kind,
        ack: Option<u64>,
        fds: &[BorrowedFd<'_>],
        encode: impl FnOnce(&mut Vec<u8>, &Limits) -> Result<(), Error>,
    ) -> Result<u64, Error> {
        if self.closed || self.send_closed {
            return Err(Error::Closed);
        }
        let limits = *self.limits();
        let mut body = std::mem::take(&mut self.encode_buf);
        body.clear();
        let result =
            encode(&mut body, &limits).and_then(|()| self.send_body(kind, ack, &body, fds));
        self.encode_buf = body;
        result
    }

    /// Sends one message with the next sequence number, which is used up only if the message
    /// was sent or queued.
    fn send_body(
        &mut self,
        kind: Kind,
        ack: Option<u64>,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<u64, Error> {
        if self.closed || self.send_closed {
            return Err(Error::Closed);
        }
        let seq = self.next_seq;
        let limits = *self.limits();
        let mut frames = fragments(kind, seq, ack, fds.len(), body, &limits)?
            .map(|(header, part)| (header.to_bytes(), part));
        // Write at once what the socket takes, unless something waits before this message;
        // only frames the socket did not take are gathered, for the queue.
        let (mut first, mut offset) = (true, 0);
        let mut unsent = None;
        if self.outgoing.is_empty() {
            for (head, part) in frames.by_ref() {
                let attached = if first { fds } else { &[] };
                let written =
                    self.write_frame(&[IoSlice::new(&head), IoSlice::new(part)], attached)?;
                if written < HEADER_LEN + part.len() {
                    (unsent, offset) = (Some((head, part)), written);
                    break;
                }
                first = false;
            }
        } else {
            unsent = frames.next();
        }
        if let Some(unsent) = unsent {
            let rest: Vec<_> = std::iter::once(unsent).chain(frames).collect();
            self.enqueue(&rest, offset, first.then_some(fds))?;
        }
        self.next_seq += 1;
        Ok(seq)
    }

    /// Queues the frames of a message the socket did not take, the first from `offset`. A
    /// message none of which went out yet (`fds` given, then) may be refused for a full
    /// queue; a started one must finish.
    fn enqueue(
        &mut self,
        frames: &[([u8; HEADER_LEN], &[u8])],
        offset: usize,
        fds: Option<&[BorrowedFd<'_>]>,
    ) -> Result<(), Error> {
        let remaining: usize = frames
            .iter()
            .map(|(_, part)| HEADER_LEN + part.len())
            .sum::<usize>()
            - offset;
        let unstarted = fds.is_some() && offset == 0;
        if unstarted && self.queued_bytes + remaining > self.max_queued_bytes {
            return Err(Error::SendQueueFull {
                queued: self.queued_bytes,
                max: self.max_queued_bytes,
            });
        }
        // The fds went with the first byte if anything was sent; otherwise keep copies.
        let mut fds = match fds {
            Some(fds) if offset == 0 => duplicate_fds(fds)?,
            _ => Vec::new(),
        };
        for (i, (head, part)) in frames.iter().enumerate() {
            let mut bytes = Vec::with_capacity(HEADER_LEN + part.len());
            bytes.extend_from_slice(head);
            bytes.extend_from_slice(part);
            let sent = if i == 0 { offset } else { 0 };
            self.queued_bytes += bytes.len() - sent;
            self.outgoing.push_back(Outgoing {
                bytes,
                sent,
                fds: std::mem::take(&mut fds),
            });
        }
        Ok(())
    }

    /// Writes as much of a frame as the socket takes now: all of it or nothing on a
    /// `SOCK_SEQPACKET` socket, any prefix on a stream. Returns the bytes written.
    fn write_frame(
        &mut self,
        frame: &[IoSlice<'_>],
        fds: &[BorrowedFd<'_>],
    ) -> Result<usize, Error> {
        match sys::send_with_fds(self.sock.as_fd(), frame, fds, &mut self.send_cmsg) {
            Ok(n) => Ok(n),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(err) => Err(self.fail_send(err)),
        }
    }

    fn flush_until(&mut self, deadline: Option<Instant>) -> Result<(), Error> {
        while !self.flush()? {
            self.wait(PollFlags::POLLOUT, deadline, "send")?;
        }
        Ok(())
    }

    fn try_recv_frame(&mut self) -> Result<Option<Frame>, Error> {
        match self.inbox.pop_front() {
            Some(frame) => Ok(Some(frame)),
            None => self.try_recv_socket(),
        }
    }

    fn recv_frame(&mut self, deadline: Option<Instant>) -> Result<Frame, Error> {
        match self.inbox.pop_front() {
            Some(frame) => Ok(frame),
            None => self.recv_socket(deadline),
        }
    }

    /// Waits for the reply to `seq`, setting aside what arrives before it.
    fn wait_reply(&mut self, seq: u64, deadline: Option<Instant>) -> Result<Frame, Error> {
        loop {
            let frame = self.recv_socket(deadline)?;
            if frame.ack() == Some(seq) {
                return Ok(frame);
            }
            if self.inbox.len() >= MAX_INBOX_FRAMES {
                return Err(Error::InboxFull {
                    max: MAX_INBOX_FRAMES,
                });
            }
            self.inbox.push_back(frame);
        }
    }

    fn recv_socket(&mut self, deadline: Option<Instant>) -> Result<Frame, Error> {
        loop {
            if let Some(frame) = self.try_recv_socket()? {
                return Ok(frame);
            }
            self.wait(PollFlags::POLLIN, deadline, "receive")?;
        }
    }

    /// The next whole message from the socket, its fragments put back together.
    fn try_recv_socket(&mut self) -> Result<Option<Frame>, Error> {
        if self.closed {
            return Err(Error::Closed);
        }
        let limits = *self.limits();
        let result = loop {
            let frame = match self.transport {
                Transport::SeqPacket => self.recv_record(),
                Transport::Stream => self.recv_stream(),
            };
            match frame {
                Ok(Some(frame)) => match self.reassembler.push(frame, &limits) {
                    Ok(Some(message)) => break Ok(Some(message)),
                    Ok(None) => {}
                    Err(err) => break Err(err),
                },
                other => break other,
            }
        };
        // Whatever went wrong while receiving, the stream can no longer be trusted.
        result.inspect_err(|_| self.close())
    }

    fn recv_record(&mut self) -> Result<Option<Frame>, Error> {
        let received =
            match sys::recv_with_fds(self.sock.as_fd(), &mut self.recv_buf, &mut self.recv_cmsg) {
                Ok(received) => received,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(err) => return Err(peer_gone_or_io("recvmsg", err)),
            };
        if received.control_truncated {
            return Err(Error::ControlTruncated {
                closed: received.fds.len(),
            });
        }
        if received.data_truncated {
            return Err(Error::RecordTruncated {
                max: self.recv_buf.len(),
            });
        }
        if received.len == 0 && received.fds.is_empty() {
            // No frame is ever empty, so a zero-length record is the peer's end of file.
            return Err(Error::Closed);
        }
        self.decoder
            .decode_record(&self.recv_buf[..received.len], received.fds)
            .map(Some)
    }

    fn recv_stream(&mut self) -> Result<Option<Frame>, Error> {
        loop {
            let buffered = &self.recv_buf[self.recv_start..self.recv_end];
            if let Status::Complete((frame, used)) =
                self.decoder.decode(buffered, &mut self.recv_fds)?
            {
                self.recv_start += used;
                return Ok(Some(frame));
            }
            if !self.read_stream()? {
                return Ok(None);
            }
        }
    }

    /// Reads more of the stream. Returns false when nothing is there now.
    fn read_stream(&mut self) -> Result<bool, Error> {
        if self.recv_start > 0 {
            self.recv_buf.copy_within(self.recv_start..self.recv_end, 0);
            self.recv_end -= self.recv_start;
            self.recv_start = 0;
        }
        let space = &mut self.recv_buf[self.recv_end..];
        let received = match sys::recv_with_fds(self.sock.as_fd(), space, &mut self.recv_cmsg) {
            Ok(received) => received,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(err) => return Err(peer_gone_or_io("recvmsg", err)),
        };
        let arrived = received.fds.len();
        self.recv_fds.extend(received.fds);
        if received.control_truncated {
            return Err(Error::ControlTruncated { closed: arrived });
        }
        // A peer may send fds ahead of their frame's bytes only within one frame's worth.
        let max_queued = 2 * self.limits().max_fds();
        if self.recv_fds.len() > max_queued {
            return Err(Error::TooManyQueuedFds {
                queued: self.recv_fds.len(),
                max: max_queued,
            });
        }
        if received.len == 0 {
            let buffered = self.recv_end;
            return Err(if buffered == 0 && self.recv_fds.is_empty() {
                Error::Closed
            } else {
                Error::TruncatedStream { buffered }
            });
        }
        self.recv_end += received.len;
        Ok(true)
    }

    fn wait(
        &mut self,
        events: PollFlags,
        deadline: Option<Instant>,
        op: &'static str,
    ) -> Result<(), Error> {
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(deadline) => {
                let left = crate::deadline::left(deadline).ok_or(Error::TimedOut { op })?;
                PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds = [PollFd::new(self.sock.as_fd(), events)];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(errno) => Err(self.fail_io("poll", io::Error::from(errno))),
        }
    }

    /// A failed `sendmsg`. If the peer merely stopped reading, keep the receive side: frames
    /// it sent before leaving (acks, returned fds) must still be read. Running short of kernel
    /// resources (too many fds in flight for this user, no buffer memory) is back-pressure,
    /// not a broken channel. Anything else closes it.
    fn fail_send(&mut self, err: io::Error) -> Error {
        match err.raw_os_error() {
            Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN) => {
                self.send_closed = true;
                self.outgoing.clear();
                self.queued_bytes = 0;
                Error::Closed
            }
            Some(libc::ETOOMANYREFS | libc::ENOBUFS | libc::ENOMEM) => Error::io("sendmsg", err),
            _ => {
                self.close();
                Error::io("sendmsg", err)
            }
        }
    }

    fn fail_io(&mut self, op: &'static str, err: io::Error) -> Error {
        self.close();
        peer_gone_or_io(op, err)
    }

    /// Closes this end for good: shuts the socket down so the peer sees end of file at once,
    /// and closes every fd waiting in either direction.
    fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        let _ = socket::shutdown(self.sock.as_raw_fd(), socket::Shutdown::Both);
        self.outgoing.clear();
        self.queued_bytes = 0;
        self.recv_fds.clear();
        self.reassembler = Reassembler::new();
        tracing::debug!(fd = self.sock.as_raw_fd(), "channel closed");
    }
}

fn peer_gone_or_io(op: &'static str, err: io::Error) -> Error {
    match err.raw_os_error() {
        Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN) => Error::Closed,
        _ => Error::io(op, err),
    }
}

fn duplicate_fds(fds: &[BorrowedFd<'_>]) -> Result<Vec<OwnedFd>, Error> {
    fds.iter()
        .map(|fd| {
            fd.try_clone_to_owned()
                .map_err(|err| Error::io("fcntl(F_DUPFD_CLOEXEC)", err))
        })
        .collect()
}

/// Checks that `fd` is a Unix socket of a type a channel can use.
pub(crate) fn check_socket(fd: BorrowedFd<'_>) -> Result<Transport, Error> {
    let sock_type =
        socket::getsockopt(&fd, socket::sockopt::SockType).map_err(|_| Error::WrongSocket {
            reason: "not a socket",
        })?;
    let transport = match sock_type {
        SockType::SeqPacket => Transport::SeqPacket,
        SockType::Stream => Transport::Stream,
        _ => {
            return Err(Error::WrongSocket {
                reason: "neither SOCK_SEQPACKET nor SOCK_STREAM",
            });
        }
    };
    let local: SockaddrStorage =
        socket::getsockname(fd.as_raw_fd()).map_err(|errno| Error::errno("getsockname", errno))?;
    if local.family() != Some(AddressFamily::Unix) {
        return Err(Error::WrongSocket {
            reason: "not an AF_UNIX socket",
        });
    }
    Ok(transport)
}

/// Makes sure a record of `max_frame_len` bytes fits the socket's send buffer, growing the
/// buffer if needed.
fn ensure_send_buffer(fd: BorrowedFd<'_>, max_frame_len: usize) -> Result<(), Error> {
    let needed = max_frame_len + SNDBUF_MARGIN;
    let read = |fd: &BorrowedFd<'_>| {
        socket::getsockopt(fd, socket::sockopt::SndBuf)
            .map_err(|errno| Error::errno("getsockopt(SO_SNDBUF)", errno))
    };
    if read(&fd)? >= needed {
        return Ok(());
    }
    // The kernel doubles what is asked for and caps it at net.core.wmem_max.
    let _ = socket::setsockopt(&fd, socket::sockopt::SndBuf, &needed);
    let sndbuf = read(&fd)?;
    if sndbuf < needed {
        return Err(Error::SendBufferTooSmall {
            max_frame_len,
            sndbuf,
        });
    }
    Ok(())
}

/// Room for one message of the largest size `limits` allow, and the default queue beyond it.
fn default_max_queued_bytes(limits: &Limits) -> usize {
    let frames = limits
        .max_message_len()
        .div_ceil(limits.max_body_len())
        .max(1);
    DEFAULT_MAX_QUEUED_BYTES + limits.max_message_len() + frames * HEADER_LEN
}

impl<P> AsFd for Channel<P> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

crate::impl_fd_source!(for<P> Channel<P>, |channel| channel.sock);
