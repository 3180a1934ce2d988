//! Property tests of the sans-IO frame codec.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use cluster_ipc::proto::{
    Control, Delivery, ListenAddr, ListenGranted, ListenMode, ListenRequest, ListenerId, PeerAddr,
};
use cluster_ipc::{Decoder, Error, Frame, Kind, Limits, Status, encode_message, encode_raw};
use proptest::prelude::*;

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![Just(Kind::Control), Just(Kind::User)]
}

fn listen_addr() -> impl Strategy<Value = ListenAddr> {
    prop_oneof![
        any::<SocketAddr>().prop_map(ListenAddr::Tcp),
        any::<SocketAddr>().prop_map(ListenAddr::Udp),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(ListenAddr::Unix),
    ]
}

fn control() -> impl Strategy<Value = Control> {
    prop_oneof![
        (any::<u64>(), any::<u32>(), any::<u32>()).prop_map(
            |(worker_id, pid, protocol_version)| {
                Control::Hello {
                    worker_id,
                    pid,
                    protocol_version,
                }
            }
        ),
        (
            listen_addr(),
            any::<u32>(),
            proptest::option::of(any::<u32>())
        )
            .prop_map(|(addr, index, backlog)| Control::Listen(ListenRequest {
                addr,
                mode: Some(ListenMode::RoundRobin),
                index,
                backlog
            })),
        (any::<u64>(), listen_addr(), any::<u32>()).prop_map(|(id, local_addr, window)| {
            Control::ListenGranted(ListenGranted {
                listener: ListenerId(id),
                local_addr,
                delivery: Delivery::Handoff { window },
            })
        }),
        proptest::collection::vec(any::<SocketAddr>(), 0..4).prop_map(|peers| {
            Control::Connections {
                count: peers.len() as u32,
                peers: peers.into_iter().map(PeerAddr).collect(),
            }
        }),
        any::<u32>().prop_map(|open_connections| Control::LoadReport { open_connections }),
        Just(Control::Disconnect),
        Just(Control::Retire),
        ".*".prop_map(|reason| Control::Refused { reason }),
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
    Control(Control),
    Text(String),
    Numbers(Vec<u32>),
    Raw(Vec<u8>),
}

fn envelope() -> impl Strategy<Value = Envelope> {
    let body = prop_oneof![
        control().prop_map(Body::Control),
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
        Body::Control(msg) => encode_message(out, kind, seq, ack, fd_count, msg, &limits),
        Body::Text(msg) => encode_message(out, kind, seq, ack, fd_count, msg, &limits),
        Body::Numbers(msg) => encode_message(out, kind, seq, ack, fd_count, msg, &limits),
        Body::Raw(bytes) => encode_raw(out, kind, seq, ack, fd_count, bytes, &limits),
    }
    .unwrap();
}

fn decoded_body(frame: &Frame, like: &Body) -> Body {
    match like {
        Body::Control(_) => Body::Control(frame.decode().unwrap()),
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
            let _ = frame.decode::<Control>();
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
