//! The checks have teeth: each flaw planted in the core (`Supervisor::sabotage`) must be
//! caught by the property run, as a violation of the property it breaks, and by a scenario.
//! A flaw that slips through is a failing test here.

use proptest::test_runner::{
    Config as ProptestConfig, FileFailurePersistence, TestCaseError, TestError, TestRng, TestRunner,
};

use std::time::Duration;

use cluster_ipc::WorkerId;
use cluster_ipc::proto::ToPrimary;

use super::properties::{Case, SOURCE, case, run_case};
use super::settings;
use super::sim::{OnDisconnect, Property, Script, Sim};
use crate::supervisor::{Ending, Fatal, Sabotage, Settings};

/// The flaws the property run catches (and a seed of the regression file each).
const FLAWS: [Sabotage; 8] = [
    Sabotage::ForgetRedispatchOnDeath,
    Sabotage::HandToDisconnecting,
    Sabotage::CountAckTwice,
    Sabotage::SkipBackoff,
    Sabotage::DropPendingOnStop,
    Sabotage::RetireBeforeReady,
    Sabotage::KeepHungConnections,
    Sabotage::ScaleDownKeepsWorkers,
];

/// A runner with a fixed seed (a test that must fail must not depend on luck) and no
/// persistence (these failures are wanted).
fn runner(cases: u32) -> TestRunner {
    let config = ProptestConfig {
        cases,
        failure_persistence: None,
        max_shrink_iters: 512,
        ..ProptestConfig::default()
    };
    let rng = TestRng::deterministic_rng(config.rng_algorithm);
    TestRunner::new_with_rng(config, rng)
}

/// Random cases must catch `flaw` as a violation of `property`; the smallest case found
/// must pass against the correct core.
fn assert_caught(flaw: Sabotage, property: Property) {
    let result = runner(2_000).run(&case(), |case| match run_case(&case, Some(flaw)) {
        Err(failures) if failures.broke(property) => Err(TestCaseError::fail(failures.to_string())),
        _ => Ok(()),
    });
    match result {
        Err(TestError::Fail(reason, minimal)) => {
            eprintln!("{flaw:?} caught as {property:?}: {reason}minimal: {minimal:#?}");
            if let Err(failures) = run_case(&minimal, None) {
                panic!("the case that catches {flaw:?} fails the correct core too:\n{failures}");
            }
        }
        other => panic!("{flaw:?} was not caught as {property:?}: {other:?}"),
    }
}

#[test]
fn the_properties_catch_forgetting_a_dead_workers_connections() {
    assert_caught(Sabotage::ForgetRedispatchOnDeath, Property::Conservation);
}

#[test]
fn the_properties_catch_handing_to_a_disconnecting_worker() {
    assert_caught(Sabotage::HandToDisconnecting, Property::HandoffToLeaving);
}

#[test]
fn the_properties_catch_counting_an_ack_twice() {
    assert_caught(Sabotage::CountAckTwice, Property::Conservation);
}

#[test]
fn the_properties_catch_skipping_the_backoff() {
    assert_caught(Sabotage::SkipBackoff, Property::Respawn);
}

#[test]
fn the_properties_catch_dropping_pending_connections_on_stop() {
    assert_caught(Sabotage::DropPendingOnStop, Property::Conservation);
}

#[test]
fn the_properties_catch_draining_a_worker_before_its_replacement_is_ready() {
    assert_caught(Sabotage::RetireBeforeReady, Property::Rollout);
}

#[test]
fn the_properties_catch_a_hung_worker_keeping_its_connections() {
    assert_caught(Sabotage::KeepHungConnections, Property::Hung);
}

#[test]
fn the_properties_catch_a_scale_down_that_keeps_its_workers() {
    assert_caught(Sabotage::ScaleDownKeepsWorkers, Property::Convergence);
}

// ----- the same flaws, through scenarios -----

/// The scenario, on two workers with a window of two, runs clean on the correct core and
/// breaks `property` under `flaw`.
fn assert_scenario_catches(flaw: Sabotage, property: Property, scenario: impl Fn(&mut Sim)) {
    let settings = Settings {
        window: std::num::NonZeroU32::new(2).unwrap(),
        ..settings(2)
    };
    assert_scenario_catches_with(flaw, property, &settings, scenario);
}

#[test]
fn a_scenario_catches_each_flaw() {
    let w = WorkerId;
    // A worker dies with a connection in flight; it must go to the other worker.
    assert_scenario_catches(
        Sabotage::ForgetRedispatchOnDeath,
        Property::Conservation,
        |sim| {
            let l = sim.the_listener();
            sim.connect(l, 1);
            sim.crash(w(1));
        },
    );
    // A worker says it disconnects; a new connection must go to the other one.
    assert_scenario_catches(
        Sabotage::HandToDisconnecting,
        Property::HandoffToLeaving,
        |sim| {
            let l = sim.the_listener();
            sim.workers.get_mut(&w(1)).unwrap().script.on_disconnect = OnDisconnect::Hang;
            sim.say(w(1), ToPrimary::Disconnecting);
            sim.connect(l, 4);
        },
    );
    // One ack, one release.
    assert_scenario_catches(Sabotage::CountAckTwice, Property::Conservation, |sim| {
        let l = sim.the_listener();
        sim.connect(l, 1);
        sim.ack(w(1), l, 1);
    });
    // A slot that fails twice waits 100 ms before its third start.
    assert_scenario_catches(Sabotage::SkipBackoff, Property::Respawn, |sim| {
        sim.crash(w(1));
        sim.crash(w(3));
        sim.settle();
    });
    // A stop with connections pending closes them.
    assert_scenario_catches(Sabotage::DropPendingOnStop, Property::Conservation, |sim| {
        let l = sim.the_listener();
        sim.connect(l, 6);
        sim.stop(true);
        sim.settle();
    });
}

// ----- the lifecycle flaws, through scenarios -----

/// The scenario, on a cluster of `settings`, runs clean on the correct core and breaks
/// `property` under `flaw`.
fn assert_scenario_catches_with(
    flaw: Sabotage,
    property: Property,
    settings: &Settings,
    scenario: impl Fn(&mut Sim),
) {
    let run = |flaw: Option<Sabotage>| {
        let mut sim = Sim::with_script(settings.clone(), Script::default());
        if let Some(flaw) = flaw {
            sim.sup.sabotage(flaw);
        }
        sim.start();
        scenario(&mut sim);
        sim
    };
    run(None).assert_clean();
    let mut sim = run(Some(flaw));
    sim.check();
    assert!(
        sim.broke(property),
        "{flaw:?} not caught as {property:?}: {:#?}",
        sim.violations
    );
}

#[test]
fn a_scenario_catches_draining_a_worker_before_its_replacement_is_ready() {
    let w = WorkerId;
    // The replacement says Hello, and listens only when told: the old worker must wait.
    assert_scenario_catches_with(
        Sabotage::RetireBeforeReady,
        Property::Rollout,
        &settings(2),
        |sim| {
            sim.default_script.send_listening = false;
            sim.reload().unwrap();
            assert!(sim.workers[&w(3)].online);
            sim.say_listening(w(3));
            sim.say_listening(w(4));
        },
    );
}

#[test]
fn a_scenario_catches_a_hung_worker_keeping_its_connections() {
    let w = WorkerId;
    let settings = Settings {
        hang_timeout: Some(Duration::from_secs(3)),
        ..settings(2)
    };
    // Worker 1 acks nothing for 3 s: what it holds goes to worker 2 at once.
    assert_scenario_catches_with(
        Sabotage::KeepHungConnections,
        Property::Hung,
        &settings,
        |sim| {
            let l = sim.the_listener();
            sim.connect(l, 2);
            sim.ack_all(w(2));
            sim.advance(Duration::from_secs(3));
        },
    );
}

#[test]
fn a_scenario_catches_a_scale_down_that_keeps_its_workers() {
    assert_scenario_catches_with(
        Sabotage::ScaleDownKeepsWorkers,
        Property::Convergence,
        &settings(3),
        |sim| sim.set_workers(2).unwrap(),
    );
}

#[test]
fn a_scenario_catches_a_crash_loop_guard_that_never_trips() {
    // Three crashes within 10 s stop the cluster, with the reason.
    let run = |flaw: Option<Sabotage>| {
        let settings = Settings {
            crash_loop: (3, Duration::from_secs(10)),
            ..settings(2)
        };
        let mut sim = Sim::with_script(settings, Script::default());
        if let Some(flaw) = flaw {
            sim.sup.sabotage(flaw);
        }
        sim.start();
        for _ in 0..3 {
            let worker = sim.serving()[0];
            sim.crash(worker);
        }
        sim.settle();
        sim
    };
    let mut clean = run(None);
    assert!(clean.finished);
    assert!(
        matches!(
            clean.sup.ending(),
            Ending::Fatal(Fatal::CrashLoop { failures: 3, .. })
        ),
        "{:?}",
        clean.sup.ending()
    );
    clean.assert_clean();
    let broken = run(Some(Sabotage::CrashLoopNeverTrips));
    assert!(
        !broken.finished && !broken.sup.is_stopping(),
        "CrashLoopNeverTrips not caught: the cluster stopped"
    );
}

// ----- the regression file -----

/// A runner that makes no new case: it only replays the seeds saved beside `source`.
fn replay_only(source: &'static str) -> TestRunner {
    let config = ProptestConfig {
        cases: 0,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        source_file: Some(source),
        max_shrink_iters: 0,
        ..ProptestConfig::default()
    };
    TestRunner::new(config)
}

fn replay(source: &'static str, flaw: Option<Sabotage>) -> Result<(), TestError<Case>> {
    replay_only(source).run(&case(), |case| {
        run_case(&case, flaw).map_err(|failures| TestCaseError::fail(failures.to_string()))
    })
}

/// `properties.proptest-regressions` is where proptest looks for the seeds of the tests in
/// `properties.rs`, and it reads it: replaying its seeds alone (no new case) catches every
/// flaw, while the same replay beside a file without seeds (this one) catches nothing.
#[test]
fn the_regression_file_is_read_and_its_seeds_catch_every_flaw() {
    let path = "src/supervisor/tests/properties.proptest-regressions";
    let seeds = include_str!("properties.proptest-regressions");
    assert!(seeds.lines().filter(|l| l.starts_with("cc ")).count() >= FLAWS.len());
    for flaw in FLAWS {
        let result = replay(SOURCE, Some(flaw));
        assert!(
            matches!(result, Err(TestError::Fail(..))),
            "no seed in {path} catches {flaw:?}: {result:?}"
        );
        assert!(
            replay(file!(), Some(flaw)).is_ok(),
            "the control replayed something"
        );
    }
    // And every seed passes the correct core.
    let result = replay(SOURCE, None);
    assert!(result.is_ok(), "{result:?}");
}
