//! Scenarios through the simulator: what the process tests cover, and more, with a fake
//! clock. Every scenario also ends with the simulator's invariant checks.

use std::time::Duration;

use cluster_ipc::proto::{
    Delivery, ListenAddr, ListenMode, ListenRefused, ListenRequest, PROTOCOL_VERSION, ToPrimary,
    ToWorker,
};
use cluster_ipc::{ConnId, ListenerId, SlotId, UserMessage, WorkerId};

use super::sim::{Hello, OnDisconnect, Place, Script, Sim, addr};
use super::{SHUTDOWN_TIMEOUT, START_TIMEOUT, settings};
use crate::config::Policy;
use crate::event::{Event, ExitStatus, WorkerState};
use crate::signal::Signal;
use crate::supervisor::{Action, Refusal, Settings};

const MS: Duration = Duration::from_millis(1);

/// A started cluster of `workers` default workers.
fn cluster(workers: usize) -> Sim {
    cluster_with(settings(workers), Script::default())
}

fn cluster_with(settings: Settings, script: Script) -> Sim {
    let mut sim = Sim::with_script(settings, script);
    sim.start();
    sim
}

fn window(settings: Settings, window: u32) -> Settings {
    Settings {
        window: std::num::NonZeroU32::new(window).unwrap(),
        ..settings
    }
}

fn w(id: u64) -> WorkerId {
    WorkerId(id)
}

/// The `Spawn` actions, as (time, worker, slot).
fn spawns(sim: &Sim) -> Vec<(Duration, WorkerId, SlotId)> {
    sim.log
        .iter()
        .filter_map(|(at, a)| match a {
            Action::Spawn { worker, slot, .. } => Some((*at, *worker, *slot)),
            _ => None,
        })
        .collect()
}

/// The position in the log of the first action matching `f`.
fn position(sim: &Sim, f: impl Fn(&Action) -> bool) -> Option<usize> {
    sim.log.iter().position(|(_, a)| f(a))
}

fn is_exit_of(action: &Action, worker: WorkerId) -> bool {
    matches!(action, Action::Event(Event::Exit { worker: w, .. }) if *w == worker)
}

fn exit_status(sim: &Sim, worker: WorkerId) -> Option<(ExitStatus, bool)> {
    sim.events.iter().find_map(|(_, e)| match e {
        Event::Exit {
            worker: w,
            status,
            after_disconnect,
            ..
        } if *w == worker => Some((*status, *after_disconnect)),
        _ => None,
    })
}

fn accepting(sim: &Sim, listener: ListenerId) -> bool {
    sim.listeners[&listener].accepting
}

fn gaps(times: &[Duration]) -> Vec<Duration> {
    times.windows(2).map(|pair| pair[1] - pair[0]).collect()
}

fn ms(list: &[u64]) -> Vec<Duration> {
    list.iter().map(|&m| Duration::from_millis(m)).collect()
}

// ----- starting -----

#[test]
fn start_spawns_every_slot_and_is_ready_once_every_worker_listens() {
    let mut sim = cluster(3);
    let slots: Vec<(WorkerId, SlotId)> = spawns(&sim).iter().map(|s| (s.1, s.2)).collect();
    assert_eq!(
        slots,
        [(w(1), SlotId(0)), (w(2), SlotId(1)), (w(3), SlotId(2))]
    );
    let binds = sim
        .log
        .iter()
        .filter(|(_, a)| matches!(a, Action::Bind { .. }))
        .count();
    assert_eq!(binds, 1, "one listener for everyone");
    for worker in [w(1), w(2), w(3)] {
        let kinds: Vec<&str> = sim.events_of(worker).iter().map(kind).collect();
        assert_eq!(kinds, ["Fork", "Online", "Listening"]);
        let welcome = &sim.workers[&worker].inbox[0];
        assert_eq!(
            welcome,
            &(
                Some(1),
                ToWorker::Welcome {
                    primary_pid: 4242,
                    protocol_version: PROTOCOL_VERSION,
                    drain_timeout_ms: 9_000,
                    max_message_len: 1 << 20,
                    load_reports: false,
                    heartbeat_interval_ms: 0,
                }
            )
        );
    }
    let ready = sim
        .events
        .iter()
        .position(|(_, e)| matches!(e, Event::Ready { .. }))
        .unwrap();
    let last_listening = sim
        .events
        .iter()
        .rposition(|(_, e)| matches!(e, Event::Listening { .. }))
        .unwrap();
    assert_eq!(
        ready,
        last_listening + 1,
        "Ready right after the last Listening"
    );
    assert!(matches!(&sim.events[ready].1, Event::Ready { addrs } if addrs == &[addr(8000)]));
    assert!(accepting(&sim, sim.the_listener()));
    assert_eq!(
        sim.sup.poll_timeout(),
        None,
        "nothing to time once all listen"
    );
    sim.assert_clean();
}

fn kind(event: &Event) -> &'static str {
    match event {
        Event::Fork { .. } => "Fork",
        Event::Online { .. } => "Online",
        Event::Listening { .. } => "Listening",
        Event::Ready { .. } => "Ready",
        Event::Message { .. } => "Message",
        Event::Disconnect { .. } => "Disconnect",
        Event::Exit { .. } => "Exit",
        Event::Hung { .. } => "Hung",
        Event::RolloutStarted { .. } => "RolloutStarted",
        Event::RolloutStep { .. } => "RolloutStep",
        Event::RolloutFinished { .. } => "RolloutFinished",
        Event::RolloutAborted { .. } => "RolloutAborted",
        Event::Scaled { .. } => "Scaled",
        Event::Recycling { .. } => "Recycling",
    }
}

#[test]
fn a_worker_that_never_says_hello_is_killed_at_the_start_timeout_and_replaced() {
    let mut sim = Sim::new(settings(1));
    sim.scripts.push_back(Script {
        hello: Hello::Never,
        ..Script::default()
    });
    sim.start();
    sim.advance(START_TIMEOUT - MS);
    assert!(sim.signals_to(w(1)).is_empty());
    sim.advance(MS);
    assert_eq!(sim.signals_to(w(1)), [Signal::SIGKILL]);
    assert_eq!(
        exit_status(&sim, w(1)),
        Some((ExitStatus::Signal(Signal::SIGKILL), false))
    );
    // A first failure is respawned at once; the replacement says Hello.
    assert_eq!(
        spawns(&sim).last().map(|s| (s.0, s.2)),
        Some((START_TIMEOUT, SlotId(0)))
    );
    assert_eq!(sim.serving(), [w(2)]);
    sim.settle();
    sim.assert_clean();
}

#[test]
fn a_killed_starting_worker_is_not_timed_again_while_it_dies() {
    // The kill is sent; the process takes its time to be reaped. The start timer must not
    // stay in the past (a busy loop in the shell) nor send the kill again.
    let mut sup = crate::supervisor::Supervisor::new(settings(1));
    let t0 = std::time::Instant::now();
    sup.start(t0);
    while sup.poll_action().is_some() {}
    sup.handle_spawned(w(1), 100);
    while sup.poll_action().is_some() {}
    sup.handle_timeout(t0 + START_TIMEOUT);
    let kills = std::iter::from_fn(|| sup.poll_action())
        .filter(|a| matches!(a, Action::Signal { .. }))
        .count();
    assert_eq!(kills, 1);
    assert!(
        sup.poll_timeout().is_none_or(|at| at > t0 + START_TIMEOUT),
        "next timeout {:?} is not after the kill",
        sup.poll_timeout().map(|at| at - t0)
    );
    sup.handle_timeout(t0 + START_TIMEOUT + MS);
    assert!(
        !std::iter::from_fn(|| sup.poll_action()).any(|a| matches!(a, Action::Signal { .. })),
        "killed twice"
    );
}

#[test]
fn a_hello_with_another_protocol_version_is_refused_and_the_worker_killed() {
    let mut sim = Sim::new(settings(1));
    sim.scripts.push_back(Script {
        hello: Hello::WrongVersion,
        ..Script::default()
    });
    sim.start();
    let inbox = &sim.workers[&w(1)].inbox;
    assert!(
        matches!(&inbox[..], [(Some(1), ToWorker::Refused { reason })] if reason.contains("protocol version")),
        "{inbox:?}"
    );
    assert_eq!(sim.signals_to(w(1)), [Signal::SIGKILL]);
    let kinds: Vec<&str> = sim.events_of(w(1)).iter().map(kind).collect();
    assert_eq!(kinds, ["Fork", "Disconnect", "Exit"], "never Online");
    assert_eq!(
        sim.serving(),
        [w(2)],
        "replaced by a worker that says the right Hello"
    );
    sim.assert_clean();
}

#[test]
fn a_hello_claiming_another_worker_id_is_refused() {
    let mut sim = Sim::new(settings(1));
    sim.scripts.push_back(Script {
        hello: Hello::WrongId,
        ..Script::default()
    });
    sim.start();
    let inbox = &sim.workers[&w(1)].inbox;
    assert!(
        matches!(&inbox[..], [(Some(1), ToWorker::Refused { .. })]),
        "{inbox:?}"
    );
    assert_eq!(sim.signals_to(w(1)), [Signal::SIGKILL]);
    sim.assert_clean();
}

// ----- dispatch -----

#[test]
fn connections_go_round_and_are_released_once_acked() {
    let mut sim = cluster(2);
    let l = sim.the_listener();
    sim.connect(l, 2);
    assert_eq!(sim.handed_to(w(1)), [ConnId(1)]);
    assert_eq!(sim.handed_to(w(2)), [ConnId(2)]);
    assert!(sim.released().is_empty(), "nothing released before an ack");
    sim.ack(w(2), l, 1);
    assert_eq!(sim.released(), [ConnId(2)]);
    sim.ack(w(1), l, 1);
    assert_eq!(sim.released(), [ConnId(2), ConnId(1)]);
    let info = sim.sup.worker(w(1), sim.now).unwrap();
    assert_eq!((info.connections_acked, info.in_flight), (1, 0));
    sim.assert_clean();
}

#[test]
fn accept_pauses_while_no_worker_has_credit_and_clients_wait_in_the_backlog() {
    let mut sim = cluster(2);
    let l = sim.the_listener();
    // Two in flight (a window each), two pending (a window per worker): accept pauses
    // and the fifth client waits in the kernel's backlog.
    sim.connect(l, 5);
    assert!(!accepting(&sim, l));
    assert_eq!(sim.listeners[&l].backlog, 1);
    assert_eq!(sim.sup.status(sim.now).pending_connections, 2);
    sim.ack(w(1), l, 1);
    // Conn 3 goes to worker 1, accept resumes, the fifth is accepted, accept pauses again.
    assert_eq!(sim.handed_to(w(1)), [ConnId(1), ConnId(3)]);
    assert_eq!(sim.listeners[&l].backlog, 0);
    assert!(!accepting(&sim, l));
    sim.ack_all(w(1));
    sim.ack_all(w(2));
    sim.ack_all(w(1));
    sim.ack_all(w(2));
    assert_eq!(sim.released().len(), 5);
    assert!(accepting(&sim, l));
    sim.assert_clean();
}

#[test]
fn returned_connections_go_out_again_before_the_others() {
    let mut sim = cluster(2);
    let l = sim.the_listener();
    sim.connect(l, 4);
    sim.ack(w(1), l, 1); // conn 1 served by worker 1, conn 3 handed to it
    let again = sim.give_back(w(1), l, &[ConnId(1)]);
    assert_eq!(
        sim.places()[&again[0]],
        Place::Pending,
        "no worker has credit"
    );
    sim.ack(w(2), l, 1);
    assert_eq!(
        sim.handed_to(w(2)),
        [ConnId(2), again[0]],
        "the returned connection goes before conn 4"
    );
    sim.assert_clean();
}

#[test]
fn least_connections_follows_the_load_reports() {
    let settings = Settings {
        policy: Policy::LeastConnections,
        ..window(settings(2), 4)
    };
    let mut sim = cluster_with(settings, Script::default());
    let l = sim.the_listener();
    assert!(matches!(
        sim.workers[&w(1)].inbox[0].1,
        ToWorker::Welcome {
            load_reports: true,
            ..
        }
    ));
    sim.say(
        w(1),
        ToPrimary::LoadReport {
            open_connections: 10,
        },
    );
    sim.say(
        w(2),
        ToPrimary::LoadReport {
            open_connections: 0,
        },
    );
    sim.connect(l, 3);
    assert_eq!(sim.handed_to(w(2)), [ConnId(1), ConnId(2), ConnId(3)]);
    sim.ack_all(w(2));
    sim.say(
        w(2),
        ToPrimary::LoadReport {
            open_connections: 50,
        },
    );
    sim.connect(l, 1);
    assert_eq!(sim.handed_to(w(1)), [ConnId(4)]);
    assert_eq!(
        sim.sup.worker(w(2), sim.now).unwrap().open_connections,
        Some(50)
    );
    sim.assert_clean();
}

#[test]
fn running_out_of_fds_pauses_accepting_for_a_while() {
    let mut sim = cluster(1);
    let l = sim.the_listener();
    sim.fds_exhausted(l);
    assert!(!accepting(&sim, l));
    sim.connect(l, 1);
    assert_eq!(sim.listeners[&l].backlog, 1);
    sim.advance(99 * MS);
    assert!(!accepting(&sim, l));
    sim.advance(MS);
    assert!(accepting(&sim, l));
    assert_eq!(
        sim.handed_to(w(1)),
        [ConnId(1)],
        "the waiting client is accepted"
    );
    sim.assert_clean();
}

// ----- workers that die -----

#[test]
fn a_dead_workers_connections_in_flight_go_to_another_worker() {
    for eof_first in [false, true] {
        let mut sim = cluster_with(window(settings(2), 2), Script::default());
        sim.eof_first = eof_first;
        let l = sim.the_listener();
        sim.connect(l, 2);
        assert_eq!(sim.handed_to(w(1)), [ConnId(1)]);
        sim.crash(w(1));
        assert_eq!(
            sim.handed_to(w(2)),
            [ConnId(2), ConnId(1)],
            "eof_first {eof_first}"
        );
        assert!(sim.released().is_empty());
        // The replacement starts at once (a first failure) and joins.
        assert_eq!(sim.serving(), [w(2), w(3)]);
        sim.ack_all(w(2));
        assert_eq!(sim.released(), [ConnId(2), ConnId(1)]);
        sim.assert_clean();
    }
}

#[test]
fn an_ack_read_before_the_exit_counts_once_and_the_rest_goes_elsewhere() {
    let mut sim = cluster_with(window(settings(2), 2), Script::default());
    let l = sim.the_listener();
    sim.connect(l, 3); // 1 and 3 to worker 1, 2 to worker 2
    assert_eq!(sim.handed_to(w(1)), [ConnId(1), ConnId(3)]);
    sim.ack(w(1), l, 1);
    sim.crash(w(1));
    assert_eq!(sim.released(), [ConnId(1)]);
    assert_eq!(sim.handed_to(w(2)), [ConnId(2), ConnId(3)]);
    assert_eq!(sim.places()[&ConnId(1)], Place::Gone);
    sim.assert_clean();
}

#[test]
fn a_stray_ack_after_the_exit_changes_nothing() {
    let mut sim = cluster_with(window(settings(2), 2), Script::default());
    let l = sim.the_listener();
    sim.connect(l, 1);
    // Right after handle_exited, before its actions are carried out, then again once the
    // worker is forgotten: neither ack may release anything or signal anyone.
    sim.exit_and_then(w(1), ExitStatus::Code(1), |sup, now| {
        sup.handle_handoff(
            w(1),
            l,
            cluster_ipc::proto::HandoffToPrimary::ConnectionsAck { count: 1 },
            Vec::new(),
            now,
        );
    });
    sim.raw_ack(w(1), l, 1);
    sim.raw_ack(w(1), l, 7);
    assert!(sim.released().is_empty());
    assert_eq!(sim.handed_to(w(2)), [ConnId(1)]);
    assert!(sim.signals_to(w(1)).is_empty());
    sim.ack_all(w(2));
    assert_eq!(sim.released(), [ConnId(1)]);
    sim.assert_clean();
}

#[test]
fn disconnect_comes_before_exit_and_the_worker_is_listed_as_disconnected_meanwhile() {
    let mut sim = cluster(2);
    // The worker closes its control channel and lingers: Disconnect now, listed as
    // Disconnected, killed after the grace period, Exit then.
    sim.close_control(w(1), None);
    assert_eq!(
        sim.disconnect_states,
        [(w(1), Some(WorkerState::Disconnected))]
    );
    let kinds: Vec<&str> = sim.events_of(w(1)).iter().map(kind).collect();
    assert_eq!(kinds, ["Fork", "Online", "Listening", "Disconnect"]);
    assert_eq!(
        sim.sup.worker(w(1), sim.now).unwrap().state,
        WorkerState::Disconnected
    );
    sim.advance(SHUTDOWN_TIMEOUT - MS);
    assert!(sim.signals_to(w(1)).is_empty());
    sim.advance(MS);
    assert_eq!(sim.signals_to(w(1)), [Signal::SIGKILL]);
    let kinds: Vec<&str> = sim.events_of(w(1)).iter().map(kind).collect();
    assert_eq!(kinds, ["Fork", "Online", "Listening", "Disconnect", "Exit"]);
    assert!(
        sim.sup.worker(w(1), sim.now).is_none(),
        "forgotten once its Exit is taken"
    );
    // A crash: both events at once, in that order, listed as Disconnected during the first.
    sim.crash(w(2));
    assert_eq!(
        sim.disconnect_states[1],
        (w(2), Some(WorkerState::Disconnected))
    );
    let kinds: Vec<&str> = sim.events_of(w(2)).iter().map(kind).collect();
    assert_eq!(kinds, ["Fork", "Online", "Listening", "Disconnect", "Exit"]);
    sim.assert_clean();
}

#[test]
fn a_worker_listening_on_two_addresses_is_served_on_both() {
    let script = Script::listening_on(&[addr(8000), addr(8001)]);
    let mut sim = cluster_with(settings(2), script);
    assert_eq!(sim.listeners.len(), 2);
    let (a, b) = (sim.listener_at(addr(8000)), sim.listener_at(addr(8001)));
    for worker in [w(1), w(2)] {
        let listening = sim
            .events_of(worker)
            .iter()
            .filter(|e| matches!(e, Event::Listening { .. }))
            .count();
        assert_eq!(listening, 2);
        assert_eq!(sim.workers[&worker].handoffs.len(), 2);
    }
    let ready: Vec<&Event> = sim
        .events
        .iter()
        .map(|(_, e)| e)
        .filter(|e| matches!(e, Event::Ready { .. }))
        .collect();
    assert_eq!(
        ready,
        [&Event::Ready {
            addrs: vec![addr(8000), addr(8001)]
        }]
    );
    sim.connect(a, 2);
    sim.connect(b, 2);
    assert_eq!(
        sim.in_flight(w(1), a).len() + sim.in_flight(w(2), a).len(),
        2
    );
    assert_eq!(
        sim.in_flight(w(1), b).len() + sim.in_flight(w(2), b).len(),
        2
    );
    // Its death gives back what it had on both listeners.
    let lost = [sim.in_flight(w(1), a), sim.in_flight(w(1), b)].concat();
    sim.crash(w(1));
    assert_eq!(lost.len(), 2);
    for conn in lost {
        assert!(matches!(
            sim.places()[&conn],
            Place::Pending | Place::InFlight(_)
        ));
    }
    sim.settle();
    sim.ack_all(w(2));
    sim.ack_all(w(3));
    assert_eq!(sim.released().len(), 4);
    sim.assert_clean();
}

#[test]
fn a_worker_that_disconnects_by_itself_is_replaced_after_it_exits() {
    let mut sim = cluster(2);
    let l = sim.the_listener();
    sim.say(w(1), ToPrimary::Disconnecting);
    sim.connect(l, 1);
    assert!(
        sim.handed_to(w(1)).is_empty(),
        "nothing more for a leaving worker"
    );
    assert_eq!(sim.handed_to(w(2)), [ConnId(1)]);
    assert_eq!(spawns(&sim).len(), 2, "not replaced before it is gone");
    sim.exit(w(1), ExitStatus::Code(0));
    assert_eq!(exit_status(&sim, w(1)), Some((ExitStatus::Code(0), true)));
    let exit = position(&sim, |a| is_exit_of(a, w(1))).unwrap();
    let respawn = position(
        &sim,
        |a| matches!(a, Action::Spawn { worker, .. } if *worker == w(3)),
    );
    assert!(respawn.is_some_and(|at| at > exit));
    assert_eq!(spawns(&sim)[2].2, SlotId(0));
    sim.assert_clean();
}

#[test]
fn a_worker_that_leaves_by_itself_gets_the_shutdown_timeout_to_go() {
    let mut sim = cluster(1);
    sim.workers.get_mut(&w(1)).unwrap().script.on_disconnect = OnDisconnect::Hang;
    sim.say(w(1), ToPrimary::Disconnecting);
    sim.advance(SHUTDOWN_TIMEOUT - MS);
    assert!(sim.signals_to(w(1)).is_empty());
    sim.advance(MS);
    assert_eq!(sim.signals_to(w(1)), [Signal::SIGKILL]);
    assert_eq!(
        exit_status(&sim, w(1)),
        Some((ExitStatus::Signal(Signal::SIGKILL), true))
    );
    assert_eq!(sim.serving(), [w(2)]);
    sim.assert_clean();
}

#[test]
fn a_retiring_workers_replacement_starts_before_it_leaves() {
    let mut sim = cluster(2);
    let l = sim.the_listener();
    let seq = sim.say(w(1), ToPrimary::Retire);
    assert_eq!(
        sim.workers[&w(1)].inbox.last(),
        Some(&(Some(seq), ToWorker::Ack))
    );
    assert_eq!(spawns(&sim)[2].1, w(3));
    assert_eq!(spawns(&sim)[2].2, SlotId(0), "its own slot");
    assert!(
        sim.workers[&w(1)].alive,
        "the replacement starts while it still runs"
    );
    assert_eq!(sim.serving(), [w(2), w(3)]);
    sim.connect(l, 3);
    assert!(sim.handed_to(w(1)).is_empty());
    sim.exit(w(1), ExitStatus::Code(0));
    assert_eq!(spawns(&sim).len(), 3, "replaced once only");
    sim.settle();
    assert_eq!(sim.serving(), [w(2), w(3)]);
    sim.assert_clean();
}

#[test]
fn a_retire_after_the_primary_asked_the_worker_to_go_does_not_refill_its_slot() {
    let mut sim = cluster(2);
    sim.workers.get_mut(&w(1)).unwrap().script.on_disconnect = OnDisconnect::Hang;
    sim.disconnect(w(1)).unwrap();
    // The worker's Retire crossed the primary's Disconnect.
    sim.say(w(1), ToPrimary::Retire);
    sim.exit(w(1), ExitStatus::Code(0));
    sim.settle();
    assert_eq!(spawns(&sim).len(), 2, "slot 0 stays empty");
    assert_eq!(sim.serving(), [w(2)]);
    sim.assert_clean();
}

// ----- respawn -----

#[test]
fn a_failing_slot_respawns_after_0_100_200_ms_and_so_on_up_to_5_s() {
    let mut sim = cluster(1);
    for _ in 0..9 {
        // Listening, but for less than a second: a failed start.
        let current = *sim.serving().last().unwrap();
        sim.crash(current);
        if sim.serving().is_empty() {
            assert!(sim.next_timeout(), "a respawn is due");
        }
    }
    let times = sim.spawn_times(SlotId(0));
    assert_eq!(
        gaps(&times),
        ms(&[0, 100, 200, 400, 800, 1600, 3200, 5000, 5000])
    );
    sim.assert_clean();
}

#[test]
fn spawn_failures_back_off_the_same_way() {
    let mut sim = Sim::new(settings(1));
    sim.default_script.spawn_fails = true;
    sim.start();
    sim.advance(Duration::from_secs(25));
    let times = sim.spawn_times(SlotId(0));
    assert_eq!(
        gaps(&times[..10]),
        ms(&[0, 100, 200, 400, 800, 1600, 3200, 5000, 5000])
    );
    // Once the program can start again, the next respawn brings the slot back.
    sim.default_script.spawn_fails = false;
    sim.advance(Duration::from_secs(5));
    assert_eq!(sim.serving().len(), 1);
    assert_eq!(
        sim.sup.status(sim.now).restarts as usize,
        spawns(&sim).len() - 1
    );
    sim.assert_clean();
}

#[test]
fn a_stable_worker_resets_the_backoff() {
    let mut sim = cluster(1);
    for _ in 0..3 {
        let current = *sim.serving().last().unwrap();
        sim.crash(current);
        sim.advance(Duration::from_secs(1));
    }
    // Three failures: the third respawn waited 200 ms. This one lives a second, listening.
    let current = *sim.serving().last().unwrap();
    sim.advance(Duration::from_secs(1));
    sim.crash(current);
    let last = spawns(&sim).last().unwrap().0;
    assert_eq!(last, sim.elapsed(), "respawned at once after a stable run");
    let current = *sim.serving().last().unwrap();
    sim.crash(current);
    assert_eq!(
        spawns(&sim).last().unwrap().0,
        sim.elapsed(),
        "one failure: at once"
    );
    let current = *sim.serving().last().unwrap();
    sim.crash(current);
    sim.advance(Duration::from_millis(99));
    let before = spawns(&sim).len();
    sim.advance(MS);
    assert_eq!(spawns(&sim).len(), before + 1, "two failures: after 100 ms");
    sim.assert_clean();
}

#[test]
fn a_worker_that_never_listened_failed_its_start_however_long_it_ran() {
    let script = Script {
        listen: Vec::new(),
        ..Script::default()
    };
    let mut sim = cluster_with(settings(1), script);
    sim.advance(Duration::from_secs(2));
    sim.crash(w(1));
    sim.advance(Duration::from_secs(2));
    sim.crash(w(2));
    let times = sim.spawn_times(SlotId(0));
    assert_eq!(times, [Duration::ZERO, Duration::from_secs(2)]);
    sim.advance(Duration::from_millis(100));
    assert_eq!(spawns(&sim).last().unwrap().0, Duration::from_millis(4_100));
    sim.assert_clean();
}

#[test]
fn with_respawn_off_the_cluster_finishes_when_its_last_worker_exits() {
    let settings = Settings {
        respawn: crate::config::Respawn::Never,
        ..settings(2)
    };
    let mut sim = cluster_with(settings, Script::default());
    sim.crash(w(1));
    assert!(!sim.finished);
    sim.exit(w(2), ExitStatus::Code(0));
    assert_eq!(spawns(&sim).len(), 2);
    assert!(sim.finished);
    assert_eq!(sim.log.last().unwrap().1, Action::Finished);
    sim.assert_clean();
}

// ----- the primary's commands -----

#[test]
fn disconnecting_one_worker_leaves_its_slot_empty() {
    let mut sim = cluster(2);
    let l = sim.the_listener();
    sim.connect(l, 1);
    sim.disconnect(w(1)).unwrap();
    assert_eq!(
        sim.workers[&w(1)].inbox.last(),
        Some(&(None, ToWorker::Disconnect))
    );
    // It acks what it had and exits.
    assert_eq!(sim.released(), [ConnId(1)]);
    assert_eq!(exit_status(&sim, w(1)), Some((ExitStatus::Code(0), true)));
    sim.advance(Duration::from_secs(60));
    assert_eq!(spawns(&sim).len(), 2, "not replaced");
    assert_eq!(sim.serving(), [w(2)]);
    assert_eq!(sim.disconnect(w(1)), Err(Refusal::NoSuchWorker));
    sim.connect(l, 2);
    assert_eq!(sim.handed_to(w(2)), [ConnId(2)]);
    sim.assert_clean();
}

#[test]
fn stop_closes_what_is_pending_disconnects_every_worker_and_finishes_once_they_exit() {
    let mut sim = cluster(2);
    let l = sim.the_listener();
    for worker in [w(1), w(2)] {
        sim.workers.get_mut(&worker).unwrap().script.on_disconnect = OnDisconnect::Hang;
    }
    sim.connect(l, 4); // two in flight, two pending
    sim.stop(true);
    assert_eq!(
        sim.released(),
        [ConnId(3), ConnId(4)],
        "the pending ones are closed"
    );
    assert!(!accepting(&sim, l), "no more accepting once stopping");
    for worker in [w(1), w(2)] {
        assert_eq!(
            sim.workers[&worker].inbox.last(),
            Some(&(None, ToWorker::Disconnect))
        );
    }
    assert!(!sim.finished);
    sim.ack_all(w(1));
    sim.exit(w(1), ExitStatus::Code(0));
    // Worker 2 dies with its connection unread: the primary closes its copy.
    sim.exit(w(2), ExitStatus::Code(0));
    assert_eq!(sim.released(), [ConnId(3), ConnId(4), ConnId(1), ConnId(2)]);
    assert_eq!(sim.log.last().unwrap().1, Action::Finished);
    assert_eq!(spawns(&sim).len(), 2, "nothing respawned while stopping");
    sim.connect(l, 1);
    assert_eq!(
        sim.listeners[&l].backlog, 1,
        "nobody accepts after the stop"
    );
    sim.assert_clean();
}

#[test]
fn stopping_turns_accepting_off_even_when_workers_have_credit() {
    for graceful in [true, false] {
        let mut sim = cluster(2);
        let l = sim.the_listener();
        assert!(accepting(&sim, l));
        sim.stop(graceful);
        let off = Action::Accept {
            listener: l,
            on: false,
        };
        assert!(
            sim.log.iter().any(|(_, a)| *a == off),
            "graceful {graceful}"
        );
        sim.connect(l, 3);
        assert_eq!(
            sim.listeners[&l].backlog, 3,
            "clients wait; none is accepted to be closed"
        );
        sim.assert_clean();
    }
}

#[test]
fn a_worker_that_does_not_exit_is_killed_at_the_shutdown_timeout() {
    let mut sim = cluster(2);
    sim.workers.get_mut(&w(2)).unwrap().script.on_disconnect = OnDisconnect::Hang;
    let l = sim.the_listener();
    sim.connect(l, 2);
    sim.stop(true);
    assert!(!sim.workers[&w(1)].alive, "worker 1 acked and left");
    sim.advance(SHUTDOWN_TIMEOUT - MS);
    assert!(sim.signals_to(w(2)).is_empty());
    assert!(!sim.finished);
    sim.advance(MS);
    assert_eq!(sim.signals_to(w(2)), [Signal::SIGKILL]);
    assert!(sim.finished);
    assert_eq!(
        sim.places()[&ConnId(2)],
        Place::Closed,
        "its un-acked connection closed"
    );
    sim.assert_clean();
}

#[test]
fn an_immediate_stop_or_a_second_one_kills_every_worker_at_once() {
    for twice in [false, true] {
        let mut sim = cluster(2);
        for worker in [w(1), w(2)] {
            sim.workers.get_mut(&worker).unwrap().script.on_disconnect = OnDisconnect::Hang;
        }
        if twice {
            sim.stop(true);
            sim.advance(Duration::from_secs(1));
            assert!(sim.signals_to(w(1)).is_empty());
        }
        sim.stop(false);
        for worker in [w(1), w(2)] {
            assert_eq!(sim.signals_to(worker), [Signal::SIGKILL], "twice: {twice}");
        }
        assert!(sim.finished);
        sim.assert_clean();
    }
}

#[test]
fn stopping_while_a_worker_starts_sends_it_sigterm() {
    let mut sim = Sim::new(settings(1));
    sim.scripts.push_back(Script {
        hello: Hello::Never,
        ..Script::default()
    });
    sim.start();
    sim.stop(true);
    assert_eq!(sim.signals_to(w(1)), [Signal::SIGTERM]);
    assert_eq!(
        exit_status(&sim, w(1)),
        Some((ExitStatus::Signal(Signal::SIGTERM), true))
    );
    assert!(sim.finished);
    sim.assert_clean();
}

// ----- listening -----

#[test]
fn a_bind_error_is_refused_to_every_worker_waiting_for_it() {
    let mut sim = Sim::new(settings(2));
    sim.defer_binds = true;
    // Out of fds: a failure that may pass (an unfixable one stops the cluster, see the
    // lifecycle tests).
    let refused = ListenRefused {
        errno: libc::EMFILE,
        message: "too many open files".into(),
    };
    sim.bind_errors.insert(addr(8000), refused.clone());
    sim.start();
    let binds = sim
        .log
        .iter()
        .filter(|(_, a)| matches!(a, Action::Bind { .. }))
        .count();
    assert_eq!(binds, 1, "the second worker waits for the first one's bind");
    sim.answer_binds();
    for worker in [w(1), w(2)] {
        assert_eq!(
            sim.workers[&worker].refused,
            [(addr(8000), refused.clone())]
        );
        assert_eq!(
            sim.sup.worker(worker, sim.now).unwrap().state,
            WorkerState::Online
        );
    }
    // A failed bind is forgotten: a later request tries again.
    sim.bind_errors.clear();
    let request = ListenRequest {
        addr: ListenAddr::Tcp(addr(8000)),
        mode: None,
        index: 0,
    };
    sim.say(w(1), ToPrimary::Listen(request));
    sim.answer_binds();
    assert_eq!(sim.workers[&w(1)].granted.len(), 1);
    sim.assert_clean();
}

#[test]
fn listen_requests_the_primary_cannot_serve_are_refused() {
    let mut sim = cluster(1);
    let tcp = |port, mode| {
        ToPrimary::Listen(ListenRequest {
            addr: ListenAddr::Tcp(addr(port)),
            mode,
            index: 0,
        })
    };
    let cases = [
        (tcp(8000, None), ListenRefused::address_in_use("").errno), // already listens there
        (
            tcp(8000, Some(ListenMode::Shared)),
            ListenRefused::address_in_use("").errno,
        ), // another mode
        (
            tcp(9000, Some(ListenMode::ReusePort)),
            ListenRefused::not_supported("").errno,
        ),
        (
            ToPrimary::Listen(ListenRequest {
                addr: ListenAddr::unix("/tmp/sock"),
                mode: None,
                index: 0,
            }),
            ListenRefused::family_not_supported("").errno,
        ),
    ];
    for (request, errno) in cases {
        let seq = sim.say(w(1), request.clone());
        let reply = sim.workers[&w(1)].inbox.last().unwrap().clone();
        assert!(
            matches!(&reply, (Some(s), ToWorker::ListenRefused(r)) if *s == seq && r.errno == errno),
            "{request:?}: {reply:?}"
        );
    }
    // A worker on its way out may not listen.
    sim.workers.get_mut(&w(1)).unwrap().script.on_disconnect = OnDisconnect::Hang;
    sim.say(w(1), ToPrimary::Disconnecting);
    sim.say(w(1), tcp(9001, None));
    let reply = sim.workers[&w(1)].inbox.last().unwrap().clone();
    assert!(
        matches!(&reply, (_, ToWorker::ListenRefused(r)) if r.errno == ListenRefused::shutting_down("").errno)
    );
    sim.assert_clean();
}

#[test]
fn every_workers_first_port_zero_is_one_listener_and_the_second_another() {
    let script = Script::listening_on(&[addr(0), addr(0)]);
    let mut sim = cluster_with(settings(2), script);
    assert_eq!(sim.listeners.len(), 2);
    let ports: Vec<u16> = sim.listeners.values().map(|l| l.addr.port()).collect();
    assert_eq!(ports, [40_000, 40_001]);
    for worker in [w(1), w(2)] {
        let granted: Vec<ListenerId> = sim.workers[&worker].granted.keys().copied().collect();
        assert_eq!(granted, [ListenerId(1), ListenerId(2)]);
    }
    sim.assert_clean();
}

#[test]
fn shared_mode_grants_the_listening_socket_itself() {
    let settings = Settings {
        mode: ListenMode::Shared,
        ..settings(2)
    };
    let mut sim = cluster_with(settings, Script::default());
    let l = sim.the_listener();
    for worker in [w(1), w(2)] {
        assert_eq!(
            sim.workers[&worker].granted[&l],
            (addr(8000), Delivery::Shared)
        );
        assert!(sim.workers[&worker].handoffs.is_empty());
    }
    assert!(
        sim.events
            .iter()
            .any(|(_, e)| matches!(e, Event::Ready { .. }))
    );
    let accepts = position(&sim, |a| matches!(a, Action::Accept { .. }));
    assert_eq!(
        accepts, None,
        "the primary does not accept on a shared socket"
    );
    // A worker that closes it, and one that dies, leave it; a new worker joins.
    sim.say(w(1), ToPrimary::CloseListener { listener: l });
    sim.crash(w(2));
    let members = &sim.sup.listeners_for_tests().get(l).unwrap().members;
    assert_eq!(members.iter().copied().collect::<Vec<_>>(), [w(3)]);
    // Connections accepted on it (there should be none) are not kept.
    sim.sup.handle_accepted(l, &[ConnId(77)]);
    assert_eq!(
        sim.sup.poll_action(),
        Some(Action::Release {
            conns: vec![ConnId(77)]
        })
    );
    sim.assert_clean();
}

#[test]
fn a_grant_whose_fd_cannot_be_made_is_refused() {
    let mut sim = Sim::new(settings(2));
    sim.scripts.push_back(Script {
        grant_fails: true,
        ..Script::default()
    });
    sim.start();
    let refused = &sim.workers[&w(1)].refused;
    assert!(
        matches!(&refused[..], [(a, r)] if *a == addr(8000) && r.errno == ListenRefused::invalid("").errno)
    );
    assert!(sim.log.iter().any(|(_, a)| *a
        == Action::CloseHandoff {
            worker: w(1),
            listener: ListenerId(1)
        }));
    let l = sim.the_listener();
    sim.connect(l, 2);
    assert!(sim.handed_to(w(1)).is_empty());
    assert_eq!(sim.handed_to(w(2)), [ConnId(1)]);
    assert!(
        !sim.events
            .iter()
            .any(|(_, e)| matches!(e, Event::Ready { .. })),
        "not ready: worker 1 does not listen"
    );
    sim.assert_clean();
}

#[test]
fn a_failed_grant_leaves_no_handoff_behind_it() {
    // A connection waits when the replacement joins, and is dispatched to it behind the
    // grant; the grant fails: that handoff must not go out (there is no socket for it), and
    // the connection waits for the next worker.
    let mut sim = cluster(1);
    let l = sim.the_listener();
    sim.connect(l, 1);
    sim.scripts.push_back(Script {
        grant_fails: true,
        ..Script::default()
    });
    sim.crash(w(1));
    assert!(sim.handed_to(w(2)).is_empty());
    assert_eq!(sim.places()[&ConnId(1)], Place::Pending);
    sim.crash(w(2));
    sim.settle();
    assert_eq!(sim.handed_to(w(3)), [ConnId(1)]);
    sim.assert_clean();
}

#[test]
fn closing_a_listener_sends_its_connections_elsewhere() {
    let mut sim = cluster_with(window(settings(2), 2), Script::default());
    let l = sim.the_listener();
    sim.connect(l, 2);
    sim.say(w(1), ToPrimary::CloseListener { listener: l });
    sim.connect(l, 1);
    assert_eq!(
        sim.handed_to(w(1)),
        [ConnId(1)],
        "nothing new once it closes"
    );
    sim.close_handoff(w(1), l, None);
    assert_eq!(sim.handed_to(w(2)), [ConnId(2), ConnId(3)]);
    assert_eq!(
        sim.places()[&ConnId(1)],
        Place::Pending,
        "worker 2 is full; it waits"
    );
    sim.ack_all(w(2));
    assert_eq!(sim.handed_to(w(2)), [ConnId(2), ConnId(3), ConnId(1)]);
    assert_eq!(sim.serving(), [w(1), w(2)], "the worker itself stays");
    sim.assert_clean();
}

#[test]
fn user_messages_become_message_events() {
    let mut sim = cluster(1);
    let message = UserMessage::from_bytes(b"hi".to_vec());
    sim.say(w(1), ToPrimary::User(message.clone()));
    assert_eq!(
        sim.events.last().unwrap().1,
        Event::Message {
            worker: w(1),
            message
        }
    );
    assert_eq!(sim.sup.reachable_workers(), [w(1)]);
    sim.assert_clean();
}

// ----- protocol violations -----

/// The worker is killed (once), its channel closed, its connections given to another
/// worker, and it is replaced.
fn assert_killed_and_replaced(sim: &mut Sim, worker: WorkerId) {
    assert_eq!(sim.signals_to(worker), [Signal::SIGKILL], "{worker}");
    let group = sim
        .log
        .iter()
        .any(|(_, a)| matches!(a, Action::Signal { worker: w, group: true, .. } if *w == worker));
    assert!(group, "the whole process group");
    assert!(!sim.workers[&worker].alive);
    assert_eq!(sim.serving().len(), sim.settings().workers);
    sim.settle();
    sim.assert_clean();
}

#[test]
fn control_channel_violations_kill_the_worker_and_it_is_replaced() {
    let violations: Vec<ToPrimary> = vec![
        ToPrimary::Hello {
            worker_id: w(1),
            pid: 1,
            protocol_version: PROTOCOL_VERSION,
        },
        ToPrimary::Listening {
            listener: ListenerId(99),
            local_addr: ListenAddr::Tcp(addr(1)),
        },
    ];
    for msg in violations {
        let mut sim = cluster_with(window(settings(2), 2), Script::default());
        let l = sim.the_listener();
        sim.connect(l, 2);
        sim.say(w(1), msg);
        assert!(
            sim.log
                .iter()
                .any(|(_, a)| *a == Action::CloseControl { worker: w(1) }),
            "its channel is closed"
        );
        assert_eq!(sim.handed_to(w(2)), [ConnId(2), ConnId(1)]);
        assert_killed_and_replaced(&mut sim, w(1));
    }
    // A broken channel.
    let mut sim = cluster(2);
    sim.close_control(w(1), Some("bad frame"));
    assert_killed_and_replaced(&mut sim, w(1));
}

#[test]
fn a_message_before_hello_is_a_violation() {
    let mut sim = Sim::new(settings(1));
    sim.scripts.push_back(Script {
        hello: Hello::Never,
        ..Script::default()
    });
    sim.start();
    sim.say(w(1), ToPrimary::Disconnecting);
    assert_killed_and_replaced(&mut sim, w(1));
}

#[test]
fn handoff_socket_violations_kill_the_worker_and_it_is_replaced() {
    for how in 0..3 {
        let mut sim = cluster_with(window(settings(2), 2), Script::default());
        let l = sim.the_listener();
        sim.connect(l, 2);
        match how {
            0 => sim.raw_ack(w(1), l, 2), // acks more than it was handed
            1 => sim.bad_return(w(1), l), // a count that is not the fds'
            _ => sim.close_handoff(w(1), l, Some("bad frame")),
        }
        assert_eq!(sim.handed_to(w(2)), [ConnId(2), ConnId(1)], "case {how}");
        assert_killed_and_replaced(&mut sim, w(1));
    }
}

// ----- the simulator itself -----

#[test]
fn the_same_script_gives_the_same_actions() {
    let run = || {
        let mut sim = cluster_with(window(settings(3), 2), Script::default());
        let l = sim.the_listener();
        sim.connect(l, 7);
        sim.crash(w(2));
        sim.ack(w(1), l, 1);
        sim.say(w(3), ToPrimary::Retire);
        sim.stop(true);
        sim.settle();
        sim.transcript()
    };
    assert_eq!(run(), run());
}
