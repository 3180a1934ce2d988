//! Property tests of the sans-IO frame codec.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use cluster_ipc::proto::{
    Delivery, HandoffToPrimary, HandoffToWorker, ListenAddr, ListenGranted, ListenMode,
    ListenRequest, PeerAddr, ToPrimary, ToWorker,
};
use cluster_ipc::{
    Decoder, Error, Frame, Kind, Limits, ListenerId, Reassembler, Status, UserMessage, WorkerId,
    encode_message, encode_raw, fragments,
};
use proptest::prelude::*;

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::User),
        Just(Kind::ToWorker),
        Just(Kind::ToPrimary),
        Just(Kind::HandoffToWorker),
        Just(Kind::HandoffToPrimary),
    ]
}

fn listen_addr() -> impl Strategy<Value = ListenAddr> {
    prop_oneof![
        any::<SocketAddr>().prop_map(ListenAddr::Tcp),
        any::<SocketAddr>().prop_map(ListenAddr::Udp),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(ListenAddr::Unix),
    ]
}

fn user_message() -> impl Strategy<Value = UserMessage> {
    proptest::collection::vec(any::<u8>(), 0..100).prop_map(UserMessage::from_bytes)
}

fn to_primary() -> impl Strategy<Value = ToPrimary> {
    prop_oneof![
        (any::<u64>(), any::<u32>(), any::<u32>()).prop_map(
            |(worker_id, pid, protocol_version)| {
                ToPrimary::Hello {
                    worker_id: WorkerId(worker_id),
                    pid,
                    protocol_version,
                }
            }
        ),
        (listen_addr(), any::<u32>()).prop_map(|(addr, index)| ToPrimary::Listen(ListenRequest {
            addr,
            mode: Some(ListenMode::RoundRobin),
            index,
        })),
        (any::<u64>(), listen_addr()).prop_map(|(id, local_addr)| ToPrimary::Listening {
            listener: ListenerId(id),
            local_addr,
        }),
        Just(ToPrimary::Disconnecting),
        Just(ToPrimary::Retire),
        user_message().prop_map(ToPrimary::User),
    ]
}

fn to_worker() -> impl Strategy<Value = ToWorker> {
    prop_oneof![
        (any::<u64>(), listen_addr(), any::<u32>()).prop_map(|(id, local_addr, window)| {
            ToWorker::ListenGranted(ListenGranted {
                listener: ListenerId(id),
                local_addr,
                delivery: Delivery::Handoff { window },
            })
        }),
        Just(ToWorker::Disconnect),
        ".*".prop_map(|reason| ToWorker::Refused { reason }),
        user_message().prop_map(ToWorker::User),
    ]
}

fn handoff_to_worker() -> impl Strategy<Value = HandoffToWorker> {
    proptest::collection::vec(any::<SocketAddr>(), 0..4).prop_map(|peers| {
        HandoffToWorker::Connections {
            count: peers.len() as u32,
            peers: peers.into_iter().map(PeerAddr).collect(),
        }
    })
}

fn handoff_to_primary() -> impl Strategy<Value = HandoffToPrimary> {
    prop_oneof![
        any::<u32>().prop_map(|count| HandoffToPrimary::ConnectionsAck { count }),
        any::<u32>().prop_map(|count| HandoffToPrimary::ConnectionsReturned { count }),
    ]
}

/// One frame to encode: its header fields, a typed body and a number of fds.
#[derive(Debug, Clone)]
struct Envelope {
    kind: Kind,
    seq: u64,
    ack: Option<u64>,
    fd_count: usize,
    body: Body,
}

#[derive(Debug, Clone, PartialEq)]
enum Body {
    ToPrimary(ToPrimary),
    ToWorker(ToWorker),
    HandoffToWorker(HandoffToWorker),
    HandoffToPrimary(HandoffToPrimary),
    Text(String),
    Numbers(Vec<u32>),
    Raw(Vec<u8>),
}

fn envelope() -> impl Strategy<Value = Envelope> {
    let body = prop_oneof![
        to_primary().prop_map(Body::ToPrimary),
        to_worker().prop_map(Body::ToWorker),
        handoff_to_worker().prop_map(Body::HandoffToWorker),
        handoff_to_primary().prop_map(Body::HandoffToPrimary),
        ".{0,200}".prop_map(Body::Text),
        proptest::collection::vec(any::<u32>(), 0..100).prop_map(Body::Numbers),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Body::Raw),
    ];
    (
        kind(),
        any::<u64>(),
        proptest::option::of(any::<u64>()),
        0usize..4,
        body,
    )
        .prop_map(|(kind, seq, ack, fd_count, body)| Envelope {
            kind,
            seq,
            ack,
            fd_count,
            body,
        })
}

fn encode(envelope: &Envelope, out: &mut Vec<u8>) {
    let limits = Limits::default();
    let Envelope {
        kind,
        seq,
        ack,
        fd_count,
        ..
    } = *envelope;
    match &envelope.body {
        Body::ToPrimary(msg) => encode_message(out, kind, seq, ack, fd_count, msg, &limits),
        Body::ToWorker(msg) => encode_message(out, kind, seq, ack, fd_count, msg, &limits),
        Body::HandoffToWorker(msg) => encode_message(out, kind, seq, ack, fd_count, msg, &limits),
        Body::HandoffToPrimary(msg) => encode_message(out, kind, seq, ack, fd_count, msg, &limits),
        Body::Text(msg) => encode_message(out, kind, seq, ack, fd_count, msg, &limits),
        Body::Numbers(msg) => encode_message(out, kind, seq, ack, fd_count, msg, &limits),
        Body::Raw(bytes) => encode_raw(out, kind, seq, ack, fd_count, bytes, &limits),
    }
    .unwrap();
}

fn decoded_body(frame: &Frame, like: &Body) -> Body {
    match like {
        Body::ToPrimary(_) => Body::ToPrimary(frame.decode().unwrap()),
        Body::ToWorker(_) => Body::ToWorker(frame.decode().unwrap()),
        Body::HandoffToWorker(_) => Body::HandoffToWorker(frame.decode().unwrap()),
        Body::HandoffToPrimary(_) => Body::HandoffToPrimary(frame.decode().unwrap()),
        Body::Text(_) => Body::Text(frame.decode().unwrap()),
        Body::Numbers(_) => Body::Numbers(frame.decode().unwrap()),
        Body::Raw(_) => Body::Raw(frame.body.clone()),
    }
}

fn dev_null_fds(count: usize) -> VecDeque<OwnedFd> {
    (0..count)
        .map(|_| std::fs::File::open("/dev/null").unwrap().into())
        .collect()
}

fn assert_matches(frame: &Frame, envelope: &Envelope) {
    assert_eq!(frame.kind(), envelope.kind);
    assert_eq!(frame.seq(), envelope.seq);
    assert_eq!(frame.ack(), envelope.ack);
    assert_eq!(frame.fds.len(), envelope.fd_count);
    assert_eq!(decoded_body(frame, &envelope.body), envelope.body);
}

/// Decodes `bytes` delivered in the given chunks, the way a stream transport would.
fn decode_in_chunks(
    bytes: &[u8],
    cuts: &[usize],
    fds: &mut VecDeque<OwnedFd>,
) -> Result<Vec<Frame>, Error> {
    let decoder = Decoder::default();
    let mut frames = Vec::new();
    let mut buffer = Vec::new();
    let mut start = 0;
    for &end in cuts.iter().chain([&bytes.len()]) {
        buffer.extend_from_slice(&bytes[start..end]);
        start = end;
        while let Status::Complete((frame, used)) = decoder.decode(&buffer, fds)? {
            buffer.drain(..used);
            frames.push(frame);
        }
    }
    assert!(buffer.is_empty(), "bytes left over: {}", buffer.len());
    Ok(frames)
}

proptest! {
    // No regression files: proptest would open them while other tests of this binary count
    // fds. A failure prints its minimal input instead.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::with_cases(256) })]

    #[test]
    fn arbitrary_envelopes_round_trip(envelope in envelope()) {
        let snapshot = support::fd_snapshot();
        let mut bytes = Vec::new();
        encode(&envelope, &mut bytes);
        let mut fds = dev_null_fds(envelope.fd_count);
        let Status::Complete((frame, used)) = Decoder::default().decode(&bytes, &mut fds).unwrap()
        else {
            panic!("a whole frame decoded as partial");
        };
        prop_assert_eq!(used, bytes.len());
        prop_assert!(fds.is_empty());
        assert_matches(&frame, &envelope);
        // A record holding exactly this frame decodes the same way.
        let record = Decoder::default().decode_record(&bytes, dev_null_fds(envelope.fd_count).into());
        assert_matches(&record.unwrap(), &envelope);
        drop((frame, fds));
        snapshot.assert_no_leak();
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        // Every test of this binary takes the fd-table lock, so the leak checks see only
        // their own fds.
        let snapshot = support::fd_snapshot();
        let mut fds = VecDeque::new();
        match Decoder::default().decode(&bytes, &mut fds) {
            Ok(Status::Partial { needed }) => prop_assert!(needed > 0),
            Ok(Status::Complete((_, used))) => prop_assert!(used <= bytes.len()),
            Err(_) => {}
        }
        let _ = Decoder::default().decode_record(&bytes, Vec::new());
        snapshot.assert_no_leak();
    }

    #[test]
    fn corrupted_frames_never_panic(
        envelope in envelope(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let snapshot = support::fd_snapshot();
        let mut bytes = Vec::new();
        encode(&envelope, &mut bytes);
        for (index, value) in flips {
            let at = index.index(bytes.len());
            bytes[at] = value;
        }
        let mut fds = dev_null_fds(envelope.fd_count);
        if let Ok(Status::Complete((frame, _))) = Decoder::default().decode(&bytes, &mut fds) {
            // Whatever decoded must still be within the limits.
            prop_assert!(frame.fds.len() <= Limits::default().max_fds());
            let _ = frame.decode::<ToPrimary>();
            let _ = frame.decode::<ToWorker>();
        }
        // Whatever the decoder took or refused, every fd is closed once dropped.
        drop(fds);
        snapshot.assert_no_leak();
    }

    #[test]
    fn a_stream_split_at_any_position_decodes_identically(
        envelopes in proptest::collection::vec(envelope(), 1..5),
        cut_seed in any::<prop::sample::Index>(),
    ) {
        let snapshot = support::fd_snapshot();
        let mut bytes = Vec::new();
        for envelope in &envelopes {
            encode(envelope, &mut bytes);
        }
        let total_fds: usize = envelopes.iter().map(|e| e.fd_count).sum();
        let whole = decode_in_chunks(&bytes, &[], &mut dev_null_fds(total_fds)).unwrap();
        prop_assert_eq!(whole.len(), envelopes.len());
        for (frame, envelope) in whole.iter().zip(&envelopes) {
            assert_matches(frame, envelope);
        }
        // Every single split position, plus a three-way split derived from the seed.
        let second = cut_seed.index(bytes.len() + 1);
        for cut in 0..=bytes.len() {
            let mut cuts = vec![cut.min(second), cut.max(second)];
            cuts.dedup();
            let split = decode_in_chunks(&bytes, &cuts, &mut dev_null_fds(total_fds)).unwrap();
            prop_assert_eq!(split.len(), whole.len());
            for (frame, envelope) in split.iter().zip(&envelopes) {
                assert_matches(frame, envelope);
            }
        }
        drop(whole);
        snapshot.assert_no_leak();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::with_cases(128) })]

    /// Any body, under any frame size, splits into fragments within the frame limit that put
    /// back together give the body, its fds and its header back.
    #[test]
    fn fragments_reassemble_into_the_message(
        body in proptest::collection::vec(any::<u8>(), 0..5000),
        max_frame_len in 29usize..600,
        kind in kind(),
        seq in any::<u64>(),
        ack in proptest::option::of(any::<u64>()),
        fd_count in 0usize..3,
    ) {
        let snapshot = support::fd_snapshot();
        let limits = Limits::new(max_frame_len, 4).unwrap();
        let mut reassembler = Reassembler::new();
        let mut fds = dev_null_fds(fd_count);
        let mut whole = None;
        let parts = fragments(kind, seq, ack, fd_count, &body, &limits).unwrap();
        let count = parts.len();
        for (index, (header, part)) in parts.enumerate() {
            prop_assert!(header.frame_len() <= max_frame_len);
            prop_assert_eq!(header.more, index + 1 < count);
            let mut bytes = header.to_bytes().to_vec();
            bytes.extend_from_slice(part);
            let Status::Complete((frame, used)) = Decoder::new(limits).decode(&bytes, &mut fds).unwrap()
            else {
                panic!("a whole fragment decoded as partial");
            };
            prop_assert_eq!(used, bytes.len());
            prop_assert!(whole.is_none());
            whole = reassembler.push(frame, &limits).unwrap();
        }
        let whole = whole.unwrap();
        prop_assert_eq!(&whole.body, &body);
        prop_assert_eq!(whole.kind(), kind);
        prop_assert_eq!(whole.seq(), seq);
        prop_assert_eq!(whole.ack(), ack);
        prop_assert_eq!(whole.fds.len(), fd_count);
        prop_assert!(!reassembler.in_progress());
        drop(whole);
        snapshot.assert_no_leak();
    }
}

#[test]
fn a_message_over_the_limit_is_refused_on_both_ends() {
    let limits = Limits::new(100, 4)
        .unwrap()
        .with_max_message_len(1000)
        .unwrap();
    let body = vec![7u8; 1001];
    let err = fragments(Kind::User, 1, None, 0, &body, &limits)
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            Error::MessageTooLarge {
                len: 1001,
                max: 1000
            }
        ),
        "{err:?}"
    );
    // A sender with a larger limit: the receiver refuses once the fragments pass its own.
    let sender = limits.with_max_message_len(5000).unwrap();
    let mut reassembler = Reassembler::new();
    let mut outcome = Ok(None);
    for (header, part) in fragments(Kind::User, 1, None, 0, &body, &sender).unwrap() {
        let mut bytes = header.to_bytes().to_vec();
        bytes.extend_from_slice(part);
        let frame = Decoder::new(limits)
            .decode_record(&bytes, Vec::new())
            .unwrap();
        outcome = reassembler.push(frame, &limits);
        if outcome.is_err() {
            break;
        }
    }
    let err = outcome.unwrap_err();
    assert!(
        matches!(err, Error::MessageTooLarge { max: 1000, .. }),
        "{err:?}"
    );
}

#[test]
fn a_frame_that_interrupts_a_fragmented_message_is_refused() {
    let limits = Limits::new(100, 4).unwrap();
    let body = vec![1u8; 300];
    let mut first = fragments(Kind::User, 1, None, 0, &body, &limits).unwrap();
    let (header, part) = first.next().unwrap();
    let mut bytes = header.to_bytes().to_vec();
    bytes.extend_from_slice(part);
    let mut reassembler = Reassembler::new();
    let frame = Decoder::new(limits)
        .decode_record(&bytes, Vec::new())
        .unwrap();
    assert!(reassembler.push(frame, &limits).unwrap().is_none());
    let mut other = Vec::new();
    encode_raw(&mut other, Kind::User, 2, None, 0, b"hi", &limits).unwrap();
    let frame = Decoder::new(limits)
        .decode_record(&other, Vec::new())
        .unwrap();
    let err = reassembler.push(frame, &limits).unwrap_err();
    assert!(matches!(err, Error::BadFragment { .. }), "{err:?}");
}

#[test]
fn a_full_batch_of_ipv6_peers_fits_a_handoff_frame_at_any_window() {
    use std::net::{Ipv6Addr, SocketAddrV6};
    for window in [1, 2, 8, 64, 253, 256, 4096] {
        let limits = cluster_ipc::proto::handoff_limits(window);
        let batch = limits.max_fds();
        assert_eq!(batch, (window as usize).min(253));
        // The longest address there is: every byte set, the largest port, flow info and
        // scope id.
        let peer = SocketAddrV6::new(Ipv6Addr::from([0xff; 16]), u16::MAX, u32::MAX, u32::MAX);
        let message = HandoffToWorker::Connections {
            count: batch as u32,
            peers: vec![PeerAddr(peer.into()); batch],
        };
        let mut out = Vec::new();
        encode_message(
            &mut out,
            Kind::HandoffToWorker,
            u64::MAX,
            None,
            batch,
            &message,
            &limits,
        )
        .unwrap_or_else(|err| panic!("window {window}: {err}"));
        assert!(out.len() <= limits.max_frame_len());
    }
}
