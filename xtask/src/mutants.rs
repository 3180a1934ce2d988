//! `cargo xtask mutants`: mutation testing of the primary's supervisor core.
//!
//! Runs [cargo-mutants](https://mutants.rs) on the core's files only (the decisions of
//! `cluster-primary/src/supervisor/`, not its tests), with the crate's library tests as the
//! judge: the simulator scenarios, the property tests over event sequences and the sabotage
//! tests. A mutant that compiles and that no test notices is a gap in those tests. Installs
//! cargo-mutants first (`cargo install --locked cargo-mutants`) when it is missing.

use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

/// The files whose mutants count: the core, without its tests.
const CORE_FILES: [&str; 4] = [
    "cluster-primary/src/supervisor/mod.rs",
    "cluster-primary/src/supervisor/lifecycle.rs",
    "cluster-primary/src/supervisor/listeners.rs",
    "cluster-primary/src/supervisor/workers.rs",
];

/// The flags of `cargo xtask mutants`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// How many mutants to build and test at once.
    #[arg(long, short, default_value_t = 1)]
    jobs: usize,
    /// Only list the mutants.
    #[arg(long)]
    list: bool,
    /// Proptest cases per property while judging a mutant (the lib tests' own default when
    /// not given).
    #[arg(long)]
    cases: Option<u32>,
    /// Seconds a mutant's tests may run before it counts as caught by a timeout (a mutant
    /// that loops for ever); cargo-mutants picks one from the unmutated run when not given.
    #[arg(long)]
    timeout: Option<u32>,
}

/// Runs cargo-mutants over the core; its report lands in `mutants.out/`.
pub(crate) fn run(args: &Args) -> Result<()> {
    ensure_installed()?;
    let mut cargo = Command::new(env!("CARGO"));
    cargo.args(["mutants", "--package", "cluster-primary"]);
    for file in CORE_FILES {
        cargo.args(["--file", file]);
    }
    if args.list {
        cargo.arg("--list");
    } else {
        cargo.args(["--jobs", &args.jobs.to_string()]);
    }
    if let Some(timeout) = args.timeout {
        cargo.args(["--timeout", &timeout.to_string()]);
    }
    if let Some(cases) = args.cases {
        cargo.env("PROPTEST_CASES", cases.to_string());
    }
    // Only the library's tests judge: the core is tested without processes.
    cargo.args(["--", "--lib"]);
    let status = cargo.status().context("run cargo mutants")?;
    // cargo-mutants exits 2 when mutants survive and 3 when some time out: its report says
    // which; only other codes mean it could not do its work.
    if !status.success() && !matches!(status.code(), Some(2 | 3)) {
        bail!("cargo mutants failed: {status}");
    }
    Ok(())
}

fn ensure_installed() -> Result<()> {
    let found = Command::new(env!("CARGO"))
        .args(["mutants", "--version"])
        .output()
        .is_ok_and(|output| output.status.success());
    if found {
        return Ok(());
    }
    eprintln!("installing cargo-mutants");
    let status = Command::new(env!("CARGO"))
        .args(["install", "--locked", "cargo-mutants"])
        .status()
        .context("run cargo install")?;
    ensure!(
        status.success(),
        "cargo install cargo-mutants failed: {status}"
    );
    Ok(())
}
