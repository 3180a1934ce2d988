//! The control socket's protocol: what an operator's tool (`clusterctl`) asks a running
//! primary, and what it answers.
//!
//! The socket is a Unix stream socket ([`Builder::control_socket`](crate::Builder::control_socket)),
//! created with mode 0600; the primary also checks each peer's credentials and serves only
//! its own user and root. A client writes one JSON object per line (at most
//! [`MAX_REQUEST_LEN`] bytes), and reads one JSON object per line back for each, in order:
//!
//! ```text
//! → {"version":1,"command":"status"}
//! ← {"version":1,"ok":true,"status":{"pid":4242,"workers":[...],...}}
//! → {"version":1,"command":"scale","workers":3}
//! ← {"version":1,"ok":true,"from":2,"to":3}
//! → {"version":1,"command":"reload"}
//! ← {"version":1,"ok":true,"rollout":1}          (once the roll-out is over)
//! → {"version":1,"command":"stop"}                ("graceful":false to stop at once)
//! ← {"version":1,"ok":true}
//! → {"version":1,"command":"metrics"}
//! ← {"version":1,"ok":true,"metrics":"# HELP cluster_connections_accepted_total ..."}
//! → hello
//! ← {"version":1,"ok":false,"kind":"bad_request","error":"not a JSON request: ..."}
//! ```
//!
//! A failure is `"ok":false` with a [`FailureKind`] and a message for people. The status
//! is [`Status`](crate::Status) serialized, with the primary's pid; the metrics are
//! [`Status::to_prometheus`](crate::Status::to_prometheus).

mod metrics;
pub(crate) mod server;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The version of the control protocol this primary speaks; a request of another version is
/// refused with [`FailureKind::UnsupportedVersion`].
pub const PROTOCOL_VERSION: u32 = 1;

/// The longest request line the primary reads; a longer one is refused and its connection
/// closed.
pub const MAX_REQUEST_LEN: usize = 64 * 1024;

/// What a client asks. Fields a request does not know are ignored, so that a newer client's
/// optional extras do not break an older primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Request {
    /// The cluster's [`Status`](crate::Status).
    Status,
    /// A rolling restart of every worker; answered once it is over.
    Reload,
    /// Run this many workers.
    Scale {
        /// How many (at least one).
        workers: usize,
    },
    /// Stop the cluster.
    Stop {
        /// Let workers finish within the shutdown timeout (the default), or kill them now.
        #[serde(default = "graceful_by_default")]
        graceful: bool,
    },
    /// The counters and gauges in the Prometheus text format.
    Metrics,
}

fn graceful_by_default() -> bool {
    true
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FailureKind {
    /// Not a request: not JSON, not an object, an unknown command or field.
    BadRequest,
    /// A request of a protocol version this primary does not speak.
    UnsupportedVersion,
    /// The peer is neither the primary's user nor root.
    PermissionDenied,
    /// The primary cannot do it now (scaling to 0, reloading while stopping, ...).
    Refused,
    /// The rolling restart was aborted; the workers not yet replaced keep serving.
    RolloutAborted,
    /// The request line is longer than [`MAX_REQUEST_LEN`].
    TooLong,
    /// The primary stopped before it could answer.
    NotRunning,
}

/// A request that failed: the kind, and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub(crate) kind: FailureKind,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn new(kind: FailureKind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
        }
    }
}

/// Reads one request line (without its newline).
pub(crate) fn parse_request(line: &[u8]) -> Result<Request, Failure> {
    let bad = |message: String| Failure::new(FailureKind::BadRequest, message);
    let value: Value =
        serde_json::from_slice(line).map_err(|err| bad(format!("not a JSON request: {err}")))?;
    let Value::Object(mut fields) = value else {
        return Err(bad("a request is a JSON object".into()));
    };
    let version = match fields.remove("version") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(_) => None,
        None => {
            return Err(bad(format!(
                "a request needs \"version\":{PROTOCOL_VERSION}"
            )));
        }
    };
    if version != Some(u64::from(PROTOCOL_VERSION)) {
        return Err(Failure::new(
            FailureKind::UnsupportedVersion,
            format!("this primary speaks version {PROTOCOL_VERSION} of the control protocol"),
        ));
    }
    serde_json::from_value(Value::Object(fields))
        .map_err(|err| bad(format!("not a request this primary knows: {err}")))
}

/// A success reply line (with its newline), with `fields` beside `version` and `ok`.
pub(crate) fn success_line(fields: Map<String, Value>) -> String {
    let mut reply = Map::new();
    reply.insert("version".into(), PROTOCOL_VERSION.into());
    reply.insert("ok".into(), true.into());
    reply.extend(fields);
    line_of(&Value::Object(reply))
}

/// A failure reply line (with its newline).
pub(crate) fn failure_line(failure: &Failure) -> String {
    let mut reply = Map::new();
    reply.insert("version".into(), PROTOCOL_VERSION.into());
    reply.insert("ok".into(), false.into());
    reply.insert(
        "kind".into(),
        serde_json::to_value(failure.kind).unwrap_or(Value::Null),
    );
    reply.insert("error".into(), failure.message.clone().into());
    line_of(&Value::Object(reply))
}

fn line_of(value: &Value) -> String {
    // A `Value` of strings, numbers and maps always serializes.
    let mut line = serde_json::to_string(value).unwrap_or_default();
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind_of(line: &str) -> FailureKind {
        match parse_request(line.as_bytes()) {
            Err(failure) => failure.kind,
            Ok(request) => panic!("{line} was taken as {request:?}"),
        }
    }

    #[test]
    fn every_request_parses_from_its_documented_line() {
        let cases = [
            (r#"{"version":1,"command":"status"}"#, Request::Status),
            (r#"{"version":1,"command":"reload"}"#, Request::Reload),
            (
                r#"{"command":"scale","workers":3,"version":1}"#,
                Request::Scale { workers: 3 },
            ),
            (
                r#"{"version":1,"command":"stop"}"#,
                Request::Stop { graceful: true },
            ),
            (
                r#"{"version":1,"command":"stop","graceful":false}"#,
                Request::Stop { graceful: false },
            ),
            (r#"{"version":1,"command":"metrics"}"#, Request::Metrics),
        ];
        for (line, request) in cases {
            assert_eq!(parse_request(line.as_bytes()), Ok(request), "{line}");
        }
    }

    #[test]
    fn malformed_requests_are_refused_with_a_reason() {
        assert_eq!(kind_of("hello"), FailureKind::BadRequest);
        assert_eq!(kind_of("[1,2]"), FailureKind::BadRequest);
        assert_eq!(kind_of(r#"{"command":"status"}"#), FailureKind::BadRequest);
        assert_eq!(
            kind_of(r#"{"version":2,"command":"status"}"#),
            FailureKind::UnsupportedVersion
        );
        assert_eq!(
            kind_of(r#"{"version":"1","command":"status"}"#),
            FailureKind::UnsupportedVersion
        );
        assert_eq!(
            kind_of(r#"{"version":1,"command":"format-disk"}"#),
            FailureKind::BadRequest
        );
        assert_eq!(
            kind_of(r#"{"version":1,"command":"scale"}"#),
            FailureKind::BadRequest
        );
        assert_eq!(
            kind_of(r#"{"version":1,"command":"scale","workers":-1}"#),
            FailureKind::BadRequest
        );
        assert_eq!(kind_of("\u{0}\u{1}\u{2}"), FailureKind::BadRequest);
    }

    #[test]
    fn replies_are_one_json_line_with_the_version() {
        let mut fields = Map::new();
        fields.insert("rollout".into(), 3.into());
        let line = success_line(fields);
        assert!(line.ends_with('\n') && !line.trim_end().contains('\n'));
        let value: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["version"], PROTOCOL_VERSION);
        assert_eq!(value["ok"], true);
        assert_eq!(value["rollout"], 3);
        let line = failure_line(&Failure::new(FailureKind::TooLong, "a \"long\"\nline"));
        assert!(line.ends_with('\n') && !line.trim_end().contains('\n'));
        let value: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["ok"], false);
        assert_eq!(value["kind"], "too_long");
        assert_eq!(value["error"], "a \"long\"\nline");
    }
}
