//! The command line, as clap parses it.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// The environment variable that names the control socket when `--socket` is not given.
pub const SOCKET_ENV: &str = "CLUSTER_CONTROL_SOCKET";

/// Talks to a cluster's primary over its control socket.
#[derive(Debug, Parser)]
#[command(name = "clusterctl", version)]
pub struct Args {
    /// The primary's control socket [default: $CLUSTER_CONTROL_SOCKET]
    // Not clap's `env`: it calls an empty variable a missing value of `--socket`, which the
    // user never typed. `Args::socket` reads the variable instead.
    #[arg(long, value_name = "PATH", global = true)]
    pub socket: Option<PathBuf>,

    /// Print the primary's reply as it came (one JSON object on one line)
    #[arg(long, global = true)]
    pub json: bool,

    /// Give up when the primary has not answered within SECS seconds (fractions allowed)
    /// [default: 10; for reload: wait for as long as the roll-out takes]
    #[arg(long, value_name = "SECS", value_parser = parse_timeout, global = true)]
    pub timeout: Option<Duration>,

    #[command(subcommand)]
    pub command: Command,
}

impl Args {
    /// The socket: `--socket`, or else the environment's [`SOCKET_ENV`] if it is not empty
    /// (there is no socket at "").
    pub fn socket(&self) -> Option<PathBuf> {
        self.socket
            .clone()
            .or_else(|| std::env::var_os(SOCKET_ENV).map(PathBuf::from))
            .filter(|path| !path.as_os_str().is_empty())
    }
}

/// What to ask the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Show the workers and the state of the cluster
    Status,
    /// Replace every worker (a rolling restart) and wait until the roll-out is over
    Reload,
    /// Run this many workers from now on
    Scale {
        /// How many workers (at least 1; `clusterctl stop` stops the cluster)
        #[arg(value_name = "WORKERS", value_parser = parse_worker_count)]
        workers: usize,
    },
    /// Stop the cluster; the workers finish their open connections first, unless --now
    Stop {
        /// Do not wait for open connections to finish
        #[arg(long)]
        now: bool,
    },
    /// Print the primary's metrics (Prometheus text format)
    Metrics,
}

/// A worker count for `scale`: a positive integer. Zero is refused here rather than by the
/// primary because it is never what the user means: stopping every worker is `stop`.
fn parse_worker_count(text: &str) -> Result<usize, String> {
    let count: usize = text
        .parse()
        .map_err(|err| format!("`{text}` is not a number of workers: {err}"))?;
    if count == 0 {
        return Err(
            "a cluster needs at least 1 worker; to stop the cluster use `clusterctl stop`".into(),
        );
    }
    Ok(count)
}

/// A timeout in seconds, fractions allowed: `10`, `0.5`. Zero is refused, since the socket
/// timeouts it becomes cannot be zero (and nothing could answer in no time).
fn parse_timeout(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|err| format!("`{text}` is not a number of seconds: {err}"))?;
    let timeout = Duration::try_from_secs_f64(seconds)
        .map_err(|err| format!("`{text}` is not a usable timeout: {err}"))?;
    if timeout.is_zero() {
        return Err(format!(
            "the timeout must be more than 0 seconds (got `{text}`)"
        ));
    }
    Ok(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn worker_counts_are_positive_integers() {
        assert_eq!(parse_worker_count("3"), Ok(3));
        assert!(
            parse_worker_count("0")
                .unwrap_err()
                .contains("clusterctl stop")
        );
        assert!(parse_worker_count("-1").is_err());
        assert!(parse_worker_count("two").unwrap_err().contains("`two`"));
    }

    #[test]
    fn timeouts_are_positive_seconds() {
        assert_eq!(parse_timeout("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_timeout("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_timeout("0").unwrap_err().contains("more than 0"));
        assert!(parse_timeout("-1").is_err());
        assert!(parse_timeout("NaN").is_err());
        assert!(parse_timeout("1e30").is_err());
        assert!(parse_timeout("soon").is_err());
    }

    #[test]
    fn options_go_before_or_after_the_command() {
        let args =
            Args::try_parse_from(["clusterctl", "scale", "3", "--socket", "/s", "--json"]).unwrap();
        assert_eq!(args.command, Command::Scale { workers: 3 });
        assert_eq!(args.socket, Some(PathBuf::from("/s")));
        assert!(args.json);
        let args = Args::try_parse_from(["clusterctl", "--timeout", "2", "stop", "--now"]).unwrap();
        assert_eq!(args.command, Command::Stop { now: true });
        assert_eq!(args.timeout, Some(Duration::from_secs(2)));
    }
}
