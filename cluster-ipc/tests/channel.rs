//! Channels in one process: fd passing, ordering under back-pressure, limits, hostile peers.
//! Every test checks that it leaves the fd table as it found it.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use cluster_ipc::proto::{
    HandoffToPrimary, HandoffToWorker, PrimaryControl, PrimaryHandoff, Protocol, ToPrimary,
    ToWorker, WorkerControl, WorkerHandoff,
};
use cluster_ipc::{
    Channel, Error, Frame, Kind, Limits, Requests, Transport, UserMessage, WorkerId, encode_raw,
};
use nix::sys::socket::{self, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType};
use support::{fd_snapshot, no_leak};

const BOTH: [Transport; 2] = [Transport::SeqPacket, Transport::Stream];

fn pair(transport: Transport) -> (Channel, Channel) {
    Channel::pair_with(transport, Limits::default()).unwrap()
}

/// A raw socket for playing a hostile peer, and a channel on the other end.
fn raw_peer(transport: Transport, limits: Limits) -> (OwnedFd, Channel) {
    let sock_type = match transport {
        Transport::SeqPacket => SockType::SeqPacket,
        Transport::Stream => SockType::Stream,
    };
    let (raw, ours) =
        socket::socketpair(AddressFamily::Unix, sock_type, None, SockFlag::SOCK_CLOEXEC).unwrap();
    (raw, Channel::from_fd(ours, limits).unwrap())
}

fn send_raw(sock: &OwnedFd, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsgs };
    let sent = socket::sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(bytes)],
        cmsgs,
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    assert_eq!(sent, bytes.len());
}

fn frame_bytes(kind: Kind, ack: Option<u64>, fd_count: usize, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_raw(
        &mut out,
        kind,
        1,
        ack,
        fd_count,
        body,
        &Limits::new(1 << 20, 253).unwrap(),
    )
    .unwrap();
    out
}

fn pipes(count: usize) -> Vec<(std::io::PipeReader, std::io::PipeWriter)> {
    (0..count).map(|_| std::io::pipe().unwrap()).collect()
}

/// Receives one frame, waiting at most five seconds.
fn recv(channel: &mut Channel) -> Result<Frame, Error> {
    channel.recv(Some(Instant::now() + Duration::from_secs(5)))
}

/// Proves each received fd is the write end of the matching pipe by writing through it.
fn prove_fds_work(received: Vec<OwnedFd>, readers: Vec<std::io::PipeReader>) {
    assert_eq!(received.len(), readers.len());
    for (i, (fd, mut reader)) in received.into_iter().zip(readers).enumerate() {
        let mut writer = std::fs::File::from(fd);
        writeln!(writer, "through fd {i}").unwrap();
        drop(writer);
        let mut text = String::new();
        reader.read_to_string(&mut text).unwrap();
        assert_eq!(text, format!("through fd {i}\n"));
    }
}

fn send_pipe_ends(transport: Transport, count: usize) {
    let limits = Limits::new(Limits::DEFAULT_MAX_FRAME_LEN, count).unwrap();
    let (mut a, mut b) = Channel::pair_with(transport, limits).unwrap();
    let (readers, writers): (Vec<_>, Vec<_>) = pipes(count).into_iter().unzip();
    let borrowed: Vec<BorrowedFd<'_>> = writers.iter().map(AsFd::as_fd).collect();
    a.send(Kind::User, None, &count, &borrowed).unwrap();
    drop(writers);
    let frame = recv(&mut b).unwrap();
    assert_eq!(frame.decode::<usize>().unwrap(), count);
    prove_fds_work(frame.fds, readers);
}

#[test]
fn one_passed_fd_works() {
    for transport in BOTH {
        no_leak(|| send_pipe_ends(transport, 1));
    }
}

#[test]
fn the_kernel_maximum_of_fds_passes_in_one_frame_and_every_one_works() {
    for transport in BOTH {
        no_leak(|| send_pipe_ends(transport, cluster_ipc::frame::KERNEL_MAX_FDS));
    }
}

#[test]
fn frames_keep_their_order_and_fds_through_a_full_socket() {
    for transport in BOTH {
        no_leak(|| {
            let (mut a, mut b) = pair(transport);
            let (reader, writer) = std::io::pipe().unwrap();
            let total = 20_000u32;
            for i in 0..total {
                // Every 1000th frame carries a copy of the pipe's write end.
                let fds = if i.is_multiple_of(1000) {
                    vec![writer.as_fd()]
                } else {
                    vec![]
                };
                a.send(Kind::User, None, &i, &fds).unwrap();
            }
            drop(writer);
            assert!(
                a.wants_write(),
                "20000 frames should overflow the socket buffer"
            );
            let mut next = 0u32;
            let deadline = Instant::now() + Duration::from_secs(10);
            while next < total {
                assert!(Instant::now() < deadline, "stuck at frame {next}");
                a.flush().unwrap();
                while let Some(frame) = b.try_recv().unwrap() {
                    assert_eq!(frame.decode::<u32>().unwrap(), next);
                    assert_eq!(frame.seq(), u64::from(next) + 1);
                    assert_eq!(frame.fds.len(), usize::from(next.is_multiple_of(1000)));
                    for fd in frame.fds {
                        write!(std::fs::File::from(fd), "{next},").unwrap();
                    }
                    next += 1;
                }
            }
            assert!(a.flush().unwrap());
            assert!(!a.wants_write());
            let mut text = String::new();
            let mut reader = reader;
            drop(a);
            reader.read_to_string(&mut text).unwrap();
            let expected: String = (0..total).step_by(1000).map(|i| format!("{i},")).collect();
            assert_eq!(text, expected);
        });
    }
}

#[test]
fn a_full_send_queue_refuses_without_breaking_the_channel() {
    no_leak(|| {
        let (mut a, mut b) = pair(Transport::SeqPacket);
        a.set_max_queued_bytes(0); // at least one frame's worth stays allowed
        let body = vec![7u8; 4096];
        let mut sent = 0u32;
        let refused = loop {
            match a.send(Kind::User, None, &body, &[]) {
                Ok(_) => sent += 1,
                Err(err) => break err,
            }
            assert!(sent < 100_000, "the queue never filled");
        };
        assert!(
            matches!(refused, Error::SendQueueFull { .. }),
            "{refused:?}"
        );
        assert!(!a.is_closed());
        let mut received = 0;
        while received < sent {
            a.flush().unwrap();
            while b.try_recv().unwrap().is_some() {
                received += 1;
            }
        }
        a.send(Kind::User, None, "still works", &[]).unwrap();
        assert_eq!(
            recv(&mut b).unwrap().decode::<String>().unwrap(),
            "still works"
        );
    });
}

#[test]
fn an_oversized_message_or_too_many_fds_is_refused_at_send_and_the_channel_stays_usable() {
    no_leak(|| {
        let limits = Limits::new(1024, 2)
            .unwrap()
            .with_max_message_len(1500)
            .unwrap();
        let (mut a, mut b) = Channel::pair_with(Transport::SeqPacket, limits).unwrap();
        let err = a.send(Kind::User, None, &vec![0u8; 2000], &[]).unwrap_err();
        assert!(
            matches!(err, Error::MessageTooLarge { max: 1500, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("1500-byte message limit"), "{err}");
        let (r, w) = std::io::pipe().unwrap();
        let fds = [r.as_fd(), w.as_fd(), r.as_fd()];
        let err = a.send(Kind::User, None, "x", &fds).unwrap_err();
        assert!(
            matches!(err, Error::TooManyFds { count: 3, max: 2 }),
            "{err:?}"
        );
        let seq = a.send(Kind::User, None, "fine", &[]).unwrap();
        assert_eq!(seq, 1, "refused frames use no sequence number");
        assert_eq!(recv(&mut b).unwrap().decode::<String>().unwrap(), "fine");
    });
}

#[test]
fn a_closed_peer_gives_closed_both_ways_and_fails_pending_requests() {
    for transport in BOTH {
        no_leak(|| {
            let (mut a, b) = pair(transport);
            let mut requests = Requests::new();
            let seq = a.send(Kind::User, None, "ping", &[]).unwrap();
            requests.register(seq, "ping", None).unwrap();
            drop(b);
            let err = recv(&mut a).unwrap_err();
            assert!(matches!(err, Error::Closed), "{err:?}");
            requests.on_closed();
            let failed = requests.poll_completion().unwrap();
            assert!(matches!(failed.outcome, Err(Error::Closed)));
            assert!(matches!(
                a.send(Kind::User, None, "x", &[]),
                Err(Error::Closed)
            ));
            assert!(a.is_closed());
        });
    }
}

#[test]
fn a_deadline_times_out_without_closing_the_channel() {
    no_leak(|| {
        let (mut a, mut b) = pair(Transport::SeqPacket);
        let err = a
            .recv(Some(Instant::now() + Duration::from_millis(20)))
            .unwrap_err();
        assert!(matches!(err, Error::TimedOut { .. }), "{err:?}");
        assert!(!a.is_closed());
        b.send(Kind::User, None, "late", &[]).unwrap();
        assert_eq!(recv(&mut a).unwrap().decode::<String>().unwrap(), "late");
    });
}

#[test]
fn call_sets_other_frames_aside_in_order() {
    no_leak(|| {
        let (mut a, mut b) = pair(Transport::SeqPacket);
        let server = std::thread::spawn(move || {
            let request = recv(&mut b).unwrap();
            b.send(Kind::User, None, "first", &[]).unwrap();
            b.send(Kind::User, Some(999), "stray reply", &[]).unwrap();
            b.send(Kind::User, Some(request.seq()), "the reply", &[])
                .unwrap();
            b.send(Kind::User, None, "after", &[]).unwrap();
            b
        });
        let reply = a.call(
            Kind::User,
            "request",
            &[],
            Some(Instant::now() + Duration::from_secs(5)),
        );
        assert_eq!(reply.unwrap().decode::<String>().unwrap(), "the reply");
        let b = server.join().unwrap();
        let rest: Vec<String> = (0..3)
            .map(|_| recv(&mut a).unwrap().decode::<String>().unwrap())
            .collect();
        assert_eq!(rest, ["first", "stray reply", "after"]);
        drop(b);
    });
}

#[test]
fn an_unknown_ack_is_dropped_and_the_known_one_completes() {
    no_leak(|| {
        let (mut a, mut b) = pair(Transport::SeqPacket);
        let mut requests = Requests::new();
        let seq = a.send(Kind::User, None, "q", &[]).unwrap();
        requests.register(seq, (), None).unwrap();
        b.send(Kind::User, Some(seq + 100), "nobody asked", &[])
            .unwrap();
        b.send(Kind::User, Some(seq), "answer", &[]).unwrap();
        b.send(Kind::User, None, "news", &[]).unwrap();
        let mut passed_through = Vec::new();
        for _ in 0..3 {
            if let Some(frame) = requests.on_frame(recv(&mut a).unwrap()) {
                passed_through.push(frame.decode::<String>().unwrap());
            }
        }
        assert_eq!(passed_through, ["news"]);
        let done = requests.poll_completion().unwrap();
        assert_eq!(done.outcome.unwrap().decode::<String>().unwrap(), "answer");
        assert!(requests.poll_completion().is_none());
    });
}

#[test]
fn channels_work_in_a_mio_loop() {
    no_leak(|| {
        use mio::{Events, Interest, Poll, Token};
        let (mut a, mut b) = pair(Transport::SeqPacket);
        let mut poll = Poll::new().unwrap();
        poll.registry()
            .register(&mut b, Token(1), Interest::READABLE)
            .unwrap();
        let total = 5000u32;
        for i in 0..total {
            a.send(Kind::User, None, &i, &[]).unwrap();
        }
        let mut events = Events::with_capacity(8);
        let mut next = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        while next < total {
            assert!(Instant::now() < deadline);
            a.flush().unwrap();
            poll.poll(&mut events, Some(Duration::from_millis(100)))
                .unwrap();
            // Drain until WouldBlock, as edge-triggered readiness requires.
            while let Some(frame) = b.try_recv().unwrap() {
                assert_eq!(frame.decode::<u32>().unwrap(), next);
                next += 1;
            }
        }
        poll.registry().deregister(&mut b).unwrap();
    });
}

fn expect_fatal(channel: &mut Channel, check: impl FnOnce(&Error) -> bool) {
    let err = recv(channel).unwrap_err();
    assert!(check(&err), "unexpected error {err:?}");
    assert!(channel.is_closed());
    assert!(matches!(recv(channel), Err(Error::Closed)));
}

/// After a fatal error the peer sees end of file.
fn peer_sees_eof(raw: &OwnedFd) {
    let mut buf = [0u8; 64];
    let n = socket::recv(raw.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT).unwrap();
    assert_eq!(n, 0);
}

#[test]
fn garbage_wrong_magic_version_or_kind_closes_the_channel() {
    let valid = frame_bytes(Kind::User, None, 0, b"x");
    let mut wrong_magic = valid.clone();
    wrong_magic[0] = b'G';
    let mut wrong_version = valid.clone();
    wrong_version[2] = 99;
    let mut unknown_kind = valid.clone();
    unknown_kind[3] = 77;
    let mut undefined_flags = valid.clone();
    undefined_flags[4] = 0x80;
    type Check = fn(&Error) -> bool;
    let cases: [(&[u8], Check); 5] = [
        (b"GET / HTTP/1.1\r\n\r\n", |e| {
            matches!(e, Error::BadMagic { .. })
        }),
        (&wrong_magic, |e| matches!(e, Error::BadMagic { .. })),
        (&wrong_version, |e| {
            matches!(e, Error::UnsupportedVersion { found: 99, .. })
        }),
        (&unknown_kind, |e| {
            matches!(e, Error::UnknownKind { kind: 77 })
        }),
        (&undefined_flags, |e| {
            matches!(e, Error::UndefinedBits { flags: 0x80, .. })
        }),
    ];
    for transport in BOTH {
        for (bytes, check) in &cases {
            no_leak(|| {
                let (raw, mut channel) = raw_peer(transport, Limits::default());
                send_raw(&raw, bytes, &[]);
                expect_fatal(&mut channel, check);
                peer_sees_eof(&raw);
            });
        }
    }
}

#[test]
fn an_oversized_length_is_refused_before_reading_the_body() {
    for transport in BOTH {
        no_leak(|| {
            let (raw, mut channel) = raw_peer(transport, Limits::default());
            let mut bytes = frame_bytes(Kind::User, None, 0, b"x");
            bytes[24..28].copy_from_slice(&(1u32 << 30).to_le_bytes());
            send_raw(&raw, &bytes, &[]);
            expect_fatal(&mut channel, |e| matches!(e, Error::FrameTooLarge { .. }));
        });
    }
}

#[test]
fn a_record_longer_than_the_limit_is_truncated_and_refused() {
    no_leak(|| {
        let (raw, mut channel) = raw_peer(Transport::SeqPacket, Limits::new(256, 4).unwrap());
        send_raw(&raw, &frame_bytes(Kind::User, None, 0, &[1; 1000]), &[]);
        expect_fatal(&mut channel, |e| {
            matches!(e, Error::RecordTruncated { max: 256 })
        });
    });
}

#[test]
fn fds_announced_but_never_sent_are_a_mismatch() {
    for transport in BOTH {
        no_leak(|| {
            let (raw, mut channel) = raw_peer(transport, Limits::default());
            send_raw(&raw, &frame_bytes(Kind::User, None, 2, b"x"), &[]);
            expect_fatal(&mut channel, |e| {
                matches!(
                    e,
                    Error::FdCountMismatch {
                        expected: 2,
                        received: 0
                    }
                )
            });
        });
    }
}

#[test]
fn more_fds_than_announced_are_a_mismatch_and_all_are_closed() {
    no_leak(|| {
        let (raw, mut channel) = raw_peer(Transport::SeqPacket, Limits::default());
        let (r, w) = std::io::pipe().unwrap();
        send_raw(
            &raw,
            &frame_bytes(Kind::User, None, 1, b"x"),
            &[r.as_fd(), w.as_fd()],
        );
        expect_fatal(&mut channel, |e| {
            matches!(
                e,
                Error::FdCountMismatch {
                    expected: 1,
                    received: 2
                }
            )
        });
    });
}

#[test]
fn truncated_control_data_closes_the_fds_that_did_arrive() {
    for transport in BOTH {
        no_leak(|| {
            // The receiver takes at most 2 fds per frame; the peer sends 6.
            let (raw, mut channel) = raw_peer(transport, Limits::new(4096, 2).unwrap());
            let (r, w) = std::io::pipe().unwrap();
            let fds = [
                r.as_fd(),
                w.as_fd(),
                r.as_fd(),
                w.as_fd(),
                r.as_fd(),
                w.as_fd(),
            ];
            send_raw(&raw, &frame_bytes(Kind::User, None, 2, b"x"), &fds);
            expect_fatal(&mut channel, |e| {
                matches!(e, Error::ControlTruncated { .. })
            });
        });
    }
}

#[test]
fn an_empty_record_reads_as_end_of_file() {
    no_leak(|| {
        let (raw, mut channel) = raw_peer(Transport::SeqPacket, Limits::default());
        send_raw(&raw, &[], &[]);
        assert!(matches!(recv(&mut channel), Err(Error::Closed)));
    });
}

#[test]
fn a_stream_that_ends_mid_frame_is_an_error() {
    no_leak(|| {
        let (raw, mut channel) = raw_peer(Transport::Stream, Limits::default());
        let bytes = frame_bytes(Kind::User, None, 0, b"hello");
        send_raw(&raw, &bytes[..bytes.len() - 2], &[]);
        drop(raw);
        expect_fatal(&mut channel, |e| matches!(e, Error::TruncatedStream { .. }));
    });
}

#[test]
fn a_stream_frame_split_across_writes_decodes_once_whole() {
    no_leak(|| {
        let (raw, mut channel) = raw_peer(Transport::Stream, Limits::default());
        let (r, w) = std::io::pipe().unwrap();
        let bytes = frame_bytes(Kind::User, None, 1, &postcard::to_stdvec("split").unwrap());
        send_raw(&raw, &bytes[..5], &[w.as_fd()]);
        drop(w);
        assert!(channel.try_recv().unwrap().is_none());
        send_raw(&raw, &bytes[5..], &[]);
        let frame = recv(&mut channel).unwrap();
        assert_eq!(frame.decode::<String>().unwrap(), "split");
        prove_fds_work(frame.fds, vec![r]);
    });
}

#[test]
fn a_planted_leak_fails_the_check() {
    let snapshot = fd_snapshot();
    let (r, w) = std::io::pipe().unwrap();
    let (opened, closed) = snapshot.difference();
    assert_eq!(
        opened.len(),
        2,
        "both pipe ends must show up as leaked: {opened:?}"
    );
    assert!(closed.is_empty());
    let leaked = snapshot.check_no_leak_within(Duration::ZERO);
    assert!(leaked.is_err(), "the leak check let a leak through");
    // Closed while the snapshot still holds the fd-table lock: closed after it, the planted
    // pipe would vanish from under another test's snapshot (CI saw it as "closed: [pipe]").
    drop((r, w));
    drop(snapshot);
}

#[test]
fn after_the_peer_stops_reading_what_it_sent_before_can_still_be_read() {
    for transport in BOTH {
        no_leak(|| {
            let (mut a, mut b) = pair(transport);
            let (r, w) = std::io::pipe().unwrap();
            b.send(Kind::User, None, "returned", &[w.as_fd()]).unwrap();
            drop(w);
            // The peer leaves the way a closing worker does: shut down, keep the fd open.
            socket::shutdown(b.as_fd().as_raw_fd(), socket::Shutdown::Both).unwrap();
            let err = a.send(Kind::User, None, "too late", &[]).unwrap_err();
            assert!(matches!(err, Error::Closed), "{err:?}");
            assert!(a.is_send_closed() && !a.is_closed());
            let frame = recv(&mut a).unwrap();
            assert_eq!(frame.decode::<String>().unwrap(), "returned");
            prove_fds_work(frame.fds, vec![r]);
            assert!(matches!(recv(&mut a), Err(Error::Closed)));
            drop(b);
        });
    }
}

/// Sends `message` from `a` and receives it at `b` in one thread, flushing and reading in
/// turn as the socket takes it.
fn round_trip(a: &mut Channel, b: &mut Channel, message: &[u8]) -> Frame {
    let deadline = Instant::now() + Duration::from_secs(20);
    a.send(Kind::User, None, message, &[]).unwrap();
    loop {
        assert!(
            Instant::now() < deadline,
            "the message did not arrive in time"
        );
        a.flush().unwrap();
        if let Some(frame) = b.try_recv().unwrap() {
            assert!(!a.wants_write(), "the whole message was read");
            return frame;
        }
    }
}

#[test]
fn a_message_much_longer_than_a_frame_arrives_whole_on_both_transports() {
    no_leak(|| {
        for transport in BOTH {
            let (mut a, mut b) = pair(transport);
            let message: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
            let frame = round_trip(&mut a, &mut b, &message);
            assert_eq!(frame.decode::<Vec<u8>>().unwrap(), message);
            // And the other way, after it: nothing is left over or out of step.
            let frame = round_trip(&mut b, &mut a, b"after");
            assert_eq!(frame.decode::<Vec<u8>>().unwrap(), b"after");
        }
    });
}

#[test]
fn a_fragmented_message_keeps_its_fds_and_its_place_among_others() {
    no_leak(|| {
        let limits = Limits::new(256, 4).unwrap();
        for transport in BOTH {
            let (mut a, mut b) = Channel::pair_with(transport, limits).unwrap();
            let (reader, writer) = std::io::pipe().unwrap();
            a.send(Kind::User, None, "first", &[]).unwrap();
            let big = vec![7u8; 5000];
            let seq = a.send(Kind::User, None, &big, &[writer.as_fd()]).unwrap();
            drop(writer);
            a.send(Kind::User, None, "last", &[]).unwrap();
            assert_eq!(recv(&mut b).unwrap().decode::<String>().unwrap(), "first");
            let frame = recv(&mut b).unwrap();
            assert_eq!(frame.seq(), seq);
            assert_eq!(frame.decode::<Vec<u8>>().unwrap(), big);
            prove_fds_work(frame.fds, vec![reader]);
            assert_eq!(recv(&mut b).unwrap().decode::<String>().unwrap(), "last");
        }
    });
}

#[test]
fn a_message_over_the_receivers_limit_closes_the_channel() {
    no_leak(|| {
        let small = Limits::default().with_max_message_len(100_000).unwrap();
        let (mut sender, receiver) = Channel::pair().unwrap();
        let mut receiver = Channel::from_fd(receiver.into_fd(), small).unwrap();
        sender
            .send(Kind::User, None, &vec![1u8; 200_000], &[])
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let err = loop {
            assert!(Instant::now() < deadline, "no error in time");
            let _ = sender.flush();
            match receiver.try_recv() {
                Ok(None) => {}
                Ok(Some(frame)) => {
                    panic!("an oversized message arrived: {} bytes", frame.body.len())
                }
                Err(err) => break err,
            }
        };
        assert!(
            matches!(err, Error::MessageTooLarge { max: 100_000, .. }),
            "{err:?}"
        );
        assert!(receiver.is_closed());
    });
}

/// A typed end `P` that receives a frame of `wrong` kind: a typed protocol error, and the
/// channel closes.
fn refuses_wrong_kind<P: Protocol>(wrong: Kind, body: &(impl serde::Serialize + ?Sized)) {
    no_leak(|| {
        let (mut raw, typed) = Channel::pair().unwrap();
        let mut typed = typed.into_protocol::<P>();
        raw.send(wrong, None, body, &[]).unwrap();
        let err = typed
            .recv(Some(Instant::now() + Duration::from_secs(5)))
            .unwrap_err();
        assert!(
            matches!(err, Error::WrongKind { found, .. } if found == wrong),
            "{err:?}"
        );
        assert!(typed.is_closed());
        assert!(matches!(
            raw.recv(Some(Instant::now() + Duration::from_secs(5))),
            Err(Error::Closed)
        ));
    });
}

#[test]
fn the_primarys_control_end_refuses_what_is_not_from_a_worker() {
    // The other direction (a message meant for the worker), a handoff message, a raw frame.
    refuses_wrong_kind::<PrimaryControl>(Kind::ToWorker, &ToWorker::Disconnect);
    refuses_wrong_kind::<PrimaryControl>(
        Kind::HandoffToPrimary,
        &HandoffToPrimary::ConnectionsAck { count: 1 },
    );
    refuses_wrong_kind::<PrimaryControl>(Kind::User, "hello");
}

#[test]
fn a_workers_control_end_refuses_what_is_not_from_the_primary() {
    refuses_wrong_kind::<WorkerControl>(Kind::ToPrimary, &ToPrimary::Disconnecting);
    refuses_wrong_kind::<WorkerControl>(
        Kind::HandoffToWorker,
        &HandoffToWorker::Connections {
            count: 0,
            peers: Vec::new(),
        },
    );
}

#[test]
fn the_primarys_handoff_end_refuses_what_is_not_a_workers_handoff_message() {
    refuses_wrong_kind::<PrimaryHandoff>(
        Kind::HandoffToWorker,
        &HandoffToWorker::Connections {
            count: 0,
            peers: Vec::new(),
        },
    );
    refuses_wrong_kind::<PrimaryHandoff>(Kind::ToPrimary, &ToPrimary::Ack);
}

#[test]
fn a_workers_handoff_end_refuses_what_is_not_the_primarys_handoff_message() {
    refuses_wrong_kind::<WorkerHandoff>(
        Kind::HandoffToPrimary,
        &HandoffToPrimary::ConnectionsReturned { count: 0 },
    );
    refuses_wrong_kind::<WorkerHandoff>(Kind::ToWorker, &ToWorker::Heartbeat);
}

#[test]
fn a_body_that_does_not_decode_as_the_channels_message_is_a_protocol_error() {
    no_leak(|| {
        let (mut raw, typed) = Channel::pair().unwrap();
        let mut typed = typed.into_protocol::<WorkerControl>();
        // The right kind, but a variant number no `ToWorker` has.
        raw.send_raw(Kind::ToWorker, None, &[200], &[]).unwrap();
        let err = typed
            .recv(Some(Instant::now() + Duration::from_secs(5)))
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Decode {
                    kind: Kind::ToWorker,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(typed.is_closed());
    });
}

#[test]
fn typed_ends_talk_to_each_other_and_carry_user_messages() {
    no_leak(|| {
        let (primary, worker) = Channel::pair().unwrap();
        let mut primary = primary.into_protocol::<PrimaryControl>();
        let mut worker = worker.into_protocol::<WorkerControl>();
        let deadline = Some(Instant::now() + Duration::from_secs(5));
        let hello = ToPrimary::Hello {
            worker_id: WorkerId(7),
            pid: 1,
            protocol_version: cluster_ipc::proto::PROTOCOL_VERSION,
        };
        let seq = worker.send(None, &hello, &[]).unwrap();
        let got = primary.recv(deadline).unwrap();
        assert_eq!(got.msg, hello);
        let user = UserMessage::encode(&("hi", 3u8), &Limits::default()).unwrap();
        primary.send(Some(seq), &ToWorker::User(user), &[]).unwrap();
        let reply = worker.recv(deadline).unwrap();
        assert_eq!(reply.ack, Some(seq));
        let ToWorker::User(user) = reply.msg else {
            panic!("expected a user message, got {:?}", reply.msg);
        };
        assert_eq!(user.decode::<(String, u8)>().unwrap(), ("hi".to_owned(), 3));
    });
}
