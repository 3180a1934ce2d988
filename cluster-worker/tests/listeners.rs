//! Round-robin and shared listeners against a stand-in primary, with real TCP connections.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use cluster_ipc::proto::{
    Delivery, HandoffToPrimary, HandoffToWorker, ListenAddr, PeerAddr, PrimaryHandoff, ToPrimary,
    ToWorker,
};
use cluster_ipc::{Channel, Kind, ListenerId};
use cluster_worker::{Error, ListenMode, Listener, Worker};
use support::{
    FakePrimary, WAIT, assert_connected, connect_worker, deadline, expect_closed_by_a_bad_frame,
    finish, is_nonblocking, messages_to_end, no_leak, options, read_to_end, round_robin_listener,
    send_batch, send_batch_with_peers, tcp_connections, wait_until_blocked,
};

fn handoff_message(handoff: &mut Channel<PrimaryHandoff>) -> HandoffToPrimary {
    handoff.recv(deadline()).unwrap().msg
}

fn current_tid() -> i32 {
    nix::unistd::gettid().as_raw()
}

#[test]
fn round_robin_acks_each_batch_before_handing_out_its_connections_in_order() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let (listener, mut handoff) = round_robin_listener(&worker, &mut primary, 1, 4);
        assert!(listener.is_round_robin());
        assert_eq!(
            listener.local_addr().unwrap(),
            "127.0.0.1:8000".parse::<SocketAddr>().unwrap()
        );
        let (mut clients, fds) = tcp_connections(3);
        send_batch(&mut handoff, &fds);
        drop(fds);

        let (mut first, peer) = listener.accept_timeout(WAIT).unwrap();
        // The ack left before `accept` returned: it is already waiting, no need to wait.
        let ack = handoff
            .try_recv()
            .unwrap()
            .expect("the ack precedes the stream");
        assert_eq!(ack.msg, HandoffToPrimary::ConnectionsAck { count: 3 });
        assert_eq!(peer, clients[0].local_addr().unwrap());
        assert!(!is_nonblocking(&first), "accept hands out blocking streams");
        assert_connected(&mut first, &mut clients[0], 1);

        let (mut second, peer) = listener.accept_timeout(WAIT).unwrap();
        assert_eq!(peer, clients[1].local_addr().unwrap());
        assert_connected(&mut second, &mut clients[1], 2);
        let (mut third, _) = listener.try_accept().unwrap();
        assert!(
            is_nonblocking(&third),
            "try_accept hands out non-blocking streams"
        );
        third.set_nonblocking(false).unwrap();
        assert_connected(&mut third, &mut clients[2], 3);
        // One batch, one ack.
        assert!(handoff.try_recv().unwrap().is_none());
        assert_eq!(
            listener.try_accept().unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );

        // Streams are counted while open.
        assert_eq!(worker.open_connections(), 3);
        drop(first);
        assert_eq!(worker.open_connections(), 2);
        let tcp = second.into_tcp();
        assert_eq!(worker.open_connections(), 1);
        assert!(!worker.wait_idle(Instant::now() + Duration::from_millis(10)));
        drop(third);
        assert!(worker.wait_idle(Instant::now() + WAIT));
        assert_eq!(worker.open_connections(), 0);
        drop(tcp);

        // A second batch comes only when the first is served; it is acked on its own.
        let (_more_clients, fds) = tcp_connections(2);
        send_batch(&mut handoff, &fds[..1]);
        send_batch(&mut handoff, &fds[1..]);
        drop(fds);
        let (a, _) = listener.accept_timeout(WAIT).unwrap();
        assert_eq!(
            handoff_message(&mut handoff),
            HandoffToPrimary::ConnectionsAck { count: 1 }
        );
        assert!(
            handoff.try_recv().unwrap().is_none(),
            "the second batch waits"
        );
        let (b, _) = listener.accept_timeout(WAIT).unwrap();
        assert_eq!(
            handoff_message(&mut handoff),
            HandoffToPrimary::ConnectionsAck { count: 1 }
        );
        drop((a, b));

        drop(listener);
        primary.expect(ToPrimary::CloseListener {
            listener: ListenerId(1),
        });
        finish(worker, primary);
    });
}

#[test]
fn closing_returns_the_connections_not_handed_out_then_hangs_up() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let (listener, mut handoff) = round_robin_listener(&worker, &mut primary, 5, 8);
        let (mut clients, fds) = tcp_connections(3);
        send_batch(&mut handoff, &fds);
        drop(fds);
        let (served, _) = listener.accept_timeout(WAIT).unwrap();

        listener.close();
        assert!(listener.is_closed());
        let err = listener.accept_timeout(WAIT).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotConnected);
        let envelopes = read_to_end(&mut handoff);
        let messages: Vec<&HandoffToPrimary> = envelopes.iter().map(|e| &e.msg).collect();
        assert_eq!(
            messages,
            [
                &HandoffToPrimary::ConnectionsAck { count: 3 },
                &HandoffToPrimary::ConnectionsReturned { count: 2 },
            ]
        );
        // The returned fds are the two connections never served, in order, still working.
        let returned = envelopes.into_iter().nth(1).unwrap();
        for (fd, (client, tag)) in returned
            .fds
            .into_iter()
            .zip(clients.iter_mut().skip(1).zip([7, 8]))
        {
            let server = TcpStream::from(fd);
            server.set_nonblocking(false).unwrap();
            server.set_read_timeout(Some(WAIT)).unwrap();
            assert_eq!(server.peer_addr().unwrap(), client.local_addr().unwrap());
            client.write_all(&[tag]).unwrap();
            let mut byte = [0u8];
            (&server).read_exact(&mut byte).unwrap();
            assert_eq!(byte[0], tag);
        }
        primary.expect(ToPrimary::CloseListener {
            listener: ListenerId(5),
        });
        // Closing is the listener's business: the worker goes on.
        assert!(!worker.is_disconnecting());
        drop(served);
        drop(listener);
        finish(worker, primary);
    });
}

#[test]
fn closing_lets_go_of_batches_it_never_read_while_the_listener_lives_on() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let (listener, mut handoff) = round_robin_listener(&worker, &mut primary, 5, 8);
        let (mut clients, fds) = tcp_connections(2);
        // Two batches; the worker reads only the first (its FIFO empties on the accept).
        send_batch(&mut handoff, &fds[..1]);
        send_batch(&mut handoff, &fds[1..]);
        // From here on the unread batch holds the only copy of the second connection (a real
        // primary would give its own to another worker, which closes it when done).
        drop(fds);
        let (served, _) = listener.accept_timeout(WAIT).unwrap();

        listener.close();
        assert_eq!(
            messages_to_end(&mut handoff),
            [
                HandoffToPrimary::ConnectionsAck { count: 1 },
                HandoffToPrimary::ConnectionsReturned { count: 0 },
            ]
        );
        // The listener is still alive, but the connection it never read is closed: its
        // client sees the end of the stream instead of waiting for ever.
        clients[1].set_read_timeout(Some(WAIT)).unwrap();
        let mut byte = [0u8];
        assert_eq!(clients[1].read(&mut byte).unwrap(), 0);
        primary.expect(ToPrimary::CloseListener {
            listener: ListenerId(5),
        });
        drop(served);
        drop(listener);
        finish(worker, primary);
    });
}

#[test]
fn disconnect_wakes_a_blocked_accept_and_ends_incoming() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let (listener, mut handoff) = round_robin_listener(&worker, &mut primary, 2, 4);
        let (second, mut second_handoff) = round_robin_listener(&worker, &mut primary, 3, 4);
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            let blocked = scope.spawn(|| {
                tid_tx.send(current_tid()).unwrap();
                listener.accept_timeout(WAIT)
            });
            let looping = scope.spawn(|| second.incoming().count());
            wait_until_blocked(tid_rx.recv_timeout(WAIT).unwrap());
            let started = Instant::now();
            worker.disconnect();
            let err = blocked.join().unwrap().unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::NotConnected);
            assert!(started.elapsed() < WAIT, "the blocked accept woke at once");
            assert_eq!(looping.join().unwrap(), 0);
        });
        assert!(worker.is_disconnecting());
        primary.expect(ToPrimary::Disconnecting);
        let mut closed: Vec<ToPrimary> = (0..2).map(|_| primary.recv_control().1).collect();
        closed.sort_by_key(|message| format!("{message:?}"));
        assert_eq!(
            closed,
            [
                ToPrimary::CloseListener {
                    listener: ListenerId(2)
                },
                ToPrimary::CloseListener {
                    listener: ListenerId(3)
                },
            ]
        );
        for handoff in [&mut handoff, &mut second_handoff] {
            assert_eq!(
                messages_to_end(handoff),
                [HandoffToPrimary::ConnectionsReturned { count: 0 }]
            );
        }
        // Dropping a listener the disconnect closed says nothing more.
        drop((listener, second));
        worker.send("next").unwrap();
        assert_eq!(primary.recv_user::<String>(), "next");
        finish(worker, primary);
    });
}

#[test]
fn the_primarys_disconnect_and_the_channels_end_close_listeners_too() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let (listener, mut handoff) = round_robin_listener(&worker, &mut primary, 1, 4);
        primary
            .channel
            .send(None, &ToWorker::Disconnect, &[])
            .unwrap();
        assert_eq!(listener.incoming().count(), 0);
        primary.expect(ToPrimary::CloseListener {
            listener: ListenerId(1),
        });
        assert_eq!(read_to_end(&mut handoff).len(), 1);
        drop(listener);
        finish(worker, primary);

        let (worker, mut primary) = connect_worker(options());
        let (listener, mut handoff) = round_robin_listener(&worker, &mut primary, 1, 4);
        let (_clients, fds) = tcp_connections(2);
        send_batch(&mut handoff, &fds);
        drop(fds);
        let (stream, _) = listener.accept_timeout(WAIT).unwrap();
        drop(primary);
        assert!(worker.wait_disconnecting(WAIT));
        assert_eq!(listener.incoming().count(), 0);
        assert!(worker.wait_closed(WAIT));
        // The primary is gone: the handoff socket still gets the close, in order.
        assert_eq!(
            messages_to_end(&mut handoff),
            [
                HandoffToPrimary::ConnectionsAck { count: 2 },
                HandoffToPrimary::ConnectionsReturned { count: 1 }
            ]
        );
        // Open connections outlive the disconnect.
        assert_eq!(worker.open_connections(), 1);
        drop(stream);
        drop((listener, worker));
    });
}

#[test]
fn a_malformed_batch_closes_the_listener_and_leaves_the_fds_to_the_primary() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let (listener, mut handoff) = round_robin_listener(&worker, &mut primary, 9, 4);
        let (_clients, fds) = tcp_connections(1);
        handoff
            .send(
                None,
                &HandoffToWorker::Connections {
                    count: 2,
                    peers: Vec::new(),
                },
                &[fds[0].as_fd()],
            )
            .unwrap();
        expect_closed_by_a_bad_frame(&listener, &mut handoff, &mut primary, 9);
        drop((listener, fds));
        finish(worker, primary);
    });
}

#[test]
fn a_frame_that_does_not_belong_on_a_handoff_socket_closes_the_listener() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let (listener, handoff) = round_robin_listener(&worker, &mut primary, 6, 4);
        // A control-channel message, where only connection batches belong.
        let mut raw: Channel = handoff.into_protocol();
        raw.send(Kind::ToWorker, None, &ToWorker::Heartbeat, &[])
            .unwrap();
        let err = listener.accept_timeout(WAIT).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        let err = err
            .into_inner()
            .and_then(|inner| inner.downcast::<Error>().ok())
            .expect("the worker's own error");
        assert!(
            matches!(
                *err,
                Error::Ipc(cluster_ipc::Error::WrongKind {
                    expected: Kind::HandoffToWorker,
                    found: Kind::ToWorker,
                })
            ),
            "{err:?}"
        );
        assert!(listener.is_closed());
        assert_eq!(
            listener.try_accept().unwrap_err().kind(),
            io::ErrorKind::NotConnected
        );
        // The worker let go of the socket, and told the primary over the control channel.
        assert!(matches!(
            raw.recv(deadline()),
            Err(cluster_ipc::Error::Closed)
        ));
        primary.expect(ToPrimary::CloseListener {
            listener: ListenerId(6),
        });
        // Only the listener is gone: the worker goes on.
        assert!(!worker.is_disconnecting());
        worker.send("next").unwrap();
        assert_eq!(primary.recv_user::<String>(), "next");
        drop(listener);
        finish(worker, primary);
    });
}

#[test]
fn a_refused_listen_is_an_io_error_of_the_errnos_kind() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        std::thread::scope(|scope| {
            let answer = scope.spawn(|| primary.refuse(libc::EADDRINUSE));
            let err = worker
                .listen("127.0.0.1:80".parse().unwrap(), None)
                .unwrap_err();
            answer.join().unwrap();
            assert!(
                matches!(
                    err,
                    Error::ListenRefused {
                        errno: libc::EADDRINUSE,
                        ..
                    }
                ),
                "{err:?}"
            );
            assert_eq!(io::Error::from(err).kind(), io::ErrorKind::AddrInUse);
        });
        finish(worker, primary);
    });
}

#[test]
fn listens_on_port_zero_are_counted_and_others_use_index_zero() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        for (addr, index, mode) in [
            ("127.0.0.1:0", 0, None),
            ("127.0.0.1:0", 1, Some(ListenMode::Shared)),
            ("127.0.0.1:8080", 0, Some(ListenMode::RoundRobin)),
            ("[::1]:0", 2, None),
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            std::thread::scope(|scope| {
                let answer = scope.spawn(|| primary.refuse(libc::EACCES));
                let err = worker.listen(addr, mode).unwrap_err();
                assert_eq!(io::Error::from(err).kind(), io::ErrorKind::PermissionDenied);
                let request = answer.join().unwrap();
                assert_eq!(request.addr, ListenAddr::Tcp(addr));
                assert_eq!(request.index, index);
                assert_eq!(request.mode, mode);
            });
        }
        finish(worker, primary);
    });
}

#[test]
fn grants_the_worker_cannot_use_are_handed_back() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let addr: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        let (_a, b) = Channel::pair().unwrap();
        let fd = b.into_fd();
        let cases: [(Delivery, &[std::os::fd::BorrowedFd<'_>]); 3] = [
            (Delivery::ReusePort, &[fd.as_fd()]),
            (Delivery::Handoff { window: 1 }, &[]),
            // A handoff socket where a listening TCP socket belongs.
            (Delivery::Shared, &[fd.as_fd()]),
        ];
        for (n, (delivery, fds)) in cases.into_iter().enumerate() {
            let id = ListenerId(n as u64);
            let err = std::thread::scope(|scope| {
                let answer = scope.spawn(|| primary.grant(id, addr, delivery, fds));
                let err = worker.listen(addr, None).unwrap_err();
                answer.join().unwrap();
                err
            });
            assert!(matches!(err, Error::Protocol { .. }), "{err:?}");
            primary.expect(ToPrimary::CloseListener { listener: id });
        }
        drop(fd);
        finish(worker, primary);
    });
}

#[test]
fn a_listener_is_a_mio_source() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let (mut listener, mut handoff) = round_robin_listener(&worker, &mut primary, 1, 4);
        let mut poll = mio::Poll::new().unwrap();
        let mut events = mio::Events::with_capacity(4);
        poll.registry()
            .register(&mut listener, mio::Token(7), mio::Interest::READABLE)
            .unwrap();
        let (_clients, fds) = tcp_connections(2);
        send_batch(&mut handoff, &fds);
        drop(fds);
        poll.poll(&mut events, Some(WAIT)).unwrap();
        assert!(events.iter().any(|event| event.token() == mio::Token(7)));
        let mut streams = Vec::new();
        loop {
            match listener.try_accept() {
                Ok((stream, _)) => streams.push(stream),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) => panic!("{err}"),
            }
        }
        assert_eq!(streams.len(), 2);
        // Closing makes it readable too, and try_accept says why.
        worker.disconnect();
        poll.poll(&mut events, Some(WAIT)).unwrap();
        assert!(events.iter().any(|event| event.token() == mio::Token(7)));
        assert_eq!(
            listener.try_accept().unwrap_err().kind(),
            io::ErrorKind::NotConnected
        );
        poll.registry().deregister(&mut listener).unwrap();
        drop((streams, listener, poll));
        finish(worker, primary);
    });
}

/// A listening socket as a primary shares it: bound, listening, non-blocking.
fn shared_socket() -> TcpListener {
    let socket = TcpListener::bind("127.0.0.1:0").unwrap();
    socket.set_nonblocking(true).unwrap();
    socket
}

fn shared_listener(
    worker: &Worker,
    primary: &mut FakePrimary,
    socket: &TcpListener,
    id: u64,
) -> Listener {
    let addr = socket.local_addr().unwrap();
    let listener = std::thread::scope(|scope| {
        let answer = scope
            .spawn(|| primary.grant(ListenerId(id), addr, Delivery::Shared, &[socket.as_fd()]));
        let listener = worker.listen(addr, Some(ListenMode::Shared)).unwrap();
        answer.join().unwrap();
        listener
    });
    primary.expect(ToPrimary::Listening {
        listener: ListenerId(id),
        local_addr: ListenAddr::Tcp(addr),
    });
    listener
}

#[test]
fn shared_listeners_in_two_workers_accept_on_one_socket() {
    no_leak(|| {
        let socket = shared_socket();
        let addr = socket.local_addr().unwrap();
        let (worker_a, mut primary_a) = connect_worker(options());
        let (worker_b, mut primary_b) = connect_worker(options());
        let a = shared_listener(&worker_a, &mut primary_a, &socket, 1);
        let b = shared_listener(&worker_b, &mut primary_b, &socket, 1);
        assert!(!a.is_round_robin());

        let mut clients: Vec<TcpStream> =
            (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let (mut from_a, peer_a) = a.accept_timeout(WAIT).unwrap();
        let (mut from_b, peer_b) = b.accept_timeout(WAIT).unwrap();
        assert!(!is_nonblocking(&from_a));
        let mut peers = [peer_a, peer_b];
        peers.sort();
        let mut expected: Vec<SocketAddr> =
            clients.iter().map(|c| c.local_addr().unwrap()).collect();
        expected.sort();
        assert_eq!(peers, expected[..]);
        let a_index = clients
            .iter()
            .position(|c| c.local_addr().unwrap() == peer_a)
            .unwrap();
        let (first, second) = clients.split_at_mut(1);
        let (client_a, client_b) = if a_index == 0 {
            (&mut first[0], &mut second[0])
        } else {
            (&mut second[0], &mut first[0])
        };
        assert_connected(&mut from_a, client_a, 1);
        assert_connected(&mut from_b, client_b, 2);
        assert_eq!(worker_a.open_connections(), 1);
        assert_eq!(
            a.try_accept().unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );

        // Closing one worker's listener wakes its blocked accept; the other goes on, and
        // gets the next connection (the closed one no longer takes exclusive wake-ups).
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            let blocked = scope.spawn(|| {
                tid_tx.send(current_tid()).unwrap();
                a.accept_timeout(WAIT)
            });
            let waiting = scope.spawn(|| b.accept_timeout(WAIT));
            wait_until_blocked(tid_rx.recv_timeout(WAIT).unwrap());
            worker_a.disconnect();
            let err = blocked.join().unwrap().unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::NotConnected);
            let late = TcpStream::connect(addr).unwrap();
            let (stream, peer) = waiting.join().unwrap().unwrap();
            assert_eq!(peer, late.local_addr().unwrap());
            drop((stream, late));
        });
        primary_a.expect(ToPrimary::Disconnecting);
        primary_a.expect(ToPrimary::CloseListener {
            listener: ListenerId(1),
        });
        assert!(
            is_nonblocking(&socket),
            "O_NONBLOCK of the shared socket is untouched"
        );

        b.close();
        primary_b.expect(ToPrimary::CloseListener {
            listener: ListenerId(1),
        });
        assert_eq!(b.incoming().count(), 0);
        drop((from_a, from_b, clients, a, b));
        finish(worker_a, primary_a);
        finish(worker_b, primary_b);
        drop(socket);
    });
}

#[test]
fn a_shared_listener_hands_out_non_blocking_streams_from_try_accept() {
    no_leak(|| {
        let socket = shared_socket();
        let (worker, mut primary) = connect_worker(options());
        let listener = shared_listener(&worker, &mut primary, &socket, 4);
        let mut poll = mio::Poll::new().unwrap();
        let mut events = mio::Events::with_capacity(4);
        let mut listener = listener;
        poll.registry()
            .register(&mut listener, mio::Token(1), mio::Interest::READABLE)
            .unwrap();
        let client = TcpStream::connect(socket.local_addr().unwrap()).unwrap();
        poll.poll(&mut events, Some(WAIT)).unwrap();
        assert!(!events.is_empty());
        let (stream, peer) = listener.try_accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        assert!(is_nonblocking(&stream));
        poll.registry().deregister(&mut listener).unwrap();
        drop((stream, client, listener, poll));
        primary.expect(ToPrimary::CloseListener {
            listener: ListenerId(4),
        });
        finish(worker, primary);
    });
}

#[test]
fn peer_addresses_from_the_primary_are_the_ones_reported_and_must_match_the_fds() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let (listener, mut handoff) = round_robin_listener(&worker, &mut primary, 1, 4);
        let (_clients, fds) = tcp_connections(2);
        // Addresses no real peer has: the worker reports what the primary said, without
        // asking the kernel.
        let named: Vec<SocketAddr> = vec![
            "192.0.2.1:1111".parse().unwrap(),
            "[2001:db8::1]:2222".parse().unwrap(),
        ];
        send_batch_with_peers(
            &mut handoff,
            &fds,
            named.iter().copied().map(PeerAddr).collect(),
        );
        drop(fds);
        let (_, first) = listener.accept_timeout(WAIT).unwrap();
        let (_, second) = listener.try_accept().unwrap();
        assert_eq!([first, second], [named[0], named[1]]);

        // A batch whose addresses do not line up with its fds is a protocol error: the
        // listener closes, and the un-acked connections stay the primary's.
        let (_clients, fds) = tcp_connections(2);
        send_batch_with_peers(&mut handoff, &fds, vec![PeerAddr(named[0])]);
        drop(fds);
        let err = listener.accept_timeout(WAIT).unwrap_err();
        assert!(listener.is_closed(), "{err}");
        assert_eq!(
            messages_to_end(&mut handoff),
            [
                HandoffToPrimary::ConnectionsAck { count: 2 },
                HandoffToPrimary::ConnectionsReturned { count: 0 }
            ]
        );
        drop(listener);
        finish(worker, primary);
    });
}
