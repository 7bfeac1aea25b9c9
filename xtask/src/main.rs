//! `cargo xtask setup | run | reload | test | bench`.

mod lab_run;
mod package;
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

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn check(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Builds the `edge-classifier` binary and returns its path.
fn build_binary() -> anyhow::Result<std::path::PathBuf> {
    check(cargo().args([
        "build",
        "--package",
        "edge-classifier",
        "--bin",
        "edge-classifier",
    ]))?;
    Ok(target_dir()?.join("debug/edge-classifier"))
}

fn target_dir() -> anyhow::Result<std::path::PathBuf> {
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

/// Bounded libFuzzer runs of each target from its seeds; a crash fails (the input is kept in
/// tests/fuzz/artifacts/TARGET/).
fn fuzz(seconds: u32) -> anyhow::Result<()> {
    // cargo-fuzz needs a nightly; the eBPF one is already installed and the fuzz crate builds
    // the eBPF object with it anyway.
    let toolchain = setup::ebpf_toolchain()?;
    for target in ["catalogue", "frame"] {
        let corpus = std::env::temp_dir().join(format!("ec-fuzz-{target}"));
        std::fs::create_dir_all(&corpus)?;
        let out = Command::new("cargo")
            .arg(format!("+{toolchain}"))
            .args(["fuzz", "run", "--fuzz-dir", "tests/fuzz", target])
            .arg(&corpus)
            .arg(format!("tests/fuzz/seeds/{target}"))
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-rss_limit_mb=1024",
                "-timeout=10",
            ])
            .output()
            .with_context(|| format!("running cargo fuzz for {target}"))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let runs = stderr
            .lines()
            .rev()
            .find(|l| l.starts_with("Done "))
            .unwrap_or("(no summary)")
            .to_string();
        if !out.status.success() {
            eprintln!("{stderr}");
            bail!("fuzz target {target} failed: {}", out.status);
        }
        println!("fuzz {target}: {runs}, no crash");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Task::Setup => setup::setup(),
        Task::Package => {
            setup::setup()?;
            package::package().map(|_| ())
        }
        Task::Run { args, duration } => {
            setup::setup()?;
            let bin = build_binary()?;
            if args
                .iter()
                .any(|a| a == "--iface" || a.starts_with("--iface="))
            {
                let status = Command::new(&bin).arg("run").args(&args).status()?;
                std::process::exit(status.code().unwrap_or(1));
            }
            lab_run::run(&bin, &args, duration)
        }
        Task::Bench => {
            setup::setup_bench()?;
            check(cargo().args([
                "build",
                "--release",
                "--package",
                "edge-classifier",
                "--package",
                "edge-classifier-tests",
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
        Task::Reload {
            catalogue,
            instance,
        } => {
            let bin = build_binary()?;
            let mut cmd = Command::new(&bin);
            cmd.args(["reload", "--instance", &instance]);
            if let Some(c) = catalogue {
                cmd.arg("--catalogue").arg(c);
            }
            let status = cmd.status()?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Task::Test { long, args } => {
            setup::setup()?;
            // The package is built first: the container test boots its unit.
            let deb = package::package();
            let mut extra = Vec::new();
            let deb = match deb {
                Ok(d) => Some(d),
                Err(e) => {
                    eprintln!("building the package failed: {e:#}");
                    extra.push(format!("cargo xtask package: {e:#}"));
                    None
                }
            };
            let (tally, cargo_ok) = test::run_tests(long, &args, deb.as_deref())?;
            // Fuzzing only when every test passed: a failure is found faster by the tests.
            if cargo_ok
                && tally.totals().failed == 0
                && let Err(e) = fuzz(if long { 600 } else { 15 })
            {
                extra.push(format!("{e:#}"));
            }
            test::report(&tally, cargo_ok, &extra)
        }
    }
}
