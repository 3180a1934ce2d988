//! **Test helper, not an example.** A cluster worker program for the end-to-end tests in
//! `examples/tests/`: the tests start it (through an in-process primary, or `test-primary`)
//! and pick what it does through environment variables, so one binary plays every part.
//!
//! It uses `cluster-worker` directly, for precise control. Every message it exchanges with the
//! primary is a `(String, Vec<String>)`: a kind and its fields.
//!
//! Environment:
//!
//! - `TW_LISTEN`: comma-separated addresses to listen on (default `127.0.0.1:0`; `none` for
//!   none). `TW_LISTEN_MODE`: `rr` or `shared` (default: the primary's choice).
//! - `TW_BEHAVIOUR`, or `TW_BEHAVIOUR_SLOT<n>` for the worker in slot `n` (which wins):
//!   - `serve` (default): answers every connection with the line
//!     `worker <id> pid <pid> port <port>` and closes it (a thread per listener);
//!   - `hold`: one connection at a time: sends that line, waits for one byte (or the end)
//!     from the client, answers `bye` and closes;
//!   - `hold-all`: the same for every connection at once, each on a thread of its own;
//!   - `no-accept`: listens and never accepts;
//!   - `exit:<code>`: exits with `code` once it listens;
//!   - `boot-fail-if:<path>`: exits with the boot-failure code before it listens if `path`
//!     exists, and serves otherwise (so that a test can make the next workers fail);
//!   - `close-after:<k>`: once the primary sends `go`, accepts and answers `k` connections,
//!     closes its (first) listener, reports `closed`, and keeps running;
//!   - `raw-hello`: no `cluster-worker` at all: adopts the control channel, says `Hello` by
//!     hand, sends its report, then never reads the channel again and keeps the default
//!     action of `SIGTERM` (it just sleeps). Only a signal can end it.
//! - `TW_REPORT_ENV`: comma-separated names of environment variables to include in the report.
//!
//! To the primary, at start: `report` with `key=value` fields (`id`, `slot`, `pid`,
//! `pdeathsig`, `cwd`, and `env.NAME` for each reported variable that is set), then `args`
//! with its arguments. After listening: `listen-error` (`addr`, the `io::ErrorKind`, the
//! message) for each refused address, then `listening` with the local addresses. When it
//! starts disconnecting: `disconnecting` (the reason, the open connections).
//!
//! From the primary: `echo` (answered with `echo` and the same fields), `go`, `disconnect`,
//! `exit` (with a code).

use std::error::Error;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cluster_net::ipc::proto::{PROTOCOL_VERSION, ToPrimary, ToWorker};
use cluster_net::ipc::{Limits, UserMessage};
use cluster_net::worker::{
    ListenMode, Listener, WORKER_ID_ENV, WORKER_SLOT_ENV, Worker, WorkerOptions,
};

type Msg = (String, Vec<String>);
type BoxError = Box<dyn Error + Send + Sync>;

fn main() -> ExitCode {
    match run() {
        Ok(never) => match never {},
        Err(err) => {
            eprintln!("test-worker: {err}");
            ExitCode::from(2)
        }
    }
}

enum Never {}

fn run() -> Result<Never, BoxError> {
    let id: u64 = env_number(WORKER_ID_ENV)?;
    let slot: u32 = env_number(WORKER_SLOT_ENV)?;
    let behaviour = std::env::var(format!("TW_BEHAVIOUR_SLOT{slot}"))
        .or_else(|_| std::env::var("TW_BEHAVIOUR"))
        .unwrap_or_else(|_| "serve".to_owned());
    if behaviour == "raw-hello" {
        return raw_hello(id, slot);
    }
    let behaviour = match behaviour.split_once(':') {
        Some(("boot-fail-if", path)) if std::path::Path::new(path).exists() => {
            std::process::exit(cluster_net::BOOT_FAILURE_EXIT_CODE)
        }
        Some(("boot-fail-if", _)) => "serve".to_owned(),
        _ => behaviour,
    };
    let worker = Worker::start(WorkerOptions::new())?.ok_or("not started by a cluster primary")?;

    let (go_tx, go_rx) = mpsc::channel::<()>();
    let messages = worker.clone();
    std::thread::spawn(move || answer_messages(&messages, &go_tx));
    let reporter = worker.clone();
    worker.on_disconnect(move |reason| {
        let open = reporter.open_connections().to_string();
        let _ = reporter.send(&msg("disconnecting", [format!("{reason:?}"), open]));
    });

    // Sends to the primary are best-effort: it may be gone already (the tests kill it), and
    // this worker must then disconnect and exit as any worker would, not fail on its own.
    let _ = worker.send(&msg("report", report_fields(id, slot)));
    let _ = worker.send(&msg("args", std::env::args().skip(1)));

    let listeners = listen_all(&worker)?;
    let pid = std::process::id();
    match behaviour.split_once(':') {
        None if behaviour == "serve" => {
            for listener in listeners {
                std::thread::spawn(move || serve(&listener, id, pid));
            }
        }
        None if behaviour == "hold" => {
            if let Some(listener) = listeners.first() {
                hold(listener, id, pid, false);
            }
        }
        None if behaviour == "hold-all" => {
            if let Some(listener) = listeners.first() {
                hold(listener, id, pid, true);
            }
        }
        None if behaviour == "no-accept" => {
            // Keep the listeners (dropping one closes it) and never accept.
            let _keep = listeners;
            park_forever();
        }
        Some(("exit", code)) => std::process::exit(code.parse()?),
        Some(("close-after", count)) => {
            let count: usize = count.parse()?;
            let listener = listeners.first().ok_or("nothing to close")?;
            // No `go` means the channel closed: the worker is disconnecting and exits by
            // itself; so does a failed accept.
            if go_rx.recv().is_ok() {
                for _ in 0..count {
                    match listener.accept() {
                        Ok((stream, _)) => greet(stream, id, pid, listener),
                        Err(err) => {
                            eprintln!("test-worker {id}: accept: {err}");
                            park_forever();
                        }
                    }
                }
                listener.close();
                let _ = worker.send(&msg("closed", [count.to_string()]));
            }
            let _keep = listeners;
            park_forever();
        }
        _ => return Err(format!("unknown behaviour {behaviour:?}").into()),
    }
    // Done with the main thread's part: the worker exits the process by itself once it is
    // disconnected and its connections are finished.
    park_forever()
}

fn msg<I: IntoIterator<Item = S>, S: Into<String>>(kind: &str, fields: I) -> Msg {
    (
        kind.to_owned(),
        fields.into_iter().map(Into::into).collect(),
    )
}

fn report_fields(id: u64, slot: u32) -> Vec<String> {
    let pdeathsig = match nix::sys::prctl::get_pdeathsig() {
        Ok(Some(signal)) => signal.as_str().to_owned(),
        Ok(None) => "none".to_owned(),
        Err(errno) => format!("error {errno}"),
    };
    let cwd = std::env::current_dir().map_or_else(
        |err| format!("error {err}"),
        |dir| dir.display().to_string(),
    );
    let mut fields = vec![
        format!("id={id}"),
        format!("slot={slot}"),
        format!("pid={}", std::process::id()),
        format!("pdeathsig={pdeathsig}"),
        format!("cwd={cwd}"),
    ];
    let names = std::env::var("TW_REPORT_ENV").unwrap_or_default();
    for name in names.split(',').filter(|name| !name.is_empty()) {
        if let Some(value) = std::env::var_os(name) {
            fields.push(format!("env.{name}={}", value.to_string_lossy()));
        }
    }
    fields
}

/// Listens on every address of `TW_LISTEN`, reporting refusals, then the addresses.
fn listen_all(worker: &Worker) -> Result<Vec<Listener>, BoxError> {
    let addrs = std::env::var("TW_LISTEN").unwrap_or_else(|_| "127.0.0.1:0".to_owned());
    let mode = match std::env::var("TW_LISTEN_MODE").as_deref() {
        Ok("rr") => Some(ListenMode::RoundRobin),
        Ok("shared") => Some(ListenMode::Shared),
        Ok(other) => return Err(format!("unknown listen mode {other:?}").into()),
        Err(_) => None,
    };
    let mut listeners = Vec::new();
    for addr in addrs
        .split(',')
        .filter(|addr| !addr.is_empty() && *addr != "none")
    {
        let addr: SocketAddr = addr.parse()?;
        match worker.listen(addr, mode) {
            Ok(listener) => listeners.push(listener),
            Err(err) => {
                let text = err.to_string();
                let err = std::io::Error::from(err);
                let _ = worker.send(&msg(
                    "listen-error",
                    [addr.to_string(), format!("{:?}", err.kind()), text],
                ));
            }
        }
    }
    let mut local = Vec::new();
    for listener in &listeners {
        local.push(listener.local_addr()?.to_string());
    }
    let _ = worker.send(&msg("listening", local));
    Ok(listeners)
}

fn greet(mut stream: impl Write, id: u64, pid: u32, listener: &Listener) {
    let port = listener.local_addr().map_or(0, |addr| addr.port());
    let _ = writeln!(stream, "worker {id} pid {pid} port {port}");
}

/// Answers every connection with one line and closes it.
fn serve(listener: &Listener, id: u64, pid: u32) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => greet(stream, id, pid, listener),
            Err(err) => eprintln!("test-worker {id}: accept: {err}"),
        }
    }
}

/// Greets each connection and holds it until the client sends a byte or closes, then says
/// `bye`: one connection at a time, or (`all`) every connection at once, each on a thread of
/// its own.
fn hold(listener: &Listener, id: u64, pid: u32, all: bool) {
    std::thread::scope(|scope| {
        for stream in listener.incoming() {
            let mut stream = match stream {
                Ok(stream) => stream,
                Err(err) => {
                    eprintln!("test-worker {id}: accept: {err}");
                    continue;
                }
            };
            greet(&mut stream, id, pid, listener);
            let mut finish = move || {
                let mut byte = [0u8; 1];
                let _ = stream.read(&mut byte);
                let _ = stream.write_all(b"bye\n");
            };
            if all {
                scope.spawn(finish);
            } else {
                finish();
            }
        }
    });
}

fn answer_messages(worker: &Worker, go: &mpsc::Sender<()>) {
    loop {
        let message = match worker.recv_message(Duration::from_secs(3600)) {
            Ok(Some(message)) => message,
            Ok(None) => continue,
            Err(_) => return, // The channel is closed.
        };
        let (kind, fields) = match message.decode::<Msg>() {
            Ok(decoded) => decoded,
            Err(err) => {
                eprintln!("test-worker: undecodable message: {err}");
                continue;
            }
        };
        match kind.as_str() {
            "echo" => {
                let _ = worker.send(&("echo", fields));
            }
            "go" => {
                let _ = go.send(());
            }
            "disconnect" => worker.disconnect(),
            "exit" => {
                let code = fields
                    .first()
                    .and_then(|code| code.parse().ok())
                    .unwrap_or(1);
                std::process::exit(code);
            }
            other => eprintln!("test-worker: unknown message {other:?}"),
        }
    }
}

/// Says Hello by hand, reports, and never reads the channel again: the worker cannot learn
/// from the channel that its primary died, and `SIGTERM` keeps its default action (this
/// process installs no handler), so only a signal ends it.
fn raw_hello(id: u64, slot: u32) -> Result<Never, BoxError> {
    let limits = Limits::default();
    let (identity, mut channel) =
        cluster_net::ipc::env::adopt_worker(limits)?.ok_or("no control channel")?;
    let deadline = Some(Instant::now() + Duration::from_secs(10));
    let hello = ToPrimary::Hello {
        worker_id: identity.id,
        pid: std::process::id(),
        protocol_version: PROTOCOL_VERSION,
    };
    match channel.call(&hello, &[], deadline)?.msg {
        ToWorker::Welcome { .. } => {}
        other => return Err(format!("the primary answered Hello with {other:?}").into()),
    }
    let report = UserMessage::encode(&msg("report", report_fields(id, slot)), &limits)?;
    channel.send_blocking(None, &ToPrimary::User(report), &[], deadline)?;
    // Keep the channel open, unread, for as long as the process lives.
    let _channel = channel;
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn park_forever() -> ! {
    loop {
        std::thread::park();
    }
}

fn env_number<T: std::str::FromStr>(var: &str) -> Result<T, BoxError> {
    let value = std::env::var(var).map_err(|err| format!("{var}: {err}"))?;
    value
        .trim()
        .parse()
        .map_err(|_| format!("{var}: not a number: {value:?}").into())
}
