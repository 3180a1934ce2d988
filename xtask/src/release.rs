//! Benchmarks measure optimized code: `cargo xtask` runs a debug build of xtask, so a task
//! that measures builds xtask and the example servers in release and re-runs itself from
//! that build.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};

/// Set on the release binary a task re-runs itself as, so it never loops.
const REEXEC_VAR: &str = "XTASK_RELEASE_REEXEC";

/// Builds xtask and the examples in release and runs this same command line with the release
/// xtask, exiting with its status. Refuses if even that build is unoptimized.
pub(crate) fn rerun_in_release() -> Result<()> {
    ensure!(
        std::env::var_os(REEXEC_VAR).is_none(),
        "the release build of xtask has debug assertions on; refusing to report numbers \
         from an unoptimized build"
    );
    let exe = build_release()?;
    let status = Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env(REEXEC_VAR, "1")
        .status()
        .with_context(|| format!("running {}", exe.display()))?;
    std::process::exit(status.code().unwrap_or(1));
}

/// `cargo build --release` of xtask and the example servers, returning xtask's executable.
fn build_release() -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    eprintln!("xtask: building in release, so the numbers come from an optimized build");
    let output = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "--quiet",
            "--package",
            "xtask",
            "--package",
            "cluster-examples",
        ])
        .arg("--message-format=json-render-diagnostics")
        .arg("--manifest-path")
        .arg(&manifest)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", Path::new(&cargo).display()))?;
    ensure!(
        output.status.success(),
        "cargo build --release failed ({})",
        output.status
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    for line in stdout.lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] == "compiler-artifact" && message["target"]["name"] == "xtask" {
            if let Some(exe) = message["executable"].as_str() {
                return Ok(PathBuf::from(exe));
            }
        }
    }
    bail!("cargo build --release did not report the xtask executable")
}

/// A binary built beside this one (the release examples, once `rerun_in_release` built them).
pub(crate) fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let path = exe.with_file_name(name);
    ensure!(path.exists(), "{} was not built", path.display());
    Ok(path)
}
