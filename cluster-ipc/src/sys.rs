//! The only place in this crate with `unsafe`: `sendmsg`/`recvmsg` with `SCM_RIGHTS`, taking
//! ownership of fds the kernel installed or a parent passed down, and the `pre_exec` hook that
//! places fds in a child.
//!
//! Every raw fd is wrapped in an `OwnedFd` on the line after the call that produced it, so an
//! early return can never leak one.

use std::collections::BTreeSet;
use std::io::{self, IoSlice};
use std::mem::{self, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::ptr;
use std::sync::Mutex;

/// A control-message buffer sized for a number of fds, aligned for `cmsghdr`.
#[derive(Debug)]
pub(crate) struct CmsgBuffer {
    // u64 elements give the 8-byte alignment `cmsghdr` needs on every Linux target.
    words: Vec<u64>,
}

impl CmsgBuffer {
    pub(crate) fn for_fds(max_fds: usize) -> CmsgBuffer {
        let words = cmsg_space(max_fds).div_ceil(mem::size_of::<u64>());
        CmsgBuffer {
            words: vec![0; words.max(1)],
        }
    }

    fn bytes(&self) -> usize {
        self.words.len() * mem::size_of::<u64>()
    }
}

fn cmsg_space(fds: usize) -> usize {
    let data_len = (fds * mem::size_of::<RawFd>()) as libc::c_uint;
    // SAFETY: CMSG_SPACE is pure arithmetic on its argument.
    unsafe { libc::CMSG_SPACE(data_len) as usize }
}

fn cmsg_len(fds: usize) -> usize {
    let data_len = (fds * mem::size_of::<RawFd>()) as libc::c_uint;
    // SAFETY: CMSG_LEN is pure arithmetic on its argument.
    unsafe { libc::CMSG_LEN(data_len) as usize }
}

/// What one `recvmsg` returned.
#[derive(Debug)]
pub(crate) struct Received {
    /// Bytes of payload.
    pub(crate) len: usize,
    /// Every fd that arrived, owned.
    pub(crate) fds: Vec<OwnedFd>,
    /// `MSG_TRUNC`: the record was longer than the buffer.
    pub(crate) data_truncated: bool,
    /// `MSG_CTRUNC`: fds were dropped because the control buffer was too small (or the
    /// receiver hit its fd limit).
    pub(crate) control_truncated: bool,
}

#[cfg(target_os = "linux")]
const RECV_FLAGS: libc::c_int = libc::MSG_CMSG_CLOEXEC;
#[cfg(not(target_os = "linux"))]
const RECV_FLAGS: libc::c_int = 0;

#[cfg(target_os = "linux")]
const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL;
#[cfg(not(target_os = "linux"))]
const SEND_FLAGS: libc::c_int = 0;

/// One `recvmsg` into `buf`, collecting fds through `cmsg`. Returns `WouldBlock` on a
/// non-blocking socket with nothing to read; retries `EINTR`.
pub(crate) fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    cmsg: &mut CmsgBuffer,
) -> io::Result<Received> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is a plain C struct for which all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.words.as_mut_ptr().cast();
    msg.msg_controllen = cmsg.bytes() as _;
    let len = loop {
        // SAFETY: `msg` points at `iov` (which points at `buf`) and at the cmsg buffer; all
        // three outlive the call and their lengths are the lengths of the live allocations.
        let ret = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, RECV_FLAGS) };
        if ret >= 0 {
            break ret as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    let fds = take_fds(&msg);
    Ok(Received {
        len,
        fds,
        data_truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        control_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// Takes ownership of every fd in the `SCM_RIGHTS` messages of `msg`, including the ones
/// that fit when the control data was truncated (Linux installs those), so none leaks.
fn take_fds(msg: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    // SAFETY: `msg` was filled by a successful recvmsg; CMSG_FIRSTHDR reads only its control
    // pointer and length.
    let mut header = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !header.is_null() {
        // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR return either null or a pointer to a complete,
        // aligned cmsghdr inside the control buffer.
        let cmsg = unsafe { ptr::read(header) };
        if cmsg.cmsg_level == libc::SOL_SOCKET && cmsg.cmsg_type == libc::SCM_RIGHTS {
            let data_len = (cmsg.cmsg_len as usize).saturating_sub(cmsg_len(0));
            let count = data_len / mem::size_of::<RawFd>();
            // SAFETY: CMSG_DATA points at the payload of this cmsg, which the kernel sized to
            // hold `count` fds (cmsg_len is clamped to the buffer on truncation).
            let data = unsafe { libc::CMSG_DATA(header) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: i < count, so the read stays inside this cmsg's payload; the payload
                // is not necessarily aligned for RawFd, hence read_unaligned.
                let raw = unsafe { ptr::read_unaligned(data.add(i)) };
                // SAFETY: the kernel just installed `raw` in our fd table for this message;
                // nothing else in the process knows the number, so we are its only owner.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        // SAFETY: `header` is a valid cmsghdr inside `msg`'s control buffer.
        header = unsafe { libc::CMSG_NXTHDR(msg, header) };
    }
    #[cfg(not(target_os = "linux"))]
    for fd in &fds {
        // Without MSG_CMSG_CLOEXEC there is a window in which a concurrent fork inherits the
        // fd; close it as fast as we can.
        let _ = set_cloexec(fd.as_fd(), true);
    }
    fds
}

/// One `sendmsg` of `bufs` with `fds` attached as a single `SCM_RIGHTS` message, with
/// `MSG_NOSIGNAL`, retrying `EINTR`.
pub(crate) fn send_with_fds(
    sock: BorrowedFd<'_>,
    bufs: &[IoSlice<'_>],
    fds: &[BorrowedFd<'_>],
    cmsg: &mut CmsgBuffer,
) -> io::Result<usize> {
    // SAFETY: msghdr is a plain C struct for which all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    // IoSlice is ABI-compatible with iovec on Unix (documented by std).
    msg.msg_iov = bufs.as_ptr().cast_mut().cast();
    msg.msg_iovlen = bufs.len() as _;
    if !fds.is_empty() {
        let space = cmsg_space(fds.len());
        if space > cmsg.bytes() {
            *cmsg = CmsgBuffer::for_fds(fds.len());
        }
        cmsg.words.fill(0);
        msg.msg_control = cmsg.words.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer is aligned and at least CMSG_SPACE(fds) bytes long, so
        // CMSG_FIRSTHDR returns a valid, writable header in it.
        let header = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        // SAFETY: `header` is non-null (controllen >= CMSG_SPACE of at least one fd) and
        // points into the zeroed, aligned buffer; we write its fields and then the fd array,
        // which CMSG_SPACE sized.
        unsafe {
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = cmsg_len(fds.len()) as _;
            let data = libc::CMSG_DATA(header).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                ptr::write_unaligned(data.add(i), fd.as_raw_fd());
            }
        }
    }
    loop {
        // SAFETY: `msg` points at the caller's live iovecs and at our cmsg buffer; the fds in
        // it are borrowed, so they stay open for the duration of the call.
        let ret = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, SEND_FLAGS) };
        if ret >= 0 {
            return Ok(ret as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Sets or clears `FD_CLOEXEC`.
pub(crate) fn set_cloexec(fd: BorrowedFd<'_>, on: bool) -> nix::Result<()> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    let flags = if on {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    fcntl(fd, FcntlArg::F_SETFD(flags)).map(drop)
}

/// Why an inherited fd could not be adopted.
#[derive(Debug)]
pub(crate) enum AdoptError<E> {
    /// No fd has that number.
    NotOpen,
    /// This process adopted that number before.
    AlreadyAdopted,
    /// The fd failed the caller's check; it was left alone.
    Refused(E),
}

/// Fd numbers this process has adopted. Adoption happens once per number: a second one would
/// make two owners of one fd.
static ADOPTED: Mutex<BTreeSet<RawFd>> = Mutex::new(BTreeSet::new());

/// Takes ownership of the inherited fd `number`, once per process, if `check` accepts it.
///
/// The caller names the number because the parent handed it down (in an environment
/// variable); the guard makes sure this process takes it only once, and `check` (done on a
/// borrow, before ownership is taken) that it is what was expected. A refused fd is left open
/// and untouched: it may belong to someone else.
pub(crate) fn adopt_inherited<E>(
    number: RawFd,
    check: impl FnOnce(BorrowedFd<'_>) -> Result<(), E>,
) -> Result<OwnedFd, AdoptError<E>> {
    let mut adopted = ADOPTED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if adopted.contains(&number) {
        return Err(AdoptError::AlreadyAdopted);
    }
    // SAFETY: F_GETFD on any number is harmless; it tells whether the number is open.
    if unsafe { libc::fcntl(number, libc::F_GETFD) } < 0 {
        return Err(AdoptError::NotOpen);
    }
    // SAFETY: the fd is open (checked just above) and stays open while it is borrowed: only
    // adoption, which holds the guard, may take inherited fds, and it has not taken this one.
    let borrowed = unsafe { BorrowedFd::borrow_raw(number) };
    check(borrowed).map_err(AdoptError::Refused)?;
    adopted.insert(number);
    // SAFETY: the number is open, passed the caller's check, was handed to this process by
    // its parent, and the guard (held) proves no earlier adoption in this process owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(number) })
}

/// Installs a `pre_exec` hook that places each `(fd, target)` in the child at fd number
/// `target`, inheritable, and leaves every other fd as it was (CLOEXEC for ours). The sources
/// are kept open, owned by the hook, until the `Command` is dropped.
///
/// The hook allocates nothing: it only calls `fcntl` and `dup2`, which are async-signal-safe.
pub(crate) fn map_fds_in_child(cmd: &mut Command, mappings: Vec<(OwnedFd, RawFd)>) {
    let first_free = mappings
        .iter()
        .map(|&(_, target)| target)
        .max()
        .unwrap_or(0)
        + 1;
    // Scratch space for the hook, allocated here, before fork.
    let mut parked: Vec<RawFd> = vec![-1; mappings.len()];
    let hook = move || {
        // Pass one: move every source above every target, so that placing one mapping can
        // never overwrite the source of another (nor its own, when source == target). The
        // copies are CLOEXEC and vanish at exec.
        for (slot, (fd, _)) in parked.iter_mut().zip(&mappings) {
            // SAFETY: `fd` is open (owned by this hook); F_DUPFD_CLOEXEC allocates a new
            // descriptor and touches no memory.
            let copy = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, first_free) };
            if copy < 0 {
                return Err(io::Error::last_os_error());
            }
            *slot = copy;
        }
        // Pass two: dup2 clears FD_CLOEXEC on the target, even when the target number is the
        // source's own number (the source was parked elsewhere first).
        for (&copy, &(_, target)) in parked.iter().zip(&mappings) {
            // SAFETY: `copy` is an fd opened in pass one; dup2 is async-signal-safe.
            if unsafe { libc::dup2(copy, target) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the hook runs between fork and exec and only makes async-signal-safe system
    // calls, writes into memory allocated before the fork, and allocates nothing (including
    // its error path: `last_os_error` does not allocate).
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Removes `vars` from this process's environment.
///
/// Callers do this once, while adopting what the parent handed down, which the crate's docs
/// ask to happen early in `main`, before the program starts threads of its own.
pub(crate) fn remove_env_vars(vars: &[&str]) {
    for var in vars {
        // SAFETY: changing the environment races only with another thread reading it through
        // libc (`getenv`) at the same moment; std's own readers take the same lock as this
        // call. Adoption runs at start-up, before the program's own threads exist (documented
        // on `env::adopt_worker`), and this crate starts no thread of its own.
        unsafe { std::env::remove_var(var) };
    }
}
