//! Installs, idempotently, what a fresh machine lacks to build and test edge-classifier.
//!
//! The eBPF toolchain is named once, in `edge-classifier-ebpf/rust-toolchain.toml`. Everything
//! else follows from it: the LLVM major of that nightly's rustc decides which Debian LLVM and
//! which bpf-linker feature are installed, because bpf-linker must read the bitcode that rustc
//! writes (a newer LLVM's bitcode fails inside the linker as `ERROR llvm: Invalid record`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, anyhow, bail};

const BPF_LINKER_VERSION: &str = "0.13.0";
/// libFuzzer driver for the bounded fuzz runs of `cargo xtask test`.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Builds the Debian package (`cargo xtask package`).
const CARGO_DEB_VERSION: &str = "3.8.0";
/// Debian packages the build and the tests use besides LLVM: `ip` and `nsenter` for the
/// namespace lab, the Prometheus server and promtool for the observability test, lintian for
/// the package, debootstrap and systemd-nspawn to boot the package's unit in a container;
/// libpcap's headers and library, which `monitor` links for its pcap-filter expressions (the
/// package then depends on libpcap0.8), and for the monitor test tshark, which reads the pcap it
/// writes, and trafgen (netsniff-ng), which floods it.
const PACKAGES: &[&str] = &[
    "iproute2",
    "util-linux",
    "prometheus",
    "lintian",
    "gzip",
    "debootstrap",
    "systemd-container",
    "python3-venv",
    "libpcap-dev",
    "tshark",
    "netsniff-ng",
];

/// A virtualenv this setup owns, for Python tools Debian bookworm does not package at the
/// versions the tests need (its pip refuses system-wide installs, PEP 668): ansible-core runs
/// the Ansible role of the pool test (`edge-classifier/tests/pool.rs` names this path too), and
/// kubernetes-validate checks the DaemonSet manifest against the Kubernetes schemas offline.
/// Made with Debian's python3, so it does not depend on whichever python3 comes first in PATH.
pub const PYTHON_VENV: &str = "/opt/edge-classifier-dev/venv";
/// Pinned: ansible-core 2.19 is the last series that runs on bookworm's Python 3.11.
const PYTHON_TOOLS: &[(&str, &str)] = &[
    ("ansible-core", "2.19.14"),
    ("kubernetes-validate", "1.37.0"),
];

/// The real federation peers of the peer tests (`tests/tests/peers_*.rs`, issue 17): Prosody
/// (with the SQLite driver its storage may use, and lua-unbound, the resolver Debian recommends:
/// without it Prosody falls back to its old built-in one and says so), Kamailio with its TLS
/// module, sipp, baresip (the SIP/TLS client: Debian's sipp has no TLS), coturn, socat (P4's TCP
/// from the media range),
/// dnsmasq as the partner's DNS server, bind9 as the authoritative server whose records the
/// DNS-fed address sets follow (TTLs, SERVFAIL from a zone that fails to load, NXDOMAIN, 1,000
/// SRV records: `tests/tests/dns_sets.rs`), slixmpp for the XMPP clients, openssl for the test
/// CA, dig, and netsniff-ng's trafgen for the flood the peers must get through
/// (`tests/tests/flood.rs`). Installed with the daemons kept from starting on this host
/// ([`ensure_daemons`]).
const PEER_PACKAGES: &[&str] = &[
    "prosody",
    "lua-dbi-sqlite3",
    "lua-unbound",
    "kamailio",
    "kamailio-tls-modules",
    "sip-tester",
    "baresip-core",
    "coturn",
    "socat",
    "dnsmasq",
    "bind9",
    "python3-slixmpp",
    "openssl",
    "bind9-dnsutils",
    "netsniff-ng",
];

/// What `cargo xtask bench` compares against and floods with: xdp-filter, trafgen, nftables,
/// iptables, and bpftool (which runs xdp-filter's program under BPF_PROG_TEST_RUN).
const BENCH_PACKAGES: &[&str] = &[
    "xdp-tools",
    "netsniff-ng",
    "nftables",
    "iptables",
    "bpftool",
];

/// `setup`, and the packages the benchmarks use.
pub fn setup_bench() -> anyhow::Result<()> {
    setup()?;
    ensure_packages(
        &BENCH_PACKAGES
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>(),
    )
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn dpkg_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// The pinned eBPF toolchain as the eBPF crate's `rust-toolchain.toml` names it.
pub struct Pinned {
    /// e.g. `nightly-2026-05-19`
    pub channel: String,
    pub components: Vec<String>,
}

/// Reads the eBPF crate's `rust-toolchain.toml`.
pub fn pinned() -> anyhow::Result<Pinned> {
    let file = workspace_root().join("edge-classifier-ebpf/rust-toolchain.toml");
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let doc: toml::Table = text
        .parse()
        .with_context(|| format!("parsing {}", file.display()))?;
    let t = doc.get("toolchain");
    let channel = t
        .and_then(|t| t.get("channel"))
        .and_then(|c| c.as_str())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("{} has no [toolchain] channel", file.display()))?;
    let components = t
        .and_then(|t| t.get("components"))
        .and_then(|c| c.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|c| c.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Ok(Pinned {
        channel,
        components,
    })
}

/// The pinned eBPF nightly's channel, e.g. `nightly-2026-05-19`.
pub fn ebpf_toolchain() -> anyhow::Result<String> {
    Ok(pinned()?.channel)
}

/// `LLVM version: 22.1.4` in `rustc -vV` → 22.
fn llvm_major(rustc_vv: &str) -> Option<u32> {
    rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse().ok())
}

/// The LLVM major an installed bpf-linker was built against, from the libLLVM it links
/// (`libLLVM.so.22.1`, or `libLLVM-22.so`), or from the `llvm-N` feature cargo recorded when it
/// installed it. None when bpf-linker is missing or neither says.
fn bpf_linker_llvm(path: &Path) -> Option<u32> {
    let from_ldd = output(Command::new("ldd").arg(path)).and_then(|ldd| {
        ldd.split_whitespace().find_map(|w| {
            let name = w.rsplit('/').next()?;
            let rest = name
                .strip_prefix("libLLVM.so.")
                .or_else(|| name.strip_prefix("libLLVM-"))?;
            rest.split(['.', '-']).next()?.parse().ok()
        })
    });
    from_ldd.or_else(|| {
        let home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))?;
        let text = std::fs::read_to_string(home.join(".crates2.json")).ok()?;
        let doc: serde_json::Value = serde_json::from_str(&text).ok()?;
        let (_, install) = doc
            .get("installs")?
            .as_object()?
            .iter()
            .find(|(id, _)| id.starts_with("bpf-linker "))?;
        install
            .get("features")?
            .as_array()?
            .iter()
            .find_map(|f| f.as_str()?.strip_prefix("llvm-")?.parse().ok())
    })
}

fn ensure_packages(packages: &[String]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .map(String::as_str)
        .filter(|p| !dpkg_installed(p))
        .collect();
    if !missing.is_empty() {
        eprintln!("setup: installing Debian packages {}", missing.join(" "));
        run(Command::new("apt-get").arg("update").arg("-qq"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

/// `/usr/sbin/policy-rc.d`: exit 101 tells invoke-rc.d (and deb-systemd-invoke) that no
/// service may be started, so that packages whose postinst would start a daemon (Prosody,
/// Kamailio, coturn, dnsmasq, bind9) leave it stopped; the tests start their own copies inside
/// namespaces.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// Installs the missing `packages` while a temporary `policy-rc.d` forbids starting services;
/// a `policy-rc.d` that was there before is put back afterwards, also when apt fails.
fn ensure_daemons(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<String> = packages
        .iter()
        .filter(|p| !dpkg_installed(p))
        .map(|p| p.to_string())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let policy = Path::new(POLICY_RC_D);
    let saved = std::fs::read(policy).ok();
    std::fs::write(
        policy,
        "#!/bin/sh\n# edge-classifier setup: start no service while installing\nexit 101\n",
    )
    .with_context(|| format!("writing {POLICY_RC_D}"))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755))?;
    }
    eprintln!(
        "setup: installing {} with services kept stopped ({POLICY_RC_D} exits 101)",
        missing.join(" ")
    );
    let result = ensure_packages(&missing);
    let restored = match saved {
        Some(old) => std::fs::write(policy, old),
        None => std::fs::remove_file(policy),
    };
    result?;
    restored.with_context(|| format!("restoring {POLICY_RC_D}"))
}

/// Installs the pinned nightly with its components (rust-src for `-Z build-std=core`, clippy
/// and rustfmt) and returns its LLVM major.
fn ensure_toolchain(pin: &Pinned) -> anyhow::Result<u32> {
    let channel = pin.channel.as_str();
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        channel,
        "--installed",
    ]))
    .unwrap_or_default();
    let missing: Vec<&str> = pin
        .components
        .iter()
        .map(String::as_str)
        .filter(|c| {
            !installed
                .lines()
                .any(|l| l.starts_with(&format!("{c}-")) || l == *c)
        })
        .collect();
    if installed.is_empty() || !missing.is_empty() {
        eprintln!(
            "setup: installing the eBPF toolchain {channel} with {}",
            pin.components.join(", ")
        );
        let mut cmd = Command::new("rustup");
        cmd.args(["toolchain", "install", channel, "--profile", "minimal"]);
        for c in &pin.components {
            cmd.args(["--component", c]);
        }
        run(&mut cmd)?;
    }
    let vv = output(Command::new("rustup").args(["run", channel, "rustc", "-vV"]))
        .with_context(|| format!("`rustup run {channel} rustc -vV` failed"))?;
    llvm_major(&vv).with_context(|| format!("no `LLVM version:` in rustc -vV of {channel}:\n{vv}"))
}

/// Installs bpf-linker against LLVM `llvm` unless the one on PATH already is.
fn ensure_bpf_linker(channel: &str, llvm: u32) -> anyhow::Result<()> {
    let installed = which::which("bpf-linker").ok().map(|p| {
        let version = output(Command::new(&p).arg("--version")).unwrap_or_default();
        let built_on = bpf_linker_llvm(&p);
        (p, version, built_on)
    });
    let why = match &installed {
        None => "bpf-linker is not on PATH".to_string(),
        Some((path, version, _)) if !version.contains(BPF_LINKER_VERSION) => format!(
            "{} is `{}`, not {BPF_LINKER_VERSION}",
            path.display(),
            version.trim()
        ),
        Some((path, _, Some(found))) if *found != llvm => format!(
            "{} is built against LLVM {found}, but the eBPF toolchain {channel} emits LLVM \
             {llvm} bitcode (the link would fail with `ERROR llvm: Invalid record`)",
            path.display()
        ),
        Some((path, _, None)) => {
            format!("cannot tell which LLVM {} is built against", path.display())
        }
        Some(_) => return Ok(()),
    };
    eprintln!(
        "setup: {why}; installing bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm} \
         (/usr/lib/llvm-{llvm})"
    );
    run(Command::new("cargo")
        .args([
            "install",
            "--force",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm}"),
        ])
        .env("LLVM_PREFIX", format!("/usr/lib/llvm-{llvm}")))
}

/// Creates [`PYTHON_VENV`] if missing and installs the [`PYTHON_TOOLS`] it lacks, at their
/// pinned versions.
fn ensure_python_tools() -> anyhow::Result<()> {
    let venv = Path::new(PYTHON_VENV);
    let pip = venv.join("bin/pip");
    if !pip.exists() {
        eprintln!("setup: creating the Python virtualenv {PYTHON_VENV}");
        run(Command::new("/usr/bin/python3")
            .args(["-m", "venv"])
            .arg(venv))?;
    }
    let frozen = output(Command::new(&pip).args(["freeze", "--all"])).unwrap_or_default();
    let missing: Vec<String> = PYTHON_TOOLS
        .iter()
        .map(|(name, version)| format!("{name}=={version}"))
        .filter(|pinned| !frozen.lines().any(|l| l.eq_ignore_ascii_case(pinned)))
        .collect();
    if !missing.is_empty() {
        eprintln!("setup: installing {} into {PYTHON_VENV}", missing.join(" "));
        run(Command::new(&pip)
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(&missing))?;
    }
    Ok(())
}

pub fn setup() -> anyhow::Result<()> {
    let pin = pinned()?;
    let channel = pin.channel.clone();
    let llvm = ensure_toolchain(&pin)?;
    let mut packages: Vec<String> = PACKAGES.iter().map(|p| p.to_string()).collect();
    packages.push(format!("llvm-{llvm}-dev"));
    packages.push(format!("libpolly-{llvm}-dev"));
    ensure_packages(&packages)?;
    ensure_daemons(PEER_PACKAGES)?;
    ensure_bpf_linker(&channel, llvm)?;
    ensure_python_tools()?;

    let fuzz = output(Command::new("cargo").args(["fuzz", "--version"]));
    if !fuzz.is_some_and(|v| v.contains(CARGO_FUZZ_VERSION)) {
        eprintln!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
        run(Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ]))?;
    }

    let deb = output(Command::new("cargo").args(["deb", "--version"]));
    if !deb.is_some_and(|v| v.contains(CARGO_DEB_VERSION)) {
        eprintln!("setup: installing cargo-deb {CARGO_DEB_VERSION}");
        run(Command::new("cargo").args([
            "install",
            "cargo-deb",
            "--locked",
            "--version",
            CARGO_DEB_VERSION,
        ]))?;
    }

    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        eprintln!("setup: mounting bpffs on /sys/fs/bpf");
        std::fs::create_dir_all("/sys/fs/bpf").ok();
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::llvm_major;

    #[test]
    fn reads_the_llvm_major_of_rustc() {
        let vv = "rustc 1.97.0-nightly (9eb3be26b 2026-05-18)\nbinary: rustc\n\
                  host: x86_64-unknown-linux-gnu\nrelease: 1.97.0-nightly\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(vv), Some(22));
        assert_eq!(llvm_major("rustc 1.0\n"), None);
    }
}
