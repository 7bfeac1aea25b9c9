//! The binary as an operator runs it: exit codes and messages.

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edge-classifier"))
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
fn unknown_interface_and_role_say_what_to_do() {
    let instance = format!("cli{}", std::process::id());
    let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/edge-classifier/{instance}"));
    let out = bin()
        .args([
            "run",
            "--iface",
            "nosuch0=external",
            "--instance",
            &instance,
        ])
        .args(["--metrics", "127.0.0.1:0"])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no network interface named `nosuch0`"),
        "{stderr}"
    );
    assert!(
        !pins.exists(),
        "a failed start left pins at {}",
        pins.display()
    );
    let out = bin()
        .args(["run", "--iface", "lo=dmz", "--instance", &instance])
        .args(["--metrics", "127.0.0.1:0"])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("interface role `dmz` is not in the catalogue"),
        "{stderr}"
    );
    assert!(
        !pins.exists(),
        "a failed start left pins at {}",
        pins.display()
    );
    let _ = std::fs::remove_dir_all(&pins);
    for ext in ["json", "pid", "lock"] {
        let _ = std::fs::remove_file(format!("/run/edge-classifier/{instance}.{ext}"));
    }
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
    let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/edge-classifier/{instance}"));
    for ext in ["json", "pid", "lock"] {
        let _ = std::fs::remove_file(format!("/run/edge-classifier/{instance}.{ext}"));
    }
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
        stderr.contains("needs root, or CAP_BPF + CAP_NET_ADMIN"),
        "{stderr}"
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
