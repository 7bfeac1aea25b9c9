//! `cargo xtask bench`: every benchmark side by side, in one run (the bench binary writes
//! benchmarks/RESULTS.md and the plots).

use std::process::Command;

use anyhow::bail;

use crate::{cargo, check, setup, target_dir};

pub fn run() -> anyhow::Result<()> {
    setup::setup_bench()?;
    check(cargo().args([
        "build",
        "--release",
        "--package",
        "edge-classifier",
        "--package",
        "edge-classifier-bench",
        "--bin",
        "edge-classifier",
        "--bin",
        "edge-classifier-bench",
    ]))?;
    let dir = target_dir()?.join("release");
    let status = Command::new(dir.join("edge-classifier-bench"))
        .arg("benchmarks")
        .arg(dir.join("edge-classifier"))
        .status()?;
    if !status.success() {
        bail!("benchmarks failed: {status}");
    }
    Ok(())
}
