//! `cargo xtask package`: every library crate packaged as a registry would get it, and built
//! from that package alone.
//!
//! The crates are the workspace members without `publish = false` (from `cargo metadata`, so a
//! new library crate is covered without a change here), in dependency order. Each is first
//! packaged alone, unverified and without a lockfile (making one would look its unpublished
//! siblings up on crates.io), so that a crate that cannot even be packaged (uncommitted
//! changes, a dependency without a version) is named. Then one `cargo package` run packages
//! them all and verifies each `.crate` by building it against the others' `.crate`s (a
//! temporary local registry; cargo 1.90 or newer). That catches what a path dependency hides:
//! a file the package leaves out, a feature a crate needs but only gets from the workspace.
//! One line per crate, in dependency order; on a failure, cargo's output and the crate it
//! failed on.
//!
//! `cargo package` refuses a crate with uncommitted changes (CI's tree is clean);
//! `--allow-dirty` packages the working tree as it is.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

/// The flags of `cargo xtask package`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Only make the `.crate` files, without building them.
    #[arg(long)]
    no_verify: bool,
    /// Package uncommitted changes too.
    #[arg(long)]
    allow_dirty: bool,
}

/// Runs `cargo package` over the publishable crates and prints one line per crate.
pub(crate) fn run(args: &Args) -> Result<()> {
    let root = workspace_root()?;
    let crates = publishable_crates(root)?;
    ensure!(!crates.is_empty(), "no publishable crate in the workspace");

    for name in &crates {
        let mut cargo = cargo_package(root, args);
        if !args.no_verify {
            cargo.arg("--no-verify");
        }
        cargo.args(["--exclude-lockfile", "--package", name]);
        let output = cargo.output().context("run cargo package")?;
        if !output.status.success() {
            eprint!("{}", String::from_utf8_lossy(&output.stderr));
            bail!("cargo package failed packaging {name}");
        }
    }

    let mut cargo = cargo_package(root, args);
    for name in &crates {
        cargo.args(["--package", name]);
    }
    let output = cargo.output().context("run cargo package")?;
    let log = String::from_utf8_lossy(&output.stderr);
    let progress = Progress::parse(&log);

    if !output.status.success() {
        eprint!("{log}");
        match progress.current {
            Some((step, name)) => bail!("cargo package failed {step} {name}"),
            None => bail!("cargo package failed ({})", output.status),
        }
    }
    for line in log.lines().filter(|line| line.starts_with("warning:")) {
        eprintln!("{line}");
    }
    let checked = if args.no_verify {
        "not verified (--no-verify)"
    } else {
        "verified"
    };
    for name in &crates {
        ensure!(
            progress
                .packaged
                .iter()
                .any(|(packaged, _)| packaged.split(' ').next() == Some(name.as_str())),
            "cargo package did not report packaging {name}"
        );
    }
    for (name, summary) in &progress.packaged {
        println!("{name}: {summary}, {checked}");
    }
    Ok(())
}

/// `cargo package` in `root`, with the flags of `args`.
fn cargo_package(root: &Path, args: &Args) -> Command {
    let mut cargo = Command::new(env!("CARGO"));
    cargo.current_dir(root).arg("package");
    if args.no_verify {
        cargo.arg("--no-verify");
    }
    if args.allow_dirty {
        cargo.arg("--allow-dirty");
    }
    cargo
}

/// The workspace's root folder: xtask's parent.
fn workspace_root() -> Result<&'static Path> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent folder")
}

/// The names of the workspace members that may be published (`publish` not `false`), each
/// after the ones it depends on.
fn publishable_crates(root: &Path) -> Result<Vec<String>> {
    let output = Command::new(env!("CARGO"))
        .current_dir(root)
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .output()
        .context("run cargo metadata")?;
    ensure!(
        output.status.success(),
        "cargo metadata failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("parse cargo metadata's output")?;
    let packages = metadata["packages"]
        .as_array()
        .context("cargo metadata listed no packages")?;
    // Each publishable crate with the names of the workspace members it depends on.
    let mut crates = Vec::new();
    for package in packages {
        // `null`: any registry; a list: only those (`publish = false` is the empty list).
        let publishable = package["publish"]
            .as_array()
            .is_none_or(|registries| !registries.is_empty());
        if !publishable {
            continue;
        }
        let name = package["name"]
            .as_str()
            .context("a package without a name")?;
        let siblings: Vec<String> = package["dependencies"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|dependency| dependency["path"].is_string() && dependency["kind"] != "dev")
            .filter_map(|dependency| dependency["name"].as_str().map(str::to_owned))
            .collect();
        crates.push((name.to_owned(), siblings));
    }
    dependency_order(crates)
}

/// Orders `(crate, its dependencies)` so that every crate comes after those of its
/// dependencies that are in the list, keeping the given order otherwise.
fn dependency_order(mut crates: Vec<(String, Vec<String>)>) -> Result<Vec<String>> {
    let names: Vec<String> = crates.iter().map(|(name, _)| name.clone()).collect();
    let mut ordered: Vec<String> = Vec::new();
    while !crates.is_empty() {
        let ready = crates.iter().position(|(_, dependencies)| {
            dependencies
                .iter()
                .all(|dependency| !names.contains(dependency) || ordered.contains(dependency))
        });
        let Some(ready) = ready else {
            bail!("a dependency cycle among the publishable crates");
        };
        ordered.push(crates.remove(ready).0);
    }
    Ok(ordered)
}

/// What cargo package's progress lines say: the crates packaged, in its (dependency) order,
/// with their size, and the last step it started.
#[derive(Debug, Default, PartialEq)]
struct Progress {
    /// `(name version, "N files, size (compressed size)")` per packaged crate.
    packaged: Vec<(String, String)>,
    /// The last step started ("packaging" or "verifying") and its crate.
    current: Option<(&'static str, String)>,
}

impl Progress {
    fn parse(log: &str) -> Progress {
        let mut progress = Progress::default();
        for line in log.lines().map(str::trim_start) {
            if let Some(rest) = line.strip_prefix("Packaging ") {
                progress.current = Some(("packaging", crate_of(rest)));
            } else if let Some(rest) = line.strip_prefix("Verifying ") {
                progress.current = Some(("verifying", crate_of(rest)));
            } else if let Some(summary) = line.strip_prefix("Packaged ") {
                if let Some(("packaging", name)) = &progress.current {
                    progress.packaged.push((name.clone(), summary.to_owned()));
                }
            }
        }
        progress
    }
}

/// `cluster-ipc v0.1.0 (/path)` -> `cluster-ipc v0.1.0`.
fn crate_of(rest: &str) -> String {
    rest.split(" (").next().unwrap_or(rest).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_come_first() {
        let crates = [
            ("net", &["worker", "ipc", "other"][..]),
            ("worker", &["ipc"]),
            ("ipc", &[]),
        ]
        .map(|(name, dependencies)| {
            let dependencies = dependencies.iter().map(|d| (*d).to_owned()).collect();
            (name.to_owned(), dependencies)
        });
        let ordered = dependency_order(crates.to_vec()).unwrap();
        assert_eq!(ordered, ["ipc", "worker", "net"]);

        let cycle = vec![
            ("a".to_owned(), vec!["b".to_owned()]),
            ("b".to_owned(), vec!["a".to_owned()]),
        ];
        assert!(dependency_order(cycle).is_err());
    }

    #[test]
    fn progress_names_every_packaged_crate_and_the_failing_step() {
        let log = "\
   Packaging cluster-ipc v0.1.0 (/w/cluster-ipc)
    Updating crates.io index
    Packaged 23 files, 201.5KiB (56.5KiB compressed)
   Packaging cluster-sched v0.1.0 (/w/cluster-sched)
    Packaged 21 files, 166.4KiB (40.7KiB compressed)
   Verifying cluster-ipc v0.1.0 (/w/cluster-ipc)
   Compiling cluster-ipc v0.1.0 (/w/target/package/cluster-ipc-0.1.0)
    Finished `dev` profile [unoptimized + debuginfo] target(s) in 5.99s
   Verifying cluster-sched v0.1.0 (/w/cluster-sched)
error: could not compile `cluster-sched` (lib) due to 1 previous error
";
        let progress = Progress::parse(log);
        assert_eq!(
            progress.packaged,
            [
                (
                    "cluster-ipc v0.1.0".to_owned(),
                    "23 files, 201.5KiB (56.5KiB compressed)".to_owned()
                ),
                (
                    "cluster-sched v0.1.0".to_owned(),
                    "21 files, 166.4KiB (40.7KiB compressed)".to_owned()
                ),
            ]
        );
        assert_eq!(
            progress.current,
            Some(("verifying", "cluster-sched v0.1.0".to_owned()))
        );
    }
}
