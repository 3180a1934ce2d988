//! The primary's fds do not grow: over 1000 connections and 20 crashed-and-replaced workers,
//! everything the primary opened for a connection or a worker is closed again.
//!
//! Alone in its test binary: it counts this process's fd table, which tests running in
//! parallel threads would disturb. The primary runs in this process, on a thread.

#[path = "cluster/support.rs"]
mod support;

use cluster_primary::{ExitStatus, Signal};
use cluster_test_support::FdSnapshot;
use support::{Harness, WAIT, builder, greet, signal, wait_until};

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
    let before = FdSnapshot::take();

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
            (ExitStatus::Signal(Signal::SIGKILL), false)
        );
        let (worker, _, new_slot) = cluster.wait_fork();
        assert_eq!(new_slot, cluster_primary::SlotId(slot));
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
    // Fails with how many of each kind there were before and after.
    before.assert_not_grown_within(WAIT);
    cluster.stop();
}
