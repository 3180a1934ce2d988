//! The control protocol's messages: the request line, and what the reply line says.
//!
//! Replies are read leniently: the server's types are `#[non_exhaustive]` and grow, so
//! unknown fields are ignored and a missing optional one shows as unknown rather than
//! failing the command.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::args::Command;

/// The protocol version this client speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// A request, serialized in the field order the protocol documents.
#[derive(Debug, Serialize)]
struct Request {
    version: u32,
    command: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    workers: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    graceful: Option<bool>,
}

/// The request line for `command`, without its newline.
pub fn request_line(command: Command) -> Result<String, serde_json::Error> {
    let (name, workers, graceful) = match command {
        Command::Status => ("status", None, None),
        Command::Reload => ("reload", None, None),
        Command::Scale { workers } => ("scale", Some(workers), None),
        // Graceful is the server's default: say so only to ask for the other.
        Command::Stop { now } => ("stop", None, now.then_some(false)),
        Command::Metrics => ("metrics", None, None),
    };
    serde_json::to_string(&Request {
        version: PROTOCOL_VERSION,
        command: name,
        workers,
        graceful,
    })
}

/// What a well-formed reply says.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// `ok: true`, with the reply's other fields.
    Done(Map<String, Value>),
    /// `ok: false`: the primary refused or failed.
    Refused {
        /// The message for a human.
        error: String,
        /// The kind of failure (`bad_request`, `refused`, ...), when given.
        kind: Option<String>,
    },
}

/// Reads a reply line; the error says what is wrong with it.
pub fn parse_reply(line: &str) -> Result<Answer, String> {
    let value: Value =
        serde_json::from_str(line).map_err(|err| format!("it is not valid JSON ({err})"))?;
    let Value::Object(fields) = value else {
        return Err("it is not a JSON object".into());
    };
    match fields.get("ok") {
        Some(Value::Bool(true)) => Ok(Answer::Done(fields)),
        Some(Value::Bool(false)) => Ok(Answer::Refused {
            error: fields
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("the primary refused the request without saying why")
                .to_owned(),
            kind: fields
                .get("kind")
                .and_then(Value::as_str)
                .map(str::to_owned),
        }),
        Some(_) => Err("its `ok` is not true or false".into()),
        None => Err("it has no `ok`".into()),
    }
}

/// The `status` of a status reply.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StatusReport {
    /// The primary's process id.
    pub pid: Option<u64>,
    /// The workers, in the primary's order.
    pub workers: Vec<WorkerReport>,
    /// How many workers were restarted.
    pub restarts: Option<u64>,
    /// The listening addresses (strings today; anything else is shown as JSON).
    pub listening: Vec<Value>,
    /// Connections accepted and not yet handed to a worker.
    pub pending_connections: Option<u64>,
    /// Whether the cluster is stopping.
    pub stopping: Option<bool>,
    /// How many workers the primary keeps running.
    pub target_workers: Option<u64>,
    /// The roll-out in progress, if any.
    pub rollout: Option<RolloutReport>,
}

/// One worker in a status reply.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct WorkerReport {
    /// The worker's id (from 1).
    pub id: Option<u64>,
    /// Its process id.
    pub pid: Option<u64>,
    /// Its slot.
    pub slot: Option<u64>,
    /// Its lifecycle state: `starting`, `online`, `listening`, ...
    pub state: Option<String>,
    /// How long it has been running.
    pub uptime_ms: Option<u64>,
    /// Connections handed to it.
    pub connections_handed: Option<u64>,
    /// Connections it acknowledged.
    pub connections_acked: Option<u64>,
    /// Connections handed and not yet acknowledged.
    pub in_flight: Option<u64>,
    /// How many times its slot's worker was restarted.
    pub restarts: Option<u64>,
    /// Its memory use, when measured.
    pub memory: Option<MemoryReport>,
}

/// A worker's memory use, in bytes.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct MemoryReport {
    /// Proportional set size: its share of the memory it shares with others.
    pub pss: Option<u64>,
    /// Unique set size: the memory only it uses.
    pub uss: Option<u64>,
}

/// A roll-out in progress.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RolloutReport {
    /// The roll-out's number.
    pub rollout: Option<u64>,
    /// Workers replaced so far.
    pub done: Option<u64>,
    /// Workers to replace.
    pub total: Option<u64>,
}

/// The `status` field of a successful status reply.
pub fn status_report(fields: &Map<String, Value>) -> Result<StatusReport, String> {
    let status = fields.get("status").ok_or("it has no `status`")?;
    StatusReport::deserialize(status)
        .map_err(|err| format!("its `status` is not as expected: {err}"))
}

/// The `metrics` field of a successful metrics reply.
pub fn metrics_text(fields: &Map<String, Value>) -> Result<&str, String> {
    fields
        .get("metrics")
        .and_then(Value::as_str)
        .ok_or_else(|| "it has no `metrics` text".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_the_documented_lines() {
        let line = |command| request_line(command).unwrap();
        assert_eq!(line(Command::Status), r#"{"version":1,"command":"status"}"#);
        assert_eq!(line(Command::Reload), r#"{"version":1,"command":"reload"}"#);
        assert_eq!(
            line(Command::Scale { workers: 3 }),
            r#"{"version":1,"command":"scale","workers":3}"#
        );
        assert_eq!(
            line(Command::Stop { now: false }),
            r#"{"version":1,"command":"stop"}"#
        );
        assert_eq!(
            line(Command::Stop { now: true }),
            r#"{"version":1,"command":"stop","graceful":false}"#
        );
        assert_eq!(
            line(Command::Metrics),
            r#"{"version":1,"command":"metrics"}"#
        );
    }

    #[test]
    fn a_refusal_carries_its_message_and_kind() {
        let answer = parse_reply(
            r#"{"version":1,"ok":false,"error":"already stopping","kind":"refused","new":1}"#,
        );
        assert_eq!(
            answer,
            Ok(Answer::Refused {
                error: "already stopping".into(),
                kind: Some("refused".into()),
            })
        );
        let Ok(Answer::Refused { error, kind }) = parse_reply(r#"{"ok":false}"#) else {
            panic!("a refusal without a message is still a refusal");
        };
        assert!(error.contains("without saying why"));
        assert_eq!(kind, None);
    }

    #[test]
    fn malformed_replies_say_what_is_wrong() {
        assert!(
            parse_reply("not json")
                .unwrap_err()
                .contains("not valid JSON")
        );
        assert!(
            parse_reply("[1]")
                .unwrap_err()
                .contains("not a JSON object")
        );
        assert!(
            parse_reply(r#"{"version":1}"#)
                .unwrap_err()
                .contains("no `ok`")
        );
        assert!(
            parse_reply(r#"{"ok":"yes"}"#)
                .unwrap_err()
                .contains("not true or false")
        );
    }

    #[test]
    fn a_status_reads_the_documented_fields_and_ignores_new_ones() {
        let line = r#"{"version":1,"ok":true,"status":{"pid":1234,"workers":[{"id":1,"pid":1240,"slot":0,"state":"listening","uptime_ms":15000,"connections_handed":120,"connections_acked":118,"in_flight":2,"open_connections":null,"restarts":0,"heartbeat_age_ms":250,"memory":{"pss":2048000,"uss":1024000},"future":{"x":1}}],"restarts":0,"listening":["127.0.0.1:8080"],"pending_connections":0,"stopping":false,"target_workers":2,"rollout":{"rollout":1,"done":1,"total":2},"counters":{"a":1}}}"#;
        let Ok(Answer::Done(fields)) = parse_reply(line) else {
            panic!("a success");
        };
        let status = status_report(&fields).unwrap();
        assert_eq!(status.pid, Some(1234));
        assert_eq!(status.target_workers, Some(2));
        assert_eq!(status.listening, vec![Value::from("127.0.0.1:8080")]);
        let rollout = status.rollout.unwrap();
        assert_eq!(
            (rollout.rollout, rollout.done, rollout.total),
            (Some(1), Some(1), Some(2))
        );
        let worker = &status.workers[0];
        assert_eq!(worker.pid, Some(1240));
        assert_eq!(worker.state.as_deref(), Some("listening"));
        assert_eq!(
            worker.memory.as_ref().and_then(|memory| memory.pss),
            Some(2048000)
        );
    }

    #[test]
    fn a_status_tolerates_missing_and_null_fields() {
        let fields = match parse_reply(
            r#"{"ok":true,"status":{"workers":[{"id":2,"memory":null,"uptime_ms":null}],"rollout":null}}"#,
        ) {
            Ok(Answer::Done(fields)) => fields,
            other => panic!("{other:?}"),
        };
        let status = status_report(&fields).unwrap();
        assert_eq!(status.pid, None);
        assert!(status.rollout.is_none());
        assert_eq!(status.workers[0].id, Some(2));
        assert!(status.workers[0].memory.is_none());
    }

    #[test]
    fn a_status_of_the_wrong_shape_is_an_error() {
        let mut fields = Map::new();
        assert!(status_report(&fields).unwrap_err().contains("no `status`"));
        fields.insert("status".into(), serde_json::json!({"pid": "one"}));
        assert!(
            status_report(&fields)
                .unwrap_err()
                .contains("not as expected")
        );
    }
}
