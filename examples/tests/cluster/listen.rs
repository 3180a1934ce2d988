//! Listening: port 0, several addresses, refusals, shared mode.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;

use cluster_primary::{Event, ListenMode, WorkerId};

use crate::support::{Harness, builder, connect, forks, greet, parse_greeting, read_line};

/// The addresses of every `Listening` event of `worker`, in order.
fn listening_addrs(events: &[Event], worker: WorkerId) -> Vec<SocketAddr> {
    events
        .iter()
        .filter_map(|event| match event {
            Event::Listening { worker: w, addr } if *w == worker => Some(*addr),
            _ => None,
        })
        .collect()
}

#[test]
fn port_0_gives_every_worker_the_same_port() {
    let mut cluster = Harness::start(builder(3));
    let addrs = cluster.wait_ready();
    assert_eq!(addrs.len(), 1, "{addrs:?}");
    let addr = addrs[0];
    assert_ne!(addr.port(), 0);
    let events = cluster.events();
    let workers = forks(&events);
    assert_eq!(workers.len(), 3);
    for &(worker, _, _) in &workers {
        assert_eq!(listening_addrs(&events, worker), [addr]);
        // The worker's own listener says the same.
        let (_, local) = cluster.wait_message(Some(worker), "listening");
        assert_eq!(local, [addr.to_string()]);
    }
    let served: BTreeSet<u64> = (0..6)
        .map(|_| {
            let greeting = greet(addr);
            assert_eq!(greeting.port, addr.port());
            greeting.worker
        })
        .collect();
    let ids: BTreeSet<u64> = workers.iter().map(|(worker, _, _)| worker.0).collect();
    assert_eq!(served, ids, "round-robin reaches every worker");
    cluster.stop();
}

#[test]
fn one_worker_listens_on_two_addresses() {
    // Two listens on port 0 by one worker get two ports; every worker's first `:0` shares
    // one, and its second the other.
    let mut cluster = Harness::start(builder(2).env("TW_LISTEN", "127.0.0.1:0,127.0.0.1:0"));
    let mut per_worker = Vec::new();
    for _ in 0..2 {
        let (worker, local) = cluster.wait_message(None, "listening");
        per_worker.push((worker, local));
    }
    let (_, first) = &per_worker[0];
    assert_eq!(first.len(), 2, "{first:?}");
    assert_ne!(first[0], first[1]);
    assert_eq!(per_worker[0].1, per_worker[1].1);
    let addrs: Vec<SocketAddr> = first.iter().map(|addr| addr.parse().unwrap()).collect();

    let events = cluster.events();
    for (worker, _) in &per_worker {
        assert_eq!(listening_addrs(&events, *worker), addrs);
    }
    let mut status_addrs = cluster.status().listening;
    status_addrs.sort();
    let mut sorted = addrs.clone();
    sorted.sort();
    assert_eq!(status_addrs, sorted);

    // Both addresses serve, each through both workers.
    let ids: BTreeSet<u64> = per_worker.iter().map(|(worker, _)| worker.0).collect();
    for addr in addrs {
        let served: BTreeSet<u64> = (0..4)
            .map(|_| {
                let greeting = greet(addr);
                assert_eq!(greeting.port, addr.port());
                greeting.worker
            })
            .collect();
        assert_eq!(served, ids, "{addr}");
    }
    cluster.stop();
}

#[test]
fn a_port_taken_outside_the_cluster_stops_the_cluster_naming_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let mut cluster = Harness::start(builder(1).env("TW_LISTEN", addr.to_string()));
    // No respawn can fix it: the cluster stops, naming the address and the cause. (The
    // worker's bind fails with `AddrInUse`, as a bind of its own would: the core's tests
    // check the errno it is refused with.)
    let err = cluster
        .wait_finished()
        .expect_err("a failed listen stops the cluster");
    assert!(err.contains(&addr.to_string()), "{err}");
    assert!(err.contains("address in use"), "{err}");
    assert!(
        !cluster
            .events()
            .iter()
            .any(|event| matches!(event, Event::Listening { .. }))
    );
    drop(taken);
}

#[test]
fn shared_mode_serves_connections_from_several_workers() {
    // Each worker holds one connection at a time (until its client sends a byte), so three
    // connections held at once must have been accepted by three different workers.
    let builder = builder(3)
        .mode(ListenMode::Shared)
        .env("TW_BEHAVIOUR", "hold");
    let mut cluster = Harness::start(builder);
    let addr = cluster.wait_ready()[0];
    let held: Vec<_> = (0..3).map(|_| connect(addr)).collect();
    let greetings: Vec<_> = held
        .iter()
        .map(|stream| parse_greeting(&read_line(stream)))
        .collect();
    let workers: BTreeSet<u64> = greetings.iter().map(|g| g.worker).collect();
    assert_eq!(workers.len(), 3, "{greetings:?}");
    assert!(greetings.iter().all(|g| g.port == addr.port()));
    for mut stream in held {
        stream.write_all(b"x").unwrap();
        assert_eq!(read_line(&stream), "bye\n");
    }
    // The primary hands nothing out in shared mode: the workers accepted by themselves.
    let status = cluster.status();
    assert!(status.workers.iter().all(|w| w.connections_acked == 0));
    // And it keeps serving, one connection after another.
    for _ in 0..10 {
        let stream = connect(addr);
        parse_greeting(&read_line(&stream));
    }
    cluster.stop();
}
