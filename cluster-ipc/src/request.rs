//! Correlating replies with requests: a sans-IO table of pending requests.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

use crate::Error;
use crate::frame::Frame;
use crate::proto::Envelope;

/// A received message that may be a reply: what [`Requests`] needs to know of it.
pub trait Reply {
    /// The sender's sequence number.
    fn seq(&self) -> u64;
    /// The request it answers, if any.
    fn ack(&self) -> Option<u64>;
}

impl Reply for Frame {
    fn seq(&self) -> u64 {
        self.header.seq
    }

    fn ack(&self) -> Option<u64> {
        self.header.ack
    }
}

impl<M> Reply for Envelope<M> {
    fn seq(&self) -> u64 {
        self.seq
    }

    fn ack(&self) -> Option<u64> {
        self.ack
    }
}

/// How a pending request ended.
#[derive(Debug)]
pub struct Completion<K, R = Frame> {
    /// The request's sequence number.
    pub seq: u64,
    /// What the caller registered with it.
    pub key: K,
    /// The reply, or why none will come: [`Error::Closed`] when the channel closed,
    /// [`Error::TimedOut`] when the deadline passed.
    pub outcome: Result<R, Error>,
}

#[derive(Debug)]
struct Pending<K> {
    key: K,
    deadline: Option<Instant>,
}

/// Pending requests of one channel, keyed by the `seq` they were sent with.
///
/// Feed it every received frame ([`on_frame`](Requests::on_frame)), the time
/// ([`on_time`](Requests::on_time), at [`next_deadline`](Requests::next_deadline)) and the
/// channel's end ([`on_closed`](Requests::on_closed)); take results with
/// [`poll_completion`](Requests::poll_completion). Every request ends exactly once: with its
/// reply, at its deadline, or when the channel closes. A reply to a request that is not
/// pending (unknown, late, or already timed out) is dropped with a trace, never an error.
#[derive(Debug)]
pub struct Requests<K, R = Frame> {
    pending: BTreeMap<u64, Pending<K>>,
    deadlines: BTreeSet<(Instant, u64)>,
    completions: VecDeque<Completion<K, R>>,
    closed: bool,
}

impl<K, R> Default for Requests<K, R> {
    fn default() -> Self {
        Requests {
            pending: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            completions: VecDeque::new(),
            closed: false,
        }
    }
}

impl<K> Requests<K> {
    /// An empty table for replies that are plain [`Frame`]s; `Requests::default()` makes one
    /// for any [`Reply`], such as a typed channel's [`Envelope`]s.
    pub fn new() -> Requests<K> {
        Requests::default()
    }
}

impl<K, R: Reply> Requests<K, R> {
    /// Records that a request went out as `seq`. A request registered after the channel
    /// closed fails at once.
    pub fn register(&mut self, seq: u64, key: K, deadline: Option<Instant>) -> Result<(), Error> {
        if self.pending.contains_key(&seq) {
            return Err(Error::DuplicateSeq { seq });
        }
        if self.closed {
            self.completions.push_back(Completion {
                seq,
                key,
                outcome: Err(Error::Closed),
            });
            return Ok(());
        }
        if let Some(at) = deadline {
            self.deadlines.insert((at, seq));
        }
        self.pending.insert(seq, Pending { key, deadline });
        Ok(())
    }

    /// Takes a received frame. A reply to a pending request completes it; a reply to anything
    /// else is dropped (and traced). Frames that are not replies come back to the caller.
    pub fn on_frame(&mut self, frame: R) -> Option<R> {
        let Some(ack) = frame.ack() else {
            return Some(frame);
        };
        match self.pending.remove(&ack) {
            Some(pending) => {
                if let Some(at) = pending.deadline {
                    self.deadlines.remove(&(at, ack));
                }
                self.completions.push_back(Completion {
                    seq: ack,
                    key: pending.key,
                    outcome: Ok(frame),
                });
            }
            None => tracing::debug!(
                ack,
                seq = frame.seq(),
                "dropping a reply to no pending request"
            ),
        }
        None
    }

    /// Fails every request whose deadline is at or before `now`.
    pub fn on_time(&mut self, now: Instant) {
        while let Some(&(at, seq)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            if let Some(pending) = self.pending.remove(&seq) {
                self.completions.push_back(Completion {
                    seq,
                    key: pending.key,
                    outcome: Err(Error::TimedOut {
                        op: "receive a reply",
                    }),
                });
            }
        }
    }

    /// The channel closed: every pending request fails, and so will later ones.
    pub fn on_closed(&mut self) {
        self.closed = true;
        self.deadlines.clear();
        for (seq, pending) in std::mem::take(&mut self.pending) {
            self.completions.push_back(Completion {
                seq,
                key: pending.key,
                outcome: Err(Error::Closed),
            });
        }
    }

    /// The earliest deadline of a pending request.
    #[must_use]
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|&(at, _)| at)
    }

    /// The next request that ended.
    #[must_use]
    pub fn poll_completion(&mut self) -> Option<Completion<K, R>> {
        self.completions.pop_front()
    }

    /// How many requests are still waiting.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::time::Duration;

    use super::*;
    use crate::frame::{Decoder, Kind, Limits, Status, encode_raw};

    fn reply(seq: u64, ack: u64) -> Frame {
        let mut bytes = Vec::new();
        encode_raw(
            &mut bytes,
            Kind::User,
            seq,
            Some(ack),
            0,
            b"",
            &Limits::default(),
        )
        .unwrap();
        match Decoder::default()
            .decode(&bytes, &mut VecDeque::new())
            .unwrap()
        {
            Status::Complete((frame, _)) => frame,
            Status::Partial { .. } => unreachable!(),
        }
    }

    #[test]
    fn a_reply_completes_its_request_and_an_unknown_ack_is_dropped() {
        let mut table = Requests::new();
        table.register(5, "listen", None).unwrap();
        assert!(table.on_frame(reply(1, 99)).is_none());
        assert!(table.poll_completion().is_none());
        assert!(table.on_frame(reply(2, 5)).is_none());
        let done = table.poll_completion().unwrap();
        assert_eq!((done.seq, done.key), (5, "listen"));
        assert!(done.outcome.is_ok());
        assert_eq!(table.pending(), 0);
    }

    #[test]
    fn deadlines_fail_requests_in_order_and_late_replies_are_dropped() {
        let start = Instant::now();
        let mut table = Requests::new();
        table
            .register(1, 'a', Some(start + Duration::from_millis(20)))
            .unwrap();
        table
            .register(2, 'b', Some(start + Duration::from_millis(10)))
            .unwrap();
        table.register(3, 'c', None).unwrap();
        assert_eq!(
            table.next_deadline(),
            Some(start + Duration::from_millis(10))
        );
        table.on_time(start + Duration::from_millis(20));
        let keys: Vec<char> = std::iter::from_fn(|| table.poll_completion())
            .map(|c| c.key)
            .collect();
        assert_eq!(keys, ['b', 'a']);
        assert!(table.on_frame(reply(9, 1)).is_none());
        assert!(table.poll_completion().is_none());
        assert_eq!(table.pending(), 1);
    }

    #[test]
    fn closing_fails_every_pending_request_and_every_later_one() {
        let mut table = Requests::new();
        table.register(1, 1, None).unwrap();
        table.register(2, 2, Some(Instant::now())).unwrap();
        table.on_closed();
        table.register(3, 3, None).unwrap();
        let failed: Vec<_> = std::iter::from_fn(|| table.poll_completion()).collect();
        assert_eq!(failed.len(), 3);
        assert!(
            failed
                .iter()
                .all(|c| matches!(c.outcome, Err(Error::Closed)))
        );
        assert_eq!(table.next_deadline(), None);
    }

    #[test]
    fn a_duplicate_seq_is_refused() {
        let mut table = Requests::new();
        table.register(1, (), None).unwrap();
        assert!(matches!(
            table.register(1, (), None),
            Err(Error::DuplicateSeq { seq: 1 })
        ));
    }
}
