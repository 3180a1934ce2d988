//! The control socket's I/O: a non-blocking Unix listener and its clients, in the primary's
//! loop. It reads request lines and writes reply lines; what a request does is the primary's
//! business. Nothing here waits: a client that sends slowly, never reads, or floods is cut
//! off at a bound, and the loop goes on.

use cluster_ipc::ErrorChain;
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use mio::net::{UnixListener, UnixStream};
use mio::{Interest, Registry, Token};

use super::{Failure, FailureKind, MAX_REQUEST_LEN, Request, failure_line, parse_request};
use crate::Error;

/// Clients served at once; one more is told so and closed.
const MAX_CLIENTS: usize = 64;
/// Reply bytes a client may leave unread before it is cut off.
const MAX_OUTPUT: usize = 16 * 1024 * 1024;

/// One connected client.
struct Client {
    stream: UnixStream,
    token: Token,
    /// Bytes read and not yet a whole line.
    input: Vec<u8>,
    /// Reply bytes not yet written.
    output: Vec<u8>,
    /// Requests read and not answered yet (a reload is answered when it is over).
    owed: usize,
    /// The client sent its last request (end of file, or a line too long to serve).
    done_reading: bool,
}

/// The listening control socket and its clients.
pub(crate) struct ControlServer {
    path: PathBuf,
    /// The socket file this server made, to remove it at the end only if it is still ours.
    inode: (u64, u64),
    listener: UnixListener,
    clients: BTreeMap<u64, Client>,
    next_client: u64,
    /// The tokens of clients closed since the loop last asked.
    closed: Vec<Token>,
    own_uid: u32,
}

impl ControlServer {
    /// Creates the socket at `path`, mode 0600, and registers it under `token`. A stale
    /// socket file (nobody listening) is replaced; a live one, or a file that is not a
    /// socket, is refused.
    pub(crate) fn open(path: &Path, registry: &Registry, token: Token) -> Result<Self, Error> {
        let failed = |source: io::Error| Error::ControlSocket {
            path: path.to_owned(),
            source,
        };
        remove_stale(path).map_err(failed)?;
        // Bound under a temporary name, restricted, then renamed into place: the socket is
        // never reachable at `path` with looser permissions.
        let temporary = path.with_extension(format!("tmp-{}", std::process::id()));
        let _ = std::fs::remove_file(&temporary);
        let mut listener = UnixListener::bind(&temporary).map_err(failed)?;
        let placed = std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::rename(&temporary, path));
        if let Err(err) = placed {
            let _ = std::fs::remove_file(&temporary);
            return Err(failed(err));
        }
        let metadata = std::fs::symlink_metadata(path).map_err(failed)?;
        registry
            .register(&mut listener, token, Interest::READABLE)
            .map_err(|source| Error::io("register the control socket", source))?;
        tracing::info!(path = %path.display(), "control socket listening");
        Ok(ControlServer {
            path: path.to_owned(),
            inode: (metadata.dev(), metadata.ino()),
            listener,
            clients: BTreeMap::new(),
            next_client: 1,
            closed: Vec::new(),
            own_uid: nix::unistd::geteuid().as_raw(),
        })
    }

    /// Accepts every waiting client. `token_for` gives the loop token of a new client id.
    pub(crate) fn accept(&mut self, registry: &Registry, mut token_for: impl FnMut(u64) -> Token) {
        loop {
            let mut stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    // Out of fds, most likely: the next readiness event tries again.
                    tracing::warn!(error = %ErrorChain(&err), "control socket: accept failed");
                    return;
                }
            };
            if let Err(failure) = self.admit(&stream) {
                tracing::warn!(reason = %failure.message, "control socket: client refused");
                // Best effort, without waiting: a short line fits in any socket buffer.
                let _ = stream.write(failure_line(&failure).as_bytes());
                continue;
            }
            let id = self.next_client;
            self.next_client += 1;
            let token = token_for(id);
            if let Err(err) =
                registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
            {
                tracing::warn!(error = %ErrorChain(&err), "control socket: could not watch a client");
                self.closed.push(token);
                continue;
            }
            self.clients.insert(
                id,
                Client {
                    stream,
                    token,
                    input: Vec::new(),
                    output: Vec::new(),
                    owed: 0,
                    done_reading: false,
                },
            );
        }
    }

    /// Whether this peer may be served: the primary's own user or root, and room for it.
    fn admit(&self, stream: &UnixStream) -> Result<(), Failure> {
        let credentials =
            nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
                .map_err(|errno| {
                    Failure::new(
                        FailureKind::PermissionDenied,
                        format!("the peer's credentials cannot be read: {errno}"),
                    )
                })?;
        peer_allowed(credentials.uid(), self.own_uid)?;
        if self.clients.len() >= MAX_CLIENTS {
            return Err(Failure::new(
                FailureKind::Refused,
                format!("too many control clients (at most {MAX_CLIENTS}); try again"),
            ));
        }
        Ok(())
    }

    /// Reads what client `id` sent: every whole request line, parsed. A line over the limit
    /// is answered with a failure and ends the client's requests.
    pub(crate) fn read(&mut self, id: u64) -> Vec<Result<Request, Failure>> {
        let Some(client) = self.clients.get_mut(&id) else {
            return Vec::new();
        };
        let mut requests = Vec::new();
        let mut buffer = [0u8; 4096];
        while !client.done_reading {
            match client.stream.read(&mut buffer) {
                Ok(0) => client.done_reading = true,
                Ok(read) => client.input.extend_from_slice(&buffer[..read]),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    client.done_reading = true;
                    client.output.clear();
                    client.owed = 0;
                }
            }
            while let Some(end) = client.input.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = client.input.drain(..=end).collect();
                let line = line.strip_suffix(b"\n").unwrap_or(&line);
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                requests.push(parse_request(line));
            }
            if client.input.len() > MAX_REQUEST_LEN {
                requests.push(Err(Failure::new(
                    FailureKind::TooLong,
                    format!("a request line is at most {MAX_REQUEST_LEN} bytes"),
                )));
                client.input.clear();
                client.done_reading = true;
            }
        }
        client.owed += requests.len();
        self.settle(id);
        requests
    }

    /// Queues `line` (with its newline) as the answer to one of client `id`'s requests and
    /// writes what it can.
    pub(crate) fn reply(&mut self, id: u64, line: &str) {
        let Some(client) = self.clients.get_mut(&id) else {
            return; // It left meanwhile.
        };
        client.owed = client.owed.saturating_sub(1);
        client.output.extend_from_slice(line.as_bytes());
        self.flush(id);
    }

    /// Writes what client `id` has queued, as far as its socket takes it.
    pub(crate) fn flush(&mut self, id: u64) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        while !client.output.is_empty() {
            match client.stream.write(&client.output) {
                Ok(0) => break,
                Ok(written) => {
                    client.output.drain(..written);
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // Gone: nothing it is owed can reach it.
                    client.output.clear();
                    client.owed = 0;
                    client.done_reading = true;
                }
            }
        }
        self.settle(id);
    }

    /// Closes client `id` once it has nothing more coming, or when it stopped reading.
    fn settle(&mut self, id: u64) {
        let Some(client) = self.clients.get(&id) else {
            return;
        };
        let finished = client.done_reading && client.owed == 0 && client.output.is_empty();
        if client.output.len() > MAX_OUTPUT {
            tracing::warn!(
                unread = client.output.len(),
                "control socket: a client does not read its replies; closing it"
            );
        } else if !finished {
            return;
        }
        // Dropping the stream closes it, which takes it out of the poll set too.
        if let Some(client) = self.clients.remove(&id) {
            self.closed.push(client.token);
        }
    }

    /// The tokens of the clients closed since the last call, for the loop to forget.
    pub(crate) fn take_closed(&mut self) -> Vec<Token> {
        std::mem::take(&mut self.closed)
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        // Only the file this server made: another primary may have replaced it since.
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.inode);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The control socket serves the primary's own user, and root.
pub(crate) fn peer_allowed(peer_uid: u32, own_uid: u32) -> Result<(), Failure> {
    if peer_uid == own_uid || peer_uid == 0 {
        return Ok(());
    }
    Err(Failure::new(
        FailureKind::PermissionDenied,
        format!("uid {peer_uid} may not control this cluster (it serves uid {own_uid} and root)"),
    ))
}

/// Removes a socket file nobody listens on any more (left by a primary that was killed);
/// refuses one a live primary serves, and anything that is not a socket.
fn remove_stale(path: &Path) -> io::Result<()> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    if !metadata.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket; refusing to replace it",
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process serves this control socket",
        )),
        Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixStream as StdStream;

    use super::*;

    /// A server on a fresh path, with a poll to register in; the path's directory.
    fn server(name: &str) -> (ControlServer, mio::Poll, PathBuf) {
        let dir = std::env::temp_dir().join(format!("cluster-ctl-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let poll = mio::Poll::new().unwrap();
        let server = ControlServer::open(&dir.join("ctl.sock"), poll.registry(), Token(1)).unwrap();
        (server, poll, dir)
    }

    /// Connects a client and lets the server accept it; the client's id.
    fn client(server: &mut ControlServer, poll: &mio::Poll) -> (StdStream, u64) {
        let stream = StdStream::connect(&server.path).unwrap();
        let before = server.next_client;
        server.accept(poll.registry(), |id| Token(100 + id as usize));
        assert_eq!(server.next_client, before + 1, "accepted");
        (stream, before)
    }

    fn reply_line(stream: &StdStream) -> serde_json::Value {
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    #[test]
    fn the_socket_is_private_and_removed_at_the_end() {
        let (server, _poll, dir) = server("mode");
        let path = server.path.clone();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(server);
        assert!(!path.exists());
        std::fs::remove_dir(dir).unwrap();
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_live_one_or_a_file_refused() {
        let (live, poll, dir) = server("stale");
        let path = live.path.clone();
        // Live: refused.
        assert!(matches!(
            ControlServer::open(&path, poll.registry(), Token(2)),
            Err(Error::ControlSocket { .. })
        ));
        // Stale (nobody listens, the file stays): replaced.
        let stale = std::os::unix::net::UnixListener::bind(dir.join("old.sock")).unwrap();
        drop(stale);
        let replaced = ControlServer::open(&dir.join("old.sock"), poll.registry(), Token(3));
        assert!(replaced.is_ok());
        // Not a socket: refused, and left alone.
        std::fs::write(dir.join("file"), "data").unwrap();
        assert!(ControlServer::open(&dir.join("file"), poll.registry(), Token(4)).is_err());
        assert_eq!(std::fs::read_to_string(dir.join("file")).unwrap(), "data");
        drop((live, replaced));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn requests_split_or_batched_are_read_line_by_line_and_answered_in_order() {
        let (mut server, poll, dir) = server("lines");
        let (mut stream, id) = client(&mut server, &poll);
        stream.write_all(b"{\"version\":1,\"comm").unwrap();
        assert!(server.read(id).is_empty(), "half a line is no request");
        stream
            .write_all(b"and\":\"status\"}\r\n\n{\"version\":1,\"command\":\"metrics\"}\n")
            .unwrap();
        let requests = server.read(id);
        assert_eq!(requests, [Ok(Request::Status), Ok(Request::Metrics)]);
        server.reply(id, "{\"n\":1}\n");
        server.reply(id, "{\"n\":2}\n");
        let mut reader = BufReader::new(&stream);
        let mut lines = String::new();
        reader.read_line(&mut lines).unwrap();
        reader.read_line(&mut lines).unwrap();
        assert_eq!(lines, "{\"n\":1}\n{\"n\":2}\n");
        drop(server);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_line_over_the_limit_is_refused_and_its_client_closed() {
        let (mut server, poll, dir) = server("long");
        let (mut stream, id) = client(&mut server, &poll);
        stream.write_all(&vec![b'x'; MAX_REQUEST_LEN + 10]).unwrap();
        let mut requests = Vec::new();
        while requests.is_empty() {
            requests = server.read(id);
        }
        let failure = requests.pop().unwrap().unwrap_err();
        assert_eq!(failure.kind, FailureKind::TooLong);
        server.reply(id, &failure_line(&failure));
        assert_eq!(reply_line(&stream)["kind"], "too_long");
        assert_eq!(server.take_closed(), [Token(100 + id as usize)]);
        drop(server);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn clients_past_the_limit_are_told_and_closed() {
        let (mut server, poll, dir) = server("many");
        let clients: Vec<_> = (0..MAX_CLIENTS)
            .map(|_| client(&mut server, &poll))
            .collect();
        let extra = StdStream::connect(&server.path).unwrap();
        server.accept(poll.registry(), |_| panic!("no token for a refused client"));
        let reply = reply_line(&extra);
        assert_eq!(reply["kind"], "refused", "{reply}");
        assert!(
            reply["error"].as_str().unwrap().contains("too many"),
            "{reply}"
        );
        // One leaves: there is room again.
        let (stream, id) = clients.into_iter().next().unwrap();
        drop(stream);
        assert!(server.read(id).is_empty());
        assert_eq!(server.take_closed().len(), 1);
        client(&mut server, &poll);
        drop(server);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_client_that_does_not_read_its_replies_is_cut_off() {
        let (mut server, poll, dir) = server("slow");
        let (mut stream, id) = client(&mut server, &poll);
        // Four requests a turn, a MiB of reply each: 128 MiB in all if nothing cut it off.
        let status = "{\"version\":1,\"command\":\"status\"}\n".repeat(4);
        let big_reply = format!("{}\n", "x".repeat(1024 * 1024));
        let mut cut = false;
        for _ in 0..32 {
            if stream.write_all(status.as_bytes()).is_err() {
                cut = true;
                break;
            }
            for _ in server.read(id) {
                server.reply(id, &big_reply);
            }
            if server.take_closed().contains(&Token(100 + id as usize)) {
                cut = true;
                break;
            }
        }
        assert!(
            cut,
            "a client that never reads is closed, not buffered for ever"
        );
        drop(server);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn only_the_primarys_user_and_root_are_served() {
        assert!(peer_allowed(1000, 1000).is_ok());
        assert!(peer_allowed(0, 1000).is_ok());
        let refused = peer_allowed(1001, 1000).unwrap_err();
        assert_eq!(refused.kind, FailureKind::PermissionDenied);
        assert!(refused.message.contains("1001"), "{}", refused.message);
        // Root's own primary serves only root.
        assert!(peer_allowed(1000, 0).is_err());
    }
}
