//! Shared helpers for the integration tests: the fd-leak checks of `cluster-test-support`,
//! under the names these tests use.
//!
//! Each test binary uses a different subset of them.
#![allow(dead_code, unused_imports)]

pub use cluster_test_support::{FdSnapshot, no_leak};

/// Takes the fd-table lock (shared by every fd check in the test binary) and a snapshot of
/// the open fds.
pub fn fd_snapshot() -> FdSnapshot {
    FdSnapshot::take()
}
