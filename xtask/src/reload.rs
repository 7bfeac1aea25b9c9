//! `cargo xtask reload`: `edge-classifier reload` on the running instance (the lab's or a NIC's).

use std::{path::Path, process::Command};

use crate::build_binary;

pub fn run(catalogue: Option<&Path>, instance: &str) -> anyhow::Result<()> {
    let bin = build_binary()?;
    let mut cmd = Command::new(&bin);
    cmd.args(["reload", "--instance", instance]);
    if let Some(c) = catalogue {
        cmd.arg("--catalogue").arg(c);
    }
    let status = cmd.status()?;
    std::process::exit(status.code().unwrap_or(1));
}
