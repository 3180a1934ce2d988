//! The servers under test: our `hello` in each mode, `axum_hello` (the same on axum and a
//! tokio runtime per worker) alone, round-robin and shared, and Node's cluster from the
//! script the xtask ships. Each runs in its own process group, so that stopping it stops its workers.

use std::fmt;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// How long a server has to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// One server configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Server {
    /// `hello --workers 0`: one process, no cluster.
    Single,
    /// `hello` round-robin with this window (`None`: the default).
    Rr { workers: usize, window: Option<u32> },
    /// `hello --mode shared`.
    Shared { workers: usize },
    /// `axum_hello --workers 0`: one process with a multi-thread runtime, no cluster.
    AxumSingle,
    /// `axum_hello` round-robin (the default window).
    AxumRr { workers: usize },
    /// `axum_hello --mode shared`.
    AxumShared { workers: usize },
    /// Node's cluster, `SCHED_RR`.
    NodeRr { workers: usize },
    /// Node's cluster, `SCHED_NONE`.
    NodeShared { workers: usize },
}

impl Server {
    /// A short label for tables and JSON.
    pub(crate) fn label(&self) -> String {
        match *self {
            Server::Single => "single".into(),
            Server::Rr {
                workers,
                window: None,
            } => format!("rr {workers}w"),
            Server::Rr {
                workers,
                window: Some(window),
            } => format!("rr window {window} {workers}w"),
            Server::Shared { workers } => format!("shared {workers}w"),
            Server::AxumSingle => "axum single".into(),
            Server::AxumRr { workers } => format!("axum rr {workers}w"),
            Server::AxumShared { workers } => format!("axum shared {workers}w"),
            Server::NodeRr { workers } => format!("node rr {workers}w"),
            Server::NodeShared { workers } => format!("node shared {workers}w"),
        }
    }
}

impl Server {
    /// How many processes serve requests.
    pub(crate) fn workers(&self) -> usize {
        match *self {
            Server::Single | Server::AxumSingle => 1,
            Server::Rr { workers, .. }
            | Server::Shared { workers }
            | Server::AxumRr { workers }
            | Server::AxumShared { workers }
            | Server::NodeRr { workers }
            | Server::NodeShared { workers } => workers,
        }
    }
}

impl Server {
    /// One process and no cluster: no primary to watch.
    pub(crate) fn is_single(&self) -> bool {
        matches!(self, Server::Single | Server::AxumSingle)
    }
}

/// Whether a run's label (see [`Server::label`]) is of a single process.
pub(crate) fn is_single_label(label: &str) -> bool {
    label == "single" || label == "axum single"
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

/// Where the programs are.
#[derive(Debug, Clone)]
pub(crate) struct Programs {
    pub(crate) hello: PathBuf,
    pub(crate) axum_hello: PathBuf,
    pub(crate) node: Option<PathBuf>,
    pub(crate) node_script: PathBuf,
    pub(crate) logs: PathBuf,
}

/// A running server.
#[derive(Debug)]
pub(crate) struct Running {
    child: Child,
    pub(crate) addr: SocketAddr,
}

impl Running {
    /// Starts `server` doing `work` iterations of CPU work per request, and waits for its
    /// ready line.
    pub(crate) fn start(programs: &Programs, server: Server, work: u64) -> Result<Running> {
        Running::start_logged(programs, server, work, &server.label())
    }

    /// The same, logging to `logs/<log_name>.log` (spaces become dashes).
    pub(crate) fn start_logged(
        programs: &Programs,
        server: Server,
        work: u64,
        log_name: &str,
    ) -> Result<Running> {
        let mut cmd = command(programs, server, work)?;
        let log_name = log_name.replace(' ', "-");
        let log = std::fs::File::create(programs.logs.join(format!("{log_name}.log")))
            .context("creating a server log")?;
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().with_context(|| format!("starting {server}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        match wait_ready(stdout) {
            Ok(addr) => Ok(Running { child, addr }),
            Err(err) => {
                let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
                let _ = child.wait();
                Err(err).with_context(|| format!("{server} did not get ready"))
            }
        }
    }

    /// The primary's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The primary's peak resident memory (`VmHWM`), in MiB.
    pub(crate) fn peak_rss_mib(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    }

    /// Stops the server: SIGTERM to its process group, then SIGKILL if it lingers.
    pub(crate) fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        let group = Pid::from_raw(self.child.id() as i32);
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Whatever is left of the group (workers included) goes now.
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop_now();
        }
    }
}

fn command(programs: &Programs, server: Server, work: u64) -> Result<Command> {
    let hello_program = |program: &Path, args: &[String]| {
        let mut cmd = Command::new(program);
        cmd.args([
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--work",
            &work.to_string(),
        ])
        .args(args);
        cmd
    };
    let hello = |args: &[String]| hello_program(&programs.hello, args);
    let axum = |args: &[String]| hello_program(&programs.axum_hello, args);
    let cluster = |workers: usize, mode: &str| -> Vec<String> {
        vec![
            "--workers".into(),
            workers.to_string(),
            "--mode".into(),
            mode.into(),
        ]
    };
    let node = |workers: usize, policy: &str| -> Result<Command> {
        let Some(node) = &programs.node else {
            bail!("node is not installed")
        };
        let mut cmd = Command::new(node);
        cmd.arg(&programs.node_script).args([
            "--workers",
            &workers.to_string(),
            "--policy",
            policy,
            "--port",
            &free_port()?.to_string(),
            "--work",
            &work.to_string(),
        ]);
        Ok(cmd)
    };
    Ok(match server {
        Server::Single => hello(&["--workers".into(), "0".into()]),
        Server::Rr { workers, window } => {
            let mut args = vec![
                "--workers".into(),
                workers.to_string(),
                "--mode".into(),
                "rr".into(),
            ];
            if let Some(window) = window {
                args.extend(["--window".into(), window.to_string()]);
            }
            hello(&args)
        }
        Server::Shared { workers } => hello(&[
            "--workers".into(),
            workers.to_string(),
            "--mode".into(),
            "shared".into(),
        ]),
        Server::AxumSingle => axum(&["--workers".into(), "0".into()]),
        Server::AxumRr { workers } => axum(&cluster(workers, "rr")),
        Server::AxumShared { workers } => axum(&cluster(workers, "shared")),
        Server::NodeRr { workers } => node(workers, "rr")?,
        Server::NodeShared { workers } => node(workers, "none")?,
    })
}

/// A port nobody listens on now. Node needs a fixed one: its primary closes a round-robin
/// socket when its last worker exits, and with port 0 the replacement would get another port.
fn free_port() -> Result<u16> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(probe.local_addr()?.port())
}

/// Reads stdout until `ready http://HOST:PORT ...`, with a deadline.
fn wait_ready(stdout: std::process::ChildStdout) -> Result<SocketAddr> {
    let (sender, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines.recv_timeout(left).context("no ready line")?;
        if let Some(rest) = line.strip_prefix("ready http://") {
            let addr = rest.split_whitespace().next().unwrap_or_default();
            return addr
                .parse()
                .with_context(|| format!("bad address in {line:?}"));
        }
    }
}

/// A program on PATH, if there is one.
pub(crate) fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}
