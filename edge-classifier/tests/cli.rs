//! The binary as an operator runs it: exit codes and messages.

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edge-classifier"))
}

/// Removes whatever an instance of a test may have left in bpffs and /run.
fn remove_instance(instance: &str) {
    let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/edge-classifier/{instance}"));
    for ext in ["json", "pid", "lock"] {
        let _ = std::fs::remove_file(format!("/run/edge-classifier/{instance}.{ext}"));
    }
}

fn tmp(name: &str, text: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("ec-cli-{}-{name}", std::process::id()));
    std::fs::write(&p, text).expect("write temp catalogue");
    p
}

#[test]
fn default_catalogue_prints_and_checks_clean() {
    let out = bin()
        .args(["catalogue", "--default"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let path = tmp("default.toml", &text);
    let out = bin().arg("check").arg(&path).output().expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "check failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok: 10 rules"), "{stdout}");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("warning"),
        "the default catalogue checks without warnings: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(path).ok();
}

#[test]
fn bad_catalogue_is_rejected_with_its_location() {
    let out = bin()
        .args(["catalogue", "--default"])
        .output()
        .expect("run");
    let text = String::from_utf8(out.stdout)
        .unwrap()
        .replacen("port = 443", "port = 70000", 1);
    let line = text.lines().position(|l| l == "port = 70000").unwrap() + 1;
    let path = tmp("bad.toml", &text);
    let out = bin().arg("check").arg(&path).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bad catalogue must fail");
    let want = format!("{}:{line}:8: port 70000 is out of range", path.display());
    assert!(stderr.contains(&want), "expected `{want}` in: {stderr}");
    // `run` refuses it before touching any NIC.
    let out = bin()
        .arg("run")
        .arg("--catalogue")
        .arg(&path)
        .args(["--iface", "lo"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&want));
    std::fs::remove_file(path).ok();
}

#[test]
fn check_reports_every_mistake_at_once() {
    let out = bin()
        .args(["catalogue", "--default"])
        .output()
        .expect("run");
    let text = String::from_utf8(out.stdout)
        .unwrap()
        .replacen("udp_idle = 180", "udp_idle = 0", 1)
        .replacen(
            "remote = \"public_im_partners\"",
            "remote = \"public_im_partner\"",
            1,
        )
        .replacen("port = 443", "port = 70000", 1);
    let line = |l: &str| text.lines().position(|x| x == l).unwrap() + 1;
    let path = tmp("mistakes.toml", &text);
    let out = bin().arg("check").arg(&path).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bad catalogue must fail");
    let file = path.display();
    let want = [
        format!(
            "{file}:{}:12: flows.udp_idle = 0 is out of range",
            line("udp_idle = 0")
        ),
        format!(
            "{file}:{}:10: unknown remote set `public_im_partner`: did you mean `public_im_partners`? expected one of",
            line("remote = \"public_im_partner\"")
        ),
        format!(
            "{file}:{}:8: port 70000 is out of range",
            line("port = 70000")
        ),
        format!("{file}: 3 errors"),
    ];
    // One line each, in file order, then the count (and a backtrace if RUST_BACKTRACE is set).
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines.len() >= want.len(), "{stderr}");
    for (got, want) in lines.iter().zip(&want) {
        assert!(
            got.contains(want.as_str()),
            "expected `{want}` in: {stderr}"
        );
    }
    std::fs::remove_file(path).ok();
}

#[test]
fn unknown_interface_and_role_say_what_to_do() {
    let instance = format!("cli{}", std::process::id());
    let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/edge-classifier/{instance}"));
    for (iface, want) in [
        ("nosuch0=external", "no network interface named `nosuch0`"),
        ("lo=dmz", "interface role `dmz` is not in the catalogue"),
    ] {
        let out = bin()
            .args(["run", "--iface", iface, "--instance", &instance])
            .args(["--metrics", "127.0.0.1:0"])
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--iface {iface} must fail");
        assert!(stderr.contains(want), "--iface {iface}: {stderr}");
        assert!(
            !pins.exists(),
            "a failed start (--iface {iface}) left pins at {}",
            pins.display()
        );
    }
    remove_instance(&instance);
}

#[test]
fn reload_and_stop_without_an_instance_say_so() {
    let instance = format!("none{}", std::process::id());
    for args in [
        vec!["reload", "--instance", instance.as_str()],
        vec!["stop", "--instance", instance.as_str()],
    ] {
        let out = bin().args(&args).output().expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(
            stderr.contains(&format!("no classifier instance `{instance}` is running")),
            "{args:?}: {stderr}"
        );
    }
    remove_instance(&instance);
}

#[test]
fn missing_privilege_is_explained() {
    // setpriv drops every capability; the loader must say what it needs instead of failing deep
    // inside a syscall.
    let have_setpriv = Command::new("setpriv").arg("--help").output().is_ok();
    assert!(
        have_setpriv,
        "setpriv (util-linux) is installed by `cargo xtask setup`"
    );
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(env!("CARGO_BIN_EXE_edge-classifier"))
        .args(["run", "--iface", "lo"])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("needs root, or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON"),
        "{stderr}"
    );
}

#[test]
fn cap_bpf_and_net_admin_without_perfmon_is_named() {
    // The set an operator reads in older docs: CAP_BPF + CAP_NET_ADMIN. The verifier then
    // refuses the program ("pointer -= pointer prohibited"); the check must name CAP_PERFMON.
    let out = Command::new("setpriv")
        .args([
            "--inh-caps=-all,+bpf,+net_admin",
            "--bounding-set=-all,+bpf,+net_admin",
        ])
        .arg(env!("CARGO_BIN_EXE_edge-classifier"))
        .args(["run", "--iface", "lo"])
        .output()
        .expect("setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("without CAP_PERFMON"), "{stderr}");
    assert!(
        !stderr.contains("CAP_BPF and") && !stderr.contains("without CAP_NET_ADMIN"),
        "only CAP_PERFMON is missing: {stderr}"
    );
}

#[test]
fn stats_without_a_running_classifier_says_what_to_check() {
    // Port 1 on loopback: nothing listens there.
    let out = bin()
        .args(["stats", "--metrics", "127.0.0.1:1"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no classifier answers at http://127.0.0.1:1/snapshot")
            && stderr.contains("--metrics 127.0.0.1:1"),
        "{stderr}"
    );
}

/// Every profile prints, checks clean and quiet through the binary; an unknown one is named.
#[test]
fn catalogue_profiles_print_and_check_clean() {
    let dir = std::env::temp_dir().join(format!("ec-profiles-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, rules) in [("seed", 10), ("sfb-edge", 29), ("sip-xmpp-edge", 21)] {
        let out = bin()
            .args(["catalogue", "--profile", name])
            .output()
            .unwrap();
        assert!(out.status.success(), "catalogue --profile {name}");
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, &out.stdout).unwrap();
        let check = bin().arg("check").arg(&path).output().unwrap();
        let stdout = String::from_utf8_lossy(&check.stdout);
        let stderr = String::from_utf8_lossy(&check.stderr);
        assert!(check.status.success(), "check {name}: {stdout}{stderr}");
        assert!(
            stdout.contains(&format!("ok: {rules} rules")),
            "check {name}: {stdout}"
        );
        assert!(stderr.is_empty(), "check {name} must be quiet: {stderr}");
    }
    let seed = bin()
        .args(["catalogue", "--profile", "seed"])
        .output()
        .unwrap();
    let default = bin().args(["catalogue", "--default"]).output().unwrap();
    assert_eq!(seed.stdout, default.stdout, "--default is the seed profile");
    let bad = bin()
        .args(["catalogue", "--profile", "sfb"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("sfb-edge"),
        "the known profiles are listed: {err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn replay_counts_a_capture_and_writes_the_dropped_frames() {
    use etherparse::PacketBuilder;
    let dir = std::env::temp_dir().join(format!("ec-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let syn = |src: [u8; 4], dport: u16| {
        let mut f = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4(src, [198, 51, 100, 10], 64)
            .tcp(40000, dport, 1, 64240)
            .syn()
            .write(&mut f, &[])
            .unwrap();
        f
    };
    // 3 × P1, 2 × P3, 4 × denied, 1 runt.
    let mut frames = vec![syn([203, 0, 113, 5], 5061); 3];
    frames.extend(vec![syn([198, 51, 100, 1], 443); 2]);
    frames.extend(vec![syn([198, 51, 100, 1], 22); 4]);
    frames.push(vec![0u8; 10]);
    let capture = dir.join("in.pcap");
    edge_classifier::capture::write_pcap(&capture, frames.iter().map(Vec::as_slice)).unwrap();
    let dropped = dir.join("dropped.pcap");
    let out = bin()
        .arg("replay")
        .arg("--write-dropped")
        .arg(&dropped)
        .arg(&capture)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let count = |label: &str| -> u64 {
        stdout
            .lines()
            .find(|l| {
                l.split_whitespace().next() == Some(label) || l.contains(&format!(" {label} "))
            })
            .and_then(|l| l.split_whitespace().last())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {label} line in\n{stdout}"))
    };
    assert_eq!(count("public-im-sip-in"), 3, "{stdout}");
    assert_eq!(count("client-sip-tls-in"), 2, "{stdout}");
    assert_eq!(count("no_rule"), 4, "{stdout}");
    assert!(
        stdout.contains("1 frames shorter than an Ethernet header skipped"),
        "{stdout}"
    );
    assert!(stdout.contains("agree on every frame"), "{stdout}");
    let written = edge_classifier::capture::read_frames(&dropped).unwrap();
    assert_eq!(written, vec![syn([198, 51, 100, 1], 22); 4]);
    std::fs::remove_dir_all(&dir).ok();
}
