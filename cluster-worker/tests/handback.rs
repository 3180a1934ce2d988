//! Keep-alive connections moving between workers, against a stand-in primary: a `Resumed`
//! connection is acked like a batch of one and reads its unread bytes first; a draining
//! worker hands idle connections back with `HandBack`, and only then.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{self, IoSliceMut, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};

use cluster_ipc::ListenerId;
use cluster_ipc::proto::{
    Delivery, Envelope, HandoffToPrimary, ListenAddr, MAX_UNREAD_LEN, ToPrimary,
};
use cluster_worker::ListenMode;
use support::{
    FakePrimary, WAIT, assert_connected, connect_worker, deadline, expect_closed_by_a_bad_frame,
    finish, is_nonblocking, messages_to_end, no_leak, options, round_robin_listener, send_batch,
    send_resumed, tcp_connections,
};

/// Checks that `fd` is the server side of `client`: a byte from the client arrives on it.
fn assert_fd_of(fd: &OwnedFd, client: &mut TcpStream, tag: u8) {
    let server = TcpStream::from(fd.try_clone().unwrap());
    server.set_nonblocking(false).unwrap();
    server.set_read_timeout(Some(WAIT)).unwrap();
    client.write_all(&[tag]).unwrap();
    let mut byte = [0u8];
    (&server).read_exact(&mut byte).unwrap();
    assert_eq!(byte[0], tag);
    // Back as it came, for whoever looks next.
    server.set_nonblocking(true).unwrap();
}

/// The next control message, which must be a `HandBack`; returns it with its fds.
fn expect_hand_back(primary: &mut FakePrimary) -> (ListenerId, Vec<u8>, Vec<OwnedFd>) {
    let Envelope { msg, fds, .. } = primary.recv();
    match msg {
        ToPrimary::HandBack { listener, unread } => (listener, unread, fds),
        other => panic!("expected HandBack, got {other:?}"),
    }
}

#[test]
fn a_resumed_connection_is_acked_in_turn_and_reads_its_unread_bytes_first() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let (listener, mut handoff) = round_robin_listener(&worker, &mut primary, 1, 4);
        let (mut clients, fds) = tcp_connections(4);
        let named: SocketAddr = "192.0.2.7:4242".parse().unwrap();
        clients[1].write_all(b"world").unwrap();
        // A batch, two resumed connections, a batch: four frames, acked in this order.
        send_batch(&mut handoff, &fds[..1]);
        send_resumed(&mut handoff, &[&fds[1]], Some(named), b"hello ");
        send_resumed(&mut handoff, &[&fds[2]], None, b"abcdef");
        send_batch(&mut handoff, &fds[3..]);
        drop(fds);

        let (mut plain, _) = listener.accept_timeout(WAIT).unwrap();
        let (mut resumed, peer) = listener.accept_timeout(WAIT).unwrap();
        // The peer the primary named; the bytes the other worker read, then the socket's.
        assert_eq!(peer, named);
        assert!(
            !is_nonblocking(&resumed),
            "accept hands out blocking streams"
        );
        resumed.set_read_timeout(Some(WAIT)).unwrap();
        let mut text = [0u8; 11];
        resumed.read_exact(&mut text).unwrap();
        assert_eq!(&text, b"hello world");
        assert!(resumed.take_unread().is_empty(), "read already");

        // Non-blocking, through `&Stream` and vectored reads; no peer named: the kernel's.
        let (third, peer) = listener.try_accept().unwrap();
        assert_eq!(peer, clients[2].local_addr().unwrap());
        let (mut a, mut b) = ([0u8; 2], [0u8; 3]);
        let n = (&third)
            .read_vectored(&mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)])
            .unwrap();
        assert_eq!((n, &a, &b), (5, b"ab", b"cde"));
        let mut rest = [0u8; 8];
        assert_eq!((&third).read(&mut rest).unwrap(), 1);
        assert_eq!(rest[0], b'f');
        // Then the socket, which has nothing yet.
        assert_eq!(
            (&third).read(&mut rest).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        let (mut last, _) = listener.accept_timeout(WAIT).unwrap();

        // One ack per frame, in the order the frames came.
        assert_eq!(
            (0..4)
                .map(|_| handoff.recv(deadline()).unwrap().msg)
                .collect::<Vec<_>>(),
            vec![HandoffToPrimary::ConnectionsAck { count: 1 }; 4]
        );
        assert_connected(&mut plain, &mut clients[0], 1);
        assert_connected(&mut resumed, &mut clients[1], 2);
        assert_connected(&mut last, &mut clients[3], 4);
        assert_eq!(worker.open_connections(), 4);
        drop((plain, resumed, third, last, listener));
        primary.expect(ToPrimary::CloseListener {
            listener: ListenerId(1),
        });
        finish(worker, primary);
    });
}

#[test]
fn the_unread_bytes_can_be_taken_out_instead() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let (listener, mut handoff) = round_robin_listener(&worker, &mut primary, 1, 4);
        let (mut clients, fds) = tcp_connections(1);
        send_resumed(&mut handoff, &[&fds[0]], None, b"GET / HTTP/1.1\r\n");
        drop(fds);
        let (mut stream, _) = listener.accept_timeout(WAIT).unwrap();
        assert_eq!(stream.take_unread(), b"GET / HTTP/1.1\r\n");
        assert!(stream.take_unread().is_empty());
        // Reads go to the socket now.
        assert_connected(&mut stream, &mut clients[0], 9);
        drop((stream, listener));
        primary.expect(ToPrimary::CloseListener {
            listener: ListenerId(1),
        });
        finish(worker, primary);
    });
}

#[test]
fn a_resumed_frame_without_exactly_one_fd_closes_the_listener() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let (listener, mut handoff) = round_robin_listener(&worker, &mut primary, 6, 4);
        let (_clients, fds) = tcp_connections(2);
        send_resumed(&mut handoff, &[&fds[0], &fds[1]], None, b"x");
        // Not acked: the primary still owns both.
        expect_closed_by_a_bad_frame(&listener, &mut handoff, &mut primary, 6);
        drop((listener, fds));
        finish(worker, primary);
    });
}

#[test]
fn hand_back_is_refused_while_the_worker_runs_and_taken_once_it_drains() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let (listener, mut handoff) = round_robin_listener(&worker, &mut primary, 3, 4);
        let (mut clients, fds) = tcp_connections(2);
        send_batch(&mut handoff, &fds);
        drop(fds);
        let (first, _) = listener.accept_timeout(WAIT).unwrap();
        let (second, _) = listener.accept_timeout(WAIT).unwrap();

        // Running: the stream comes back untouched, still counted, still blocking.
        assert!(!first.can_hand_back());
        let mut first = first.hand_back(b"GET /").unwrap_err();
        assert_eq!(worker.open_connections(), 2);
        assert!(!is_nonblocking(&first));
        assert_connected(&mut first, &mut clients[0], 1);

        worker.disconnect();
        primary.expect(ToPrimary::Disconnecting);
        primary.expect(ToPrimary::CloseListener {
            listener: ListenerId(3),
        });
        assert_eq!(
            messages_to_end(&mut handoff),
            [
                HandoffToPrimary::ConnectionsAck { count: 2 },
                HandoffToPrimary::ConnectionsReturned { count: 0 }
            ]
        );

        // Draining: more unread bytes than the protocol carries are refused...
        assert!(second.can_hand_back());
        let too_long = vec![b'x'; MAX_UNREAD_LEN + 1];
        let mut second = second.hand_back(&too_long).unwrap_err();
        assert_connected(&mut second, &mut clients[1], 2);
        // ... and an idle connection is taken, with what was read of the next request.
        first.hand_back(b"GET /next HTTP/1.1\r\n").unwrap();
        assert_eq!(worker.open_connections(), 1);
        let (listener_id, unread, fds) = expect_hand_back(&mut primary);
        assert_eq!(listener_id, ListenerId(3));
        assert_eq!(unread, b"GET /next HTTP/1.1\r\n");
        let [fd] = <[OwnedFd; 1]>::try_from(fds).unwrap();
        // The same connection, non-blocking as the primary hands connections out.
        assert!(is_nonblocking(&fd));
        assert_fd_of(&fd, &mut clients[0], 3);
        // The worker closed its copy: once the primary's goes, the client sees the end.
        drop(fd);
        let mut byte = [0u8];
        assert_eq!(clients[0].read(&mut byte).unwrap(), 0);

        // The largest allowed is taken too.
        let most = vec![b'y'; MAX_UNREAD_LEN];
        second.hand_back(&most).unwrap();
        let (_, unread, fds) = expect_hand_back(&mut primary);
        assert_eq!(unread, most);
        assert_eq!(fds.len(), 1);
        assert_eq!(worker.open_connections(), 0);
        drop((fds, listener));
        finish(worker, primary);
    });
}

#[test]
fn a_resumed_stream_handed_back_again_keeps_what_it_did_not_read() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let (listener, mut handoff) = round_robin_listener(&worker, &mut primary, 2, 4);
        let (mut clients, fds) = tcp_connections(1);
        send_resumed(&mut handoff, &[&fds[0]], None, b"abcdef");
        drop(fds);
        let (mut stream, _) = listener.accept_timeout(WAIT).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut two = [0u8; 2];
        stream.read_exact(&mut two).unwrap();
        assert_eq!(&two, b"ab");
        worker.disconnect();
        primary.expect(ToPrimary::Disconnecting);
        primary.expect(ToPrimary::CloseListener {
            listener: ListenerId(2),
        });
        // What the caller read and did not answer, then what the stream had not read.
        stream.hand_back(b"AB").unwrap();
        let (_, unread, fds) = expect_hand_back(&mut primary);
        assert_eq!(unread, b"ABcdef");
        assert_fd_of(&fds[0], &mut clients[0], 5);
        drop((fds, listener, handoff));
        finish(worker, primary);
    });
}

#[test]
fn a_shared_listeners_streams_are_never_handed_back() {
    no_leak(|| {
        let socket = TcpListener::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let addr = socket.local_addr().unwrap();
        let (worker, mut primary) = connect_worker(options());
        let listener = std::thread::scope(|scope| {
            let answer = scope
                .spawn(|| primary.grant(ListenerId(4), addr, Delivery::Shared, &[socket.as_fd()]));
            let listener = worker.listen(addr, Some(ListenMode::Shared)).unwrap();
            answer.join().unwrap();
            listener
        });
        primary.expect(ToPrimary::Listening {
            listener: ListenerId(4),
            local_addr: ListenAddr::Tcp(addr),
        });
        let mut client = TcpStream::connect(addr).unwrap();
        let (stream, _) = listener.accept_timeout(WAIT).unwrap();
        worker.disconnect();
        primary.expect(ToPrimary::Disconnecting);
        primary.expect(ToPrimary::CloseListener {
            listener: ListenerId(4),
        });
        assert!(!stream.can_hand_back());
        let mut stream = stream.hand_back(b"").unwrap_err();
        assert_connected(&mut stream, &mut client, 6);
        assert_eq!(worker.open_connections(), 1);
        drop((stream, client, listener, socket));
        finish(worker, primary);
    });
}

#[test]
fn hand_back_is_refused_once_the_primary_is_gone() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let (listener, mut handoff) = round_robin_listener(&worker, &mut primary, 5, 4);
        let (mut clients, fds) = tcp_connections(1);
        send_batch(&mut handoff, &fds);
        drop(fds);
        let (stream, _) = listener.accept_timeout(WAIT).unwrap();
        drop(primary);
        assert!(worker.wait_disconnecting(WAIT));
        assert!(worker.wait_closed(WAIT));
        // Disconnecting, but nobody to take it.
        let mut stream = stream.hand_back(b"").unwrap_err();
        assert_connected(&mut stream, &mut clients[0], 7);
        drop((stream, listener, handoff, worker));
    });
}
