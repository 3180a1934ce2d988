//! Replies as a person reads them: the status table, durations, sizes.

use std::fmt::Display;

use serde_json::Value;

use crate::protocol::{StatusReport, WorkerReport};

/// What a value the reply did not give (or gave as null) shows as.
const UNKNOWN: &str = "-";

/// The worker table, then the cluster's state in two lines.
pub fn status_text(status: &StatusReport) -> String {
    let mut text = worker_table(&status.workers);
    text.push_str(&cluster_lines(status));
    text
}

/// The table's columns: heading, and whether the values are numbers (aligned right).
const COLUMNS: [(&str, bool); 11] = [
    ("ID", true),
    ("PID", true),
    ("SLOT", true),
    ("STATE", false),
    ("UPTIME", true),
    ("HANDED", true),
    ("ACKED", true),
    ("IN FLIGHT", true),
    ("RESTARTS", true),
    ("PSS", true),
    ("USS", true),
];

fn worker_row(worker: &WorkerReport) -> [String; COLUMNS.len()] {
    let memory = worker.memory.as_ref();
    [
        or_unknown(worker.id),
        or_unknown(worker.pid),
        or_unknown(worker.slot),
        or_unknown(worker.state.as_deref()),
        or_unknown(worker.uptime_ms.map(format_duration_ms)),
        or_unknown(worker.connections_handed),
        or_unknown(worker.connections_acked),
        or_unknown(worker.in_flight),
        or_unknown(worker.restarts),
        or_unknown(memory.and_then(|memory| memory.pss).map(format_bytes)),
        or_unknown(memory.and_then(|memory| memory.uss).map(format_bytes)),
    ]
}

/// One line per worker under a heading, columns two spaces apart.
fn worker_table(workers: &[WorkerReport]) -> String {
    let rows: Vec<_> = workers.iter().map(worker_row).collect();
    let mut widths = COLUMNS.map(|(heading, _)| heading.len());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let headings = COLUMNS.map(|(heading, _)| heading.to_owned());
    for row in std::iter::once(&headings).chain(&rows) {
        let mut line = String::new();
        for (index, cell) in row.iter().enumerate() {
            if index > 0 {
                line.push_str("  ");
            }
            let padding = " ".repeat(widths[index].saturating_sub(cell.chars().count()));
            if COLUMNS[index].1 {
                line.push_str(&padding);
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&padding);
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    if rows.is_empty() {
        text.push_str("(no workers)\n");
    }
    text
}

/// The primary, its target and listeners; then pending, restarts, roll-out, stopping.
fn cluster_lines(status: &StatusReport) -> String {
    let listening = if status.listening.is_empty() {
        "not listening".to_owned()
    } else {
        let addresses: Vec<String> = status
            .listening
            .iter()
            .map(|address| match address {
                Value::String(address) => address.clone(),
                other => other.to_string(),
            })
            .collect();
        format!("listening on {}", addresses.join(", "))
    };
    let rollout = match &status.rollout {
        None => "no roll-out".to_owned(),
        Some(rollout) => format!(
            "roll-out {} in progress ({}/{} replaced)",
            or_unknown(rollout.rollout),
            or_unknown(rollout.done),
            or_unknown(rollout.total)
        ),
    };
    let mut text = format!(
        "primary {}: target {} workers, {listening}\n\
         pending connections {}, restarts {}, {rollout}",
        or_unknown(status.pid),
        or_unknown(status.target_workers),
        or_unknown(status.pending_connections),
        or_unknown(status.restarts),
    );
    if status.stopping == Some(true) {
        text.push_str(", STOPPING");
    }
    text.push('\n');
    text
}

fn or_unknown(value: Option<impl Display>) -> String {
    value.map_or_else(|| UNKNOWN.to_owned(), |value| value.to_string())
}

/// A duration the way an uptime is read: the two largest units, `15s`, `3m20s`, `2h05m`,
/// `3d04h` (rounded down).
pub fn format_duration_ms(ms: u64) -> String {
    let seconds = ms / 1000;
    let (minutes, hours, days) = (seconds / 60, seconds / 3600, seconds / 86_400);
    if minutes == 0 {
        format!("{seconds}s")
    } else if hours == 0 {
        format!("{minutes}m{:02}s", seconds % 60)
    } else if days == 0 {
        format!("{hours}h{:02}m", minutes % 60)
    } else {
        format!("{days}d{:02}h", hours % 24)
    }
}

/// A size in bytes with binary units and one decimal: `512 B`, `2.0 MiB`. A unit goes up
/// from 1000 of the one below (`1000.0 KiB` is `1.0 MiB`), which keeps the column narrow.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    // A float is exact enough for one decimal.
    let mut value = bytes as f64;
    let mut unit = 0;
    // 999.95 and up would show as 1000.0.
    while value >= 999.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{MemoryReport, RolloutReport};

    #[test]
    fn durations_show_their_two_largest_units() {
        assert_eq!(format_duration_ms(0), "0s");
        assert_eq!(format_duration_ms(999), "0s");
        assert_eq!(format_duration_ms(15_000), "15s");
        assert_eq!(format_duration_ms(59_999), "59s");
        assert_eq!(format_duration_ms(60_000), "1m00s");
        assert_eq!(format_duration_ms(200_000), "3m20s");
        assert_eq!(format_duration_ms(3_599_000), "59m59s");
        assert_eq!(format_duration_ms(3_600_000), "1h00m");
        assert_eq!(format_duration_ms(7_500_000), "2h05m");
        assert_eq!(format_duration_ms(86_400_000), "1d00h");
        assert_eq!(format_duration_ms(273_600_000), "3d04h");
        assert_eq!(format_duration_ms(u64::MAX), "213503982334d14h");
    }

    #[test]
    fn sizes_use_binary_units_with_one_decimal() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(999), "999 B");
        assert_eq!(format_bytes(1000), "1.0 KiB");
        assert_eq!(format_bytes(1024), "1.0 KiB");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(1_023_948), "999.9 KiB");
        assert_eq!(format_bytes(1_024_000), "1.0 MiB");
        assert_eq!(format_bytes(2_048_000), "2.0 MiB");
        assert_eq!(format_bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
        assert_eq!(format_bytes(u64::MAX), "16.0 EiB");
    }

    fn worker(id: u64, pid: u64) -> WorkerReport {
        WorkerReport {
            id: Some(id),
            pid: Some(pid),
            slot: Some(id - 1),
            state: Some("listening".into()),
            uptime_ms: Some(200_000),
            connections_handed: Some(120),
            connections_acked: Some(118),
            in_flight: Some(2),
            restarts: Some(0),
            memory: Some(MemoryReport {
                pss: Some(2_048_000),
                uss: None,
            }),
        }
    }

    #[test]
    fn the_status_is_a_table_then_the_cluster() {
        let status = StatusReport {
            pid: Some(1234),
            workers: vec![
                worker(1, 1240),
                WorkerReport {
                    state: Some("starting".into()),
                    memory: None,
                    ..worker(12, 987_654)
                },
            ],
            restarts: Some(3),
            listening: vec![Value::from("127.0.0.1:8080"), Value::from("[::1]:8080")],
            pending_connections: Some(0),
            stopping: Some(true),
            target_workers: Some(2),
            rollout: Some(RolloutReport {
                rollout: Some(1),
                done: Some(1),
                total: Some(2),
            }),
        };
        let expected = "\
ID     PID  SLOT  STATE      UPTIME  HANDED  ACKED  IN FLIGHT  RESTARTS      PSS  USS
 1    1240     0  listening   3m20s     120    118          2         0  2.0 MiB    -
12  987654    11  starting    3m20s     120    118          2         0        -    -
primary 1234: target 2 workers, listening on 127.0.0.1:8080, [::1]:8080
pending connections 0, restarts 3, roll-out 1 in progress (1/2 replaced), STOPPING
";
        assert_eq!(status_text(&status), expected);
    }

    #[test]
    fn an_empty_status_says_so_and_shows_unknowns() {
        let expected = "\
ID  PID  SLOT  STATE  UPTIME  HANDED  ACKED  IN FLIGHT  RESTARTS  PSS  USS
(no workers)
primary -: target - workers, not listening
pending connections -, restarts -, no roll-out
";
        assert_eq!(status_text(&StatusReport::default()), expected);
    }
}
