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
fn replay_counts_each_way_and_writes_the_dropped_frames_and_the_verdicts() {
    use etherparse::PacketBuilder;
    let dir = std::env::temp_dir().join(format!("ec-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    const EDGE: [u8; 4] = [198, 51, 100, 10];
    const CLIENT: [u8; 4] = [198, 51, 100, 1];
    let tcp = |src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, ack: bool| {
        let mut f = Vec::new();
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4(src, dst, 64)
            .tcp(sport, dport, 1, 64240)
            .syn();
        if ack { b.ack(1) } else { b }.write(&mut f, &[]).unwrap();
        f
    };
    // 3 × P1, 2 × P3; the Edge's S1 SYN (from its protected address: TC egress) and the
    // answer, which passes because the SYN went out first; an "answer" to a flow the Edge never
    // opened, 4 × denied, 1 runt.
    let mut frames = vec![tcp([203, 0, 113, 5], 40000, EDGE, 5061, false); 3];
    frames.extend(vec![tcp(CLIENT, 40000, EDGE, 443, false); 2]);
    frames.push(tcp(EDGE, 41061, CLIENT, 5061, false));
    frames.push(tcp(CLIENT, 5061, EDGE, 41061, true));
    frames.push(tcp(CLIENT, 5061, EDGE, 41062, true));
    frames.extend(vec![tcp(CLIENT, 40000, EDGE, 22, false); 4]);
    frames.push(vec![0u8; 10]);
    let capture = dir.join("in.pcap");
    // A millisecond apart from the epoch: frame N at N-1 ms.
    edge_classifier::capture::write_pcap(&capture, frames.iter().map(Vec::as_slice)).unwrap();
    let dropped = dir.join("dropped.pcap");
    let verdicts = dir.join("verdicts.tsv");
    let out = bin()
        .arg("replay")
        .arg("--write-dropped")
        .arg(&dropped)
        .arg("--verdicts")
        .arg(&verdicts)
        .arg(&capture)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // RULE IN OUT, and WAY VERDICT REASON FRAMES.
    let row = |first: &str, second: Option<&str>| -> Vec<String> {
        stdout
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|w| w.first() == Some(&first) && second.is_none_or(|s| w.get(2) == Some(&s)))
            .unwrap_or_else(|| panic!("no {first} {second:?} line in\n{stdout}"))
            .iter()
            .map(|w| w.to_string())
            .collect()
    };
    assert_eq!(row("public-im-sip-in", None)[1..], ["3", "0"], "{stdout}");
    assert_eq!(row("client-sip-tls-in", None)[1..], ["2", "0"], "{stdout}");
    assert_eq!(row("sip-federation-out", None)[1..], ["1", "1"], "{stdout}");
    assert_eq!(row("in", Some("no_rule"))[3], "4", "{stdout}");
    assert_eq!(row("in", Some("not_established"))[3], "1", "{stdout}");
    assert!(
        stdout.contains("13 frames through the kernel programs")
            && stdout.contains("11 arriving (XDP), 1 sent by the Edge"),
        "{stdout}"
    );
    assert!(
        stdout.contains("1 frames shorter than an Ethernet header skipped"),
        "{stdout}"
    );
    assert!(stdout.contains("agree on every frame"), "{stdout}");
    // The dropped frames keep their times: frames 8 to 12, at 7 to 11 ms.
    let written = edge_classifier::capture::read_frames(&dropped).unwrap();
    assert_eq!(
        written
            .iter()
            .map(|f| (f.time, f.data.clone()))
            .collect::<Vec<_>>(),
        (7..12)
            .map(|i| (
                std::time::Duration::from_millis(i),
                frames[i as usize].clone()
            ))
            .collect::<Vec<_>>()
    );
    let rule = |id: &str| format!("rule:{id}");
    let want: Vec<String> = [
        ("in", "pass", rule("public-im-sip-in")),
        ("in", "pass", rule("public-im-sip-in")),
        ("in", "pass", rule("public-im-sip-in")),
        ("in", "pass", rule("client-sip-tls-in")),
        ("in", "pass", rule("client-sip-tls-in")),
        ("out", "pass", rule("sip-federation-out")),
        ("in", "pass", rule("sip-federation-out")),
        ("in", "drop", "reason:not_established".to_string()),
        ("in", "drop", "reason:no_rule".to_string()),
        ("in", "drop", "reason:no_rule".to_string()),
        ("in", "drop", "reason:no_rule".to_string()),
        ("in", "drop", "reason:no_rule".to_string()),
        ("-", "skipped", "too_short".to_string()),
    ]
    .iter()
    .enumerate()
    .map(|(i, (way, verdict, counter))| {
        format!("{}\t0.{:06}\t{way}\t{verdict}\t{counter}", i + 1, i * 1000)
    })
    .collect();
    let got = std::fs::read_to_string(&verdicts).unwrap();
    assert_eq!(got.lines().collect::<Vec<_>>(), want);
    std::fs::remove_dir_all(&dir).ok();
}

/// A one-shot command whose reader has gone ends the way Unix tools do (SIGPIPE), not with a
/// panic message about a broken pipe.
#[test]
fn a_closed_pipe_ends_a_command_quietly() {
    use std::os::{fd::FromRawFd as _, unix::process::ExitStatusExt as _};
    let mut fds = [0i32; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // The reader is gone before the command writes a byte.
    unsafe { libc::close(fds[0]) };
    let write_end = unsafe { std::fs::File::from_raw_fd(fds[1]) };
    let out = bin()
        .args(["catalogue", "--profile", "sfb-edge"])
        .stdout(write_end)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "status {:?}, stderr: {stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
