//! What an operator sees and gets: log lines at the default level for a worker's death and
//! its replacement, failures a respawn cannot fix that stop the program at once with one
//! message naming the cause (a taken port, a worker program that does not exist).

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::time::Duration;

use cluster_primary::Signal;

use crate::hello::{HELLO, Hello, run_to_exit};
use crate::support::{Harness, TEST_PRIMARY, TEST_WORKER, builder, signal};

#[test]
fn a_worker_killed_with_sigkill_is_logged_at_the_default_level_with_its_replacement() {
    let mut hello = Hello::start_with_default_log(&["--workers", "2"]);
    let workers = hello.wait_workers(2, &BTreeSet::new());
    let victim = *workers.first().unwrap();
    signal(victim, Signal::SIGKILL);
    let exit = hello
        .wait_log_line(|line| line.contains(&format!("pid={victim} ")) && line.contains("status="));
    assert!(exit.contains("SIGKILL"), "{exit}");
    assert!(
        exit.contains("WARN"),
        "an unexpected death is a warning: {exit}"
    );
    let worker = exit
        .split_whitespace()
        .find_map(|word| word.strip_prefix("worker="))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("the worker is named: {exit}"));
    let respawn = hello.wait_log_line(|line| line.contains("respawning"));
    assert!(respawn.contains(&format!("replaces={worker}")), "{respawn}");
    assert!(respawn.contains("delay_ms="), "{respawn}");
    let started = hello.wait_log_line(|line| line.contains("worker started"));
    assert!(!started.contains(&format!("pid={victim} ")), "{started}");
    hello.stop();
}

#[test]
fn hello_on_a_taken_port_exits_non_zero_at_once_naming_the_address_and_the_cause_once() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let port = addr.port().to_string();
    let (code, stderr) = run_to_exit(
        HELLO,
        &["--workers", "2", "--port", &port],
        Duration::from_secs(5),
    );
    assert_ne!(code, Some(0), "{stderr}");
    assert_eq!(
        stderr.to_lowercase().matches("in use").count(),
        1,
        "the cause once: {stderr}"
    );
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.contains(&addr.to_string()), "{stderr}");
    assert!(last.contains("address in use"), "{stderr}");
}

#[test]
fn a_cluster_whose_worker_program_does_not_exist_exits_non_zero_naming_the_path() {
    let missing = "/nonexistent/cluster-worker-program";
    let (code, stderr) = run_to_exit(
        TEST_PRIMARY,
        &["--worker-program", missing, "--workers", "2"],
        Duration::from_secs(5),
    );
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains(missing), "{stderr}");
    assert!(stderr.contains("no such file"), "{stderr}");
}

#[test]
fn a_worker_program_removed_after_the_start_stops_the_cluster_naming_it() {
    // Checked at build, gone by the spawn (a deploy that removed it): the spawn's ENOENT
    // must reach the error, not be lost in a respawn loop.
    let dir = std::env::temp_dir().join(format!("cluster-removed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let program = dir.join("worker");
    std::fs::copy(TEST_WORKER, &program).unwrap();
    let builder = builder(2).program(&program);
    let removed = program.clone();
    let mut cluster = Harness::start_making(move || {
        let primary = builder.build();
        std::fs::remove_file(&removed).unwrap();
        primary
    });
    let result = cluster.wait_finished();
    let _ = std::fs::remove_dir(&dir);
    let err = result.expect_err("the cluster cannot run");
    assert!(err.contains(&program.display().to_string()), "{err}");
    assert!(
        cluster.events().is_empty(),
        "nothing started: {:?}",
        cluster.events()
    );
}

#[test]
fn log_format_json_writes_one_object_per_line_the_error_included() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (code, stderr) = run_to_exit(
        HELLO,
        &["--workers", "1", "--port", &port, "--log-format", "json"],
        Duration::from_secs(5),
    );
    assert_ne!(code, Some(0), "{stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: {line}")))
        .collect();
    let started = lines
        .iter()
        .find(|l| l["fields"]["message"] == "primary starting");
    assert!(
        started.is_some_and(|l| l["fields"]["workers"] == 1),
        "{stderr}"
    );
    let last = lines.last().unwrap();
    assert_eq!(last["level"], "ERROR", "{stderr}");
    let error = last["fields"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("address in use"), "{stderr}");
}
