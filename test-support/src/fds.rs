//! Fd-leak checks: what this process has open, and whether a test left it as it found it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::wait::poll;

/// Tests in one binary run on parallel threads that share one fd table; every snapshot takes
/// this lock, so a count taken by one test is not disturbed by another that checks its fds.
static FD_TABLE: Mutex<()> = Mutex::new(());

/// This process's open fds at one moment, and what each points at (the target of its
/// `/proc/self/fd` link: a path, `socket:[…]`, `pipe:[…]`, `anon_inode:[…]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FdTable {
    fds: BTreeMap<i32, PathBuf>,
}

impl FdTable {
    /// Reads the table from `/proc/self/fd`, leaving out the handle of that listing itself.
    /// An fd that another thread closes while the listing is read may or may not be in it.
    pub fn read() -> FdTable {
        let listing = PathBuf::from(format!("/proc/{}/fd", std::process::id()));
        let entries = std::fs::read_dir("/proc/self/fd")
            .unwrap_or_else(|err| panic!("listing /proc/self/fd: {err}"));
        let mut fds = BTreeMap::new();
        for entry in entries {
            let entry = entry.unwrap_or_else(|err| panic!("listing /proc/self/fd: {err}"));
            let Ok(number) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            // Gone already if it fails: closed by another thread since the listing.
            if let Ok(target) = std::fs::read_link(entry.path()) {
                if target != listing {
                    fds.insert(number, target);
                }
            }
        }
        FdTable { fds }
    }

    /// How many fds are open.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// Whether no fd is open.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// What `fd` points at, if it is open.
    pub fn get(&self, fd: i32) -> Option<&Path> {
        self.fds.get(&fd).map(PathBuf::as_path)
    }

    /// Every open fd and what it points at, by number.
    pub fn iter(&self) -> impl Iterator<Item = (i32, &Path)> {
        self.fds.iter().map(|(fd, target)| (*fd, target.as_path()))
    }

    /// How many fds there are of each kind: the part of the target before `:` (`socket`,
    /// `pipe`, or a whole path), and the whole target for an anonymous inode
    /// (`anon_inode:[pidfd]`, `anon_inode:[eventpoll]`), whose kind is in its brackets.
    pub fn kinds(&self) -> BTreeMap<String, usize> {
        let mut kinds = BTreeMap::new();
        for target in self.fds.values() {
            let text = target.to_string_lossy();
            let kind = if text.starts_with("anon_inode") {
                text.into_owned()
            } else {
                text.split(':').next().unwrap_or_default().to_owned()
            };
            *kinds.entry(kind).or_insert(0) += 1;
        }
        kinds
    }

    /// What differs in `later`: the fds open there that were not open here or point
    /// elsewhere (opened), and the fds open here that are gone there (closed).
    #[allow(clippy::type_complexity)]
    pub fn changes_to(&self, later: &FdTable) -> (Vec<(i32, PathBuf)>, Vec<(i32, PathBuf)>) {
        let opened = later
            .fds
            .iter()
            .filter(|(fd, target)| self.fds.get(fd) != Some(target))
            .map(|(fd, target)| (*fd, target.clone()));
        let closed = self
            .fds
            .iter()
            .filter(|(fd, _)| !later.fds.contains_key(fd))
            .map(|(fd, target)| (*fd, target.clone()));
        (opened.collect(), closed.collect())
    }
}

/// The open fds at one moment, held together with the lock that every snapshot in this
/// process takes: while a snapshot lives, no other test's snapshot is taken, so tests that
/// check their fds run one after another. Checks that consume it release the lock.
#[derive(Debug)]
pub struct FdSnapshot {
    before: FdTable,
    _lock: MutexGuard<'static, ()>,
}

impl FdSnapshot {
    /// Takes the lock (waiting for another test's snapshot to be done) and reads the table.
    pub fn take() -> FdSnapshot {
        // A test that failed while holding it poisoned it; the table is still fine to read.
        let lock = FD_TABLE
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        FdSnapshot {
            before: FdTable::read(),
            _lock: lock,
        }
    }

    /// The table as it was when the snapshot was taken (or last renewed).
    pub fn before(&self) -> &FdTable {
        &self.before
    }

    /// Reads the table again, keeping the lock: what was opened or closed since becomes part
    /// of what the checks compare with. For a test that sets up fds it means to keep before
    /// the part it checks.
    pub fn renew(&mut self) {
        self.before = FdTable::read();
    }

    /// How the table differs now: (opened, closed), as [`FdTable::changes_to`] says.
    #[allow(clippy::type_complexity)]
    pub fn difference(&self) -> (Vec<(i32, PathBuf)>, Vec<(i32, PathBuf)>) {
        self.before.changes_to(&FdTable::read())
    }

    /// Panics if any fd was opened and not closed, or closed that was open, since the
    /// snapshot.
    pub fn assert_no_leak(self) {
        self.assert_no_leak_within(Duration::ZERO);
    }

    /// Like [`assert_no_leak`](Self::assert_no_leak), but gives fds that another thread (a
    /// worker's control thread, a primary's loop) is about to close up to `timeout` to go:
    /// the table is read again until it is as it was, and the check fails only if it is not
    /// by then.
    pub fn assert_no_leak_within(self, timeout: Duration) {
        if let Err(leak) = self.check_no_leak_within(timeout) {
            panic!("{leak}");
        }
    }

    /// The check of [`assert_no_leak_within`](Self::assert_no_leak_within), keeping the
    /// snapshot (and its lock): what leaked, as text, if anything did.
    pub fn check_no_leak_within(&self, timeout: Duration) -> Result<(), String> {
        poll(timeout, || {
            let (opened, closed) = self.difference();
            if opened.is_empty() && closed.is_empty() {
                Ok(())
            } else {
                Err((opened, closed))
            }
        })
        .map_err(|(opened, closed)| format!("fds leaked: {opened:?}; closed: {closed:?}"))
    }

    /// Panics if more fds are open than at the snapshot once `timeout` has passed (the table
    /// is read again until there are no more, at most that long). A count, not a comparison
    /// fd by fd: for a long run in which fds come and go and only growth is a leak.
    pub fn assert_not_grown_within(self, timeout: Duration) {
        let settled = poll(timeout, || {
            let now = FdTable::read();
            if now.len() <= self.before.len() {
                Ok(())
            } else {
                Err(now)
            }
        });
        if let Err(now) = settled {
            panic!(
                "fds grew from {} to {}: before {:?}, after {:?}",
                self.before.len(),
                now.len(),
                self.before.kinds(),
                now.kinds()
            );
        }
    }
}

/// Runs `test` under a snapshot and checks that it leaves the fd table as it found it (at
/// once, with no time for other threads to close theirs: a test that has threads closing fds
/// waits for them first).
pub fn no_leak(test: impl FnOnce()) {
    let snapshot = FdSnapshot::take();
    test();
    snapshot.assert_no_leak();
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    fn pipe() -> (std::io::PipeReader, std::io::PipeWriter) {
        std::io::pipe().unwrap_or_else(|err| panic!("pipe: {err}"))
    }

    // Every test opens fds only while it holds a snapshot (the lock): the tests of this
    // module run on parallel threads too.

    #[test]
    fn a_snapshot_sees_a_new_fd_and_not_after_it_is_closed() {
        let snapshot = FdSnapshot::take();
        let (reader, writer) = pipe();
        let (opened, closed) = snapshot.difference();
        let numbers: Vec<i32> = opened.iter().map(|(fd, _)| *fd).collect();
        assert_eq!(numbers.len(), 2, "{opened:?}");
        assert!(numbers.contains(&reader.as_raw_fd()) && numbers.contains(&writer.as_raw_fd()));
        assert!(
            opened
                .iter()
                .all(|(_, target)| target.to_string_lossy().starts_with("pipe:")),
            "{opened:?}"
        );
        assert!(closed.is_empty(), "{closed:?}");
        drop((reader, writer));
        assert_eq!(snapshot.difference(), (Vec::new(), Vec::new()));
        snapshot.assert_no_leak();
    }

    #[test]
    fn a_renewed_snapshot_sees_an_fd_closed_that_was_open() {
        let mut snapshot = FdSnapshot::take();
        let (reader, writer) = pipe();
        let fd = reader.as_raw_fd();
        snapshot.renew();
        assert_eq!(snapshot.before().get(fd), FdTable::read().get(fd));
        drop(reader);
        let (opened, closed) = snapshot.difference();
        assert!(opened.is_empty(), "{opened:?}");
        assert_eq!(closed.len(), 1, "{closed:?}");
        assert_eq!(closed[0].0, fd);
        drop(writer);
    }

    #[test]
    fn the_listing_handle_is_not_counted() {
        let snapshot = FdSnapshot::take();
        let listing = PathBuf::from(format!("/proc/{}/fd", std::process::id()));
        assert!(
            snapshot
                .before()
                .iter()
                .all(|(_, target)| target != listing)
        );
        snapshot.assert_no_leak();
    }

    #[test]
    fn a_leak_fails_the_check() {
        let snapshot = FdSnapshot::take();
        let (reader, writer) = pipe();
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            snapshot.assert_no_leak_within(Duration::from_millis(20))
        }));
        // The lock went with the snapshot; close the pipe under a new one.
        let _lock = FdSnapshot::take();
        drop((reader, writer));
        let message = checked
            .err()
            .and_then(|panic| panic.downcast::<String>().ok())
            .unwrap_or_else(|| panic!("the leak check let a leak through"));
        assert!(message.starts_with("fds leaked"), "{message}");
    }

    #[test]
    fn the_check_waits_for_another_thread_to_close_its_fds() {
        let snapshot = FdSnapshot::take();
        let (reader, writer) = pipe();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let closer = std::thread::spawn(move || {
            let _ = wait.recv();
            drop((reader, writer));
        });
        let _ = go.send(());
        snapshot.assert_no_leak_within(Duration::from_secs(10));
        closer
            .join()
            .unwrap_or_else(|_| panic!("the closing thread panicked"));
    }

    #[test]
    fn growth_is_a_count() {
        let mut snapshot = FdSnapshot::take();
        let (reader, writer) = pipe();
        snapshot.renew();
        // One closed and another opened: the same count, no growth.
        drop(reader);
        let file = std::fs::File::open("/proc/self/stat")
            .unwrap_or_else(|err| panic!("open /proc/self/stat: {err}"));
        snapshot.assert_not_grown_within(Duration::ZERO);

        let snapshot = FdSnapshot::take();
        let (more, extra) = pipe();
        let grown = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            snapshot.assert_not_grown_within(Duration::from_millis(20))
        }));
        let _lock = FdSnapshot::take();
        drop((writer, file, more, extra));
        assert!(grown.is_err(), "two more fds went unnoticed");
    }

    #[test]
    fn kinds_name_anonymous_inodes_whole() {
        let table = FdTable {
            fds: BTreeMap::from(
                [
                    (0, "/dev/null"),
                    (3, "socket:[11]"),
                    (4, "socket:[12]"),
                    (5, "pipe:[13]"),
                    (6, "anon_inode:[pidfd]"),
                    (7, "anon_inode:[pidfd]"),
                    (8, "anon_inode:[eventpoll]"),
                ]
                .map(|(fd, target)| (fd, PathBuf::from(target))),
            ),
        };
        let kinds: Vec<(String, usize)> = table.kinds().into_iter().collect();
        let expected = [
            ("/dev/null", 1),
            ("anon_inode:[eventpoll]", 1),
            ("anon_inode:[pidfd]", 2),
            ("pipe", 1),
            ("socket", 2),
        ]
        .map(|(kind, n)| (kind.to_owned(), n));
        assert_eq!(kinds, expected);
        assert_eq!((table.len(), table.is_empty()), (7, false));
    }
}
