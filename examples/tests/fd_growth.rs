//! The primary's fds do not grow: over 1000 connections and 20 crashed-and-replaced workers,
//! everything the primary opened for a connection or a worker is closed again.
//!
//! Alone in its test binary: it counts this process's fd table, which tests running in
//! parallel threads would disturb. The primary runs in this process, on a thread.
#![allow(clippy::unwrap_used)]

#[path = "cluster/support.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;

use cluster_primary::{ExitStatus, Signal};
use support::{Harness, builder, greet, signal, wait_until};

/// This process's open fds and what each points at.
fn open_fds() -> BTreeMap<i32, PathBuf> {
    let listing = PathBuf::from(format!("/proc/{}/fd", std::process::id()));
    let mut fds = BTreeMap::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
        let entry = entry.unwrap();
        let Ok(number) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // Skip the handle of this very listing.
        if let Ok(target) = std::fs::read_link(entry.path()) {
            if target != listing {
                fds.insert(number, target);
            }
        }
    }
    fds
}

/// What kinds of fds there are, and how many of each (`socket`, `anon_inode:[pidfd]`, ...).
fn kinds(fds: &BTreeMap<i32, PathBuf>) -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    for target in fds.values() {
        let text = target.to_string_lossy();
        let kind = text.split(':').next().unwrap_or_default().to_owned();
        let kind = if kind.starts_with("anon_inode") {
            text.into_owned()
        } else {
            kind
        };
        *kinds.entry(kind).or_insert(0) += 1;
    }
    kinds
}

#[test]
fn the_primarys_fds_do_not_grow_over_1000_connections_and_20_respawns() {
    const WORKERS: u32 = 4;
    const ROUNDS: u32 = 20;
    const PER_ROUND: usize = 50;
    let mut cluster = Harness::start(builder(WORKERS as usize).window(4));
    let addr = cluster.wait_ready()[0];
    for _ in 0..WORKERS {
        cluster.wait_fork();
    }
    let before = open_fds();

    for round in 0..ROUNDS {
        for _ in 0..PER_ROUND {
            greet(addr);
        }
        // Crash one worker (slots in turn) and wait until its replacement listens.
        let slot = round % WORKERS;
        let victim = cluster.worker_in_slot(slot);
        signal(victim.pid, Signal::SIGKILL);
        assert_eq!(
            cluster.wait_exit(victim.id),
            (ExitStatus::Signal(Signal::SIGKILL as i32), false)
        );
        let (worker, _, new_slot) = cluster.wait_fork();
        assert_eq!(new_slot, slot);
        cluster.wait_listening(worker);
    }
    let status = cluster.status();
    assert_eq!(status.restarts, u64::from(ROUNDS));
    assert_eq!(status.workers.len(), WORKERS as usize);

    // The primary lets go of a connection once its worker acknowledged it; the last acks may
    // still be on their way.
    wait_until("every connection acknowledged", || {
        let status = cluster.status();
        status.pending_connections == 0 && status.workers.iter().all(|w| w.in_flight == 0)
    });
    let after = open_fds();
    assert!(
        after.len() <= before.len(),
        "fds grew from {} to {}: before {:?}, after {:?}",
        before.len(),
        after.len(),
        kinds(&before),
        kinds(&after)
    );
    cluster.stop();
}
