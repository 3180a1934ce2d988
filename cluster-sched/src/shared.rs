//! Shared-socket mode: every worker accepts on one listening socket the primary sends it.

use std::collections::BTreeSet;

use crate::{Error, WorkerId};

/// Which workers hold a copy of one shared listening socket (Node's `SharedHandle`).
///
/// The kernel decides which worker gets each connection, so there is nothing to dispatch;
/// the primary only needs to know who has the socket, to send it to each worker once and to
/// report the listener's users. Unlike Node, the primary keeps the socket open when the last
/// worker leaves (workers that come back get the same socket and its queued clients), so
/// [`is_empty`](Self::is_empty) is information, not a reason to close it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SharedSocket {
    workers: BTreeSet<WorkerId>,
}

impl SharedSocket {
    /// No worker holds the socket yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The worker now holds the socket.
    ///
    /// # Errors
    ///
    /// [`Error::DuplicateWorker`] if it already does.
    pub fn join(&mut self, worker: WorkerId) -> Result<(), Error> {
        if !self.workers.insert(worker) {
            return Err(Error::DuplicateWorker { worker });
        }
        Ok(())
    }

    /// The worker closed its copy or is gone.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownWorker`] if it did not hold the socket.
    pub fn leave(&mut self, worker: WorkerId) -> Result<(), Error> {
        if !self.workers.remove(&worker) {
            return Err(Error::UnknownWorker { worker });
        }
        Ok(())
    }

    /// Whether the worker holds the socket.
    #[must_use]
    pub fn contains(&self, worker: WorkerId) -> bool {
        self.workers.contains(&worker)
    }

    /// Whether no worker holds the socket.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// How many workers hold the socket.
    #[must_use]
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// The workers that hold the socket, by id.
    pub fn workers(&self) -> impl Iterator<Item = WorkerId> + '_ {
        self.workers.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_who_shares_the_socket() {
        let mut shared = SharedSocket::new();
        assert!(shared.is_empty());
        shared.join(WorkerId(1)).unwrap();
        shared.join(WorkerId(2)).unwrap();
        assert_eq!(
            shared.join(WorkerId(1)),
            Err(Error::DuplicateWorker {
                worker: WorkerId(1)
            })
        );
        assert!(shared.contains(WorkerId(2)));
        assert_eq!(shared.len(), 2);
        shared.leave(WorkerId(1)).unwrap();
        assert_eq!(
            shared.leave(WorkerId(1)),
            Err(Error::UnknownWorker {
                worker: WorkerId(1)
            })
        );
        assert_eq!(shared.workers().collect::<Vec<_>>(), vec![WorkerId(2)]);
        shared.leave(WorkerId(2)).unwrap();
        assert!(shared.is_empty());
    }
}
