//! What the shell asks the core (may it send, may it signal, is it stopping, is anything
//! left, is it finished), the drain timeout it announces, and the corners mutation testing
//! found untested: each answer checked through the simulator's states.

use std::time::Duration;

use cluster_ipc::WorkerId;
use cluster_ipc::proto::ToPrimary;

use super::sim::{Hello, Script, Sim};
use super::{START_TIMEOUT, settings};
use crate::event::{ExitStatus, WorkerState};
use crate::supervisor::{Refusal, Settings, Supervisor, drain_timeout};

fn w(id: u64) -> WorkerId {
    WorkerId(id)
}

#[test]
fn the_drain_timeout_keeps_a_tenth_of_the_shutdown_timeout_but_at_most_a_second() {
    assert_eq!(
        drain_timeout(Duration::from_secs(2)),
        Duration::from_millis(1800)
    );
    assert_eq!(
        drain_timeout(Duration::from_secs(30)),
        Duration::from_secs(29)
    );
    assert_eq!(drain_timeout(Duration::ZERO), Duration::ZERO);
}

#[test]
fn a_worker_takes_messages_from_its_hello_until_its_channel_closes() {
    let mut sim = Sim::new(settings(1));
    sim.scripts.push_back(Script {
        hello: Hello::Never,
        ..Script::default()
    });
    sim.start();
    assert_eq!(
        sim.sup.may_send(w(1)),
        Err(Refusal::NoSuchWorker),
        "no Hello yet"
    );
    assert_eq!(sim.sup.may_signal(w(1)), Ok(()), "its pid is known");
    assert!(sim.sup.reachable_workers().is_empty());
    sim.say(
        w(1),
        ToPrimary::Hello {
            worker_id: w(1),
            pid: 1,
            protocol_version: cluster_ipc::proto::PROTOCOL_VERSION,
        },
    );
    assert_eq!(sim.sup.may_send(w(1)), Ok(()));
    assert_eq!(sim.sup.reachable_workers(), [w(1)]);
    sim.close_control(w(1), None);
    assert_eq!(
        sim.sup.may_send(w(1)),
        Err(Refusal::NoSuchWorker),
        "channel closed"
    );
    assert_eq!(sim.sup.may_signal(w(1)), Ok(()), "not reaped yet");
    sim.exit(w(1), ExitStatus::Code(0));
    assert_eq!(
        sim.sup.may_signal(w(1)),
        Err(Refusal::NoSuchWorker),
        "reaped"
    );
    assert_eq!(
        sim.sup.may_send(w(9)),
        Err(Refusal::NoSuchWorker),
        "unknown"
    );
    assert_eq!(
        sim.sup.may_signal(w(9)),
        Err(Refusal::NoSuchWorker),
        "unknown"
    );
}

#[test]
fn a_worker_whose_process_is_not_started_yet_cannot_be_signalled() {
    let mut sup = Supervisor::new(settings(1));
    let now = std::time::Instant::now();
    sup.start(now);
    // The Spawn action is out, its answer not in: there is no pid to signal.
    assert_eq!(sup.may_signal(w(1)), Err(Refusal::NoSuchWorker));
    sup.handle_spawned(w(1), 77);
    assert_eq!(sup.may_signal(w(1)), Ok(()));
}

#[test]
fn stopping_and_finishing_are_reported_as_they_happen() {
    let mut sim = Sim::new(Settings {
        respawn: crate::config::Respawn::Never,
        ..settings(1)
    });
    sim.start();
    assert!(!sim.sup.is_stopping());
    assert!(!sim.sup.is_finished());
    assert!(!sim.sup.has_no_workers());
    sim.stop(true);
    assert!(sim.sup.is_stopping());
    sim.settle();
    assert!(sim.sup.is_finished());
    assert!(sim.sup.has_no_workers(), "every Exit was delivered");
}

#[test]
fn a_worker_is_listed_until_its_exit_is_delivered() {
    let mut sup = Supervisor::new(settings(1));
    let now = std::time::Instant::now();
    sup.start(now);
    sup.handle_spawned(w(1), 77);
    sup.handle_exited(w(1), ExitStatus::Code(2), now);
    assert!(!sup.has_no_workers(), "its Exit is not delivered yet");
    sup.handle_exit_delivered(w(1));
    // The replacement is listed now.
    assert!(sup.worker(w(1), now).is_none());
    assert!(sup.worker(w(2), now).is_some());
}

#[test]
fn a_timer_that_fires_early_does_not_kill_a_worker_still_within_its_start_timeout() {
    let mut sup = Supervisor::new(settings(1));
    let now = std::time::Instant::now();
    sup.start(now);
    sup.handle_spawned(w(1), 77);
    while sup.poll_action().is_some() {}
    // Time is handled for another reason well before the worker's start timeout.
    sup.handle_timeout(now + START_TIMEOUT / 2);
    let actions: Vec<_> = std::iter::from_fn(|| sup.poll_action()).collect();
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, crate::supervisor::Action::Signal { .. })),
        "{actions:?}"
    );
    assert_eq!(sup.poll_timeout(), Some(now + START_TIMEOUT));
}

#[test]
fn a_worker_leaving_by_itself_is_listed_as_disconnecting() {
    let mut sim = Sim::new(settings(1));
    sim.scripts.push_back(Script {
        on_disconnect: super::sim::OnDisconnect::Hang,
        ..Script::default()
    });
    sim.start();
    sim.say(w(1), ToPrimary::Disconnecting);
    let now = sim.now;
    assert_eq!(
        sim.sup.worker(w(1), now).map(|info| info.state),
        Some(WorkerState::Disconnecting)
    );
    // Once its channel closed, it stays disconnected, whatever it says it does.
    sim.close_control(w(1), None);
    assert_eq!(
        sim.sup.worker(w(1), now).map(|info| info.state),
        Some(WorkerState::Disconnected)
    );
}

#[test]
fn a_worker_that_leaves_while_its_bind_is_answered_is_refused() {
    let mut sim = Sim::new(settings(2));
    sim.defer_binds = true;
    sim.start();
    // Worker 1 leaves (its channel stays open) before the bind it waits for is answered.
    sim.say(w(1), ToPrimary::Disconnecting);
    sim.answer_binds();
    let refused = sim.workers[&w(1)]
        .inbox
        .iter()
        .any(|(_, m)| matches!(m, cluster_ipc::proto::ToWorker::ListenRefused(_)));
    assert!(refused, "{:?}", sim.workers[&w(1)].inbox);
    assert!(sim.handed_to(w(1)).is_empty());
}

#[test]
fn a_worker_asked_to_go_before_its_process_existed_is_told_once_it_does() {
    let mut sup = Supervisor::new(settings(1));
    let now = std::time::Instant::now();
    sup.start(now);
    // The stop comes between the Spawn action and its answer.
    let spawn = sup.poll_action();
    assert!(
        matches!(spawn, Some(crate::supervisor::Action::Spawn { .. })),
        "{spawn:?}"
    );
    sup.stop(true, now);
    let before: Vec<_> = std::iter::from_fn(|| sup.poll_action()).collect();
    assert!(
        !before
            .iter()
            .any(|a| matches!(a, crate::supervisor::Action::Signal { .. })),
        "no pid to signal yet: {before:?}"
    );
    sup.handle_spawned(w(1), 77);
    let after: Vec<_> = std::iter::from_fn(|| sup.poll_action()).collect();
    assert!(
        after.contains(&crate::supervisor::Action::Signal {
            worker: w(1),
            signal: crate::signal::Signal::SIGTERM,
            group: false,
        }),
        "{after:?}"
    );
    // And it is killed only at the shutdown timeout.
    assert_eq!(sup.poll_timeout(), Some(now + super::SHUTDOWN_TIMEOUT));
}

#[test]
fn a_stop_before_the_shell_took_a_spawn_withdraws_it() {
    let mut sup = Supervisor::new(settings(2));
    let now = std::time::Instant::now();
    sup.start(now);
    sup.stop(true, now);
    let actions: Vec<_> = std::iter::from_fn(|| sup.poll_action()).collect();
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, crate::supervisor::Action::Spawn { .. })),
        "{actions:?}"
    );
    assert!(sup.is_finished());
    assert_eq!(sup.ending(), crate::supervisor::Ending::Clean);
}

#[test]
fn with_respawn_off_a_worker_that_cannot_be_started_is_not_tried_again() {
    let mut sim = Sim::new(Settings {
        respawn: crate::config::Respawn::Never,
        ..settings(1)
    });
    sim.scripts.push_back(Script {
        spawn_fails: true,
        ..Script::default()
    });
    sim.start();
    sim.settle();
    assert_eq!(sim.spawned(), Vec::<WorkerId>::new());
    assert!(sim.sup.is_finished());
}

#[test]
fn with_respawn_on_a_cluster_whose_last_worker_was_disconnected_keeps_running() {
    let mut sim = Sim::new(settings(1));
    sim.start();
    sim.disconnect(w(1)).unwrap();
    sim.settle();
    assert!(sim.sup.has_no_workers());
    assert!(
        !sim.sup.is_finished(),
        "only a stop (or respawn off) ends the cluster"
    );
}

#[test]
fn the_supervisor_shows_its_listeners_state_when_debugged() {
    let mut sim = Sim::new(settings(1));
    sim.start();
    let shown = format!("{:?}", sim.sup);
    assert!(
        shown.contains("RoundRobin") && shown.contains("accepting: true"),
        "{shown}"
    );
}
