//! Reuse-port mode: one `SO_REUSEPORT` socket per worker slot, kept across replacements.

use std::collections::BTreeMap;

use crate::{Error, SlotId, WorkerId};

/// What the caller must do when a slot is removed (scaling down).
///
/// The slot's socket may still hold clients in its accept queue, which plain `close` would
/// reset. So: accept what is left on it (feeding each connection to a dispatcher as
/// [`incoming`](crate::Dispatch::incoming), for the remaining workers), then close it; and if
/// the slot had a holder, disconnect that worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "the slot's accept queue must be drained before its socket is closed"]
pub struct Drain {
    /// The slot that was removed.
    pub slot: SlotId,
    /// The worker that held it, if any.
    pub holder: Option<WorkerId>,
}

/// Which worker holds which reuse-port slot.
///
/// The primary makes one `SO_REUSEPORT` listening socket per slot and keeps it for its whole
/// life. The worker in slot `i` accepts on socket `i`; its replacement takes the same slot and
/// so the same socket, with whatever clients were queued on it, so a crash or a restart drops
/// nothing (closing the socket would reset that queue). A slot may be vacant for a while:
/// its holder died and the replacement is starting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReusePortSlots {
    holders: BTreeMap<SlotId, Option<WorkerId>>,
    slot_of: BTreeMap<WorkerId, SlotId>,
}

impl ReusePortSlots {
    /// No slots.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Slots `0..count`, all vacant.
    #[must_use]
    pub fn with_slots(count: u32) -> Self {
        Self {
            holders: (0..count).map(|index| (SlotId(index), None)).collect(),
            slot_of: BTreeMap::new(),
        }
    }

    /// Adds a vacant slot with the lowest free index (so slot numbers stay small after
    /// scaling down and up) and returns it.
    pub fn add_slot(&mut self) -> SlotId {
        let mut slot = SlotId(0);
        for &taken in self.holders.keys() {
            if taken != slot {
                break;
            }
            slot = SlotId(slot.0.saturating_add(1));
        }
        self.holders.insert(slot, None);
        slot
    }

    /// Gives a vacant slot to a worker that holds none.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSlot`], [`Error::SlotOccupied`], or [`Error::WorkerHoldsSlot`].
    pub fn assign(&mut self, slot: SlotId, worker: WorkerId) -> Result<(), Error> {
        self.check_holds_none(worker)?;
        let holder = self
            .holders
            .get_mut(&slot)
            .ok_or(Error::UnknownSlot { slot })?;
        if let Some(holder) = *holder {
            return Err(Error::SlotOccupied { slot, holder });
        }
        *holder = Some(worker);
        self.slot_of.insert(worker, slot);
        Ok(())
    }

    /// The `new` worker takes the slot of the `old` one (a replacement, after a crash or in a
    /// rolling restart), which then holds none. Returns the slot.
    ///
    /// # Errors
    ///
    /// [`Error::WorkerHoldsNoSlot`] if `old` holds none, [`Error::WorkerHoldsSlot`] if `new`
    /// already holds one.
    pub fn replace(&mut self, old: WorkerId, new: WorkerId) -> Result<SlotId, Error> {
        self.check_holds_none(new)?;
        let slot = self
            .slot_of
            .remove(&old)
            .ok_or(Error::WorkerHoldsNoSlot { worker: old })?;
        self.slot_of.insert(new, slot);
        self.holders.insert(slot, Some(new));
        Ok(slot)
    }

    /// The worker is gone with no replacement yet: its slot stays, vacant, and its socket
    /// keeps queueing clients for whoever is assigned the slot next. Returns the slot.
    ///
    /// # Errors
    ///
    /// [`Error::WorkerHoldsNoSlot`] if it holds none.
    pub fn vacate(&mut self, worker: WorkerId) -> Result<SlotId, Error> {
        let slot = self
            .slot_of
            .remove(&worker)
            .ok_or(Error::WorkerHoldsNoSlot { worker })?;
        self.holders.insert(slot, None);
        Ok(slot)
    }

    /// Removes a slot (scaling down). The returned [`Drain`] says what to do with its socket
    /// and its holder.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSlot`] if there is no such slot.
    pub fn remove_slot(&mut self, slot: SlotId) -> Result<Drain, Error> {
        let holder = self
            .holders
            .remove(&slot)
            .ok_or(Error::UnknownSlot { slot })?;
        if let Some(worker) = holder {
            self.slot_of.remove(&worker);
        }
        Ok(Drain { slot, holder })
    }

    /// Whether the slot exists.
    #[must_use]
    pub fn contains_slot(&self, slot: SlotId) -> bool {
        self.holders.contains_key(&slot)
    }

    /// The worker holding the slot, or `None` if it is vacant or does not exist.
    #[must_use]
    pub fn holder(&self, slot: SlotId) -> Option<WorkerId> {
        self.holders.get(&slot).copied().flatten()
    }

    /// The slot the worker holds, if any.
    #[must_use]
    pub fn slot_of(&self, worker: WorkerId) -> Option<SlotId> {
        self.slot_of.get(&worker).copied()
    }

    /// Every slot with its holder, by slot index.
    pub fn slots(&self) -> impl Iterator<Item = (SlotId, Option<WorkerId>)> + '_ {
        self.holders.iter().map(|(&slot, &holder)| (slot, holder))
    }

    /// The slots without a holder, by index.
    pub fn vacant_slots(&self) -> impl Iterator<Item = SlotId> + '_ {
        self.slots()
            .filter(|(_, holder)| holder.is_none())
            .map(|(slot, _)| slot)
    }

    /// How many slots there are.
    #[must_use]
    pub fn len(&self) -> usize {
        self.holders.len()
    }

    /// Whether there are no slots.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.holders.is_empty()
    }

    fn check_holds_none(&self, worker: WorkerId) -> Result<(), Error> {
        match self.slot_of.get(&worker) {
            Some(&slot) => Err(Error::WorkerHoldsSlot { worker, slot }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replacement_takes_the_slot_of_the_worker_it_replaces() {
        let mut slots = ReusePortSlots::with_slots(2);
        slots.assign(SlotId(0), WorkerId(1)).unwrap();
        slots.assign(SlotId(1), WorkerId(2)).unwrap();
        assert_eq!(slots.replace(WorkerId(2), WorkerId(3)), Ok(SlotId(1)));
        assert_eq!(slots.holder(SlotId(1)), Some(WorkerId(3)));
        assert_eq!(slots.slot_of(WorkerId(2)), None);
        assert_eq!(
            slots.replace(WorkerId(2), WorkerId(4)),
            Err(Error::WorkerHoldsNoSlot {
                worker: WorkerId(2)
            })
        );
        assert_eq!(
            slots.replace(WorkerId(1), WorkerId(3)),
            Err(Error::WorkerHoldsSlot {
                worker: WorkerId(3),
                slot: SlotId(1)
            })
        );
    }

    #[test]
    fn a_crashed_worker_leaves_its_slot_vacant_for_the_next() {
        let mut slots = ReusePortSlots::with_slots(1);
        slots.assign(SlotId(0), WorkerId(1)).unwrap();
        assert_eq!(
            slots.assign(SlotId(0), WorkerId(2)),
            Err(Error::SlotOccupied {
                slot: SlotId(0),
                holder: WorkerId(1)
            })
        );
        assert_eq!(slots.vacate(WorkerId(1)), Ok(SlotId(0)));
        assert_eq!(slots.vacant_slots().collect::<Vec<_>>(), vec![SlotId(0)]);
        slots.assign(SlotId(0), WorkerId(2)).unwrap();
        assert_eq!(slots.holder(SlotId(0)), Some(WorkerId(2)));
    }

    #[test]
    fn removing_a_slot_yields_a_drain_and_frees_its_index() {
        let mut slots = ReusePortSlots::with_slots(3);
        slots.assign(SlotId(1), WorkerId(7)).unwrap();
        assert_eq!(
            slots.remove_slot(SlotId(1)),
            Ok(Drain {
                slot: SlotId(1),
                holder: Some(WorkerId(7))
            })
        );
        assert_eq!(slots.slot_of(WorkerId(7)), None);
        assert_eq!(
            slots.remove_slot(SlotId(1)),
            Err(Error::UnknownSlot { slot: SlotId(1) })
        );
        assert_eq!(
            slots.assign(SlotId(9), WorkerId(8)),
            Err(Error::UnknownSlot { slot: SlotId(9) })
        );
        assert_eq!(slots.add_slot(), SlotId(1));
        assert_eq!(slots.add_slot(), SlotId(3));
        assert_eq!(slots.len(), 4);
    }
}
