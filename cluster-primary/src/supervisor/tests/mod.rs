//! The supervisor core, tested without processes: a simulator with scripted workers and a
//! fake clock ([`sim`]), scenarios through it ([`scenarios`], and [`lifecycle`] for
//! roll-outs, scaling, recycling, hung workers and fatal failures), random event sequences
//! checked step by step against the no-loss invariants ([`properties`]), and sabotaged cores
//! those checks must catch ([`sabotage`]).
#![allow(clippy::unwrap_used)]

mod lifecycle;
mod properties;
mod queries;
mod sabotage;
mod scenarios;
mod sim;

use std::num::NonZeroU32;
use std::time::Duration;

use cluster_ipc::proto::ListenMode;

use super::Settings;
use crate::config::{Policy, Recycle, Respawn, Rollout};

/// The start timeout of the tests' settings.
const START_TIMEOUT: Duration = Duration::from_secs(5);
/// The readiness timeout of the tests' settings.
const READINESS_TIMEOUT: Duration = Duration::from_secs(7);
/// The shutdown timeout of the tests' settings.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings for `workers` round-robin workers with a window of one, respawn on.
fn settings(workers: usize) -> Settings {
    Settings {
        workers,
        mode: ListenMode::RoundRobin,
        policy: Policy::RoundRobin,
        window: NonZeroU32::MIN,
        start_timeout: START_TIMEOUT,
        shutdown_timeout: SHUTDOWN_TIMEOUT,
        respawn: Respawn::Always,
        max_message_len: 1 << 20,
        primary_pid: 4242,
        hang_timeout: None,
        // Far out of reach of the tests that are not about the guard.
        crash_loop: (1000, Duration::from_secs(10)),
        readiness_timeout: READINESS_TIMEOUT,
        rollout: Rollout::default(),
        recycle: Recycle::default(),
    }
}
