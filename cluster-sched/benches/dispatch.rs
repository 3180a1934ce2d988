//! The cost of dispatch decisions, per connection, with 2, 16 and 256 workers.
//!
//! Run with `cargo bench -p cluster-sched`. Each figure is the best of several runs of a
//! loop of whole steps as the primary would drive them: an input, `poll_action` until `None`,
//! and the worker's ack, so it includes the handoff's `Vec`, the ack's `Vec` and the
//! pause/resume check. Scenarios:
//!
//! - `prompt`: one connection arrives, goes out, and is acked at once (every step is one
//!   decision; with window 1 every worker leaves and rejoins the rotation each time);
//! - `burst`: every worker is out of credit with a window's worth each waiting; each ack
//!   releases a batch of `window` connections (the cost per connection of batched steps);
//! - `floor`: a baseline measured in the same run, doing only what any implementation of this
//!   API must do per connection in `prompt` (rotate a `VecDeque` of workers, build the
//!   handoff's `Vec` and the ack's `Vec`), so the `x floor` column is our bookkeeping's cost.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::Instant;

use cluster_sched::{Action, ConnId, Dispatch, LeastConnections, RoundRobin, WorkerId};

const WORKER_COUNTS: [u64; 3] = [2, 16, 256];
const RUNS: usize = 5;

fn make(policy: &str, window: u32, workers: u64) -> Box<dyn Dispatch> {
    let window = NonZeroU32::new(window).expect("benchmark windows are not zero");
    let mut dispatcher: Box<dyn Dispatch> = match policy {
        "round-robin" => Box::new(RoundRobin::new(window)),
        _ => Box::new(LeastConnections::new(window)),
    };
    for id in 1..=workers {
        dispatcher
            .worker_joined(WorkerId(id))
            .expect("fresh worker ids");
    }
    dispatcher
}

/// Carries out every queued action; a handed-out batch is acked at once.
fn drain_and_ack(dispatcher: &mut dyn Dispatch) -> usize {
    let mut handed = 0;
    while let Some(action) = dispatcher.poll_action() {
        if let Action::Handoff { worker, conns } = action {
            handed += conns.len();
            let delivered = dispatcher.acked(worker, conns.len());
            black_box(delivered.expect("acking what was just handed out"));
        }
    }
    handed
}

/// Returns nanoseconds per connection for `conns` connections, one step each.
fn prompt(dispatcher: &mut dyn Dispatch, conns: u64) -> f64 {
    let start = Instant::now();
    let mut handed = 0;
    for conn in 0..conns {
        dispatcher.incoming(black_box(ConnId(conn)));
        handed += drain_and_ack(dispatcher);
    }
    let elapsed = start.elapsed();
    assert_eq!(handed as u64, conns);
    elapsed.as_secs_f64() * 1e9 / conns as f64
}

/// Returns nanoseconds per connection when each ack refills a worker's window in one step.
fn burst(dispatcher: &mut dyn Dispatch, workers: u64, window: u32, rounds: u64) -> f64 {
    let per_round = workers * u64::from(window);
    let mut next_conn = 0;
    let mut fill = |dispatcher: &mut dyn Dispatch| {
        for _ in 0..per_round {
            dispatcher.incoming(ConnId(next_conn));
            next_conn += 1;
        }
    };
    // Everyone full, a window's worth each waiting: the state each round starts from.
    fill(dispatcher);
    let _ = dispatcher.take_actions();
    let start = Instant::now();
    for _ in 0..rounds {
        fill(dispatcher);
        for id in 1..=workers {
            let delivered = dispatcher.acked(WorkerId(id), window as usize);
            black_box(delivered.expect("every worker is full"));
        }
        black_box(dispatcher.take_actions());
    }
    let elapsed = start.elapsed();
    elapsed.as_secs_f64() * 1e9 / (rounds * per_round) as f64
}

/// The baseline: a bare rotation and the two allocations the API implies per connection.
fn floor(workers: u64, conns: u64) -> f64 {
    let mut rotation: std::collections::VecDeque<WorkerId> = (1..=workers).map(WorkerId).collect();
    let start = Instant::now();
    for conn in 0..conns {
        let worker = rotation.pop_front().expect("workers are never zero here");
        let handoff = Action::Handoff {
            worker,
            conns: vec![black_box(ConnId(conn))],
        };
        if let Action::Handoff { worker, conns } = black_box(handoff) {
            black_box(conns.to_vec());
            rotation.push_back(worker);
        }
    }
    start.elapsed().as_secs_f64() * 1e9 / conns as f64
}

fn best_of(mut run: impl FnMut() -> f64) -> f64 {
    (0..RUNS).map(|_| run()).fold(f64::INFINITY, f64::min)
}

fn main() {
    // `cargo test --benches` runs this with `--bench` absent; keep that quick.
    let quick = !std::env::args().any(|arg| arg == "--bench");
    // `cargo bench -p cluster-sched -- least-conn/prompt/256` runs only the matching rows.
    let filter: Option<String> = std::env::args().skip(1).find(|arg| !arg.starts_with('-'));
    let wanted = |name: &str| {
        filter
            .as_ref()
            .is_none_or(|filter| name.contains(filter.as_str()))
    };
    let conns: u64 = if quick { 1_000 } else { 500_000 };
    let floors: Vec<f64> = WORKER_COUNTS
        .iter()
        .map(|&workers| best_of(|| floor(workers, conns)))
        .collect();
    println!(
        "{:<12} {:<8} {:>7} {:>6} {:>9} {:>8}",
        "policy", "scenario", "workers", "window", "ns/conn", "x floor"
    );
    let row = |policy: &str, scenario: &str, index: usize, window: u32, ns: f64| {
        let workers = WORKER_COUNTS[index];
        let ratio = ns / floors[index];
        println!("{policy:<12} {scenario:<8} {workers:>7} {window:>6} {ns:>9.1} {ratio:>8.2}");
    };
    for (index, &ns) in floors.iter().enumerate() {
        row("baseline", "floor", index, 1, ns);
    }
    for policy in ["round-robin", "least-conn"] {
        for window in [1, 8] {
            for (index, &workers) in WORKER_COUNTS.iter().enumerate() {
                if wanted(&format!("{policy}/prompt/{workers}/{window}")) {
                    let ns = best_of(|| prompt(&mut *make(policy, window, workers), conns));
                    row(policy, "prompt", index, window, ns);
                }
            }
        }
        for (index, &workers) in WORKER_COUNTS.iter().enumerate() {
            let window = 8;
            if wanted(&format!("{policy}/burst/{workers}/{window}")) {
                let rounds = (conns / (workers * u64::from(window))).max(1);
                let make_full = || make(policy, window, workers);
                let ns = best_of(|| burst(&mut *make_full(), workers, window, rounds));
                row(policy, "burst", index, window, ns);
            }
        }
    }
}
