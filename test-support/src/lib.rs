//! Helpers that the workspace's test suites share: fd-leak checks, waits bounded by a
//! deadline, and bookkeeping for child processes.
//!
//! # Overview
//!
//! - **Fd leaks.** [`FdSnapshot::take`] records this process's open fds (under a lock that
//!   every snapshot in the test binary takes, so that tests on parallel threads do not
//!   disturb each other's counts); [`FdSnapshot::assert_no_leak`] fails if the fd table
//!   differs from it, and [`FdSnapshot::assert_no_leak_within`] and
//!   [`FdSnapshot::assert_not_grown_within`] give fds that another thread closes a bounded
//!   time to go. [`no_leak`] wraps a whole test. [`FdTable`] is one reading of the table.
//! - **Waits.** [`Deadline`] is a point in time with the questions a wait asks of it
//!   (`left`, `passed`); [`poll`] and [`wait_until`] retry a check until it holds or the
//!   deadline passes, with a short backoff between tries. A wait never sleeps a fixed time
//!   and hopes.
//! - **Processes.** [`reap`] waits for a child (by pid, so also an orphan this process
//!   inherited as a subreaper) with a deadline, killing it if it overstays; [`ProcStat`] and
//!   [`is_alive`] read `/proc` for a process's or thread's state.
//!
//! Every helper fails the test with a message that says what it waited for, instead of
//! returning an error: these are test helpers. They depend on nothing of the workspace (only
//! `std` and `nix`), so any crate's tests can use them as a dev-dependency.
//!
//! Linux only: the fd and process helpers read `/proc`.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//!
//! use cluster_test_support::{FdSnapshot, wait_until};
//!
//! let snapshot = FdSnapshot::take();
//! let (reader, writer) = std::io::pipe().unwrap_or_else(|err| panic!("pipe: {err}"));
//! let (opened, closed) = snapshot.difference();
//! assert_eq!(opened.len(), 2, "both ends of the pipe are new: {opened:?}");
//! assert!(closed.is_empty());
//!
//! // Another thread closes them; the check waits (at most a second) until it has.
//! let closer = std::thread::spawn(move || drop((reader, writer)));
//! snapshot.assert_no_leak_within(Duration::from_secs(1));
//!
//! wait_until("the closing thread ends", Duration::from_secs(1), || closer.is_finished());
//! ```
#![deny(missing_docs)]

mod fds;
mod process;
mod wait;

pub use fds::{FdSnapshot, FdTable, no_leak};
pub use process::{ProcStat, is_alive, reap};
pub use wait::{Deadline, poll, wait_until};
