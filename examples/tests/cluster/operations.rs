//! Zero-downtime operations on `hello`, as an operator drives them: a rolling restart on
//! SIGHUP, scaling with SIGTTIN and SIGTTOU, recycling after a number of connections, a hung
//! worker and a crashing handler, a program whose workers cannot boot. Each runs under a
//! load of concurrent clients that count every failed request.

use std::collections::BTreeSet;
use std::time::Duration;

use cluster_primary::{Event, Signal, WorkerId, WorkerState};
use nix::sys::wait::WaitStatus;

use crate::hello::{HELLO, Hello, Load, Outcome, get_once, run_to_exit};
use crate::support::{Harness, builder, greet, is_alive, signal, wait_until};

#[test]
fn sighup_replaces_every_worker_under_load_without_a_failed_request() {
    let hello = Hello::start(&["--workers", "4"]);
    let old = hello.wait_workers(4, &BTreeSet::new());
    let load = Load::start(hello.addr, 8, false);
    load.wait_for_more(200);

    signal(hello.pid(), Signal::SIGHUP);
    let new = hello.wait_workers(4, &old);
    wait_until("the old workers are gone", || {
        old.iter().all(|&pid| !is_alive(pid))
    });
    load.wait_for_more(200);
    let answered_by = load.pids();
    let (ok, failures) = load.finish();
    assert_eq!(failures, Vec::<String>::new(), "after {ok} answered");
    assert!(
        new.iter().all(|pid| answered_by.contains(pid)),
        "every new worker answers: {new:?} of {answered_by:?}"
    );
    hello.stop();
}

#[test]
fn sighup_under_keep_alive_clients_moves_their_connections_without_an_error() {
    let hello = Hello::start(&["--workers", "4"]);
    let old = hello.wait_workers(4, &BTreeSet::new());
    // Keep-alive clients never reconnect unless a request fails (which counts): every
    // connection must move to a new worker between two requests.
    let load = Load::start(hello.addr, 8, true);
    load.wait_for_more(400);
    signal(hello.pid(), Signal::SIGHUP);
    let new = hello.wait_workers(4, &old);
    wait_until("the old workers are gone", || {
        old.iter().all(|&pid| !is_alive(pid))
    });
    load.wait_for_more(400);
    let answered_by = load.pids();
    let (ok, failures) = load.finish();
    assert_eq!(failures, Vec::<String>::new(), "after {ok} answered");
    assert!(
        new.iter().any(|pid| answered_by.contains(pid)),
        "the moved connections are served by new workers: {answered_by:?}"
    );
    hello.stop();
}

#[test]
fn sigttin_then_sigttou_twice_runs_5_then_3_workers_under_load_without_a_failed_request() {
    let hello = Hello::start(&["--workers", "4"]);
    let first = hello.wait_workers(4, &BTreeSet::new());
    let load = Load::start(hello.addr, 8, false);
    load.wait_for_more(100);

    signal(hello.pid(), Signal::SIGTTIN);
    let five = hello.wait_workers(5, &BTreeSet::new());
    assert!(first.is_subset(&five), "scaling up replaces nobody");
    load.wait_for_more(100);
    signal(hello.pid(), Signal::SIGTTOU);
    hello.wait_workers(4, &BTreeSet::new());
    signal(hello.pid(), Signal::SIGTTOU);
    let three = hello.wait_workers(3, &BTreeSet::new());
    assert!(three.is_subset(&five), "scaling down starts nobody");
    load.wait_for_more(100);
    let (ok, failures) = load.finish();
    assert_eq!(failures, Vec::<String>::new(), "after {ok} answered");
    hello.stop();
}

#[test]
fn max_requests_recycles_workers_under_load_without_a_failed_request() {
    let hello = Hello::start(&["--workers", "2", "--max-requests", "100"]);
    let first = hello.wait_workers(2, &BTreeSet::new());
    let load = Load::start(hello.addr, 4, false);
    wait_until("both first workers recycled", || {
        first.iter().all(|&pid| !is_alive(pid))
    });
    load.wait_for_more(100);
    let answered_by = load.pids();
    let (ok, failures) = load.finish();
    assert_eq!(failures, Vec::<String>::new(), "after {ok} answered");
    assert!(
        answered_by.len() >= 4,
        "recycled workers answered: {answered_by:?}"
    );
    hello.stop();
}

#[test]
fn a_worker_over_its_memory_limit_is_replaced_without_a_failed_request() {
    // Any worker uses more than 64 KiB of its own: each is replaced once it is measured.
    let hello = Hello::start(&["--workers", "1", "--max-memory", "64K"]);
    let first = hello.wait_workers(1, &BTreeSet::new());
    let load = Load::start(hello.addr, 2, false);
    hello.wait_workers(1, &first);
    load.wait_for_more(50);
    let (ok, failures) = load.finish();
    assert_eq!(failures, Vec::<String>::new(), "after {ok} answered");
    hello.stop();
}

#[test]
fn a_hung_worker_is_replaced_and_what_was_queued_for_it_is_served_by_another() {
    let hello = Hello::start(&["--workers", "2", "--faults", "--hang-timeout", "3"]);
    let first = hello.wait_workers(2, &BTreeSet::new());
    let addr = hello.addr;
    let hang = std::thread::spawn(move || get_once(addr, "/hang"));
    // Once its server loop spins in the handler (its main thread always running), the
    // requests that follow are handed to it and never taken: they wait, queued for it, until
    // it is found out, and must then be answered by the other worker. (Connections a worker
    // took before it hung are lost with it, as with any crash; none is open here.) On a
    // machine so loaded that the spinning worker got little CPU before it was found out, it
    // may already be gone: the load then checks only that nothing fails.
    wait_until(
        "a worker spins in GET /hang, or was found out already",
        || is_spinning(&first) || !first.is_subset(&hello.workers()),
    );
    let load = Load::start(hello.addr, 2, false);
    wait_until("the hung worker is replaced", || {
        let workers = hello.workers();
        workers.len() == 2 && first.difference(&workers).count() == 1
    });
    load.wait_for_more(50);
    let (ok, failures) = load.finish();
    assert_eq!(failures, Vec::<String>::new(), "after {ok} answered");
    assert!(
        matches!(hang.join().unwrap(), Outcome::Failed(_)),
        "the hanging request itself is lost with its worker"
    );
    hello.stop();
}

#[test]
fn get_crash_fails_only_its_own_request_and_its_worker_is_replaced() {
    let hello = Hello::start(&["--workers", "2", "--faults"]);
    let first = hello.wait_workers(2, &BTreeSet::new());
    let load = Load::start(hello.addr, 4, false);
    load.wait_for_more(100);
    assert!(matches!(get_once(hello.addr, "/crash"), Outcome::Failed(_)));
    wait_until("the crashed worker is replaced", || {
        let workers = hello.workers();
        workers.len() == 2 && first.difference(&workers).count() == 1
    });
    load.wait_for_more(100);
    let (ok, failures) = load.finish();
    assert_eq!(failures, Vec::<String>::new(), "after {ok} answered");
    hello.stop();
}

#[test]
fn workers_that_cannot_boot_stop_hello_with_a_message_and_a_non_zero_exit() {
    let (code, stderr) = run_to_exit(
        HELLO,
        &["--workers", "2", "--port", "0", "--boot-fail"],
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("hello: worker boot failed"),
        "the message names the cause: {stderr}"
    );
}

// ----- the same operations through the `Handle` -----

/// The workers serving (listening, not leaving), by id.
fn serving(cluster: &Harness) -> BTreeSet<WorkerId> {
    cluster
        .status()
        .workers
        .iter()
        .filter(|w| w.state == WorkerState::Listening)
        .map(|w| w.id)
        .collect()
}

#[test]
fn handle_reload_returns_once_every_worker_was_replaced() {
    let mut cluster = Harness::start(builder(2));
    let addr = cluster.wait_ready()[0];
    let old = serving(&cluster);
    cluster.handle.reload().expect("the roll-out finishes");
    let new = serving(&cluster);
    assert_eq!(new.len(), 2);
    assert!(new.is_disjoint(&old), "{old:?} replaced by {new:?}");
    assert!(new.contains(&WorkerId(greet(addr).worker)));
    let events = cluster.stop();
    let steps: Vec<(WorkerId, WorkerId)> = events
        .iter()
        .filter_map(|event| match event {
            Event::RolloutStep { old, new, .. } => Some((*old, *new)),
            _ => None,
        })
        .collect();
    assert_eq!(steps.len(), 2, "one step per worker: {events:#?}");
    assert!(matches!(
        events
            .iter()
            .find(|e| matches!(e, Event::RolloutFinished { .. })),
        Some(Event::RolloutFinished { rollout: 1 })
    ));
}

#[test]
fn a_reload_whose_replacements_cannot_boot_is_aborted_and_the_old_workers_keep_serving() {
    let flag = std::env::temp_dir().join(format!("cluster-boot-fail-{}", std::process::id()));
    let _ = std::fs::remove_file(&flag);
    let behaviour = format!("boot-fail-if:{}", flag.display());
    let mut cluster = Harness::start(builder(2).env("TW_BEHAVIOUR", behaviour));
    let addr = cluster.wait_ready()[0];
    let old = serving(&cluster);
    std::fs::write(&flag, b"").unwrap();
    let outcome = cluster.handle.reload();
    std::fs::remove_file(&flag).unwrap();
    match outcome {
        Err(cluster_primary::Error::RolloutAborted { reason }) => {
            assert!(reason.contains("boot failed"), "{reason}");
        }
        other => panic!("expected an aborted roll-out, got {other:?}"),
    }
    assert_eq!(serving(&cluster), old, "the old workers keep serving");
    for _ in 0..10 {
        assert!(old.contains(&WorkerId(greet(addr).worker)));
    }
    assert!(
        !cluster.status().stopping,
        "a failed roll-out does not stop the cluster"
    );
    cluster.stop();
}

#[test]
fn fork_with_env_starts_one_more_worker_that_sees_it() {
    let mut cluster = Harness::start(builder(1).env("TW_REPORT_ENV", "CLUSTER_TEST_EXTRA"));
    cluster.wait_ready();
    let forked = cluster
        .handle
        .fork([("CLUSTER_TEST_EXTRA", "for this worker")])
        .expect("fork");
    let (_, fields) = cluster.wait_message(Some(forked), "report");
    assert!(
        fields.contains(&"env.CLUSTER_TEST_EXTRA=for this worker".to_owned()),
        "{fields:?}"
    );
    let status = cluster.status();
    assert_eq!(status.target_workers, 2);
    cluster.stop();
}

#[test]
fn set_workers_grows_and_shrinks_the_cluster_and_refuses_zero() {
    let mut cluster = Harness::start(builder(1));
    cluster.wait_ready();
    cluster.handle.set_workers(3).expect("scale up");
    wait_until("3 workers serving", || serving(&cluster).len() == 3);
    assert!(matches!(
        cluster.handle.set_workers(0),
        Err(cluster_primary::Error::InvalidConfig { .. })
    ));
    cluster.handle.set_workers(1).expect("scale down");
    wait_until("1 worker left", || cluster.status().workers.len() == 1);
    assert_eq!(cluster.status().target_workers, 1);
    cluster.stop();
}

// ----- stopping -----

/// Starts `hello` with one worker spinning forever in `GET /hang` (hang detection off), so
/// that only a kill ends it.
fn hello_with_a_stuck_worker(shutdown_timeout: &str) -> Hello {
    let mut hello = Hello::start_with_log(
        &[
            "--workers",
            "1",
            "--faults",
            "--hang-timeout",
            "0",
            "--shutdown-timeout",
            shutdown_timeout,
        ],
        true,
    );
    let workers = hello.wait_workers(1, &BTreeSet::new());
    let addr = hello.addr;
    std::thread::spawn(move || get_once(addr, "/hang"));
    // Hang detection is off: it spins until killed, so this cannot miss it.
    wait_until("a worker spins in GET /hang", || is_spinning(&workers));
    hello.wait_log("listening");
    hello
}

/// CPU time a process used, in clock ticks (user + system, from `/proc/PID/stat`).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name in parentheses: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let field = |at: usize| {
        fields
            .get(at)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

/// Whether one of `workers` has spun for a tenth of a second of CPU: it is in the handler
/// that never returns (an idle or starting worker uses a tick or two).
fn is_spinning(workers: &BTreeSet<u32>) -> bool {
    workers.iter().any(|&pid| cpu_ticks(pid) >= 10)
}

/// Sends `signals` to the primary, one after the other, each once the primary logged that it
/// took the one before (signals of one kind sent together are one), and waits (at most
/// `within`) for it to exit; returns its exit code.
fn stop_with(mut hello: Hello, signals: &[Signal], within: Duration) -> Option<i32> {
    let primary = hello.pid();
    for (at, &sent) in signals.iter().enumerate() {
        if at > 0 {
            hello.wait_log("requested");
        }
        signal(primary, sent);
    }
    let status = cluster_test_support::reap(primary, within);
    hello.guard.child = None;
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        _ => None,
    }
}

#[test]
fn a_stop_that_has_to_kill_a_worker_exits_non_zero_after_the_shutdown_timeout() {
    let hello = hello_with_a_stuck_worker("1");
    assert_eq!(
        stop_with(hello, &[Signal::SIGTERM], Duration::from_secs(15)),
        Some(1),
        "killed at the shutdown timeout: not a clean stop"
    );
}

#[test]
fn a_second_sigterm_stops_at_once() {
    // A shutdown timeout far beyond the test's wait: only the second signal can end it.
    let hello = hello_with_a_stuck_worker("3600");
    assert_eq!(
        stop_with(
            hello,
            &[Signal::SIGTERM, Signal::SIGTERM],
            Duration::from_secs(15)
        ),
        Some(1)
    );
}

#[test]
fn sigquit_stops_at_once() {
    let hello = hello_with_a_stuck_worker("3600");
    assert_eq!(
        stop_with(hello, &[Signal::SIGQUIT], Duration::from_secs(15)),
        Some(1)
    );
}
