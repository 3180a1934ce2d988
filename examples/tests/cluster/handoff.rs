//! Round-robin handoff: the spread, and connections that must not be lost when a worker lets
//! go of them (closing its listener) or dies holding them.

use std::net::TcpStream;

use cluster_primary::{Event, ExitStatus, Signal, Status, WorkerId, WorkerInfo};

use crate::support::{
    Harness, builder, connect, greet, msg, read_greeting, signal, tally, wait_until,
};

fn info(status: &Status, worker: WorkerId) -> WorkerInfo {
    status
        .workers
        .iter()
        .find(|info| info.id == worker)
        .cloned()
        .unwrap_or_else(|| panic!("{worker} is not live: {status:#?}"))
}

/// Every connection the primary has accepted is somewhere it can count it: acknowledged by a
/// worker, in flight to one, or pending.
fn accounted(status: &Status) -> usize {
    let workers: u64 = status
        .workers
        .iter()
        .map(|w| w.connections_acked + w.in_flight as u64)
        .sum();
    usize::try_from(workers).unwrap() + status.pending_connections
}

#[test]
fn round_robin_spreads_1000_connections_evenly_over_4_workers() {
    const WINDOW: u32 = 4;
    const CONNECTIONS: usize = 1000;
    let mut cluster = Harness::start(builder(4).window(WINDOW));
    let addr = cluster.wait_ready()[0];
    let counts = tally((0..CONNECTIONS).map(|_| greet(addr).worker));
    assert_eq!(counts.len(), 4, "{counts:?}");
    assert_eq!(counts.values().sum::<usize>(), CONNECTIONS);
    let fair = CONNECTIONS / 4;
    for (worker, &count) in &counts {
        assert!(
            count.abs_diff(fair) <= WINDOW as usize,
            "worker {worker} got {count} of {CONNECTIONS}: {counts:?}"
        );
    }
    // The primary's own count of what each worker acknowledged agrees (acks are read
    // asynchronously, so the last ones may still be on their way).
    wait_until("the primary counted every ack", || {
        let status = cluster.status();
        status.workers.iter().all(|w| {
            counts.get(&w.id.0).copied() == Some(usize::try_from(w.connections_acked).unwrap())
        })
    });
    cluster.stop();
}

#[test]
fn connections_handed_to_a_worker_that_closes_its_listener_are_served_by_another() {
    // Slot 0 accepts nothing until told to; then it serves two connections and closes its
    // listener while more were already handed to it.
    const WINDOW: usize = 4;
    const SERVED_BEFORE_CLOSING: usize = 2;
    const CLIENTS: usize = 3 * WINDOW;
    let builder = builder(2).window(WINDOW as u32).respawn(false).env(
        "TW_BEHAVIOUR_SLOT0",
        format!("close-after:{SERVED_BEFORE_CLOSING}"),
    );
    let mut cluster = Harness::start(builder);
    let addr = cluster.wait_ready()[0];
    let closer = cluster.worker_in_slot(0).id;
    let other = cluster.worker_in_slot(1).id;

    let mut clients: Vec<TcpStream> = (0..CLIENTS).map(|_| connect(addr)).collect();
    // The closer has a full window handed to it and acknowledged none.
    wait_until("the closer holds a full window", || {
        info(&cluster.status(), closer).in_flight == WINDOW
    });
    assert_eq!(info(&cluster.status(), closer).connections_acked, 0);

    cluster.send(closer, &msg("go", []));
    let (_, fields) = cluster.wait_message(Some(closer), "closed");
    assert_eq!(fields, [SERVED_BEFORE_CLOSING.to_string()]);

    // Every client is answered exactly once; the closer answered only what it accepted.
    let answers = tally(
        clients
            .iter_mut()
            .map(|client| read_greeting(client).worker),
    );
    assert_eq!(
        answers.get(&closer.0).copied(),
        Some(SERVED_BEFORE_CLOSING),
        "{answers:?}"
    );
    assert_eq!(
        answers.get(&other.0).copied(),
        Some(CLIENTS - SERVED_BEFORE_CLOSING),
        "{answers:?}"
    );
    // The closer keeps running, holding nothing; nobody was restarted.
    let status = cluster.status();
    assert_eq!(info(&status, closer).in_flight, 0);
    assert_eq!(status.restarts, 0);
    assert!(
        !cluster
            .events()
            .iter()
            .any(|event| matches!(event, Event::Exit { .. }))
    );
    cluster.stop();
}

#[test]
fn a_worker_sigkilled_with_unacked_connections_loses_none_of_them() {
    const WINDOW: usize = 4;
    let builder = builder(2)
        .window(WINDOW as u32)
        .respawn(false)
        .env("TW_BEHAVIOUR_SLOT0", "no-accept");
    let mut cluster = Harness::start(builder);
    let addr = cluster.wait_ready()[0];
    let victim = cluster.worker_in_slot(0);
    let other = cluster.worker_in_slot(1).id;

    // One connection at a time, each followed until the primary has placed it, until the
    // victim (which never accepts, so never acknowledges) holds a full window.
    let mut clients: Vec<TcpStream> = Vec::new();
    loop {
        let status = cluster.status();
        if info(&status, victim.id).in_flight == WINDOW {
            break;
        }
        assert!(clients.len() < 10 * WINDOW, "{status:#?}");
        clients.push(connect(addr));
        wait_until("the primary placed the connection", || {
            accounted(&cluster.status()) == clients.len()
        });
    }
    // The proof: the victim really holds `WINDOW` connections it never acknowledged.
    let status = cluster.status();
    assert_eq!(info(&status, victim.id).in_flight, WINDOW, "{status:#?}");
    assert_eq!(info(&status, victim.id).connections_acked, 0);
    assert_eq!(status.pending_connections, 0);

    signal(victim.pid, Signal::SIGKILL);
    assert_eq!(
        cluster.wait_exit(victim.id),
        (ExitStatus::Signal(Signal::SIGKILL), false)
    );

    // Every client gets exactly one full answer, from the surviving worker.
    let answers = tally(
        clients
            .iter_mut()
            .map(|client| read_greeting(client).worker),
    );
    assert_eq!(
        answers.into_iter().collect::<Vec<_>>(),
        [(other.0, clients.len())]
    );
    assert_eq!(cluster.status().restarts, 0);
    // The survivor acknowledged every one of them (acks are read asynchronously).
    wait_until("the survivor's acks are counted", || {
        usize::try_from(info(&cluster.status(), other).connections_acked).unwrap() == clients.len()
    });
    cluster.stop();
}
