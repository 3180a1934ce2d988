//! Child processes and threads: their state in `/proc`, and waiting for a child to end.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

/// What `/proc/…/stat` says of a process or thread (the fields the tests ask about).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// The state letter: `R` running, `S` asleep in the kernel (blocked in a system call),
    /// `D` in an uninterruptible wait, `Z` a zombie (exited, not reaped), `X` dead, ...
    pub state: char,
    /// The parent's pid.
    pub ppid: u32,
}

impl ProcStat {
    /// Process `pid`'s, or `None` if there is no such process (any more).
    pub fn of_process(pid: u32) -> Option<ProcStat> {
        ProcStat::read(&format!("/proc/{pid}/stat"))
    }

    /// Thread `tid` of this process's, or `None` if there is no such thread (any more).
    pub fn of_thread(tid: i32) -> Option<ProcStat> {
        ProcStat::read(&format!("/proc/self/task/{tid}/stat"))
    }

    fn read(path: &str) -> Option<ProcStat> {
        ProcStat::parse(&std::fs::read_to_string(path).ok()?)
    }

    /// `pid (comm) state ppid ...`: the command name is in parentheses and may hold anything,
    /// spaces and parentheses included, so the fields are counted from the last `)`.
    fn parse(stat: &str) -> Option<ProcStat> {
        let (_, rest) = stat.rsplit_once(')')?;
        let mut fields = rest.split_whitespace();
        let mut state = fields.next()?.chars();
        let ppid = fields.next()?.parse().ok()?;
        match (state.next(), state.next()) {
            (Some(state), None) => Some(ProcStat { state, ppid }),
            _ => None,
        }
    }

    /// Whether it has not exited: neither a zombie nor dead.
    pub fn is_alive(&self) -> bool {
        !matches!(self.state, 'Z' | 'X')
    }
}

/// Whether process `pid` exists and has not exited (a zombie has).
pub fn is_alive(pid: u32) -> bool {
    ProcStat::of_process(pid).is_some_and(|stat| stat.is_alive())
}

/// Waits for a child of this process to end and reaps it: one it spawned, or an orphan it
/// inherited as a child subreaper (which a `std::process::Child` cannot wait for). A blocking
/// `waitpid` on a helper thread, bounded by `timeout`: past it the process is killed
/// (`SIGKILL`) and the test fails.
pub fn reap(pid: u32, timeout: Duration) -> WaitStatus {
    let target = Pid::from_raw(
        i32::try_from(pid).unwrap_or_else(|_| panic!("{pid} is not a pid: out of range")),
    );
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(nix::sys::wait::waitpid(target, None));
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(status)) => status,
        Ok(Err(err)) => panic!("waitpid({pid}): {err}"),
        Err(RecvTimeoutError::Timeout) => {
            // The helper thread reaps it once it is dead.
            let _ = nix::sys::signal::kill(target, Signal::SIGKILL);
            panic!("process {pid} did not end within {timeout:?}");
        }
        Err(RecvTimeoutError::Disconnected) => panic!("the waitpid thread for {pid} died"),
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;
    use crate::FdSnapshot;

    // The tests that read `/proc` or spawn open fds for a moment; they hold the fd-snapshot
    // lock meanwhile, so that the fd tests on other threads do not see them.

    #[test]
    fn stat_counts_fields_from_the_last_parenthesis() {
        assert_eq!(
            ProcStat::parse("42 (a) b) (c) S 7 42 42 0 -1"),
            Some(ProcStat {
                state: 'S',
                ppid: 7
            })
        );
        assert_eq!(ProcStat::parse("42 (sh) Zz 7"), None);
        assert_eq!(ProcStat::parse("no parenthesis"), None);
    }

    #[test]
    fn this_process_is_alive_and_its_parent_is_known() {
        let _fds = FdSnapshot::take();
        let me = ProcStat::of_process(std::process::id())
            .unwrap_or_else(|| panic!("no /proc entry for this process"));
        assert!(me.is_alive());
        assert_eq!(me.ppid, std::os::unix::process::parent_id());
        assert!(is_alive(std::process::id()));
        let tid = nix::unistd::gettid().as_raw();
        assert_eq!(
            ProcStat::of_thread(tid).map(|stat| stat.state),
            Some('R'),
            "this thread is running: it reads its own state"
        );
    }

    #[test]
    // Reaped by pid, with `reap`, which the `Child` does not see.
    #[allow(clippy::zombie_processes)]
    fn reap_returns_how_a_child_ended() {
        let _fds = FdSnapshot::take();
        let child = Command::new("sh")
            .args(["-c", "exit 7"])
            .spawn()
            .unwrap_or_else(|err| panic!("spawn sh: {err}"));
        let pid = child.id();
        let status = reap(pid, Duration::from_secs(20));
        assert_eq!(status, WaitStatus::Exited(Pid::from_raw(pid as i32), 7));
        assert!(!is_alive(pid));
    }

    #[test]
    // Reaped by pid, by the helper thread of `reap`, which the `Child` does not see.
    #[allow(clippy::zombie_processes)]
    fn reap_kills_a_child_that_overstays() {
        let _fds = FdSnapshot::take();
        let child = Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap_or_else(|err| panic!("spawn sleep: {err}"));
        let pid = child.id();
        let result = std::panic::catch_unwind(|| reap(pid, Duration::from_millis(50)));
        assert!(
            result.is_err(),
            "a child that outlived the deadline went unnoticed"
        );
        // Killed: it ends (and the helper thread reaps it) soon.
        crate::wait_until("the killed child is gone", Duration::from_secs(20), || {
            !is_alive(pid)
        });
    }
}
