//! The only place in this crate with `unsafe`: pidfds and the worker's `pre_exec` hook.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Opens a pidfd for `pid`, non-blocking and close-on-exec (pidfds always are). `Ok(None)`
/// when the kernel has no pidfds (older than 5.3, or a sandbox that filters the call).
#[cfg(target_os = "linux")]
pub(crate) fn pidfd_open(pid: u32) -> io::Result<Option<OwnedFd>> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is
    // passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_open,
            pid as libc::pid_t,
            libc::PIDFD_NONBLOCK,
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENOSYS | libc::EPERM | libc::EINVAL) => Ok(None),
            _ => Err(err),
        };
    }
    // SAFETY: the kernel just returned this new fd; we are its only owner.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(ret as libc::c_int) }))
}

/// No pidfds off Linux: the caller falls back to SIGCHLD.
#[cfg(not(target_os = "linux"))]
pub(crate) fn pidfd_open(_pid: u32) -> io::Result<Option<OwnedFd>> {
    Ok(None)
}

/// Makes the child receive `signal` when the thread that spawned it dies, and refuses to
/// start it if that already happened (the parent died between fork and the `prctl`).
#[cfg(target_os = "linux")]
pub(crate) fn set_parent_death_signal(cmd: &mut Command, signal: libc::c_int) {
    let parent = std::process::id() as libc::pid_t;
    let hook = move || {
        // SAFETY: prctl with PR_SET_PDEATHSIG takes integers only; async-signal-safe.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: getppid has no arguments and cannot fail.
        if unsafe { libc::getppid() } != parent {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(())
    };
    // SAFETY: the hook runs between fork and exec, makes only async-signal-safe system calls
    // and allocates nothing (its errors are built from raw OS error numbers).
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// No parent-death signal off Linux; channel end of file is the only news of a dead primary.
#[cfg(not(target_os = "linux"))]
pub(crate) fn set_parent_death_signal(_cmd: &mut Command, _signal: libc::c_int) {}
