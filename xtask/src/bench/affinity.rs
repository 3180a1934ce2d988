//! Pinning to CPUs, so that on a many-core machine the servers and the load generator do
//! not compete for the same cores.

use anyhow::{Context, Result, bail};
use nix::sched::{CpuSet, sched_setaffinity};
use nix::unistd::Pid;

/// Parses a CPU list: `0-7`, `0,2,4` or a mix (`0-3,8`).
pub(crate) fn parse_cpus(list: &str) -> Result<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
    {
        match part.split_once('-') {
            Some((first, last)) => {
                let first: usize = first
                    .trim()
                    .parse()
                    .with_context(|| format!("bad CPU in {part:?}"))?;
                let last: usize = last
                    .trim()
                    .parse()
                    .with_context(|| format!("bad CPU in {part:?}"))?;
                if last < first {
                    bail!("bad CPU range {part:?}");
                }
                cpus.extend(first..=last);
            }
            None => cpus.push(part.parse().with_context(|| format!("bad CPU {part:?}"))?),
        }
    }
    if cpus.is_empty() {
        bail!("no CPUs in {list:?}");
    }
    Ok(cpus)
}

/// Restricts the calling thread (and the processes it starts from now on) to `cpus`.
pub(crate) fn pin_current_thread(cpus: &[usize]) -> Result<()> {
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu)
            .with_context(|| format!("CPU {cpu} is out of range"))?;
    }
    sched_setaffinity(Pid::from_raw(0), &set).context("sched_setaffinity")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_ranges_parse() {
        assert_eq!(parse_cpus("0-3,8").unwrap(), [0, 1, 2, 3, 8]);
        assert_eq!(parse_cpus("5").unwrap(), [5]);
        assert!(parse_cpus("3-1").is_err());
        assert!(parse_cpus("").is_err());
    }
}
