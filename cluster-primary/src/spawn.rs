//! Starting a worker process: fork+exec of the configured program with the control channel
//! at a fixed fd and the worker's identity in its environment.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};

use cluster_ipc::ErrorChain;
use cluster_ipc::proto::PrimaryControl;
use cluster_ipc::{Channel, SlotId, Transport, WorkerId};

use crate::config::Config;
use crate::{Error, sys};

/// A worker process just started.
pub(crate) struct Spawned {
    pub(crate) child: Child,
    pub(crate) control: Channel<PrimaryControl>,
    pub(crate) pidfd: Option<OwnedFd>,
}

/// Starts worker `id` in `slot`. Must run on the primary's loop thread: the parent-death
/// signal follows the thread that forked.
pub(crate) fn spawn_worker(
    config: &Config,
    id: WorkerId,
    slot: SlotId,
    env: &[(OsString, OsString)],
) -> Result<Spawned, Error> {
    let (control, workers_end) = Channel::pair_with(Transport::native(), config.control_limits)?;
    let control = control.into_protocol();
    let mut cmd = Command::new(&config.program);
    cmd.args(&config.args);
    for (key, value) in &config.envs {
        match value {
            Some(value) => cmd.env(key, value),
            None => cmd.env_remove(key),
        };
    }
    cmd.envs(env.iter().map(|(key, value)| (key, value)));
    if let Some(dir) = &config.cwd {
        cmd.current_dir(dir);
    }
    cmd.stdin(Stdio::null());
    // Its own process group: a terminal's Ctrl-C reaches only the primary, which stops the
    // workers in order.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cluster_ipc::env::prepare_worker(&mut cmd, workers_end.into_fd(), id, slot)?;
    if let Some(signal) = config.parent_death_signal {
        sys::set_parent_death_signal(&mut cmd, signal.as_raw());
    }
    let child = cmd
        .spawn()
        .map_err(|source| Error::io("spawn worker", source))?;
    // The command holds the parent's copy of the worker's end; drop it so that the worker is
    // its only holder and its exit reads as end of file here.
    drop(cmd);
    let pidfd = match sys::pidfd_open(child.id()) {
        Ok(pidfd) => pidfd,
        Err(err) => {
            tracing::warn!(error = %ErrorChain(&err), "pidfd_open failed; falling back to SIGCHLD");
            None
        }
    };
    Ok(Spawned {
        child,
        control,
        pidfd,
    })
}
