//! The CPU time a process has used, as `/proc/<pid>/stat` counts it: user plus system time
//! of all its threads (not of its children), in clock ticks (`sysconf(_SC_CLK_TCK)`, 100 per
//! second on Linux, so 10 ms each).
//!
//! The bench reads it for a cluster's primary when the measured window opens and when it
//! closes, and divides what the primary used by the connections the load generator completed
//! in between: the primary's CPU cost per connection it handed on.

/// The primary's CPU use over one measured window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CpuUse {
    /// User plus system time used in the window, in clock ticks.
    pub(crate) ticks: u64,
    /// Clock ticks per second.
    pub(crate) ticks_per_second: u64,
}

impl CpuUse {
    /// The CPU use between two readings of [`cpu_ticks`].
    pub(crate) fn between(before: u64, after: u64) -> CpuUse {
        CpuUse {
            // The counters only grow; a smaller second reading would be another process.
            ticks: after.saturating_sub(before),
            ticks_per_second: ticks_per_second(),
        }
    }

    /// Microseconds of CPU per connection, over `connections` completed in the window;
    /// `None` without connections (no division by zero, never NaN).
    pub(crate) fn us_per_connection(&self, connections: u64) -> Option<f64> {
        let seconds = self.ticks as f64 / self.ticks_per_second.max(1) as f64;
        (connections > 0).then(|| seconds * 1e6 / connections as f64)
    }
}

/// `utime + stime` of process `pid`, in clock ticks; an error names what was missing.
pub(crate) fn cpu_ticks(pid: u32) -> Result<u64, String> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|err| format!("reading {path}: {err}"))?;
    parse_cpu_ticks(&stat).ok_or_else(|| format!("no utime/stime in {path}"))
}

/// `utime + stime` (fields 14 and 15) of a `/proc/<pid>/stat` line. The command name
/// (field 2) is in parentheses and may itself hold spaces and parentheses, so the fields are
/// counted from the last `)`: the first one after it is field 3, the state.
pub(crate) fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

/// Clock ticks per second, as the kernel counts them in `/proc` (100 if sysconf does not
/// say).
pub(crate) fn ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a configuration value; it has no preconditions and touches
    // no memory of ours.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real line's shape (from a `hello` primary), fields 14 and 15 being 250 and 125.
    const STAT: &str = "4242 (hello) S 4200 4242 4200 0 -1 4194560 1204 0 0 0 250 125 0 0 20 \
                        0 3 0 123456 12345678 900 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 \
                        0 17 1 0 0 0 0 0";

    #[test]
    fn user_and_system_ticks_add_up() {
        assert_eq!(parse_cpu_ticks(STAT), Some(375));
    }

    #[test]
    fn the_command_name_may_hold_spaces_and_parentheses() {
        let tricky = STAT.replace("(hello)", "(my (odd) name) 7 8)");
        assert_eq!(parse_cpu_ticks(&tricky), Some(375));
        let spaced = STAT.replace("(hello)", "(a b c)");
        assert_eq!(parse_cpu_ticks(&spaced), Some(375));
    }

    #[test]
    fn a_short_or_garbled_line_gives_nothing() {
        assert_eq!(parse_cpu_ticks(""), None);
        assert_eq!(parse_cpu_ticks("4242 hello S 4200"), None);
        assert_eq!(parse_cpu_ticks("4242 (hello) S 4200 4242"), None);
        let garbled = STAT.replace(" 250 125 ", " x 125 ");
        assert_eq!(parse_cpu_ticks(&garbled), None);
    }

    #[test]
    fn this_process_has_a_stat_line() {
        let ticks = cpu_ticks(std::process::id()).unwrap();
        assert!(
            cpu_ticks(std::process::id()).unwrap() >= ticks,
            "the count never goes down"
        );
        assert!(cpu_ticks(u32::MAX).is_err(), "no such process");
    }

    #[test]
    fn cpu_per_connection_is_in_microseconds() {
        let used = CpuUse {
            ticks: 150,
            ticks_per_second: 100,
        };
        // 1.5 s of CPU over 30,000 connections: 50 µs each.
        assert_eq!(used.us_per_connection(30_000), Some(50.0));
        assert_eq!(used.us_per_connection(0), None, "no division by zero");
        let idle = CpuUse {
            ticks: 0,
            ticks_per_second: 100,
        };
        assert_eq!(idle.us_per_connection(1000), Some(0.0));
        assert_eq!(
            CpuUse::between(500, 400).ticks,
            0,
            "a counter that went back"
        );
        assert_eq!(CpuUse::between(400, 500).ticks, 100);
    }
}
