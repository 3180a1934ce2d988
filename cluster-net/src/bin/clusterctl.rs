//! `clusterctl`: the command-line client of a cluster primary's control socket.
//!
//! ```text
//! clusterctl [--socket PATH] [--json] [--timeout SECS] <COMMAND>
//!
//!   status       the workers (id, pid, slot, state, uptime, connections, restarts, memory)
//!                and the cluster (primary pid, target, listeners, pending, roll-out, stopping)
//!   reload       replace every worker; waits until the roll-out is over
//!   scale N      run N workers (N >= 1; `stop` stops the cluster)
//!   stop [--now] stop the cluster; --now does not wait for open connections
//!   metrics      the primary's metrics, in Prometheus text format
//! ```
//!
//! The socket is `--socket PATH`, or else the `CLUSTER_CONTROL_SOCKET` environment variable.
//! `--json` prints the primary's reply as it came, one JSON object on one line. Commands
//! give up after 10 seconds without a reply, except `reload`, which waits for as long as
//! the roll-out takes; `--timeout SECS` sets the limit for any command.
//!
//! Exit status: 0 on success; 1 when the primary refused or failed (its message goes to
//! stderr), or could not be reached, or gave no readable reply; 2 for a wrong command line.
//!
//! The protocol: one JSON request per line, such as `{"version":1,"command":"scale",
//! "workers":3}`, answered by one JSON line, `{"version":1,"ok":true,...}` or
//! `{"version":1,"ok":false,"error":"...","kind":"..."}`.
#![forbid(unsafe_code)]

// A binary's root looks for its modules next to it; these live in a folder of their own.
#[path = "clusterctl/args.rs"]
mod args;
#[path = "clusterctl/client.rs"]
mod client;
#[path = "clusterctl/protocol.rs"]
mod protocol;
#[path = "clusterctl/render.rs"]
mod render;

use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};
use serde_json::{Map, Value};

use crate::args::{Args, Command, SOCKET_ENV};
use crate::client::Limits;
use crate::protocol::Answer;

/// How long a command other than `reload` waits for the primary, unless `--timeout` says.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let args = Args::parse();
    let Some(socket) = args.socket() else {
        Args::command()
            .error(
                ErrorKind::MissingRequiredArgument,
                format!("no control socket: pass --socket PATH or set {SOCKET_ENV}"),
            )
            .exit();
    };
    match run(&socket, &args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("clusterctl: {failure}");
            ExitCode::FAILURE
        }
    }
}

/// Why a command failed (all exit with status 1).
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// The primary could not be asked or did not answer.
    #[error(transparent)]
    Exchange(#[from] client::Error),
    /// The primary answered `ok: false`.
    #[error("{error}{}", refusal_hint(kind.as_deref()))]
    Refused { error: String, kind: Option<String> },
    /// The reply is not what the protocol says.
    #[error(
        "the reply from {} is not understood: {why} (--json prints it as it came)",
        path.display()
    )]
    Malformed { path: PathBuf, why: String },
    /// The request could not be serialized (it always can; the error is kept, not hidden).
    #[error("cannot encode the request: {0}")]
    Request(serde_json::Error),
    /// The output could not be written.
    #[error("cannot write to stdout: {0}")]
    Output(io::Error),
}

/// More to say about a refusal of some kinds.
fn refusal_hint(kind: Option<&str>) -> String {
    match kind {
        Some("unsupported_version") => format!(
            " (clusterctl speaks version {} of the control protocol)",
            protocol::PROTOCOL_VERSION
        ),
        _ => String::new(),
    }
}

/// Sends the command, then prints the reply.
fn run(socket: &Path, args: &Args) -> Result<(), Failure> {
    let request = protocol::request_line(args.command).map_err(Failure::Request)?;
    if args.command == Command::Reload && !args.json && io::stderr().is_terminal() {
        // The reply comes only at the end, which can be minutes away: say why nothing shows.
        eprintln!("waiting for the roll-out to finish...");
    }
    let line = client::exchange(socket, &request, limits(args.command, args.timeout))?;
    let malformed = |why| Failure::Malformed {
        path: socket.to_owned(),
        why,
    };
    let answer = protocol::parse_reply(&line).map_err(malformed)?;
    if args.json {
        print(&format!("{line}\n"))?;
    }
    let fields = match answer {
        Answer::Done(fields) => fields,
        Answer::Refused { error, kind } => return Err(Failure::Refused { error, kind }),
    };
    if args.json {
        return Ok(());
    }
    let text = summary(args.command, &fields).map_err(malformed)?;
    print(&text)
}

/// How long the exchange for `command` may take.
fn limits(command: Command, timeout: Option<Duration>) -> Limits {
    Limits {
        // Even a reload must reach the primary promptly: a stuck primary is not a roll-out.
        connect: timeout.unwrap_or(DEFAULT_TIMEOUT),
        reply: match (timeout, command) {
            (Some(timeout), _) => Some(timeout),
            // The primary answers a reload once every worker was replaced, and a worker
            // takes as long as its connections take to finish.
            (None, Command::Reload) => None,
            (None, _) => Some(DEFAULT_TIMEOUT),
        },
    }
}

/// What to print for a successful reply to `command`.
fn summary(command: Command, fields: &Map<String, Value>) -> Result<String, String> {
    let number = |name: &str| fields.get(name).and_then(Value::as_u64);
    Ok(match command {
        Command::Status => render::status_text(&protocol::status_report(fields)?),
        Command::Reload => match number("rollout") {
            Some(rollout) => format!("roll-out {rollout} done: every worker was replaced\n"),
            None => "roll-out done: every worker was replaced\n".to_owned(),
        },
        Command::Scale { workers } => match (number("from"), number("to")) {
            (Some(from), Some(to)) if from == to => format!("already at {to} workers\n"),
            (Some(from), Some(to)) => format!("scaling from {from} to {to} workers\n"),
            _ => format!("scaling to {workers} workers\n"),
        },
        Command::Stop { now: false } => {
            "the cluster is stopping; its workers finish their open connections first\n".into()
        }
        Command::Stop { now: true } => {
            "the cluster is stopping, without waiting for open connections\n".into()
        }
        Command::Metrics => {
            let mut text = protocol::metrics_text(fields)?.to_owned();
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text
        }
    })
}

/// Writes `text` to stdout.
fn print(text: &str) -> Result<(), Failure> {
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        // The reader is gone (`clusterctl metrics | head -1`): nobody is left to tell.
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        result => result.map_err(Failure::Output),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_reload_waits_without_limit_by_default() {
        let reload = limits(Command::Reload, None);
        assert_eq!((reload.connect, reload.reply), (DEFAULT_TIMEOUT, None));
        let status = limits(Command::Status, None);
        assert_eq!(
            (status.connect, status.reply),
            (DEFAULT_TIMEOUT, Some(DEFAULT_TIMEOUT))
        );
        let given = Duration::from_secs(600);
        let reload = limits(Command::Reload, Some(given));
        assert_eq!((reload.connect, reload.reply), (given, Some(given)));
    }

    fn fields(json: &str) -> Map<String, Value> {
        match protocol::parse_reply(json).unwrap() {
            Answer::Done(fields) => fields,
            refused => panic!("{refused:?}"),
        }
    }

    #[test]
    fn summaries_say_what_happened() {
        let reload = summary(Command::Reload, &fields(r#"{"ok":true,"rollout":3}"#)).unwrap();
        assert_eq!(reload, "roll-out 3 done: every worker was replaced\n");
        let scale = Command::Scale { workers: 3 };
        let scaled = summary(scale, &fields(r#"{"ok":true,"from":2,"to":3}"#)).unwrap();
        assert_eq!(scaled, "scaling from 2 to 3 workers\n");
        let same = summary(scale, &fields(r#"{"ok":true,"from":3,"to":3}"#)).unwrap();
        assert_eq!(same, "already at 3 workers\n");
        let bare = summary(scale, &fields(r#"{"ok":true}"#)).unwrap();
        assert_eq!(bare, "scaling to 3 workers\n");
    }

    #[test]
    fn metrics_are_printed_as_they_came() {
        let text = "# TYPE up gauge\nup 1\n";
        let reply = serde_json::json!({"ok": true, "metrics": text}).to_string();
        assert_eq!(summary(Command::Metrics, &fields(&reply)).unwrap(), text);
        let unterminated = summary(Command::Metrics, &fields(r#"{"ok":true,"metrics":"up 1"}"#));
        assert_eq!(unterminated.unwrap(), "up 1\n");
        let missing = summary(Command::Metrics, &fields(r#"{"ok":true}"#));
        assert!(missing.unwrap_err().contains("no `metrics`"));
    }

    #[test]
    fn a_version_refusal_says_which_version_this_speaks() {
        let refused = Failure::Refused {
            error: "version 1 is not supported".into(),
            kind: Some("unsupported_version".into()),
        };
        assert_eq!(
            refused.to_string(),
            "version 1 is not supported (clusterctl speaks version 1 of the control protocol)"
        );
        let plain = Failure::Refused {
            error: "already stopping".into(),
            kind: Some("refused".into()),
        };
        assert_eq!(plain.to_string(), "already stopping");
    }
}
