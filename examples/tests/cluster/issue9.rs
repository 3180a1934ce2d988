//! Messages that are never lost, the facade's failures, inherited environments, the
//! Disconnect event's view of a worker, large windows over IPv6: the first cut's defects,
//! each proved through a real primary and real workers.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use cluster_primary::{Builder, Event, ExitStatus, Policy, WorkerId, WorkerState};

use std::io::Write;
use std::net::TcpStream;

use crate::support::{
    Harness, builder, connect, parse_greeting, read_greeting, read_line, wait_until,
};

const TEST_FACADE: &str = env!("CARGO_BIN_EXE_test-facade");

/// A primary of one `test-facade` worker doing `behaviour`.
fn facade(behaviour: &str) -> Builder {
    builder(1)
        .program(TEST_FACADE)
        .env("TF_BEHAVIOUR", behaviour)
        .respawn(false)
}

type Msg = (String, u64);

/// The first message of `kind` from any worker, decoded.
fn wait_number(cluster: &mut Harness, kind: &str) -> u64 {
    cluster.wait_for(&format!("message {kind:?}"), |event| match event {
        Event::Message { message, .. } => match message.decode::<Msg>() {
            Ok((got, n)) if got == kind => Some(n),
            _ => None,
        },
        _ => None,
    })
}

/// A burst of `COUNT` messages sent by the primary's hook as soon as the worker is online,
/// all at once, with no waiting between them.
fn burst_to_worker(behaviour: &str) {
    const COUNT: u64 = 5000;
    let failures = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&failures);
    let mut cluster = Harness::start_with(
        facade(&format!("{behaviour}:{COUNT}")),
        move |cluster, event| {
            if let Event::Online { worker } = event {
                for i in 0..COUNT {
                    if let Err(err) = cluster.send(*worker, &("n".to_owned(), i)) {
                        seen.lock().unwrap().push(err.to_string());
                    }
                }
            }
        },
    );
    assert_eq!(wait_number(&mut cluster, "received"), COUNT);
    assert!(failures.lock().unwrap().is_empty(), "{failures:?}");
    // Its code returns right after the report: it leaves by itself, cleanly, and with
    // respawn off the primary then finishes on its own (a stop from here would race that).
    let (status, after_disconnect) = cluster.wait_exit(WorkerId(1));
    assert_eq!((status, after_disconnect), (ExitStatus::Code(0), true));
    cluster.wait_finished().unwrap();
}

#[test]
fn a_burst_of_5000_messages_reaches_a_worker_reading_with_recv_message_all_in_order() {
    burst_to_worker("recv-burst");
}

#[test]
fn a_burst_of_5000_messages_reaches_a_worker_reading_with_on_message_all_in_order() {
    burst_to_worker("callback-burst");
}

#[test]
fn a_burst_of_5000_messages_from_a_worker_reaches_the_primary_all_in_order() {
    const COUNT: u64 = 5000;
    let mut cluster = Harness::start(facade(&format!("send-burst:{COUNT}")));
    for expected in 0..COUNT {
        assert_eq!(wait_number(&mut cluster, "n"), expected);
    }
    assert_eq!(wait_number(&mut cluster, "sent"), COUNT);
    // Its code returned right after sending: it left by itself, cleanly, with nothing lost.
    let (status, after_disconnect) = cluster.wait_exit(WorkerId(1));
    assert_eq!((status, after_disconnect), (ExitStatus::Code(0), true));
    cluster.wait_finished().unwrap();
}

#[test]
fn a_4_mib_message_round_trips_and_one_over_the_limit_is_refused_naming_it() {
    const LIMIT: usize = 6 * 1024 * 1024;
    let mut cluster = Harness::start(facade("echo").max_message_len(LIMIT));
    let worker = cluster.wait_for("Online", |event| match event {
        Event::Online { worker } => Some(*worker),
        _ => None,
    });
    let big: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    cluster.handle.send(worker, &big).unwrap();
    let echoed = cluster.wait_for("the echo", |event| match event {
        Event::Message { message, .. } => message.decode::<Vec<u8>>().ok(),
        _ => None,
    });
    assert!(echoed == big, "the echo differs ({} bytes)", echoed.len());

    let err = cluster
        .handle
        .send(worker, &vec![0u8; LIMIT + 1])
        .unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("{LIMIT}-byte message limit")),
        "{err}"
    );
    // The channel still works.
    cluster.handle.send(worker, &b"small".to_vec()).unwrap();
    let echoed = cluster.wait_for("the small echo", |event| match event {
        Event::Message { message, .. } => message.decode::<Vec<u8>>().ok(),
        _ => None,
    });
    assert_eq!(echoed, b"small");
    cluster.stop();
}

#[test]
fn a_worker_whose_closure_returns_an_error_exits_non_zero() {
    let mut cluster = Harness::start(facade("fail"));
    let worker = cluster.wait_for("Online", |event| match event {
        Event::Online { worker } => Some(*worker),
        _ => None,
    });
    let (status, _) = cluster.wait_exit(worker);
    assert_eq!(
        status,
        ExitStatus::Code(cluster_net::WORKER_FAILED_EXIT_CODE)
    );
    assert!(!status.success());
    cluster.wait_finished().unwrap();
}

#[test]
fn a_program_a_worker_starts_runs_standalone() {
    let mut cluster = Harness::start(facade("spawn-child"));
    assert_eq!(wait_number(&mut cluster, "child-clustered"), 0);
    assert_eq!(wait_number(&mut cluster, "child-exit"), 0);
    cluster.stop();
}

#[test]
fn during_its_own_disconnect_event_a_worker_is_listed_as_disconnected_every_time() {
    for round in 0..50 {
        let seen: Arc<Mutex<Vec<Option<WorkerState>>>> = Arc::default();
        let record = Arc::clone(&seen);
        // A worker that exits as soon as it listens: its channel's end and its exit land
        // together, often in one turn of the primary's loop.
        let builder = builder(1).env("TW_BEHAVIOUR", "exit:3").respawn(false);
        let mut cluster = Harness::start_with(builder, move |cluster, event| {
            if let Event::Disconnect { worker } = event {
                record
                    .lock()
                    .unwrap()
                    .push(cluster.worker(*worker).map(|info| info.state));
            }
        });
        cluster.wait_finished().unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            [Some(WorkerState::Disconnected)],
            "round {round}"
        );
    }
}

/// A primary of one `test-worker` on `[::1]:0` with a window of 256.
fn ipv6_window_256(behaviour: &str) -> Builder {
    builder(1)
        .window(256)
        .env("TW_LISTEN", "[::1]:0")
        .env("TW_BEHAVIOUR", behaviour)
}

#[test]
fn a_window_of_256_ipv6_connections_is_handed_over_without_an_ack() {
    // The worker never accepts, so it never acks: everything it holds went in one window.
    let mut cluster = Harness::start(ipv6_window_256("no-accept"));
    let addr = cluster.wait_ready()[0];
    assert!(addr.is_ipv6());
    let _streams: Vec<_> = (0..256).map(|_| connect(addr)).collect();
    wait_until("256 connections in flight to the worker", || {
        let status = cluster.status();
        status.pending_connections == 0
            && status.workers.iter().map(|w| w.in_flight).sum::<usize>() == 256
    });
    cluster.stop();
}

#[test]
fn a_window_of_256_serves_256_ipv6_connections_at_once() {
    let mut cluster = Harness::start(ipv6_window_256("serve"));
    let addr = cluster.wait_ready()[0];
    let mut streams: Vec<_> = (0..256).map(|_| connect(addr)).collect();
    let mut by_worker = BTreeMap::<u64, usize>::new();
    for stream in &mut streams {
        *by_worker.entry(read_greeting(stream).worker).or_default() += 1;
    }
    assert_eq!(by_worker.values().sum::<usize>(), 256);
    assert_eq!(cluster.status().restarts, 0, "no worker was lost");
    cluster.stop();
}

#[test]
fn least_connections_gives_new_connections_to_the_worker_with_fewest_open() {
    // Every worker holds each connection open until its client sends a byte, and reports
    // how many it has open.
    let builder = builder(2)
        .policy(Policy::LeastConnections)
        .env("TW_BEHAVIOUR", "hold-all");
    let mut cluster = Harness::start(builder);
    let addr = cluster.wait_ready()[0];
    let info = |cluster: &Harness, worker: u64| {
        cluster
            .status()
            .workers
            .into_iter()
            .find(|info| info.id == WorkerId(worker))
            .expect("a live worker")
    };
    let mut open: Vec<(u64, TcpStream)> = (0..4)
        .map(|_| {
            let stream = connect(addr);
            (parse_greeting(&read_line(&stream)).worker, stream)
        })
        .collect();
    let (emptied, loaded) = (open[0].0, open[1].0);
    assert_ne!(emptied, loaded, "the first two go to different workers");
    // Every handoff acknowledged, then all of one worker's connections closed and reported.
    wait_until("every handoff acknowledged", || {
        cluster
            .status()
            .workers
            .iter()
            .map(|w| w.connections_acked)
            .sum::<u64>()
            == 4
    });
    for (_, stream) in open.iter_mut().filter(|(worker, _)| *worker == emptied) {
        stream.write_all(b"x").unwrap();
        assert_eq!(read_line(stream), "bye\n");
    }
    open.retain(|(worker, _)| *worker != emptied);
    let still_open = u32::try_from(open.len()).unwrap();
    assert!(
        still_open >= 2,
        "round-robin's first four were split: {still_open}"
    );
    wait_until("the counts reported", || {
        info(&cluster, emptied).open_connections == Some(0)
            && info(&cluster, loaded).open_connections == Some(still_open)
    });
    // Round-robin would take turns; least-connections fills the emptied worker up to the
    // other's load first.
    for _ in 0..still_open {
        let stream = connect(addr);
        assert_eq!(parse_greeting(&read_line(&stream)).worker, emptied);
        open.push((emptied, stream));
    }
    // Clients that leave let the workers finish at once.
    drop(open);
    cluster.stop();
}

#[test]
fn a_status_request_the_loop_cannot_answer_in_time_times_out_with_its_own_error() {
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = Mutex::new(released);
    let mut cluster = Harness::start_with(builder(1), move |_, event| {
        if let Event::Online { .. } = event {
            // Keep the loop busy until the test has asked for a status.
            let _ = entered_tx.send(());
            let _ = released.lock().unwrap().recv();
        }
    });
    entered.recv_timeout(crate::support::WAIT).unwrap();
    let err = cluster
        .handle
        .status(std::time::Duration::from_millis(50))
        .unwrap_err();
    assert!(
        matches!(err, cluster_primary::Error::TimedOut { op: "status", .. }),
        "{err:?}"
    );
    release.send(()).unwrap();
    cluster.wait_ready();
    cluster.stop();
}
