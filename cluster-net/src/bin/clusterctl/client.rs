//! One request, one reply over the primary's control socket, each step bounded in time and
//! the reply bounded in size.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::libc::{suseconds_t, time_t};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr, sockopt};
use nix::sys::time::TimeVal;

/// The longest reply line read. A status of a large cluster is a few hundred KiB; the bound
/// is there so that a broken or hostile server cannot make the tool eat all the memory.
pub const MAX_REPLY_LEN: usize = 16 * 1024 * 1024;

/// How long the exchange may take, both counted from its start.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// For connecting and sending the request.
    pub connect: Duration,
    /// For the whole exchange, reply included; `None` waits as long as the primary takes.
    pub reply: Option<Duration>,
}

/// Why the exchange failed; each names the socket.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be reached.
    #[error(
        "cannot connect to {}: {}{}",
        path.display(),
        os_cause(source),
        connect_hint(source)
    )]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS's reason.
        source: io::Error,
    },
    /// The request could not be sent.
    #[error("cannot send the request to {}: {}", path.display(), os_cause(source))]
    Send {
        /// The socket.
        path: PathBuf,
        /// The OS's reason.
        source: io::Error,
    },
    /// Reading the reply failed.
    #[error("cannot read the reply from {}: {}", path.display(), os_cause(source))]
    Receive {
        /// The socket.
        path: PathBuf,
        /// The OS's reason.
        source: io::Error,
    },
    /// The time ran out.
    #[error(
        "{} {} within {}s (is the primary stuck? --timeout gives it longer)",
        stage.describe(),
        path.display(),
        limit.as_secs_f64()
    )]
    TimedOut {
        /// The socket.
        path: PathBuf,
        /// What did not happen in time.
        stage: Stage,
        /// The limit that ran out.
        limit: Duration,
    },
    /// The primary closed the connection before the end of its reply.
    #[error(
        "{} closed the connection {}",
        path.display(),
        if *received == 0 {
            "without a reply".to_owned()
        } else {
            format!("in the middle of its reply (after {received} bytes, with no end of line)")
        }
    )]
    Closed {
        /// The socket.
        path: PathBuf,
        /// How much of a reply came before the end.
        received: usize,
    },
    /// The reply was longer than [`MAX_REPLY_LEN`].
    #[error("the reply from {} is longer than the {} MiB allowed", path.display(), MAX_REPLY_LEN >> 20)]
    TooLong {
        /// The socket.
        path: PathBuf,
    },
    /// The reply was not UTF-8.
    #[error("the reply from {} is not UTF-8 text", path.display())]
    NotText {
        /// The socket.
        path: PathBuf,
    },
}

/// The steps of an exchange, for saying which one ran out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Connecting: the primary's backlog stayed full.
    Connect,
    /// Sending the request: the primary did not read it.
    Send,
    /// Waiting for the reply.
    Reply,
}

impl Stage {
    /// The start of a sentence that ends with the socket's path.
    fn describe(self) -> &'static str {
        match self {
            Stage::Connect => "cannot connect to",
            Stage::Send => "cannot send the request to",
            Stage::Reply => "no reply from",
        }
    }
}

/// The OS's reason for a failure, without the "(os error N)" that `io::Error` adds: the
/// message is for a person, who has the path in front of it.
fn os_cause(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_owned(),
        None => err.to_string(),
    }
}

/// What the likely reason for a failed connection is, when the OS's reason leaves it open.
fn connect_hint(cause: &io::Error) -> &'static str {
    match cause.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            " (is the cluster running with --control?)"
        }
        _ => "",
    }
}

/// Sends `request` (one line, without its newline) to the socket at `path` and returns the
/// reply's line, without its newline.
pub fn exchange(path: &Path, request: &str, limits: Limits) -> Result<String, Error> {
    let start = Instant::now();
    let timed_out = |stage, limit| Error::TimedOut {
        path: path.to_owned(),
        stage,
        limit,
    };
    let is_timeout = |err: &io::Error| {
        matches!(
            err.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        )
    };

    let mut stream = connect(path, limits.connect).map_err(|source| {
        // EAGAIN is Linux's answer when the backlog stayed full for the whole timeout.
        if is_timeout(&source) {
            timed_out(Stage::Connect, limits.connect)
        } else {
            Error::Connect {
                path: path.to_owned(),
                source,
            }
        }
    })?;

    let send_error = |source: io::Error| {
        if is_timeout(&source) {
            timed_out(Stage::Send, limits.connect)
        } else {
            Error::Send {
                path: path.to_owned(),
                source,
            }
        }
    };
    // A deadline too far to represent (`--timeout 1e19`) is no deadline.
    let send_time = match start.checked_add(limits.connect) {
        Some(deadline) => {
            Some(time_left(deadline).ok_or_else(|| timed_out(Stage::Send, limits.connect))?)
        }
        None => None,
    };
    stream.set_write_timeout(send_time).map_err(send_error)?;
    let mut line = Vec::with_capacity(request.len() + 1);
    line.extend_from_slice(request.as_bytes());
    line.push(b'\n');
    if let Err(err) = stream.write_all(&line) {
        // A primary that refuses a client (another user, too many clients) answers and
        // closes without reading: its answer is still there to read, and says why.
        if err.kind() != io::ErrorKind::BrokenPipe {
            return Err(send_error(err));
        }
        let deadline = Some(Instant::now() + Duration::from_secs(1));
        return read_line(&mut stream, deadline).map_err(|_| send_error(err));
    }

    let reply_deadline = limits.reply.and_then(|limit| start.checked_add(limit));
    read_line(&mut stream, reply_deadline).map_err(|failure| match failure {
        ReadFailure::TimedOut => timed_out(Stage::Reply, limits.reply.unwrap_or_default()),
        ReadFailure::Io(source) => Error::Receive {
            path: path.to_owned(),
            source,
        },
        ReadFailure::Closed { received } => Error::Closed {
            path: path.to_owned(),
            received,
        },
        ReadFailure::TooLong => Error::TooLong {
            path: path.to_owned(),
        },
        ReadFailure::NotText => Error::NotText {
            path: path.to_owned(),
        },
    })
}

/// Connects to the socket at `path`, waiting at most `timeout`.
///
/// `UnixStream::connect` cannot be bounded, and it blocks for as long as the listener's
/// backlog is full, which is what a stuck primary's backlog becomes once enough clients
/// (each `clusterctl` of a cron job, say) have given up on it: the connections they left
/// stay queued. On Linux a send timeout set before `connect` bounds that wait.
fn connect(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let address = UnixAddr::new(path)?;
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::setsockopt(&fd, sockopt::SendTimeout, &socket_timeout(timeout))?;
    loop {
        match socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &address) {
            Ok(()) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(errno) => return Err(errno.into()),
        }
    }
    Ok(UnixStream::from(fd))
}

/// `timeout` as a socket timeout: saturated where it is too long to represent (the kernel
/// takes an enormous timeout as none), and at least 1 µs, as a zero would mean none too.
fn socket_timeout(timeout: Duration) -> TimeVal {
    let seconds = time_t::try_from(timeout.as_secs()).unwrap_or(time_t::MAX);
    // Below a million: fits any `suseconds_t` (an `i64` here, an `i32` elsewhere).
    let micros = timeout.subsec_micros() as suseconds_t;
    if seconds == 0 && micros == 0 {
        TimeVal::new(0, 1)
    } else {
        TimeVal::new(seconds, micros)
    }
}

/// How reading a line failed, before the socket's path is added.
#[derive(Debug)]
enum ReadFailure {
    TimedOut,
    Io(io::Error),
    Closed { received: usize },
    TooLong,
    NotText,
}

/// Reads up to the first newline, within `deadline` and [`MAX_REPLY_LEN`]. Anything after
/// the newline is left unread: one request gets one reply.
fn read_line(stream: &mut UnixStream, deadline: Option<Instant>) -> Result<String, ReadFailure> {
    let mut line = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let timeout = match deadline {
            Some(deadline) => Some(time_left(deadline).ok_or(ReadFailure::TimedOut)?),
            None => None,
        };
        stream.set_read_timeout(timeout).map_err(ReadFailure::Io)?;
        let read = match stream.read(&mut chunk) {
            Ok(0) => {
                return Err(ReadFailure::Closed {
                    received: line.len(),
                });
            }
            Ok(read) => read,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ReadFailure::TimedOut);
            }
            Err(err) => return Err(ReadFailure::Io(err)),
        };
        let received = &chunk[..read];
        let end = received.iter().position(|&byte| byte == b'\n');
        line.extend_from_slice(&received[..end.unwrap_or(read)]);
        if line.len() > MAX_REPLY_LEN {
            return Err(ReadFailure::TooLong);
        }
        if end.is_some() {
            return String::from_utf8(line).map_err(|_| ReadFailure::NotText);
        }
    }
}

/// The time until `deadline`, or `None` once it has passed.
fn time_left(deadline: Instant) -> Option<Duration> {
    Some(deadline.saturating_duration_since(Instant::now())).filter(|left| !left.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn soon() -> Option<Instant> {
        Some(Instant::now() + Duration::from_secs(5))
    }

    #[test]
    fn a_line_is_read_up_to_its_newline_across_reads() {
        let (mut client, mut server) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            server.write_all(b"{\"ok\":").unwrap();
            std::thread::sleep(Duration::from_millis(20));
            server.write_all(b"true}\nnot read\n").unwrap();
            server
        });
        assert_eq!(read_line(&mut client, soon()).unwrap(), r#"{"ok":true}"#);
        drop(writer.join().unwrap());
    }

    #[test]
    fn an_end_without_a_newline_is_not_a_reply() {
        let (mut client, mut server) = UnixStream::pair().unwrap();
        server.write_all(b"{\"ok\"").unwrap();
        drop(server);
        assert!(matches!(
            read_line(&mut client, soon()),
            Err(ReadFailure::Closed { received: 5 })
        ));
    }

    #[test]
    fn a_reply_longer_than_the_bound_is_refused() {
        let (mut client, server) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            let mut server = server;
            let chunk = vec![b'x'; 1024 * 1024];
            // Stops with an error once the client has given up and closed its end.
            for _ in 0..=MAX_REPLY_LEN / chunk.len() {
                if server.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        assert!(matches!(
            read_line(&mut client, soon()),
            Err(ReadFailure::TooLong)
        ));
        drop(client);
        writer.join().unwrap();
    }

    #[test]
    fn a_silent_peer_runs_out_the_deadline() {
        let (mut client, _server) = UnixStream::pair().unwrap();
        let start = Instant::now();
        let deadline = Some(start + Duration::from_millis(100));
        assert!(matches!(
            read_line(&mut client, deadline),
            Err(ReadFailure::TimedOut)
        ));
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_reply_must_be_utf8() {
        let (mut client, mut server) = UnixStream::pair().unwrap();
        server.write_all(b"\xff\n").unwrap();
        assert!(matches!(
            read_line(&mut client, soon()),
            Err(ReadFailure::NotText)
        ));
    }

    #[test]
    fn a_connect_to_a_full_backlog_gives_up_in_time() {
        let dir = std::env::temp_dir().join(format!("clusterctl-backlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let _ = std::fs::remove_file(&path);
        // A listener that never accepts, with room for one waiting connection (Linux lets
        // one more than the backlog wait), which the first connect takes.
        let listener = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        let address = UnixAddr::new(&path).unwrap();
        socket::bind(std::os::fd::AsRawFd::as_raw_fd(&listener), &address).unwrap();
        socket::listen(&listener, socket::Backlog::new(0).unwrap()).unwrap();
        let _waiting = connect(&path, Duration::from_secs(5)).unwrap();

        let start = Instant::now();
        let limits = Limits {
            connect: Duration::from_millis(200),
            reply: None,
        };
        let err = exchange(&path, "{}", limits).unwrap_err();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        assert!(
            matches!(
                err,
                Error::TimedOut {
                    stage: Stage::Connect,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("cannot connect to "), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn socket_timeouts_are_never_zero_and_never_overflow() {
        use nix::sys::time::TimeValLike;
        assert_eq!(
            socket_timeout(Duration::from_millis(1500)).num_microseconds(),
            1_500_000
        );
        assert_eq!(
            socket_timeout(Duration::from_nanos(1)).num_microseconds(),
            1
        );
        assert_eq!(socket_timeout(Duration::MAX).tv_sec(), time_t::MAX);
    }

    #[test]
    fn limits_too_far_to_represent_mean_none() {
        let dir = std::env::temp_dir().join(format!("clusterctl-far-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0u8; 3];
            stream.read_exact(&mut request).unwrap();
            stream.write_all(b"{}\n").unwrap();
            request
        });
        let limits = Limits {
            connect: Duration::MAX,
            reply: Some(Duration::MAX),
        };
        assert_eq!(exchange(&path, "{}", limits).unwrap(), "{}");
        assert_eq!(&server.join().unwrap(), b"{}\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_socket_is_named_with_the_cause_and_a_hint() {
        let path = Path::new("/nonexistent/clusterctl-test.sock");
        let limits = Limits {
            connect: Duration::from_secs(1),
            reply: None,
        };
        let err = exchange(path, "{}", limits).unwrap_err();
        let message = err.to_string();
        assert!(message.starts_with("cannot connect to /nonexistent/clusterctl-test.sock: "));
        assert!(
            message.contains(": No such file or directory (is the cluster"),
            "{message}"
        );
        assert!(
            message.ends_with("(is the cluster running with --control?)"),
            "{message}"
        );
    }
}
