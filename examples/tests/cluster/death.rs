//! The primary dies (SIGKILL, no chance to clean up): every worker must end, through the end
//! of file on its control channel alone, and through its parent-death signal alone.
//!
//! The primary is `test-primary`, a child of this process. This process is a child subreaper
//! (`support::init`), so once the primary is gone its workers become our children: we reap
//! them and read exactly how each ended.
//!
//! Each cluster has two workers: slot 0 is an ordinary `test-worker` (it reads its channel
//! and handles SIGTERM as "disconnect"); slot 1 is `raw-hello`, which says Hello by hand and
//! then never reads its channel again, with SIGTERM left at its default action. The raw worker
//! cannot learn of the primary's death from the channel, so only a signal can end it: with
//! the parent-death signal off it must survive the primary (that is what makes the
//! signal-only test conclusive), and with it on it must die of exactly that signal.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use cluster_primary::Signal;
use nix::sys::wait::WaitStatus;

use crate::support::{Guard, Lines, Slot, TEST_PRIMARY, TEST_WORKER, init, pid, signal};

struct Reported {
    pid: u32,
    pdeathsig: String,
}

/// Starts `test-primary` with two workers, waits until both have reported (their `report`
/// message carries their pid and parent-death signal) and slot 0 has reported that it
/// listens; returns the reports by slot.
fn start(flags: &[&str]) -> (Guard, Lines, BTreeMap<u32, Reported>) {
    init();
    let mut child = Command::new(TEST_PRIMARY)
        .args(["--worker-program", TEST_WORKER, "--workers", "2"])
        .args(flags)
        .env("TW_BEHAVIOUR_SLOT1", "raw-hello")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = Lines::new(child.stdout.take().unwrap());
    let mut guard = Guard::new(child);
    let mut reports = BTreeMap::new();
    let mut listening = false;
    while reports.len() < 2 || !listening {
        let line = lines.next().expect("test-primary's output ended early");
        let Some(rest) = line.strip_prefix("message ") else {
            continue;
        };
        let (_, rest) = rest.split_once(' ').unwrap();
        // The ordinary worker's own report that it listens: it is done setting up.
        if rest.starts_with("listening ") {
            listening = true;
        }
        let Some(fields) = rest.strip_prefix("report ") else {
            continue;
        };
        let fields: BTreeMap<&str, &str> = fields
            .split('\t')
            .filter_map(|field| field.split_once('='))
            .collect();
        let slot: u32 = fields["slot"].parse().unwrap();
        let pid: u32 = fields["pid"].parse().unwrap();
        guard.others.push(pid);
        reports.insert(
            slot,
            Reported {
                pid,
                pdeathsig: fields["pdeathsig"].to_owned(),
            },
        );
    }
    (guard, lines, reports)
}

fn kill_primary(guard: &mut Guard) {
    signal(guard.pid(), Signal::SIGKILL);
    assert!(matches!(
        guard.wait(),
        WaitStatus::Signaled(_, nix::sys::signal::SIGKILL, _)
    ));
}

#[test]
fn the_primarys_death_ends_its_workers_through_channel_eof_alone() {
    let _slot = Slot::take();
    let (mut primary, _lines, workers) = start(&["--no-pdeathsig"]);
    // No signal is coming.
    assert_eq!(workers[&0].pdeathsig, "none");
    assert_eq!(workers[&1].pdeathsig, "none");

    kill_primary(&mut primary);
    // The ordinary worker read the end of its channel, disconnected and exited by itself.
    assert_eq!(
        primary.reap_other(workers[&0].pid),
        WaitStatus::Exited(pid(workers[&0].pid), 0)
    );
    // The raw worker, which does not read its channel, is still there: nothing else could
    // have told it. It dies of our SIGKILL, which proves it was alive until then.
    let raw = workers[&1].pid;
    signal(raw, Signal::SIGKILL);
    assert_eq!(
        primary.reap_other(raw),
        WaitStatus::Signaled(pid(raw), nix::sys::signal::SIGKILL, false)
    );
}

#[test]
fn the_primarys_death_ends_its_workers_through_the_parent_death_signal_alone() {
    let _slot = Slot::take();
    let (mut primary, _lines, workers) = start(&[]);
    assert_eq!(workers[&0].pdeathsig, "SIGTERM");
    assert_eq!(workers[&1].pdeathsig, "SIGTERM");

    kill_primary(&mut primary);
    // The raw worker never reads its channel (the previous test shows it outlives its primary
    // without the signal): it dies of the parent-death signal, with SIGTERM's default action.
    let raw = workers[&1].pid;
    assert_eq!(
        primary.reap_other(raw),
        WaitStatus::Signaled(pid(raw), nix::sys::signal::SIGTERM, false)
    );
    // The ordinary worker hears it both ways and disconnects gracefully either way.
    assert_eq!(
        primary.reap_other(workers[&0].pid),
        WaitStatus::Exited(pid(workers[&0].pid), 0)
    );
}
