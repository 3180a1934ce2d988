//! Keep-alive connections outlive the worker that served them: a draining worker of the
//! example HTTP server hands its idle connections back to the primary, which gives them to
//! another worker, so the client goes on over the same connection.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;

use cluster_primary::{ListenMode, WorkerId};

use crate::support::{Harness, builder, connect, forks};

const HELLO: &str = env!("CARGO_BIN_EXE_hello");

/// One HTTP response: its status line, its `Connection` header, its body. Reads exactly the
/// response (head, then `Content-Length` bytes), so the connection stays usable.
fn read_response(stream: &mut TcpStream) -> (String, String, String) {
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            Ok(_) => panic!(
                "the connection ended in a response head: {:?}",
                String::from_utf8_lossy(&head)
            ),
            Err(err) => panic!(
                "reading a response: {err} (got {:?})",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    let head = String::from_utf8(head).expect("a text head");
    let header = |name: &str| {
        head.lines()
            .find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.eq_ignore_ascii_case(name)
                    .then(|| value.trim().to_owned())
            })
            .unwrap_or_default()
    };
    let length: usize = header("content-length").parse().expect("a content length");
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).expect("a response body");
    let status = head.lines().next().unwrap_or_default().to_owned();
    (
        status,
        header("connection"),
        String::from_utf8(body).expect("a text body"),
    )
}

/// The pid in a `handled by process.<pid>` body.
fn handled_by(body: &str) -> u32 {
    body.trim()
        .strip_prefix("handled by process.")
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("unexpected body {body:?}"))
}

/// Sends `request` (the rest of one, or a whole one and the start of the next) and reads the
/// response, which must be a keep-alive `200 OK`; returns the pid that served it.
fn exchange(client: &mut TcpStream, request: &[u8]) -> u32 {
    client.write_all(request).unwrap();
    let (status, connection, body) = read_response(client);
    assert_eq!(status, "HTTP/1.1 200 OK", "{body:?}");
    assert_eq!(connection, "keep-alive", "{body:?}");
    handled_by(&body)
}

#[test]
fn a_draining_workers_idle_keep_alive_connection_is_served_on_by_another_worker() {
    let mut cluster = Harness::start(builder(2).program(HELLO).args(["--port", "0"]));
    let addr = cluster.wait_ready()[0];
    let workers: BTreeMap<u32, WorkerId> = forks(&cluster.events())
        .into_iter()
        .map(|(worker, pid, _)| (pid, worker))
        .collect();
    assert_eq!(workers.len(), 2);

    let mut client = connect(addr);
    // A whole request and the start of the next in one write: the server reads both, answers
    // the first, and holds the second's first bytes when its worker is told to go.
    let first = exchange(
        &mut client,
        b"GET /1 HTTP/1.1\r\nHost: test\r\n\r\nGET /2 HTTP/1.1\r\nHo",
    );
    let draining = workers[&first];
    cluster.handle.disconnect(draining).unwrap();
    // It exits once its last connection is gone: handed back (or closed, which the next
    // request would show).
    let (status, after_disconnect) = cluster.wait_exit(draining);
    assert!(status.success(), "{status}");
    assert!(after_disconnect);

    // The rest of the second request, on the same connection: the other worker has it, with
    // the bytes the first one had read.
    let second = exchange(&mut client, b"st: test\r\n\r\n");
    assert_ne!(second, first, "the drained worker answered");
    assert!(workers.contains_key(&second), "{second} is not a worker");
    let third = exchange(&mut client, b"GET /3 HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(third, second);

    drop(client);
    cluster.stop();
}

#[test]
fn a_shared_listeners_idle_keep_alive_connection_is_closed_when_its_worker_drains() {
    let mut cluster = Harness::start(
        builder(2)
            .program(HELLO)
            .args(["--port", "0"])
            .mode(ListenMode::Shared),
    );
    let addr = cluster.wait_ready()[0];
    let workers: BTreeMap<u32, WorkerId> = forks(&cluster.events())
        .into_iter()
        .map(|(worker, pid, _)| (pid, worker))
        .collect();
    let mut client = connect(addr);
    let first = exchange(&mut client, b"GET / HTTP/1.1\r\nHost: test\r\n\r\n");
    let draining = workers[&first];
    cluster.handle.disconnect(draining).unwrap();
    // No primary to take it: the server closes it, as before, and the client sees the end.
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    let (status, _) = cluster.wait_exit(draining);
    assert!(status.success(), "{status}");
    cluster.stop();
}
