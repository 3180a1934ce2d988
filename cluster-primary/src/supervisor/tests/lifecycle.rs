//! Scenarios of the decisions that replace workers while the cluster serves: rolling
//! restarts, scaling and fork, the respawn policy, boot failures and the crash-loop guard,
//! hung workers, recycling, hand-backs, and how a stop ends. Every scenario also ends with
//! the simulator's invariant checks.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::time::Duration;

use cluster_ipc::proto::{ListenRefused, ToPrimary, ToWorker};
use cluster_ipc::{ConnId, ListenerId, SlotId, WorkerId};

use super::sim::{OnDisconnect, PORT, Place, Script, Sim, addr};
use super::{READINESS_TIMEOUT, SHUTDOWN_TIMEOUT, settings};
use crate::config::{Recycle, Respawn, Rollout};
use crate::event::{Event, ExitStatus, Memory};
use crate::signal::Signal;
use crate::supervisor::lifecycle::{HUNG_KILL_GRACE, MEMORY_INTERVAL, jitter_for};
use crate::supervisor::{Action, Ending, Fatal, Refusal, Settings};

const MS: Duration = Duration::from_millis(1);
const SECOND: Duration = Duration::from_secs(1);
const MB: u64 = 1 << 20;

fn w(id: u64) -> WorkerId {
    WorkerId(id)
}

fn ws(ids: impl IntoIterator<Item = u64>) -> Vec<WorkerId> {
    ids.into_iter().map(WorkerId).collect()
}

/// A started cluster of `settings` whose workers follow `script`.
fn cluster_with(settings: Settings, script: Script) -> Sim {
    let mut sim = Sim::with_script(settings, script);
    sim.start();
    sim
}

/// A started cluster whose later workers wait for the test to say `Listening`.
fn cluster_then_quiet(settings: Settings, script: Script) -> Sim {
    let mut sim = cluster_with(settings, script);
    sim.default_script.send_listening = false;
    sim
}

fn with_rollout(settings: Settings, surge: u32, unavailable: u32) -> Settings {
    Settings {
        rollout: Rollout { surge, unavailable },
        ..settings
    }
}

fn window(settings: Settings, window: u32) -> Settings {
    Settings {
        window: std::num::NonZeroU32::new(window).unwrap(),
        ..settings
    }
}

/// The `Spawn` actions, as (worker, slot).
fn spawns(sim: &Sim) -> Vec<(WorkerId, SlotId)> {
    sim.log
        .iter()
        .filter_map(|(_, a)| match a {
            Action::Spawn { worker, slot, .. } => Some((*worker, *slot)),
            _ => None,
        })
        .collect()
}

/// The environment the worker was spawned with.
fn env_of(sim: &Sim, worker: WorkerId) -> Vec<(OsString, OsString)> {
    sim.log
        .iter()
        .find_map(|(_, a)| match a {
            Action::Spawn { worker: w, env, .. } if *w == worker => Some(env.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{worker} was not spawned"))
}

/// The position in the log of the first action matching `f`.
fn position(sim: &Sim, f: impl Fn(&Action) -> bool) -> Option<usize> {
    sim.log.iter().position(|(_, a)| f(a))
}

fn spawn_of(sim: &Sim, worker: WorkerId) -> Option<usize> {
    position(
        sim,
        |a| matches!(a, Action::Spawn { worker: w, .. } if *w == worker),
    )
}

fn disconnect_of(sim: &Sim, worker: WorkerId) -> Option<usize> {
    position(
        sim,
        |a| matches!(a, Action::Send { worker: w, msg: ToWorker::Disconnect, .. } if *w == worker),
    )
}

/// The primary asked the worker to disconnect.
fn asked(sim: &Sim, worker: WorkerId) -> bool {
    disconnect_of(sim, worker).is_some()
}

/// The events that are not about one worker's life (roll-outs, scaling, recycling, hangs),
/// by name.
fn lifecycle_events(sim: &Sim) -> Vec<String> {
    sim.events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::RolloutStarted { rollout, workers } => {
                Some(format!("Started {rollout} of {workers}"))
            }
            Event::RolloutStep {
                rollout,
                old,
                new,
                done,
                total,
            } => Some(format!(
                "Step {rollout}: w{} -> w{}, {done}/{total}",
                old.0, new.0
            )),
            Event::RolloutFinished { rollout } => Some(format!("Finished {rollout}")),
            Event::RolloutAborted { rollout, .. } => Some(format!("Aborted {rollout}")),
            Event::Scaled { from, to } => Some(format!("Scaled {from} -> {to}")),
            Event::Recycling { worker, .. } => Some(format!("Recycling w{}", worker.0)),
            Event::Hung { worker, .. } => Some(format!("Hung w{}", worker.0)),
            _ => None,
        })
        .collect()
}

fn abort_reason(sim: &Sim, rollout: u64) -> String {
    sim.events
        .iter()
        .find_map(|(_, e)| match e {
            Event::RolloutAborted { rollout: r, reason } if *r == rollout => Some(reason.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("roll-out {rollout} was not aborted"))
}

fn exit_status(sim: &Sim, worker: WorkerId) -> Option<ExitStatus> {
    sim.events.iter().find_map(|(_, e)| match e {
        Event::Exit {
            worker: w, status, ..
        } if *w == worker => Some(*status),
        _ => None,
    })
}

/// Every connection the ledger knows was acked by exactly one worker: delivered once, none
/// lost, none twice.
fn assert_each_delivered_once(sim: &Sim) {
    for (conn, entry) in &sim.conns {
        let by = sim.acked_by.get(conn).cloned().unwrap_or_default();
        assert!(
            by.len() == 1 && matches!(entry.place, Place::Served(_) | Place::Gone),
            "{conn} acked by {by:?}, now {:?}",
            entry.place
        );
    }
    let released: BTreeSet<ConnId> = sim.released().into_iter().collect();
    assert_eq!(released.len(), sim.released().len(), "a release repeated");
    assert_eq!(released.len(), sim.conns.len(), "every fd released once");
}

/// Every live worker acks everything it holds, until nothing is in flight anywhere.
fn ack_everything(sim: &mut Sim) {
    for _ in 0..100 {
        let holding: Vec<WorkerId> = sim
            .alive()
            .into_iter()
            .filter(|&w| sim.in_flight_at(w) > 0)
            .collect();
        if holding.is_empty() {
            return;
        }
        for worker in holding {
            sim.ack_all(worker);
        }
    }
    panic!("connections keep coming back");
}

// ----- rolling restarts -----

#[test]
fn a_rollout_replaces_each_worker_one_at_a_time_once_its_replacement_listens_everywhere() {
    let script = Script::listening_on(&[addr(8000), addr(8001)]);
    let mut sim = cluster_then_quiet(settings(4), script);
    let (a, b) = (sim.listener_at(addr(8000)), sim.listener_at(addr(8001)));
    sim.min_ready = Some(4);
    assert_eq!(sim.reload(), Ok(1));
    assert_eq!(
        sim.sup.status(sim.now).rollout.map(|p| (p.done, p.total)),
        Some((0, 4))
    );
    for step in 0..4u64 {
        let (old, new) = (w(1 + step), w(5 + step));
        assert_eq!(
            spawns(&sim).last(),
            Some(&(new, SlotId(step as u32))),
            "the replacement starts in the old worker's slot"
        );
        assert_eq!(spawns(&sim).len(), 5 + step as usize, "one at a time");
        // Connections keep coming while the step runs; every worker takes some.
        sim.connect(a, 3);
        sim.connect(b, 2);
        assert!(!asked(&sim, old));
        sim.say_listening_on(new, a);
        assert!(!asked(&sim, old), "it listens on one of two listeners only");
        sim.connect(a, 2);
        ack_everything(&mut sim);
        sim.say_listening_on(new, b);
        assert!(asked(&sim, old), "step {step}");
        let listening_b = position(&sim, |act| {
            matches!(act, Action::Event(Event::Listening { worker, addr: at })
                if *worker == new && *at == addr(8001))
        });
        assert!(listening_b < disconnect_of(&sim, old));
        if step < 3 {
            assert!(spawn_of(&sim, w(6 + step)) > disconnect_of(&sim, old));
        }
        assert!(!sim.workers[&old].alive, "it drained and left");
        assert_eq!(exit_status(&sim, old), Some(ExitStatus::Code(0)));
        ack_everything(&mut sim);
    }
    assert_eq!(
        lifecycle_events(&sim),
        [
            "Started 1 of 4",
            "Step 1: w1 -> w5, 1/4",
            "Step 1: w2 -> w6, 2/4",
            "Step 1: w3 -> w7, 3/4",
            "Step 1: w4 -> w8, 4/4",
            "Finished 1"
        ]
    );
    assert_eq!(sim.serving(), ws(5..=8));
    assert_eq!(sim.ready_workers(), ws(5..=8));
    assert_eq!((sim.peak_serving, sim.low_ready), (5, 4));
    assert_eq!(sim.sup.status(sim.now).rollout, None);
    assert!(sim.conns.len() >= 28);
    assert_each_delivered_once(&sim);
    sim.settle();
    sim.assert_clean();
}

/// Makes the lowest replacement that has not listened yet listen; false when none is left.
fn next_replacement_listens(sim: &mut Sim) -> bool {
    let next = sim
        .workers
        .values()
        .find(|w| w.alive && !w.leaving && w.listening.is_empty())
        .map(|w| w.id);
    match next {
        Some(worker) => {
            sim.say_listening(worker);
            true
        }
        None => false,
    }
}

#[test]
fn a_rollouts_surge_and_unavailable_bound_the_workers_serving_and_ready() {
    for (surge, unavailable) in [(2, 0), (0, 1), (2, 1), (1, 2)] {
        let settings = with_rollout(settings(4), surge, unavailable);
        let mut sim = cluster_then_quiet(settings, Script::default());
        let l = sim.the_listener();
        let floor = 4 - unavailable as usize;
        sim.min_ready = Some(floor);
        sim.reload().unwrap();
        let first = (surge + unavailable) as usize;
        assert_eq!(
            spawns(&sim).len(),
            4 + first.min(4),
            "{surge}/{unavailable}"
        );
        for _ in 0..20 {
            sim.connect(l, 2);
            ack_everything(&mut sim);
            if !next_replacement_listens(&mut sim) {
                break;
            }
        }
        let case = format!("surge {surge}, unavailable {unavailable}");
        assert_eq!(
            lifecycle_events(&sim).last().map(String::as_str),
            Some("Finished 1"),
            "{case}"
        );
        assert_eq!(sim.serving(), ws(5..=8), "{case}");
        assert_eq!(sim.peak_serving, 4 + surge as usize, "{case}");
        assert_eq!(sim.low_ready, floor, "{case}");
        assert_each_delivered_once(&sim);
        sim.settle();
        sim.assert_clean();
    }
}

#[test]
fn a_replacement_that_fails_aborts_the_rollout_and_the_old_workers_keep_serving() {
    for how in [
        "boot failure",
        "never listens",
        "spawn fails",
        "program missing",
        "listens where it cannot",
        "crashes",
        "hangs",
    ] {
        let settings = Settings {
            hang_timeout: Some(Duration::from_secs(3)),
            ..settings(4)
        };
        let mut sim = cluster_then_quiet(settings, Script::default());
        let l = sim.the_listener();
        sim.min_ready = Some(4);
        match how {
            "spawn fails" | "program missing" => sim.scripts.push_back(Script {
                spawn_fails: true,
                spawn_errno: (how == "program missing").then_some(libc::ENOENT),
                ..Script::default()
            }),
            "listens where it cannot" => {
                // The new version listens on one more address, which is taken.
                sim.bind_errors
                    .insert(addr(9000), ListenRefused::address_in_use("taken"));
                sim.scripts.push_back(Script {
                    send_listening: false,
                    ..Script::listening_on(&[addr(9000), addr(PORT)])
                });
            }
            _ => {}
        }
        sim.reload().unwrap();
        match how {
            "boot failure" => sim.exit(w(5), ExitStatus::Code(3)),
            "listens where it cannot" => {
                assert!(!sim.sup.is_stopping(), "only the roll-out fails");
                // Its code cannot go on without the address: it fails.
                sim.exit(w(5), ExitStatus::Code(1));
            }
            "never listens" => {
                sim.advance(READINESS_TIMEOUT - MS);
                assert!(lifecycle_events(&sim).len() == 1, "{how}: not yet");
                sim.advance(MS);
            }
            "crashes" => sim.crash(w(5)),
            "hangs" => {
                sim.heartbeat(w(5), 0);
                sim.advance(Duration::from_secs(3));
            }
            _ => {}
        }
        let events = lifecycle_events(&sim);
        assert!(
            events.ends_with(&["Aborted 1".to_owned()]),
            "{how}: {events:?}"
        );
        let reason = abort_reason(&sim, 1);
        assert!(reason.contains("worker 5"), "{how}: {reason}");
        if how == "boot failure" {
            assert!(reason.contains("boot"), "{reason}");
        }
        assert!(!sim.sup.is_stopping(), "{how}: the cluster goes on");
        for old in ws(1..=4) {
            assert!(!asked(&sim, old), "{how}: {old} keeps its slot");
        }
        sim.settle();
        assert_eq!(sim.serving(), ws(1..=4), "{how}");
        assert_eq!(
            spawns(&sim).len(),
            5,
            "{how}: nothing replaced, nothing respawned"
        );
        // The old workers still serve.
        sim.connect(l, 4);
        ack_everything(&mut sim);
        assert_each_delivered_once(&sim);
        assert_eq!(sim.sup.ending(), Ending::Clean, "{how}");
        sim.assert_clean();
    }
}

#[test]
fn a_worker_that_is_gone_before_its_turn_leaves_the_rollouts_count() {
    let mut sim = cluster_then_quiet(settings(3), Script::default());
    assert_eq!(sim.reload(), Ok(1));
    // While w1's replacement starts, w2 dies: its respawn (w5) runs the new program already,
    // so the roll-out has two workers to replace, not three.
    sim.crash(w(2));
    while next_replacement_listens(&mut sim) {}
    assert_eq!(
        lifecycle_events(&sim),
        [
            "Started 1 of 3",
            "Step 1: w1 -> w4, 1/3",
            "Step 1: w3 -> w6, 2/2",
            "Finished 1",
        ]
    );
    sim.settle();
    sim.assert_clean();
}

#[test]
fn a_scale_down_during_a_rollout_takes_the_removed_workers_out_of_it() {
    let mut sim = cluster_then_quiet(settings(3), Script::default());
    assert_eq!(sim.reload(), Ok(1));
    // w4 is on its way for w1; w2 and w3 wait their turn, and their slots go.
    assert_eq!(sim.set_workers(1), Ok(()));
    while next_replacement_listens(&mut sim) {}
    assert_eq!(
        lifecycle_events(&sim),
        [
            "Started 1 of 3",
            "Scaled 3 -> 1",
            "Step 1: w1 -> w4, 1/1",
            "Finished 1",
        ]
    );
    assert_eq!(sim.serving(), ws([4]));
    sim.settle();
    sim.assert_clean();
}

#[test]
fn a_scale_down_during_a_rollout_still_replaces_the_workers_it_keeps() {
    let mut sim = cluster_then_quiet(settings(3), Script::default());
    assert_eq!(sim.reload(), Ok(1));
    // Only w3's slot goes: w2 is still to be replaced.
    assert_eq!(sim.set_workers(2), Ok(()));
    while next_replacement_listens(&mut sim) {}
    assert_eq!(
        lifecycle_events(&sim),
        [
            "Started 1 of 3",
            "Scaled 3 -> 2",
            "Step 1: w1 -> w4, 1/2",
            "Step 1: w2 -> w5, 2/2",
            "Finished 1",
        ]
    );
    assert_eq!(sim.serving(), ws([4, 5]));
    sim.settle();
    sim.assert_clean();
}

#[test]
fn a_reload_during_a_rollout_is_queued_and_several_are_one() {
    let mut sim = cluster_then_quiet(settings(2), Script::default());
    sim.min_ready = Some(2);
    assert_eq!(sim.reload(), Ok(1));
    assert_eq!(sim.reload(), Ok(2));
    assert_eq!(sim.reload(), Ok(2), "queued reloads are one");
    assert_eq!(spawns(&sim).len(), 3, "the queued one waits");
    while next_replacement_listens(&mut sim) {}
    assert_eq!(
        lifecycle_events(&sim),
        [
            "Started 1 of 2",
            "Step 1: w1 -> w3, 1/2",
            "Step 1: w2 -> w4, 2/2",
            "Finished 1",
            "Started 2 of 2",
            "Step 2: w3 -> w5, 1/2",
            "Step 2: w4 -> w6, 2/2",
            "Finished 2",
        ]
    );
    assert_eq!(sim.reload(), Ok(3), "none in progress: it starts at once");
    assert_eq!(spawns(&sim).len(), 7);
    while next_replacement_listens(&mut sim) {}
    assert_eq!(sim.serving(), ws(7..=8));
    sim.settle();
    sim.assert_clean();
}

#[test]
fn a_stop_during_a_rollout_aborts_it_and_the_queued_one() {
    let mut sim = cluster_then_quiet(settings(2), Script::default());
    sim.reload().unwrap();
    sim.reload().unwrap();
    sim.stop(true);
    assert_eq!(
        lifecycle_events(&sim),
        ["Started 1 of 2", "Aborted 1", "Aborted 2"]
    );
    assert!(abort_reason(&sim, 1).contains("stopping"));
    assert_eq!(sim.reload(), Err(Refusal::Stopping));
    sim.settle();
    assert!(sim.finished);
    assert_eq!(spawns(&sim).len(), 3);
    assert_eq!(sim.sup.ending(), Ending::Clean);
    sim.assert_clean();
}

#[test]
fn a_worker_that_retires_while_it_is_replaced_gets_no_second_replacement() {
    // The old worker asks to retire while the roll-out's replacement starts.
    let mut sim = cluster_then_quiet(settings(2), Script::default());
    sim.workers.get_mut(&w(1)).unwrap().script.on_disconnect = OnDisconnect::Hang;
    sim.reload().unwrap();
    sim.say(w(1), ToPrimary::Retire);
    assert_eq!(
        spawns(&sim).len(),
        3,
        "its replacement is on its way already"
    );
    sim.say_listening(w(3));
    sim.exit(w(1), ExitStatus::Code(0));
    while next_replacement_listens(&mut sim) {}
    sim.settle();
    assert_eq!(sim.serving(), ws(3..=4));
    sim.assert_clean();

    // The replacement asks to retire before it is ready: it failed, the old one stays.
    let mut sim = cluster_then_quiet(settings(2), Script::default());
    sim.reload().unwrap();
    sim.say(w(3), ToPrimary::Retire);
    assert_eq!(
        spawns(&sim).len(),
        3,
        "a replacement on trial is not replaced"
    );
    sim.advance(READINESS_TIMEOUT);
    assert_eq!(lifecycle_events(&sim), ["Started 1 of 2", "Aborted 1"]);
    sim.settle();
    assert_eq!(sim.serving(), ws(1..=2));
    sim.assert_clean();
}

#[test]
fn a_reload_queued_behind_an_aborted_rollout_keeps_to_the_surge() {
    // Roll-out 1 runs two replacements at once; one fails and the other goes on by itself
    // while roll-out 2 starts: together they stay within the surge.
    let settings = with_rollout(settings(4), 2, 0);
    let mut sim = cluster_then_quiet(settings, Script::default());
    sim.min_ready = Some(4);
    sim.reload().unwrap();
    sim.reload().unwrap();
    assert_eq!(spawns(&sim).len(), 6);
    sim.crash(w(5));
    assert_eq!(
        lifecycle_events(&sim),
        ["Started 1 of 4", "Aborted 1", "Started 2 of 3"]
    );
    assert!(sim.peak_serving <= 6, "{} serving", sim.peak_serving);
    while next_replacement_listens(&mut sim) {}
    assert_eq!(
        lifecycle_events(&sim).last().map(String::as_str),
        Some("Finished 2")
    );
    assert!(sim.peak_serving <= 6, "{} serving", sim.peak_serving);
    sim.settle();
    assert_eq!(sim.serving().len(), 4);
    sim.assert_clean();
}

// ----- scaling and fork -----

#[test]
fn scaling_up_starts_workers_in_new_slots_and_down_drains_the_last_ones() {
    let mut sim = cluster_with(settings(2), Script::default());
    let l = sim.the_listener();
    assert_eq!(sim.set_workers(5), Ok(()));
    assert_eq!(
        spawns(&sim)[2..],
        [(w(3), SlotId(2)), (w(4), SlotId(3)), (w(5), SlotId(4))]
    );
    assert_eq!(sim.sup.status(sim.now).target_workers, 5);
    assert_eq!(sim.serving(), ws(1..=5));
    // The workers of the slots to go hold connections, one of them for good.
    sim.connect(l, 5);
    sim.workers.get_mut(&w(5)).unwrap().script.on_disconnect = OnDisconnect::Hang;
    assert_eq!(sim.set_workers(3), Ok(()));
    assert_eq!(lifecycle_events(&sim), ["Scaled 2 -> 5", "Scaled 5 -> 3"]);
    assert!(asked(&sim, w(4)) && asked(&sim, w(5)));
    assert!(!sim.workers[&w(4)].alive, "it acked what it had and left");
    assert_eq!(sim.serving(), ws(1..=3));
    // A worker of a removed slot dies while draining: not replaced, and what it held
    // goes to the others.
    sim.crash(w(5));
    assert_eq!(spawns(&sim).len(), 5);
    // A worker of a kept slot is replaced in its slot.
    sim.crash(w(2));
    assert_eq!(spawns(&sim).last(), Some(&(w(6), SlotId(1))));
    ack_everything(&mut sim);
    assert_each_delivered_once(&sim);
    assert_eq!(sim.set_workers(0), Err(Refusal::NoWorkers));
    assert_eq!(sim.set_workers(3), Ok(()), "no change");
    assert_eq!(lifecycle_events(&sim).len(), 2, "no event for no change");
    sim.settle();
    assert_eq!(sim.serving(), ws([1, 3, 6]));
    sim.assert_clean();
}

#[test]
fn scaling_down_then_up_again_refills_the_slots_with_new_workers() {
    let mut sim = cluster_with(settings(3), Script::default());
    sim.workers.get_mut(&w(3)).unwrap().script.on_disconnect = OnDisconnect::Hang;
    sim.set_workers(2).unwrap();
    sim.set_workers(3).unwrap();
    // Slot 2 has a new worker while its old one still drains.
    assert_eq!(spawns(&sim).last(), Some(&(w(4), SlotId(2))));
    sim.exit(w(3), ExitStatus::Code(0));
    assert_eq!(
        spawns(&sim).len(),
        4,
        "the drained one is not replaced again"
    );
    sim.settle();
    assert_eq!(sim.serving(), ws([1, 2, 4]));
    sim.assert_clean();
}

#[test]
fn fork_adds_a_slot_whose_workers_get_its_environment() {
    let mut sim = cluster_with(settings(2), Script::default());
    let env = vec![(OsString::from("ROLE"), OsString::from("cron"))];
    assert_eq!(sim.fork(env.clone()), Ok(w(3)));
    assert_eq!(spawns(&sim).last(), Some(&(w(3), SlotId(2))));
    assert_eq!(env_of(&sim, w(3)), env);
    assert_eq!(lifecycle_events(&sim), ["Scaled 2 -> 3"]);
    assert_eq!(sim.sup.status(sim.now).target_workers, 3);
    // Its respawn, and its roll-out replacement, carry the same environment; the other
    // slots' workers none.
    sim.crash(w(3));
    assert_eq!(spawns(&sim).last(), Some(&(w(4), SlotId(2))));
    assert_eq!(env_of(&sim, w(4)), env);
    sim.crash(w(1));
    assert_eq!(env_of(&sim, w(5)), []);
    sim.reload().unwrap();
    let slot2 = spawns(&sim)
        .into_iter()
        .rev()
        .find(|&(_, slot)| slot == SlotId(2))
        .map(|(worker, _)| worker)
        .unwrap();
    assert!(slot2 > w(5));
    assert_eq!(env_of(&sim, slot2), env);
    sim.stop(true);
    assert_eq!(
        sim.fork(Vec::new()),
        Err(Refusal::Stopping),
        "no fork while stopping"
    );
    sim.settle();
    sim.assert_clean();
}

// ----- respawn policy, boot failures, crash loops -----

#[test]
fn the_crash_loop_guard_trips_at_n_failures_within_the_window() {
    let settings = Settings {
        crash_loop: (3, Duration::from_secs(10)),
        ..settings(2)
    };
    let mut sim = cluster_with(settings, Script::default());
    // Two failures (at 0 s and 1 s) are not three.
    sim.crash(w(1));
    sim.advance(SECOND);
    sim.exit(w(2), ExitStatus::Code(1));
    sim.advance(Duration::from_secs(10));
    assert!(!sim.sup.is_stopping(), "two failures are not three");
    // At 11 s, the first one is out of the window, the second one (10 s ago) still in.
    sim.crash(w(3));
    assert!(!sim.sup.is_stopping(), "the first one aged out");
    let last = sim.serving()[0];
    sim.crash(last);
    assert!(sim.sup.is_stopping(), "three within 10 s");
    assert!(sim.self_stopped);
    match sim.sup.ending() {
        Ending::Fatal(Fatal::CrashLoop {
            failures: 3,
            within,
            last,
        }) => {
            assert_eq!(within, Duration::from_secs(10));
            assert!(last.contains("SIGSEGV"), "{last}");
        }
        other => panic!("{other:?}"),
    }
    // The stop is graceful: the others are asked to go, nobody is respawned.
    let spawned = spawns(&sim).len();
    for worker in sim.alive() {
        assert!(asked(&sim, worker));
    }
    sim.settle();
    assert!(sim.finished);
    assert_eq!(spawns(&sim).len(), spawned);
    sim.assert_clean();
}

#[test]
fn kills_from_outside_and_clean_exits_are_not_failures() {
    let settings = Settings {
        crash_loop: (2, Duration::from_secs(10)),
        ..settings(2)
    };
    let mut sim = cluster_with(settings, Script::default());
    let deaths = [
        ExitStatus::Signal(Signal::SIGKILL),
        ExitStatus::Signal(Signal::SIGTERM),
        ExitStatus::Code(0),
        ExitStatus::Signal(Signal::SIGKILL),
    ];
    for status in deaths {
        sim.advance(SECOND);
        let victim = sim.serving()[0];
        sim.exit(victim, status);
        assert!(!sim.sup.is_stopping(), "{status}");
    }
    // A worker the primary kills at the shutdown timeout after asking it to go is no
    // failure either.
    let victim = sim.serving()[0];
    sim.workers.get_mut(&victim).unwrap().script.on_disconnect = OnDisconnect::Hang;
    sim.disconnect(victim).unwrap();
    sim.advance(SHUTDOWN_TIMEOUT);
    assert_eq!(sim.signals_to(victim), [Signal::SIGKILL]);
    // One real failure: still one short.
    let victim = sim.serving()[0];
    sim.crash(victim);
    assert!(!sim.sup.is_stopping());
    sim.settle();
    sim.assert_clean();
}

#[test]
fn a_boot_failure_at_the_start_stops_the_cluster() {
    let mut sim = Sim::new(settings(2));
    sim.scripts.push_back(Script {
        send_listening: false,
        ..Script::default()
    });
    sim.start();
    sim.exit(w(1), ExitStatus::Code(3));
    assert!(sim.sup.is_stopping());
    assert!(asked(&sim, w(2)));
    sim.settle();
    assert!(sim.finished);
    assert_eq!(spawns(&sim).len(), 2, "no respawn");
    assert_eq!(
        sim.sup.ending(),
        Ending::Fatal(Fatal::BootFailed {
            worker: w(1),
            exit_code: 3
        })
    );
    sim.assert_clean();
}

/// Binds that fail for a reason no retry can fix, and some that may pass.
const UNFIXABLE_BINDS: [i32; 4] = [
    libc::EADDRINUSE,
    libc::EACCES,
    libc::EADDRNOTAVAIL,
    libc::EINVAL,
];
const PASSING_BINDS: [i32; 3] = [libc::EMFILE, libc::ENFILE, libc::ENOBUFS];

#[test]
fn a_bind_no_retry_can_fix_stops_the_cluster_with_the_address_and_the_cause() {
    for errno in UNFIXABLE_BINDS {
        let mut sim = Sim::new(settings(2));
        sim.defer_binds = true;
        let refused = ListenRefused {
            errno,
            message: "no".into(),
        };
        sim.bind_errors.insert(addr(PORT), refused);
        sim.start();
        sim.answer_binds();
        assert!(sim.sup.is_stopping(), "errno {errno}");
        for worker in [w(1), w(2)] {
            // Told to go before it is refused: it ends quietly, and the cause is reported
            // once, by the primary.
            let inbox = &sim.workers[&worker].inbox;
            let disconnect = inbox
                .iter()
                .position(|(_, m)| matches!(m, ToWorker::Disconnect));
            let refusal = inbox
                .iter()
                .position(|(_, m)| matches!(m, ToWorker::ListenRefused(_)));
            assert!(disconnect < refusal, "errno {errno}: {inbox:?}");
            // With the errno a bind of its own would have given.
            assert_eq!(sim.workers[&worker].refused[0].1.errno, errno);
        }
        sim.settle();
        assert!(sim.finished);
        assert_eq!(spawns(&sim).len(), 2, "errno {errno}: no respawn");
        assert_eq!(
            sim.sup.ending(),
            Ending::Fatal(Fatal::ListenFailed {
                addr: addr(PORT),
                errno
            })
        );
        sim.assert_clean();
    }
}

#[test]
fn a_bind_that_may_pass_is_refused_and_the_cluster_goes_on() {
    for errno in PASSING_BINDS {
        let mut sim = Sim::new(settings(2));
        let refused = ListenRefused {
            errno,
            message: "not now".into(),
        };
        sim.bind_errors.insert(addr(PORT), refused.clone());
        sim.start();
        assert!(!sim.sup.is_stopping(), "errno {errno}");
        assert_eq!(sim.workers[&w(1)].refused, [(addr(PORT), refused)]);
        sim.bind_errors.clear();
        sim.crash(w(1));
        sim.crash(w(2));
        sim.settle();
        assert_eq!(
            sim.serving().len(),
            2,
            "errno {errno}: respawned, listening"
        );
        sim.assert_clean();
    }
}

#[test]
fn a_program_that_cannot_be_executed_stops_the_cluster() {
    for (errno, fatal) in [
        (Some(libc::ENOENT), true),
        (Some(libc::EACCES), true),
        (Some(libc::ENOEXEC), true),
        (Some(libc::EAGAIN), false),
        (Some(libc::ENOMEM), false),
        (None, false),
    ] {
        let mut sim = Sim::new(settings(2));
        sim.scripts.push_back(Script {
            spawn_fails: true,
            spawn_errno: errno,
            ..Script::default()
        });
        sim.start();
        assert_eq!(sim.sup.is_stopping(), fatal, "errno {errno:?}");
        sim.settle();
        if fatal {
            assert!(sim.finished);
            assert_eq!(
                spawns(&sim).len(),
                1,
                "errno {errno:?}: nothing more started"
            );
            assert_eq!(
                sim.sup.ending(),
                Ending::Fatal(Fatal::ProgramNotExecutable {
                    errno: errno.unwrap_or_default()
                })
            );
        } else {
            assert_eq!(
                sim.serving().len(),
                2,
                "errno {errno:?}: the slot is refilled"
            );
        }
        sim.assert_clean();
    }
}

#[test]
fn the_boot_failure_code_after_listening_is_a_plain_crash() {
    let mut sim = cluster_with(settings(2), Script::default());
    sim.exit(w(1), ExitStatus::Code(3));
    assert!(!sim.sup.is_stopping());
    assert_eq!(spawns(&sim).last(), Some(&(w(3), SlotId(0))));
    sim.settle();
    sim.assert_clean();
}

#[test]
fn respawn_on_failure_replaces_a_crash_but_not_a_clean_exit() {
    let settings = Settings {
        respawn: Respawn::OnFailure,
        ..settings(3)
    };
    let mut sim = cluster_with(settings, Script::default());
    sim.crash(w(1));
    assert_eq!(spawns(&sim).last(), Some(&(w(4), SlotId(0))));
    sim.exit(w(2), ExitStatus::Code(1));
    assert_eq!(spawns(&sim).last(), Some(&(w(5), SlotId(1))));
    sim.exit(w(3), ExitStatus::Code(0));
    sim.exit(w(4), ExitStatus::Signal(Signal::SIGKILL));
    assert_eq!(
        spawns(&sim).len(),
        5,
        "a clean exit and a kill are not failures"
    );
    assert!(!sim.finished);
    sim.exit(w(5), ExitStatus::Code(0));
    assert!(sim.finished, "nobody left and nobody coming");
    sim.assert_clean();
}

// ----- hung workers -----

fn hanging(timeout: Duration, workers: usize) -> Settings {
    Settings {
        hang_timeout: Some(timeout),
        ..window(settings(workers), 2)
    }
}

#[test]
fn a_worker_that_acks_nothing_for_the_hang_timeout_is_hung() {
    let timeout = Duration::from_secs(3);
    let mut sim = cluster_with(hanging(timeout, 2), Script::default());
    let l = sim.the_listener();
    sim.connect(l, 2);
    assert_eq!(sim.in_flight(w(1), l), [ConnId(1)]);
    sim.ack(w(2), l, 1);
    sim.advance(SECOND);
    // One more for worker 1 (it has credit): that does not restart its clock.
    sim.connect(l, 1);
    assert_eq!(sim.in_flight(w(1), l), [ConnId(1), ConnId(3)]);
    sim.advance(timeout - SECOND - MS);
    assert!(lifecycle_events(&sim).is_empty());
    sim.advance(MS);
    assert_eq!(lifecycle_events(&sim), ["Hung w1"]);
    // At once: its un-acked connections go to worker 2, SIGABRT, and a replacement.
    assert_eq!(sim.handed_to(w(2)), [ConnId(2), ConnId(1), ConnId(3)]);
    assert!(sim.log.iter().any(|(_, a)| *a
        == Action::CloseHandoff {
            worker: w(1),
            listener: l
        }));
    assert_eq!(sim.signals_to(w(1)), [Signal::SIGABRT]);
    assert_eq!(spawns(&sim).last(), Some(&(w(3), SlotId(0))));
    assert_eq!(sim.serving(), ws(2..=3));
    assert_eq!(sim.sup.status(sim.now).restarts, 1);
    // SIGKILL after the grace.
    sim.advance(HUNG_KILL_GRACE - MS);
    assert_eq!(sim.signals_to(w(1)), [Signal::SIGABRT]);
    sim.advance(MS);
    assert_eq!(sim.signals_to(w(1)), [Signal::SIGABRT, Signal::SIGKILL]);
    assert_eq!(
        exit_status(&sim, w(1)),
        Some(ExitStatus::Signal(Signal::SIGKILL))
    );
    assert_eq!(spawns(&sim).len(), 3, "replaced once");
    ack_everything(&mut sim);
    assert_each_delivered_once(&sim);
    sim.settle();
    sim.assert_clean();
}

#[test]
fn an_ack_restarts_the_hang_clock_and_a_worker_holding_nothing_is_not_hung() {
    let timeout = Duration::from_secs(3);
    let script = Script::listening_on(&[addr(8000), addr(8001)]);
    let mut sim = cluster_with(hanging(timeout, 1), script);
    let (a, b) = (sim.listener_at(addr(8000)), sim.listener_at(addr(8001)));
    sim.connect(a, 2);
    sim.advance(Duration::from_secs(2));
    sim.ack(w(1), a, 1);
    sim.advance(Duration::from_secs(2));
    assert!(lifecycle_events(&sim).is_empty(), "it acked 2 s ago");
    sim.ack(w(1), a, 1);
    // It holds one on `b`, then closes `b`: the connection waits for another worker, and
    // the one holding nothing is not hung for it.
    sim.connect(b, 1);
    sim.advance(SECOND);
    sim.say(w(1), ToPrimary::CloseListener { listener: b });
    sim.close_handoff(w(1), b, None);
    sim.advance(Duration::from_secs(10));
    assert!(lifecycle_events(&sim).is_empty(), "{:?}", sim.events);
    sim.assert_clean();
}

#[test]
fn a_worker_whose_heartbeats_stop_is_hung_but_not_one_that_leaves() {
    let timeout = Duration::from_secs(4);
    let mut sim = cluster_with(hanging(timeout, 3), Script::default());
    for worker in ws(1..=3) {
        sim.heartbeat(worker, 0);
    }
    sim.workers.get_mut(&w(2)).unwrap().script.on_disconnect = OnDisconnect::Hang;
    sim.advance(Duration::from_secs(2));
    for worker in ws(2..=3) {
        sim.heartbeat(worker, 0);
    }
    // Worker 2 leaves by itself and goes quiet; worker 3 closes its channel and lingers.
    sim.say(w(2), ToPrimary::Disconnecting);
    sim.close_control(w(3), None);
    sim.advance(Duration::from_secs(2) - MS);
    assert!(lifecycle_events(&sim).is_empty());
    sim.advance(MS);
    assert_eq!(lifecycle_events(&sim), ["Hung w1"]);
    assert_eq!(sim.signals_to(w(1)), [Signal::SIGABRT]);
    // Worker 4 replaces worker 1 at once; it never sent a heartbeat, so it is not hung.
    assert_eq!(spawns(&sim).last(), Some(&(w(4), SlotId(0))));
    sim.advance(Duration::from_secs(20));
    assert_eq!(lifecycle_events(&sim), ["Hung w1"]);
    // The ones that left were killed at the shutdown timeout, not for a hang.
    assert_eq!(sim.signals_to(w(2)), [Signal::SIGKILL]);
    assert_eq!(sim.signals_to(w(3)), [Signal::SIGKILL]);
    sim.settle();
    sim.assert_clean();
}

// ----- recycling -----

fn recycling(after: Option<u64>, jitter: u64, max_memory: Option<u64>) -> Settings {
    Settings {
        recycle: Recycle {
            after_connections: after,
            jitter,
            max_memory,
        },
        ..settings(2)
    }
}

#[test]
fn the_jitter_differs_from_worker_to_worker_within_its_bound() {
    let jitters: BTreeSet<u64> = (1..200).map(|id| jitter_for(w(id), 10)).collect();
    assert!(jitters.iter().all(|&j| j <= 10));
    assert!(jitters.len() > 5, "{jitters:?}");
    assert_eq!(jitter_for(w(7), 0), 0);
    assert_eq!(jitter_for(w(7), 10), jitter_for(w(7), 10));
}

#[test]
fn a_worker_is_recycled_after_its_connections_and_drains_once_its_replacement_is_ready() {
    let jitter = 4;
    let mut sim = cluster_then_quiet(recycling(Some(3), jitter, None), Script::default());
    let l = sim.the_listener();
    sim.min_ready = Some(2);
    let limit = 3 + jitter_for(w(1), jitter);
    // Worker 1 takes `limit - 1` connections (worker 2 as many).
    for _ in 0..limit - 1 {
        sim.connect(l, 2);
        ack_everything(&mut sim);
    }
    assert!(lifecycle_events(&sim).is_empty());
    assert_eq!(
        sim.sup.worker(w(1), sim.now).unwrap().connections_acked,
        limit - 1
    );
    sim.connect(l, 1);
    sim.ack_all(w(1));
    let events = lifecycle_events(&sim);
    assert_eq!(events[0], "Recycling w1", "{events:?}");
    assert_eq!(
        spawn_of(&sim, w(3)).map(|_| spawns(&sim)[2]),
        Some((w(3), SlotId(0)))
    );
    assert!(!asked(&sim, w(1)), "the replacement first");
    sim.connect(l, 2);
    ack_everything(&mut sim);
    sim.say_listening(w(3));
    assert!(asked(&sim, w(1)));
    assert!(disconnect_of(&sim, w(1)) > spawn_of(&sim, w(3)));
    ack_everything(&mut sim);
    assert_each_delivered_once(&sim);
    sim.min_ready = None;
    sim.settle();
    sim.assert_clean();
}

#[test]
fn a_heartbeat_that_counts_enough_connections_recycles_the_worker() {
    let settings = Settings {
        hang_timeout: Some(Duration::from_secs(60)),
        ..recycling(Some(100), 0, None)
    };
    let mut sim = cluster_with(settings, Script::default());
    sim.heartbeat(w(2), 99);
    assert!(lifecycle_events(&sim).is_empty());
    sim.heartbeat(w(2), 100);
    assert_eq!(lifecycle_events(&sim), ["Recycling w2"]);
    // The replacement listened at once: worker 2 drained and left.
    assert_eq!(spawns(&sim).last(), Some(&(w(3), SlotId(1))));
    assert_eq!(exit_status(&sim, w(2)), Some(ExitStatus::Code(0)));
    sim.heartbeat(w(1), 100);
    sim.heartbeat(w(1), 500);
    assert_eq!(
        lifecycle_events(&sim),
        ["Recycling w2", "Recycling w1"],
        "once each"
    );
    sim.assert_clean();
}

#[test]
fn a_worker_over_the_memory_limit_is_recycled() {
    let mut sim = cluster_with(recycling(None, 0, Some(100 * MB)), Script::default());
    sim.advance(Duration::ZERO);
    let measures = |sim: &Sim| {
        sim.log
            .iter()
            .filter_map(|(_, a)| match a {
                Action::MeasureMemory { workers } => Some(workers.clone()),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(measures(&sim), [ws(1..=2)]);
    // Shared pages do not count: only the unique set size is compared.
    let now = sim.now;
    sim.sup
        .handle_memory(w(1), Memory::new(500 * MB, 100 * MB), now);
    sim.pump();
    assert!(lifecycle_events(&sim).is_empty());
    sim.memory(w(2), 100 * MB + 1);
    assert_eq!(lifecycle_events(&sim), ["Recycling w2"]);
    assert_eq!(spawns(&sim).last(), Some(&(w(3), SlotId(1))));
    assert!(!sim.workers[&w(2)].alive, "replaced, drained, gone");
    sim.advance(MEMORY_INTERVAL);
    assert_eq!(measures(&sim).last(), Some(&ws([1, 3])));
    assert_eq!(
        sim.sup.worker(w(1), sim.now).unwrap().memory,
        Some(Memory::new(500 * MB, 100 * MB))
    );
    sim.assert_clean();
}

// ----- hand-backs -----

#[test]
fn a_handed_back_connection_goes_first_to_another_worker_or_is_closed_when_stopping() {
    let mut sim = cluster_with(settings(2), Script::default());
    let l = sim.the_listener();
    sim.connect(l, 2); // 1 to worker 1, 2 to worker 2
    sim.ack_all(w(1));
    sim.connect(l, 1); // 3 to worker 1
    sim.ack_all(w(1));
    assert_eq!(sim.handed_to(w(1)), [ConnId(1), ConnId(3)]);
    sim.workers.get_mut(&w(1)).unwrap().script.on_disconnect = OnDisconnect::Hang;
    sim.disconnect(w(1)).unwrap();
    sim.connect(l, 1); // 4 waits: worker 2 has no credit, worker 1 leaves
    assert_eq!(sim.in_flight(w(2), l), [ConnId(2)]);
    assert_eq!(sim.places()[&ConnId(4)], Place::Pending);
    // Worker 1 drains; a keep-alive connection comes back between two requests.
    let again = sim.hand_back(w(1), l, ConnId(1));
    assert_eq!(sim.places()[&again], Place::Pending);
    sim.ack_all(w(2));
    assert_eq!(
        sim.handed_to(w(2)),
        [ConnId(2), again],
        "the handed-back connection goes before connection 4"
    );
    sim.ack_all(w(2));
    assert_eq!(sim.handed_to(w(2)), [ConnId(2), again, ConnId(4)]);
    sim.ack_all(w(2));
    sim.stop(true);
    let closed = sim.hand_back(w(1), l, ConnId(3));
    assert_eq!(sim.places()[&closed], Place::Closed);
    assert_eq!(sim.released().last(), Some(&closed));
    sim.exit(w(1), ExitStatus::Code(0));
    sim.settle();
    assert!(sim.finished);
    sim.assert_clean();
}

#[test]
fn a_hand_back_without_its_connection_is_a_protocol_violation() {
    let mut sim = cluster_with(settings(2), Script::default());
    let l = sim.the_listener();
    let now = sim.now;
    sim.sup.handle_handed_back(w(1), l, None, now);
    sim.pump();
    assert_eq!(sim.signals_to(w(1)), [Signal::SIGKILL]);
    sim.settle();
    assert_eq!(sim.serving(), ws(2..=3));
    sim.assert_clean();
}

#[test]
fn a_hand_back_on_a_listener_that_is_gone_is_closed() {
    let mut sim = cluster_with(settings(1), Script::default());
    let l = sim.the_listener();
    sim.connect(l, 1);
    sim.ack_all(w(1));
    sim.stop(true);
    let unknown = ListenerId(77);
    let now = sim.now;
    sim.conns.get_mut(&ConnId(1)).unwrap().place = Place::Gone;
    sim.sup
        .handle_handed_back(w(1), unknown, Some(ConnId(99)), now);
    assert_eq!(
        sim.sup.poll_action(),
        Some(Action::Release {
            conns: vec![ConnId(99)]
        })
    );
}

// ----- how it ends -----

#[test]
fn a_stop_that_has_to_kill_a_worker_ends_forced() {
    // Clean: every worker left in time.
    let mut sim = cluster_with(settings(2), Script::default());
    sim.stop(true);
    assert!(sim.finished);
    assert_eq!(sim.sup.ending(), Ending::Clean);
    // One worker does not leave: killed at the shutdown timeout.
    let mut sim = cluster_with(settings(2), Script::default());
    sim.workers.get_mut(&w(2)).unwrap().script.on_disconnect = OnDisconnect::Hang;
    sim.stop(true);
    sim.advance(SHUTDOWN_TIMEOUT);
    assert!(sim.finished);
    assert_eq!(sim.sup.ending(), Ending::Forced { killed: 1 });
    sim.assert_clean();
    // An immediate stop kills them all.
    let mut sim = cluster_with(settings(2), Script::default());
    sim.stop(false);
    assert!(sim.finished);
    assert_eq!(sim.sup.ending(), Ending::Forced { killed: 2 });
    sim.assert_clean();
}

// ----- corners the property run found -----

#[test]
fn a_hung_worker_is_refused_new_listeners() {
    let mut sim = cluster_with(hanging(Duration::from_secs(3), 2), Script::default());
    let l = sim.the_listener();
    sim.connect(l, 1);
    sim.advance(Duration::from_secs(3));
    assert_eq!(lifecycle_events(&sim), ["Hung w1"]);
    // Its control channel still works: it asks for another listener, and must not get it
    // (it would hold connections until its SIGKILL).
    sim.listen(w(1), addr(8001), None);
    assert_eq!(sim.workers[&w(1)].refused.len(), 1);
    assert!(sim.workers[&w(1)].handoffs.is_empty());
    ack_everything(&mut sim);
    sim.settle();
    sim.assert_clean();
}

#[test]
fn a_failed_replacement_of_a_worker_that_no_longer_serves_refills_the_slot_at_once() {
    for how in ["hung", "channel closed"] {
        let settings = Settings {
            hang_timeout: Some(Duration::from_secs(3)),
            ..settings(2)
        };
        let mut sim = cluster_then_quiet(settings, Script::default());
        let l = sim.the_listener();
        sim.reload().unwrap();
        match how {
            "hung" => {
                sim.connect(l, 1);
                sim.advance(Duration::from_secs(3));
                assert_eq!(lifecycle_events(&sim)[1], "Hung w1");
                assert_eq!(spawns(&sim).len(), 3, "its replacement is on its way");
            }
            _ => sim.close_control(w(1), None),
        }
        // The replacement fails: the slot gets a new worker now, not once worker 1 is gone.
        sim.crash(w(3));
        assert_eq!(spawns(&sim).last(), Some(&(w(4), SlotId(0))), "{how}");
        assert!(sim.workers[&w(1)].alive, "{how}");
        sim.say_listening(w(4));
        ack_everything(&mut sim);
        sim.settle();
        assert_eq!(sim.serving(), ws([2, 4]), "{how}");
        sim.assert_clean();
    }
}

#[test]
fn a_worker_that_left_while_replaced_gets_no_replacement_on_retire_once_its_slot_is_refilled() {
    let mut sim = cluster_then_quiet(settings(1), Script::default());
    sim.workers.get_mut(&w(1)).unwrap().script.on_disconnect = OnDisconnect::Hang;
    sim.reload().unwrap();
    // Worker 1 leaves by itself; its replacement fails: the slot is refilled.
    sim.say(w(1), ToPrimary::Disconnecting);
    sim.crash(w(2));
    assert_eq!(spawns(&sim).last(), Some(&(w(3), SlotId(0))));
    // Then it asks to retire: its slot has worker 3 already.
    sim.say(w(1), ToPrimary::Retire);
    assert_eq!(spawns(&sim).len(), 3);
    sim.say_listening(w(3));
    sim.settle();
    assert_eq!(sim.serving(), [w(3)]);
    sim.assert_clean();
}

#[test]
fn a_hung_worker_whose_slot_was_refilled_gets_no_second_replacement() {
    let settings = Settings {
        hang_timeout: Some(Duration::from_secs(3)),
        ..settings(1)
    };
    let mut sim = cluster_then_quiet(settings, Script::default());
    let l = sim.the_listener();
    sim.connect(l, 1);
    sim.reload().unwrap();
    // Worker 1 closes its channel (its handoff socket stays open, the connection un-acked);
    // its replacement fails: the slot is refilled.
    sim.close_control(w(1), None);
    sim.crash(w(2));
    assert_eq!(spawns(&sim).last(), Some(&(w(3), SlotId(0))));
    sim.say_listening(w(3));
    sim.advance(Duration::from_secs(3));
    assert_eq!(lifecycle_events(&sim)[1..], ["Aborted 1", "Hung w1"]);
    assert_eq!(spawns(&sim).len(), 3, "worker 3 serves its slot already");
    assert_eq!(sim.handed_to(w(3)), [ConnId(1)]);
    ack_everything(&mut sim);
    sim.settle();
    assert_eq!(sim.serving(), [w(3)]);
    sim.assert_clean();
}

#[test]
fn a_reload_does_not_replace_a_worker_whose_process_is_not_started_yet() {
    // The Spawn is out, its answer not in: that worker runs the program as it is now.
    let mut sup = crate::supervisor::Supervisor::new(settings(2));
    let now = std::time::Instant::now();
    sup.start(now);
    while sup.poll_action().is_some() {}
    sup.handle_spawned(w(1), 101);
    assert_eq!(sup.reload(now), Ok(1));
    let actions: Vec<Action> = std::iter::from_fn(|| sup.poll_action()).collect();
    let replaced: Vec<SlotId> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Spawn { slot, .. } => Some(*slot),
            _ => None,
        })
        .collect();
    assert_eq!(replaced, [SlotId(0)], "{actions:?}");
    assert!(actions.contains(&Action::Event(Event::RolloutStarted {
        rollout: 1,
        workers: 1
    })));
}

#[test]
fn a_spawn_that_fails_after_its_slot_went_to_a_replacement_leaves_the_slot_alone() {
    // A roll-out queued behind one whose replacement failed starts at once, while the
    // failed slot's respawn is not started yet: it must not replace that one, whose spawn
    // then fails; the slot keeps one worker.
    let mut sim = cluster_then_quiet(settings(2), Script::default());
    sim.reload().unwrap();
    sim.reload().unwrap();
    sim.scripts.push_back(Script {
        spawn_fails: true,
        ..Script::default()
    });
    sim.workers.get_mut(&w(1)).unwrap().script.on_disconnect = OnDisconnect::Hang;
    sim.say(w(1), ToPrimary::Disconnecting);
    sim.crash(w(3));
    while next_replacement_listens(&mut sim) {}
    sim.settle();
    assert_eq!(sim.serving().len(), 2);
    sim.assert_clean();
}

#[test]
fn a_replacement_waits_for_a_listener_its_worker_opened_after_the_start() {
    let mut sim = cluster_then_quiet(settings(1), Script::default());
    sim.reload().unwrap();
    // Worker 1 starts listening on 8001 while its replacement starts.
    sim.listen(w(1), addr(8001), None);
    let b = sim.listener_at(addr(8001));
    sim.say_listening(w(2));
    assert!(!asked(&sim, w(1)), "worker 2 does not listen on 8001 yet");
    sim.listen(w(2), addr(8001), None);
    sim.say_listening_on(w(2), b);
    assert!(asked(&sim, w(1)));
    sim.settle();
    sim.assert_clean();
}

#[test]
fn disconnecting_a_replacement_not_ready_yet_fails_it_at_once() {
    let mut sim = cluster_then_quiet(settings(2), Script::default());
    sim.reload().unwrap();
    sim.disconnect(w(3)).unwrap();
    assert_eq!(lifecycle_events(&sim), ["Started 1 of 2", "Aborted 1"]);
    assert!(abort_reason(&sim, 1).contains("disconnected"));
    assert!(!sim.workers[&w(3)].alive);
    // Worker 1 keeps its slot: disconnecting it now leaves the slot empty.
    sim.disconnect(w(1)).unwrap();
    sim.settle();
    assert_eq!(spawns(&sim).len(), 3);
    assert_eq!(sim.serving(), [w(2)]);
    sim.assert_clean();
}

#[test]
fn disconnecting_a_worker_being_replaced_lets_its_replacement_take_the_slot() {
    let mut sim = cluster_then_quiet(settings(2), Script::default());
    sim.reload().unwrap();
    sim.disconnect(w(1)).unwrap();
    sim.say_listening(w(3));
    while next_replacement_listens(&mut sim) {}
    assert_eq!(
        lifecycle_events(&sim).last().map(String::as_str),
        Some("Finished 1")
    );
    sim.settle();
    assert_eq!(sim.serving(), ws(3..=4));
    sim.assert_clean();
}

#[test]
fn jitter_spreads_over_its_whole_range_and_no_further() {
    use crate::supervisor::lifecycle::jitter_for;
    let values: std::collections::BTreeSet<u64> = (1..=64).map(|id| jitter_for(w(id), 1)).collect();
    assert_eq!(values, [0, 1].into(), "both ends of 0..=1 are reached");
    assert!((1..=1000).all(|id| jitter_for(w(id), 10) <= 10));
    assert_eq!(jitter_for(w(7), 0), 0);
}
