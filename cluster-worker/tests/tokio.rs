//! The `tokio` feature against a stand-in primary: the async twins of the listener tests
//! (acks before handing out, every connection delivered, closed on disconnect), a resumed
//! connection's unread bytes read first, `disconnected()` and async messages.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use cluster_ipc::ListenerId;
use cluster_ipc::proto::{HandoffToPrimary, ToPrimary, ToWorker};
use cluster_worker::AsyncStream;
use support::{
    WAIT, connect_worker, deadline, finish, messages_to_end, no_leak, options,
    round_robin_listener, send_batch, send_resumed, tcp_connections,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Runs `test` on a current-thread runtime with I/O and time, made and dropped inside the
/// caller's leak check.
fn block_on<T>(test: impl Future<Output = T>) -> T {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async { tokio::time::timeout(WAIT * 2, test).await.unwrap() })
}

/// Writes `tag` one way and back through an accepted async stream and its client.
async fn assert_connected(stream: &mut AsyncStream, client: &mut std::net::TcpStream, tag: u8) {
    client.write_all(&[tag]).unwrap();
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).await.unwrap();
    assert_eq!(byte[0], tag);
    stream.write_all(&[tag + 100]).await.unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    client.read_exact(&mut byte).unwrap();
    assert_eq!(byte[0], tag + 100);
}

#[test]
fn async_accept_acks_each_batch_before_handing_out_its_connections_in_order() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let (listener, mut handoff) = round_robin_listener(&worker, &mut primary, 1, 8);
        let (mut clients, fds) = tcp_connections(5);
        block_on(async {
            let listener = listener.into_async().unwrap();
            assert_eq!(
                listener.local_addr().unwrap(),
                "127.0.0.1:8000".parse::<SocketAddr>().unwrap()
            );
            // Nothing yet: accept waits (and is cancelled here without taking anything).
            let waited = tokio::time::timeout(Duration::from_millis(20), listener.accept()).await;
            assert!(waited.is_err(), "no connection was handed over yet");

            send_batch(&mut handoff, &fds[..3]);
            let mut accepted = Vec::new();
            let (first, peer) = listener.accept().await.unwrap();
            // The ack left before `accept` returned.
            let ack = handoff
                .try_recv()
                .unwrap()
                .expect("the ack precedes the stream");
            assert_eq!(ack.msg, HandoffToPrimary::ConnectionsAck { count: 3 });
            assert_eq!(peer, clients[0].local_addr().unwrap());
            accepted.push(first);
            for _ in 1..3 {
                accepted.push(listener.accept().await.unwrap().0);
            }
            // A second batch, while the first is being served.
            send_batch(&mut handoff, &fds[3..]);
            for _ in 3..5 {
                accepted.push(listener.accept().await.unwrap().0);
            }
            let ack = handoff.recv(deadline()).unwrap();
            assert_eq!(ack.msg, HandoffToPrimary::ConnectionsAck { count: 2 });
            for (i, (stream, client)) in accepted.iter_mut().zip(&mut clients).enumerate() {
                assert_eq!(
                    stream.peer_addr().unwrap(),
                    client.local_addr().unwrap(),
                    "in order"
                );
                assert_connected(stream, client, u8::try_from(i).unwrap()).await;
            }
            // Counted while open, until dropped.
            assert_eq!(worker.open_connections(), 5);
            accepted.truncate(2);
            assert_eq!(worker.open_connections(), 2);
            drop(accepted);
            assert_eq!(worker.open_connections(), 0);
            drop(listener);
        });
        drop(fds);
        primary.expect(ToPrimary::CloseListener {
            listener: ListenerId(1),
        });
        finish(worker, primary);
    });
}

#[test]
fn a_disconnect_wakes_a_waiting_async_accept_with_not_connected_and_resolves_disconnected() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let (listener, mut handoff) = round_robin_listener(&worker, &mut primary, 1, 4);
        let disconnected = worker.disconnected();
        block_on(async {
            let listener = listener.into_async().unwrap();
            let accept = listener.accept();
            let disconnect = async {
                tokio::task::yield_now().await;
                primary
                    .channel
                    .send(None, &ToWorker::Disconnect, &[])
                    .unwrap();
            };
            let (accepted, ()) = tokio::join!(accept, disconnect);
            assert_eq!(accepted.unwrap_err().kind(), io::ErrorKind::NotConnected);
            assert!(listener.is_closed());
            // Resolves: the one made before and one made after the disconnect.
            disconnected.await;
            worker.disconnected().await;
            // And stays closed.
            assert_eq!(
                listener.accept().await.unwrap_err().kind(),
                io::ErrorKind::NotConnected
            );
        });
        primary.expect(ToPrimary::CloseListener {
            listener: ListenerId(1),
        });
        assert_eq!(
            messages_to_end(&mut handoff),
            [HandoffToPrimary::ConnectionsReturned { count: 0 }]
        );
        finish(worker, primary);
    });
}

#[test]
fn an_async_stream_reads_a_resumed_connections_unread_bytes_first() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let (listener, mut handoff) = round_robin_listener(&worker, &mut primary, 1, 4);
        let (mut clients, fds) = tcp_connections(2);
        clients[0].write_all(b"world").unwrap();
        send_resumed(&mut handoff, &[&fds[0]], None, b"hello ");
        send_resumed(&mut handoff, &[&fds[1]], None, b"taken");
        drop(fds);
        block_on(async {
            let listener = listener.into_async().unwrap();
            let (mut resumed, _) = listener.accept().await.unwrap();
            let mut text = [0u8; 11];
            resumed.read_exact(&mut text).await.unwrap();
            assert_eq!(&text, b"hello world");
            assert!(resumed.take_unread().is_empty(), "read already");

            // Read in part, the rest taken out.
            let (mut other, _) = listener.accept().await.unwrap();
            let mut two = [0u8; 2];
            other.read_exact(&mut two).await.unwrap();
            assert_eq!(&two, b"ta");
            assert_eq!(other.take_unread(), b"ken");
            assert_connected(&mut other, &mut clients[1], 7).await;
            drop((resumed, other, listener));
        });
        assert_eq!(
            messages_to_end(&mut handoff)
                .into_iter()
                .take(2)
                .collect::<Vec<_>>(),
            vec![HandoffToPrimary::ConnectionsAck { count: 1 }; 2]
        );
        primary.expect(ToPrimary::CloseListener {
            listener: ListenerId(1),
        });
        finish(worker, primary);
    });
}

#[test]
fn async_messages_come_in_order_and_end_with_the_channel() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        // Sent before anyone asks for them: queued, or delivered later, in order either way.
        primary.send_user("first");
        primary.send_user("second");
        block_on(async {
            let mut messages = worker.messages();
            primary.send_user("third");
            for expected in ["first", "second", "third"] {
                let message = messages.recv().await.unwrap();
                assert_eq!(message.decode::<String>().unwrap(), expected);
            }
            worker.send("answer").unwrap();
            assert_eq!(primary.recv_user::<String>(), "answer");
            // The primary goes: the messages end, and the worker disconnects.
            let disconnected = worker.disconnected();
            drop(primary);
            assert!(messages.recv().await.is_none());
            disconnected.await;
            assert!(worker.is_disconnecting());
        });
        assert!(
            worker.wait_closed(WAIT),
            "the control thread did not finish"
        );
        drop(worker);
    });
}

#[test]
fn an_idle_async_accept_beats_once_per_interval() {
    no_leak(|| {
        const INTERVAL: Duration = Duration::from_millis(50);
        let (worker, mut primary) = support::connect_worker_with_heartbeats(options(), 50);
        let (listener, mut handoff) = round_robin_listener(&worker, &mut primary, 1, 4);
        let (_clients, fds) = tcp_connections(1);
        let started = std::time::Instant::now();
        let listener = std::thread::scope(|scope| {
            // Nothing to accept: the accept waits, and must wake to beat.
            let waiting = scope.spawn(|| {
                block_on(async {
                    let listener = listener.into_async().unwrap();
                    let accepted = listener.accept().await.map(|(stream, _)| drop(stream));
                    (accepted, listener.into_inner())
                })
            });
            for _ in 0..3 {
                match primary.recv().msg {
                    ToPrimary::Heartbeat { connections } => assert_eq!(connections, 0),
                    other => panic!("expected a heartbeat, got {other:?}"),
                }
            }
            // The first beat went at once; two more took at least two intervals.
            assert!(
                started.elapsed() >= 2 * INTERVAL,
                "three heartbeats within {:?}",
                started.elapsed()
            );
            send_batch(&mut handoff, &fds);
            let (accepted, listener) = waiting.join().unwrap();
            accepted.unwrap();
            listener
        });
        drop(listener);
        loop {
            match primary.recv().msg {
                ToPrimary::Heartbeat { .. } => {}
                ToPrimary::CloseListener { listener } => {
                    assert_eq!(listener, ListenerId(1));
                    break;
                }
                other => panic!("expected CloseListener, got {other:?}"),
            }
        }
        drop((fds, handoff));
        finish(worker, primary);
    });
}
