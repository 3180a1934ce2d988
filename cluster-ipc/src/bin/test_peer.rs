//! A peer for `cluster-ipc`'s cross-process tests.
//!
//! It adopts the channel named by `CLUSTER_IPC_TEST_FD` and answers `String` requests sent as
//! user frames:
//! - `echo:<text>`: replies `<text>`;
//! - `write`: writes `peer wrote <i>` into each attached fd, replies `wrote <n>`;
//! - `ask`: sends the parent its own request (`fill`, with a pipe's write end attached),
//!   waits for the reply, then replies to `ask` with what the parent wrote into the pipe;
//! - `fds`: replies with the numbers of its open fds and whether fd 3 is close-on-exec;
//! - `exit`: replies `bye` and exits.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::process::ExitCode;

use cluster_ipc::{Channel, Error, Kind, Limits};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("test peer: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Error> {
    let mut channel =
        cluster_ipc::process::adopt_from_env("CLUSTER_IPC_TEST_FD", Limits::default())?.ok_or(
            Error::Env {
                var: "CLUSTER_IPC_TEST_FD".into(),
                reason: "not set",
            },
        )?;
    // Adopting twice must be refused, not create a second owner.
    if !matches!(
        cluster_ipc::process::adopt_from_env("CLUSTER_IPC_TEST_FD", Limits::default()),
        Err(Error::AlreadyAdopted { .. })
    ) {
        return Err(Error::WrongSocket {
            reason: "second adoption was not refused",
        });
    }
    loop {
        let request = match channel.recv(None) {
            Ok(frame) => frame,
            Err(Error::Closed) => return Ok(()),
            Err(err) => return Err(err),
        };
        let text: String = request.decode()?;
        let seq = request.seq();
        let reply = match text.as_str() {
            "write" => {
                let count = request.fds.len();
                for (i, fd) in request.fds.into_iter().enumerate() {
                    let mut file = std::fs::File::from(fd);
                    write!(file, "peer wrote {i}").map_err(|err| Error::Io {
                        op: "write",
                        source: err,
                    })?;
                }
                format!("wrote {count}")
            }
            "ask" => ask_parent(&mut channel)?,
            "fds" => describe_fds(&channel),
            "exit" => {
                channel.send_blocking(Kind::User, Some(seq), "bye", &[], None)?;
                return Ok(());
            }
            other => match other.strip_prefix("echo:") {
                Some(rest) => rest.to_owned(),
                None => format!("unknown request {other:?}"),
            },
        };
        channel.send_blocking(Kind::User, Some(seq), &reply, &[], None)?;
    }
}

fn ask_parent(channel: &mut Channel) -> Result<String, Error> {
    let io = |op| move |source| Error::Io { op, source };
    let (mut reader, writer) = std::io::pipe().map_err(io("pipe"))?;
    let reply = channel.call(Kind::User, "fill", &[writer.as_fd()], None)?;
    drop(writer);
    let status: String = reply.decode()?;
    let mut text = String::new();
    reader.read_to_string(&mut text).map_err(io("read"))?;
    Ok(format!("{status}: {text}"))
}

fn describe_fds(channel: &Channel) -> String {
    // The listing's own directory handle is open while it runs; leave it out.
    let listing = std::path::PathBuf::from(format!("/proc/{}/fd", std::process::id()));
    let mut fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.filter_map(|entry| {
                let entry = entry.ok()?;
                if std::fs::read_link(entry.path()).ok()? == listing {
                    return None;
                }
                entry.file_name().to_str()?.parse().ok()
            })
            .collect()
        })
        .unwrap_or_default();
    fds.sort_unstable();
    let cloexec = nix::fcntl::fcntl(channel, nix::fcntl::FcntlArg::F_GETFD)
        .map(|flags| flags & libc::FD_CLOEXEC != 0)
        .unwrap_or(false);
    format!("{fds:?} cloexec={cloexec}")
}
