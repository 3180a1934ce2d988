//! Shared helpers for the integration tests.
//!
//! Each test binary uses a different subset of them.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

/// Tests in one binary run on parallel threads that share one fd table; every test that
/// opens fds takes this lock, so a count taken by one is not disturbed by another.
static FD_TABLE: Mutex<()> = Mutex::new(());

/// The open fds of this process and what each points at.
pub fn open_fds() -> BTreeMap<i32, PathBuf> {
    let mut fds = BTreeMap::new();
    let listing = PathBuf::from(format!("/proc/{}/fd", std::process::id()));
    for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
        let entry = entry.unwrap();
        let Ok(number) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // Skip the directory handle of this very listing.
        if let Ok(target) = std::fs::read_link(entry.path()) {
            if target != listing {
                fds.insert(number, target);
            }
        }
    }
    fds
}

/// Holds the fd-table lock and remembers the fds open when it was taken.
pub struct FdSnapshot {
    before: BTreeMap<i32, PathBuf>,
    _lock: MutexGuard<'static, ()>,
}

/// Takes the fd-table lock and a snapshot of the open fds.
pub fn fd_snapshot() -> FdSnapshot {
    let lock = FD_TABLE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    FdSnapshot {
        before: open_fds(),
        _lock: lock,
    }
}

impl FdSnapshot {
    /// The fds open now that were not open at the snapshot (or point elsewhere), and the
    /// ones that were open and are gone.
    pub fn difference(&self) -> (Vec<(i32, PathBuf)>, Vec<i32>) {
        let now = open_fds();
        let opened = now
            .iter()
            .filter(|(n, t)| self.before.get(n) != Some(t))
            .map(|(n, t)| (*n, t.clone()));
        let closed = self.before.keys().filter(|n| !now.contains_key(n)).copied();
        (opened.collect(), closed.collect())
    }

    /// Panics if any fd was opened and not closed, or closed that was open, since the
    /// snapshot.
    pub fn assert_no_leak(self) {
        let (opened, closed) = self.difference();
        let closed: Vec<_> = closed.iter().map(|n| (n, self.before.get(n))).collect();
        assert!(
            opened.is_empty() && closed.is_empty(),
            "fds leaked: {opened:?}; closed: {closed:?}"
        );
    }
}

/// Runs `test` and checks that it leaves the fd table as it found it.
pub fn no_leak(test: impl FnOnce()) {
    let snapshot = fd_snapshot();
    test();
    snapshot.assert_no_leak();
}
