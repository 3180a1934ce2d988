//! A primary's worker processes, as the kernel lists them: the process ids in
//! `/proc/<pid>/task/<tid>/children` (each thread lists the children it forked; a child that
//! exited stays listed until its parent reaps it), and a watch that polls them until the
//! workers are as expected.

use std::collections::BTreeSet;
use std::io;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

/// How often [`wait_for`] reads the children.
const POLL: Duration = Duration::from_millis(1);

/// The children of process `pid`, over all its threads.
pub(crate) fn of(pid: u32) -> Result<BTreeSet<u32>> {
    let tasks = format!("/proc/{pid}/task");
    let mut children = BTreeSet::new();
    for task in std::fs::read_dir(&tasks).with_context(|| format!("listing {tasks}"))? {
        let path = task
            .with_context(|| format!("listing {tasks}"))?
            .path()
            .join("children");
        match std::fs::read_to_string(&path) {
            Ok(text) => children.extend(parse(&text)),
            // A thread that ended since the listing.
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
        }
    }
    Ok(children)
}

/// The process ids of a `children` file: decimal numbers separated by spaces (anything else
/// is skipped).
pub(crate) fn parse(text: &str) -> BTreeSet<u32> {
    text.split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect()
}

/// Reads the children of `pid` until `done` says they are as expected, or until `deadline`.
/// Returns when that was seen (the instant after the reading that showed it) with the
/// children then, or `None` at the deadline.
pub(crate) fn wait_for(
    pid: u32,
    deadline: Instant,
    mut done: impl FnMut(&BTreeSet<u32>) -> bool,
) -> Result<Option<(Instant, BTreeSet<u32>)>> {
    loop {
        let children = of(pid)?;
        let now = Instant::now();
        if done(&children) {
            return Ok(Some((now, children)));
        }
        if now >= deadline {
            return Ok(None);
        }
        std::thread::sleep(POLL);
    }
}

/// Where a rolling restart stands, from the workers before it and the children now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rollout {
    /// Old workers still listed.
    pub(crate) old_left: usize,
    /// Children that were not there before: the replacements.
    pub(crate) new: usize,
}

impl Rollout {
    pub(crate) fn of(old: &BTreeSet<u32>, now: &BTreeSet<u32>) -> Rollout {
        Rollout {
            old_left: now.intersection(old).count(),
            new: now.difference(old).count(),
        }
    }

    /// Every old worker is gone and `workers` new ones run.
    pub(crate) fn finished(&self, workers: usize) -> bool {
        self.old_left == 0 && self.new == workers
    }
}

/// The one child in `now` that is not in `before`, if exactly one is new.
pub(crate) fn the_new_one(before: &BTreeSet<u32>, now: &BTreeSet<u32>) -> Option<u32> {
    let mut new = now.difference(before);
    match (new.next(), new.next()) {
        (Some(&pid), None) => Some(pid),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pids: &[u32]) -> BTreeSet<u32> {
        pids.iter().copied().collect()
    }

    #[test]
    fn a_children_file_is_pids_separated_by_spaces() {
        assert_eq!(
            parse("23452 23453 23454 23457 \n"),
            set(&[23452, 23453, 23454, 23457])
        );
        assert_eq!(parse(""), set(&[]));
        assert_eq!(parse("  7\n"), set(&[7]));
        assert_eq!(
            parse("12 x 13"),
            set(&[12, 13]),
            "what is not a pid is skipped"
        );
    }

    #[test]
    fn a_rollout_is_finished_when_no_old_worker_is_left_and_all_new_ones_run() {
        let old = set(&[1, 2, 3, 4]);
        let started = Rollout::of(&old, &set(&[1, 2, 3, 4, 5]));
        assert_eq!(
            started,
            Rollout {
                old_left: 4,
                new: 1
            }
        );
        assert!(!started.finished(4));
        let last_old_draining = Rollout::of(&old, &set(&[4, 5, 6, 7, 8]));
        assert!(!last_old_draining.finished(4));
        let last_new_missing = Rollout::of(&old, &set(&[5, 6, 7]));
        assert_eq!(
            last_new_missing,
            Rollout {
                old_left: 0,
                new: 3
            }
        );
        assert!(!last_new_missing.finished(4));
        assert!(Rollout::of(&old, &set(&[5, 6, 7, 8])).finished(4));
    }

    #[test]
    fn the_new_one_is_the_only_child_not_there_before() {
        let before = set(&[1, 2, 3]);
        assert_eq!(the_new_one(&before, &set(&[1, 2, 3, 9])), Some(9));
        assert_eq!(the_new_one(&before, &set(&[2, 3, 9])), Some(9));
        assert_eq!(the_new_one(&before, &set(&[1, 2, 3])), None);
        assert_eq!(the_new_one(&before, &set(&[1, 8, 9])), None, "two are new");
    }

    #[test]
    fn the_children_of_this_process_include_one_it_started() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let children = of(std::process::id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(children.unwrap().contains(&child.id()));
        assert!(of(u32::MAX).is_err(), "no such process");
    }
}
