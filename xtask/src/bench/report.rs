//! What a benchmark run found, and how it is written: a table on the terminal,
//! `report.json` for machines, `report.md` and `report.svg` for people.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

use super::loadgen::LoadResult;
use super::procstat::CpuUse;

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Latency {
    pub(crate) p50: u64,
    pub(crate) p90: u64,
    pub(crate) p99: u64,
    pub(crate) max: u64,
}

impl Latency {
    fn of(histogram: &Histogram<u64>) -> Latency {
        Latency {
            p50: histogram.value_at_quantile(0.5),
            p90: histogram.value_at_quantile(0.9),
            p99: histogram.value_at_quantile(0.99),
            max: histogram.max(),
        }
    }
}

/// One round: the load against one fresh server, and what was read from its primary.
#[derive(Debug)]
pub(crate) struct Round {
    pub(crate) load: LoadResult,
    /// The primary's peak resident memory after the load, in MiB.
    pub(crate) primary_peak_rss_mib: Option<f64>,
    /// The primary's CPU use over the measured window, where measured (a cluster's primary
    /// under a new connection per request).
    pub(crate) primary_cpu: Option<CpuUse>,
}

/// One server under one load.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Run {
    pub(crate) target: String,
    pub(crate) workers: usize,
    pub(crate) keep_alive: bool,
    pub(crate) connections: usize,
    pub(crate) work: u64,
    pub(crate) seconds: f64,
    pub(crate) requests: u64,
    /// The median round's requests/s.
    pub(crate) rps: f64,
    /// Requests/s of each round, in the order they ran.
    pub(crate) round_rps: Vec<f64>,
    pub(crate) latency_us: Latency,
    pub(crate) errors: BTreeMap<String, u64>,
    /// Answers per worker process id, over all rounds (each round is a fresh server, with
    /// its own workers). A worker that answered nothing has no entry.
    pub(crate) per_worker: BTreeMap<u32, u64>,
    /// The busiest worker's count over the least busy one's, counting every expected worker
    /// (the median over the rounds). `null` where that is infinite (a worker answered
    /// nothing: [`Run::balance`] still has figures then), or where balance does not apply.
    pub(crate) balance_max_over_min: Option<f64>,
    /// How the median round's answers spread over the workers; `null` for one worker, where
    /// a round got no answers, and where balance does not apply.
    pub(crate) balance: Option<Balance>,
    /// Why balance does not apply to this run, where it does not (the operations scenarios:
    /// old and new workers answered in turn).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) balance_not_applicable: Option<&'static str>,
    /// The primary's peak resident memory after the run, where measured.
    pub(crate) primary_peak_rss_mib: Option<f64>,
    /// The primary's user+system CPU time per connection completed, in microseconds: the
    /// median round's. Measured for clusters under a new connection per request, where each
    /// request is a connection the primary handed on (or, in shared mode, did not: there it
    /// only supervises); `null` elsewhere, and where `/proc` could not be read.
    pub(crate) primary_cpu_us_per_conn: Option<f64>,
    /// The same, for each round that has it, in the order they ran.
    pub(crate) round_primary_cpu_us_per_conn: Vec<f64>,
    /// The fewest clock ticks of primary CPU a round's figure rests on: one tick more or less
    /// moves that round's figure by 1/this of itself.
    pub(crate) primary_cpu_ticks_min: Option<u64>,
    /// Whether the primary's CPU was watched in this run (the throughput scenarios watch it
    /// for clusters under a new connection per request; the operations scenarios do not).
    #[serde(skip)]
    pub(crate) primary_cpu_watched: bool,
}

impl Run {
    /// One run made of interleaved rounds (each against a fresh server): requests/s is the
    /// median round's, so that one disturbed round does not move it; latencies, errors and
    /// per-worker counts add up over the rounds; balance and the primary's CPU per connection
    /// are the median round's (and only there when every round has them): max/min the median
    /// of the rounds' (an infinite one counting as the largest), the shares those of the
    /// round whose busiest worker's share is the median (the larger middle one for an even
    /// count of rounds).
    pub(crate) fn from_rounds(
        target: String,
        workers: usize,
        keep_alive: bool,
        connections: usize,
        work: u64,
        rounds: &[Round],
    ) -> Run {
        let mut latency = rounds.first().map(|round| round.load.latency_us.clone());
        let mut errors = BTreeMap::new();
        let mut per_worker = BTreeMap::new();
        for round in rounds.iter().skip(1) {
            if let Some(latency) = latency.as_mut() {
                let _ = latency.add(&round.load.latency_us);
            }
        }
        for Round { load, .. } in rounds {
            for (kind, count) in &load.errors {
                *errors.entry(kind.clone()).or_default() += count;
            }
            for (pid, count) in &load.per_pid {
                *per_worker.entry(*pid).or_default() += count;
            }
        }
        let round_rps: Vec<f64> = rounds.iter().map(|round| round.load.rps()).collect();
        let balances: Option<Vec<Balance>> = rounds
            .iter()
            .map(|round| Balance::of(&round.load.per_pid, workers))
            .collect();
        let balances = balances.filter(|balances| !balances.is_empty());
        let cpu: Vec<(f64, u64)> = rounds
            .iter()
            .filter_map(|round| {
                let used = round.primary_cpu?;
                Some((used.us_per_connection(round.load.requests)?, used.ticks))
            })
            .collect();
        let cpu_in_every_round = !rounds.is_empty() && cpu.len() == rounds.len();
        let round_cpu: Vec<f64> = cpu.iter().map(|(us, _)| *us).collect();
        Run {
            workers,
            keep_alive,
            connections,
            work,
            seconds: rounds
                .iter()
                .map(|round| round.load.window.as_secs_f64())
                .sum(),
            requests: rounds.iter().map(|round| round.load.requests).sum(),
            rps: median(&round_rps),
            round_rps,
            latency_us: latency.as_ref().map_or(
                Latency {
                    p50: 0,
                    p90: 0,
                    p99: 0,
                    max: 0,
                },
                Latency::of,
            ),
            errors,
            per_worker,
            balance_max_over_min: balances.as_deref().and_then(|balances| {
                let ratios: Vec<f64> = balances.iter().map(Balance::max_over_min).collect();
                Some(median(&ratios)).filter(|ratio| ratio.is_finite())
            }),
            balance: balances.map(Balance::median_round),
            balance_not_applicable: None,
            primary_peak_rss_mib: rounds
                .iter()
                .filter_map(|round| round.primary_peak_rss_mib)
                .max_by(f64::total_cmp),
            primary_cpu_us_per_conn: cpu_in_every_round.then(|| median(&round_cpu)),
            primary_cpu_ticks_min: cpu_in_every_round
                .then(|| cpu.iter().map(|(_, ticks)| *ticks).min())
                .flatten(),
            round_primary_cpu_us_per_conn: round_cpu,
            primary_cpu_watched: !keep_alive && !super::target::is_single_label(&target),
            target,
        }
    }

    pub(crate) fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Whether the primary's CPU per connection is measured for this run: in the throughput
    /// scenarios, a cluster (not the single process, which has no primary) under a new
    /// connection per request.
    pub(crate) fn wants_primary_cpu(&self) -> bool {
        self.primary_cpu_watched
    }
}

/// The median (the mean of the middle two for an even count); NaN for none.
pub(crate) fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// How one round's answers spread over the workers of a server: each worker's count and
/// share, busiest first. Finite whatever the spread, unlike max/min, which a worker that got
/// nothing makes infinite (as `EPOLLEXCLUSIVE`'s LIFO wakeups can under keep-alive load).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Balance {
    /// The workers the server ran: the scenario's count, not the process ids that answered.
    pub(crate) workers: usize,
    /// Answers per worker, busiest first: one per worker that answered, then a 0 for each
    /// worker that did not (the load generator sees only the workers that answer).
    pub(crate) counts: Vec<u64>,
    /// `counts` as shares of the round's answers, from 0 to 1.
    pub(crate) shares: Vec<f64>,
    /// The busiest worker's share: `even_share` when the load is spread evenly, 1 when one
    /// worker answered everything.
    pub(crate) max_share: f64,
    /// What each worker's share would be in an even spread: 1/workers.
    pub(crate) even_share: f64,
    /// Workers that answered nothing.
    pub(crate) idle_workers: usize,
}

impl Balance {
    /// The spread of `per_pid` (answers per process id) over `workers` workers; `None` for
    /// fewer than 2 workers (nothing to balance) or no answers at all.
    pub(crate) fn of(per_pid: &BTreeMap<u32, u64>, workers: usize) -> Option<Balance> {
        let total: u64 = per_pid.values().sum();
        if workers < 2 || total == 0 {
            return None;
        }
        let mut counts: Vec<u64> = per_pid.values().copied().filter(|&c| c > 0).collect();
        let idle_workers = workers.saturating_sub(counts.len());
        counts.sort_unstable_by(|a, b| b.cmp(a));
        counts.extend(std::iter::repeat_n(0, idle_workers));
        let shares: Vec<f64> = counts
            .iter()
            .map(|&count| count as f64 / total as f64)
            .collect();
        Some(Balance {
            workers,
            max_share: shares[0],
            even_share: 1.0 / workers as f64,
            counts,
            shares,
            idle_workers,
        })
    }

    /// The busiest worker's count over the least busy one's: infinite where a worker
    /// answered nothing.
    pub(crate) fn max_over_min(&self) -> f64 {
        match (self.counts.first(), self.counts.last()) {
            (Some(&max), Some(&min)) if min > 0 => max as f64 / min as f64,
            _ => f64::INFINITY,
        }
    }

    /// Of the rounds' spreads, the one whose busiest worker's share is the median (the larger
    /// middle one for an even count). `balances` is not empty.
    fn median_round(mut balances: Vec<Balance>) -> Balance {
        balances.sort_by(|a, b| a.max_share.total_cmp(&b.max_share));
        let middle = balances.len() / 2;
        balances.swap_remove(middle)
    }

    /// The shares for the tables, in percent, busiest first (`71.3/28.7`), with how many
    /// workers got nothing.
    fn shares_text(&self) -> String {
        let shares: Vec<String> = self.shares.iter().map(|&share| percent(share)).collect();
        let mut text = shares.join("/");
        if self.idle_workers > 0 {
            let _ = write!(
                text,
                " ({} of {} got nothing)",
                self.idle_workers, self.workers
            );
        }
        text
    }
}

/// A share (0 to 1) in percent with one decimal, without a trailing `.0`; never rounded to 0
/// or 100 when it is not.
fn percent(share: f64) -> String {
    let percent = share * 100.0;
    if share > 0.0 && percent < 0.05 {
        "<0.1".into()
    } else if share < 1.0 && percent >= 99.95 {
        ">99.9".into()
    } else {
        let text = format!("{percent:.1}");
        text.strip_suffix(".0").map_or(text.clone(), str::to_owned)
    }
}

/// A run's max/min for the tables: `∞` where a worker answered nothing (the shares say more),
/// `n/a` where there is nothing to balance.
fn max_over_min_cell(run: &Run) -> String {
    match (run.balance_max_over_min, &run.balance) {
        (Some(ratio), _) => format!("{ratio:.2}"),
        (None, Some(_)) => "∞".into(),
        (None, None) => "n/a".into(),
    }
}

/// A run's shares for the tables, or why it has none.
fn shares_cell(run: &Run) -> String {
    match (&run.balance, run.balance_not_applicable) {
        (_, Some(why)) => format!("n/a ({why})"),
        (Some(balance), None) => balance.shares_text(),
        (None, None) if run.workers < 2 => "n/a (1 worker)".into(),
        (None, None) => "n/a (no answers)".into(),
    }
}

/// What the balance columns mean (a line each on the terminal, a paragraph in Markdown).
const BALANCE_LEGEND: [&str; 3] = [
    "shares %: each worker's share of the answers, busiest first (even: 100/workers each), of",
    "the round whose busiest worker's share is the median; max/min: the busiest worker's count",
    "over the least busy one's (median round), infinite (∞) where a worker answered nothing.",
];

/// One scenario's results.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Scenario {
    pub(crate) name: &'static str,
    pub(crate) title: &'static str,
    /// What the scenario does and measures, in a line, where the title does not say it all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) about: Option<&'static str>,
    pub(crate) runs: Vec<Run>,
    /// Other figures of the scenario (respawn times, IPC rates), by name.
    pub(crate) figures: BTreeMap<String, f64>,
    /// Raw samples behind the figures, by name.
    pub(crate) samples: BTreeMap<String, Vec<f64>>,
}

impl Scenario {
    pub(crate) fn new(name: &'static str, title: &'static str) -> Scenario {
        Scenario {
            name,
            title,
            about: None,
            runs: Vec::new(),
            figures: BTreeMap::new(),
            samples: BTreeMap::new(),
        }
    }

    pub(crate) fn run(&self, target: &str) -> Option<&Run> {
        self.runs.iter().find(|run| run.target == target)
    }

    /// Whether the primary's CPU per connection was measured for any of the runs (it is for
    /// clusters under a new connection per request).
    fn has_primary_cpu(&self) -> bool {
        self.runs.iter().any(Run::wants_primary_cpu)
    }
}

/// What the primary CPU column means, under the tables that have it (a line each on the
/// terminal, a paragraph in Markdown).
const PRIMARY_CPU_LEGEND: [&str; 3] = [
    "primary µs/conn: the primary's user+system CPU time (/proc/<pid>/stat, 10 ms ticks) over",
    "the measured window, per connection completed in it (median round). Round-robin primaries",
    "hand each connection on; shared primaries (ours and Node's) hand nothing, only supervise.",
];

/// A run's primary CPU per connection for the tables: `null` where it was wanted but not
/// measured, `-` where it does not apply.
fn primary_cpu_cell(run: &Run) -> String {
    match run.primary_cpu_us_per_conn {
        Some(us) => format!("{us:.2}"),
        None if run.wants_primary_cpu() => "null".into(),
        None => "-".into(),
    }
}

/// The goal of a scenario figure, where it has one (the tracked figures repeat it).
fn figure_goal(name: &str) -> Option<&'static str> {
    match name {
        "rollout_ms_per_worker_median" => Some("<= 200"),
        "rollout_failed_requests" | "rollout_keepalive_errors" | "scale_failed_requests" => {
            Some("0")
        }
        _ => None,
    }
}

/// A figure for the tables: counts (whole numbers) without decimals, others with two.
fn shown(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

/// The ratios the project tracks; `None` (JSON `null`) when a baseline was skipped.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Ratios {
    pub(crate) rr_close_vs_node_rr: Option<f64>,
    pub(crate) rr1_close_vs_node_rr: Option<f64>,
    pub(crate) rr_close_vs_single: Option<f64>,
    pub(crate) shared_close_vs_single: Option<f64>,
    /// `null` where a worker answered nothing (infinite) or the run is missing: the
    /// `_max_share` beside it is there in the first case.
    pub(crate) rr_balance_max_over_min: Option<f64>,
    pub(crate) shared_balance_max_over_min: Option<f64>,
    /// The busiest worker's share of the answers (0 to 1; 1/workers is an even spread, 1 is
    /// one worker answering everything), balance scenario, median round.
    pub(crate) rr_balance_max_share: Option<f64>,
    pub(crate) shared_balance_max_share: Option<f64>,
    pub(crate) respawn_median_ms: Option<f64>,
    pub(crate) node_respawn_median_ms: Option<f64>,
    pub(crate) primary_rss_mib: Option<f64>,
    /// The round-robin primary's CPU per handed connection, in µs (dispatch scenario).
    pub(crate) primary_cpu_us_per_conn: Option<f64>,
    /// The same for Node's round-robin primary.
    pub(crate) node_primary_cpu_us_per_conn: Option<f64>,
    pub(crate) cpu_scaling_2w_over_1w: Option<f64>,
    pub(crate) keepalive_vs_node_rr: Option<f64>,
    pub(crate) loadgen_ceiling_rps: Option<f64>,
    /// A rolling restart's median time over the workers replaced, in ms (rollout scenario).
    pub(crate) rollout_ms_per_worker: Option<f64>,
    /// The same for Node's cluster.
    pub(crate) node_rollout_ms_per_worker: Option<f64>,
    /// Failed requests of the new-connection clients over the roll-outs.
    pub(crate) rollout_failed_requests: Option<f64>,
    /// Errors of the keep-alive clients over the roll-outs.
    pub(crate) rollout_keepalive_errors: Option<f64>,
    /// Failed requests over the scaling steps (scale scenario).
    pub(crate) scale_failed_requests: Option<f64>,
}

impl Ratios {
    /// Each ratio with its goal (from the project's benchmark issue), for the tables.
    fn rows(&self) -> Vec<(&'static str, Option<f64>, &'static str)> {
        vec![
            ("rr_close_vs_node_rr", self.rr_close_vs_node_rr, ">= 3.0"),
            ("rr1_close_vs_node_rr", self.rr1_close_vs_node_rr, ""),
            ("rr_close_vs_single", self.rr_close_vs_single, ">= 0.95"),
            (
                "shared_close_vs_single",
                self.shared_close_vs_single,
                ">= 0.95",
            ),
            (
                "rr_balance_max_over_min",
                self.rr_balance_max_over_min,
                "<= 1.1",
            ),
            (
                "shared_balance_max_over_min",
                self.shared_balance_max_over_min,
                "",
            ),
            ("rr_balance_max_share", self.rr_balance_max_share, ""),
            (
                "shared_balance_max_share",
                self.shared_balance_max_share,
                "",
            ),
            ("respawn_median_ms", self.respawn_median_ms, "<= 10"),
            ("node_respawn_median_ms", self.node_respawn_median_ms, ""),
            ("primary_rss_mib", self.primary_rss_mib, "<= 5"),
            ("primary_cpu_us_per_conn", self.primary_cpu_us_per_conn, ""),
            (
                "node_primary_cpu_us_per_conn",
                self.node_primary_cpu_us_per_conn,
                "",
            ),
            (
                "cpu_scaling_2w_over_1w",
                self.cpu_scaling_2w_over_1w,
                ">= 1.7",
            ),
            ("keepalive_vs_node_rr", self.keepalive_vs_node_rr, ""),
            ("loadgen_ceiling_rps", self.loadgen_ceiling_rps, ""),
            (
                "rollout_ms_per_worker",
                self.rollout_ms_per_worker,
                "<= 200",
            ),
            (
                "node_rollout_ms_per_worker",
                self.node_rollout_ms_per_worker,
                "",
            ),
            ("rollout_failed_requests", self.rollout_failed_requests, "0"),
            (
                "rollout_keepalive_errors",
                self.rollout_keepalive_errors,
                "0",
            ),
            ("scale_failed_requests", self.scale_failed_requests, "0"),
        ]
    }

    /// A ratio for the tables: `null` where it is missing, but `∞` for a max/min whose run
    /// is there (its max share is) with a worker that answered nothing.
    fn cell(&self, name: &str, value: Option<f64>) -> String {
        let infinite = match name {
            "rr_balance_max_over_min" => self.rr_balance_max_share.is_some(),
            "shared_balance_max_over_min" => self.shared_balance_max_share.is_some(),
            _ => false,
        };
        match value {
            Some(value) => shown(value),
            None if infinite => "∞".into(),
            None => "null".into(),
        }
    }
}

/// The machine a report came from.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    pub(crate) cpus: usize,
    pub(crate) cpu_model: Option<String>,
    pub(crate) kernel: Option<String>,
    pub(crate) node: Option<String>,
}

/// The settings of a run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Settings {
    pub(crate) quick: bool,
    /// Measured seconds per server, over all its rounds.
    pub(crate) seconds_per_run: f64,
    pub(crate) rounds: usize,
    pub(crate) warmup_seconds: f64,
    pub(crate) connections: usize,
    pub(crate) workers: usize,
    pub(crate) loadgen_threads: usize,
    pub(crate) command: String,
}

/// Everything a run found.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    /// Seconds since the Unix epoch when the run ended.
    pub(crate) finished_unix: u64,
    pub(crate) machine: Machine,
    pub(crate) settings: Settings,
    pub(crate) ratios: Ratios,
    pub(crate) notes: Vec<String>,
    pub(crate) scenarios: Vec<Scenario>,
}

impl Report {
    /// A report of these scenarios from a made-up quick run, for the tests.
    #[cfg(test)]
    pub(crate) fn for_tests(scenarios: Vec<Scenario>) -> Report {
        Report {
            finished_unix: 0,
            machine: Machine {
                cpus: 2,
                cpu_model: None,
                kernel: None,
                node: None,
            },
            settings: Settings {
                quick: true,
                seconds_per_run: 2.0,
                rounds: 1,
                warmup_seconds: 0.0,
                connections: 16,
                workers: 2,
                loadgen_threads: 1,
                command: "test".into(),
            },
            ratios: Ratios::default(),
            notes: Vec::new(),
            scenarios,
        }
    }

    /// Writes `report.json`, `report.md` and `report.svg` into `dir`, and a copy of the JSON
    /// to `json_copy` if given.
    pub(crate) fn write(&self, dir: &Path, json_copy: Option<&Path>) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = serde_json::to_string_pretty(self).context("encoding the report")?;
        std::fs::write(dir.join("report.json"), &json).context("writing report.json")?;
        if let Some(copy) = json_copy {
            std::fs::write(copy, &json).with_context(|| format!("writing {}", copy.display()))?;
        }
        std::fs::write(dir.join("report.md"), self.markdown()).context("writing report.md")?;
        super::chart::write_svg(self, &dir.join("report.svg"))
    }

    /// The terminal table.
    pub(crate) fn table(&self) -> String {
        let mut out = String::new();
        let mut balance_legend = true;
        for scenario in &self.scenarios {
            if scenario.runs.is_empty() && scenario.figures.is_empty() {
                continue;
            }
            let _ = writeln!(out, "\n{} ({})", scenario.title, scenario.name);
            if let Some(about) = scenario.about {
                let _ = writeln!(out, "  {about}");
            }
            let cpu = scenario.has_primary_cpu();
            let shares: Vec<String> = scenario.runs.iter().map(shares_cell).collect();
            let shares_width = shares.iter().map(|s| s.chars().count()).max().unwrap_or(0);
            if !scenario.runs.is_empty() {
                let mut line = format!(
                    "  {:<22} {:>10} {:>9} {:>9} {:>9} {:>8} {:>8}  {:<shares_width$}",
                    "target",
                    "req/s",
                    "p50 ms",
                    "p99 ms",
                    "max ms",
                    "errors",
                    "max/min",
                    "shares %"
                );
                if cpu {
                    line.push_str("  primary µs/conn");
                }
                let _ = writeln!(out, "{}", line.trim_end());
            }
            for (run, shares) in scenario.runs.iter().zip(&shares) {
                let mut line = format!(
                    "  {:<22} {:>10.0} {:>9.2} {:>9.2} {:>9.1} {:>8} {:>8}  {:<shares_width$}",
                    run.target,
                    run.rps,
                    run.latency_us.p50 as f64 / 1000.0,
                    run.latency_us.p99 as f64 / 1000.0,
                    run.latency_us.max as f64 / 1000.0,
                    run.error_count(),
                    max_over_min_cell(run),
                    shares,
                );
                if cpu {
                    let _ = write!(line, "  {:>15}", primary_cpu_cell(run));
                }
                let _ = writeln!(out, "{}", line.trim_end());
            }
            if !scenario.runs.is_empty() && std::mem::take(&mut balance_legend) {
                for line in BALANCE_LEGEND {
                    let _ = writeln!(out, "  {line}");
                }
            }
            if cpu {
                for line in PRIMARY_CPU_LEGEND {
                    let _ = writeln!(out, "  {line}");
                }
            }
            for (name, value) in &scenario.figures {
                let goal = figure_goal(name).map_or(String::new(), |goal| format!("  [{goal}]"));
                let _ = writeln!(out, "  {name}: {}{goal}", shown(*value));
            }
        }
        let _ = writeln!(out, "\nratios (goal in brackets)");
        for (name, value, goal) in self.ratios.rows() {
            let shown = self.ratios.cell(name, value);
            let goal = if goal.is_empty() {
                String::new()
            } else {
                format!("  [{goal}]")
            };
            let _ = writeln!(out, "  {name:<28} {shown:>10}{goal}");
        }
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        out
    }

    /// The Markdown report.
    pub(crate) fn markdown(&self) -> String {
        let mut out = String::new();
        let machine = &self.machine;
        let _ = writeln!(out, "# cluster benchmark\n");
        let _ = writeln!(
            out,
            "Machine: {} CPUs ({}), kernel {}, node {}. Command: `{}`. {} s measured per server \
             in {} interleaved rounds, each against a fresh server after {} s of warm-up; {} \
             connections, {} workers{}.\n",
            machine.cpus,
            machine.cpu_model.as_deref().unwrap_or("unknown CPU"),
            machine.kernel.as_deref().unwrap_or("unknown"),
            machine.node.as_deref().unwrap_or("absent"),
            self.settings.command,
            self.settings.seconds_per_run,
            self.settings.rounds,
            self.settings.warmup_seconds,
            self.settings.connections,
            self.settings.workers,
            if self.settings.quick {
                " (quick smoke run: figures are rough)"
            } else {
                ""
            },
        );
        let _ = writeln!(out, "Balance columns: {}\n", BALANCE_LEGEND.join(" "));
        let _ = writeln!(out, "## Ratios\n\n| ratio | value | goal |\n|---|---:|---|");
        for (name, value, goal) in self.ratios.rows() {
            let shown = self.ratios.cell(name, value);
            let _ = writeln!(out, "| `{name}` | {shown} | {goal} |");
        }
        for scenario in &self.scenarios {
            let _ = writeln!(out, "\n## {} (`{}`)\n", scenario.title, scenario.name);
            if let Some(about) = scenario.about {
                let _ = writeln!(out, "{about}\n");
            }
            let cpu = scenario.has_primary_cpu();
            if !scenario.runs.is_empty() {
                let _ = writeln!(
                    out,
                    "| target | req/s (median round) | rounds | p50 ms | p99 ms | errors | max/min per worker | shares % (busiest first) |{}\n|---|---:|---|---:|---:|---:|---:|---|{}",
                    if cpu {
                        " primary CPU µs/conn (median round) |"
                    } else {
                        ""
                    },
                    if cpu { "---:|" } else { "" },
                );
                for run in &scenario.runs {
                    let _ = write!(
                        out,
                        "| {} | {:.0} | {} | {:.2} | {:.2} | {} | {} | {} |",
                        run.target,
                        run.rps,
                        run.round_rps
                            .iter()
                            .map(|rps| format!("{rps:.0}"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        run.latency_us.p50 as f64 / 1000.0,
                        run.latency_us.p99 as f64 / 1000.0,
                        run.error_count(),
                        max_over_min_cell(run),
                        shares_cell(run),
                    );
                    if cpu {
                        let _ = write!(out, " {} |", primary_cpu_cell(run));
                    }
                    let _ = writeln!(out);
                }
                if cpu {
                    let _ = writeln!(out, "\n{}", PRIMARY_CPU_LEGEND.join(" "));
                }
            }
            if !scenario.runs.is_empty() && !scenario.figures.is_empty() {
                let _ = writeln!(out);
            }
            for (name, value) in &scenario.figures {
                let goal =
                    figure_goal(name).map_or(String::new(), |goal| format!(" (goal: {goal})"));
                let _ = writeln!(out, "- {name}: {}{goal}", shown(*value));
            }
        }
        if !self.notes.is_empty() {
            let _ = writeln!(out, "\n## Notes\n");
            for note in &self.notes {
                let _ = writeln!(out, "- {note}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[5.0, 1.0, 3.0]), 3.0);
        assert!(median(&[]).is_nan());
    }

    fn round(requests: u64, cpu_ticks: Option<u64>) -> Round {
        Round {
            load: LoadResult {
                requests,
                window: std::time::Duration::from_secs(2),
                latency_us: Histogram::new(3).unwrap(),
                errors: BTreeMap::new(),
                per_pid: BTreeMap::new(),
                server_closes: 0,
            },
            primary_peak_rss_mib: None,
            primary_cpu: cpu_ticks.map(|ticks| CpuUse {
                ticks,
                ticks_per_second: 100,
            }),
        }
    }

    fn run_of(target: &str, rounds: &[Round]) -> Run {
        Run::from_rounds(target.into(), 2, false, 16, 0, rounds)
    }

    #[test]
    fn the_primary_cpu_per_connection_is_the_median_rounds() {
        // 1.0 s, 0.5 s and 2.0 s of CPU over 20,000 connections each: 50, 25 and 100 µs.
        let rounds = [
            round(20_000, Some(100)),
            round(20_000, Some(50)),
            round(20_000, Some(200)),
        ];
        let run = run_of("rr 2w", &rounds);
        assert_eq!(run.primary_cpu_us_per_conn, Some(50.0));
        assert_eq!(run.round_primary_cpu_us_per_conn, vec![50.0, 25.0, 100.0]);
        assert_eq!(run.primary_cpu_ticks_min, Some(50));
    }

    #[test]
    fn a_round_without_the_figure_makes_it_null_never_nan() {
        let missing = [round(20_000, Some(100)), round(20_000, None)];
        let run = run_of("rr 2w", &missing);
        assert_eq!(run.primary_cpu_us_per_conn, None);
        assert_eq!(run.primary_cpu_ticks_min, None);
        let idle = [round(0, Some(3))];
        assert_eq!(run_of("rr 2w", &idle).primary_cpu_us_per_conn, None);
        assert_eq!(run_of("rr 2w", &[]).primary_cpu_us_per_conn, None);
        let json = serde_json::to_string(&run).unwrap();
        assert!(json.contains("\"primary_cpu_us_per_conn\":null"), "{json}");
    }

    #[test]
    fn figures_show_their_goals_and_counts_show_no_decimals() {
        let mut rollout = Scenario::new("rollout", "Rolling restart under load");
        rollout.about = Some("SIGHUP under load.");
        rollout
            .figures
            .insert("rollout_failed_requests".into(), 0.0);
        rollout
            .figures
            .insert("rollout_ms_per_worker_median".into(), 23.861);
        rollout
            .figures
            .insert("node_rollout_failed_requests".into(), 3.0);
        let mut operated = run_of("rr 4w", &[round(20_000, None)]);
        operated.primary_cpu_watched = false;
        rollout.runs = vec![operated];
        let report = Report::for_tests(vec![rollout]);
        let table = report.table();
        assert!(table.contains("rollout_failed_requests: 0  [0]"), "{table}");
        assert!(
            table.contains("rollout_ms_per_worker_median: 23.86  [<= 200]"),
            "{table}"
        );
        assert!(
            table.contains("node_rollout_failed_requests: 3\n"),
            "no goal: {table}"
        );
        assert!(table.contains("SIGHUP under load."), "{table}");
        assert!(
            !table.contains("µs/conn"),
            "not watched in this scenario: {table}"
        );
        let markdown = report.markdown();
        assert!(
            markdown.contains("- rollout_failed_requests: 0 (goal: 0)"),
            "{markdown}"
        );
        assert!(markdown.contains("SIGHUP under load.\n"), "{markdown}");
        assert!(!markdown.contains("µs/conn"), "{markdown}");
    }

    #[test]
    fn the_tables_show_the_primary_cpu_of_clusters_only() {
        let mut dispatch = Scenario::new("dispatch", "Connection dispatch");
        dispatch.runs = vec![
            run_of("single", &[round(30_000, None)]),
            run_of("rr 2w", &[round(20_000, Some(100))]),
            run_of("shared 2w", &[round(20_000, None)]),
        ];
        let mut report = Report::for_tests(vec![dispatch]);
        let table = report.table();
        let markdown = report.markdown();
        for text in [&table, &markdown] {
            assert!(text.contains("µs/conn"), "{text}");
            assert!(text.contains("50.00"), "rr's figure: {text}");
            assert!(text.contains("null"), "shared's missing figure: {text}");
            assert!(text.contains("only supervise"), "{text}");
            assert!(text.contains("per connection completed"), "{text}");
        }
        let single = table.lines().find(|l| l.contains("single")).unwrap();
        assert!(single.trim_end().ends_with('-'), "{single}");
        // Keep-alive runs have no such column.
        report.scenarios[0].runs = vec![Run::from_rounds(
            "rr 2w".into(),
            2,
            true,
            16,
            0,
            &[round(20_000, None)],
        )];
        assert!(!report.table().contains("µs/conn"));
    }

    fn answered(counts: &[(u32, u64)]) -> Round {
        let mut round = round(counts.iter().map(|(_, count)| count).sum(), None);
        round.load.per_pid = counts.iter().copied().collect();
        round
    }

    #[test]
    fn one_worker_that_got_everything_has_the_whole_share() {
        let balance = Balance::of(&BTreeMap::from([(7, 100), (8, 0)]), 2).unwrap();
        assert_eq!(balance.counts, [100, 0]);
        assert_eq!(balance.shares, [1.0, 0.0]);
        assert_eq!(balance.max_share, 1.0);
        assert_eq!(balance.even_share, 0.5);
        assert_eq!(balance.idle_workers, 1);
        assert_eq!(balance.max_over_min(), f64::INFINITY);
        // The load generator never saw the other worker: the same figures.
        let unseen = Balance::of(&BTreeMap::from([(7, 100)]), 2).unwrap();
        assert_eq!(unseen.counts, [100, 0]);
        assert_eq!(unseen.idle_workers, 1);
        assert_eq!(unseen.max_share, 1.0);
        assert_eq!(unseen.shares_text(), "100/0 (1 of 2 got nothing)");
    }

    #[test]
    fn an_even_split_has_the_even_share() {
        let balance = Balance::of(&BTreeMap::from([(1, 500), (2, 500)]), 2).unwrap();
        assert_eq!(balance.max_share, balance.even_share);
        assert_eq!(balance.idle_workers, 0);
        assert_eq!(balance.max_over_min(), 1.0);
        assert_eq!(balance.shares_text(), "50/50");
        let four = BTreeMap::from([(1, 260), (2, 250), (3, 250), (4, 240)]);
        let balance = Balance::of(&four, 4).unwrap();
        assert_eq!(balance.even_share, 0.25);
        assert_eq!(balance.shares_text(), "26/25/25/24");
    }

    #[test]
    fn a_worker_missing_from_the_counts_is_counted_as_a_0() {
        let counts = BTreeMap::from([(1, 100), (2, 300)]);
        let balance = Balance::of(&counts, 3).unwrap();
        assert_eq!(balance.counts, [300, 100, 0], "busiest first");
        assert_eq!(balance.shares, [0.75, 0.25, 0.0]);
        assert_eq!(balance.max_share, 0.75);
        assert_eq!(balance.idle_workers, 1);
        assert_eq!(balance.max_over_min(), f64::INFINITY);
        assert_eq!(balance.shares_text(), "75/25/0 (1 of 3 got nothing)");
        let all_there = Balance::of(&BTreeMap::from([(1, 110), (2, 100)]), 2).unwrap();
        assert!((all_there.max_over_min() - 1.1).abs() < 1e-12);
    }

    #[test]
    fn one_worker_or_no_answers_have_no_balance() {
        assert_eq!(Balance::of(&BTreeMap::from([(1, 100)]), 1), None);
        assert_eq!(Balance::of(&BTreeMap::new(), 2), None);
        let alone = Run::from_rounds("rr 1w".into(), 1, false, 16, 0, &[answered(&[(1, 9)])]);
        assert_eq!(alone.balance, None);
        assert_eq!(alone.balance_max_over_min, None);
        assert_eq!(max_over_min_cell(&alone), "n/a");
        assert_eq!(shares_cell(&alone), "n/a (1 worker)");
    }

    #[test]
    fn shares_never_round_to_0_or_100_when_they_are_not() {
        assert_eq!(percent(0.0), "0");
        assert_eq!(percent(0.0001), "<0.1");
        assert_eq!(percent(0.9999), ">99.9");
        assert_eq!(percent(1.0), "100");
        assert_eq!(percent(0.7126), "71.3");
    }

    #[test]
    fn a_run_where_one_worker_got_everything_shows_finite_figures() {
        let run = Run::from_rounds(
            "shared 2w".into(),
            2,
            true,
            16,
            0,
            &[answered(&[(41, 70_000)])],
        );
        assert_eq!(run.balance_max_over_min, None);
        let balance = run.balance.as_ref().unwrap();
        assert_eq!(balance.max_share, 1.0);
        assert_eq!(balance.idle_workers, 1);
        assert_eq!(max_over_min_cell(&run), "∞");
        assert_eq!(shares_cell(&run), "100/0 (1 of 2 got nothing)");
        let json = serde_json::to_value(&run).unwrap();
        assert_eq!(json["balance"]["counts"], serde_json::json!([70_000, 0]));
        assert_eq!(json["balance"]["shares"], serde_json::json!([1.0, 0.0]));
        assert_eq!(json["balance"]["max_share"], serde_json::json!(1.0));
        assert_eq!(json["balance"]["even_share"], serde_json::json!(0.5));
        assert_eq!(json["balance"]["idle_workers"], serde_json::json!(1));
        assert!(json["balance_max_over_min"].is_null());
        assert!(json.get("balance_not_applicable").is_none());

        let mut keepalive = Scenario::new("keepalive", "Keep-alive");
        let even = Run::from_rounds(
            "rr 2w".into(),
            2,
            true,
            16,
            0,
            &[answered(&[(1, 101), (2, 99)])],
        );
        keepalive.runs = vec![even, run];
        let report = Report::for_tests(vec![keepalive]);
        let table = report.table();
        let markdown = report.markdown();
        for text in [&table, &markdown] {
            assert!(text.contains("1.02"), "{text}");
            assert!(text.contains("50.5/49.5"), "{text}");
            assert!(text.contains("∞"), "{text}");
            assert!(text.contains("100/0 (1 of 2 got nothing)"), "{text}");
            assert!(text.contains("busiest first"), "the legend: {text}");
        }
        assert!(
            markdown.contains("| 0 | ∞ | 100/0 (1 of 2 got nothing) |"),
            "{markdown}"
        );
        assert!(!markdown.contains("| - |"), "{markdown}");
    }

    #[test]
    fn balance_is_the_median_rounds() {
        let rounds = [
            answered(&[(1, 60), (2, 40)]),
            answered(&[(3, 100)]),
            answered(&[(5, 55), (6, 45)]),
        ];
        let run = run_of("shared 2w", &rounds);
        let balance = run.balance.unwrap();
        assert_eq!(
            balance.counts,
            [60, 40],
            "the middle max share of 0.55, 0.6 and 1"
        );
        // max/min: the median of 1.22, 1.5 and infinity.
        assert_eq!(run.balance_max_over_min, Some(1.5));
        // Two of three rounds with a worker that got nothing: max/min is infinite.
        let rounds = [
            answered(&[(1, 60), (2, 40)]),
            answered(&[(3, 100)]),
            answered(&[(5, 90)]),
        ];
        let run = run_of("shared 2w", &rounds);
        assert_eq!(run.balance_max_over_min, None);
        let balance = run.balance.unwrap();
        assert_eq!((balance.max_share, balance.idle_workers), (1.0, 1));
        // An even count of rounds: the larger middle one.
        let rounds = [answered(&[(1, 60), (2, 40)]), answered(&[(3, 70), (4, 30)])];
        assert_eq!(run_of("rr 2w", &rounds).balance.unwrap().counts, [70, 30]);
        // A round without answers leaves the run without balance.
        let rounds = [answered(&[(1, 60), (2, 40)]), answered(&[])];
        let run = run_of("rr 2w", &rounds);
        assert_eq!(run.balance, None);
        assert_eq!(shares_cell(&run), "n/a (no answers)");
    }

    #[test]
    fn a_run_whose_workers_changed_says_balance_does_not_apply() {
        let mut run = run_of("rr 4w", &[answered(&[(1, 10), (2, 10)])]);
        run.balance = None;
        run.balance_max_over_min = None;
        run.balance_not_applicable = Some("workers replaced");
        assert_eq!(max_over_min_cell(&run), "n/a");
        assert_eq!(shares_cell(&run), "n/a (workers replaced)");
        let json = serde_json::to_value(&run).unwrap();
        assert_eq!(json["balance_not_applicable"], "workers replaced");
        assert!(json["balance"].is_null());
    }

    #[test]
    fn a_balance_ratio_is_infinite_where_its_run_has_a_max_share() {
        let ratios = Ratios {
            rr_balance_max_over_min: Some(1.01),
            shared_balance_max_share: Some(1.0),
            ..Ratios::default()
        };
        assert_eq!(ratios.cell("rr_balance_max_over_min", Some(1.01)), "1.01");
        assert_eq!(ratios.cell("shared_balance_max_over_min", None), "∞");
        assert_eq!(ratios.cell("rr_balance_max_share", None), "null");
        let report = Report {
            ratios,
            ..Report::for_tests(Vec::new())
        };
        assert!(
            report
                .markdown()
                .contains("| `shared_balance_max_over_min` | ∞ |  |")
        );
        assert!(
            report
                .markdown()
                .contains("| `shared_balance_max_share` | 1 |  |")
        );
    }
}
