//! The environment contract between a primary and the workers it starts.
//!
//! The primary starts each worker with its control channel at fd [`IPC_FD`] and four
//! variables: the fd number ([`IPC_FD_ENV`]), the worker's id ([`WORKER_ID_ENV`]) and slot
//! ([`WORKER_SLOT_ENV`]), and the primary's process id ([`PRIMARY_PID_ENV`]). The worker reads
//! them once with [`adopt_worker`], which also takes the variables out of its environment:
//! a program the worker starts in turn (built on this crate too) then runs as a plain
//! process, not as a worker without a channel. A process whose parent is not the primary
//! named in [`PRIMARY_PID_ENV`] is not a worker either, whatever it inherited.

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::process::Command;

use crate::channel::Channel;
use crate::frame::Limits;
use crate::ids::{SlotId, WorkerId};
use crate::proto::WorkerControl;
use crate::{Error, process, sys};

/// The variable holding the worker's id: a decimal `u64`, from 1.
pub const WORKER_ID_ENV: &str = "CLUSTER_WORKER_ID";
/// The variable holding the worker's slot: a decimal `u32`.
pub const WORKER_SLOT_ENV: &str = "CLUSTER_WORKER_SLOT";
/// The variable holding the fd number of the inherited control channel.
pub const IPC_FD_ENV: &str = "CLUSTER_IPC_FD";
/// The variable holding the primary's process id; a worker checks that it is its parent.
pub const PRIMARY_PID_ENV: &str = "CLUSTER_PRIMARY_PID";
/// The fd number the control channel gets in a worker.
pub const IPC_FD: i32 = 3;
/// The exit code of a worker that cannot boot (bad configuration, a missing resource: a
/// failure that starting it again will not fix; Gunicorn's `WORKER_BOOT_ERROR`). A worker that
/// exits with it before it listens is not started again: the primary stops the cluster and
/// reports the boot failure (or, during a roll-out, aborts the roll-out and keeps the old
/// workers).
pub const BOOT_FAILURE_EXIT_CODE: i32 = 3;
/// The exit code of a disconnecting worker that gave up at its drain timeout with
/// connections still open (their clients were cut off): the primary does not count a stop
/// with such an exit as clean.
pub const DRAIN_TIMEOUT_EXIT_CODE: i32 = 4;

/// Every variable of the contract.
pub const VARS: [&str; 4] = [WORKER_ID_ENV, WORKER_SLOT_ENV, IPC_FD_ENV, PRIMARY_PID_ENV];

/// Who a worker is, as its environment said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerIdentity {
    /// The worker's id.
    pub id: WorkerId,
    /// The slot it fills.
    pub slot: SlotId,
    /// The primary's process id (this process's parent).
    pub primary_pid: u32,
}

/// Sets a child up as worker `id` in `slot` of the calling primary: its control channel end
/// `channel` at fd [`IPC_FD`], and the contract's variables.
pub fn prepare_worker(
    cmd: &mut Command,
    channel: OwnedFd,
    id: WorkerId,
    slot: SlotId,
) -> Result<(), Error> {
    process::pass_channel(cmd, channel, IPC_FD, IPC_FD_ENV)?;
    cmd.env(WORKER_ID_ENV, id.0.to_string())
        .env(WORKER_SLOT_ENV, slot.0.to_string())
        .env(PRIMARY_PID_ENV, std::process::id().to_string());
    Ok(())
}

/// True when this process was started by a primary as a worker and has not adopted its
/// channel yet: the variables are set and the parent is the primary they name.
pub fn is_worker() -> bool {
    std::env::var_os(IPC_FD_ENV).is_some() && started_by_named_primary()
}

/// Adopts this worker's control channel, once: reads the contract's variables, checks that
/// the parent is the primary they name, takes the channel's fd (see
/// [`process::adopt_from_env`]) and removes the variables from the environment.
///
/// Returns `Ok(None)`, after removing them too, when this process is not a worker: no
/// channel is named, or the variables were inherited from a worker by a process the worker
/// started. Call it early in `main`, before the program starts threads of its own (changing
/// the environment is not safe while another thread reads it through libc).
pub fn adopt_worker(
    limits: Limits,
) -> Result<Option<(WorkerIdentity, Channel<WorkerControl>)>, Error> {
    if std::env::var_os(IPC_FD_ENV).is_none() {
        return Ok(None);
    }
    if !started_by_named_primary() {
        tracing::debug!("cluster variables inherited from a worker: running as a plain process");
        sys::remove_env_vars(&VARS);
        return Ok(None);
    }
    let identity = read_identity();
    let channel = identity.and_then(|identity| {
        let channel = process::adopt_from_env(IPC_FD_ENV, limits)?.ok_or(Error::Env {
            var: IPC_FD_ENV.into(),
            reason: "not set",
        })?;
        Ok((identity, channel.into_protocol()))
    });
    sys::remove_env_vars(&VARS);
    channel.map(Some)
}

fn read_identity() -> Result<WorkerIdentity, Error> {
    let id = WorkerId(number(WORKER_ID_ENV)?);
    if id.0 == 0 {
        return Err(Error::Env {
            var: WORKER_ID_ENV.into(),
            reason: "worker ids start at 1",
        });
    }
    Ok(WorkerIdentity {
        id,
        slot: SlotId(number(WORKER_SLOT_ENV)?),
        primary_pid: number(PRIMARY_PID_ENV)?,
    })
}

/// True unless [`PRIMARY_PID_ENV`] names a process that is not this one's parent. A missing
/// variable is left to [`adopt_worker`] to report.
fn started_by_named_primary() -> bool {
    match std::env::var_os(PRIMARY_PID_ENV) {
        None => true,
        Some(pid) => parse(&pid) == Some(std::os::unix::process::parent_id()),
    }
}

fn number<T: std::str::FromStr>(var: &'static str) -> Result<T, Error> {
    let value = std::env::var_os(var).ok_or(Error::Env {
        var: var.into(),
        reason: "not set",
    })?;
    parse(&value).ok_or(Error::Env {
        var: var.into(),
        reason: "not a decimal number",
    })
}

fn parse<T: std::str::FromStr>(value: &OsStr) -> Option<T> {
    value.to_str().and_then(|text| text.trim().parse().ok())
}
