//! The sans-IO frame codec: a fixed header and a postcard body.
//!
//! A frame on the wire is a [`HEADER_LEN`]-byte header followed by `body_len` bytes of body:
//!
//! | bytes  | field       | meaning                                              |
//! |--------|-------------|------------------------------------------------------|
//! | 0..2   | magic       | `0xC1 0x57`                                          |
//! | 2      | version     | [`WIRE_VERSION`]                                     |
//! | 3      | kind        | [`Kind`]                                             |
//! | 4      | flags       | bit 0: `ack` is present; bit 1: more fragments follow |
//! | 5      | fd count    | how many fds travel with this frame                  |
//! | 6..8   | reserved    | zero                                                 |
//! | 8..16  | seq         | the sender's sequence number, little-endian          |
//! | 16..24 | ack         | the `seq` this frame replies to, when flagged        |
//! | 24..28 | body length | little-endian                                        |
//!
//! Nothing here touches a socket: [`encode_message`] writes into the caller's buffer, and
//! [`Decoder::decode`] reads from bytes plus a queue of fds that arrived with them, returning
//! [`Status::Partial`] until a whole frame is there. That is what a byte-stream transport needs;
//! on a `SOCK_SEQPACKET` socket one record holds exactly one frame, so a `Partial` there is a
//! protocol error.
//!
//! A message longer than one frame's body travels as consecutive *fragments*: frames of the
//! same kind and `seq`, each but the last flagged "more", fds only on the first. A
//! [`Reassembler`] puts them back together, up to [`Limits::max_message_len`].

use std::collections::VecDeque;
use std::os::fd::OwnedFd;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Error;

/// The two magic bytes every frame starts with.
pub const MAGIC: u16 = 0xC157;
/// The wire format version this crate speaks. The control protocol has its own version
/// ([`crate::proto::PROTOCOL_VERSION`]), checked in the handshake.
pub const WIRE_VERSION: u8 = 1;
/// The length of the fixed header.
pub const HEADER_LEN: usize = 28;
/// The kernel's limit on fds in one `SCM_RIGHTS` message (`SCM_MAX_FD`).
pub const KERNEL_MAX_FDS: usize = 253;

const FLAG_ACK: u8 = 0b01;
const FLAG_MORE: u8 = 0b10;

/// What a frame's body holds: on a typed channel, which channel and direction its message
/// belongs to (see [`crate::proto`]), so that a frame sent where it does not belong is refused
/// on arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum Kind {
    /// A message of an untyped channel, opaque to this crate (any `serde` type).
    User = 2,
    /// A control message from the primary to a worker ([`crate::proto::ToWorker`]).
    ToWorker = 3,
    /// A control message from a worker to the primary ([`crate::proto::ToPrimary`]).
    ToPrimary = 4,
    /// A handoff message from the primary to a worker ([`crate::proto::HandoffToWorker`]).
    HandoffToWorker = 5,
    /// A handoff message from a worker to the primary ([`crate::proto::HandoffToPrimary`]).
    HandoffToPrimary = 6,
}

impl Kind {
    fn from_byte(byte: u8) -> Result<Kind, Error> {
        match byte {
            2 => Ok(Kind::User),
            3 => Ok(Kind::ToWorker),
            4 => Ok(Kind::ToPrimary),
            5 => Ok(Kind::HandoffToWorker),
            6 => Ok(Kind::HandoffToPrimary),
            kind => Err(Error::UnknownKind { kind }),
        }
    }
}

/// Size limits, checked on both ends of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    max_frame_len: usize,
    max_fds: usize,
    max_message_len: usize,
}

impl Limits {
    /// The default frame limit: 64 KiB, well below a Unix socket's default send buffer.
    pub const DEFAULT_MAX_FRAME_LEN: usize = 64 * 1024;
    /// The default limit on fds per frame.
    pub const DEFAULT_MAX_FDS: usize = 64;
    /// The default limit on one message's encoded length, over all its fragments: 16 MiB.
    pub const DEFAULT_MAX_MESSAGE_LEN: usize = 16 * 1024 * 1024;

    /// Limits of `max_frame_len` bytes per frame (header included) and `max_fds` fds per
    /// frame. The frame must have room for a header and fit in a `u32`; the fd count may not
    /// exceed the kernel's [`KERNEL_MAX_FDS`].
    pub fn new(max_frame_len: usize, max_fds: usize) -> Result<Limits, Error> {
        if max_frame_len <= HEADER_LEN {
            return Err(Error::InvalidLimits {
                reason: "max_frame_len must exceed the header",
            });
        }
        if u32::try_from(max_frame_len).is_err() {
            return Err(Error::InvalidLimits {
                reason: "max_frame_len must fit in a u32",
            });
        }
        if max_fds > KERNEL_MAX_FDS {
            return Err(Error::InvalidLimits {
                reason: "max_fds may not exceed the kernel's 253",
            });
        }
        Ok(Limits {
            max_frame_len,
            max_fds,
            max_message_len: Self::DEFAULT_MAX_MESSAGE_LEN,
        })
    }

    /// The same limits with another limit on one message's encoded length (its body, over
    /// every fragment). It must fit in a `u32`; a message no longer than one frame's body
    /// always fits, whatever this says.
    pub fn with_max_message_len(mut self, max_message_len: usize) -> Result<Limits, Error> {
        if u32::try_from(max_message_len).is_err() {
            return Err(Error::InvalidLimits {
                reason: "max_message_len must fit in a u32",
            });
        }
        self.max_message_len = max_message_len;
        Ok(self)
    }

    /// The longest message, in encoded bytes over all its fragments.
    pub fn max_message_len(&self) -> usize {
        self.max_message_len
    }

    /// The largest frame, header included.
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    /// The largest body a frame can carry.
    pub fn max_body_len(&self) -> usize {
        self.max_frame_len - HEADER_LEN
    }

    /// The most fds one frame may carry.
    pub fn max_fds(&self) -> usize {
        self.max_fds
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_frame_len: Self::DEFAULT_MAX_FRAME_LEN,
            max_fds: Self::DEFAULT_MAX_FDS,
            max_message_len: Self::DEFAULT_MAX_MESSAGE_LEN,
        }
    }
}

/// A frame's fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the body holds.
    pub kind: Kind,
    /// The sender's sequence number.
    pub seq: u64,
    /// The `seq` of the request this frame answers, if it is a reply.
    pub ack: Option<u64>,
    /// How many fds travel with the frame.
    pub fd_count: u8,
    /// The body's length in bytes.
    pub body_len: u32,
    /// More fragments of this message follow.
    pub more: bool,
}

impl Header {
    /// The frame's whole length, header included.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.body_len as usize
    }

    /// Writes the header's bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..2].copy_from_slice(&MAGIC.to_be_bytes());
        out[2] = WIRE_VERSION;
        out[3] = self.kind as u8;
        out[4] =
            if self.ack.is_some() { FLAG_ACK } else { 0 } | if self.more { FLAG_MORE } else { 0 };
        out[5] = self.fd_count;
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..24].copy_from_slice(&self.ack.unwrap_or(0).to_le_bytes());
        out[24..28].copy_from_slice(&self.body_len.to_le_bytes());
        out
    }

    /// Checks as much of a header as `bytes` holds, so that garbage is refused as soon as it
    /// can be told apart from a frame. Returns the header once all of it is there.
    fn parse_prefix(bytes: &[u8], limits: &Limits) -> Result<Option<Header>, Error> {
        if bytes.len() >= 2 {
            let found = u16::from_be_bytes([bytes[0], bytes[1]]);
            if found != MAGIC {
                return Err(Error::BadMagic {
                    found,
                    expected: MAGIC,
                });
            }
        }
        if let Some(&found) = bytes.get(2) {
            if found != WIRE_VERSION {
                return Err(Error::UnsupportedVersion {
                    found,
                    expected: WIRE_VERSION,
                });
            }
        }
        let Some(header) = bytes.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let kind = Kind::from_byte(header[3])?;
        let flags = header[4];
        let reserved = u16::from_le_bytes([header[6], header[7]]);
        if flags & !(FLAG_ACK | FLAG_MORE) != 0 || reserved != 0 {
            return Err(Error::UndefinedBits { flags, reserved });
        }
        let fd_count = header[5];
        let header = Header {
            kind,
            seq: u64::from_le_bytes(le_array(&header[8..16])),
            ack: (flags & FLAG_ACK != 0).then(|| u64::from_le_bytes(le_array(&header[16..24]))),
            fd_count,
            body_len: u32::from_le_bytes(le_array(&header[24..28])),
            more: flags & FLAG_MORE != 0,
        };
        if header.frame_len() > limits.max_frame_len {
            return Err(Error::FrameTooLarge {
                len: header.frame_len(),
                max: limits.max_frame_len,
            });
        }
        if usize::from(fd_count) > limits.max_fds {
            return Err(Error::TooManyFds {
                count: fd_count.into(),
                max: limits.max_fds,
            });
        }
        Ok(Some(header))
    }
}

fn le_array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(bytes);
    out
}

/// Appends one frame to `out`: the header, then `msg` encoded with postcard. `fd_count` is the
/// number of fds the caller will send with it. On error `out` is left as it was.
pub fn encode_message<T: Serialize + ?Sized>(
    out: &mut Vec<u8>,
    kind: Kind,
    seq: u64,
    ack: Option<u64>,
    fd_count: usize,
    msg: &T,
    limits: &Limits,
) -> Result<(), Error> {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    let appender = Appender {
        out,
        end: start + limits.max_frame_len,
        overflowed: false,
    };
    let result = match postcard::to_extend(msg, appender) {
        Err(err) => Err(Error::Encode(err)),
        Ok(Appender {
            overflowed: true, ..
        }) => Err(Error::FrameTooLarge {
            len: limits.max_frame_len + 1,
            max: limits.max_frame_len,
        }),
        Ok(Appender { out, .. }) => finish_frame(out, start, kind, seq, ack, fd_count, limits),
    };
    if result.is_err() {
        out.truncate(start);
    }
    result
}

/// Lets postcard append to a borrowed buffer, so a failed encoding can be undone, and stops
/// growing it at the frame limit, so an oversized message costs no more memory than a frame.
struct Appender<'a> {
    out: &'a mut Vec<u8>,
    end: usize,
    overflowed: bool,
}

impl Extend<u8> for Appender<'_> {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, bytes: I) {
        for byte in bytes {
            if self.out.len() < self.end {
                self.out.push(byte);
            } else {
                self.overflowed = true;
            }
        }
    }
}

/// Appends one frame whose body is `body` (already encoded) to `out`.
pub fn encode_raw(
    out: &mut Vec<u8>,
    kind: Kind,
    seq: u64,
    ack: Option<u64>,
    fd_count: usize,
    body: &[u8],
    limits: &Limits,
) -> Result<(), Error> {
    let start = out.len();
    check_frame_len(HEADER_LEN + body.len(), limits)?;
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    out.extend_from_slice(body);
    finish_frame(out, start, kind, seq, ack, fd_count, limits).inspect_err(|_| out.truncate(start))
}

fn check_frame_len(len: usize, limits: &Limits) -> Result<(), Error> {
    if len > limits.max_frame_len {
        return Err(Error::FrameTooLarge {
            len,
            max: limits.max_frame_len,
        });
    }
    Ok(())
}

fn finish_frame(
    out: &mut [u8],
    start: usize,
    kind: Kind,
    seq: u64,
    ack: Option<u64>,
    fd_count: usize,
    limits: &Limits,
) -> Result<(), Error> {
    let frame_len = out.len() - start;
    check_frame_len(frame_len, limits)?;
    if fd_count > limits.max_fds {
        return Err(Error::TooManyFds {
            count: fd_count,
            max: limits.max_fds,
        });
    }
    let header = Header {
        kind,
        seq,
        ack,
        // Both fit: checked against the limits, which are at most 253 fds and u32::MAX bytes.
        fd_count: fd_count as u8,
        body_len: (frame_len - HEADER_LEN) as u32,
        more: false,
    };
    out[start..start + HEADER_LEN].copy_from_slice(&header.to_bytes());
    Ok(())
}

/// The longest body one message may have under `limits`: the message limit, but never less
/// than what fits in one frame.
fn message_capacity(limits: &Limits) -> usize {
    limits.max_message_len.max(limits.max_body_len())
}

/// Appends the postcard encoding of `msg` to `out`, up to the message limit; on error `out`
/// is left as it was. The result is a message body, for [`fragments`].
pub fn encode_body<T: Serialize + ?Sized>(
    out: &mut Vec<u8>,
    msg: &T,
    limits: &Limits,
) -> Result<(), Error> {
    let start = out.len();
    let max = message_capacity(limits);
    let appender = Appender {
        out,
        end: start + max,
        overflowed: false,
    };
    let result = match postcard::to_extend(msg, appender) {
        Err(err) => Err(Error::Encode(err)),
        Ok(Appender {
            overflowed: true, ..
        }) => Err(Error::MessageTooLarge { len: max + 1, max }),
        Ok(_) => Ok(()),
    };
    if result.is_err() {
        out.truncate(start);
    }
    result
}

/// Splits a message body into the frames that carry it: one frame when it fits, otherwise
/// consecutive fragments of the same `kind` and `seq`, each but the last flagged
/// [`Header::more`], the fds (`fd_count` of them) with the first. Yields each frame's header
/// and its part of `body`; send them in order, with nothing in between.
pub fn fragments<'a>(
    kind: Kind,
    seq: u64,
    ack: Option<u64>,
    fd_count: usize,
    body: &'a [u8],
    limits: &Limits,
) -> Result<impl ExactSizeIterator<Item = (Header, &'a [u8])> + 'a, Error> {
    let max = message_capacity(limits);
    if body.len() > max {
        return Err(Error::MessageTooLarge {
            len: body.len(),
            max,
        });
    }
    if fd_count > limits.max_fds {
        return Err(Error::TooManyFds {
            count: fd_count,
            max: limits.max_fds,
        });
    }
    let chunk = limits.max_body_len();
    let count = body.len().div_ceil(chunk).max(1);
    Ok((0..count).map(move |index| {
        let part = &body[(index * chunk).min(body.len())..((index + 1) * chunk).min(body.len())];
        let header = Header {
            kind,
            seq,
            ack,
            // Both fit: checked against the limits above.
            fd_count: if index == 0 { fd_count as u8 } else { 0 },
            body_len: part.len() as u32,
            more: index + 1 < count,
        };
        (header, part)
    }))
}

/// Puts fragmented messages back together: feed it every frame of a channel, in order, and it
/// gives back each whole message as one [`Frame`] (header flags cleared, body complete, fds
/// from the first fragment).
///
/// A fragment that does not continue the message in progress (another kind or `seq`, or fds
/// on a later fragment) and a message over [`Limits::max_message_len`] are errors; both are
/// fatal for the channel.
#[derive(Debug, Default)]
pub struct Reassembler {
    partial: Option<Frame>,
}

impl Reassembler {
    /// A reassembler with nothing in progress.
    pub fn new() -> Reassembler {
        Reassembler::default()
    }

    /// Takes the next frame; returns a whole message once its last fragment is in.
    pub fn push(&mut self, frame: Frame, limits: &Limits) -> Result<Option<Frame>, Error> {
        let max = message_capacity(limits);
        let Some(mut partial) = self.partial.take() else {
            if frame.header.more {
                self.partial = Some(frame);
                return Ok(None);
            }
            return Ok(Some(frame));
        };
        if frame.header.kind != partial.header.kind || frame.header.seq != partial.header.seq {
            return Err(Error::BadFragment {
                reason: "a frame interrupted a fragmented message",
            });
        }
        if !frame.fds.is_empty() {
            return Err(Error::BadFragment {
                reason: "fds on a fragment other than the first",
            });
        }
        let len = partial.body.len() + frame.body.len();
        if len > max {
            return Err(Error::MessageTooLarge { len, max });
        }
        partial.body.extend_from_slice(&frame.body);
        partial.header.body_len = len as u32;
        if frame.header.more {
            self.partial = Some(partial);
            return Ok(None);
        }
        partial.header.more = false;
        Ok(Some(partial))
    }

    /// True while a message is only partly in.
    pub fn in_progress(&self) -> bool {
        self.partial.is_some()
    }
}

/// A whole frame: its header, its body bytes and the fds that came with it.
#[derive(Debug)]
pub struct Frame {
    /// The frame's header.
    pub header: Header,
    /// The encoded body.
    pub body: Vec<u8>,
    /// The fds that travelled with the frame, in the order they were sent.
    pub fds: Vec<OwnedFd>,
}

impl Frame {
    /// Decodes the body as a `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, Error> {
        postcard::from_bytes(&self.body).map_err(|source| Error::Decode {
            kind: self.header.kind,
            source,
        })
    }

    /// The frame's kind.
    pub fn kind(&self) -> Kind {
        self.header.kind
    }

    /// The sender's sequence number.
    pub fn seq(&self) -> u64 {
        self.header.seq
    }

    /// The request this frame answers, if it is a reply.
    pub fn ack(&self) -> Option<u64> {
        self.header.ack
    }
}

/// The result of a decoding step.
#[derive(Debug)]
pub enum Status<T> {
    /// A whole item was decoded.
    Complete(T),
    /// More bytes are needed: at least `needed` more.
    Partial {
        /// The least number of further bytes that could complete the item.
        needed: usize,
    },
}

/// Decodes frames from bytes plus the fds that arrived with them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Decoder {
    limits: Limits,
}

impl Decoder {
    /// A decoder that enforces `limits`.
    pub fn new(limits: Limits) -> Decoder {
        Decoder { limits }
    }

    /// The limits this decoder enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Decodes the frame at the start of `bytes`. On `Complete((frame, consumed))` the frame
    /// took `consumed` bytes and its fds were taken from the front of `fds`.
    ///
    /// Fds must have been pushed in arrival order; on a stream socket they arrive with the
    /// first byte of their frame, so a complete frame whose fds are not all queued is an
    /// error ([`Error::FdCountMismatch`]). Every error is fatal for the stream; the fds still
    /// queued are then closed (the queue is emptied).
    pub fn decode(
        &self,
        bytes: &[u8],
        fds: &mut VecDeque<OwnedFd>,
    ) -> Result<Status<(Frame, usize)>, Error> {
        self.decode_inner(bytes, fds).inspect_err(|_| fds.clear())
    }

    fn decode_inner(
        &self,
        bytes: &[u8],
        fds: &mut VecDeque<OwnedFd>,
    ) -> Result<Status<(Frame, usize)>, Error> {
        let Some(header) = Header::parse_prefix(bytes, &self.limits)? else {
            return Ok(Status::Partial {
                needed: HEADER_LEN - bytes.len(),
            });
        };
        let frame_len = header.frame_len();
        if bytes.len() < frame_len {
            return Ok(Status::Partial {
                needed: frame_len - bytes.len(),
            });
        }
        let wanted = usize::from(header.fd_count);
        if fds.len() < wanted {
            return Err(Error::FdCountMismatch {
                expected: wanted,
                received: fds.len(),
            });
        }
        let frame = Frame {
            header,
            body: bytes[HEADER_LEN..frame_len].to_vec(),
            fds: fds.drain(..wanted).collect(),
        };
        Ok(Status::Complete((frame, frame_len)))
    }

    /// Decodes one `SOCK_SEQPACKET` record, which must hold exactly one frame and exactly the
    /// fds its header announces. On error every fd is closed.
    pub fn decode_record(&self, record: &[u8], fds: Vec<OwnedFd>) -> Result<Frame, Error> {
        let received = fds.len();
        let mut queue = VecDeque::from(fds);
        match self.decode(record, &mut queue)? {
            Status::Partial { needed } => Err(Error::RecordLengthMismatch {
                frame_len: record.len() + needed,
                record_len: record.len(),
            }),
            Status::Complete((_, consumed)) if consumed != record.len() => {
                Err(Error::RecordLengthMismatch {
                    frame_len: consumed,
                    record_len: record.len(),
                })
            }
            Status::Complete(_) if !queue.is_empty() => Err(Error::FdCountMismatch {
                expected: received - queue.len(),
                received,
            }),
            Status::Complete((frame, _)) => Ok(frame),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(kind: Kind, seq: u64, ack: Option<u64>, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_raw(&mut out, kind, seq, ack, 0, body, &Limits::default()).unwrap();
        out
    }

    #[test]
    fn header_round_trips() {
        let bytes = encode(Kind::User, 7, Some(3), b"hi");
        let mut fds = VecDeque::new();
        let Status::Complete((frame, used)) = Decoder::default().decode(&bytes, &mut fds).unwrap()
        else {
            panic!("expected a whole frame");
        };
        assert_eq!(used, bytes.len());
        assert_eq!(frame.header.seq, 7);
        assert_eq!(frame.header.ack, Some(3));
        assert_eq!(frame.body, b"hi");
    }

    #[test]
    fn garbage_is_refused_after_two_bytes() {
        let err = Decoder::default()
            .decode(b"GE", &mut VecDeque::new())
            .unwrap_err();
        assert!(matches!(err, Error::BadMagic { .. }), "{err:?}");
    }

    #[test]
    fn a_huge_length_is_refused_before_the_body_arrives() {
        let mut bytes = encode(Kind::User, 1, None, b"");
        bytes[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = Decoder::default()
            .decode(&bytes, &mut VecDeque::new())
            .unwrap_err();
        assert!(matches!(err, Error::FrameTooLarge { .. }), "{err:?}");
    }

    #[test]
    fn a_message_over_the_limit_is_refused_at_encoding_and_leaves_the_buffer_alone() {
        let limits = Limits::new(64, 4).unwrap();
        let mut out = vec![1, 2, 3];
        let big = vec![0u8; 100];
        let err = encode_message(&mut out, Kind::User, 1, None, 0, &big, &limits).unwrap_err();
        assert!(matches!(err, Error::FrameTooLarge { .. }), "{err:?}");
        assert_eq!(out, [1, 2, 3]);
    }

    #[test]
    fn limits_refuse_more_fds_than_the_kernel_allows() {
        assert!(Limits::new(1024, 254).is_err());
        assert!(Limits::new(1024, 253).is_ok());
        assert!(Limits::new(HEADER_LEN, 1).is_err());
    }
}
