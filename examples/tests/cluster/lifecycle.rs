//! Workers' lives as the primary reports them: event order, ids, exit statuses, disconnects.

use std::io::Write;
use std::sync::{Arc, Mutex};

use cluster_primary::{Event, ExitStatus, Signal, SlotId, WorkerId, WorkerState};

use crate::support::{
    Harness, builder, connect, decode, forks, greet, parse_greeting, read_line, signal, worker_of,
};

/// The lifecycle events of one worker, by name, in order (messages left out).
fn lifecycle_of(events: &[Event], worker: WorkerId) -> Vec<&'static str> {
    events
        .iter()
        .filter(|event| worker_of(event) == Some(worker))
        .filter_map(|event| match event {
            Event::Fork { .. } => Some("fork"),
            Event::Online { .. } => Some("online"),
            Event::Listening { .. } => Some("listening"),
            Event::Disconnect { .. } => Some("disconnect"),
            Event::Exit { .. } => Some("exit"),
            _ => None,
        })
        .collect()
}

fn position(events: &[Event], what: impl Fn(&Event) -> bool) -> usize {
    events
        .iter()
        .position(what)
        .unwrap_or_else(|| panic!("event missing from {events:#?}"))
}

#[test]
fn events_come_in_order_fork_online_listening_disconnect_exit() {
    let mut cluster = Harness::start(builder(2));
    cluster.wait_ready();
    let events = cluster.stop();

    let workers = forks(&events);
    assert_eq!(workers.len(), 2, "{events:#?}");
    for &(worker, _, _) in &workers {
        assert_eq!(
            lifecycle_of(&events, worker),
            ["fork", "online", "listening", "disconnect", "exit"],
            "{worker}: {events:#?}"
        );
        // Its messages come while it is online: after Online, before Disconnect.
        let online = position(&events, |e| *e == Event::Online { worker });
        let disconnect = position(&events, |e| *e == Event::Disconnect { worker });
        for (at, event) in events.iter().enumerate() {
            if matches!(event, Event::Message { worker: w, .. } if *w == worker) {
                assert!(online < at && at < disconnect, "{events:#?}");
            }
        }
        // A graceful stop: each worker exits by itself, with code 0, after being asked.
        let exit = events.iter().find_map(|event| match event {
            Event::Exit {
                worker: w,
                status,
                after_disconnect,
                ..
            } if *w == worker => Some((*status, *after_disconnect)),
            _ => None,
        });
        assert_eq!(exit, Some((ExitStatus::Code(0), true)), "{events:#?}");
    }
    // Ready once, after every worker listens and before any leaves.
    let ready: Vec<usize> = (0..events.len())
        .filter(|&at| matches!(events[at], Event::Ready { .. }))
        .collect();
    assert_eq!(ready.len(), 1, "{events:#?}");
    let last_listening = events
        .iter()
        .rposition(|e| matches!(e, Event::Listening { .. }))
        .unwrap();
    let first_disconnect = position(&events, |e| matches!(e, Event::Disconnect { .. }));
    assert!(last_listening < ready[0] && ready[0] < first_disconnect);
}

#[test]
fn ids_start_at_1_and_are_never_reused() {
    // The hook checks, on the loop, that what `Cluster::worker` says of a new worker matches
    // its Fork event.
    let mismatches = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&mismatches);
    let mut cluster = Harness::start_with(builder(2), move |cluster, event| {
        if let Event::Fork { worker, pid, slot } = event {
            let info = cluster.worker(*worker);
            let ok = info.as_ref().is_some_and(|info| {
                info.pid == *pid && info.slot == *slot && info.state == WorkerState::Starting
            });
            if !ok {
                seen.lock().unwrap().push(format!("{event:?} vs {info:?}"));
            }
        }
    });
    cluster.wait_ready();
    for (expected_id, expected_slot) in [(1, 0), (2, 1)] {
        let (worker, _, slot) = cluster.wait_fork();
        assert_eq!(
            (worker, slot),
            (WorkerId(expected_id), SlotId(expected_slot))
        );
    }

    // Kill a worker four times, alternating slots: each replacement gets the next id and
    // the slot of the worker it replaces.
    for round in 0..4u64 {
        let slot = (round % 2) as u32;
        let victim = cluster.worker_in_slot(slot);
        signal(victim.pid, Signal::SIGKILL);
        let (status, after_disconnect) = cluster.wait_exit(victim.id);
        assert_eq!(status, ExitStatus::Signal(Signal::SIGKILL));
        assert!(!after_disconnect);
        let (worker, pid, new_slot) = cluster.wait_fork();
        assert_eq!(worker, WorkerId(3 + round), "round {round}");
        assert_eq!(new_slot, SlotId(slot));
        // The worker itself knows its id and slot from its environment.
        let (_, report) = cluster.wait_message(Some(worker), "report");
        assert!(report.contains(&format!("id={}", worker.0)), "{report:?}");
        assert!(report.contains(&format!("slot={slot}")), "{report:?}");
        assert!(report.contains(&format!("pid={pid}")), "{report:?}");
        cluster.wait_listening(worker);
    }
    assert_eq!(cluster.status().restarts, 4);
    let events = cluster.stop();
    let ids: Vec<u64> = forks(&events)
        .iter()
        .map(|(worker, _, _)| worker.0)
        .collect();
    assert_eq!(ids, [1, 2, 3, 4, 5, 6]);
    assert!(mismatches.lock().unwrap().is_empty(), "{mismatches:?}");
}

#[test]
fn exit_code_42_and_sigkill_are_reported_as_such() {
    // Slot 0 exits with 42 once it listens; the hook kills slot 1 (`Cluster::kill`) once it
    // listens. Respawn is off, so the primary finishes by itself after both exits.
    let builder = builder(2)
        .respawn(false)
        .env("TW_BEHAVIOUR_SLOT0", "exit:42");
    let mut cluster = Harness::start_with(builder, |cluster, event| {
        if let Event::Listening { worker, .. } = event {
            if cluster
                .worker(*worker)
                .is_some_and(|info| info.slot == SlotId(1))
            {
                cluster.kill(*worker, Signal::SIGKILL).unwrap();
            }
        }
    });
    assert_eq!(cluster.wait_finished(), Ok(()));
    let events = cluster.events();
    let workers = forks(&events);
    assert_eq!(workers.len(), 2, "{events:#?}");
    for (worker, pid, slot) in workers {
        let expected = if slot == SlotId(0) {
            ExitStatus::Code(42)
        } else {
            ExitStatus::Signal(Signal::SIGKILL)
        };
        assert!(
            events.contains(&Event::Exit {
                worker,
                pid,
                status: expected,
                after_disconnect: false,
            }),
            "slot {slot}: {events:#?}"
        );
        assert_eq!(
            lifecycle_of(&events, worker),
            ["fork", "online", "listening", "disconnect", "exit"],
            "{events:#?}"
        );
    }
}

/// A worker that gets SIGTERM from outside (an operator, not the primary) treats it as
/// "disconnect": it tells the primary it is leaving by itself, finishes and exits with 0. The
/// primary takes that for a deliberate departure, as Node does with `exitedAfterDisconnect`,
/// and does not replace it: the cluster runs one worker short from then on.
#[test]
fn a_worker_sigtermed_directly_disconnects_gracefully_and_is_replaced() {
    let mut cluster = Harness::start(builder(2));
    let addr = cluster.wait_ready()[0];
    let victim = cluster.worker_in_slot(0);
    let survivor = cluster.worker_in_slot(1);
    signal(victim.pid, Signal::SIGTERM);

    let (_, fields) = cluster.wait_message(Some(victim.id), "disconnecting");
    assert_eq!(fields, ["Signal", "0"]);
    cluster.wait_for("Disconnect", |event| {
        (*event == Event::Disconnect { worker: victim.id }).then_some(())
    });
    // It left by itself, gracefully: code 0, after a disconnect (Node's
    // `exitedAfterDisconnect`)...
    assert_eq!(cluster.wait_exit(victim.id), (ExitStatus::Code(0), true));
    // ...and since the primary did not ask for it, its slot is refilled: the cluster keeps
    // its size.
    let replacement = cluster.wait_for("the replacement's Fork", |event| match event {
        Event::Fork {
            worker,
            slot: SlotId(0),
            ..
        } if *worker != victim.id => Some(*worker),
        _ => None,
    });
    cluster.wait_for("the replacement's Listening", |event| match event {
        Event::Listening { worker, .. } if *worker == replacement => Some(()),
        _ => None,
    });
    let status = cluster.status();
    assert_eq!(status.restarts, 1);
    let ids: Vec<WorkerId> = status.workers.iter().map(|worker| worker.id).collect();
    assert_eq!(ids, [survivor.id, replacement]);
    let mut answered_by = std::collections::BTreeSet::new();
    for _ in 0..8 {
        answered_by.insert(greet(addr).worker);
    }
    assert!(!answered_by.contains(&victim.id.0));
    cluster.stop();
}

#[test]
fn disconnect_waits_for_an_open_connection_to_finish() {
    let mut cluster = Harness::start(builder(2).env("TW_BEHAVIOUR", "hold"));
    let addr = cluster.wait_ready()[0];

    // A connection the worker holds until the client sends a byte.
    let mut held = connect(addr);
    let holder = WorkerId(parse_greeting(&read_line(&held)).worker);
    cluster.handle.disconnect(holder).unwrap();

    // The worker is disconnecting (its listener closed) with the connection still open...
    let (_, fields) = cluster.wait_message(Some(holder), "disconnecting");
    assert_eq!(fields, ["Primary", "1"]);
    // ...and it cannot have exited: its connection waits for our byte.
    assert!(
        !cluster
            .events()
            .iter()
            .any(|e| matches!(e, Event::Exit { worker, .. } if *worker == holder))
    );
    // New connections go to the other worker.
    let other = connect(addr);
    let greeting = parse_greeting(&read_line(&other));
    assert_ne!(greeting.worker, holder.0);
    drop(other);

    // The held connection is still served to the end by the disconnecting worker.
    held.write_all(b"x").unwrap();
    assert_eq!(read_line(&held), "bye\n");
    assert_eq!(read_line(&held), "", "the worker closes the connection");
    drop(held);

    assert_eq!(cluster.wait_exit(holder), (ExitStatus::Code(0), true));
    let events = cluster.events();
    let message_at = events
        .iter()
        .position(|e| match e {
            Event::Message { worker, message } => {
                *worker == holder && decode(message).0 == "disconnecting"
            }
            _ => false,
        })
        .unwrap();
    let exit_at = events
        .iter()
        .position(|e| matches!(e, Event::Exit { worker, .. } if *worker == holder))
        .unwrap();
    assert!(message_at < exit_at);
    // Asked to disconnect: not replaced.
    assert_eq!(cluster.status().restarts, 0);
    cluster.stop();
}

#[test]
fn disconnect_all_calls_back_once_every_worker_is_gone_and_replaces_none() {
    // What the callback saw: how many workers were left when it ran, and how often it ran.
    let seen: Arc<Mutex<Vec<usize>>> = Arc::default();
    let record = Arc::clone(&seen);
    let mut cluster = Harness::start_with(builder(3), move |cluster, event| {
        if let Event::Ready { .. } = event {
            let record = Arc::clone(&record);
            cluster.disconnect_all(move |cluster| {
                record.lock().unwrap().push(cluster.workers().len());
                cluster.stop(true);
            });
        }
    });
    cluster.wait_ready();
    let ids: Vec<WorkerId> = (1..=3).map(WorkerId).collect();
    for &id in &ids {
        assert_eq!(cluster.wait_exit(id), (ExitStatus::Code(0), true));
    }
    assert_eq!(cluster.wait_finished(), Ok(()));
    assert_eq!(
        *seen.lock().unwrap(),
        [0],
        "the callback runs once, with no worker left"
    );
    let forks = cluster
        .events()
        .iter()
        .filter(|e| matches!(e, Event::Fork { .. }))
        .count();
    assert_eq!(
        forks, 3,
        "a disconnect the primary asked for is not followed by a respawn"
    );
}
