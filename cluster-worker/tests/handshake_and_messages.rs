//! The handshake, user messages both ways (in order, none lost, up to the message limit),
//! heartbeats, protocol errors, and the worker's lifecycle calls, against a stand-in primary
//! in the same process.
#![allow(clippy::unwrap_used)]

mod support;

use std::io;
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cluster_ipc::proto::{HandoffToWorker, PROTOCOL_VERSION, PrimaryControl, ToPrimary, ToWorker};
use cluster_ipc::{Channel, Kind, SlotId, WorkerId};
use cluster_worker::{DisconnectReason, Error, Worker};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use support::{FakePrimary, WAIT, connect_worker, finish, no_leak, options};

/// Runs `Worker::connect` against a primary that answers `Hello` with `reply`.
fn connect_with_reply(reply: ToWorker) -> Result<Worker, Error> {
    let (primary, worker_end) = Channel::pair().unwrap();
    let primary = std::thread::spawn(move || {
        let mut primary = FakePrimary::new(primary.into_protocol());
        let (hello, _) = primary.recv_control();
        primary.channel.send(Some(hello.seq), &reply, &[]).unwrap();
        primary
    });
    let worker = Worker::connect(
        worker_end.into_protocol(),
        WorkerId(1),
        SlotId(0),
        options(),
    );
    drop(primary.join().unwrap());
    worker
}

#[test]
fn the_handshake_says_who_the_worker_is_and_learns_about_the_primary() {
    no_leak(|| {
        let (primary, worker_end) = Channel::pair().unwrap();
        let primary = std::thread::spawn(move || {
            let mut primary = FakePrimary::new(primary.into_protocol());
            let hello = primary.welcome();
            (primary, hello)
        });
        let worker = Worker::connect(
            worker_end.into_protocol(),
            WorkerId(7),
            SlotId(3),
            options(),
        )
        .unwrap();
        let (primary, hello) = primary.join().unwrap();
        assert_eq!(
            hello,
            ToPrimary::Hello {
                worker_id: WorkerId(7),
                pid: std::process::id(),
                protocol_version: PROTOCOL_VERSION,
            }
        );
        assert_eq!(worker.id(), WorkerId(7));
        assert_eq!(worker.slot(), SlotId(3));
        assert_eq!(worker.primary_pid(), 4242);
        assert_eq!(
            worker.drain_timeout(),
            Duration::from_millis(support::DRAIN_MS)
        );
        assert_eq!(
            worker.max_message_len(),
            cluster_ipc::Limits::DEFAULT_MAX_MESSAGE_LEN
        );
        assert!(!worker.is_disconnecting());
        assert_eq!(worker.disconnect_reason(), None);
        assert!(worker.channel_error().is_none());
        finish(worker, primary);
    });
}

#[test]
fn a_refusal_fails_the_handshake_with_the_primarys_reason() {
    no_leak(|| {
        let err = connect_with_reply(ToWorker::Refused {
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
        let err = connect_with_reply(ToWorker::Welcome {
            primary_pid: 1,
            protocol_version: PROTOCOL_VERSION + 1,
            drain_timeout_ms: 1000,
            max_message_len: 1 << 20,
            load_reports: false,
            heartbeat_interval_ms: 0,
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
        let err = connect_with_reply(ToWorker::Ack).unwrap_err();
        assert!(matches!(err, Error::Protocol { .. }), "{err:?}");
        assert_eq!(io::Error::from(err).kind(), io::ErrorKind::InvalidData);
    });
}

#[test]
fn a_silent_primary_times_the_handshake_out() {
    no_leak(|| {
        let (primary, worker_end) = Channel::pair().unwrap();
        let timeout = Duration::from_millis(100);
        let err = Worker::connect(
            worker_end.into_protocol(),
            WorkerId(1),
            SlotId(0),
            options().handshake_timeout(timeout),
        )
        .unwrap_err();
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
        let err = Worker::connect(
            worker_end.into_protocol(),
            WorkerId(1),
            SlotId(0),
            options(),
        )
        .unwrap_err();
        assert!(matches!(err, Error::ChannelClosed), "{err:?}");
    });
}

/// Sends a heartbeat; returns its seq, which the worker's `Ack` names.
fn heartbeat(primary: &mut FakePrimary) -> u64 {
    primary
        .channel
        .send(None, &ToWorker::Heartbeat, &[])
        .unwrap()
}

/// Writes out what the primary's send queue holds, as fast as the worker reads it.
fn flush_until_sent(channel: &mut Channel<PrimaryControl>) {
    let deadline = Instant::now() + WAIT;
    while !channel.flush().unwrap() {
        assert!(Instant::now() < deadline, "the worker stopped reading");
        let mut fds = [PollFd::new(channel.as_fd(), PollFlags::POLLOUT)];
        poll(&mut fds, PollTimeout::from(100u16)).unwrap();
    }
}

#[test]
fn messages_go_both_ways() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        worker.send(&("hello", 1u32)).unwrap();
        assert_eq!(primary.recv_user::<(String, u32)>(), ("hello".into(), 1));

        assert!(worker.try_recv_message().unwrap().is_none());
        primary.send_user(&vec![1u64, 2, 3]);
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

const MANY: u32 = 5000;

/// Sends `MANY` numbered messages at once, without waiting between them, then writes out
/// what the socket did not take as the worker reads.
fn send_many(primary: &mut FakePrimary) {
    for n in 0..MANY {
        primary.send_user(&n);
    }
    flush_until_sent(&mut primary.channel);
}

#[test]
fn thousands_of_messages_from_the_primary_all_arrive_in_order() {
    no_leak(|| {
        // A short inbox: the worker stops and resumes reading many times.
        for queue_len in [16, 1024] {
            let (worker, mut primary) = connect_worker(options().message_queue_len(queue_len));
            std::thread::scope(|scope| {
                scope.spawn(|| send_many(&mut primary));
                for n in 0..MANY {
                    let message = worker.recv_message(WAIT).unwrap().expect("a message");
                    assert_eq!(message.decode::<u32>().unwrap(), n);
                }
            });
            assert!(worker.try_recv_message().unwrap().is_none());
            // Everything else the primary sends is still read.
            let seq = heartbeat(&mut primary);
            assert_eq!(primary.expect(ToPrimary::Ack).ack, Some(seq));
            finish(worker, primary);
        }
    });
}

#[test]
fn thousands_of_messages_reach_a_callback_in_order() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options().message_queue_len(16));
        let (tx, rx) = mpsc::channel();
        worker.on_message(move |message| {
            tx.send(message.decode::<u32>().unwrap()).unwrap();
        });
        send_many(&mut primary);
        for n in 0..MANY {
            assert_eq!(rx.recv_timeout(WAIT).unwrap(), n);
        }
        assert!(worker.try_recv_message().unwrap().is_none());
        finish(worker, primary);
    });
}

/// Regression: a callback set while messages were queued got only the later ones, and the
/// queued ones waited for a `recv_message` nobody made (a facade test under load saw a burst
/// stall). They go to the callback first, in order.
#[test]
fn a_callback_set_late_gets_the_queued_messages_first_in_order() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        for n in 0..10u32 {
            primary.send_user(&n);
        }
        // The control thread reads in order: once it acked this, the ten are queued.
        let seq = heartbeat(&mut primary);
        assert_eq!(primary.expect(ToPrimary::Ack).ack, Some(seq));
        let (tx, rx) = mpsc::channel();
        worker.on_message(move |message| {
            tx.send(message.decode::<u32>().unwrap()).unwrap();
        });
        for n in 10..15u32 {
            primary.send_user(&n);
        }
        for n in 0..15 {
            assert_eq!(rx.recv_timeout(WAIT).unwrap(), n);
        }
        assert!(worker.try_recv_message().unwrap().is_none());
        finish(worker, primary);
    });
}

#[test]
fn thousands_of_messages_from_the_worker_all_arrive_in_order() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        std::thread::scope(|scope| {
            let receiving = scope.spawn(|| {
                for n in 0..MANY {
                    assert_eq!(primary.recv_user::<u32>(), n);
                }
            });
            for n in 0..MANY {
                worker.send(&n).unwrap();
            }
            receiving.join().unwrap();
        });
        finish(worker, primary);
    });
}

/// Four MiB of bytes, each different from its neighbours.
fn big_message() -> Vec<u8> {
    (0..4 << 20).map(|n: u32| (n % 251) as u8).collect()
}

#[test]
fn a_four_mib_message_goes_both_ways() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let big = big_message();
        worker.send(&big).unwrap();
        assert!(
            primary.recv_user::<Vec<u8>>() == big,
            "the worker's message changed"
        );

        primary.send_user(&big);
        flush_until_sent(&mut primary.channel);
        let message = worker.recv_message(WAIT).unwrap().expect("a message");
        assert!(
            message.decode::<Vec<u8>>().unwrap() == big,
            "the primary's message changed"
        );
        finish(worker, primary);
    });
}

#[test]
fn a_message_over_the_announced_limit_is_refused_at_send_and_the_channel_goes_on() {
    no_leak(|| {
        const LIMIT: usize = 1 << 20;
        let (worker, mut primary) = support::connect_worker_with_limit(options(), LIMIT);
        assert_eq!(worker.max_message_len(), LIMIT);
        // The limit counts the message as it travels: its bytes and a few of framing.
        let err = worker.send(&vec![7u8; LIMIT]).unwrap_err();
        assert!(
            matches!(err, Error::MessageTooLarge { len, max: LIMIT } if len > LIMIT),
            "{err:?}"
        );
        assert_eq!(io::Error::from(err).kind(), io::ErrorKind::InvalidInput);
        // The channel is fine: the next message goes through, and so does one just under
        // the limit.
        worker.send("small").unwrap();
        assert_eq!(primary.recv_user::<String>(), "small");
        worker.send(&vec![7u8; LIMIT - 16]).unwrap();
        assert_eq!(primary.recv_user::<Vec<u8>>().len(), LIMIT - 16);
        finish(worker, primary);

        // Without a smaller announcement, the limit is the default one.
        let (worker, mut primary) = connect_worker(options());
        let max = cluster_ipc::Limits::DEFAULT_MAX_MESSAGE_LEN;
        let err = worker.send(&vec![0u8; max + 1]).unwrap_err();
        assert!(
            matches!(err, Error::MessageTooLarge { max: m, .. } if m == max),
            "{err:?}"
        );
        worker.send("still fine").unwrap();
        assert_eq!(primary.recv_user::<String>(), "still fine");
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
        primary.send_user("one");
        primary.send_user("two");
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
        primary.send_user(&41u32);
        assert_eq!(primary.recv_user::<u32>(), 42);
        finish(worker, primary);
    });
}

#[test]
fn a_full_inbox_stops_the_worker_reading_until_the_application_takes_messages() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options().message_queue_len(2));
        for n in 0u32..3 {
            primary.send_user(&n);
        }
        let seq = heartbeat(&mut primary);
        let no_ack_for_a_while = |primary: &mut FakePrimary| {
            let soon = Some(Instant::now() + Duration::from_millis(200));
            match primary.channel.recv(soon) {
                Err(cluster_ipc::Error::TimedOut { .. }) => {}
                other => panic!("the worker read past a full inbox: {other:?}"),
            }
        };
        // Two messages fill the inbox: the third and the heartbeat stay unread.
        no_ack_for_a_while(&mut primary);
        assert_eq!(
            worker
                .try_recv_message()
                .unwrap()
                .unwrap()
                .decode::<u32>()
                .unwrap(),
            0
        );
        // Room for one more: the third message, and the inbox is full again.
        no_ack_for_a_while(&mut primary);
        assert_eq!(
            worker
                .recv_message(WAIT)
                .unwrap()
                .unwrap()
                .decode::<u32>()
                .unwrap(),
            1
        );
        assert_eq!(primary.expect(ToPrimary::Ack).ack, Some(seq));
        assert_eq!(
            worker
                .recv_message(WAIT)
                .unwrap()
                .unwrap()
                .decode::<u32>()
                .unwrap(),
            2
        );
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
        // The primary hung up: that is an end, not a failure.
        assert!(worker.channel_error().is_none());
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
fn a_frame_that_does_not_belong_on_the_control_channel_closes_it() {
    no_leak(|| {
        // A handoff socket's message, and a message of the other direction.
        for kind in [Kind::HandoffToWorker, Kind::ToPrimary] {
            let (worker, primary) = connect_worker(options());
            let mut raw: Channel = primary.channel.into_protocol();
            let batch = HandoffToWorker::Connections {
                count: 0,
                peers: Vec::new(),
            };
            let sent = match kind {
                Kind::HandoffToWorker => raw.send(kind, None, &batch, &[]),
                _ => raw.send(kind, None, &ToPrimary::Disconnecting, &[]),
            };
            sent.unwrap();
            assert!(worker.wait_disconnecting(WAIT));
            assert_eq!(
                worker.disconnect_reason(),
                Some(DisconnectReason::ChannelClosed)
            );
            assert!(worker.wait_closed(WAIT));
            let err = worker.channel_error().expect("a protocol error");
            assert!(
                matches!(
                    *err,
                    cluster_ipc::Error::WrongKind { expected: Kind::ToWorker, found } if found == kind
                ),
                "{err:?}"
            );
            assert!(matches!(worker.send("late"), Err(Error::ChannelClosed)));
            // The worker hung up on the primary.
            assert!(matches!(
                raw.recv(support::deadline()),
                Err(cluster_ipc::Error::Closed)
            ));
        }
    });
}

#[test]
fn unexpected_messages_from_the_primary_are_ignored() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let welcome_again = ToWorker::Welcome {
            primary_pid: 1,
            protocol_version: PROTOCOL_VERSION,
            drain_timeout_ms: 1,
            max_message_len: 1,
            load_reports: false,
            heartbeat_interval_ms: 0,
        };
        primary.channel.send(None, &welcome_again, &[]).unwrap();
        // A grant nobody asked for, with its fd: the worker must not keep it.
        let (_peer, stray) = Channel::pair().unwrap();
        let grant = ToWorker::ListenGranted(cluster_ipc::proto::ListenGranted {
            listener: cluster_ipc::ListenerId(9),
            local_addr: cluster_ipc::proto::ListenAddr::Tcp("127.0.0.1:1".parse().unwrap()),
            delivery: cluster_ipc::proto::Delivery::Shared,
        });
        primary
            .channel
            .send(None, &grant, &[stray.as_fd()])
            .unwrap();
        drop(stray);
        primary.channel.send(None, &ToWorker::Ack, &[]).unwrap();
        let seq = heartbeat(&mut primary);
        assert_eq!(primary.expect(ToPrimary::Ack).ack, Some(seq));
        assert!(!worker.is_disconnecting());
        assert_eq!(
            worker.drain_timeout(),
            Duration::from_millis(support::DRAIN_MS)
        );
        worker.send("still here").unwrap();
        assert_eq!(primary.recv_user::<String>(), "still here");
        finish(worker, primary);
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
        primary.expect(ToPrimary::Disconnecting);
        let err = worker
            .listen("127.0.0.1:0".parse().unwrap(), None)
            .unwrap_err();
        assert!(matches!(err, Error::Disconnecting), "{err:?}");
        assert_eq!(io::Error::from(err).kind(), io::ErrorKind::NotConnected);
        // Messages still flow while the worker drains.
        worker.send("still here").unwrap();
        assert_eq!(primary.recv_user::<String>(), "still here");
        finish(worker, primary);
    });
}

#[test]
fn the_primarys_disconnect_is_not_echoed() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        primary
            .channel
            .send(None, &ToWorker::Disconnect, &[])
            .unwrap();
        assert!(worker.wait_disconnecting(WAIT));
        assert_eq!(worker.disconnect_reason(), Some(DisconnectReason::Primary));
        // The next thing the primary hears is the answer to this, not `Disconnecting`.
        worker.send("after").unwrap();
        assert_eq!(primary.recv_user::<String>(), "after");
        finish(worker, primary);
    });
}

#[test]
fn retire_asks_the_primary_then_disconnects() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        std::thread::scope(|scope| {
            let retire = scope.spawn(|| worker.retire());
            let request = primary.expect(ToPrimary::Retire);
            assert!(!worker.is_disconnecting(), "must wait for the ack");
            primary
                .channel
                .send(Some(request.seq), &ToWorker::Ack, &[])
                .unwrap();
            retire.join().unwrap().unwrap();
        });
        assert_eq!(worker.disconnect_reason(), Some(DisconnectReason::Retired));
        primary.expect(ToPrimary::Disconnecting);
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
        primary.expect(ToPrimary::Retire);
        primary.expect(ToPrimary::Disconnecting);
        finish(worker, primary);
    });
}

#[test]
fn heartbeats_are_answered() {
    no_leak(|| {
        let (worker, mut primary) = connect_worker(options());
        let seq = heartbeat(&mut primary);
        assert_eq!(primary.expect(ToPrimary::Ack).ack, Some(seq));
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
        let patience = Duration::from_millis(200);
        let (worker, mut primary) = connect_worker(options().request_timeout(patience));
        let body = vec![0xA5u8; 60_000];
        let mut sent = 0u32;
        let (refusal, waited) = loop {
            assert!(sent < 10_000, "the queue never filled");
            let started = Instant::now();
            match worker.send(&(sent, &body)) {
                Ok(()) => sent += 1,
                Err(err) => break (err, started.elapsed()),
            }
        };
        assert!(
            matches!(refusal, Error::SendQueueFull { .. }),
            "{refusal:?}"
        );
        assert!(waited >= patience, "send gave up after {waited:?}");
        assert_eq!(io::Error::from(refusal).kind(), io::ErrorKind::WouldBlock);
        // Everything accepted arrives, in order, once the primary reads.
        for n in 0..sent {
            let (got, got_body): (u32, Vec<u8>) = primary.recv_user();
            assert_eq!(got, n);
            assert_eq!(got_body.len(), body.len());
        }
        worker.send(&(sent, &body)).unwrap();
        let (got, _): (u32, Vec<u8>) = primary.recv_user();
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
        primary.send_user(&0u32);
        primary.send_user(&1u32);
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), 1);
        let seq = heartbeat(&mut primary);
        assert_eq!(primary.expect(ToPrimary::Ack).ack, Some(seq));
        finish(worker, primary);
    });
}
