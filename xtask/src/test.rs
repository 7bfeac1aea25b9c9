//! `cargo xtask test`: every test binary of the workspace, one test at a time, and an honest
//! tally of what ran.
//!
//! cargo prints `Running …` / `Doc-tests …` (stderr) before each test binary and the binary
//! prints `test result: …` (stdout) when it finishes. Both streams go through one pipe, so the
//! two stay in order, and every binary started must reach its result line: one that dies by a
//! signal, runs out of memory or fails to link prints none and is counted as failed. cargo runs
//! with --no-fail-fast, so a failing binary does not hide the ones after it.

use std::io::{BufRead as _, BufReader};

use anyhow::{Context as _, bail};

use std::process::Command;

use crate::{cargo, package, setup};

/// One test binary and, once it finished, its counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binary {
    pub name: String,
    pub result: Option<Counts>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

/// The binaries seen so far, in order.
#[derive(Debug, Default)]
pub struct Tally {
    pub binaries: Vec<Binary>,
}

impl Tally {
    /// Reads one line of cargo's merged output.
    pub fn line(&mut self, line: &str) {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("Running ") {
            // "Running tests/cli.rs (target/debug/deps/cli-0123)" or "Running unittests src/lib.rs (…)"
            self.binaries.push(Binary {
                name: rest.trim().to_string(),
                result: None,
            });
        } else if let Some(rest) = trimmed.strip_prefix("Doc-tests ") {
            self.binaries.push(Binary {
                name: format!("doc-tests {}", rest.trim()),
                result: None,
            });
        } else if let Some(rest) = trimmed.strip_prefix("test result: ") {
            // "ok. 6 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s"
            let num = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        let mut w = part.split_whitespace().rev();
                        (w.next() == Some(word)).then(|| w.next()).flatten()
                    })
                    .and_then(|n| n.trim_start_matches("ok.").trim().parse().ok())
                    .unwrap_or(0)
            };
            let counts = Counts {
                passed: num("passed"),
                failed: num("failed"),
                ignored: num("ignored"),
            };
            match self.binaries.last_mut() {
                Some(b) if b.result.is_none() => b.result = Some(counts),
                // A result line with no binary announced: count it, never drop it.
                _ => self.binaries.push(Binary {
                    name: "(unannounced test binary)".to_string(),
                    result: Some(counts),
                }),
            }
        }
    }

    /// Binaries that started and never printed a result.
    pub fn unfinished(&self) -> Vec<&str> {
        self.binaries
            .iter()
            .filter(|b| b.result.is_none())
            .map(|b| b.name.as_str())
            .collect()
    }

    /// Sum over binaries; each binary without a result is one failure.
    pub fn totals(&self) -> Counts {
        let mut t = Counts::default();
        for b in &self.binaries {
            match b.result {
                Some(c) => {
                    t.passed += c.passed;
                    t.failed += c.failed;
                    t.ignored += c.ignored;
                }
                None => t.failed += 1,
            }
        }
        t
    }
}

/// `cargo xtask test`: setup, the package (the service test boots its unit), every test
/// binary, then bounded fuzz runs when every test passed, and the closing tally.
pub fn run(long: bool, args: &[String]) -> anyhow::Result<()> {
    setup::setup()?;
    let mut extra = Vec::new();
    let deb = match package::package() {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("building the package failed: {e:#}");
            extra.push(format!("cargo xtask package: {e:#}"));
            None
        }
    };
    let (tally, cargo_ok) = run_tests(long, args, deb.as_deref())?;
    // Fuzzing only when every test passed: a failure is found faster by the tests.
    if cargo_ok
        && tally.totals().failed == 0
        && let Err(e) = fuzz(if long { 600 } else { 15 })
    {
        extra.push(format!("{e:#}"));
    }
    report(&tally, cargo_ok, &extra)
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

/// Runs every test; prints the tally and returns it with cargo's success.
pub fn run_tests(
    long: bool,
    args: &[String],
    deb: Option<&std::path::Path>,
) -> anyhow::Result<(Tally, bool)> {
    let (reader, writer) = std::io::pipe().context("pipe")?;
    let mut cmd = cargo();
    cmd.env("EC_DIFF_FRAMES", if long { "5000000" } else { "50000" })
        .args([
            "test",
            "--workspace",
            "--exclude",
            "edge-classifier-ebpf",
            "--no-fail-fast",
            "--",
        ])
        // Tests touch kernel state (namespaces, XDP attachments): one at a time.
        .arg("--test-threads=1")
        .args(args)
        .stdout(writer.try_clone()?)
        .stderr(writer);
    if let Some(deb) = deb {
        cmd.env("EC_DEB", deb);
    }
    let mut child = cmd.spawn().context("spawning cargo test")?;
    // The parent's copies of the write end are gone with `cmd`: the reader sees EOF when cargo
    // and every test binary have exited.
    drop(cmd);
    let mut tally = Tally::default();
    for line in BufReader::new(reader).lines() {
        let line = line?;
        println!("{line}");
        tally.line(&line);
    }
    let status = child.wait()?;
    Ok((tally, status.success()))
}

/// The closing lines: per-binary problems, then `N passed, N failed` alone on the last line.
pub fn report(tally: &Tally, cargo_ok: bool, extra_failures: &[String]) -> anyhow::Result<()> {
    let t = tally.totals();
    let unfinished = tally.unfinished();
    println!();
    for name in &unfinished {
        println!("FAILED without a result line (crashed, killed or did not build): {name}");
    }
    for f in extra_failures {
        println!("FAILED: {f}");
    }
    println!(
        "test binaries: {} run, {} without a result; {} ignored",
        tally.binaries.len(),
        unfinished.len(),
        t.ignored
    );
    let failed = t.failed + extra_failures.len() as u64;
    println!("{} passed, {failed} failed", t.passed);
    if !cargo_ok || failed > 0 || t.passed == 0 {
        bail!(
            "tests failed: {failed} failures, {} binaries without a result{}",
            unfinished.len(),
            if cargo_ok {
                ""
            } else {
                ", cargo test exited non-zero"
            }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binary_without_a_result_line_is_a_failure() {
        let mut t = Tally::default();
        for l in [
            "     Running unittests src/lib.rs (target/debug/deps/edge_classifier-1)",
            "running 2 tests",
            "test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s",
            "     Running tests/reload.rs (target/debug/deps/reload-2)",
            "running 3 tests",
            "error: test failed, to rerun pass `-p edge-classifier --test reload`",
            "Caused by:",
            "  process didn't exit successfully: `…/reload-2` (signal: 9, SIGKILL: kill)",
            "     Running tests/cli.rs (target/debug/deps/cli-3)",
            "test result: FAILED. 4 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1s",
            "   Doc-tests edge_classifier",
            "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s",
        ] {
            t.line(l);
        }
        assert_eq!(t.binaries.len(), 4, "{:?}", t.binaries);
        assert_eq!(
            t.unfinished(),
            vec!["tests/reload.rs (target/debug/deps/reload-2)"]
        );
        assert_eq!(
            t.totals(),
            Counts {
                passed: 6,
                failed: 2,
                ignored: 1
            }
        );
        assert!(report(&t, false, &[]).is_err());
    }

    #[test]
    fn all_results_and_no_failure_pass() {
        let mut t = Tally::default();
        t.line("     Running tests/e2e.rs (target/debug/deps/e2e-9)");
        t.line("test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 2s");
        assert!(t.unfinished().is_empty());
        assert!(report(&t, true, &[]).is_ok());
        assert!(report(&t, true, &["fuzz target frame".to_string()]).is_err());
        assert!(report(&Tally::default(), true, &[]).is_err(), "no test ran");
    }
}
