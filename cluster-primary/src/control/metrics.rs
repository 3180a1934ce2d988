//! The cluster's counters and gauges in the Prometheus text exposition format (0.0.4).

use std::fmt::Write;

use crate::event::{Status, WorkerInfo};

/// One metric: its name, type and help, then its samples.
struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn start<'a>(out: &'a mut String, name: &str, kind: &str, help: &str) -> Family<'a> {
        // Writing to a String cannot fail.
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out }
    }

    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        let _ = writeln!(self.out, "{name}{labels} {value}");
    }
}

/// The cluster-wide counters: name suffix, help, value.
fn counters(status: &Status) -> [(&'static str, &'static str, u64); 8] {
    let c = &status.counters;
    [
        (
            "connections_accepted_total",
            "Connections the primary accepted on its round-robin listeners.",
            c.accepted,
        ),
        (
            "connections_handed_total",
            "Connections handed to workers (again after a worker died without taking one).",
            c.handed,
        ),
        (
            "connections_acked_total",
            "Connections workers acknowledged (took).",
            c.acked,
        ),
        (
            "connections_redispatched_total",
            "Handed connections a worker never took (it died or hung), queued again.",
            c.redispatched,
        ),
        (
            "connections_returned_total",
            "Connections workers gave back unserved (keep-alive hand-back while draining).",
            c.returned,
        ),
        (
            "connections_closed_on_stop_total",
            "Connections the primary closed unserved because the cluster stopped.",
            c.closed_on_stop,
        ),
        (
            "worker_exits_total",
            "Workers that exited, for any reason.",
            c.exits,
        ),
        (
            "worker_failures_total",
            "Worker exits that counted as failures (crash, fault signal, hung, boot failure).",
            c.failures,
        ),
    ]
}

/// A per-worker gauge or counter: name suffix, type, help, and the value if known.
type WorkerMetric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&WorkerInfo) -> Option<f64>,
);

const WORKER_METRICS: [WorkerMetric; 8] = [
    (
        "worker_connections_handed_total",
        "counter",
        "Connections handed to this worker.",
        |w| Some(w.connections_handed as f64),
    ),
    (
        "worker_connections_acked_total",
        "counter",
        "Connections this worker acknowledged.",
        |w| Some(w.connections_acked as f64),
    ),
    (
        "worker_connections_in_flight",
        "gauge",
        "Connections handed to this worker and not yet acknowledged.",
        |w| Some(w.in_flight as f64),
    ),
    (
        "worker_open_connections",
        "gauge",
        "Connections this worker reported open (least-connections only).",
        |w| w.open_connections.map(f64::from),
    ),
    (
        "worker_uptime_seconds",
        "gauge",
        "Seconds since this worker was spawned.",
        |w| Some(w.uptime.as_secs_f64()),
    ),
    (
        "worker_heartbeat_age_seconds",
        "gauge",
        "Seconds since this worker's serving path last sent a heartbeat.",
        |w| w.heartbeat_age.map(|age| age.as_secs_f64()),
    ),
    (
        "worker_memory_pss_bytes",
        "gauge",
        "This worker's proportional set size, as last measured.",
        |w| w.memory.map(|m| m.pss as f64),
    ),
    (
        "worker_memory_uss_bytes",
        "gauge",
        "This worker's unique set size, as last measured.",
        |w| w.memory.map(|m| m.uss as f64),
    ),
];

impl Status {
    /// The status as metrics in the Prometheus text exposition format: the cluster's
    /// counters (`cluster_connections_accepted_total`, `..._handed_total`, `..._acked_total`,
    /// `..._redispatched_total`, `..._closed_on_stop_total`, `cluster_worker_respawns_total`,
    /// ...), its gauges (workers, target, pending connections), and per-worker gauges and
    /// counters labelled with `worker`, `slot` and `pid`.
    pub fn to_prometheus(&self) -> String {
        let mut out = String::new();
        for (suffix, help, value) in counters(self) {
            let name = format!("cluster_{suffix}");
            Family::start(&mut out, &name, "counter", help).sample(&name, "", value);
        }
        let gauges = [
            (
                "worker_respawns_total",
                "counter",
                "Workers started to replace one that exited.",
                self.restarts,
            ),
            (
                "workers",
                "gauge",
                "Worker processes alive now.",
                self.workers.len() as u64,
            ),
            (
                "target_workers",
                "gauge",
                "The number of workers the cluster keeps running.",
                self.target_workers as u64,
            ),
            (
                "pending_connections",
                "gauge",
                "Connections accepted and not yet handed to a worker.",
                self.pending_connections as u64,
            ),
            (
                "stopping",
                "gauge",
                "1 once the cluster is stopping.",
                u64::from(self.stopping),
            ),
            (
                "rollout_in_progress",
                "gauge",
                "1 while a rolling restart is in progress.",
                u64::from(self.rollout.is_some()),
            ),
        ];
        for (suffix, kind, help, value) in gauges {
            let name = format!("cluster_{suffix}");
            Family::start(&mut out, &name, kind, help).sample(&name, "", value);
        }
        let name = "cluster_worker_info";
        let mut family = Family::start(
            &mut out,
            name,
            "gauge",
            "1 for each live worker, with its state.",
        );
        for worker in &self.workers {
            let state = serde_json::to_value(worker.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let labels = format!("{{{},state=\"{state}\"}}", labels_of(worker));
            family.sample(name, &labels, 1);
        }
        for (suffix, kind, help, value_of) in WORKER_METRICS {
            let name = format!("cluster_{suffix}");
            let mut family = Family::start(&mut out, &name, kind, help);
            for worker in &self.workers {
                if let Some(value) = value_of(worker) {
                    family.sample(&name, &format!("{{{}}}", labels_of(worker)), value);
                }
            }
        }
        out
    }
}

/// A worker's labels (ids and pids only: no value needs escaping).
fn labels_of(worker: &WorkerInfo) -> String {
    format!(
        "worker=\"{}\",slot=\"{}\",pid=\"{}\"",
        worker.id.0, worker.slot.0, worker.pid
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus_parse::{Scrape, Value};

    use crate::event::{Counters, Memory, Status, WorkerInfo, WorkerState};
    use crate::{SlotId, WorkerId};

    fn status() -> Status {
        let worker = |id: u64, memory| WorkerInfo {
            id: WorkerId(id),
            pid: 4000 + id as u32,
            slot: SlotId(id as u32 - 1),
            state: WorkerState::Listening,
            uptime: Duration::from_millis(1500),
            connections_handed: 12,
            connections_acked: 10,
            in_flight: 2,
            open_connections: None,
            restarts: 0,
            heartbeat_age: None,
            memory,
        };
        Status {
            pid: 4000,
            workers: vec![worker(1, Some(Memory::new(2048, 1024))), worker(2, None)],
            restarts: 3,
            listening: vec![],
            pending_connections: 1,
            stopping: false,
            target_workers: 2,
            rollout: None,
            counters: Counters {
                accepted: 25,
                handed: 24,
                acked: 20,
                redispatched: 0,
                ..Counters::default()
            },
        }
    }

    fn value(scrape: &Scrape, name: &str, worker: Option<&str>) -> f64 {
        let sample = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && worker.is_none_or(|w| s.labels.get("worker") == Some(w)))
            .unwrap_or_else(|| panic!("no sample {name} for {worker:?}"));
        match sample.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => panic!("{name} is not a plain value"),
        }
    }

    #[test]
    fn the_metrics_parse_as_prometheus_text_with_every_line_a_sample_or_a_comment() {
        let text = status().to_prometheus();
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let scrape = Scrape::parse(lines).unwrap();
        let sample_lines = text.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(
            scrape.samples.len(),
            sample_lines,
            "a line was not read:\n{text}"
        );
        assert_eq!(
            value(&scrape, "cluster_connections_accepted_total", None),
            25.0
        );
        assert_eq!(
            value(&scrape, "cluster_connections_acked_total", None),
            20.0
        );
        assert_eq!(value(&scrape, "cluster_worker_respawns_total", None), 3.0);
        assert_eq!(value(&scrape, "cluster_workers", None), 2.0);
        assert_eq!(
            value(&scrape, "cluster_worker_connections_in_flight", Some("2")),
            2.0
        );
        assert_eq!(
            value(&scrape, "cluster_worker_uptime_seconds", Some("1")),
            1.5
        );
        assert_eq!(
            value(&scrape, "cluster_worker_memory_uss_bytes", Some("1")),
            1024.0
        );
        // Unknown values are left out, not made up.
        assert!(
            !scrape
                .samples
                .iter()
                .any(|s| s.metric == "cluster_worker_memory_uss_bytes"
                    && s.labels.get("worker") == Some("2"))
        );
        let info = scrape
            .samples
            .iter()
            .find(|s| s.metric == "cluster_worker_info" && s.labels.get("pid") == Some("4001"))
            .unwrap();
        assert_eq!(info.labels.get("state"), Some("listening"));
        assert!(scrape.docs.contains_key("cluster_connections_handed_total"));
    }
}
