//! Crossing the process boundary: placing a channel's fd in a child, and adopting it there.
//!
//! The parent creates a pair, keeps one end, and maps the other to a fixed fd number in the
//! child with [`ChildFds`] (or [`pass_channel`], which also names it in an environment
//! variable). The child calls [`adopt_from_env`] once to get its end back as a [`Channel`].
//! Every other fd of ours is close-on-exec, so the child inherits only what was mapped.

use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::process::Command;

use crate::channel::{Channel, check_socket};
use crate::frame::Limits;
use crate::sys::AdoptError;
use crate::{Error, sys};

/// Fds to place at chosen numbers in a child process.
///
/// [`apply`](ChildFds::apply) installs a `pre_exec` hook that allocates nothing: it moves
/// every source out of the way, then `dup2`s each to its target, which clears close-on-exec
/// on the target even when the target is the source's own number. The parent's copies live as
/// long as the `Command`; drop it after `spawn` so that only the child holds them.
#[derive(Debug, Default)]
pub struct ChildFds {
    mappings: Vec<(OwnedFd, RawFd)>,
}

impl ChildFds {
    /// No mappings yet.
    pub fn new() -> ChildFds {
        ChildFds::default()
    }

    /// Places `fd` at number `target` in the child. Targets 0-2 (standard I/O) and repeated
    /// targets are refused.
    pub fn insert(&mut self, fd: OwnedFd, target: i32) -> Result<&mut ChildFds, Error> {
        if target < 3 {
            return Err(Error::InvalidFdTarget {
                target,
                reason: "0, 1 and 2 are standard I/O",
            });
        }
        if self.mappings.iter().any(|&(_, taken)| taken == target) {
            return Err(Error::InvalidFdTarget {
                target,
                reason: "mapped twice",
            });
        }
        self.mappings.push((fd, target));
        Ok(self)
    }

    /// Installs the mappings on `cmd`.
    pub fn apply(self, cmd: &mut Command) {
        if !self.mappings.is_empty() {
            sys::map_fds_in_child(cmd, self.mappings);
        }
    }
}

/// Places a channel end (`fd`) at number `target` in the child and names it in the
/// environment variable `var`, for [`adopt_from_env`] to find.
pub fn pass_channel(cmd: &mut Command, fd: OwnedFd, target: i32, var: &str) -> Result<(), Error> {
    check_socket(fd.as_fd())?;
    let mut fds = ChildFds::new();
    fds.insert(fd, target)?;
    fds.apply(cmd);
    cmd.env(var, target.to_string());
    Ok(())
}

/// Adopts the channel end whose fd number the environment variable `var` names, as set up by
/// [`pass_channel`]. Returns `Ok(None)` when `var` is not set (this process was not started
/// as a child with a channel).
///
/// The fd must be an open `AF_UNIX` socket of a type a [`Channel`] uses; it is made
/// close-on-exec again so this process's own children do not inherit it. A second adoption of
/// the same fd fails with [`Error::AlreadyAdopted`]: the guard is a static in this process,
/// so the variable can stay in the environment (changing the environment is not thread-safe).
/// Call this early in `main`, before anything else could have opened or closed that number.
pub fn adopt_from_env(var: &str, limits: Limits) -> Result<Option<Channel>, Error> {
    let Some(value) = std::env::var_os(var) else {
        return Ok(None);
    };
    let env_error = |reason| Error::Env {
        var: var.to_owned(),
        reason,
    };
    let number: RawFd = value
        .to_str()
        .and_then(|text| text.parse().ok())
        .filter(|&n| n >= 0)
        .ok_or_else(|| env_error("not a file descriptor number"))?;
    let fd = sys::adopt_inherited(number, |fd| {
        check_socket(fd)?;
        sys::set_cloexec(fd, true).map_err(|errno| Error::errno("fcntl(F_SETFD)", errno))
    })
    .map_err(|err| match err {
        AdoptError::NotOpen => env_error("names a file descriptor that is not open"),
        AdoptError::AlreadyAdopted => Error::AlreadyAdopted {
            var: var.to_owned(),
        },
        AdoptError::Refused(err) => err,
    })?;
    Channel::from_fd(fd, limits).map(Some)
}
