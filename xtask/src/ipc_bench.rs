//! `cargo xtask ipc-bench`: one-way throughput of a `cluster-ipc` channel between two
//! processes.
//!
//! This process (the sender) spawns a copy of itself as `ipc-bench-peer` (the receiver) with
//! one end of a `Channel::pair()` placed at fd 3. For each case it sends a start frame naming
//! how many frames follow, then that many frames as fast as the socket takes them, one frame
//! per `sendmsg` (that is what `Channel::send` does), and waits for the receiver's single
//! reply, sent once it has received them all. The time from the first data frame to the reply
//! is one repetition. Each case runs an untimed warm-up, then the timed repetitions; the
//! table shows the best and the median.
//!
//! The cases: small frames (a `u32` counter as the body), frames with one fd attached, and
//! frames with 16 fds attached (where fds/s is the figure of merit). The attached fds are
//! `/dev/null` files opened once, the same ones on every frame; the receiver checks each
//! frame's counter and fd count and closes every fd it gets. `--case` picks cases.
//!
//! The table judges each case's goal (from the issue, for the 2-core machine) by the median;
//! everything runs on whatever else the machine is doing, so the load average is printed too.
//!
//! The numbers always come from an optimized build (see [`crate::release`]). Nothing here
//! asserts on timings; it is a measurement.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use cluster_ipc::{Channel, Kind, Limits};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde_json::json;

/// The environment variable naming the receiver's channel fd.
const FD_VAR: &str = "CLUSTER_IPC_BENCH_FD";
/// The fd number the receiver finds its channel end at.
const CHILD_FD: i32 = 3;
/// How long one round may take before the benchmark gives up (a hung peer, not slowness).
const ROUND_TIMEOUT: Duration = Duration::from_secs(120);
/// The most fds any case attaches to a frame.
const MAX_FDS: usize = 16;

/// The flags of `cargo xtask ipc-bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Frames per timed repetition, in every case.
    #[arg(long, value_name = "N", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    frames: u64,
    /// Timed repetitions per case (after one untimed warm-up of a tenth as many frames).
    #[arg(long, value_name = "R", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..))]
    reps: u32,
    /// Run only this case (repeat the flag for several); all of them by default.
    #[arg(long = "case", value_name = "CASE")]
    cases: Vec<CaseName>,
    /// Also write the raw figures as a JSON object to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

impl Args {
    /// The settings `cargo xtask bench` uses for its IPC scenario.
    pub(crate) fn for_bench(quick: bool) -> Args {
        Args {
            frames: if quick { 20_000 } else { 100_000 },
            reps: if quick { 1 } else { 3 },
            cases: Vec::new(),
            json: None,
        }
    }
}

/// Each case's median in its goal's unit, named for a report (`small frames/s`, ...).
pub(crate) fn medians(measured: &Measured) -> Vec<(String, f64)> {
    measured
        .results
        .iter()
        .map(|result| {
            let name = format!("{} {}", result.case.name, result.case.metric.unit());
            (name, result.median_in_goal_metric())
        })
        .collect()
}

/// The names `--case` accepts, one per case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CaseName {
    /// Small frames, no fds.
    Small,
    /// One fd per frame.
    #[value(name = "1fd")]
    OneFd,
    /// Sixteen fds per frame.
    #[value(name = "16fds")]
    SixteenFds,
}

/// Which rate a goal is about.
#[derive(Debug, Clone, Copy)]
enum Metric {
    /// Frames per second.
    Frames,
    /// Fds per second.
    Fds,
}

impl Metric {
    fn unit(self) -> &'static str {
        match self {
            Metric::Frames => "frames/s",
            Metric::Fds => "fds/s",
        }
    }
}

/// One benchmark case.
#[derive(Debug)]
struct Case {
    /// Its name for `--case`.
    id: CaseName,
    /// Its name in the table and in JSON.
    name: &'static str,
    /// Fds attached to every frame.
    fds: usize,
    /// The rate the goal is stated in.
    metric: Metric,
    /// The goal for the 2-core machine, in `metric`.
    goal: f64,
}

/// The cases, in the order they run.
const CASES: [Case; 3] = [
    Case {
        id: CaseName::Small,
        name: "small",
        fds: 0,
        metric: Metric::Frames,
        goal: 250_000.0,
    },
    Case {
        id: CaseName::OneFd,
        name: "1 fd",
        fds: 1,
        metric: Metric::Frames,
        goal: 100_000.0,
    },
    Case {
        id: CaseName::SixteenFds,
        name: "16 fds",
        fds: 16,
        metric: Metric::Fds,
        goal: 500_000.0,
    },
];

/// What one case measured.
#[derive(Debug)]
struct CaseResult {
    case: &'static Case,
    frames: u64,
    /// Seconds per timed repetition, in the order they ran.
    seconds: Vec<f64>,
}

impl CaseResult {
    /// Frames per second of each repetition.
    fn frame_rates(&self) -> Vec<f64> {
        self.seconds
            .iter()
            .map(|s| self.frames as f64 / s)
            .collect()
    }

    /// The best and the median frames/s.
    fn frames_best_median(&self) -> (f64, f64) {
        best_median(self.frame_rates())
    }

    /// The median in the goal's metric, which decides pass or miss.
    fn median_in_goal_metric(&self) -> f64 {
        let (_, median) = self.frames_best_median();
        match self.case.metric {
            Metric::Frames => median,
            Metric::Fds => median * self.case.fds as f64,
        }
    }

    /// Whether the median met the goal.
    fn met(&self) -> bool {
        self.median_in_goal_metric() >= self.case.goal
    }
}

/// Runs the benchmark (from a release build: `main` sees to that).
pub(crate) fn run(args: &Args) -> Result<()> {
    let measured = measure(args)?;
    report(args, &measured)
}

/// Runs every selected case and returns the raw figures.
pub(crate) fn measure(args: &Args) -> Result<Measured> {
    raise_fd_limit();
    let files = (0..MAX_FDS)
        .map(|_| File::open("/dev/null"))
        .collect::<io::Result<Vec<File>>>()
        .context("opening /dev/null")?;
    let warmup = (args.frames / 10).max(1);
    let load_before = load_average();
    let mut peer = Peer::spawn()?;
    let mut results = Vec::new();
    let selected = CASES
        .iter()
        .filter(|case| args.cases.is_empty() || args.cases.contains(&case.id));
    for case in selected {
        let fds: Vec<BorrowedFd<'_>> = files[..case.fds].iter().map(AsFd::as_fd).collect();
        peer.round(warmup, &fds)
            .with_context(|| format!("warm-up of case {:?}", case.name))?;
        let mut seconds = Vec::new();
        for _ in 0..args.reps {
            let elapsed = peer
                .round(args.frames, &fds)
                .with_context(|| format!("case {:?}", case.name))?;
            seconds.push(elapsed.as_secs_f64());
        }
        results.push(CaseResult {
            case,
            frames: args.frames,
            seconds,
        });
    }
    peer.finish()?;
    Ok(Measured {
        results,
        warmup,
        load: [load_before, load_average()],
    })
}

/// What [`measure`] found.
pub(crate) struct Measured {
    results: Vec<CaseResult>,
    warmup: u64,
    load: [Option<String>; 2],
}

/// Prints the table and writes the JSON file if asked.
fn report(args: &Args, measured: &Measured) -> Result<()> {
    let Measured {
        results,
        warmup,
        load,
    } = measured;
    print_table(args, results);
    println!(
        "load average (1 min) before and after: {} and {} on {} cpus; other busy processes \
         lower these figures",
        load[0].as_deref().unwrap_or("?"),
        load[1].as_deref().unwrap_or("?"),
        cpus()
    );
    if let Some(path) = &args.json {
        write_json(path, args, *warmup, load, results)?;
        println!("raw figures written to {}", path.display());
    }
    Ok(())
}

/// The receiving process and the sender's end of the channel to it.
#[derive(Debug)]
struct Peer {
    channel: Channel,
    child: Child,
}

impl Peer {
    /// Starts `xtask ipc-bench-peer` with the other end of a fresh channel at fd 3.
    fn spawn() -> Result<Peer> {
        let (channel, child_end) = Channel::pair().context("creating the channel pair")?;
        let exe = std::env::current_exe().context("finding this executable")?;
        let mut cmd = Command::new(&exe);
        cmd.arg("ipc-bench-peer")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        cluster_ipc::process::pass_channel(&mut cmd, child_end.into_fd(), CHILD_FD, FD_VAR)
            .context("passing the channel to the receiver")?;
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} ipc-bench-peer", exe.display()))?;
        // The command owns our copy of the child's end; only the child may keep it, so that
        // either side sees end of file when the other goes.
        drop(cmd);
        Ok(Peer { channel, child })
    }

    /// Sends `frames` frames with `fds` attached and returns the time from the first send to
    /// the receiver's reply.
    fn round(&mut self, frames: u64, fds: &[BorrowedFd<'_>]) -> Result<Duration> {
        let deadline = Instant::now() + ROUND_TIMEOUT;
        let ch = &mut self.channel;
        let fds_per_frame = u32::try_from(fds.len())?;
        let start = ch.send_blocking(
            Kind::User,
            None,
            &(frames, fds_per_frame),
            &[],
            Some(deadline),
        )?;
        let started = Instant::now();
        for i in 0..frames {
            if ch.wants_write() {
                // The socket refused a frame; keep at most that one queued.
                drain(ch, deadline)?;
            }
            // The counter wraps on purpose; the receiver checks it the same way.
            ch.send(Kind::User, None, &(i as u32), fds)?;
        }
        drain(ch, deadline)?;
        let reply = ch.recv(Some(deadline))?;
        let elapsed = started.elapsed();
        ensure!(
            reply.ack() == Some(start),
            "the receiver's reply acknowledges {:?}, not the start frame {start}",
            reply.ack()
        );
        let (got_frames, got_fds): (u64, u64) = reply.decode()?;
        let want_fds = frames * u64::from(fds_per_frame);
        ensure!(
            got_frames == frames && got_fds == want_fds,
            "the receiver counted {got_frames} frames and {got_fds} fds, not {frames} and \
             {want_fds}"
        );
        Ok(elapsed)
    }

    /// Closes the channel and waits for the receiver to exit.
    fn finish(self) -> Result<()> {
        let Peer { channel, mut child } = self;
        drop(channel);
        let status = child.wait().context("waiting for the receiver")?;
        ensure!(status.success(), "the receiver exited with {status}");
        Ok(())
    }
}

/// Waits for room in the socket and flushes, until the outgoing queue is empty. The queue
/// only fills after the socket refused a frame, so waiting first saves a futile `sendmsg`.
fn drain(ch: &mut Channel, deadline: Instant) -> Result<()> {
    while ch.wants_write() {
        wait_for(ch, PollFlags::POLLOUT, deadline)?;
        ch.flush()?;
    }
    Ok(())
}

/// Waits with `poll(2)` for `events` on the channel's socket, at most until `deadline`.
fn wait_for(ch: &Channel, events: PollFlags, deadline: Instant) -> Result<()> {
    let left = cluster_ipc::deadline::left(deadline);
    let Some(left) = left else {
        bail!("timed out after {ROUND_TIMEOUT:?} waiting for the receiver");
    };
    let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(ch.as_fd(), events)];
    match poll(&mut fds, timeout) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
        Err(errno) => Err(errno).context("poll"),
    }
}

/// The receiver: for each start frame, receives the frames it announces (closing every fd
/// they carry), checks them, and replies with what it counted. Exits when the sender closes.
pub(crate) fn peer() -> Result<()> {
    raise_fd_limit();
    let mut ch =
        cluster_ipc::process::adopt_from_env(FD_VAR, Limits::default())?.with_context(|| {
            format!("{FD_VAR} is not set: ipc-bench-peer is started by `cargo xtask ipc-bench`")
        })?;
    loop {
        let start = match ch.recv(None) {
            Ok(frame) => frame,
            Err(cluster_ipc::Error::Closed) => return Ok(()),
            Err(err) => return Err(err).context("receiving a start frame"),
        };
        let (frames, fds_per_frame): (u64, u32) = start.decode()?;
        let mut fds = 0u64;
        for i in 0..frames {
            let frame = ch.recv(None)?;
            let counter: u32 = frame.decode()?;
            ensure!(
                counter == i as u32 && frame.fds.len() == fds_per_frame as usize,
                "frame {i}: counter {counter} with {} fds, expected {} with {fds_per_frame}",
                frame.fds.len(),
                i as u32
            );
            fds += frame.fds.len() as u64;
            // Dropping the frame closes its fds.
        }
        ch.send_blocking(Kind::User, Some(start.seq()), &(frames, fds), &[], None)?;
    }
}

/// Lifts the soft limit on open fds to the hard limit. Fds in flight in a Unix socket count
/// against the sender's limit (for users without `CAP_SYS_RESOURCE`), and a full socket of
/// 16-fd frames holds thousands.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// The 1-minute load average from `/proc/loadavg`, where there is one.
fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().next().map(str::to_owned)
}

/// The number of cpus this process may run on.
fn cpus() -> usize {
    std::thread::available_parallelism().map_or(0, usize::from)
}

/// The best (largest) and the median of some rates.
fn best_median(mut rates: Vec<f64>) -> (f64, f64) {
    rates.sort_by(f64::total_cmp);
    let best = rates.last().copied().unwrap_or(0.0);
    let n = rates.len();
    let median = match n {
        0 => 0.0,
        _ if n % 2 == 1 => rates[n / 2],
        _ => (rates[n / 2 - 1] + rates[n / 2]) / 2.0,
    };
    (best, median)
}

/// Prints the results as a table.
fn print_table(args: &Args, results: &[CaseResult]) {
    println!(
        "ipc-bench: one-way, separate processes, one frame per sendmsg; {} frames x {} \
         repetitions per case",
        args.frames, args.reps
    );
    println!(
        "{:<8} {:>14} {:>14} {:>14} {:>14} {:>18}  result (median)",
        "case", "frames/s best", "frames/s med", "fds/s best", "fds/s med", "goal"
    );
    for result in results {
        let (best, median) = result.frames_best_median();
        let per = result.case.fds as f64;
        let fds = |rate: f64| {
            if result.case.fds == 0 {
                "-".to_owned()
            } else {
                thousands(rate * per)
            }
        };
        let goal = format!(
            "{} {}",
            thousands(result.case.goal),
            result.case.metric.unit()
        );
        println!(
            "{:<8} {:>14} {:>14} {:>14} {:>14} {:>18}  {}",
            result.case.name,
            thousands(best),
            thousands(median),
            fds(best),
            fds(median),
            goal,
            if result.met() { "pass" } else { "miss" }
        );
    }
}

/// A rate rounded to a whole number, with thin separators every three digits.
fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// Writes the raw figures as one JSON object.
fn write_json(
    path: &Path,
    args: &Args,
    warmup: u64,
    load: &[Option<String>; 2],
    results: &[CaseResult],
) -> Result<()> {
    let cases: Vec<serde_json::Value> = results
        .iter()
        .map(|result| {
            let per = result.case.fds as f64;
            let (best, median) = result.frames_best_median();
            let frame_rates = result.frame_rates();
            let fd_rates: Vec<f64> = frame_rates.iter().map(|rate| rate * per).collect();
            json!({
                "case": result.case.name,
                "fds_per_frame": result.case.fds,
                "frames": result.frames,
                "seconds": result.seconds,
                "frames_per_s": frame_rates,
                "fds_per_s": fd_rates,
                "best_frames_per_s": best,
                "median_frames_per_s": median,
                "best_fds_per_s": best * per,
                "median_fds_per_s": median * per,
                "goal": { "metric": result.case.metric.unit(), "min": result.case.goal },
                "met_by_median": result.met(),
            })
        })
        .collect();
    let report = json!({
        "benchmark": "ipc-bench",
        "optimized": !cfg!(debug_assertions),
        "frames_per_repetition": args.frames,
        "repetitions": args.reps,
        "warmup_frames": warmup,
        "cpus": cpus(),
        "loadavg_1min_before": load[0],
        "loadavg_1min_after": load[1],
        "cases": cases,
    });
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_and_median_of_odd_and_even_counts() {
        assert_eq!(best_median(vec![3.0, 1.0, 2.0]), (3.0, 2.0));
        assert_eq!(best_median(vec![4.0, 1.0, 2.0, 3.0]), (4.0, 2.5));
        assert_eq!(best_median(Vec::new()), (0.0, 0.0));
    }

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0.4), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1_000.0), "1,000");
        assert_eq!(thousands(1_234_567.8), "1,234,568");
    }

    #[test]
    fn every_case_has_a_distinct_flag_name() {
        use clap::ValueEnum;
        for name in CaseName::value_variants() {
            assert_eq!(CASES.iter().filter(|case| case.id == *name).count(), 1);
        }
    }
}
