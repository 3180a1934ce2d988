//! Heartbeats from the serving path, against a stand-in primary: sent when `Welcome` asks and
//! only then, at most once per interval, from accepts (an idle blocking one included) and
//! `Worker::heartbeat`, never from the control thread on its own.
#![allow(clippy::unwrap_used)]

mod support;

use std::io;
use std::time::{Duration, Instant};

use cluster_ipc::ListenerId;
use cluster_ipc::proto::ToPrimary;
use support::{
    FakePrimary, WAIT, connect_worker_with_heartbeats, finish, no_leak, options,
    round_robin_listener, send_batch, tcp_connections,
};

/// The next message, which must be a heartbeat; returns its `connections`.
fn expect_heartbeat(primary: &mut FakePrimary) -> u64 {
    match primary.recv().msg {
        ToPrimary::Heartbeat { connections } => connections,
        other => panic!("expected a heartbeat, got {other:?}"),
    }
}

/// Waits for a message until `deadline`; `None` if none came.
fn recv_until(primary: &mut FakePrimary, deadline: Instant) -> Option<ToPrimary> {
    match primary.channel.recv(Some(deadline)) {
        Ok(envelope) => Some(envelope.msg),
        Err(cluster_ipc::Error::TimedOut { .. }) => None,
        Err(err) => panic!("the control channel failed: {err}"),
    }
}

/// Two user messages, each sent once the one before arrived: a heartbeat the worker had been
/// asked for before the first would arrive before the second at the latest. Fails if anything
/// but the two comes.
fn expect_no_heartbeat_pending(worker: &cluster_worker::Worker, primary: &mut FakePrimary) {
    for marker in ["first", "second"] {
        worker.send(marker).unwrap();
        assert_eq!(primary.recv_user::<String>(), marker);
    }
}

/// Closes the listener and expects its `CloseListener`, with any heartbeats before it.
fn close_listener(listener: cluster_worker::Listener, primary: &mut FakePrimary, id: u64) {
    drop(listener);
    loop {
        match primary.recv().msg {
            ToPrimary::Heartbeat { .. } => {}
            ToPrimary::CloseListener { listener } => {
                assert_eq!(listener, ListenerId(id));
                return;
            }
            other => panic!("expected CloseListener, got {other:?}"),
        }
    }
}

#[test]
fn an_idle_blocking_accept_beats_once_per_interval_and_counts_the_connections_accepted() {
    no_leak(|| {
        const INTERVAL: Duration = Duration::from_millis(50);
        let connected = Instant::now();
        let (worker, mut primary) = connect_worker_with_heartbeats(options(), 50);
        let (listener, mut handoff) = round_robin_listener(&worker, &mut primary, 1, 4);
        let (_clients, fds) = tcp_connections(1);
        let started = Instant::now();
        std::thread::scope(|scope| {
            // Nothing to accept: the accept waits, and must wake to beat.
            let blocked = scope.spawn(|| listener.accept_timeout(WAIT));
            let mut beats = 0u32;
            while beats < 3 {
                assert_eq!(expect_heartbeat(&mut primary), 0);
                beats += 1;
            }
            // The first beat went at once; two more took at least two intervals.
            assert!(
                started.elapsed() >= 2 * INTERVAL,
                "three heartbeats within {:?}",
                started.elapsed()
            );
            send_batch(&mut handoff, &fds);
            let (stream, _) = blocked.join().unwrap().unwrap();
            drop(stream);
        });
        // Idle again, with one connection accepted so far: the heartbeats say so.
        let mut beats = 3u32;
        std::thread::scope(|scope| {
            let blocked = scope.spawn(|| listener.accept_timeout(Duration::from_millis(300)));
            loop {
                let connections = expect_heartbeat(&mut primary);
                beats += 1;
                assert!(connections <= 1);
                if connections == 1 {
                    break;
                }
            }
            let err = blocked.join().unwrap().unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        });
        // At most one per interval since the worker started (and one at once).
        let most = connected.elapsed().as_millis() / INTERVAL.as_millis() + 1;
        assert!(
            u128::from(beats) <= most,
            "{beats} heartbeats in {:?}",
            connected.elapsed()
        );
        close_listener(listener, &mut primary, 1);
        drop((fds, handoff));
        finish(worker, primary);
    });
}

#[test]
fn the_heartbeat_call_beats_and_neither_try_accept_nor_the_control_thread_alone_does() {
    no_leak(|| {
        const INTERVAL: Duration = Duration::from_millis(50);
        let (worker, mut primary) = connect_worker_with_heartbeats(options(), 50);
        let (listener, _handoff) = round_robin_listener(&worker, &mut primary, 2, 4);
        // No accept and no call from the application: however long the worker's own threads
        // run, nothing says the serving path is alive.
        assert_eq!(
            recv_until(&mut primary, Instant::now() + 4 * INTERVAL),
            None,
            "a heartbeat without the serving path"
        );
        // The application's event loop says it, once per turn.
        worker.heartbeat();
        assert_eq!(expect_heartbeat(&mut primary), 0);
        // A non-blocking accept does not, however long it is called: an event loop calls it
        // only when connections come, and an idle server must not look hung.
        let until = Instant::now() + 4 * INTERVAL;
        while Instant::now() < until {
            assert_eq!(
                listener.try_accept().unwrap_err().kind(),
                io::ErrorKind::WouldBlock
            );
            std::thread::sleep(INTERVAL / 10);
        }
        assert_eq!(
            recv_until(&mut primary, Instant::now() + INTERVAL),
            None,
            "a heartbeat from try_accept"
        );
        close_listener(listener, &mut primary, 2);
        finish(worker, primary);
    });
}

#[test]
fn at_most_one_heartbeat_per_interval_however_often_the_serving_path_asks() {
    no_leak(|| {
        // An interval no test outlives: after the first, none is due.
        let (worker, mut primary) = connect_worker_with_heartbeats(options(), 3_600_000);
        let (listener, _handoff) = round_robin_listener(&worker, &mut primary, 3, 4);
        worker.heartbeat();
        assert_eq!(expect_heartbeat(&mut primary), 0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        worker.heartbeat();
                        let _ = listener.try_accept();
                    }
                });
            }
        });
        assert_eq!(
            listener
                .accept_timeout(Duration::from_millis(20))
                .unwrap_err()
                .kind(),
            io::ErrorKind::TimedOut
        );
        expect_no_heartbeat_pending(&worker, &mut primary);
        close_listener(listener, &mut primary, 3);
        finish(worker, primary);
    });
}

#[test]
fn no_heartbeat_when_welcome_asks_for_none() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker_with_heartbeats(options(), 0);
        let (listener, mut handoff) = round_robin_listener(&worker, &mut primary, 4, 4);
        // Every path that would beat: a blocking accept that waits, one that gets a
        // connection, a non-blocking one, and the application's call.
        assert_eq!(
            listener
                .accept_timeout(Duration::from_millis(100))
                .unwrap_err()
                .kind(),
            io::ErrorKind::TimedOut
        );
        let (_clients, fds) = tcp_connections(1);
        send_batch(&mut handoff, &fds);
        drop(fds);
        let (stream, _) = listener.accept_timeout(WAIT).unwrap();
        assert_eq!(
            listener.try_accept().unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        for _ in 0..100 {
            worker.heartbeat();
        }
        expect_no_heartbeat_pending(&worker, &mut primary);
        drop(stream);
        close_listener(listener, &mut primary, 4);
        finish(worker, primary);
    });
}
