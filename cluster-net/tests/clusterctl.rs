//! Runs the real `clusterctl` against fake control sockets: a thread that takes one
//! connection, reads the request line and answers what the test says.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A directory of its own for each test, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "clusterctl-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the fake primary does once it has read the request.
enum Reply {
    /// Answers this line (a newline is added).
    Line(String),
    /// Closes the connection without a word.
    Close,
    /// Keeps the connection open, saying nothing, until the sender is dropped.
    Silence(mpsc::Receiver<()>),
}

/// A fake primary serving one connection.
struct FakePrimary {
    socket: PathBuf,
    server: JoinHandle<String>,
    _dir: TempDir,
}

impl FakePrimary {
    fn start(reply: Reply) -> FakePrimary {
        let dir = TempDir::new();
        let socket = dir.0.join("control.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || serve_one(&listener, reply));
        FakePrimary {
            socket,
            server,
            _dir: dir,
        }
    }

    fn answering(reply: &str) -> FakePrimary {
        FakePrimary::start(Reply::Line(reply.to_owned()))
    }

    /// The request line it read (without its newline).
    fn request(self) -> String {
        self.server.join().unwrap()
    }
}

fn serve_one(listener: &UnixListener, reply: Reply) -> String {
    // A bounded wait, so that a client that never comes fails the test instead of hanging it.
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(err) if err.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(err) => panic!("no client came: {err}"),
        }
    };
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut reader = BufReader::new(stream);
    let mut request = String::new();
    reader.read_line(&mut request).unwrap();
    assert!(
        request.ends_with('\n'),
        "the request ends its line: {request:?}"
    );
    request.pop();
    let mut stream = reader.into_inner();
    match reply {
        Reply::Line(line) => stream.write_all(format!("{line}\n").as_bytes()).unwrap(),
        Reply::Close => drop(stream),
        Reply::Silence(until) => {
            let _ = until.recv();
        }
    }
    request
}

/// Runs `clusterctl` with `args`, without the socket variable of the environment.
fn clusterctl(socket: Option<&Path>, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_clusterctl"));
    command.env_remove("CLUSTER_CONTROL_SOCKET");
    if let Some(socket) = socket {
        command.arg("--socket").arg(socket);
    }
    command.args(args).output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

const STATUS_REPLY: &str = r#"{"version":1,"ok":true,"status":{"pid":1234,"workers":[{"id":1,"pid":4242,"slot":0,"state":"listening","uptime_ms":15000,"connections_handed":120,"connections_acked":118,"in_flight":2,"open_connections":null,"restarts":0,"heartbeat_age_ms":250,"memory":{"pss":2048000,"uss":1024000}},{"id":3,"pid":4343,"slot":1,"state":"starting","uptime_ms":200000,"connections_handed":0,"connections_acked":0,"in_flight":0,"open_connections":null,"restarts":1,"heartbeat_age_ms":null,"memory":null}],"restarts":1,"listening":["127.0.0.1:8080"],"pending_connections":0,"stopping":false,"target_workers":2,"rollout":null,"counters":{"accepted":120}}}"#;

#[test]
fn status_prints_a_table_with_each_worker() {
    let primary = FakePrimary::answering(STATUS_REPLY);
    let output = clusterctl(Some(&primary.socket), &["status"]);
    let text = stdout(&output);
    assert!(output.status.success(), "{output:?}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("PID"),
        "{text}"
    );
    assert!(
        lines[1].contains("4242") && lines[1].contains("2.0 MiB"),
        "{text}"
    );
    assert!(
        lines[2].contains("4343") && lines[2].contains("3m20s"),
        "{text}"
    );
    assert!(text.contains("primary 1234"), "{text}");
    assert!(text.contains("listening on 127.0.0.1:8080"), "{text}");
    assert_eq!(primary.request(), r#"{"version":1,"command":"status"}"#);
}

#[test]
fn json_prints_the_reply_as_it_came() {
    let primary = FakePrimary::answering(STATUS_REPLY);
    let output = clusterctl(Some(&primary.socket), &["status", "--json"]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(stdout(&output), format!("{STATUS_REPLY}\n"));
    primary.request();
}

#[test]
fn the_socket_can_come_from_the_environment() {
    let primary = FakePrimary::answering(r#"{"version":1,"ok":true,"from":2,"to":3}"#);
    let output = Command::new(env!("CARGO_BIN_EXE_clusterctl"))
        .env("CLUSTER_CONTROL_SOCKET", &primary.socket)
        .args(["scale", "3"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(stdout(&output), "scaling from 2 to 3 workers\n");
    assert_eq!(
        primary.request(),
        r#"{"version":1,"command":"scale","workers":3}"#
    );
}

#[test]
fn stop_now_asks_for_a_stop_that_is_not_graceful() {
    let primary = FakePrimary::answering(r#"{"version":1,"ok":true}"#);
    let output = clusterctl(Some(&primary.socket), &["stop", "--now"]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        primary.request(),
        r#"{"version":1,"command":"stop","graceful":false}"#
    );
}

#[test]
fn metrics_are_printed_verbatim() {
    let metrics = "# HELP cluster_workers Workers running.\n# TYPE cluster_workers gauge\ncluster_workers 2\n";
    let reply = format!(
        r#"{{"version":1,"ok":true,"metrics":{}}}"#,
        serde_json::to_string(metrics).unwrap()
    );
    let primary = FakePrimary::answering(&reply);
    let output = clusterctl(Some(&primary.socket), &["metrics"]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(stdout(&output), metrics);
    assert_eq!(primary.request(), r#"{"version":1,"command":"metrics"}"#);
}

#[test]
fn reload_waits_for_the_end_of_the_roll_out() {
    let primary = FakePrimary::answering(r#"{"version":1,"ok":true,"rollout":3}"#);
    let output = clusterctl(Some(&primary.socket), &["reload"]);
    assert!(output.status.success(), "{output:?}");
    assert!(stdout(&output).contains("roll-out 3 done"), "{output:?}");
    assert_eq!(primary.request(), r#"{"version":1,"command":"reload"}"#);
}

#[test]
fn a_refusal_exits_1_with_the_primary_s_message() {
    let reply =
        r#"{"version":1,"ok":false,"error":"a roll-out is already in progress","kind":"refused"}"#;
    let primary = FakePrimary::answering(reply);
    let output = clusterctl(Some(&primary.socket), &["reload"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert_eq!(
        stderr(&output),
        "clusterctl: a roll-out is already in progress\n"
    );
    assert_eq!(stdout(&output), "");
    primary.request();

    // With --json the reply is printed too, and the exit status still says it failed.
    let primary = FakePrimary::answering(reply);
    let output = clusterctl(Some(&primary.socket), &["--json", "reload"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert_eq!(stdout(&output), format!("{reply}\n"));
    primary.request();
}

#[test]
fn a_missing_socket_exits_1_naming_the_path() {
    let dir = TempDir::new();
    let socket = dir.0.join("absent.sock");
    let output = clusterctl(Some(&socket), &["status"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let message = stderr(&output);
    assert!(
        message.starts_with(&format!(
            "clusterctl: cannot connect to {}: ",
            socket.display()
        )),
        "{message}"
    );
    assert!(
        message.ends_with(": No such file or directory (is the cluster running with --control?)\n"),
        "{message}"
    );
}

#[test]
fn a_silent_primary_runs_out_the_timeout() {
    let (release, silence) = mpsc::channel();
    let primary = FakePrimary::start(Reply::Silence(silence));
    let start = Instant::now();
    let output = clusterctl(Some(&primary.socket), &["--timeout", "1", "status"]);
    let took = start.elapsed();
    drop(release);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(
        stderr(&output).contains(&format!(
            "no reply from {} within 1s",
            primary.socket.display()
        )),
        "{output:?}"
    );
    primary.request();
}

#[test]
fn a_connection_closed_without_a_reply_exits_1() {
    let primary = FakePrimary::start(Reply::Close);
    let output = clusterctl(Some(&primary.socket), &["status"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(
        stderr(&output).contains("closed the connection without a reply"),
        "{output:?}"
    );
    primary.request();
}

#[test]
fn a_reply_that_is_not_json_exits_1() {
    let primary = FakePrimary::answering("HTTP/1.1 400 Bad Request");
    let output = clusterctl(Some(&primary.socket), &["status"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(stderr(&output).contains("not valid JSON"), "{output:?}");
    primary.request();
}

#[test]
fn scale_0_is_refused_before_asking_the_primary() {
    let dir = TempDir::new();
    let output = clusterctl(Some(&dir.0.join("unused.sock")), &["scale", "0"]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(stderr(&output).contains("clusterctl stop"), "{output:?}");
}

#[test]
fn no_socket_at_all_is_a_usage_error_naming_the_variable() {
    let output = clusterctl(None, &["status"]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(
        stderr(&output).contains("--socket PATH or set CLUSTER_CONTROL_SOCKET"),
        "{output:?}"
    );

    // An empty variable names no socket either.
    let output = Command::new(env!("CARGO_BIN_EXE_clusterctl"))
        .env("CLUSTER_CONTROL_SOCKET", "")
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(
        stderr(&output).contains("--socket PATH or set CLUSTER_CONTROL_SOCKET"),
        "{output:?}"
    );
}
