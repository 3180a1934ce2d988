//! User messages: what the application and its primary send each other.

use std::collections::VecDeque;

use serde::de::DeserializeOwned;

use crate::Error;

/// A message from the primary: the body of a [`Kind::User`](cluster_ipc::Kind::User) frame,
/// still encoded. [`decode`](Message::decode) it as the type the primary sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    body: Vec<u8>,
}

impl Message {
    pub(crate) fn new(body: Vec<u8>) -> Message {
        Message { body }
    }

    /// Decodes the body as a `T` (postcard, as the primary encoded it). Decoding as another
    /// type than the one sent may fail or give nonsense: postcard is not self-describing.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, Error> {
        postcard::from_bytes(&self.body).map_err(Error::Decode)
    }

    /// The encoded body.
    pub fn bytes(&self) -> &[u8] {
        &self.body
    }

    /// Takes the encoded body.
    pub fn into_bytes(self) -> Vec<u8> {
        self.body
    }
}

/// Messages that arrived while nobody was reading, bounded: when full the oldest is dropped
/// (with a warning), so a worker that never reads cannot be made to grow without limit.
#[derive(Debug)]
pub(crate) struct Inbox {
    messages: VecDeque<Message>,
    capacity: usize,
    dropped: u64,
}

impl Inbox {
    pub(crate) fn new(capacity: usize) -> Inbox {
        Inbox {
            messages: VecDeque::new(),
            capacity: capacity.max(1),
            dropped: 0,
        }
    }

    pub(crate) fn push(&mut self, message: Message) {
        if self.messages.len() >= self.capacity {
            self.messages.pop_front();
            self.dropped += 1;
            tracing::warn!(
                capacity = self.capacity,
                dropped = self.dropped,
                "message queue full: dropped the oldest message from the primary"
            );
        }
        self.messages.push_back(message);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    pub(crate) fn pop(&mut self) -> Option<Message> {
        self.messages.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_inbox_drops_the_oldest() {
        let mut inbox = Inbox::new(2);
        for n in 0u8..3 {
            inbox.push(Message::new(vec![n]));
        }
        assert_eq!(inbox.pop().unwrap().bytes(), [1]);
        assert_eq!(inbox.pop().unwrap().bytes(), [2]);
        assert!(inbox.pop().is_none());
    }
}
