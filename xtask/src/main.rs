//! `cargo xtask setup | run | reload | test | package | bench`: the CLI here, one file per task.

mod bench;
mod package;
mod reload;
mod run;
mod setup;
mod test;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "edge-classifier project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks (the pinned eBPF nightly with rust-src, Debian LLVM and
    /// bpf-linker on that nightly's LLVM major, the test packages, cargo-fuzz) and
    /// mount bpffs. Idempotent; `run` and `test` do it first.
    Setup,
    /// Without --iface: build a namespace lab, attach the default catalogue, send traffic for
    /// each inbound seed row and some disallowed probes, print the counters, stay up until
    /// Ctrl-C, and remove everything. With --iface: `edge-classifier run` on real NICs.
    Run {
        /// Passed on to `edge-classifier run` (e.g. --iface eth0=external --catalogue edge.toml).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
        /// Lab only: stop by itself after this many seconds instead of waiting for Ctrl-C.
        #[arg(long, value_name = "SECS")]
        duration: Option<u64>,
    },
    /// Validate a catalogue and swap it into the running classifier atomically
    /// (`edge-classifier reload`); an invalid one changes nothing and exits non-zero.
    Reload {
        /// The new catalogue; without it, the running instance's file is read again.
        #[arg(long, value_name = "FILE")]
        catalogue: Option<std::path::PathBuf>,
        /// The classifier instance (`edge-classifier run --instance`).
        #[arg(long, value_name = "NAME", default_value = "default")]
        instance: String,
    },
    /// Build the Debian package target/debian/edge-classifier_VERSION_amd64.deb (binary,
    /// systemd unit, catalogue and NIC bindings under /etc, dashboards and alert rules, man page,
    /// completions) and check it with lintian.
    Package,
    /// Run the benchmarks side by side (per-frame cost vs xdp-filter and an empty program,
    /// scaling, live frames through the stack vs nftables/iptables, a trafgen flood, reload
    /// latency) and write benchmarks/RESULTS.md with SVG plots. Never part of `test`.
    Bench,
    /// Run every test (unit, BPF_PROG_TEST_RUN fixtures, differential, namespace end-to-end,
    /// Prometheus), one at a time, then bounded fuzz runs of the catalogue and frame parsers.
    Test {
        /// Long run: 5,000,000 differential frames and 10 minutes per fuzz target.
        #[arg(long)]
        long: bool,
        /// Extra arguments for the test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

pub(crate) fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

pub(crate) fn check(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Builds the `edge-classifier` binary and returns its path.
pub(crate) fn build_binary() -> anyhow::Result<std::path::PathBuf> {
    check(cargo().args([
        "build",
        "--package",
        "edge-classifier",
        "--bin",
        "edge-classifier",
    ]))?;
    Ok(target_dir()?.join("debug/edge-classifier"))
}

pub(crate) fn target_dir() -> anyhow::Result<std::path::PathBuf> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()?;
    let meta = String::from_utf8(out.stdout)?;
    let key = "\"target_directory\":\"";
    let start = meta
        .find(key)
        .context("cargo metadata has no target_directory")?
        + key.len();
    let end = start + meta[start..].find('"').context("bad metadata")?;
    Ok(std::path::PathBuf::from(&meta[start..end]))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Task::Setup => setup::setup(),
        Task::Package => {
            setup::setup()?;
            package::package().map(|_| ())
        }
        Task::Run { args, duration } => run::run(&args, duration),
        Task::Bench => bench::run(),
        Task::Reload {
            catalogue,
            instance,
        } => reload::run(catalogue.as_deref(), &instance),
        Task::Test { long, args } => test::run(long, &args),
    }
}
