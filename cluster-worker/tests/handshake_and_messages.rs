//! The handshake, user messages both ways, heartbeats, and the worker's lifecycle calls,
//! against a stand-in primary in the same process.
#![allow(clippy::unwrap_used)]

mod support;

use std::io;
use std::sync::mpsc;
use std::time::Duration;

use cluster_ipc::proto::{Control, PROTOCOL_VERSION};
use cluster_ipc::{Channel, Kind};
use cluster_worker::{DisconnectReason, Error, Worker};
use support::{FakePrimary, WAIT, connect_worker, finish, no_leak, options};

/// Runs `Worker::connect` against a primary that answers `Hello` with `reply`.
fn connect_with_reply(reply: Control) -> Result<Worker, Error> {
    let (primary, worker_end) = Channel::pair().unwrap();
    let primary = std::thread::spawn(move || {
        let mut primary = FakePrimary::new(primary);
        let (hello, _) = primary.recv_control();
        primary
            .channel
            .send(Kind::Control, Some(hello.seq()), &reply, &[])
            .unwrap();
        primary
    });
    let worker = Worker::connect(worker_end, 1, 0, options());
    drop(primary.join().unwrap());
    worker
}

#[test]
fn the_handshake_says_who_the_worker_is_and_learns_about_the_primary() {
    no_leak(|| {
        let (primary, worker_end) = Channel::pair().unwrap();
        let primary = std::thread::spawn(move || {
            let mut primary = FakePrimary::new(primary);
            let hello = primary.welcome();
            (primary, hello)
        });
        let worker = Worker::connect(worker_end, 7, 3, options()).unwrap();
        let (primary, hello) = primary.join().unwrap();
        assert_eq!(
            hello,
            Control::Hello {
                worker_id: 7,
                pid: std::process::id(),
                protocol_version: PROTOCOL_VERSION,
            }
        );
        assert_eq!(worker.id(), 7);
        assert_eq!(worker.slot(), 3);
        assert_eq!(worker.primary_pid(), 4242);
        assert_eq!(
            worker.drain_timeout(),
            Duration::from_millis(support::DRAIN_MS)
        );
        assert!(!worker.is_disconnecting());
        assert_eq!(worker.disconnect_reason(), None);
        finish(worker, primary);
    });
}

#[test]
fn a_refusal_fails_the_handshake_with_the_primarys_reason() {
    no_leak(|| {
        let err = connect_with_reply(Control::Refused {
            reason: "stopping".into(),
        })
        .unwrap_err();
        assert!(
            matches!(&err, Error::Refused { reason } if reason == "stopping"),
            "{err:?}"
        );
        assert_eq!(
            io::Error::from(err).kind(),
            io::ErrorKind::ConnectionRefused
        );
    });
}

#[test]
fn another_protocol_version_fails_the_handshake() {
    no_leak(|| {
        let err = connect_with_reply(Control::Welcome {
            primary_pid: 1,
            protocol_version: PROTOCOL_VERSION + 1,
            drain_timeout_ms: 1000,
        })
        .unwrap_err();
        assert!(
            matches!(err, Error::VersionMismatch { worker, primary }
                if worker == PROTOCOL_VERSION && primary == PROTOCOL_VERSION + 1),
            "{err:?}"
        );
    });
}

#[test]
fn an_unexpected_answer_to_hello_is_a_protocol_error() {
    no_leak(|| {
        let err = connect_with_reply(Control::Ack).unwrap_err();
        assert!(matches!(err, Error::Protocol { .. }), "{err:?}");
        assert_eq!(io::Error::from(err).kind(), io::ErrorKind::InvalidData);
    });
}

#[test]
fn a_silent_primary_times_the_handshake_out() {
    no_leak(|| {
        let (primary, worker_end) = Channel::pair().unwrap();
        let timeout = Duration::from_millis(100);
        let err =
            Worker::connect(worker_end, 1, 0, options().handshake_timeout(timeout)).unwrap_err();
        assert!(matches!(err, Error::HandshakeTimedOut { .. }), "{err:?}");
        assert_eq!(io::Error::from(err).kind(), io::ErrorKind::TimedOut);
        drop(primary);
    });
}

#[test]
fn a_primary_that_hangs_up_fails_the_handshake() {
    no_leak(|| {
        let (primary, worker_end) = Channel::pair().unwrap();
        drop(primary);
        let err = Worker::connect(worker_end, 1, 0, options()).unwrap_err();
        assert!(matches!(err, Error::ChannelClosed), "{err:?}");
    });
}

#[test]
fn messages_go_both_ways() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        worker.send(&("hello", 1u32)).unwrap();
        let frame = primary.recv();
        assert_eq!(frame.kind(), Kind::User);
        assert_eq!(
            frame.decode::<(String, u32)>().unwrap(),
            ("hello".into(), 1)
        );

        assert!(worker.try_recv_message().unwrap().is_none());
        primary
            .channel
            .send(Kind::User, None, &vec![1u64, 2, 3], &[])
            .unwrap();
        let message = worker.recv_message(WAIT).unwrap().unwrap();
        assert_eq!(message.decode::<Vec<u64>>().unwrap(), [1, 2, 3]);
        assert!(
            worker
                .recv_message(Duration::from_millis(10))
                .unwrap()
                .is_none()
        );
        finish(worker, primary);
    });
}

#[test]
fn a_message_over_the_frame_limit_fails_at_send() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let err = worker.send(&vec![7u8; 70_000]).unwrap_err();
        assert!(
            matches!(err, Error::MessageTooLarge { max: 65536, .. }),
            "{err:?}"
        );
        assert_eq!(io::Error::from(err).kind(), io::ErrorKind::InvalidInput);
        // The channel is fine: the next message goes through.
        worker.send("small").unwrap();
        assert_eq!(primary.recv().decode::<String>().unwrap(), "small");
        finish(worker, primary);
    });
}

#[test]
fn a_callback_takes_messages_instead_of_the_queue() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let (tx, rx) = mpsc::channel();
        worker.on_message(move |message| {
            tx.send(message.decode::<String>().unwrap()).unwrap();
        });
        primary.channel.send(Kind::User, None, "one", &[]).unwrap();
        primary.channel.send(Kind::User, None, "two", &[]).unwrap();
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), "one");
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), "two");
        assert!(worker.try_recv_message().unwrap().is_none());
        finish(worker, primary);
    });
}

#[test]
fn a_callback_can_answer_through_the_worker() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let answering = worker.clone();
        worker.on_message(move |message| {
            let n: u32 = message.decode().unwrap();
            answering.send(&(n + 1)).unwrap();
            // Calls that wait for the control thread are refused on it, not deadlocked.
            let err = answering.retire().unwrap_err();
            assert!(matches!(err, Error::OnControlThread { .. }), "{err:?}");
        });
        primary.channel.send(Kind::User, None, &41u32, &[]).unwrap();
        assert_eq!(primary.recv().decode::<u32>().unwrap(), 42);
        finish(worker, primary);
    });
}

#[test]
fn a_full_message_queue_drops_the_oldest() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options().message_queue_len(2));
        for n in 0u32..3 {
            primary.channel.send(Kind::User, None, &n, &[]).unwrap();
        }
        // The heartbeat's answer comes after the worker has handled the three messages.
        let seq = primary
            .channel
            .send(Kind::Control, None, &Control::Heartbeat, &[])
            .unwrap();
        let ack = primary.expect(Control::Ack);
        assert_eq!(ack.ack(), Some(seq));
        let first = worker.try_recv_message().unwrap().unwrap();
        let second = worker.try_recv_message().unwrap().unwrap();
        assert_eq!(first.decode::<u32>().unwrap(), 1);
        assert_eq!(second.decode::<u32>().unwrap(), 2);
        assert!(worker.try_recv_message().unwrap().is_none());
        finish(worker, primary);
    });
}

#[test]
fn the_end_of_the_channel_disconnects_and_fails_what_waits() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let (reasons, reason) = mpsc::channel();
        worker.on_disconnect(move |why| reasons.send(why).unwrap());
        std::thread::scope(|scope| {
            // A listen in flight when the primary goes fails with the channel.
            let listen = scope.spawn(|| worker.listen("127.0.0.1:0".parse().unwrap(), None));
            primary.recv_listen();
            drop(primary);
            let err = listen.join().unwrap().unwrap_err();
            assert!(matches!(err, Error::ChannelClosed), "{err:?}");
        });
        assert_eq!(
            reason.recv_timeout(WAIT).unwrap(),
            DisconnectReason::ChannelClosed
        );
        assert!(worker.wait_closed(WAIT));
        assert!(worker.is_disconnecting());
        assert!(matches!(worker.send("late"), Err(Error::ChannelClosed)));
        assert!(matches!(
            worker.recv_message(WAIT),
            Err(Error::ChannelClosed)
        ));
        assert!(worker.listen("127.0.0.1:0".parse().unwrap(), None).is_err());
        // A callback registered late runs at once.
        let (tx, rx) = mpsc::channel();
        worker.on_disconnect(move |why| tx.send(why).unwrap());
        assert_eq!(rx.try_recv().unwrap(), DisconnectReason::ChannelClosed);
        // Nothing left to do, and saying so again is harmless.
        worker.disconnect();
    });
}

#[test]
fn disconnect_tells_the_primary_first() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        worker.disconnect();
        assert!(worker.is_disconnecting());
        assert_eq!(
            worker.disconnect_reason(),
            Some(DisconnectReason::Requested)
        );
        primary.expect(Control::Disconnecting);
        let err = worker
            .listen("127.0.0.1:0".parse().unwrap(), None)
            .unwrap_err();
        assert!(matches!(err, Error::Disconnecting), "{err:?}");
        assert_eq!(io::Error::from(err).kind(), io::ErrorKind::NotConnected);
        // Messages still flow while the worker drains.
        worker.send("still here").unwrap();
        assert_eq!(primary.recv().decode::<String>().unwrap(), "still here");
        finish(worker, primary);
    });
}

#[test]
fn the_primarys_disconnect_is_not_echoed() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        primary
            .channel
            .send(Kind::Control, None, &Control::Disconnect, &[])
            .unwrap();
        assert!(worker.wait_disconnecting(WAIT));
        assert_eq!(worker.disconnect_reason(), Some(DisconnectReason::Primary));
        // The next thing the primary hears is the answer to this, not `Disconnecting`.
        worker.send("after").unwrap();
        assert_eq!(primary.recv().decode::<String>().unwrap(), "after");
        finish(worker, primary);
    });
}

#[test]
fn retire_asks_the_primary_then_disconnects() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        std::thread::scope(|scope| {
            let retire = scope.spawn(|| worker.retire());
            let request = primary.expect(Control::Retire);
            assert!(!worker.is_disconnecting(), "must wait for the ack");
            primary
                .channel
                .send(Kind::Control, Some(request.seq()), &Control::Ack, &[])
                .unwrap();
            retire.join().unwrap().unwrap();
        });
        assert_eq!(worker.disconnect_reason(), Some(DisconnectReason::Retired));
        primary.expect(Control::Disconnecting);
        finish(worker, primary);
    });
}

#[test]
fn retire_disconnects_even_without_an_answer() {
    no_leak(|| {
        let (worker, mut primary) =
            connect_worker(options().request_timeout(Duration::from_millis(100)));
        let err = worker.retire().unwrap_err();
        assert!(
            matches!(err, Error::TimedOut { op: "retire", .. }),
            "{err:?}"
        );
        assert_eq!(worker.disconnect_reason(), Some(DisconnectReason::Retired));
        primary.expect(Control::Retire);
        primary.expect(Control::Disconnecting);
        finish(worker, primary);
    });
}

#[test]
fn heartbeats_are_answered() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let seq = primary
            .channel
            .send(Kind::Control, None, &Control::Heartbeat, &[])
            .unwrap();
        assert_eq!(primary.expect(Control::Ack).ack(), Some(seq));
        finish(worker, primary);
    });
}

#[test]
fn a_process_without_the_environment_is_not_a_worker() {
    // The test harness is not started by a primary.
    assert!(!cluster_worker::is_worker());
    assert!(Worker::start(options()).unwrap().is_none());
    assert!(Worker::current().is_none());
}

#[test]
fn a_primary_that_does_not_read_pushes_back_and_nothing_is_lost() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let body = vec![0xA5u8; 60_000];
        let mut sent = 0u32;
        let refusal = loop {
            assert!(sent < 10_000, "the queue never filled");
            match worker.send(&(sent, &body)) {
                Ok(()) => sent += 1,
                Err(err) => break err,
            }
        };
        assert!(
            matches!(refusal, Error::SendQueueFull { .. }),
            "{refusal:?}"
        );
        assert_eq!(io::Error::from(refusal).kind(), io::ErrorKind::WouldBlock);
        // Everything accepted arrives, in order, once the primary reads.
        for n in 0..sent {
            let (got, got_body): (u32, Vec<u8>) = primary.recv().decode().unwrap();
            assert_eq!(got, n);
            assert_eq!(got_body.len(), body.len());
        }
        worker.send(&(sent, &body)).unwrap();
        let (got, _): (u32, Vec<u8>) = primary.recv().decode().unwrap();
        assert_eq!(got, sent);
        finish(worker, primary);
    });
}

#[test]
fn a_panicking_callback_does_not_take_the_worker_down() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let (tx, rx) = mpsc::channel();
        worker.on_message(move |message| {
            let n: u32 = message.decode().unwrap();
            assert_ne!(n, 0, "the first message makes this callback panic");
            tx.send(n).unwrap();
        });
        primary.channel.send(Kind::User, None, &0u32, &[]).unwrap();
        primary.channel.send(Kind::User, None, &1u32, &[]).unwrap();
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), 1);
        let seq = primary
            .channel
            .send(Kind::Control, None, &Control::Heartbeat, &[])
            .unwrap();
        assert_eq!(primary.expect(Control::Ack).ack(), Some(seq));
        finish(worker, primary);
    });
}
