//! `cargo xtask package`: the Debian package of the daemon.
//!
//! The release binary embeds the BPF object, so an Edge needs neither Rust nor LLVM. What the
//! package carries besides the binary is generated from the binary itself (man page and
//! completions from its clap definition, the catalogue from `catalogue --default`), so none of
//! it can drift from the code; cargo-deb then assembles the package from
//! `[package.metadata.deb]` in edge-classifier/Cargo.toml and lintian checks it.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{cargo, check, target_dir};

/// Put above the default catalogue in /etc/edge-classifier/edge.toml.
const CATALOGUE_HEADER: &str = "\
# /etc/edge-classifier/edge.toml: the rule catalogue edge-classifier.service enforces.
#
# Before you enable the service, edit [sets] below: `access_edge` and `internal_edge` must hold
# this Edge's real external and internal addresses (they are documentation addresses now), and
# the partner sets the real federation partners. Bind the NICs to the roles in
# /etc/default/edge-classifier. Check an edit with `edge-classifier check /etc/edge-classifier/edge.toml`
# and apply it with `systemctl reload edge-classifier` (atomic: a bad file changes nothing).
# `man edge-classifier` and /usr/share/doc/edge-classifier/README.md describe every key.

";

fn capture(cmd: &mut Command) -> anyhow::Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

fn write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Builds `target/debian/edge-classifier_VERSION_amd64.deb`, checks it with lintian (errors
/// fail; warnings are printed) and returns its path.
pub fn package() -> anyhow::Result<PathBuf> {
    check(cargo().args([
        "build",
        "--release",
        "--package",
        "edge-classifier",
        "--bin",
        "edge-classifier",
    ]))?;
    let target = target_dir()?;
    let bin = target.join("release/edge-classifier");
    let assets = target.join("deb-assets");
    std::fs::create_dir_all(&assets)?;

    let mut catalogue = CATALOGUE_HEADER.as_bytes().to_vec();
    catalogue.extend(capture(
        Command::new(&bin).args(["catalogue", "--default"]),
    )?);
    write(&assets.join("edge.toml"), &catalogue)?;

    // gzip -9n: no name or timestamp in the header, so the package is reproducible.
    let man = capture(Command::new(&bin).arg("manpage"))?;
    let mut gzip = Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("spawning gzip")?;
    gzip.stdin.take().context("gzip stdin")?.write_all(&man)?;
    let out = gzip.wait_with_output()?;
    if !out.status.success() {
        bail!("gzip failed: {}", out.status);
    }
    write(&assets.join("edge-classifier.1.gz"), &out.stdout)?;

    for (shell, file) in [
        ("bash", "edge-classifier.bash"),
        ("zsh", "_edge-classifier"),
        ("fish", "edge-classifier.fish"),
    ] {
        let script = capture(Command::new(&bin).args(["completions", shell]))?;
        write(&assets.join(file), &script)?;
    }

    let out_dir = target.join("debian");
    std::fs::create_dir_all(&out_dir)?;
    let stdout = capture(
        cargo()
            .args([
                "deb",
                "--package",
                "edge-classifier",
                "--no-build",
                "--output",
            ])
            .arg(&out_dir),
    )?;
    let deb = PathBuf::from(String::from_utf8(stdout)?.trim());
    if !deb.is_file() {
        bail!(
            "cargo deb did not name the package it wrote: {}",
            deb.display()
        );
    }
    lintian(&deb)?;
    println!("{}", deb.display());
    Ok(deb)
}

/// lintian: errors fail the build, warnings are shown.
fn lintian(deb: &Path) -> anyhow::Result<()> {
    let out = Command::new("lintian")
        .args(["--no-tag-display-limit"])
        .arg(deb)
        .output()
        .context("spawning lintian (`cargo xtask setup` installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("E:")).collect();
    for line in text.lines() {
        eprintln!("lintian: {line}");
    }
    if !errors.is_empty() {
        bail!(
            "lintian reports {} errors on {}",
            errors.len(),
            deb.display()
        );
    }
    Ok(())
}
