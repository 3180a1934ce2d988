//! A small single-threaded HTTP/1.x server on `mio`, the shape of a Node.js worker: one event
//! loop per process, many connections, keep-alive when the client asks for it.
//!
//! Requests are parsed with `httparse`; bodies announced by `Content-Length` are read and
//! ignored. Every response is `200 OK` with the body the [`Handler`] gives.
//!
//! While its worker drains, the server gives each idle keep-alive connection back to the
//! primary (with what it read of the next request), which gives it to another worker: the
//! client keeps its connection and never sees it close. Where that cannot be done (a shared
//! listener, no cluster) the idle connection is closed instead, as servers do.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::time::Duration;

use cluster_net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

/// What the server asks of the application.
pub trait Handler {
    /// The body of the response to a request for `path`.
    fn respond(&mut self, path: &str) -> String;

    /// `respond` panicked: the request's connection was closed without an answer (the rest
    /// of the server goes on). A cluster worker should now stop taking work and be replaced
    /// (`Worker::fail`).
    fn on_panic(&mut self) {}

    /// False when connections should close after their current request (for example while
    /// the worker is disconnecting); keep-alive connections that wait for their next request
    /// are then handed back to the primary, or closed where that cannot be done.
    fn keep_alive_allowed(&self) -> bool {
        true
    }

    /// Called once per turn of the server's loop (at least every 200 ms), on the thread that
    /// serves: a cluster worker sends its heartbeat from here
    /// ([`cluster_net::Worker::heartbeat`]), so that a server whose loop stops turning is
    /// seen as hung while one that merely has nothing to accept is not.
    fn heartbeat(&mut self) {}
}

const LISTENER: Token = Token(usize::MAX);
const MAX_HEADERS: usize = 32;
/// A request head larger than this is refused.
const MAX_HEAD: usize = 16 * 1024;
/// How often the loop looks at the handler's state without an event.
const TICK: Duration = Duration::from_millis(200);

/// Serves HTTP on `listener` until the listener closes (the cluster worker disconnects) and
/// every open connection is done. A plain listener never closes: that server runs until the
/// process is stopped.
pub fn serve(mut listener: TcpListener, handler: &mut impl Handler) -> io::Result<()> {
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut listener = Some(listener);
    let mut conns: HashMap<Token, Connection> = HashMap::new();
    let mut next_token = 0usize;
    let mut events = Events::with_capacity(256);
    loop {
        if listener.is_none() && conns.is_empty() {
            return Ok(());
        }
        match poll.poll(&mut events, Some(TICK)) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        }
        handler.heartbeat();
        for event in events.iter() {
            if event.token() == LISTENER {
                let open = listener.as_ref().is_some_and(|l| {
                    accept_all(l, &poll, &mut conns, &mut next_token, &mut *handler)
                });
                if !open {
                    listener = None;
                }
            } else if let Some(conn) = conns.get_mut(&event.token()) {
                if conn.on_ready(handler).is_err() || conn.done {
                    conns.remove(&event.token());
                }
            }
        }
        if !handler.keep_alive_allowed() {
            // Disconnecting: keep-alive connections waiting for their next request would hold
            // the worker up for nothing.
            let idle: Vec<Token> = conns
                .iter()
                .filter(|(_, conn)| {
                    conn.at_request_boundary()
                        && !conn.hand_back_refused
                        && conn.stream.can_hand_back()
                })
                .map(|(token, _)| *token)
                .collect();
            for token in idle {
                if let Some(conn) = conns.remove(&token) {
                    if let Some(kept) = hand_back(conn, &poll, token) {
                        conns.insert(token, kept);
                    }
                }
            }
            // Where the primary cannot take them, idle ones are closed. (A new connection
            // whose first request is still on its way is not idle: it gets its answer.)
            conns.retain(|_, conn| !conn.is_idle_keep_alive());
        }
    }
}

/// Gives an idle connection back to the primary, with what it read of the next request;
/// returns it, registered again and marked, if the primary cannot take it.
fn hand_back(mut conn: Connection, poll: &Poll, token: Token) -> Option<Connection> {
    // Out of this loop's epoll first: once handed back the socket belongs to another worker,
    // and an fd this process no longer has cannot be deregistered.
    if let Err(err) = poll.registry().deregister(&mut conn.stream) {
        tracing::debug!(%err, "could not deregister a connection to hand back");
    }
    match conn.stream.hand_back(&conn.input) {
        Ok(()) => None,
        Err(mut stream) => {
            conn.hand_back_refused = true;
            let interest = Interest::READABLE | Interest::WRITABLE;
            if let Err(err) = poll.registry().register(&mut stream, token, interest) {
                // Unwatched it would never be served: close it.
                tracing::warn!(%err, "could not register a connection again");
                return None;
            }
            conn.stream = stream;
            Some(conn)
        }
    }
}

/// Accepts until nothing is left. Returns false once the listener is closed.
fn accept_all(
    listener: &TcpListener,
    poll: &Poll,
    conns: &mut HashMap<Token, Connection>,
    next_token: &mut usize,
    handler: &mut impl Handler,
) -> bool {
    loop {
        match listener.try_accept() {
            Ok((mut stream, _)) => {
                let token = Token(*next_token);
                *next_token = (*next_token + 1) % (usize::MAX - 1);
                let interest = Interest::READABLE | Interest::WRITABLE;
                if let Err(err) = poll.registry().register(&mut stream, token, interest) {
                    tracing::warn!(%err, "could not register a connection");
                    continue;
                }
                let _ = stream.set_nodelay(true);
                // A connection another worker handed back brings what it read of the next
                // request; no readiness announces those bytes, so serve them now.
                let unread = stream.take_unread();
                let resumed = !unread.is_empty();
                let mut conn = Connection::new(stream);
                conn.input = unread;
                if resumed && (conn.on_ready(handler).is_err() || conn.done) {
                    continue;
                }
                conns.insert(token, conn);
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return true,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) if listener.is_closed() || err.kind() == io::ErrorKind::NotConnected => {
                return false;
            }
            Err(err) => {
                // A client that left before we took it, or fds exhausted: keep serving.
                tracing::debug!(%err, "accept failed");
                return true;
            }
        }
    }
}

/// One client connection: bytes read and not yet parsed, bytes to write.
struct Connection {
    stream: TcpStream,
    input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    /// Bytes of a request body still to skip.
    body_left: usize,
    /// The primary would not take it back although it looked as if it could (its control
    /// channel closed, or the unread bytes are too many): do not ask again.
    hand_back_refused: bool,
    /// Close once the output is written.
    closing: bool,
    done: bool,
    /// Requests answered on this connection so far.
    answered: u64,
}

impl Connection {
    fn new(stream: TcpStream) -> Connection {
        Connection {
            stream,
            input: Vec::with_capacity(1024),
            output: Vec::with_capacity(256),
            written: 0,
            body_left: 0,
            hand_back_refused: false,
            closing: false,
            done: false,
            answered: 0,
        }
    }

    /// Answered at least one request, and nothing of the next one has arrived.
    fn is_idle_keep_alive(&self) -> bool {
        self.answered > 0 && self.input.is_empty() && self.written == self.output.len()
    }

    /// Between two requests: the last response fully written, no body left to skip, not
    /// closing. What `input` holds is the start of the next request (whole ones are answered
    /// as soon as they are read), so another server can take over from here with it.
    fn at_request_boundary(&self) -> bool {
        !self.closing && !self.done && self.body_left == 0 && self.written == self.output.len()
    }

    /// Reads what is there, answers every whole request, writes what it can.
    fn on_ready(&mut self, handler: &mut impl Handler) -> io::Result<()> {
        if !self.closing {
            self.read_and_answer(handler)?;
        }
        self.write_out()?;
        if self.closing && self.written == self.output.len() {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
            self.done = true;
        }
        Ok(())
    }

    fn read_and_answer(&mut self, handler: &mut impl Handler) -> io::Result<()> {
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    // The client is done sending; finish what it asked for, then close.
                    self.closing = true;
                    break;
                }
                Ok(n) => self.input.extend_from_slice(&chunk[..n]),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        while !self.closing && self.answer_one(handler) {}
        Ok(())
    }

    /// Whether this connection may stay open after its response: while the handler allows
    /// keep-alive, and while the worker drains too if the primary can take the connection
    /// at the next request boundary (then its client never sees it close: the next request
    /// is answered by another worker).
    fn may_keep_alive(&self, handler: &impl Handler) -> bool {
        handler.keep_alive_allowed() || (!self.hand_back_refused && self.stream.can_hand_back())
    }

    /// Answers the request at the front of the input, if it is whole. Returns true if it did.
    fn answer_one(&mut self, handler: &mut impl Handler) -> bool {
        if self.body_left > 0 {
            let skipped = self.body_left.min(self.input.len());
            self.input.drain(..skipped);
            self.body_left -= skipped;
            if self.body_left > 0 {
                return false;
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let head_len = match request.parse(&self.input) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if self.input.len() <= MAX_HEAD => return false,
            Ok(httparse::Status::Partial) | Err(_) => {
                self.queue_response("400 Bad Request", "bad request\n", false, 1);
                return false;
            }
        };
        let minor = request.version.unwrap_or(0);
        let keep_alive = wants_keep_alive(minor, request.headers) && self.may_keep_alive(handler);
        let body_len = content_length(request.headers);
        let path = request.path.unwrap_or("/").to_owned();
        self.input.drain(..head_len);
        self.body_left = body_len;
        // A handler that panics loses its own request, not every connection of the process.
        let respond = std::panic::AssertUnwindSafe(|| handler.respond(&path));
        let Ok(body) = std::panic::catch_unwind(respond) else {
            handler.on_panic();
            self.closing = true;
            return false;
        };
        self.answered += 1;
        let keep_alive = keep_alive && self.may_keep_alive(handler);
        self.queue_response("200 OK", &body, keep_alive, minor);
        !self.closing
    }

    fn queue_response(&mut self, status: &str, body: &str, keep_alive: bool, minor: u8) {
        let connection = if keep_alive { "keep-alive" } else { "close" };
        let _ = write!(
            self.output,
            "HTTP/1.{minor} {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
            body.len()
        );
        if !keep_alive {
            self.closing = true;
        }
    }

    fn write_out(&mut self) -> io::Result<()> {
        while self.written < self.output.len() {
            match self.stream.write(&self.output[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        self.output.clear();
        self.written = 0;
        Ok(())
    }
}

/// HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 only when asked.
fn wants_keep_alive(minor: u8, headers: &[httparse::Header<'_>]) -> bool {
    let connection = headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("connection"))
        .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase());
    match (minor, connection.as_deref()) {
        (_, Some(value)) if value.contains("close") => false,
        (0, Some(value)) => value.contains("keep-alive"),
        (0, None) => false,
        _ => true,
    }
}

fn content_length(headers: &[httparse::Header<'_>]) -> usize {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
        .unwrap_or(0)
}

/// Burns `iterations` of CPU in a way the optimiser cannot remove: the seed's
/// `for (i < 1e7) {}` handler.
pub fn busy_work(iterations: u64) -> u64 {
    let mut acc = 0u64;
    for i in 0..iterations {
        acc = std::hint::black_box(acc.wrapping_mul(31).wrapping_add(i));
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers<'a>(pairs: &'a [(&'a str, &'a str)]) -> Vec<httparse::Header<'a>> {
        pairs
            .iter()
            .map(|(name, value)| httparse::Header {
                name,
                value: value.as_bytes(),
            })
            .collect()
    }

    #[test]
    fn keep_alive_follows_the_version_and_the_connection_header() {
        assert!(wants_keep_alive(1, &headers(&[])));
        assert!(!wants_keep_alive(1, &headers(&[("Connection", "close")])));
        assert!(!wants_keep_alive(0, &headers(&[])));
        assert!(wants_keep_alive(
            0,
            &headers(&[("connection", "Keep-Alive")])
        ));
    }

    #[test]
    fn content_length_is_read_and_defaults_to_zero() {
        assert_eq!(content_length(&headers(&[("Content-Length", " 12 ")])), 12);
        assert_eq!(content_length(&headers(&[("content-length", "x")])), 0);
        assert_eq!(content_length(&headers(&[])), 0);
    }
}
