//! The scenarios: what runs against what, and which figures each one yields.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::loadgen::{self, Live, LoadSpec, pid_in};
use super::procstat::{self, CpuUse};
use super::report::{Round, Run, Scenario, median};
use super::target::{Programs, Running, Server};

/// Everything a scenario needs to run.
pub(crate) struct Context {
    pub(crate) programs: Programs,
    pub(crate) progress: MultiProgress,
    pub(crate) quick: bool,
    pub(crate) workers: usize,
    pub(crate) connections: usize,
    pub(crate) warmup: Duration,
    pub(crate) duration: Duration,
    pub(crate) threads: usize,
    pub(crate) work: u64,
    pub(crate) respawns: usize,
    /// Roll-outs per server in the rollout scenario, scaling cycles in the scale scenario.
    pub(crate) rolls: usize,
    /// Interleaved rounds per server in the throughput scenarios.
    pub(crate) rounds: usize,
    pub(crate) load_cpus: Option<Vec<usize>>,
    pub(crate) notes: Vec<String>,
}

impl Context {
    pub(crate) fn node_available(&self) -> bool {
        self.programs.node.is_some()
    }

    /// The servers of the dispatch and keep-alive scenarios: a single process, our
    /// round-robin with window 1 and with the default window, shared, the same three on axum
    /// (`axum_hello`: single, round-robin, shared), and Node's two policies (when `node` is
    /// installed).
    fn comparison_set(&self) -> Vec<Server> {
        let workers = self.workers;
        let mut servers = vec![
            Server::Single,
            Server::Rr {
                workers,
                window: Some(1),
            },
            Server::Rr {
                workers,
                window: None,
            },
            Server::Shared { workers },
            Server::AxumSingle,
            Server::AxumRr { workers },
            Server::AxumShared { workers },
        ];
        if self.node_available() {
            servers.extend([Server::NodeRr { workers }, Server::NodeShared { workers }]);
        }
        servers
    }

    /// Loads each server in turn, `rounds` times over (interleaved, so that a disturbance of
    /// the machine hits every server alike), each round against a fresh server.
    fn measure_all(
        &mut self,
        scenario: &str,
        servers: &[Server],
        keep_alive: bool,
        work: u64,
    ) -> Result<Vec<Run>> {
        let mut rounds: Vec<Vec<Round>> = servers.iter().map(|_| Vec::new()).collect();
        let duration = self.duration.div_f64(self.rounds as f64);
        for round in 0..self.rounds {
            for (server, results) in servers.iter().zip(&mut rounds) {
                let label = if self.rounds > 1 {
                    format!("{scenario} {server} ({}/{})", round + 1, self.rounds)
                } else {
                    format!("{scenario} {server}")
                };
                results.push(self.measure_once(&label, *server, keep_alive, work, duration)?);
            }
        }
        Ok(servers
            .iter()
            .zip(&rounds)
            .map(|(server, results)| {
                Run::from_rounds(
                    server.label(),
                    server.workers(),
                    keep_alive,
                    self.connections,
                    work,
                    results,
                )
            })
            .collect())
    }

    /// Starts `server`, loads it, stops it. Returns the load's result, the primary's peak
    /// RSS and, for a cluster under a new connection per request, the primary's CPU over the
    /// measured window (read from `/proc` as the window opens and closes, off the load's
    /// path).
    fn measure_once(
        &mut self,
        label: &str,
        server: Server,
        keep_alive: bool,
        work: u64,
        duration: Duration,
    ) -> Result<Round> {
        let running = Running::start(&self.programs, server, work)?;
        let primary = running.pid();
        let watch_cpu = !keep_alive && !server.is_single();
        let spec = LoadSpec {
            addr: running.addr,
            connections: self.connections,
            warmup: self.warmup,
            duration,
            keep_alive,
            threads: self.threads,
            cpus: self.load_cpus.clone(),
            request_timeout: Duration::from_secs(10),
        };
        let (load, [opened, closed]) = self.with_progress(label, &spec, |live| {
            loadgen::run(&spec, live, || {
                watch_cpu.then(|| procstat::cpu_ticks(primary))
            })
        })?;
        let rss = running.peak_rss_mib();
        running.stop();
        let primary_cpu = match (opened, closed) {
            (Some(Ok(before)), Some(Ok(after))) => Some(CpuUse::between(before, after)),
            (Some(Err(err)), _) | (_, Some(Err(err))) => {
                self.note_once(
                    &format!("{server}: the primary's CPU could not be read"),
                    &format!("({err}); its primary_cpu_us_per_conn is null"),
                );
                None
            }
            _ => None,
        };
        if primary_cpu.is_some() && load.requests == 0 {
            self.note_once(
                &format!("{server}: a round completed no connection"),
                "in its measured window; its primary_cpu_us_per_conn is null",
            );
        }
        Ok(Round {
            load,
            primary_peak_rss_mib: rss,
            primary_cpu,
        })
    }

    /// Adds the note `{key} {detail}` unless a note starting with `key` is there already
    /// (one per server, not one per round).
    fn note_once(&mut self, key: &str, detail: &str) {
        if !self.notes.iter().any(|note| note.starts_with(key)) {
            self.notes.push(format!("{key} {detail}"));
        }
    }

    /// Shows a progress bar while `body` runs the load.
    fn with_progress<T>(
        &self,
        label: &str,
        spec: &LoadSpec,
        body: impl FnOnce(Arc<Live>) -> T,
    ) -> T {
        let total = spec.warmup + spec.duration;
        let bar = self
            .progress
            .add(ProgressBar::new(total.as_millis() as u64));
        bar.set_style(
            ProgressStyle::with_template("{prefix:>28} [{bar:30}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(label.to_owned());
        let live = Arc::new(Live::default());
        let done = Arc::new(AtomicBool::new(false));
        let ticker = {
            let (bar, live, done) = (bar.clone(), Arc::clone(&live), Arc::clone(&done));
            let start = Instant::now();
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    bar.set_position(start.elapsed().as_millis() as u64);
                    bar.set_message(format!("{} answered", live.answered()));
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        let result = body(live);
        done.store(true, Ordering::Relaxed);
        let _ = ticker.join();
        bar.finish_and_clear();
        result
    }
}

/// Scenario 1 (connection dispatch) or 2 (keep-alive): trivial handler, every server of the
/// comparison set.
pub(crate) fn throughput(ctx: &mut Context, keep_alive: bool) -> Result<Scenario> {
    let (name, title) = if keep_alive {
        ("keepalive", "Keep-alive throughput, trivial handler")
    } else {
        (
            "dispatch",
            "Connection dispatch: a new connection per request, trivial handler",
        )
    };
    let mut scenario = Scenario::new(name, title);
    scenario.runs = ctx.measure_all(name, &ctx.comparison_set(), keep_alive, 0)?;
    if !keep_alive {
        primary_cpu_figures(ctx, &mut scenario);
    }
    Ok(scenario)
}

/// The primary's CPU per connection of each cluster in the dispatch scenario, as figures;
/// `primary_cpu_us_per_conn` is our round-robin primary's, the one that hands connections
/// on. A figure that could not be measured is left out (the run and the ratio say `null`,
/// and a note says why).
fn primary_cpu_figures(ctx: &mut Context, scenario: &mut Scenario) {
    let workers = ctx.workers;
    let rr = Server::Rr {
        workers,
        window: None,
    };
    let keyed = [
        (rr, "primary_cpu_us_per_conn"),
        (
            Server::Rr {
                workers,
                window: Some(1),
            },
            "rr1_primary_cpu_us_per_conn",
        ),
        (Server::Shared { workers }, "shared_primary_cpu_us_per_conn"),
        (Server::NodeRr { workers }, "node_primary_cpu_us_per_conn"),
        (
            Server::NodeShared { workers },
            "node_shared_primary_cpu_us_per_conn",
        ),
    ];
    for (server, key) in keyed {
        if let Some(us) = scenario
            .run(&server.label())
            .and_then(|run| run.primary_cpu_us_per_conn)
        {
            scenario.figures.insert(key.into(), us);
        }
    }
    // One clock tick is 10 ms of CPU: say so when the round-robin figure rests on few.
    if let Some(ticks) = scenario
        .run(&rr.label())
        .and_then(|run| run.primary_cpu_ticks_min)
        .filter(|&ticks| ticks < COARSE_TICKS)
    {
        let tick_ms = 1000.0 / procstat::ticks_per_second() as f64;
        let coarse = if ticks == 0 {
            format!("used less than one clock tick ({tick_ms:.0} ms) of CPU in a round")
        } else {
            format!(
                "used as few as {ticks} clock ticks of {tick_ms:.0} ms in a round (one tick \
                 is {:.0}% of it)",
                100.0 / ticks as f64
            )
        };
        ctx.notes.push(format!(
            "{}: the {rr} primary {coarse}, so its CPU figure is coarse; a longer --duration \
             makes it finer",
            scenario.name
        ));
    }
}

/// Below this many clock ticks in a round, the primary's CPU figure gets a note that it is
/// coarse: one tick is then over 4% of it, as much as the run-to-run spread of a small
/// machine. (The full bench's 2 s rounds give our round-robin primary about 50 on two cores.)
const COARSE_TICKS: u64 = 25;

/// Scenario 3, the seed's benchmark: a CPU-bound handler, one process against 1 and 2
/// workers (or `--workers`).
pub(crate) fn cpu(ctx: &mut Context) -> Result<Scenario> {
    let mut scenario = Scenario::new("cpu", "The seed's benchmark: CPU-bound handler");
    let servers = [
        Server::Single,
        Server::Rr {
            workers: 1,
            window: None,
        },
        Server::Rr {
            workers: ctx.workers,
            window: None,
        },
    ];
    scenario.runs = ctx.measure_all("cpu", &servers, false, ctx.work)?;
    Ok(scenario)
}

/// Scenario 4: how evenly round-robin and shared spread connections over workers (each
/// worker's share, and max/min). Uses the dispatch scenario's runs when it ran.
pub(crate) fn balance(ctx: &mut Context, dispatch: Option<&Scenario>) -> Result<Scenario> {
    let mut scenario = Scenario::new(
        "balance",
        "Balance: how evenly workers share the load (per-worker shares, max/min)",
    );
    let workers = ctx.workers;
    for server in [
        Server::Rr {
            workers,
            window: None,
        },
        Server::Shared { workers },
    ] {
        let reused = dispatch.and_then(|d| d.run(&server.label())).cloned();
        let run = match reused {
            Some(run) => run,
            None => ctx.measure_all("balance", &[server], false, 0)?.remove(0),
        };
        scenario.runs.push(run);
    }
    Ok(scenario)
}

/// Scenario 5: time from SIGKILL of the only worker to the first answer from its
/// replacement; the median over `respawns` kills, ours and Node's.
pub(crate) fn respawn(ctx: &mut Context) -> Result<Scenario> {
    let mut scenario = Scenario::new(
        "respawn",
        "Respawn latency: SIGKILL to the first answer from a new worker",
    );
    let mut servers = vec![(
        Server::Rr {
            workers: 1,
            window: None,
        },
        "respawn_ms",
    )];
    if ctx.node_available() {
        servers.push((Server::NodeRr { workers: 1 }, "node_respawn_ms"));
    }
    for (server, name) in servers {
        let running = Running::start(&ctx.programs, server, 0)?;
        let bar = ctx.progress.add(ProgressBar::new(ctx.respawns as u64));
        bar.set_prefix(format!("respawn {server}"));
        let mut samples = Vec::with_capacity(ctx.respawns);
        for _ in 0..ctx.respawns {
            samples.push(time_one_respawn(running.addr)?.as_secs_f64() * 1000.0);
            bar.inc(1);
        }
        bar.finish_and_clear();
        running.stop();
        scenario
            .figures
            .insert(format!("{name}_median"), median(&samples));
        scenario.samples.insert(name.into(), samples);
    }
    Ok(scenario)
}

/// A worker younger than this counts as a failed start, which a primary may answer with a
/// backoff (ours waits from the second failure in a row); the measurement is about a healthy
/// worker that crashes, so each victim gets to live this long first.
const STABLE_WORKER: Duration = Duration::from_millis(1100);

/// Kills the worker that answers now, once it has run for a while, and waits for an answer
/// from another.
fn time_one_respawn(addr: SocketAddr) -> Result<Duration> {
    std::thread::sleep(STABLE_WORKER);
    let victim = answering_pid(addr).context("asking which worker answers")?;
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).context("killing the worker")?;
    let killed_at = Instant::now();
    let deadline = killed_at + Duration::from_secs(20);
    while Instant::now() < deadline {
        // A short wait per attempt: a server may lose a connection while it has no worker
        // (Node's primary does), and the measurement must not wait for that one.
        match answering_pid_within(addr, RETRY_WAIT) {
            Ok(pid) if pid != victim => return Ok(killed_at.elapsed()),
            // The victim's last answer, or nobody listening yet (Node closes the port while
            // it has no worker): try again at once.
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_micros(200)),
        }
    }
    bail!("no new worker answered within 20 s of the SIGKILL")
}

/// How long one attempt waits for an answer while a replacement is expected.
const RETRY_WAIT: Duration = Duration::from_millis(20);

/// One request on a fresh connection; the pid in the answer.
fn answering_pid(addr: SocketAddr) -> Result<u32> {
    answering_pid_within(addr, Duration::from_secs(5))
}

fn answering_pid_within(addr: SocketAddr, wait: Duration) -> Result<u32> {
    let mut stream = TcpStream::connect_timeout(&addr, wait)?;
    stream.set_read_timeout(Some(wait))?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let body_at = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no header end")?
        + 4;
    pid_in(&answer[body_at..]).context("no pid in the answer")
}

/// Scenario 6: the primary's peak RSS after the dispatch load (from the dispatch scenario's
/// round-robin run when it ran), with Node's primary for comparison.
pub(crate) fn memory(ctx: &mut Context, dispatch: Option<&Scenario>) -> Result<Scenario> {
    let mut scenario = Scenario::new("memory", "Memory: the primary's peak RSS under load");
    let workers = ctx.workers;
    let mut servers = vec![(
        Server::Rr {
            workers,
            window: None,
        },
        "primary_peak_rss_mib",
    )];
    if ctx.node_available() {
        servers.push((Server::NodeRr { workers }, "node_primary_peak_rss_mib"));
    }
    for (server, name) in servers {
        let reused = dispatch.and_then(|d| d.run(&server.label())).cloned();
        let run = match reused {
            Some(run) => run,
            None => ctx.measure_all("memory", &[server], false, 0)?.remove(0),
        };
        if let Some(rss) = run.primary_peak_rss_mib {
            scenario.figures.insert(name.into(), rss);
        }
    }
    Ok(scenario)
}

/// Scenario 7: the IPC micro-benchmarks.
pub(crate) fn ipc(ctx: &mut Context) -> Result<Scenario> {
    let mut scenario = Scenario::new(
        "ipc",
        "IPC micro-benchmarks (one-way, two processes, medians)",
    );
    let args = crate::ipc_bench::Args::for_bench(ctx.quick);
    let spinner = ctx.progress.add(ProgressBar::new_spinner());
    spinner.set_message("ipc micro-benchmarks");
    spinner.enable_steady_tick(Duration::from_millis(100));
    let measured = crate::ipc_bench::measure(&args);
    spinner.finish_and_clear();
    for (name, value) in crate::ipc_bench::medians(&measured?) {
        scenario.figures.insert(name, value);
    }
    Ok(scenario)
}

/// wrk's figure for the single process with keep-alive, when wrk is installed, so the load
/// generator's own ceiling shows.
pub(crate) fn wrk_reference(ctx: &mut Context) -> Result<Option<f64>> {
    let Some(wrk) = super::target::find_program("wrk") else {
        ctx.notes
            .push("wrk is not installed: no wrk reference figure".into());
        return Ok(None);
    };
    let running = Running::start(&ctx.programs, Server::Single, 0)?;
    let seconds = (ctx.duration.as_secs_f64().ceil() as u64).max(1);
    let output = std::process::Command::new(wrk)
        .args([
            "-t1",
            &format!("-c{}", ctx.connections),
            &format!("-d{seconds}s"),
        ])
        .arg(format!("http://{}/", running.addr))
        .output()
        .context("running wrk")?;
    running.stop();
    let text = String::from_utf8_lossy(&output.stdout);
    let rps = text
        .lines()
        .find_map(|line| line.strip_prefix("Requests/sec:"))
        .and_then(|value| value.trim().parse::<f64>().ok());
    if rps.is_none() {
        ctx.notes
            .push(format!("wrk gave no Requests/sec line: {}", text.trim()));
    }
    Ok(rps)
}
