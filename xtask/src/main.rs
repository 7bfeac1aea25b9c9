//! `cargo xtask setup | run | reload | test`.

mod lab_run;
mod setup;

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
    /// Install what a fresh machine lacks (Debian packages, nightly rust-src, bpf-linker) and
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
    /// Run every test (unit, BPF_PROG_TEST_RUN fixtures, namespace end-to-end), one at a time.
    Test {
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
    Ok(std::path::Path::new(&meta[start..end]).join("debug/edge-classifier"))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Task::Setup => setup::setup(),
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
        Task::Test { args } => {
            setup::setup()?;
            // Tests touch kernel state (namespaces, XDP attachments): one at a time.
            let mut child = cargo()
                .args([
                    "test",
                    "--workspace",
                    "--exclude",
                    "edge-classifier-ebpf",
                    "--",
                ])
                .arg("--test-threads=1")
                .args(&args)
                .stdout(std::process::Stdio::piped())
                .spawn()?;
            let (mut passed, mut failed) = (0u64, 0u64);
            let stdout = child.stdout.take().context("stdout")?;
            for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
                let line = line?;
                println!("{line}");
                if let Some(rest) = line.strip_prefix("test result: ") {
                    // "ok. 6 passed; 0 failed; 0 ignored; ..."
                    let num = |word: &str| -> u64 {
                        rest.split(';')
                            .find_map(|part| {
                                let mut w = part.split_whitespace().rev();
                                (w.next() == Some(word)).then(|| w.next()).flatten()
                            })
                            .and_then(|n| n.parse().ok())
                            .unwrap_or(0)
                    };
                    passed += num("passed");
                    failed += num("failed");
                }
            }
            let status = child.wait()?;
            // One closing line for the whole workspace: per-crate lines end with doc-test
            // binaries that hold no tests.
            println!("{passed} passed, {failed} failed");
            if !status.success() {
                bail!("cargo test failed: {status}");
            }
            if passed == 0 {
                bail!("no test ran");
            }
            Ok(())
        }
    }
}
